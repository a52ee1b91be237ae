"""Summarize Hydra multirun sweeps: a markdown table of every job and a plot of test accuracy against what the
sweeps varied.

    python scripts/summarize.py multirun/2026-11-25/12-00-00 [more sweep dirs] [--seeds-mean] [--x KEY] [--out DIR]
                                [--targets 0.85,0.88] [--noise-scale NOISE.csv]

Prints the table (also written to OUT/summary.md; OUT = the first sweep dir unless --out) and writes
OUT/accuracy_vs_<KEY>.png: one line per combination of the other overrides (e.g. per optimizer); jobs that diverged
or failed are marked with an x at the bottom. The x axis is --x KEY, or else what the sweeps varied: `batch` (log-2
axis) when it varies, the LR (`optim.lr`, log axis) for an optuna LR search, otherwise the first other override that
varies. With --seeds-mean, jobs differing only in `seed` are averaged: mean +- std and every seed's value in the
table, error bars in the plot.

On a batch axis the gradient noise scale is marked: the median online B_simple at the end of the smallest-batch
jobs that measured it, and with --noise-scale (scripts/noise_scale.py's CSV) the median measured at their last checkpoints. With
--targets, also the steps and images each constant-batch job needed to first reach each target test accuracy,
McCandlish et al.'s trade-off fitted per line (scripts/tradeoff.py): a table appended to summary.md and
OUT/steps_examples_tradeoff.png (with the B_simple measured where the runs reached each target).
"""
from __future__ import annotations

import argparse
import fcntl
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import tradeoff  # scripts/tradeoff.py, beside this file
from tradeoff import batch_label

from engine.config import parse_batch
from engine.records import RecordError, job_identity, load_summary, read_overrides


def load_jobs(sweep: Path) -> list[dict]:
    jobs = []
    for overrides_file in sorted(sweep.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_num(p.parent.parent)):
        job_dir = overrides_file.parent.parent
        try:
            overrides = read_overrides(job_dir)
        except RecordError as e:
            overrides = []
            print(f"warning: {e.brief}: job {job_dir.name} is listed without its overrides", file=sys.stderr)
        # one setting however it was started: seed=1 and seed=1 resume=auto max_steps=200 are one job
        jobs.append({"dir": job_dir.name, "path": str(job_dir), "overrides": list(job_identity(overrides)),
                     **read_summary(job_dir)})
    return jobs


def read_summary(job_dir: Path) -> dict:
    """The job's summary.json (engine/records.py: NaN reads as None); a missing, unreadable or empty one is the job's
    error (shown in the table, not a crash)."""
    try:
        summary = load_summary(job_dir)
    except RecordError as e:
        return {"error": e.brief}
    if summary is None:
        return {"running": True} if running(job_dir) else {"error": "no summary.json"}
    if not summary:
        return {"error": "summary.json holds no result"}
    return summary


