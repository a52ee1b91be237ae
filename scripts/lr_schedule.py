"""Preview the learning rate of every optimizer step of a run, without training.

    python scripts/lr_schedule.py optim=lars batch=32k --out lars32k
    python scripts/lr_schedule.py batch=8k --vs batch=8k warmup=constant --vs batch=8k warmup=none --out goyal

Writes FILE.csv (`step,lr,batch`, step 0 = the LR of the first optimizer step; with --vs, `lr_<i>,batch_<i>`
columns per override set) and FILE.png (LR against epochs, and the batch on a second axis where it changes). The numbers come from engine.plan.make_plan, the same code train.py uses.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import fail, preflight, sweep_overrides
from engine.compose import load_cfg
from engine.datasets import train_size_of
from engine.distributed import env_world_size
from engine.errors import ConfigError
from engine.plan import make_plan

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the conf/ beside this script's train.py


def plan_for(overrides: list[str]):
    cfg = load_cfg(overrides, CONF_DIR)
    return cfg, make_plan(cfg, train_size_of(cfg.data), env_world_size())


def label(cfg, plan) -> str:
    return (f"{plan.optimizer_name}, batch {plan.global_batch}, {plan.rule} rule, peak {plan.peak_lr:.4g}, "
            f"{plan.lr_schedule.warmup if plan.lr_schedule.uses_warmup else 'no'} warmup, {plan.lr_schedule.decay}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.csv and OUT.png")
    args, rest = parser.parse_known_args(argv)
    if not args.out.strip() or Path(args.out).name in ("", ".", ".."):
        fail(f"--out {args.out!r} names no file: give a path without extension (OUT.csv and OUT.png are written)")
    sets, current = [], []
    for a in rest:
        if a == "--vs":
            sets.append(current)
            current = []
        else:
            current.append(a)
    sets.append(current)
    runs = []
    for overrides in sets:
        if sweeps := sweep_overrides(overrides):
            fail(f"{sweeps[0]} lists several values: compare settings with --vs (e.g. optim=sgd --vs optim=lars)")
        preflight(overrides, check_files=False, conf_dir=CONF_DIR)
        try:
            cfg, plan = plan_for(overrides)
        except ConfigError as e:
            fail(str(e))
        try:
            rows = plan.preview()
        except ConfigError as e:
            fail(str(e))
        runs.append((cfg, plan, rows))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    longest = max(len(rows) for _, _, rows in runs)
    with open(out.with_suffix(".csv"), "w") as f:
        cols = ["lr", "batch"] if len(runs) == 1 else [f"{c}_{i}" for i in range(len(runs)) for c in ("lr", "batch")]
        f.write("step," + ",".join(cols) + "\n")
        for t in range(longest):
            f.write(f"{t}," + ",".join(f"{rows[t][0]:.10g},{rows[t][1]}" if t < len(rows) else ","
                                       for _, plan, rows in runs) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # x = epochs of images seen when the step starts, so runs of different batches line up
    fig, ax = plt.subplots(figsize=(8, 4.5))
    varies = any(len({b for _, b in rows}) > 1 for _, _, rows in runs)
    ax_batch = ax.twinx() if varies else None
    for i, (cfg, plan, rows) in enumerate(runs):
        epochs, images = [], 0
        for _, batch in rows:
            epochs.append(images / plan.train_size)
            images += batch
        lrs = [lr for lr, _ in rows]
        line, = ax.plot(epochs, lrs, label=label(cfg, plan) + (f" [{' '.join(sets[i])}]" if sets[i] else ""))
        if ax_batch is not None:
            ax_batch.step(epochs, [b for _, b in rows], where="post", color=line.get_color(), linestyle="--",
                          linewidth=1)
        ramp = plan.lr_schedule.ramp_steps
        if plan.schedule_class.fixed_batch and 0 < ramp < len(lrs):
            ax.axvline(epochs[ramp], color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(f"warmup ends (step {ramp})", (epochs[ramp], lrs[ramp]), textcoords="offset points",
                        xytext=(4, 4 + 10 * i), fontsize=8, color=line.get_color())
    cfg0, plan0, _ = runs[0]
    ax.set_title(label(cfg0, plan0) if len(runs) == 1 else "learning-rate schedules")
    ax.set_xlabel(f"epochs (images seen / {plan0.train_size:,})")
    ax.set_ylabel("learning rate (solid)")
    if ax_batch is not None:
        ax_batch.set_ylabel("global batch (dashed)")
    if len(runs) > 1:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")  # keeps the legend below the axes
    print(f"wrote {out.with_suffix('.csv')} ({longest} steps) and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
