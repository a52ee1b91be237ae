"""What only a GPU can check (skipped without one; `pytest -m cuda` runs just these): the foreach kernels that
foreach=None picks on CUDA equal the CPU loops, and a bf16 + channels_last + compile run trains."""
import pytest
import torch

from optim import LAMB, LARS
from tests.helpers import TINY, run_train

pytestmark = pytest.mark.cuda
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s text per sync


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
        for a, b, gr in zip(cpu, gpu, grads, strict=True):
            a.grad, b.grad = gr, gr.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-10, atol=1e-12)


def test_bf16_channels_last_compile_trains_on_cuda(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "device=cuda", "precision=bf16", "channels_last=true", "compile=true",
                                      "batch=64", "micro_batch=32", "optim=lars"])
    assert not summary["diverged"] and summary["test_acc"] > 0.2 and summary["cuda_peak_mb"] > 0


def test_micro_batch_auto_on_cuda_picks_a_divisor_that_fits(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "device=cuda", "batch=512", "micro_batch=auto", "warmup=none",
                                      "max_steps=2"])
    assert 512 % summary["micro_batch"] == 0 and summary["micro_batch"] * summary["accum_steps"] == 512


def test_decoding_on_the_gpu_crops_as_the_workers_do(tmp_path, monkeypatch):
    """data.decode=device on CUDA (batched nvjpeg, then crop, flip and RandAugment on the GPU): fed libjpeg-turbo's
    pixels, it gives the workers' images to rounding (the same draws, the same crops; a wrong crop of these noise
    images would differ by about one standard deviation everywhere). nvjpeg's own pixels differ from libjpeg-turbo's
    (chroma upsampling, IDCT): the images may differ by no more than the decoders do. Then a run trains with it."""
    from types import SimpleNamespace

    from torchvision.io import decode_jpeg, read_file

    from engine import datasets_disk
    from engine.datasets_disk import ImageFolderData
    from tests.test_datasets import write_imagenet
    write_imagenet(tmp_path / "imagenet", per_class=4)
    root = str(tmp_path / "imagenet")
    plan = SimpleNamespace(micro_batch=4, accum_steps=2, global_batch=8, world_size=1, steps_per_epoch=1)

    def epoch(decode, device):
        data = ImageFolderData(root, 1, 32, auto_augment="ra", decode=decode)
        return torch.cat([x.cpu() for x, _ in data.train_micro_batches(1, 0, plan, 0, 3, None, device)])
    in_workers = epoch("workers", "cpu")
    nvjpeg = epoch("device", "cuda")
    on_gpu = datasets_disk._decode_batch_on
    monkeypatch.setattr(datasets_disk, "_decode_batch_on",
                        lambda device, paths, files: [x.to(device) for x in on_gpu("cpu", paths, files)])
    libjpeg = epoch("device", "cuda")
    files = [read_file(str(p)) for p in sorted((tmp_path / "imagenet" / "train").rglob("*.JPEG"))]
    decoders = torch.stack([(a.cpu().float() - b.float()).abs().mean() for a, b in
                            zip(decode_jpeg(files, device="cuda"), decode_jpeg(files), strict=True)]).mean() / 255
    gaps = {"libjpeg": (libjpeg - in_workers).abs().mean().item(), "nvjpeg": (nvjpeg - in_workers).abs().mean().item(),
            "decoders (in units of the normalised image)": decoders.item() / 0.226}
    print(gaps)  # pytest -rA shows them: scripts/gpu_check.sh's figures
    assert gaps["libjpeg"] < 0.01, gaps  # one level of 255 is 0.017 after normalising
    assert gaps["nvjpeg"] < 3 * gaps["decoders (in units of the normalised image)"] + 0.01, gaps
    summary, _ = run_train(tmp_path, [o for o in TINY if not o.startswith("data")] + [
        "device=cuda", "data=imagenet", f"data.root={root}", "data.num_workers=1", "data.decode=device",
        "model=resnet18", "batch=8", "micro_batch=4", "epochs=1", "warmup=none"])
    assert summary["steps"] == 1 and 0 <= summary["test_acc"] <= 1


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_batches_prepared_on_a_side_stream_are_the_batches(tmp_path, monkeypatch, decode):
    """On CUDA the next batch is decoded (or copied) on a side stream while this one trains: the images equal those
    taken on the training stream, with training kernels queued between the batches."""
    from engine import datasets_disk
    from tests.test_datasets import write_imagenet
    write_imagenet(tmp_path / "imagenet", per_class=8)
    data = datasets_disk.ImageFolderData(str(tmp_path / "imagenet"), 1, 32, decode=decode)
    loader = data._loader(data.val, datasets_disk._Batches([list(range(k, k + 4)) for k in range(0, 16, 4)]))
    ahead = []
    for x, _ in datasets_disk._batches(loader, "cuda"):
        torch.randn(4096, 4096, device="cuda").square().sum()  # training kernels meanwhile
        ahead.append(x.cpu())
    monkeypatch.setattr(datasets_disk, "_ahead_on_side_stream", lambda batches, device: batches)
    plain = [x.cpu() for x, _ in datasets_disk._batches(loader, "cuda")]
    assert len(ahead) == len(plain) == 4
    for a, b in zip(ahead, plain, strict=True):
        torch.testing.assert_close(a, b)


