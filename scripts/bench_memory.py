"""Peak memory of a batch-32k run against a batch-256 run with the same micro-batch (issue: flat memory).

    python scripts/bench_memory.py [extra train.py overrides, e.g. device=cuda model=resnet18 data=cifar10]

Each run is its own `train.py` process; its peak RSS comes from os.wait4 (per child, not a running maximum).
On a GPU the runs' summary.json also carry torch.cuda.max_memory_allocated, compared the same way.
Prints both figures and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_memory_mb(overrides: list[str]) -> tuple[float, float | None]:
    """(peak RSS, peak CUDA memory or None) of one train.py run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", "checkpoint.enabled=false",
               f"hydra.run.dir={tmp}/run"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr.read()[-2000:]}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        return usage.ru_maxrss / 1024, summary.get("cuda_peak_mb")  # ru_maxrss is in KiB on Linux


def main(extra: list[str]) -> None:
    small = ["batch=256", "max_steps=2", "micro_batch=256", *extra]
    large = ["batch=32k", "max_steps=1", "micro_batch=256", "optim=lars", *extra]
    (rss_a, cuda_a), (rss_b, cuda_b) = peak_memory_mb(small), peak_memory_mb(large)
    print(f"peak RSS, batch 256 (1 x 256):   {rss_a:8.0f} MB")
    print(f"peak RSS, batch 32k (128 x 256): {rss_b:8.0f} MB")
    print(f"ratio 32k / 256: {rss_b / rss_a:.3f}")
    if cuda_a and cuda_b:
        print(f"peak CUDA memory: {cuda_a:.0f} MB at 256, {cuda_b:.0f} MB at 32k, ratio {cuda_b / cuda_a:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for both runs")
    main(parser.parse_args().overrides)
