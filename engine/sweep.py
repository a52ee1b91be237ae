"""A sweep's failed jobs, for the launching command to name before it exits 1 (train.py). Each is recorded once:
by the job's own process (train.py's main, which under Hydra's basic launcher is this process) or by the launcher
that saw it end (Slurm, Ray: ``note_job`` reads the summary the job wrote, ``record_job_failure`` writes one for a
job that could not). Divergence is a result, not a failure."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import RUN_FILES
from .distributed import env_rank
from .metrics import log
from .records import read_summary


class FailedJobs(list):
    """The run dirs of this command's failed jobs, in the order they failed."""

    def add(self, run_dir: Path, error: str) -> None:
        if str(run_dir) not in self:
            log.error(f"error in job {run_dir}: {error}")
            self.append(str(run_dir))

    def note_job(self, job_dir: Path) -> None:
        """A job that ended on another machine or process: failed if its summary.json records an error."""
        summary = read_summary(job_dir)
        if "error" in summary:
            self.add(job_dir, summary["error"])

    def report(self) -> str | None:
        return (f"{len(self)} job(s) of the sweep failed (their summary.json has the error): {', '.join(self)}"
                if self else None)


FAILED_JOBS = FailedJobs()


def record_job_failure(run_dir: Path, error: str, refused: bool = False, **details) -> dict:
    """A sweep job's error, in its own summary.json (keeping what the run wrote there) and in FAILED_JOBS. A refusal
    (``refused``: the job's input was turned down before it trained) writes nothing into a folder that already holds
    a run: that record is another run's. In the job's process only rank 0 writes; the launchers record the jobs
    that were killed (they cannot write their own)."""
    if env_rank() != 0:
        return {"error": error}
    FAILED_JOBS.add(run_dir, error)
    if refused and any((run_dir / f).exists() for f in RUN_FILES):
        return {"error": error}
    path = run_dir / "summary.json"
    summary = {"diverged": False, **read_summary(run_dir), "error": error, **details}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
