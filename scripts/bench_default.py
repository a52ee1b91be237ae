"""The default run against the default run of another commit: wall time start to exit and test accuracy, in pairs.

    python scripts/bench_default.py --old e823e11 --pairs 3

Each pair runs ``python train.py seed=K`` (K = 0, 1, 2, ...) of the old commit (a git worktree of it) and of this
working tree, one after the other, alone on the machine, alternating which goes first. Prints each run, then the
median wall time of each side, the median of the pairs' ratios (new / old) and each side's test accuracies; the
runs' folders stay in --out. Extra arguments go to both commands (e.g. ``logger=none``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_run(tree: Path, seed: int, out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds of ``python train.py seed=K`` in ``tree``, start to exit, and the test accuracy it wrote."""
    cmd = [sys.executable, "train.py", f"seed={seed}", f"hydra.run.dir={out}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return wall, summary.get("test_acc", summary.get("val_acc"))  # older commits: val_acc, with no split held out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="e823e11", help="the commit whose default run is the reference")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default=f"outputs/bench_default/{time.strftime('%Y-%m-%d_%H-%M-%S')}",
                    help="the runs' folders (old-K, new-K), kept")
    args, extra = ap.parse_known_args()
    out = Path(args.out).resolve()
    if out.exists():
        sys.exit(f"error: --out {out} exists: give a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), args.old], cwd=ROOT, check=True)
        try:
            walls, accs, ratios = {"old": [], "new": []}, {"old": [], "new": []}, []
            for seed in range(args.pairs):
                order = ["old", "new"] if seed % 2 == 0 else ["new", "old"]
                pair = {}
                for side in order:
                    tree = old_tree if side == "old" else ROOT
                    pair[side] = timed_run(tree, seed, out / f"{side}-{seed}", extra)
                    walls[side].append(pair[side][0])
                    accs[side].append(pair[side][1])
                    print(f"seed {seed} {side}: {pair[side][0]:.1f} s, test accuracy {100 * pair[side][1]:.2f} %",
                          flush=True)
                ratios.append(pair["new"][0] / pair["old"][0])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    for side, name in (("old", args.old), ("new", "this tree")):
        print(f"{side} ({name}): median {statistics.median(walls[side]):.1f} s; test accuracy "
              + ", ".join(f"{100 * a:.2f}" for a in accs[side]) + f" % (mean {100 * statistics.mean(accs[side]):.2f})")
    print(f"new / old: median of pairs {statistics.median(ratios):.3f} (pairs "
          + ", ".join(f"{r:.3f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
