"""Steps and images to a target accuracy against batch, with McCandlish et al.'s trade-off fitted (arXiv 1812.06162,
eq. 2.11-2.12): S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit), i.e. (S/S_min - 1)(E/E_min - 1) = 1, with
B_crit = E_min / S_min. Used by `scripts/summarize.py --targets 0.85,0.88` (constant-batch sweeps).

A run's steps to a target: the first evaluation at or above it in its metrics.jsonl, interpolated linearly in steps
from the evaluation before it (evaluate often: `eval.every_epochs=0.25` samples every batch at the same images);
images = steps x batch. The fit is least squares on the relative error of S over the batches every seed reached
(S = S_min + E_min / B is linear in its two unknowns, so it has a closed form; no optimizer, no scipy).
"""
from __future__ import annotations

import csv
import functools
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from engine.records import read_metrics
from optim import BATCH_SCHEDULES, ConstantBatch


@functools.lru_cache(maxsize=None)
def metrics_rows(job_dir: Path) -> tuple[dict, ...]:
    """The run's metrics.jsonl rows, read once per run however many targets and checkpoints ask."""
    return tuple(read_metrics(job_dir / "metrics.jsonl"))


def eval_rows(job_dir: Path) -> list[tuple[int, float]]:
    """(step, accuracy) of every evaluation during training, in step order: val_acc, or test_acc where
    data.val_split=0 had the evaluations read the test split."""
    rows = metrics_rows(job_dir)
    key = "val_acc" if any("val_acc" in r for r in rows) else "test_acc"
    return sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))


def steps_to(evals: list[tuple[int, float]], target: float) -> float | None:
    """Optimizer steps to first reach ``target`` (interpolated from the evaluation before); None if never."""
    prev = None
    for step, acc in evals:
        if acc >= target:
            if prev is None or acc == prev[1]:
                return float(step)
            return prev[0] + (target - prev[1]) / (acc - prev[1]) * (step - prev[0])
        prev = (step, acc)
    return None


def fit(batches: list[float], steps: list[float]) -> dict | None:
    """S_min, E_min, B_crit of S(B) = S_min + E_min / B, least squares in relative error; None when the points show
    no trade-off (a non-positive S_min or E_min) or there are fewer than 3 of them."""
    if len(batches) < 3:
        return None
    b, s = np.asarray(batches, float), np.asarray(steps, float)
    design = np.stack([1 / s, 1 / (b * s)], axis=1)  # (S_min + E_min / B) / S = 1, row by row
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if s_min <= 0 or e_min <= 0:
        return None
    worst = float(np.max(np.abs(s_min + e_min / b - s) / s))  # how well the hyperbola holds at the measured points
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(e_min / s_min), "worst": worst}


def crossings(jobs: list[dict], targets: list[float], series_of) -> dict:
    """{(series, target): {batch: [(steps or None, job dir) per seed]}} for the constant-batch jobs."""
    out = defaultdict(lambda: defaultdict(list))
    for j in jobs:
        constant = BATCH_SCHEDULES.get(j.get("batch_schedule"), ConstantBatch) is ConstantBatch  # older: no field
        if j.get("error") or not constant or not j.get("global_batch"):
            continue
        evals = eval_rows(Path(j["path"]))
        for t in targets:
            out[(series_of(j), t)][j["global_batch"]].append((steps_to(evals, t), Path(j["path"])))
    return out


def last_logged_b_simple(job_dir: Path, step: float) -> float | None:
    """The run's online B_simple at the last train row at or before ``step``: None where never logged, nan
    where logged as undefined ("nan", text in JSON: the |G|^2 estimate was <= 0)."""
    value = None
    for row in metrics_rows(job_dir):
        if row.get("noise_scale/b_simple") is not None and row["step"] <= step:
            value = float(row["noise_scale/b_simple"])
    return value


def logged_b_simple(job_dir: Path, step: float) -> float | None:
    """As last_logged_b_simple, None unless a finite number."""
    value = last_logged_b_simple(job_dir, step)
    return value if value is not None and math.isfinite(value) else None


def measured_b_simple(rows: list[dict], job: Path, step: float) -> float | None:
    """scripts/noise_scale.py's B_simple for run ``job`` at ``step``, interpolated log-linearly between its
    checkpoints (None if that run was not measured, or ``step`` lies outside its checkpoints)."""
    points = sorted((int(r["step"]), float(r["b_simple"])) for r in rows
                    if Path(r["run"]).resolve() == job.resolve() and float(r["b_simple"]) > 0)  # nan > 0 is False
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            w = (step - s0) / (s1 - s0) if s1 > s0 else 0.0
            return math.exp((1 - w) * math.log(b0) + w * math.log(b1))
    return None


NOISE_COLUMNS = ("run", "step", "b_simple")


