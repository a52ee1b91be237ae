"""Measure the gradient noise scale B_simple (McCandlish et al. 2018, arXiv 1812.06162, Appendix A) at a run's kept
checkpoints, from many micro-batches at fixed weights, next to the online figure the run logged at those weights.

    python train.py recipe=fmnist_accuracy_vs_batch batch=1k 'checkpoint.keep_steps=[16,32,64,128]' hydra.run.dir=RUN
    python scripts/noise_scale.py RUN [more run dirs] [--micro-batch 128] [--micro-batches 64] [--out FILE.csv]

Why: the training-time B_simple (engine/diagnostics.py) is cheap and noisy: a moving average of tr(Sigma) over
about 1 / ((1 - diagnostics.noise_trace_ema) x micro-batches per step) steps, over one step's own |G|^2 estimate
from its global batch (AdaScale's and the adaptive batch's: moving averages of both, from their probe). Here the
weights are fixed (checkpoints/step-N.pt and last.pt): K
micro-batches of b training images (a fixed random draw, no augmentation, the run's label smoothing, BN in train
mode as in training) give K gradients g_k and their mean G over K*b images; then, with the same unbiased estimators
as training,
    |G|^2     ~ (Kb |G|^2 - b mean_k |g_k|^2) / (Kb - b),    tr(Sigma) ~ (mean_k |g_k|^2 - |G|^2) / (1/b - 1/(Kb)),
and B_simple = tr(Sigma) / |G|^2. The two halves of the K micro-batches give two independent estimates; their
spread is printed as a gauge of the estimate's own noise. Prints one row per checkpoint (step, images, B_simple,
the halves, and the online figure from the same weights: step N's checkpoint holds the weights after N updates,
whose gradients step N + 1 measured and logged; none for the last step) and writes them as CSV with --out, with
|G|^2 and tr(Sigma) each beside the run's own (which of the two an online miss came from).
One step's floor (columns one_step_*): the K micro-batches as steps of --step-images images (default the run's
batch), each step's own |G|^2 over the whole measurement's tr(Sigma), as a factor of B_simple; how often such a
step lands within 1.5x bounds how closely any online figure from one step's images can follow.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tradeoff import metrics_rows  # scripts/tradeoff.py, beside this file

from engine.checkpoint import load as load_checkpoint
from engine.config import load_config
from engine.datasets import load_data
from engine.diagnostics import NoiseScale, sq_norm
from engine.errors import ConfigError
from engine.models import build_model
from engine.records import RecordError

FIELDS = ["run", "checkpoint", "step", "images", "b_simple", "b_simple_half1", "b_simple_half2", "b_simple_online",
          "grad_sq", "grad_sq_online", "trace", "trace_online",
          "one_step_images", "one_step_within_1_5x", "one_step_low", "one_step_high", "micro_batch", "micro_batches"]


def estimates(micro_sq_norms: list[float], mean_grad_sq: float, micro_batch: int) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from K micro-batch gradients' squared norms and the squared norm of their mean."""
    big = micro_batch * len(micro_sq_norms)
    return NoiseScale.estimates(micro_batch, sum(micro_sq_norms) / len(micro_sq_norms), big, mean_grad_sq)


def b_simple(micro_sq_norms: list[float], mean_grad_sq: float, micro_batch: int) -> float:
    """B_simple from K micro-batch gradients' squared norms and the squared norm of their mean."""
    grad_sq, trace = estimates(micro_sq_norms, mean_grad_sq, micro_batch)
    return trace / grad_sq if grad_sq > 0 else math.nan


def one_step_ratios(norms: list[float], group_sums: list[list[torch.Tensor]], trace: float, micro_batch: int,
                    b_simple_all: float) -> list[float]:
    """Each group of micro-batches (one training step's images) as the run sees them: B_simple from that group's own
    |G|^2 over the whole measurement's tr(Sigma), as a factor of ``b_simple_all`` (inf where the group's |G|^2 is not
    positive). However exactly an online estimate knows tr(Sigma), one step's |G|^2 scatters this much."""
    size = len(norms) // len(group_sums)
    ratios = []
    for i, total in enumerate(group_sums):
        grad_sq, _ = estimates(norms[i * size:(i + 1) * size], float(sq_norm(torch._foreach_div(total, size))),
                               micro_batch)
        ratios.append(trace / grad_sq / b_simple_all if grad_sq > 0 else math.inf)
    return ratios


