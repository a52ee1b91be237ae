"""Hydra's submitit launcher for Slurm (``hydra/launcher=submitit_slurm``, conf/hydra/launcher/), with failures
made visible in the launching command.

The plugin's launcher submits the sweep as one job array and reads each job's result; a job that Slurm killed has
none, and without Slurm accounting (``sacct``) submitit cannot tell that it ended and waits for ever. This launcher
submits the same way (the plugin's settings, same names), then watches the jobs with ``squeue``, which every Slurm
answers. A job that failed or that Slurm killed (time limit, memory, node failure, cancellation) is recorded in its
own summary.json and named with its reason; the command then exits 1 (train.py). A requeued job is still running.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict
from submitit.core.utils import FailedJobError

from engine.metrics import log, say
from engine.sweep import FAILED_JOBS, record_job_failure
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

# The states in which a Slurm job has ended (squeue's %T); PREEMPTED and REQUEUED jobs come back.
ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "REVOKED"}
WHY = {
    "TIMEOUT": "Slurm killed it at its time limit (hydra.launcher.timeout_min), with no requeue left "
               "(hydra.launcher.max_num_timeout)",
    "OUT_OF_MEMORY": "Slurm killed it for using more memory than it asked for (hydra.launcher.mem_gb)",
    "CANCELLED": "it was cancelled (scancel, or a signal without a requeue)",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "it reached its deadline",
    "FAILED": "it exited with an error before its result was written",
}
FORGOTTEN_AFTER_S = 60  # a job without a result that squeue stopped listing (past MinJobAge), or that COMPLETED


def why_killed(state: str, stderr_tail: str = "") -> str:
    """One line: how a job without a result ended, from its Slurm state and the last line of its error log."""
    reason = WHY.get(state, f"it ended in Slurm state {state}")
    last = next((ln.strip() for ln in reversed(stderr_tail.splitlines()) if ln.strip()), "")
    return f"{reason}; last line of its log: {last}" if last else reason


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """squeue's state of each job (array tasks one by one); jobs it no longer lists are absent."""
    if not job_ids:
        return {}
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        logging.getLogger("submitit").setLevel(logging.ERROR)  # its sacct fallbacks are not the user's business
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbered = list(enumerate(job_overrides, start=initial_job_idx))
        say(f"Slurm: {len(numbered)} job(s) into {sweep_dir}")
        for idx, overrides in numbered:
            say(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        params = [(list(o), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()) for idx, o in numbered]
        try:
            jobs = executor.map_array(self, *zip(*params))
        except FailedJobError as e:  # sbatch refused the job (resources this cluster does not have, a bad option)
            log.error(f"error: Slurm refused the sweep's jobs: {' '.join(str(e).split())}")
            sys.exit(1)
        say(f"Slurm: submitted job(s) {', '.join(j.job_id for j in jobs)}; waiting for them")
        states = wait(jobs)
        return [outcome(job, self._job_dir(idx, overrides), overrides, states.get(job.job_id, "UNKNOWN"))
                for job, (idx, overrides) in zip(jobs, numbered)]

    def _executor(self):
        """The plugin's settings, mapped as the plugin maps them: the shared ones by name, the rest as slurm_*."""
        import submitit
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        own = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in self.params.items()
                                      if k not in own})
        return executor

    def _job_dir(self, idx: int, overrides) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def outcome(job, job_dir: Path, overrides, state: str) -> JobReturn:
    """The job's own result; a job that failed outside train.py's handling, or that Slurm killed, is recorded here
    (its summary.json, the list the command reports; nan for an optuna sweep), so that the sweep goes on and the
    command exits 1."""
    if job.paths.result_pickle.exists():
        try:
            result = job.results()[0]
        except Exception as e:  # the task raised past train.py (submitit's FailedJobError carries its log)
            lines = str(e).strip().splitlines()
            error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        else:
            FAILED_JOBS.note_job(job_dir)  # train.py recorded an error in the job
            return result
    else:
        error = why_killed(state, _tail(job.paths.stderr))
    record_job_failure(job_dir, error, slurm_job=job.job_id, slurm_state=state)
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=float("nan"),
                     working_dir=str(job_dir))


def wait(jobs, poll_s: float = 2.0) -> dict[str, str]:
    """Until every job has a result or has ended in Slurm's eyes; returns the last state seen of each. A job that
    ended COMPLETED gets a grace period for its result file to arrive over a shared file system."""
    pending = {j.job_id: j for j in jobs}
    seen: dict[str, str] = {}
    since: dict[str, float] = {}  # when each job was first seen ended, or first missing from squeue
    while pending:
        states = slurm_states(list(pending))
        now = time.time()
        for jid, job in list(pending.items()):
            state = states.get(jid)
            seen[jid] = state or seen.get(jid, "UNKNOWN")
            over = state in ENDED or (state is None and seen[jid] != "UNKNOWN")  # ended, or gone after being seen
            if over:
                since.setdefault(jid, now)
            else:
                since.pop(jid, None)
            waited = now - since.get(jid, now)
            grace = FORGOTTEN_AFTER_S if state is None or state == "COMPLETED" else 0
            if job.paths.result_pickle.exists() or (over and waited >= grace):
                del pending[jid]
        if pending:
            time.sleep(poll_s)
    return seen


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
