"""Slurm for real: jobs submitted to a one-node Slurm on this machine (scripts/slurm/local_cluster.sh, started once
per session as root) form one DDP run, resume by themselves after a requeue or a time-limit warning, and a job that
Slurm kills is named by the launching command. Reference: the same run in one process, without Slurm."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from wandb_records import runs as wandb_runs

from tests.helpers import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one worker holds the cluster

# 60 steps of ~0.1 s: interrupted at step 7 (past the first checkpoint) with 5 s to go; short enough for CI
STEPS = 60
RUN = ["data=synthetic", "precision=fp32", "data.train_size=4096", "data.test_size=128", "logger=none", "batch=256", f"max_steps={STEPS}",
       "epochs=7", "warmup.steps=5", "threads=1", "checkpoint.every_steps=5", "diagnostics.every=0",
       "logger.every_steps=1"]
TINY = ["data=synthetic", "precision=fp32", "data.train_size=512", "data.test_size=128", "logger=none", "batch=64", "micro_batch=16",
        "max_steps=3", "epochs=2", "warmup.steps=2", "threads=1", "model=vit_tiny", "data.image_size=14",
        "model.patch_size=7", "optim=lars"]  # 4 tokens
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The local Slurm, up; the one job that must wait out a minute for its time limit is submitted first, so that
    its minute passes beside the other tests (test_a_job_killed_at_its_time_limit_is_named_and_recorded)."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (scripts/slurm/local_cluster.sh installs and starts its daemons)")
    started = time.time()
    r = subprocess.run(["bash", str(ROOT / "scripts/slurm/local_cluster.sh")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"the local Slurm did not start:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    print(f"\nlocal Slurm up in {time.time() - started:.1f} s")
    sweep = tmp_path_factory.mktemp("time-limit") / "sweep"
    # --time=1 (minute) and no requeue left; the job sleeps out most of it before train.py starts, so that it
    # holds a Slurm CPU (the node offers twice its cores) but little of the machine
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=1",
         "hydra.launcher.signal_delay_s=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
         'hydra.launcher.setup=["sleep 40"]', *RUN, "max_steps=100000", "epochs=10000", f"hydra.sweep.dir={sweep}"],
        cwd=sweep.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield SimpleNamespace(time_limited=launcher, time_limited_sweep=sweep)
    launcher.kill()


def reference(tmp_path_factory, overrides, name):
    """The same run in one process, without Slurm, cached per session."""
    run_dir = tmp_path_factory.getbasetemp() / f"reference-{name}"
    if not (run_dir / "summary.json").exists():
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def assert_weights(a: dict, b: dict, exact: bool) -> None:
    """Bit for bit, or (several ranks) within 1e-4 for the trained weights; BatchNorm's running statistics are
    the mean of the ranks' own under DDP, where one process follows all its micro-batches in turn."""
    assert a.keys() == b.keys()
    for k in a:
        if not exact and k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def sbatch(*options: str, overrides=(), run_dir: Path) -> str:
    """The repository's sbatch script with this machine's resources (sbatch's options override its #SBATCH lines)."""
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G",
                        f"--chdir={ROOT}", f"--output={run_dir.parent / (run_dir.name + '-%j.out')}", *options,
                        str(ROOT / "scripts/slurm/train.sbatch"), *overrides, f"hydra.run.dir={run_dir}"],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def state(job: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%r"], capture_output=True, text=True,
                         timeout=60).stdout.strip()
    return tuple(out.split("|", 1)) if out else ("GONE", "")


def skip_begin_time(job: str) -> tuple[str, str]:
    """The job's state; a requeued job's wait for its BeginTime is skipped (scontrol ... StartTime=now)."""
    now, reason = state(job)
    if now == "PENDING" and "BeginTime" in reason:
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=60)
    return now, reason


def wait_for_end(job: str, timeout: float = 180) -> str:
    """Until the job has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now, _ = skip_begin_time(job)
        if now in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "GONE"):
            return now
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=60)
    raise AssertionError(f"job {job} did not end in {timeout} s (last state {state(job)})")


def wait_for_step(run_dir: Path, step: int, timeout: float = 120, job: str | None = None) -> None:
    """Until metrics.jsonl has logged ``step`` (the run is past a checkpoint, with most of its steps to go); a
    requeued ``job`` is started again meanwhile."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(ln).get("step", 0) >= step for ln in metrics.read_text().splitlines()
                                    if ln.strip().endswith("}")):
            return
        if job is not None:
            skip_begin_time(job)
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {step}")


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r and "test_acc" not in r]


# --- one DDP run ------------------------------------------------------------------------------------------------

