"""Sweeps through Ray (``hydra/launcher=ray``: hydra-ray-launcher, with hydra_plugins/large_batch_ray's failure
reporting): two jobs of one CPU each run at the same time, end equal to the basic launcher's jobs to the bit, and
continue in their own folders with resume=auto."""
import json
import re
from datetime import datetime

import pytest
import torch

from tests.helpers import TINY, python, run_train, sweep_in_process

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

JOBS = ["data=synthetic", "precision=fp32", "data.train_size=1024", "data.test_size=128", "logger=none", "batch=64", "warmup.steps=2",
        "seed=0,1"]


def by_seed(sweep) -> dict:
    return {re.search(r"seed=(\d+)", p.name).group(1): p for p in sweep.iterdir() if p.is_dir()}


def log_window(job, last_start: bool = False) -> tuple[datetime, datetime]:
    """The first and last time stamp of the job's train.log (of its last start, with ``last_start``)."""
    text = (job / "train.log").read_text()
    if last_start:
        text = text[text.rindex("data: "):]
    stamps = re.findall(r"^\[([\d\- :,]+)\]", text, flags=re.M)
    return tuple(datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))


def test_ray_runs_jobs_at_once_equal_to_the_basic_launcher_and_resumes(tmp_path, monkeypatch):
    """Seed 1 was interrupted at step 40 (a basic-launcher sweep into the same folder); the Ray sweep starts seed 0
    and continues seed 1 in its folder, at the same time; both end as the same jobs run alone, uninterrupted."""
    sweep = tmp_path / "ray"
    sweep_in_process([*JOBS[:-1], "seed=1", "threads=1", "max_steps=40", f"hydra.sweep.dir={sweep}"], monkeypatch)
    interrupted = by_seed(sweep)["1"]
    r = python(["train.py", "-m", "hydra/launcher=ray", *JOBS, "max_steps=60", "resume=auto",
                f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hydra_plugins.large_batch_ray.ray_launcher.RayLauncher" in (sweep / "multirun.yaml").read_text()
    jobs = by_seed(sweep)
    assert jobs["1"] == interrupted and "resuming from step 40 of 60" in (interrupted / "train.log").read_text()
    (a_start, a_end), (b_start, b_end) = log_window(jobs["0"]), log_window(jobs["1"], last_start=True)
    assert a_start < b_end and b_start < a_end, (a_start, a_end, b_start, b_end)  # at the same time
    assert "threads: 1" in (jobs["0"] / ".hydra" / "config.yaml").read_text()  # its num_cpus
    for seed in ("0", "1"):  # the same job alone, in this process, as the basic launcher runs it: uninterrupted
        theirs, job = run_train(tmp_path, [*JOBS[:-1], f"seed={seed}", "threads=1", "max_steps=60"], f"seed{seed}")
        ours = json.loads((jobs[seed] / "summary.json").read_text())
        assert {k: ours[k] for k in ("steps", "train_loss", "test_loss", "test_acc")} == {
            k: theirs[k] for k in ("steps", "train_loss", "test_loss", "test_acc")}
        a = torch.load(jobs[seed] / "checkpoints" / "last.pt", weights_only=False)["model"]
        b = torch.load(job / "checkpoints" / "last.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), seed


@pytest.mark.parametrize("died", [True, False])
def test_a_failed_ray_job_is_recorded_and_named(tmp_path, monkeypatch, died):
    """A task that died (its worker killed: no summary of its own) is recorded in its summary.json; one whose run
    recorded its error there is named too: either way the command exits 1 (train.py reads FAILED_JOBS)."""
    from engine.sweep import FAILED_JOBS
    from hydra_plugins.large_batch_ray import ray_launcher
    job = tmp_path / "0_seed=0"
    if died:
        def get(task):
            raise RuntimeError("The worker died unexpectedly while executing this task.\nA worker died or was killed")
    else:
        job.mkdir()
        (job / "summary.json").write_text(json.dumps({"error": "RunError: a file cannot be decoded"}))

        def get(task):
            return float("nan")
    monkeypatch.setattr(ray_launcher.ray, "get", get)
    before = list(FAILED_JOBS)
    try:
        ray_launcher.outcome(object(), job, ["seed=0"])
        assert FAILED_JOBS[len(before):] == [str(job)]
    finally:
        FAILED_JOBS[:] = before
    summary = json.loads((job / "summary.json").read_text())
    assert summary["error"] == ("RuntimeError: A worker died or was killed" if died
                                else "RunError: a file cannot be decoded")


@pytest.mark.slow  # tests/test_cluster_env.py: the command and each rank's device, on paper (no GPU here)
def test_the_command_of_a_job_over_two_gpus_trains_one_ddp_run(tmp_path):
    """What the task of a num_gpus=2 job runs, run here on the CPU (device=cpu, gloo): one run of 2 ranks."""
    from hydra_plugins.large_batch_ray.ray_launcher import ddp_command, run_ranks
    job_dir = tmp_path / "0_seed=0"
    command = ddp_command([*TINY, "batch=64", "max_steps=3", "device=cpu", "seed=0"], job_dir, 2, threads=1)
    assert run_ranks(command) == 0
    summary = json.loads((job_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 3)
