"""Hydra's Ray launcher (hydra-ray-launcher) with failures made visible in the launching command
(``hydra/launcher=ray``, conf/hydra/launcher/ray.yaml).

The sweep's jobs run as Ray tasks, as many at once as their resources fit (``hydra.launcher.ray.remote.num_cpus``,
``num_gpus``), on this machine (Ray started here) or on a Ray cluster (``hydra.launcher.ray.init.address``). Ray
gives each task its own GPUs (``CUDA_VISIBLE_DEVICES``), and a job's device is ``cuda:0`` of what it sees, so two
jobs never share a GPU. A job's ``threads`` default to its ``num_cpus``. The plugin's launcher stops at the first
task that dies; this one collects every job, records a task that died in its own summary.json, and names every
failed job; the command then exits 1 (train.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ray
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from engine.metrics import say
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
            task = launch_job_on_ray(self.hydra_context, self.ray_cfg.remote, cfg, self.task_function,
                                     Singleton.get_state())
            jobs.append((task, job_dir, list(overrides)))
        return [outcome(*job) for job in jobs]


def outcome(task, job_dir: Path, overrides: list[str]) -> JobReturn:
    """The job's own result; a job whose task died (killed, out of memory) is recorded here, and one that ended in an
    error recorded by train.py is named, so that the sweep goes on and the command exits 1."""
    try:
        result = ray.get(task)
    except Exception as e:  # the task died past train.py's handling
        lines = str(e).strip().splitlines()
        record_job_failure(job_dir, f"{type(e).__name__}: {lines[-1] if lines else ''}")
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=float("nan"),
                         working_dir=str(job_dir))
    FAILED_JOBS.note_job(job_dir)  # train.py recorded an error, in the task's process
    return result
