"""Plot the gradient noise scale B_simple (McCandlish et al. 2018) over training, with the batch each step used,
the LR and (scaling=adascale) the gain, from runs' metrics.jsonl.

    python train.py batch=2k micro_batch=128 hydra.run.dir=outputs/noise     # accumulation >= 2 measures it
    python scripts/plot_noise_scale.py outputs/noise [more run dirs] --out noise_scale
    python train.py batch=8k batch_schedule=adaptive hydra.run.dir=outputs/adaptive   # the batch it chose
    python scripts/plot_noise_scale.py outputs/adaptive --out adaptive

B_simple = tr(Sigma) / |G|^2 is estimated at every optimizer step from the first micro-batch's gradient and the
global-batch gradient (engine/diagnostics.py) and smoothed by an EMA; train.py logs it every `logger.every_steps`.
Writes OUT.png (top: B_simple against epoch on a log axis, the batch each step used as a dashed line; bottom: the
LR, and AdaScale's gain dotted on a second axis) and prints, per run, the last estimate and the median over the
second half of training. Batch schedules that are fixed in advance can be previewed without training
(scripts/lr_schedule.py); adaptive and AdaScale runs are plotted from what they did.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import textwrap
from pathlib import Path

from engine.records import RecordError, read_metrics, read_summary


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """Per train row: epoch, b_simple (nan where not measured), batch, lr, gain; and the run's summary."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        sys.exit(f"error: {run_dir} has no metrics.jsonl (give a train.py run dir)")
    cols = {k: [] for k in ("epoch", "b_simple", "batch", "lr", "gain")}
    for row in read_metrics(metrics):
        if "loss" not in row or "lr" not in row:
            continue  # evaluation rows
        v = row.get("noise_scale/b_simple")
        cols["epoch"].append(row.get("epoch", row["step"]))
        cols["b_simple"].append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
        cols["batch"].append(row.get("batch"))
        cols["lr"].append(row["lr"])
        cols["gain"].append(row.get("adascale_gain"))
    summary = read_summary(run_dir)  # {} where torn or missing: the label says batch None
    if all(math.isnan(v) for v in cols["b_simple"]):
        sys.exit(f"error: {run_dir} logged no noise scale: it needs accum_steps >= 2 (batch > micro_batch), "
                 f"diagnostics.noise_scale=true and precision other than fp16")
    return cols, summary


def main() -> None:
    try:
        plot_noise_scale()
    except RecordError as e:  # a record that cannot be read: one line naming the file (and line)
        sys.exit(f"error: {e}")


def plot_noise_scale() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, help="output path without extension: writes OUT.png")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True, height_ratios=(3, 2))
    ax_gain = None
    for run_dir in args.run_dirs:
        cols, summary = read_run(run_dir)
        values = [v for v in cols["b_simple"] if math.isfinite(v)]
        late = statistics.median(values[len(values) // 2:])
        label = textwrap.fill(f"{run_dir.name} (batch {summary.get('global_batch')}, micro {summary.get('micro_batch')})",
                              90)
        line, = ax.plot(cols["epoch"], cols["b_simple"], label=label)
        ax.step(cols["epoch"], cols["batch"], where="post", color=line.get_color(), linestyle="--", linewidth=1)
        ax_lr.plot(cols["epoch"], cols["lr"], color=line.get_color())
        if any(g is not None for g in cols["gain"]):
            ax_gain = ax_gain or ax_lr.twinx()
            ax_gain.plot(cols["epoch"], cols["gain"], color=line.get_color(), linestyle=":")
            ax_gain.set_ylabel("AdaScale gain (dotted)")
        batches = sorted({b for b in cols["batch"] if b})
        print(f"{run_dir}: B_simple last {values[-1]:.0f}, median over the second half {late:.0f}, batch "
              f"{batches[0] if len(batches) == 1 else f'{batches[0]}..{batches[-1]}'}")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch (runs at different batches share this axis)")
    ax_lr.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2")
    ax.set_title("gradient noise scale (dashed: the global batch of each step)")
    ax.grid(alpha=0.3, which="both")
    ax_lr.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    out = Path(args.out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # keeps the legend below the axes
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
