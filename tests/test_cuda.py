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
