"""Time one optimizer step on ResNet-50's parameters: ours against torch's SGD/AdamW and a plain per-tensor LARS.

    python scripts/bench_optim.py [--threads 2] [--repeats 20] [--alone]

torch's SGD and AdamW are each timed with foreach=True and False and the faster counts; ours are timed with both
kernels, and the ratio line uses the one `foreach=None` picks on the device (foreach on CUDA, the loop on CPU). All timings come from this
one process, interleaved round-robin (nine models' parameters, gradients and state, about 2 GB: mostly a
measure of memory traffic), and the median is reported; ratios are what to compare across machines. ``--alone``
steps one model at a time instead (its tensors stay warmer in the caches).
Runs on CUDA too when a GPU is present (--device cuda).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnet50

from optim import LAMB, LARS, param_groups


class SeedLARS(torch.optim.Optimizer):
    """A plain LARS (variant=seed's formulas) as a per-tensor Python loop, for timing."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.001, eps=1e-9):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"] and p.ndim > 1:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                trust = 1.0
                if p.ndim > 1:
                    w_norm, u_norm = p.norm(), buf.norm()
                    if w_norm > 0 and u_norm > 0:
                        trust = group["eta"] * (w_norm / (u_norm + group["eps"]))
                p.add_(buf * trust, alpha=-group["lr"])


def make(name, model):
    groups = param_groups(model, 1e-4)
    plain = [{k: v for k, v in g.items() if k != "adapt"} for g in groups]
    return {
        "torch SGD (foreach)": lambda: torch.optim.SGD(plain, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
        "torch SGD (for-loop)": lambda: torch.optim.SGD(plain, lr=0.1, momentum=0.9, nesterov=True, foreach=False),
        "torch AdamW (foreach)": lambda: torch.optim.AdamW(plain, lr=1e-3, foreach=True),
        "torch AdamW (for-loop)": lambda: torch.optim.AdamW(plain, lr=1e-3, foreach=False),
        "ours LARS (foreach)": lambda: LARS(groups, lr=1.0, momentum=0.9, nesterov=True, foreach=True),
        "ours LARS (for-loop)": lambda: LARS(groups, lr=1.0, momentum=0.9, nesterov=True, foreach=False),
        "ours LAMB (foreach)": lambda: LAMB(groups, lr=1e-3, foreach=True),
        "ours LAMB (for-loop)": lambda: LAMB(groups, lr=1e-3, foreach=False),
        "plain LARS (seed)": lambda: SeedLARS([p for g in groups for p in g["params"]], lr=1.0),
    }[name]()


NAMES = ["torch SGD (foreach)", "torch SGD (for-loop)", "torch AdamW (foreach)", "torch AdamW (for-loop)",
         "ours LARS (foreach)", "ours LARS (for-loop)", "ours LAMB (foreach)", "ours LAMB (for-loop)",
         "plain LARS (seed)"]


def model_with_grads(device) -> torch.nn.Module:
    model = resnet50().to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    return model


def timed_step(opt, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--alone", action="store_true", help="one model at a time instead of nine interleaved")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    times = {n: [] for n in NAMES}
    for names in ([[n] for n in NAMES] if args.alone else [NAMES]):
        models = {n: model_with_grads(device) for n in names}  # one model per optimizer: states stay independent
        opts = {n: make(n, models[n]) for n in names}
        for opt in opts.values():  # first step allocates state
            opt.step()
        for _ in range(args.repeats):
            for n, opt in opts.items():
                times[n].append(timed_step(opt, device))
        n_params = sum(p.numel() for p in models[names[0]].parameters())
        n_tensors = len(list(models[names[0]].parameters()))
        del models, opts
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    sgd = min(med["torch SGD (foreach)"], med["torch SGD (for-loop)"])
    adamw = min(med["torch AdamW (foreach)"], med["torch AdamW (for-loop)"])
    print(f"ResNet-50 ({n_params / 1e6:.1f}M params, {n_tensors} tensors), "
          f"{device}{f', {args.threads} threads' if device.type == 'cpu' else ''}, median of {args.repeats} steps"
          f"{', each optimizer alone' if args.alone else ', interleaved'}")
    print("| optimizer | ms/step | vs torch SGD | vs torch AdamW |\n|---|---|---|---|")
    for n in NAMES:
        print(f"| {n} | {med[n]:.1f} | {med[n] / sgd:.2f}x | {med[n] / adamw:.2f}x |")
    kernel = "foreach" if device.type == "cuda" else "for-loop"  # what foreach=None picks on this device
    lars, lamb, seed = med[f"ours LARS ({kernel})"], med[f"ours LAMB ({kernel})"], med["plain LARS (seed)"]
    print(f"\ndefault kernels on {device.type} ({kernel}): LARS / SGD {lars / sgd:.2f}x (goal <= 1.5x), "
          f"LAMB / AdamW {lamb / adamw:.2f}x (goal <= 1.3x); plain LARS / SGD {seed / sgd:.2f}x")


if __name__ == "__main__":
    main()
