"""How long the preflight takes to check a sweep of N jobs, every one before any starts (engine/cli.py).

    python scripts/bench_checks.py --jobs 257,10000 [extra train.py overrides]

Each grid is `seed=0,1,...,N-2,-1`: the last job is bad, so the whole grid is composed and checked and the command
is refused in one line. Timed in this process, after one small warm-up check (imports and the first composition
are a train.py start's, not the grid's). Prints the time, the time per job and the refusal line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time

from engine import cli


def check(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.preflight(args)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="257,10000", help="grid sizes, comma-separated")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        check(["-m", "seed=0,1", *extra, f"hydra.sweep.dir={tmp}/warm"])
        for n in map(int, args.jobs.split(",")):
            seeds = ",".join(map(str, range(n - 1)))
            started = time.perf_counter()
            code, line = check(["-m", f"seed={seeds},-1", *extra, f"hydra.sweep.dir={tmp}/grid"])
            took = time.perf_counter() - started
            print(f"{n:,} jobs: {took:.2f} s ({took / n * 1000:.2f} ms a job), exit {code}: {line[:110]}")


if __name__ == "__main__":
    main()
