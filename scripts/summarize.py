"""Summarize a Hydra multirun sweep: a markdown table of every job and a plot of test accuracy against batch size.

    python scripts/summarize.py multirun/2026-11-25/12-00-00 [--seeds-mean]

Prints the table (also written to MULTIRUN_DIR/summary.md) and writes MULTIRUN_DIR/accuracy_vs_batch.png: one line
per combination of the other overrides (e.g. per optimizer), log-2 batch axis; jobs that diverged or failed are
marked with an x at the bottom of the plot. With --seeds-mean, jobs differing only in `seed` are averaged
(mean +- std in the table, error bars in the plot).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml


from engine.config import parse_batch  # noqa: E402


def load_jobs(sweep: Path) -> list[dict]:
    jobs = []
    for overrides_file in sorted(sweep.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_num(p.parent.parent)):
        job_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"error": "no summary.json"}
        jobs.append({"dir": job_dir.name, "overrides": overrides, **summary})
    return jobs


def _job_num(job_dir: Path) -> int:
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def batch_of(job: dict) -> int | None:
    if isinstance(job.get("global_batch"), int):
        return job["global_batch"]
    for o in job["overrides"]:
        if o.startswith("batch="):
            return parse_batch(o.split("=", 1)[1])
    return 256 if not job.get("error") else None


def series_key(job: dict, drop=("batch", "seed"), common=frozenset()) -> str:
    """The job's overrides that name its line: all but batch, seed and those every job of the sweep shares."""
    rest = [o for o in job["overrides"] if o.split("=", 1)[0].lstrip("+~") not in drop and o not in common]
    return " ".join(rest) or "default"


def shared_overrides(jobs: list[dict]) -> frozenset:
    sets = [set(j["overrides"]) for j in jobs]
    return frozenset(set.intersection(*sets)) if len(sets) > 1 else frozenset()


def batch_label(b: int) -> str:
    return f"{b // 1024}k" if b >= 1024 and b % 1024 == 0 else str(b)


def fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def ended(job: dict) -> str:
    """How the job ended: finished, diverged, stopped by a signal (resumable), or failed with an error."""
    if job.get("error"):
        return "failed: " + job["error"]
    if job.get("diverged"):
        return "diverged"
    if job.get("stopped_by"):
        return f"stopped by {job['stopped_by']}"
    return "finished"


def table(jobs: list[dict], seeds_mean: bool) -> str:
    common = shared_overrides(jobs)
    lines = [f"Shared by every job: {' '.join(sorted(common))}\n" if common else "",
             "| job | overrides | val_acc | val_loss | peak LR | steps | images/s | B_simple | wall_s | ended |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if not seeds_mean:
        for j in jobs:
            rest = " ".join(o for o in j["overrides"] if o not in common) or "(defaults)"
            lines.append(f"| {j['dir'].split('_', 1)[0]} | {rest} | {fmt(j.get('val_acc'))} | "
                         f"{fmt(j.get('val_loss'))} | {fmt(j.get('peak_lr'))} | {fmt(j.get('steps'))} | "
                         f"{fmt(j.get('images_per_s'), 3)} | {fmt(j.get('noise_scale_b_simple'), 3)} | "
                         f"{fmt(j.get('wall_s'), 3)} | {ended(j)} |")
        return "\n".join(ln for ln in lines if ln)
    groups = defaultdict(list)
    for j in jobs:
        groups[series_key(j, drop=("seed",))].append(j)
    for key, js in groups.items():
        accs = [j["val_acc"] for j in js if isinstance(j.get("val_acc"), float) and not j.get("diverged")]
        acc = (f"{statistics.mean(accs):.4f} +- {statistics.stdev(accs):.4f} (n={len(accs)})" if len(accs) > 1
               else fmt(accs[0]) if accs else "-")
        lines.append(f"| {len(js)} seeds | {key} | {acc} | - | {fmt(js[0].get('peak_lr'))} | "
                     f"{fmt(js[0].get('steps'))} | - | - | - | {sum(bool(j.get('diverged')) for j in js)} of "
                     f"{len(js)} diverged |")
    return "\n".join(ln for ln in lines if ln)


def plot(jobs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(lambda: defaultdict(list))
    failed = []
    common = shared_overrides(jobs)
    for j in jobs:
        b = batch_of(j)
        if b is None:
            continue
        if j.get("error") or j.get("diverged") or not isinstance(j.get("val_acc"), float):
            failed.append((b, series_key(j, common=common)))
            continue
        series[series_key(j, common=common)][b].append(j["val_acc"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, points in sorted(series.items()):
        bs = sorted(points)
        means = [statistics.mean(points[b]) for b in bs]
        errs = [statistics.stdev(points[b]) if len(points[b]) > 1 else 0.0 for b in bs]
        ax.errorbar(bs, means, yerr=errs, marker="o", capsize=3, label=key)
    if failed:
        ax.scatter([b for b, _ in failed], [0.0] * len(failed), marker="x", color="red", label="diverged / failed")
    ax.set_xscale("log", base=2)
    batches = sorted({b for points in series.values() for b in points} | {b for b, _ in failed})
    ax.set_xticks(batches, [batch_label(b) for b in batches])
    ax.set_xlabel("global batch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy vs batch size ({out.parent.name})" + (f"\n{' '.join(sorted(common))}" if common else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--seeds-mean", action="store_true", help="average jobs that differ only in seed")
    args = ap.parse_args()
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a folder (give the multirun dir holding the numbered job dirs)")
    jobs = load_jobs(args.sweep_dir)
    if not jobs:
        sys.exit(f"error: {args.sweep_dir} holds no Hydra jobs (no */.hydra/overrides.yaml)")
    md = table(jobs, args.seeds_mean)
    print(md)
    (args.sweep_dir / "summary.md").write_text(md + "\n")
    plot(jobs, args.sweep_dir / "accuracy_vs_batch.png")
    print(f"\nwrote {args.sweep_dir / 'summary.md'} and {args.sweep_dir / 'accuracy_vs_batch.png'}")


if __name__ == "__main__":
    main()