def test_srun_tasks_form_one_ddp_run(cluster, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory, TINY, "tiny")
    r = subprocess.run(["srun", "-n2", "-c1", sys.executable, str(ROOT / "train.py"), *TINY], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "outputs").iterdir())
    assert [p.name[:6] for p in runs] == ["slurm-"]  # one run dir, named by the job
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert (summary["world_size"], summary["accum_steps"]) == (2, 2)
    assert sorted(p.name for p in (runs[0] / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert r.stdout.count("final test accuracy") == 1
    assert_weights(weights(runs[0]), ref, exact=False)


def test_submitit_launcher_tasks_form_one_ddp_run(cluster, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory, TINY, "tiny")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm",
                        "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
                        *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "sacct" not in r.stdout + r.stderr  # no accounting here: submitit's fallback stays out of sight
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert json.loads((job / "summary.json").read_text())["world_size"] == 2
    assert not list((job / ".hydra").glob("resume-*"))  # one record: the second task wrote none
    assert_weights(weights(job), ref, exact=False)


# --- preemption, requeue and the time-limit warning ------------------------------------------------------------

def test_interrupted_sbatch_job_resumes_by_itself(cluster, tmp_path, tmp_path_factory):
    """One job of two tasks, interrupted twice: Slurm's time-limit warning (USR2: the job checkpoints and requeues
    itself), then `scontrol requeue` (SIGTERM to every task). Each time the requeued job resumes without resume=auto,
    and it ends where the uninterrupted run ends (a requeue bit for bit, one task: the submitit test below)."""
    ref = reference(tmp_path_factory, RUN + ["micro_batch=128"], "run")
    run_dir = tmp_path / "run"
    job = sbatch("--ntasks-per-node=2", overrides=RUN + ["micro_batch=128", "logger=wandb"], run_dir=run_dir)
    wait_for_step(run_dir, 7)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    wait_for_step(run_dir, 20, job=job)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    assert wait_for_end(job) == "COMPLETED"
    log = next(tmp_path.glob("run-*.out")).read_text()
    for stop in ("SIGUSR2", "SIGTERM"):
        assert f"{stop}: checkpoint saved at step" in log, log[-3000:]
    assert f"SIGUSR2: requeued job {job} (1 of at most 3)" in log
    assert log.count("resuming from step") == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["stopped_by"]) == (STEPS, 2, None)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # each step once
    # three attempts, one wandb run (an interrupted attempt's own history may be lost: Slurm's SIGTERM reaches
    # wandb's service process too, which exits without flushing; metrics.jsonl above holds every step)
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 3 and len({p.name.rsplit("-", 1)[1] for p in attempts}) == 1
    assert wandb_runs(run_dir)[-1]["history_steps"][-1] == STEPS
    assert_weights(weights(run_dir), ref, exact=False)


def test_submitit_job_requeued_resumes_by_itself(cluster, tmp_path, tmp_path_factory):
    """A launcher job requeued after its first checkpoint resumes by itself and ends where the uninterrupted run ends."""
    ref = reference(tmp_path_factory, RUN + ["micro_batch=128"], "run")
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.max_num_timeout=3", *RUN, "micro_batch=128",
         f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(sweep.glob("0_*/metrics.jsonl")):
            time.sleep(0.1)
        (job_dir,) = [p.parent for p in sweep.glob("0_*/metrics.jsonl")]
        wait_for_step(job_dir, 7)
        (job,) = {p.name for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        wait_for_end(job)
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, out[-2000:] + err[-3000:]
    assert json.loads((job_dir / "summary.json").read_text())["steps"] == STEPS
    assert logged_steps(job_dir) == list(range(1, STEPS + 1))
    assert_weights(weights(job_dir), ref, exact=True)


# --- failures are visible ----------------------------------------------------------------------------------------

def test_a_job_that_fails_outside_train_py_is_named(cluster, tmp_path):
    """The job's batch script fails before train.py starts (here: a setup line that exits 3)."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm",
                        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", 'hydra.launcher.setup=["exit 3"]',
                        *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    (job_dir,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["slurm_state"] == "FAILED" and "before its result was written" in summary["error"]
    assert f"error in job {job_dir}" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_a_job_killed_at_its_time_limit_is_named_and_recorded(cluster):
    """Slurm ends the job at its time limit (TIMEOUT), train.py running; the launching command exits 1, names the
    job's folder and why, and writes it into the job's summary.json. Last in this file: the job was submitted by
    the fixture and has had its minute."""
    out, err = cluster.time_limited.communicate(timeout=300)
    assert cluster.time_limited.returncode == 1, out[-2000:] + err[-3000:]
    (job_dir,) = [p for p in cluster.time_limited_sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["slurm_state"] == "TIMEOUT" and "time limit" in summary["error"]
    assert f"error in job {job_dir}: Slurm killed it at its time limit" in out + err
    assert "job(s) of the sweep failed" in err
    assert "plan: global batch" in (job_dir / "train.log").read_text()  # train.py was running when it came