def running(job_dir: Path) -> bool:
    """Whether a train.py holds the job's lock (engine/cli.py's lock_run_dir: an exclusive flock on .lock, held for
    the life of the process): a shared lock is refused while it runs."""
    try:
        with open(job_dir / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: never started by this version, or not yet
        return False
    return False


def _job_num(job_dir: Path) -> int:
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def value_of(job: dict, key: str):
    """The job's value of ``key``: from its overrides, else (batch) its summary; numbers as numbers."""
    if key == "batch":
        return batch_of(job)
    for o in job["overrides"]:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            try:
                return float(v)
            except ValueError:
                return v
    return None


def varied_key(jobs: list[dict]) -> str:
    """What the sweeps varied: batch, else the LR of an optuna search, else the first other varying override."""
    values = defaultdict(set)
    for j in jobs:
        for o in j["overrides"]:
            k, _, v = o.lstrip("+~").partition("=")
            values[k].add(v)
    varying = [k for k, vs in values.items() if len(vs) > 1 and k != "seed"]
    if "batch" in varying or not varying:
        return "batch"
    if "optim.lr" in varying:
        return "optim.lr"
    return varying[0]


def batch_of(job: dict) -> int | None:
    if isinstance(job.get("global_batch"), int):
        return job["global_batch"]
    for o in job["overrides"]:
        if o.startswith("batch="):
            return parse_batch(o.split("=", 1)[1])
    return 256 if not job.get("error") else None


def series_key(job: dict, drop=("batch", "seed"), common=frozenset()) -> str:
    """The job's overrides that name its line: all but the x key, seed and those every job of the sweep shares."""
    rest = [o for o in job["overrides"] if o.split("=", 1)[0].lstrip("+~") not in drop and o not in common]
    return " ".join(rest) or "default"


def shared_overrides(jobs: list[dict]) -> frozenset:
    sets = [set(j["overrides"]) for j in jobs]
    return frozenset(set.intersection(*sets)) if len(sets) > 1 else frozenset()


def fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def ended(job: dict) -> str:
    """How the job ended: finished, diverged, stopped by a signal (resumable), or failed with an error."""
    if job.get("running"):
        return "running"
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
             "| job | overrides | val_acc | test_acc | peak LR | steps | images | images/s | B_simple | wall_s | ended |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if not seeds_mean:
        for j in jobs:
            rest = " ".join(o for o in j["overrides"] if o not in common) or "(defaults)"
            lines.append(f"| {j['sweep']}{j['dir'].split('_', 1)[0]} | {rest} | {fmt(j.get('val_acc'))} | "
                         f"{fmt(j.get('test_acc'))} | {fmt(j.get('peak_lr'))} | {fmt(j.get('steps'))} | "
                         f"{fmt(j.get('images'))} | {fmt(j.get('images_per_s'), 3)} | "
                         f"{fmt(j.get('noise_scale_b_simple'), 3)} | {fmt(j.get('wall_s'), 3)} | {ended(j)} |")
        return "\n".join(ln for ln in lines if ln)
    lines[1:] = ["| seeds | overrides | test_acc mean +- std | every seed | peak LR | steps | images | ended |",
                 "|---|---|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for j in jobs:
        groups[series_key(j, drop=("seed",), common=common)].append(j)
    for key, js in groups.items():
        accs = [a for j in js if (a := accuracy(j)) is not None]
        acc = (f"{statistics.mean(accs):.4f} +- {statistics.stdev(accs):.4f}" if len(accs) > 1
               else fmt(accs[0]) if accs else "-")
        each = ", ".join(f"{a:.4f}" for a in accs)
        steps = sorted({j.get("steps") for j in js if j.get("steps") is not None})
        lines.append(f"| {len(js)} | {key} | {acc} | {each} | {fmt(js[0].get('peak_lr'))} | "
                     f"{'/'.join(map(str, steps)) or '-'} | {fmt(js[0].get('images'))} | "
                     f"{sum(ended(j) == 'finished' for j in js)} of {len(js)} finished |")
    return "\n".join(ln for ln in lines if ln)


def accuracy(job: dict) -> float | None:
    """The test accuracy a job that trained to its end reports: test_acc (val_acc in a record without one)."""
    acc = job.get("test_acc", job.get("val_acc"))
    return acc if isinstance(acc, float) and not job.get("diverged") and not job.get("error") else None


def knees(jobs: list[dict], within: float = 0.01) -> list[str]:
    """Per line (the overrides other than batch and seed): the largest batch whose mean accuracy over seeds is within
    ``within`` (1 point) of the line's best, where the accuracy-vs-batch curve stops being flat."""
    common = shared_overrides(jobs)
    means = defaultdict(lambda: defaultdict(list))
    for j in jobs:
        if (a := accuracy(j)) is not None and (b := batch_of(j)):
            means[series_key(j, common=common)][b].append(a)
    lines = []
    for key, by_batch in sorted(means.items()):
        acc = {b: statistics.mean(v) for b, v in by_batch.items()}
        best = max(acc.values())
        knee = max(b for b, a in acc.items() if a >= best - within)
        beyond = [b for b in sorted(acc) if b > knee]
        lines.append(f"- knee of {key}: batch {batch_label(knee)} (best {best:.4f}; the largest batch within "
                     f"{within * 100:g} point of it" + (f"; {batch_label(beyond[0])}: {acc[beyond[0]]:.4f})" if beyond
                                                        else ")"))
    return lines


def noise_marks(jobs: list[dict], noise_rows: list[dict]) -> dict[str, float]:
    """B_simple to mark on a batch axis: the median online B_simple at the end of the smallest-batch jobs that measured it
    (accumulation >= 2; the longest runs, so the least lag), and the median of the checkpoint measurements
    (noise_scale.py) at the runs' last checkpoints."""
    marks = {}
    measured = [j for j in jobs if isinstance(j.get("noise_scale_b_simple"), float) and not j.get("diverged")
                and isinstance(j.get("global_batch"), int)]
    if measured:
        smallest = min(j["global_batch"] for j in measured)
        online = [j["noise_scale_b_simple"] for j in measured if j["global_batch"] == smallest]
        marks[f"B_simple online at the end, batch {batch_label(smallest)} (median)"] = statistics.median(online)
    last = [float(r["b_simple"]) for r in noise_rows if r["checkpoint"] == "last.pt" and float(r["b_simple"]) > 0]
    if last:
        marks["B_simple from checkpoints at the end (median)"] = statistics.median(last)
    return marks


def plot(jobs: list[dict], out: Path, x_key: str, marks: dict[str, float] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = defaultdict(lambda: defaultdict(list))
    failed = []
    common = shared_overrides(jobs)
    for j in jobs:
        x = value_of(j, x_key)
        if x is None:
            continue
        key = series_key(j, drop=(x_key, "seed"), common=common)
        if j.get("running"):
            continue
        if (a := accuracy(j)) is None:
            failed.append((x, key))
            continue
        series[key][x].append(a)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs_all = sorted({x for points in series.values() for x in points} | {x for x, _ in failed}, key=str)
    numeric = all(isinstance(x, (int, float)) for x in xs_all)
    position = (lambda x: x) if numeric else {x: i for i, x in enumerate(xs_all)}.get
    for key, points in sorted(series.items()):
        xs = sorted(points, key=lambda x: position(x))
        means = [statistics.mean(points[x]) for x in xs]
        errs = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar([position(x) for x in xs], means, yerr=errs, marker="o", capsize=3, label=key)
    if failed:
        ax.scatter([position(x) for x, _ in failed], [0.0] * len(failed), marker="x", color="red",
                   label="diverged / failed")
    if x_key == "batch":
        for i, (label, value) in enumerate((marks or {}).items()):
            ax.axvline(value, color="k", linestyle=["-.", (0, (1, 3))][i % 2], alpha=0.6,
                       label=f"{label}: {value:,.0f}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [batch_label(b) for b in xs_all])
    elif numeric and len(xs_all) > 1 and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    elif not numeric:
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all], rotation=20, fontsize=7)
    ax.set_xlabel("global batch" if x_key == "batch" else x_key)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy vs {x_key} ({out.parent.name})" + (f"\n{' '.join(sorted(common))}" if common else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    try:
        summarize()
    except RecordError as e:  # a record that cannot be read (a damaged line of a metrics.jsonl): one line
        sys.exit(f"error: {e}")


def summarize() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dirs", type=Path, nargs="+")
    ap.add_argument("--seeds-mean", action="store_true", help="average jobs that differ only in seed")
    ap.add_argument("--x", help="the override to plot accuracy against (default: what the sweeps varied)")
    ap.add_argument("--out", type=Path, help="folder for summary.md and the plot (default: the first sweep dir)")
    ap.add_argument("--targets", type=_fractions,
                    help="test accuracies, e.g. 0.85,0.88: steps and images to reach them, McCandlish's fit")
    ap.add_argument("--noise-scale", type=Path, help="scripts/noise_scale.py's CSV: B_simple measured at checkpoints")
    args = ap.parse_args()
    jobs = []
    for sweep in args.sweep_dirs:
        if not sweep.is_dir():
            sys.exit(f"error: {sweep} is not a folder (give the multirun dir holding the numbered job dirs)")
        found = load_jobs(sweep)
        if not found:
            sys.exit(f"error: {sweep} holds no Hydra jobs (no */.hydra/overrides.yaml)")
        for j in found:  # several sweeps: jobs are named sweep/num
            j["sweep"] = f"{sweep.name}/" if len(args.sweep_dirs) > 1 else ""
        jobs += found
    x_key = args.x or varied_key(jobs)
    keys = {o.lstrip("+~").split("=", 1)[0] for j in jobs for o in j["overrides"]}
    if args.x and args.x != "batch" and args.x not in keys:  # nothing to plot is an error, not an empty figure
        sys.exit(f"error: --x {args.x}: no job sets it (the jobs set: {', '.join(sorted(keys)) or 'nothing'})")
    try:
        noise_rows = tradeoff.read_noise_csv(args.noise_scale)
    except ValueError as e:
        sys.exit(f"error: --noise-scale {e}")
    out = args.out or args.sweep_dirs[0]
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} is a file: give a folder (summary.md and the plot are written into it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out {out}: cannot make that folder ({e.strerror})")
    md = table(jobs, args.seeds_mean)
    wrote = [out / "summary.md", out / ("accuracy_vs_" + x_key.replace(".", "_").replace("/", "_") + ".png")]
    marks = noise_marks(jobs, noise_rows) if x_key == "batch" else {}
    if x_key == "batch" and args.seeds_mean:
        md += "\n\n" + "\n".join(knees(jobs))
    if marks:
        md += "\n\n" + "\n".join(f"- {label}: {value:,.0f}" for label, value in marks.items())
    if args.targets:
        common = shared_overrides(jobs)
        found = tradeoff.crossings(jobs, args.targets, lambda j: series_key(j, common=common))
        trade_md, fits, target_marks = tradeoff.table(found, noise_rows)
        md += "\n\nSteps to a target test accuracy (McCandlish et al.'s S = S_min + E_min/B fitted):\n\n" + trade_md
        wrote.append(out / "steps_examples_tradeoff.png")
        tradeoff.plot(found, fits, wrote[-1], target_marks)
    print(md)
    wrote[0].write_text(md + "\n")
    plot(jobs, wrote[1], x_key, marks)
    print(f"\nwrote {', '.join(map(str, wrote))}")


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give accuracies between 0 and 1, comma-separated") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every target must lie between 0 and 1 (exclusive)")
    return values


if __name__ == "__main__":
    main()
