"""Peak memory of a batch-32k run against a batch-256 run with the same micro-batch (issue: flat memory).

    python scripts/bench_memory.py [extra train.py overrides]

Each run is its own `train.py` process; its peak RSS comes from os.wait4 (per child, not a running maximum).
Prints both figures and their ratio. (Host memory only; on a GPU, compare torch.cuda.max_memory_allocated.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", "checkpoint.enabled=false",
               f"hydra.run.dir={tmp}/run"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr.read()[-2000:]}")
        return usage.ru_maxrss / 1024  # KiB on Linux


def main(extra: list[str]) -> None:
    small = ["batch=256", "max_steps=2", "micro_batch=256", *extra]
    large = ["batch=32k", "max_steps=1", "micro_batch=256", "optim=lars", *extra]
    a, b = peak_rss_mb(small), peak_rss_mb(large)
    print(f"peak RSS, batch 256 (1 x 256):   {a:8.0f} MB")
    print(f"peak RSS, batch 32k (128 x 256): {b:8.0f} MB")
    print(f"ratio 32k / 256: {b / a:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
