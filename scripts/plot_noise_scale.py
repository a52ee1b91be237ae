"""Plot the gradient noise scale B_simple (McCandlish et al. 2018) over training, from runs' metrics.jsonl.

    python train.py batch=2k micro_batch=128 hydra.run.dir=outputs/noise     # accumulation >= 2 measures it
    python scripts/plot_noise_scale.py outputs/noise [more run dirs] --out noise_scale

B_simple = tr(Sigma) / |G|^2 is estimated at every optimizer step from the first micro-batch's gradient and the
global-batch gradient (engine/diagnostics.py) and smoothed by an EMA; train.py logs it every `logger.every_steps`.
Writes OUT.png (B_simple against epoch on a log axis, the run's global batch as a dashed line) and prints, per run,
the last estimate and the median over the second half of training.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read_run(run_dir: Path) -> tuple[list[int], list[float], dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        sys.exit(f"error: {run_dir} has no metrics.jsonl (give a train.py run dir)")
    steps, values = [], []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        v = row.get("noise_scale/b_simple")
        if isinstance(v, (int, float)) and math.isfinite(v):
            steps.append(row.get("epoch", row["step"]))
            values.append(float(v))
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if not values:
        sys.exit(f"error: {run_dir} logged no noise scale: it needs accum_steps >= 2 (batch > micro_batch), "
                 f"diagnostics.noise_scale=true and precision other than fp16")
    return steps, values, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, help="output path without extension: writes OUT.png")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run_dir in args.run_dirs:
        steps, values, summary = read_run(run_dir)
        late = statistics.median(values[len(values) // 2:])
        batch = summary.get("global_batch")
        label = f"{run_dir.name} (batch {batch}, micro {summary.get('micro_batch')})"
        line, = ax.plot(steps, values, label=label)
        if batch:
            ax.axhline(batch, color=line.get_color(), linestyle="--", linewidth=1)
        print(f"{run_dir}: B_simple last {values[-1]:.0f}, median over the second half {late:.0f}, "
              f"global batch {batch}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (runs at different batches share this axis)")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2")
    ax.set_title("gradient noise scale (dashed: the global batch used)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
