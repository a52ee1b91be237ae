"""Time one optimizer step on ResNet-50's parameters: ours against torch's SGD/AdamW, timm's Lars/Lamb and a plain
per-tensor LARS.

    python scripts/bench_optim.py [--threads 2] [--repeats 20] [--alone] [--runs 3]

torch's SGD and AdamW are each timed with foreach=True and False and the faster counts; ours are timed with the
three kernels: the first ratio line uses the one `foreach=None` picks on the device (foreach on CUDA, the loop on
CPU), the second ours with fused=True (compiled by torch.compile, before the timing). torch's own fused=True steps
are timed too, and shown beside. All timings come from this
one process, interleaved round-robin (nine models' parameters, gradients and state, about 2 GB: mostly a
measure of memory traffic), and the median is reported; ratios are what to compare across machines. ``--alone``
steps one model at a time instead (its tensors stay warmer in the caches).
Runs on CUDA too when a GPU is present (--device cuda).

Each ratio is given over ``--runs`` whole measurements (min, median, max: the spread to compare with a goal's
margin), beside its floor: the bytes an optimizer must read and write per step (``TRAFFIC``, in fp32 copies of the
parameters) at this machine's memory bandwidth, measured here by an in-place add (reads and writes as an update
does). No kernel beats the floor; a ratio near its floor is bound by memory, not by the code.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm.optim
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
        "ours LARS (fused)": lambda: LARS(groups, lr=1.0, momentum=0.9, nesterov=True, fused=True),
        "ours LAMB (fused)": lambda: LAMB(groups, lr=1e-3, fused=True),
        "torch SGD (fused)": lambda: torch.optim.SGD(plain, lr=0.1, momentum=0.9, nesterov=True, fused=True),
        "torch AdamW (fused)": lambda: torch.optim.AdamW(plain, lr=1e-3, fused=True),
        # timm's own, with the same switches: trust ratios where weight decay is set, no gradient clipping in Lamb
        "timm Lars": lambda: timm.optim.Lars(plain, lr=1.0, momentum=0.9, nesterov=True),
        "timm Lamb": lambda: timm.optim.Lamb(plain, lr=1e-3, max_grad_norm=None),
        "plain LARS (seed)": lambda: SeedLARS([p for g in groups for p in g["params"]], lr=1.0),
    }[name]()


# Each optimizer's least memory traffic per step, in passes over an fp32 copy of the parameters (read + write):
# SGD with momentum reads p, g, buf and writes p, buf: 5. AdamW reads p, g, m, v and writes p, m, v: 7. LARS is
# SGD plus its two norms (|w| and |g + wd w|, a read of p and g before the update can start): 7. LAMB is AdamW plus
# the norms of w and of the update (the update read again, or kept: one pass more): 9. Fusing a norm into the
# pass before it (|w| as the last step wrote w) would save a read; nothing here fuses across steps.
TRAFFIC = {"SGD": 5, "AdamW": 7, "LARS": 7, "LAMB": 9}


def bandwidth(device, mb: int = 256, repeats: int = 7) -> float:
    """Memory bandwidth in GB/s from an in-place add of two large tensors (read a and b, write a: the access
    pattern of an optimizer's in-place update, with no write-allocate reads), median of ``repeats``."""
    a = torch.ones(mb * 2**20 // 4, device=device)
    b = torch.ones_like(a)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.add_(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return 3 * a.numel() * 4 / statistics.median(seconds) / 1e9


NAMES = ["torch SGD (foreach)", "torch SGD (for-loop)", "torch AdamW (foreach)", "torch AdamW (for-loop)",
         "ours LARS (foreach)", "ours LARS (for-loop)", "ours LAMB (foreach)", "ours LAMB (for-loop)",
         "ours LARS (fused)", "ours LAMB (fused)", "torch SGD (fused)", "torch AdamW (fused)", "timm Lars", "timm Lamb",
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


def measure(names_groups, repeats: int, device) -> tuple[dict, int, int]:
    """Median ms per step of each optimizer, over ``repeats`` interleaved rounds."""
    times = {n: [] for n in NAMES}
    for names in names_groups:
        models = {n: model_with_grads(device) for n in names}  # one model per optimizer: states stay independent
        opts = {n: make(n, models[n]) for n in names}
        for opt in opts.values():  # first step allocates state
            opt.step()
        for _ in range(repeats):
            for n, opt in opts.items():
                times[n].append(timed_step(opt, device))
        n_params = sum(p.numel() for p in models[names[0]].parameters())
        n_tensors = len(list(models[names[0]].parameters()))
        del models, opts
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}, n_params, n_tensors


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (runs {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3, help="whole measurements, for the spread of each ratio")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--alone", action="store_true", help="one model at a time instead of nine interleaved")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kernel = "foreach" if device.type == "cuda" else "for-loop"  # what foreach=None picks on this device
    runs = []
    for _ in range(args.runs):
        med, n_params, n_tensors = measure([[n] for n in NAMES] if args.alone else [NAMES], args.repeats, device)
        runs.append(med)
    gbps = bandwidth(device)
    med = {n: statistics.median(r[n] for r in runs) for n in NAMES}
    best = {"SGD": [min(r["torch SGD (foreach)"], r["torch SGD (for-loop)"]) for r in runs],
            "AdamW": [min(r["torch AdamW (foreach)"], r["torch AdamW (for-loop)"]) for r in runs],
            "LARS": [r["ours LARS (fused)"] for r in runs], "LAMB": [r["ours LAMB (fused)"] for r in runs]}
    sgd, adamw = statistics.median(best["SGD"]), statistics.median(best["AdamW"])
    print(f"ResNet-50 ({n_params / 1e6:.1f}M params, {n_tensors} tensors), "
          f"{device}{f', {args.threads} threads' if device.type == 'cpu' else ''}, median of {args.repeats} steps"
          f"{', each optimizer alone' if args.alone else ', interleaved'}, {args.runs} runs; memory bandwidth "
          f"{gbps:.1f} GB/s (an in-place add of two {256} MB tensors)")
    print("| optimizer | ms/step (median of runs) | vs torch SGD | vs torch AdamW |\n|---|---|---|---|")
    for n in NAMES:
        print(f"| {n} | {med[n]:.1f} | {med[n] / sgd:.2f}x | {med[n] / adamw:.2f}x |")
    floor = {k: v * n_params * 4 / (gbps * 1e9) * 1e3 for k, v in TRAFFIC.items()}  # ms at the bandwidth
    print("\n| optimizer | least traffic | floor ms/step | measured / floor |\n|---|---|---|---|")
    for k, passes in TRAFFIC.items():
        print(f"| {k} | {passes} x {n_params * 4 / 1e6:.0f} MB | {floor[k]:.1f} | "
              f"{statistics.median(best[k]) / floor[k]:.2f}x |")
    def ratios(ours: str, torch_name: str) -> list[float]:
        return [r[ours] / b for r, b in zip(runs, best[torch_name], strict=True)]

    print(f"\ndefault kernels on {device.type} ({kernel}): LARS / SGD "
          f"{spread(ratios(f'ours LARS ({kernel})', 'SGD'))}, LAMB / AdamW {spread(ratios(f'ours LAMB ({kernel})', 'AdamW'))}")
    print(f"fused=True: LARS / SGD {spread(ratios('ours LARS (fused)', 'SGD'))}, LAMB / AdamW "
          f"{spread(ratios('ours LAMB (fused)', 'AdamW'))} (where both were at their floors: "
          f"{TRAFFIC['LARS'] / TRAFFIC['SGD']:.2f}x and {TRAFFIC['LAMB'] / TRAFFIC['AdamW']:.2f}x); against torch's "
          f"fused steps: LARS / SGD {med['ours LARS (fused)'] / med['torch SGD (fused)']:.2f}x, LAMB / AdamW "
          f"{med['ours LAMB (fused)'] / med['torch AdamW (fused)']:.2f}x")
    print(f"timm: Lars / SGD {spread(ratios('timm Lars', 'SGD'))}, Lamb / AdamW {spread(ratios('timm Lamb', 'AdamW'))}; "
          f"plain LARS / SGD {med['plain LARS (seed)'] / sgd:.2f}x")


if __name__ == "__main__":
    main()