# --- what the review found untested on CUDA -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kw", [{"trust_clip": True}, {"variant": "seed"}, {"lr_in_momentum": False},
                                {"nesterov": True, "weight_decay": 1e-3}])
def test_lars_foreach_on_cuda_equals_the_loop(dtype, tol, kw):
    """Including zero norms (a zero weight tensor, a zero gradient): the trust ratio is 1 there on both paths."""
    g = torch.Generator().manual_seed(1)
    shapes = [(32, 16, 3, 3), (32,), (10, 32), (7,)]
    cpu = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    cpu[3].data.zero_()
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    hyper = {"lr": 0.5, "momentum": 0.9, **kw}
    loop_opt, fast = LARS(cpu, foreach=False, **hyper), LARS(gpu, foreach=True, **hyper)
    for step in range(4):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        grads[2].zero_()
        for a, b, gr in zip(cpu, gpu, grads, strict=True):
            a.grad, b.grad = gr, gr.cuda()
        loop_opt.step()
        fast.step()
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a.detach().float(), b.detach().cpu().float(), rtol=tol, atol=tol)


def test_fp16_overflow_is_skipped_by_the_grad_scaler_not_called_divergence(tmp_path, monkeypatch):
    """A GradScaler that starts far too high overflows the fp16 gradients: those steps are skipped and the scale
    falls; the run goes on (an inf gradient is the scaler's business, an inf loss is divergence)."""
    import functools
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 60))
    summary, run_dir = run_train(tmp_path, [*TINY, "device=cuda", "precision=fp16", "batch=64", "max_steps=6"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert not summary["diverged"] and ckpt["scaler"]["scale"] < 2.0 ** 60


def test_ema_and_mixup_train_on_cuda(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "device=cuda", "batch=64", "ema.enabled=true", "ema.every_steps=1",
                                      "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.augment=true"])
    assert not summary["diverged"] and 0 <= summary["test_acc_ema"] <= 1


def test_a_resume_on_cuda_equals_the_uninterrupted_run(tmp_path):
    args = [*TINY, "device=cuda", "deterministic=true", "batch=64", "checkpoint.every_steps=1", "data.augment=true",
            "model=vit_tiny"]
    run_train(tmp_path, [*args, "max_steps=4"], name="whole")
    run_train(tmp_path, [*args, "max_steps=2"], name="part")
    run_train(tmp_path, [*args, "max_steps=4", "resume=auto"], name="part")
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_through_pinned_workers_trains_on_cuda(tmp_path):
    from tests.test_datasets import write_imagenet
    write_imagenet(tmp_path / "imagenet", per_class=4)
    summary, _ = run_train(tmp_path, [o for o in TINY if not o.startswith("data")] + [
        "device=cuda", "data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_workers=1",
        "model=resnet18", "batch=8", "micro_batch=4", "epochs=1", "warmup=none", "channels_last=true"])
    assert summary["steps"] == 1 and 0 <= summary["test_acc"] <= 1


@pytest.mark.parametrize("extra", [[], ["micro_batch=16", "data.augment=true", "data.mixup_alpha=0.2"]])
def test_one_host_sync_per_step_on_cuda(tmp_path, monkeypatch, extra):
    """torch.cuda.set_sync_debug_mode around steps 2-4: the loss and gradient norm read once, nothing else ("warn"
    mode counts; "error" would stop at that one read)."""
    import warnings

    from engine import loop
    original, calls, counts = loop.train_step, [0], []

    def watched(*a, **k):
        calls[0] += 1
        if not 2 <= calls[0] <= 4:
            return original(*a, **k)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = original(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # the operations' own warning: set_sync_debug_mode itself warns once per process, with "synchroniz" in it
        counts.append([f"{w.filename}:{w.lineno}" for w in seen if SYNC_WARNING in str(w.message)])
        return result
    monkeypatch.setattr(loop, "train_step", watched)
    run_train(tmp_path, [*TINY, "device=cuda", "batch=64", "max_steps=4", "diagnostics.every=0",
                         "diagnostics.noise_scale=false", "checkpoint.enabled=false", *extra])
    assert [len(c) for c in counts] == [1, 1, 1], counts  # each step's lines that synchronised
