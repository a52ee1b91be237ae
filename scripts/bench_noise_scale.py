"""How closely the online noise scale follows a measurement at fixed weights, and what it costs per step.

    python scripts/bench_noise_scale.py --out-dir outputs/noise_tracking [--pairs 5] [--threads 2]

1. Tracking: Fashion-MNIST at batch 1k (micro_batch 128, 150 steps of a 10-epoch schedule, no augmentation), with
   a checkpoint kept every 5 steps:
       python train.py batch=1k micro_batch=128 max_steps=150 epochs=10 data.augment=false \\
           'checkpoint.keep_steps=[5,10,...,145]' hydra.run.dir=DIR
   then B_simple measured again at each kept checkpoint (scripts/noise_scale.py: 64 micro-batches of 128 images at
   fixed weights), beside the online figure the run logged from the same weights (step N + 1's row) and their
   ratio. Goal: within 1.5x at every checkpoint. The floor of any estimate from one step: the 64 micro-batches
   as 8 steps of 1,024 images, each step's own |G|^2 over the whole measurement's tr(Sigma); how often such a
   step lands within 1.5x, and so how many checkpoints even an exact tr(Sigma) would keep within 1.5x.
2. Cost: paired, interleaved runs of --steps steps in this one process, diagnostics.noise_scale on and off
   (diagnostics.every=0 in both); the median steady-state images/s of each and their ratio. Goal: at most 5 %
   slower. Whole runs on a shared machine vary by more than that, so also the part itself: the diagnostic's work
   per micro-batch (MicroBatchNorms.add) against the micro-batch's forward and backward, medians of 240 each.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import noise_scale  # scripts/noise_scale.py, beside this file
import torch

import train
from engine.compose import compose_cfg
from engine.config import load_config
from engine.diagnostics import NoiseScale

KEPT = list(range(5, 150, 5))
TRACKING = ["batch=1k", "micro_batch=128", "max_steps=150", "epochs=10", "data.augment=false", "logger=csv",
            "logger.every_steps=1", f"checkpoint.keep_steps=[{','.join(map(str, KEPT))}]"]
COST = ["batch=1k", "micro_batch=128", "epochs=10", "data.augment=false", "logger=none", "diagnostics.every=0",
        "checkpoint.enabled=false", "eval.every_steps=null"]


def quiet_train(overrides: list[str], run_dir: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.train(compose_cfg(overrides), run_dir)


def tracking(out_dir: Path) -> list[dict]:
    """The run, then each kept checkpoint measured again; beside the figure the run logged, the same steps'
    estimates through moving averages of both |G|^2 and tr(Sigma) (AdaScale's and the adaptive batch's way)."""
    run_dir = out_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=False)
    steps = []  # (|G|^2, tr(Sigma), samples) of every step, as the run estimated them
    update = NoiseScale.update

    def recording(self, b_small, small_sq, b_big, big_sq, samples=1):
        steps.append((*NoiseScale.estimates(b_small, small_sq, b_big, big_sq), samples))
        update(self, b_small, small_sq, b_big, big_sq, samples)
    NoiseScale.update = recording
    try:
        quiet_train(TRACKING, run_dir)
    finally:
        NoiseScale.update = update
    both = both_averaged(steps, load_config(compose_cfg(TRACKING)).diagnostics.noise_ema)
    table = out_dir / "noise.csv"
    noise_scale.main([str(run_dir), "--micro-batch", "128", "--micro-batches", "64", "--out", str(table)])
    rows = [r for r in csv.DictReader(table.open()) if r["b_simple_online"]]  # last.pt: no later step logged
    print("\n| step | B_simple at the checkpoint | online, same weights | ratio | both averaged | ratio "
          "| one step, exact tr(Sigma): range, within 1.5x |\n|---|---|---|---|---|---|---|")
    for r in rows:
        fixed, step = float(r["b_simple"]), int(r["step"])
        r["ratio"] = float(r["b_simple_online"]) / fixed  # nan where the step's |G|^2 was <= 0
        r["ratio_both_averaged"] = both[step] / fixed   # both[step]: step + 1's figure, from these weights
        print(f"| {step} | {fixed:.0f} | {float(r['b_simple_online']):.0f} | {r['ratio']:.2f} | {both[step]:.0f} | "
              f"{r['ratio_both_averaged']:.2f} | {float(r['one_step_low']):.2f}-{float(r['one_step_high']):.2f}, "
              f"{float(r['one_step_within_1_5x']):.0%} |")
    misses = [r for r in rows if not 1 / 1.5 <= r["ratio"] <= 1.5]
    span = lambda ratios: f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
    for name, part in (("tr(Sigma)", "trace"), ("|G|^2", "grad_sq")):
        online_over_fixed = [float(r[f"{part}_online"]) / float(r[part]) for r in rows]
        at_misses = [v for v, r in zip(online_over_fixed, rows, strict=True) if r in misses]
        print(f"{name} online / at the checkpoint: {span(online_over_fixed)} at every checkpoint, "
              f"{span(at_misses)} at the {len(misses)} outside 1.5x")
    within = [float(r["one_step_within_1_5x"]) for r in rows]
    print(f"one step's own |G|^2 over the exact tr(Sigma) (8 groups of 1,024 images per checkpoint): within 1.5x at "
          f"{sum(within):.1f} of {len(rows)} checkpoints on average; at every one with probability "
          f"{math.prod(within):.3f}")
    for name, key in (("online (logged)", "ratio"), ("both averaged", "ratio_both_averaged")):
        factors = [max(r[key], 1 / r[key]) if r[key] > 0 else math.inf for r in rows]
        print(f"{name}: within 1.5x at {sum(f <= 1.5 for f in factors)} of {len(rows)} checkpoints, within 2x at "
              f"{sum(f <= 2 for f in factors)}; median factor {statistics.median(factors):.2f}, worst "
              f"{max(factors):.2f} (goal: every one within 1.5x)")
    return rows


def both_averaged(steps: list[tuple[float, float, int]], beta: float) -> list[float]:
    """B_simple after each step from bias-corrected moving averages of both estimates (NoiseScale without
    per_step_grad), weighting a step by its samples as the run does."""
    ns, out = NoiseScale(beta), []
    for grad_sq, trace, samples in steps:
        ns.add(grad_sq, trace, samples)
        out.append(ns.b_simple)
    return out


def cost(pairs: int, steps: int) -> float:
    speeds = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for on in ((True, False) if i % 2 == 0 else (False, True)):  # interleaved, order alternating
                run_dir = Path(tmp) / f"{i}_{on}"
                run_dir.mkdir()
                summary = quiet_train([*COST, f"max_steps={steps}", f"diagnostics.noise_scale={str(on).lower()}"],
                                      run_dir)
                speeds[on].append(summary["images_per_s"])
    on, off = statistics.median(speeds[True]), statistics.median(speeds[False])
    print(f"\nimages/s, median of {pairs} paired runs of {steps} steps: noise scale on {on:.0f} "
          f"(min {min(speeds[True]):.0f}, max {max(speeds[True]):.0f}), off {off:.0f} (min {min(speeds[False]):.0f}, "
          f"max {max(speeds[False]):.0f}); on / off = {on / off:.3f} (goal >= 0.95)")
    return on / off


def per_micro_batch_cost(repeats: int = 30) -> float:
    """The diagnostic's work per micro-batch against that micro-batch's forward and backward (the default model,
    128 Fashion-MNIST-sized images, 8 micro-batches a step)."""
    import torch.nn.functional as F

    from engine.diagnostics import MicroBatchNorms
    from engine.models import build_model
    model = build_model(load_config(compose_cfg([])).model, (1, 28, 28), 10)
    params = list(model.parameters())
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    work, extra = [], []
    for _ in range(repeats):
        norms = MicroBatchNorms("cpu")
        for _ in range(8):
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            norms.add([p.grad for p in params])
            extra.append(time.perf_counter() - t1)
            work.append(t1 - t0)
        model.zero_grad(set_to_none=True)
    ratio = statistics.median(extra) / statistics.median(work)
    print(f"per micro-batch: forward + backward {statistics.median(work) * 1e3:.2f} ms, the noise scale's norms "
          f"{statistics.median(extra) * 1e3:.3f} ms (medians of {len(work)}): {ratio:.1%} more (goal <= 5 %)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True, help="a new folder: the run, its checkpoints, noise.csv")
    ap.add_argument("--pairs", type=int, default=5, help="paired runs for the cost (default 5)")
    ap.add_argument("--steps", type=int, default=30, help="steps per cost run (default 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-tracking", action="store_true", help="measure the cost only")
    args = ap.parse_args()
    if args.out_dir.exists():
        sys.exit(f"error: --out-dir {args.out_dir} exists: choose a new folder (a measurement is never overwritten)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_tracking:
        tracking(args.out_dir)
    per_micro_batch_cost()
    cost(args.pairs, args.steps)


if __name__ == "__main__":
    main()
