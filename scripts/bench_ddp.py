"""DDP scaling efficiency: the same run (same global batch) on 1 rank and on N ranks under torchrun.

    python scripts/bench_ddp.py [--nproc 2] [--batch 256] [--steps 40] [extra train.py overrides]

Each rank gets one CPU thread, so 1 rank uses 1 core and N ranks use N cores. Reads images/s (training steps
only) from each run's summary.json and prints efficiency = images/s(N) / (N x images/s(1)). gloo on CPU, NCCL
on CUDA (with --device cuda on a multi-GPU machine).
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


def images_per_s(nproc: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
        return json.loads((run_dir / "summary.json").read_text())["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="resnet_small")
    args, extra = ap.parse_known_args()
    overrides = ["data=synthetic", "precision=fp32", f"data.train_size={args.batch * args.steps}", "data.test_size=256",
                 f"model={args.model}", f"batch={args.batch}", "epochs=1", "warmup=none", "schedule=constant",
                 "logger=none", "checkpoint.enabled=false", "threads=1", *extra]
    one = images_per_s(1, overrides)
    many = images_per_s(args.nproc, overrides)
    print(f"{args.model}, global batch {args.batch}, {args.steps} steps, 1 thread per rank:")
    print(f"  1 rank   {one:8.0f} images/s")
    print(f"  {args.nproc} ranks  {many:8.0f} images/s   speed-up {many / one:.2f}x, "
          f"scaling efficiency {many / (args.nproc * one):.2f}")


if __name__ == "__main__":
    main()
