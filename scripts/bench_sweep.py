"""Wall time of one sweep through Hydra's basic launcher (jobs one after another) against the same sweep through Ray
(``hydra/launcher=ray``: as many jobs at once as their num_cpus fit), start to exit, in interleaved pairs.

    python scripts/bench_sweep.py --pairs 3 [train.py overrides; default: 4 whole runs of one thread each]

The default jobs are 4 seeds of a whole run of 30 epochs (960 steps at batch 128 on 4,096 synthetic images, about
30 s each alone). Ray's fixed costs (its start, each worker's first import of torch, its shutdown: about 7 s more
than the basic launcher's here) are paid once per sweep, so its gain shows on jobs that are long against them, not
on jobs of a few seconds.

Each job has threads=1 (under Ray from num_cpus=1), so on a machine of N cores Ray runs N jobs at once. Prints each
pair and the ratio of the medians (Ray / basic); the jobs' results are checked equal (test_acc of each seed).
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
JOBS = ["data=synthetic", "data.train_size=4096", "batch=128", "epochs=30", "seed=0,1,2,3", "logger=none",
        "precision=fp32"]


def sweep(extra: list[str], folder: Path) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *extra, f"hydra.sweep.dir={folder}"],
                       capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - started
    if r.returncode != 0:
        sys.exit(f"error: the sweep {' '.join(extra)} failed: {r.stderr.strip().splitlines()[-1:]}")
    accs = {p.name.split("seed=")[1].split(",")[0]: json.loads((p / "summary.json").read_text())["test_acc"]
            for p in folder.iterdir() if (p / "summary.json").exists()}
    return took, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    args, extra = ap.parse_known_args()
    jobs = extra or JOBS
    basic, ray = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            b, b_accs = sweep([*jobs, "threads=1"], Path(tmp) / f"basic{i}")
            r, r_accs = sweep(["hydra/launcher=ray", "hydra.launcher.ray.remote.num_cpus=1", *jobs], Path(tmp) / f"ray{i}")
            if b_accs != r_accs:
                sys.exit(f"error: the launchers' results differ: basic {b_accs}, Ray {r_accs}")
            basic.append(b)
            ray.append(r)
            print(f"pair {i + 1}: basic {b:.1f} s, Ray {r:.1f} s, Ray / basic {r / b:.2f} ({len(b_accs)} jobs, "
                  f"the same test_acc)", flush=True)
    print(f"median: basic {statistics.median(basic):.1f} s, Ray {statistics.median(ray):.1f} s, "
          f"Ray / basic {statistics.median(ray) / statistics.median(basic):.2f}")


if __name__ == "__main__":
    main()
