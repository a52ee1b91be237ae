"""Plot a metric over training for the jobs of one or more sweeps: one line per setting (its overrides other than
seed), the mean over seeds with a band from min to max, against epochs (images seen / training-set size), so runs
at different or changing batch sizes line up; panels below show the LR and the global batch each step used.

    python scripts/plot_curves.py multirun/bs/ramp multirun/bs/ramp2 --out recipes/plots/batch_ramp [--metric test_loss]

Reads each job's metrics.jsonl (the authoritative record) and .hydra/overrides.yaml; prints, per setting, the final
value (mean +- std over seeds) and the optimizer steps taken.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from engine.records import RecordError, read_metrics, read_overrides


def read_job(job: Path, metric: str | None):
    """(epoch, value) of each evaluation, (epoch, batch, lr) of each logged step, the steps, and the metric: by
    default the accuracy evaluated during training, val_acc, or test_acc where data.val_split=0 had it read the test
    split."""
    rows = read_metrics(job / "metrics.jsonl")
    metric = metric or ("val_acc" if any("val_acc" in r for r in rows) else "test_acc")
    evals = [(r["epoch"], r[metric]) for r in rows if metric in r and "epoch" in r]
    train = [(r["epoch"], r["batch"], r["lr"]) for r in rows if "batch" in r and "loss" in r]
    steps = max((r["step"] for r in rows), default=0)
    return evals, train, steps, metric


def main() -> None:
    try:
        plot_curves()
    except RecordError as e:  # a record that cannot be read: one line naming the file (and line)
        sys.exit(f"error: {e}")


def plot_curves() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dirs", type=Path, nargs="+")
    ap.add_argument("--metric", help="a value logged at each evaluation (default: val_acc, or test_acc in runs "
                    "with data.val_split=0)")
    ap.add_argument("--out", required=True, help="output path without extension: writes OUT.png")
    args = ap.parse_args()
    series = defaultdict(list)
    for sweep in args.sweep_dirs:
        jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
        if not jobs:
            sys.exit(f"error: {sweep} holds no Hydra jobs (no */.hydra/overrides.yaml)")
        for job in jobs:
            if not (job / "metrics.jsonl").exists():
                continue
            overrides = read_overrides(job)
            key = " ".join(o for o in overrides if not o.startswith(("seed=", "recipe=")))
            series[key].append(read_job(job, args.metric))
    if not series:  # nothing to draw is an error, not a blank figure
        sys.exit(f"error: no job of {', '.join(map(str, args.sweep_dirs))} has a metrics.jsonl (killed before "
                 f"its first step?)")
    if not any(run[0] for runs in series.values() for run in runs):
        sys.exit(f"error: no run logged --metric {args.metric} at an evaluation (a run logs val_acc, val_loss, "
                 f"val_top5 with data.val_split, else test_acc, test_loss, test_top5)")
    series = {k: [r for r in runs if r[0]] for k, runs in series.items() if any(r[0] for r in runs)}
    import matplotlib
    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    fig, (ax, ax_lr, ax_b) = plt.subplots(3, 1, figsize=(8, 8), sharex=True, height_ratios=(3, 1.3, 1.3))
    shared = set.intersection(*(set(k.split()) for k in series)) if len(series) > 1 else set()
    for key, runs in series.items():
        label = " ".join(o for o in key.split() if o not in shared) or key
        epochs = [e for e, _ in runs[0][0]]
        n = min(len(r[0]) for r in runs)
        values = [[r[0][i][1] for r in runs] for i in range(n)]
        mean = [statistics.mean(v) for v in values]
        line, = ax.plot(epochs[:n], mean, marker=".", label=textwrap.fill(f"{label} ({len(runs)} seeds)", 90))
        ax.fill_between(epochs[:n], [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2)
        train = runs[0][1]  # the logged train rows: log every step (logger.every_steps=1) to see every change
        if train:
            train = [(0.0, *train[0][1:])] + train
            ax_b.step([t[0] for t in train], [t[1] for t in train], where="post", color=line.get_color())
            ax_lr.step([t[0] for t in train], [t[2] for t in train], where="post", color=line.get_color())
        finals = [r[0][-1][1] for r in runs if r[0]]
        spread = f" +- {statistics.stdev(finals):.4f}" if len(finals) > 1 else ""
        print(f"{key}: final {runs[0][3]} {statistics.mean(finals):.4f}{spread} over {len(finals)} seeds, "
              f"{statistics.mean(r[2] for r in runs):.0f} steps")
    ax.set_ylabel(" / ".join(sorted({r[3] for runs in series.values() for r in runs})))
    ax.grid(alpha=0.3)
    ax.set_title(" ".join(sorted(shared)), fontsize=8)
    ax_b.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax_lr.set_ylabel("LR")
    ax_lr.grid(alpha=0.3)
    ax_b.set_yscale("log", base=2)
    ax_b.set_ylabel("global batch")
    ax_b.set_xlabel("epochs (images seen / training-set size)")
    ax_b.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # keeps the legend below the axes
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
