"""Slurm without torchrun: who this task is, where its job's run lives, and how a requeued job continues itself.

One DDP run from ``srun python train.py`` (one task per GPU) or from Hydra's submitit launcher: rank, world size
and local rank are Slurm's own variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, as torchvision's references
read them); the master is the step's first node, from Slurm's compressed node list, expanded by submitit's parser;
the port is derived from the job id. Two traps are avoided: Slurm's rank variables are also set in the batch script
and in ``salloc`` shells, so they count only inside an srun step of more than one task, and never when torchrun's
RANK is set (torchrun inside an sbatch script keeps its own variables).

A requeued job (Slurm sets SLURM_RESTART_COUNT >= 1) resumes from its own checkpoint without ``resume=auto``, and
its default run dir is named by the job id, so the requeued job finds it again.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Mapping

from submitit.slurm.slurm import _parse_node_list

# Slurm's compressed task counts per node: "2(x3),1" is 2 tasks on each of 3 nodes, then 1
_TASK_COUNT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class SlurmError(ValueError):
    """A Slurm allocation that cannot hold one DDP run; said in one line."""


@dataclass(frozen=True)
class SlurmTask:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int   # tasks on each node (the same on every node)
    master_addr: str
    master_port: int


def in_step(environ: Mapping[str, str] = os.environ) -> bool:
    """Inside an srun step (not the batch script, not an salloc shell) and not under torchrun."""
    return "SLURM_STEP_ID" in environ and "RANK" not in environ


def task(environ: Mapping[str, str] = os.environ) -> SlurmTask | None:
    """This task's place in a multi-task srun step, or None (one process; or torchrun's variables rule)."""
    world = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
    if not in_step(environ) or world < 2:
        return None
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1"))
    nodes = _parse_node_list(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    if per_node * len(nodes) != world:
        raise SlurmError(f"Slurm gave this step {world} tasks on {len(nodes)} nodes, not {per_node} on each: one DDP "
                         f"run needs the same number of tasks on every node")
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else master_port(
        environ["SLURM_JOB_ID"], environ.get("SLURM_STEP_ID", "0"), restart_count(environ))
    return SlurmTask(rank=int(environ["SLURM_PROCID"]), world_size=world, local_rank=int(environ["SLURM_LOCALID"]),
                     local_world_size=per_node, master_addr=nodes[0], master_port=port)


def tasks_per_node(text: str) -> int:
    """The one task count of every node in Slurm's form ("8(x4)" = 8 on each of 4 nodes); different counts on
    different nodes are refused (ranks would not map onto GPUs the same way on every node)."""
    counts = set()
    for part in text.split(","):
        m = _TASK_COUNT.match(part.strip())
        if m is None:
            raise SlurmError(f"cannot read Slurm's tasks per node {text!r}")
        counts.add(int(m.group(1)))
    if len(counts) != 1:
        raise SlurmError(f"Slurm placed different numbers of tasks on the nodes ({text}): one DDP run needs the same "
                         f"number on every node; ask for --ntasks-per-node=GPUS_PER_NODE instead of --ntasks")
    return counts.pop()


def master_port(job_id: str, step_id: str = "0", restarts: int = 0) -> int:
    """A port in 20000..59999 from the job id, so every task computes the same one without talking. Two steps of
    one job, and a requeued job against its previous run (whose store may still be closing), get different ports."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + (digits * 64 + int(step_id if step_id.isdigit() else 0) * 8 + restarts) % 40000


def job_id(environ: Mapping[str, str] = os.environ) -> str:
    """The job's id as scontrol knows it: ARRAYJOB_TASK for an array task."""
    if environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ["SLURM_JOB_ID"]


def in_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Running as a Slurm job (its batch script or a step), not in an salloc shell on the login node."""
    return "SLURM_JOB_ID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_PROCID" in environ)


def default_run_dir(environ: Mapping[str, str] = os.environ) -> str | None:
    """outputs/slurm-JOBID (JOBID_TASK in an array): the same folder for every task and for the requeued job,
    where a time-stamped folder would start a requeued job from step 0."""
    return f"outputs/slurm-{job_id(environ)}" if in_job(environ) else None


def requeued(environ: Mapping[str, str] = os.environ) -> bool:
    return in_job(environ) and restart_count(environ) > 0


def resume_mode(resume: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The resume setting a run takes: a requeued Slurm job continues its own run (auto) unless told otherwise."""
    return "auto" if resume is None and requeued(environ) else resume


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)


def submitit_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Started by submitit (Hydra's submitit launcher): submitit's own signal handler requeues it."""
    return environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue(max_requeues: int, environ: Mapping[str, str] = os.environ) -> str:
    """Requeue this job (``scontrol requeue``), at most ``max_requeues`` times in all; returns what happened."""
    done = restart_count(environ)
    if done >= max_requeues:
        return f"not requeued: this job was requeued {done} times already (checkpoint.max_requeues={max_requeues})"
    jid = job_id(environ)
    try:
        subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return f"requeue of job {jid} failed ({detail.strip()}); resume it with resume=auto"
    return f"requeued job {jid} ({done + 1} of at most {max_requeues}); it resumes from this checkpoint by itself"
