"""Hydra's Ray launcher (hydra-ray-launcher) with failures made visible in the launching command
(``hydra/launcher=ray``, conf/hydra/launcher/ray.yaml).

The sweep's jobs run as Ray tasks, as many at once as their resources fit (``hydra.launcher.ray.remote.num_cpus``,
``num_gpus``), on this machine (Ray started here) or on a Ray cluster (``hydra.launcher.ray.init.address``). Ray
gives each task its own GPUs (``CUDA_VISIBLE_DEVICES``), and a job's device is ``cuda:0`` of what it sees, so two
jobs never share a GPU. A job's ``threads`` default to its ``num_cpus``. A job given several GPUs
(``num_gpus`` > 1) is one DDP run over them: its task starts torchrun with one rank per GPU, and each rank takes
``cuda:LOCAL_RANK`` of what Ray let it see (engine/distributed.py's cuda_index). The plugin's launcher stops at the
first task that dies; this one collects every job, records a task that died in its own summary.json, and names every
failed job; the command then exits 1 (train.py).
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import ray
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from engine.cli import hydra_quoted
from engine.metrics import say
from engine.records import read_summary
from engine.sweep import FAILED_JOBS, record_job_failure
from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher as PluginRayLauncher


class RayLauncher(PluginRayLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        remote = OmegaConf.to_container(self.ray_cfg.remote, resolve=True)
        start_ray(self.ray_cfg.init)
        say(f"Ray: {len(job_overrides)} job(s) into {sweep_dir}, each with {remote}; "
            f"the cluster has {ray.cluster_resources()}")
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            say(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id, cfg.hydra.job.num = f"job_id_for_{idx}", idx
                if cfg.get("threads") is None:
                    cfg.threads = int(remote.get("num_cpus") or 1)
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            gpus = int(remote.get("num_gpus") or 0)
            if gpus > 1:  # one DDP run over the job's GPUs
                command = ddp_command(list(overrides), job_dir, gpus, int(cfg.threads))
                task = ray.remote(run_ranks).options(**remote).remote(command)
                jobs.append((task, job_dir, list(overrides), True))
                continue
            task = launch_job_on_ray(self.hydra_context, self.ray_cfg.remote, cfg, self.task_function,
                                     Singleton.get_state())
            jobs.append((task, job_dir, list(overrides), False))
        return [outcome(*job) for job in jobs]


def ddp_command(overrides: list[str], job_dir: Path, gpus: int, threads: int) -> list[str]:
    """The job as one torchrun run: one rank per GPU of the task, into the job's own folder (resume=auto and the
    rest of its overrides as they are; the sweep's checks have run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            str(Path(__file__).resolve().parents[2] / "train.py"), *overrides, f"threads={threads}",
            f"hydra.run.dir={hydra_quoted(str(job_dir))}"]  # a job's folder holds '=' (0_seed=0)


def run_ranks(command: list[str]) -> int:
    """In the job's Ray task, which sees only its GPUs (CUDA_VISIBLE_DEVICES): torchrun and its ranks."""
    return subprocess.run(command).returncode


def outcome(task, job_dir: Path, overrides: list[str], ranks: bool = False) -> JobReturn:
    """The job's own result; a job whose task died (killed, out of memory) is recorded here, and one that ended in an
    error recorded by train.py is named, so that the sweep goes on and the command exits 1. A job of several ranks
    (``ranks``) returns torchrun's exit code; its result is its summary.json."""
    try:
        result = ray.get(task)
    except Exception as e:  # the task died past train.py's handling
        lines = str(e).strip().splitlines()
        record_job_failure(job_dir, f"{type(e).__name__}: {lines[-1] if lines else ''}")
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=float("nan"),
                         working_dir=str(job_dir))
    if ranks:
        summary = read_summary(job_dir)
        if result != 0 and "error" not in summary:
            summary = record_job_failure(job_dir, f"torchrun exited with code {result}")
        acc = summary.get("val_acc")
        result = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, working_dir=str(job_dir),
                           _return_value=acc if isinstance(acc, float) else math.nan)
    FAILED_JOBS.note_job(job_dir)  # train.py recorded an error, in the task's process
    return result