def measure(model, data, cfg, micro_batch: int, micro_batches: int, seed: int = 0,
            step_micro_batches: int | None = None) -> dict:
    """B_simple at the model's current weights from ``micro_batches`` micro-batches of ``micro_batch`` images; with
    ``step_micro_batches`` (dividing ``micro_batches`` at least twice), how far one step's |G|^2 scatters around it
    (``one_step_ratios``): the fraction of those groups within 1.5x, and the lowest and highest factor."""
    params = [p for p in model.parameters() if p.requires_grad]
    need = micro_batch * micro_batches
    if need > data.train_size:
        raise SystemExit(f"error: --micro-batch {micro_batch} x --micro-batches {micro_batches} = {need} images, more "
                         f"than the {data.train_size} training images")
    index = torch.randperm(data.train_size, generator=torch.Generator().manual_seed(seed))[:need]
    half = micro_batches // 2
    # gradients summed in chunks that tile both the halves and the steps' groups: one copy of the model per chunk
    chunk = math.gcd(half, step_micro_batches) if step_micro_batches else half
    chunks = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(-(-micro_batches // chunk))]
    model.train()
    norms = []
    for k, (x, y) in enumerate(data.one_step_micro_batches(index, 0, micro_batch, 1, 0, seed, None, "cpu")):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing).backward()
        grads = [p.grad.double() for p in params]
        norms.append(float(sq_norm(grads)))
        torch._foreach_add_(chunks[k // chunk], grads)
    summed = lambda parts: [sum(ts) for ts in zip(*parts)]
    mean_sq = lambda total, n: float(sq_norm(torch._foreach_div(total, n)))
    per_half = half // chunk
    grad_sq, trace = estimates(norms, mean_sq(summed(chunks), micro_batches), micro_batch)
    row = {"b_simple": trace / grad_sq if grad_sq > 0 else math.nan, "grad_sq": grad_sq, "trace": trace,
           "b_simple_half1": b_simple(norms[:half], mean_sq(summed(chunks[:per_half]), half), micro_batch),
           "b_simple_half2": b_simple(norms[half:], mean_sq(summed(chunks[per_half:]), micro_batches - half),
                                      micro_batch)}
    if step_micro_batches:
        per_step = step_micro_batches // chunk
        groups = [summed(chunks[i:i + per_step]) for i in range(0, len(chunks), per_step)]
        ratios = one_step_ratios(norms, groups, trace, micro_batch, row["b_simple"])
        row |= {"one_step_images": micro_batch * step_micro_batches,
                "one_step_within_1_5x": sum(1 / 1.5 <= r <= 1.5 for r in ratios) / len(ratios),
                "one_step_low": min(ratios), "one_step_high": max(ratios)}
    return row


def online_at_weights_of(run_dir: Path, step: int) -> dict:
    """What the run logged from the gradients at checkpoint ``step``'s weights: step + 1's B_simple and the |G|^2 and
    tr(Sigma) it divided (None where that step never ran or logged none)."""
    for row in metrics_rows(run_dir):
        if row.get("step") == step + 1 and row.get("noise_scale/b_simple") is not None:
            return {f"{key}_online": None if row.get(f"noise_scale/{key}") is None else float(row[f"noise_scale/{key}"])
                    for key in ("b_simple", "grad_sq", "trace")}
    return {"b_simple_online": None, "grad_sq_online": None, "trace_online": None}


def checkpoints_of(run_dir: Path) -> list[Path]:
    kept = sorted((run_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    last = run_dir / "checkpoints" / "last.pt"
    return kept + ([last] if last.is_file() else [])


def open_new_csv(path: Path):
    """--out: a new file (an existing one is a finished measurement: never overwritten), its folder made if missing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("x", newline="")
    except FileExistsError:
        sys.exit(f"error: --out {path} exists: remove it or choose another file (a measurement is never overwritten)")
    except OSError as e:
        sys.exit(f"error: --out {path} cannot be written ({e.strerror})")


def step_groups(step_images: int, micro_batch: int, micro_batches: int) -> int | None:
    """Micro-batches per step when ``step_images`` is a multiple of ``micro_batch`` (at least two) that divides the K
    micro-batches at least twice; None otherwise."""
    size, rest = divmod(step_images, micro_batch)
    return size if not rest and size >= 2 and micro_batches % size == 0 and micro_batches // size >= 2 else None


def main(argv: list[str] | None = None) -> None:
    try:
        measure_runs(argv)
    except (ConfigError, RecordError) as e:  # a damaged checkpoint or record: one line (rows measured are kept)
        sys.exit(f"error: {e}")


def measure_runs(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--micro-batch", type=int, default=128, help="images per micro-batch b (default 128)")
    ap.add_argument("--micro-batches", type=int, default=64, help="micro-batches K, at least 4 (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the images drawn (default 0)")
    ap.add_argument("--step-images", type=int, default=None,
                    help="images of one training step, whose |G|^2 scatter is measured (default: the run's batch "
                         "where it fits; 0: not measured)")
    ap.add_argument("--out", type=Path, help="write the rows as CSV here")
    args = ap.parse_args(argv)
    if args.micro_batch < 1 or args.micro_batches < 4:
        sys.exit(f"error: --micro-batch {args.micro_batch} must be >= 1 and --micro-batches {args.micro_batches} >= 4")
    if args.step_images and not step_groups(args.step_images, args.micro_batch, args.micro_batches):
        sys.exit(f"error: --step-images {args.step_images} must be a multiple of --micro-batch {args.micro_batch} "
                 f"(at least two) that divides --micro-batches {args.micro_batches} at least twice")
    runs = {run_dir: checkpoints_of(run_dir) for run_dir in args.run_dirs}
    for run_dir, found in runs.items():
        if not found:
            sys.exit(f"error: {run_dir} has no checkpoints/step-*.pt or last.pt (train with checkpoint.keep_steps)")
    out = open_new_csv(args.out) if args.out else None
    writer = csv.DictWriter(out, fieldnames=FIELDS) if out else None
    if writer:
        writer.writeheader()
    for run_dir, found in runs.items():
        data = None
        for path in found:
            ckpt = load_checkpoint(path, setting=None)
            cfg = load_config(ckpt["config"])
            if data is None:
                data = load_data(cfg.data)
            model = build_model(cfg.model, data.image_shape, data.num_classes)
            model.load_state_dict(ckpt["model"])
            step_images = cfg.batch if args.step_images is None else args.step_images
            per_step = step_groups(step_images, args.micro_batch, args.micro_batches) if step_images else None
            row = {"run": str(run_dir), "checkpoint": path.name, "step": ckpt["step"], "images": ckpt.get("images"),
                   **measure(model, data, cfg, args.micro_batch, args.micro_batches, args.seed, per_step),
                   **online_at_weights_of(run_dir, ckpt["step"]),
                   "micro_batch": args.micro_batch, "micro_batches": args.micro_batches}
            if writer:  # row by row: what was measured survives a later failure
                writer.writerow(row)
                out.flush()
            online = row["b_simple_online"]
            one_step = (f"; one step of {row['one_step_images']} images: {row['one_step_low']:.2f}-"
                        f"{row['one_step_high']:.2f}x, within 1.5x in {row['one_step_within_1_5x']:.0%}"
                        if per_step else "")
            print(f"{run_dir.name} {path.name:>12} step {row['step']:>5}: B_simple {row['b_simple']:8.1f} (halves "
                  f"{row['b_simple_half1']:.1f}, {row['b_simple_half2']:.1f}); online at these weights "
                  f"{'-' if online is None else f'{online:.1f}'}{one_step}", flush=True)
    if out:
        out.close()
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