def read_noise_csv(path: Path | None) -> list[dict]:
    """scripts/noise_scale.py's rows; a file that is not such a CSV raises ValueError saying what is wrong."""
    if path is None:
        return []
    if not path.is_file():
        raise ValueError(f"{path}: no such file (write it with scripts/noise_scale.py --out)")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a CSV file ({type(e).__name__})") from None
    missing = [c for c in NOISE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} column: not scripts/noise_scale.py's CSV")
    for line, row in enumerate(rows, start=2):
        try:
            int(row["step"]), float(row["b_simple"])
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line}: step={row['step']!r} and b_simple={row['b_simple']!r} must be "
                             f"numbers") from None
    return rows


def table(found: dict, noise_rows: list[dict]) -> tuple[str, dict, dict]:
    """The markdown table (per series and target: every batch's steps/images, the fit, B_simple), the fits, and per
    target the median B_simple where the runs reached it, over every line (to mark on the plot)."""
    lines = ["| setting | target | batch: steps to target, mean over seeds (seeds reached) | S_min | E_min (images) | "
             "B_crit = E_min/S_min | fit's worst point | B_simple online at target (median) | "
             "B_simple from checkpoints at target (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    fits, pooled = {}, defaultdict(lambda: ([], []))
    for (series, target), by_batch in sorted(found.items()):
        cells, fit_b, fit_s, online, offline = [], [], [], [], []
        for batch in sorted(by_batch):
            seeds = by_batch[batch]
            reached = [s for s, _ in seeds if s is not None]
            mean = statistics.mean(reached) if reached else None
            steps = "-" if mean is None else f"{mean:.0f}"
            cells.append(f"{batch_label(batch)}: {steps} ({len(reached)}/{len(seeds)})")
            if reached and len(reached) == len(seeds):
                fit_b.append(batch)
                fit_s.append(mean)
            for s, job in seeds:
                if s is None:
                    continue
                if (v := logged_b_simple(job, s)) is not None:
                    online.append(v)
                if (v := measured_b_simple(noise_rows, job, s)) is not None:
                    offline.append(v)
        f = fit(fit_b, fit_s)
        fits[(series, target)] = f
        pooled[target][0].extend(offline)
        pooled[target][1].extend(online)
        lines.append(f"| {series} | {target:g} | {'; '.join(cells)} | "
                     + (f"{f['s_min']:.1f} | {f['e_min']:,.0f} | {f['b_crit']:,.0f} | {f['worst']:.0%} off" if f
                        else "no fit | - | - | -")
                     + f" | {_median(online)} | {_median(offline)} |")
    marks = {t: {label: statistics.median(v) for label, v in
                 (("B_simple at target, checkpoints (median)", offline), ("B_simple at target, online (median)",
                                                                          online)) if v}
             for t, (offline, online) in pooled.items()}
    return "\n".join(lines), fits, marks


def batch_label(batch: int) -> str:
    return f"{batch // 1024}k" if batch >= 1024 and batch % 1024 == 0 else str(batch)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} (n={len(values)})" if values else "-"


def plot(found: dict, fits: dict, out: Path, marks: dict[float, dict[str, float]]) -> None:
    """Steps and images to each target against batch, log-log, the fitted curves dashed, each line's B_crit dotted,
    and the B_simple measured where the runs reached the target in black."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = sorted({t for _, t in found})
    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 3.8 * len(targets)), squeeze=False)
    colors = {}
    for (series, target), by_batch in sorted(found.items()):
        row = axes[targets.index(target)]
        color = colors.setdefault(series, f"C{len(colors)}")
        batches = [b for b in sorted(by_batch) if all(s is not None for s, _ in by_batch[b])]
        for ax, scale in ((row[0], 1), (row[1], None)):
            ys = [[s * (b if scale is None else 1) for s, _ in by_batch[b]] for b in batches]
            if batches:
                ax.errorbar(batches, [statistics.mean(y) for y in ys],
                            yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys], marker="o", capsize=3,
                            color=color, label=series, linestyle="none")
            if (f := fits.get((series, target))):
                grid = np.geomspace(min(batches) / 2, max(batches) * 2, 100)
                curve = f["s_min"] + f["e_min"] / grid
                ax.plot(grid, curve if scale else curve * grid, "--", color=color, alpha=0.7,
                        label=f"fit: B_crit {f['b_crit']:,.0f}")
                ax.axvline(f["b_crit"], color=color, linestyle=":", alpha=0.6)
    ticks = sorted({b for by_batch in found.values() for b in by_batch})
    for target, row in zip(targets, axes):
        for ax, what in zip(row, ("optimizer steps", "images")):
            for i, (label, value) in enumerate(marks.get(target, {}).items()):
                ax.axvline(value, color="k", linestyle=["-.", (0, (1, 3))][i % 2], alpha=0.6,
                           label=f"{label}: {value:,.0f}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [batch_label(b) for b in ticks])
            ax.set_xlabel("global batch")
            ax.set_ylabel(f"{what} to reach test accuracy {target:g}")
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=6)
    fig.suptitle("steps and images to a target against batch, McCandlish et al.'s S = S_min(1 + B_crit/B) fitted",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
