"""What only a GPU can check (skipped without one; `pytest -m cuda` runs just these): the foreach kernels that
foreach=None picks on CUDA equal the CPU loops, and a bf16 + channels_last + compile run trains."""
import pytest
import torch

from optim import LAMB, LARS
from tests.helpers import TINY, run_train

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("cls,kw", [(LARS, {"lr": 0.5, "weight_decay": 1e-3, "nesterov": True}),
                                    (LAMB, {"lr": 0.01, "weight_decay": 1e-2})])
def test_cuda_default_kernel_equals_the_cpu_loop(cls, kw):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (64,), (10, 64)]
    cpu = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu, opt_gpu = cls(cpu, foreach=False, **kw), cls(gpu, **kw)  # foreach=None picks foreach on CUDA
    for step in range(5):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for a, b, gr in zip(cpu, gpu, grads):
            a.grad, b.grad = gr, gr.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-10, atol=1e-12)


def test_bf16_channels_last_compile_trains_on_cuda(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "device=cuda", "precision=bf16", "channels_last=true", "compile=true",
                                      "batch=64", "micro_batch=32", "optim=lars"])
    assert not summary["diverged"] and summary["val_acc"] > 0.2 and summary["cuda_peak_mb"] > 0


def test_micro_batch_auto_on_cuda_picks_a_divisor_that_fits(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "device=cuda", "batch=512", "micro_batch=auto", "max_steps=2"])
    assert 512 % summary["micro_batch"] == 0 and summary["micro_batch"] * summary["accum_steps"] == 512


def test_decoding_on_the_gpu_crops_as_the_workers_do(tmp_path):
    """data.decode=device on CUDA (batched nvjpeg): its pixels round differently from libjpeg-turbo's, so they agree
    to within a few levels, not bit for bit; the crops and flips are the same draws (a wrong crop of these noise
    images would differ by about one standard deviation everywhere). Then a run trains with it."""
    from types import SimpleNamespace

    from engine.datasets_disk import ImageFolderData
    from tests.test_datasets import write_imagenet
    write_imagenet(tmp_path / "imagenet", per_class=4)
    root = str(tmp_path / "imagenet")
    plan = SimpleNamespace(micro_batch=4, accum_steps=2, global_batch=8, world_size=1, steps_per_epoch=1)

    def epoch(data, device):
        return torch.cat([x.cpu() for x, _ in data.train_micro_batches(1, 0, plan, 0, 3, None, device)])
    on_gpu = epoch(ImageFolderData(root, 1, 32, auto_augment="ra", decode="device"), "cuda")
    in_workers = epoch(ImageFolderData(root, 1, 32, auto_augment="ra"), "cpu")
    assert (on_gpu - in_workers).abs().mean() < 0.1  # one level of 255 is 0.017 after normalising
    summary, _ = run_train(tmp_path, [o for o in TINY if not o.startswith("data")] + [
        "device=cuda", "data=imagenet", f"data.root={root}", "data.num_workers=1", "data.decode=device",
        "model=resnet18", "batch=8", "micro_batch=4", "epochs=1", "warmup=none"])
    assert summary["steps"] == 1 and 0 <= summary["val_acc"] <= 1
