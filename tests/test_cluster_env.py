"""On paper, as tables: what a process reads from Slurm's and torchrun's variables (ranks across nodes, the master,
the traps of the batch script and salloc), which GPU it takes, and how a killed job is described. The local Slurm
(tests/test_slurm.py) runs one node; several nodes are exercised only here."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from engine import distributed, slurm
from engine.distributed import Launch, cuda_index, launch
from engine.errors import ConfigError
from engine.sweep import FAILED_JOBS
from tests.helpers import ROOT


def step_env(procid, ntasks, nodelist, tasks_per_node, nodeid=0, localid=None, job="4242", **extra):
    """The variables srun sets in each task of a step (as read off the local Slurm, names unchanged)."""
    per = int(str(tasks_per_node).split("(")[0].split(",")[0])
    env = {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_LOCALID": str(procid % per if localid is None else localid),
           "SLURM_NODEID": str(nodeid), "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": str(tasks_per_node), "SLURM_TASKS_PER_NODE": str(tasks_per_node)}
    return {**env, **extra}


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("node-[8-10]", ["node-8", "node-9", "node-10"]),
    ("a[1,3],b[002-003]", ["a1", "a3", "b002", "b003"]),
])
def test_node_lists_expand_and_the_master_is_the_first_node(nodelist, hosts):
    per_node = 2
    env = step_env(0, per_node * len(hosts), nodelist, f"{per_node}(x{len(hosts)})")
    assert launch(env).master_addr == hosts[0]


@pytest.mark.parametrize("procid, nodeid, localid, rank, local_rank", [
    (0, 0, 0, 0, 0), (7, 0, 7, 7, 7), (8, 1, 0, 8, 0), (13, 1, 5, 13, 5), (31, 3, 7, 31, 7),
])
def test_ranks_across_four_nodes_of_eight_tasks(procid, nodeid, localid, rank, local_rank):
    env = step_env(procid, 32, "gpu[01-04]", "8(x4)", nodeid=nodeid, localid=localid)
    where = launch(env)
    assert (where.launcher, where.rank, where.world_size, where.local_rank, where.local_world_size) == (
        "slurm", rank, 32, local_rank, 8)
    assert where.rank == nodeid * where.local_world_size + localid  # Slurm's block placement


def test_every_task_of_a_job_computes_the_same_port_and_two_jobs_differ():
    ports = {launch(step_env(r, 4, "n[1-2]", "2(x2)", job="917")).master_port for r in range(4)}
    assert len(ports) == 1 and 20000 <= ports.pop() < 60000
    assert launch(step_env(0, 2, "n1", "2", job="917")).master_port != launch(step_env(0, 2, "n1", "2",
                                                                                         job="918")).master_port
    assert launch(step_env(0, 2, "n1", "2", MASTER_PORT="29555")).master_port == 29555
    # a requeued job does not meet its previous run's store, which may still be closing
    assert launch(step_env(0, 2, "n1", "2", job="917", SLURM_RESTART_COUNT="1")).master_port != launch(
        step_env(0, 2, "n1", "2", job="917")).master_port


@pytest.mark.parametrize("tasks_per_node, ntasks, nodes", [("2(x3),1", 7, "n[1-4]"), ("4,2", 6, "n[1-2]"),
                                                           ("3,3,2", 8, "n[1-3]")])
def test_different_task_counts_per_node_are_refused_in_one_line(tasks_per_node, ntasks, nodes):
    with pytest.raises(ConfigError) as e:
        launch(step_env(0, ntasks, nodes, tasks_per_node))
    assert "\n" not in str(e.value) and tasks_per_node in str(e.value) and "--ntasks-per-node" in str(e.value)


@pytest.mark.parametrize("env, expected", [
    ({}, "single"),                                                                    # a laptop
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}, "single"),  # an salloc shell
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"}, "single"),              # the batch script itself
    ({**step_env(0, 1, "n1", "1")}, "single"),                                          # srun -n1
    ({**step_env(1, 2, "n1", "2")}, "slurm"),                                           # srun -n2
    ({**step_env(1, 2, "n1", "2"), "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1",
      "MASTER_PORT": "29500"}, "torchrun"),  # torchrun in srun
])
def test_slurm_variables_count_only_in_a_step_of_several_tasks_without_torchrun(env, expected):
    assert launch(env).launcher == expected


@pytest.mark.parametrize("env, run_dir, requeued", [
    ({}, None, False),
    ({"SLURM_JOB_ID": "77"}, None, False),                                             # salloc: a time, as ever
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0"}, "outputs/slurm-77", False),          # batch script
    ({**step_env(0, 2, "n1", "2", job="77")}, "outputs/slurm-77", False),
    ({**step_env(0, 2, "n1", "2", job="80", SLURM_ARRAY_JOB_ID="78", SLURM_ARRAY_TASK_ID="2")},
     "outputs/slurm-78_2", False),
    ({**step_env(0, 2, "n1", "2", job="77", SLURM_RESTART_COUNT="1")}, "outputs/slurm-77", True),
])
def test_a_slurm_job_names_its_run_dir_by_its_id_and_knows_it_was_requeued(env, run_dir, requeued):
    assert slurm.default_run_dir(env) == run_dir
    assert slurm.requeued(env) is requeued
    assert slurm.resume_mode(None, env) == ("auto" if requeued else None)
    assert slurm.resume_mode("/elsewhere/last.pt", env) == "/elsewhere/last.pt"  # what the user said stands


@pytest.mark.parametrize("launcher, local_rank, local_world, visible, expected", [
    ("slurm", 3, 8, 8, 3),        # a task sees all of its node's GPUs: cuda:local_rank
    ("slurm", 3, 8, 1, 0),        # --gpus-per-task=1: Slurm bound one GPU, cuda:0
    ("slurm", 0, 1, 1, 0),
    ("slurm", 1, 4, 8, None),     # 4 tasks, 8 GPUs each: refused
    ("slurm", 1, 8, 4, None),     # 8 tasks, 4 GPUs: refused
    ("torchrun", 1, 2, 8, 1),     # torchrun may use fewer processes than GPUs
    ("torchrun", 5, 8, 8, 5),
    ("torchrun", 0, 2, 1, None),  # 2 ranks on the one GPU a Ray job was given: refused, rank 0 too
    ("torchrun", 1, 2, 1, None),
])
def test_which_gpu_a_rank_takes(launcher, local_rank, local_world, visible, expected):
    where = Launch(launcher, rank=local_rank, world_size=16, local_rank=local_rank, local_world_size=local_world)
    if expected is None:
        with pytest.raises(ConfigError, match="tasks per node but each task sees|they would share a GPU"):
            cuda_index(where, visible)
    else:
        assert cuda_index(where, visible) == expected


def test_one_process_with_a_gpu_takes_the_first():
    assert cuda_index(Launch(), 8) == 0


def test_a_ray_job_given_gpu_k_trains_on_cuda_0_of_what_it_sees(monkeypatch):
    """Ray gives a task GPU k by CUDA_VISIBLE_DEVICES=k; the job then sees one device and takes cuda:0, so the
    sweep's jobs never share one. (torch's device count is what CUDA reports under that variable.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.resolve_device("auto", launch({"CUDA_VISIBLE_DEVICES": "3"})) == torch.device("cuda", 0)


@pytest.mark.parametrize("device,amx,avx512_bf16,cuda_bf16,expected", [
    ("cpu", True, True, False, "bf16"),     # AMX (Sapphire Rapids and later): oneDNN's bf16 convolutions
    ("cpu", False, True, False, "bf16"),    # AVX512-BF16 alone (Cooper Lake, Zen 4)
    ("cpu", False, False, False, "fp32"),   # no bf16 units: bf16 would be emulated, slower than fp32
    ("cuda", False, False, True, "bf16"),   # Ampere and later
    ("cuda", True, True, False, "fp32"),    # an older GPU: the host's units do not count
])
def test_precision_auto_is_bf16_where_the_device_has_bf16_units(monkeypatch, device, amx, avx512_bf16, cuda_bf16,
                                                                 expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert distributed.resolve_precision("auto", torch.device(device)) == expected
    assert distributed.resolve_precision("fp16", torch.device(device)) == "fp16"  # a named precision stays


# --- a killed job, described by the launching command -------------------------------------------------------------

@pytest.mark.parametrize("state, words", [
    ("OUT_OF_MEMORY", "more memory than it asked for (hydra.launcher.mem_gb)"),
    ("TIMEOUT", "time limit (hydra.launcher.timeout_min)"),
    ("NODE_FAIL", "its node failed"),
    ("CANCELLED", "cancelled"),
    ("SPECIAL_EXIT", "Slurm state SPECIAL_EXIT"),
])
def test_a_job_without_a_result_is_recorded_with_its_slurm_state(tmp_path, state, words):
    """The cluster's verdict is injected (the local Slurm enforces no memory limit): the job's summary.json and the
    command's list get it; what the run itself wrote there is kept."""
    from hydra_plugins.large_batch_slurm.slurm_launcher import outcome
    job_dir = tmp_path / "0_seed=0"
    job_dir.mkdir()
    (job_dir / "summary.json").write_text(json.dumps({"steps": 40, "diverged": False}))
    stderr = tmp_path / "log.err"
    stderr.write_text("step 40/100\nslurmstepd: error: Detected 1 oom-kill event(s) in StepId=12.0\n")
    job = SimpleNamespace(job_id="12_0", paths=SimpleNamespace(result_pickle=tmp_path / "none.pkl", stderr=stderr))
    FAILED_JOBS.clear()
    ret = outcome(job, job_dir, ["seed=0"], state)
    summary = json.loads((job_dir / "summary.json").read_text())
    assert words in summary["error"] and "oom-kill" in summary["error"]
    assert (summary["slurm_state"], summary["slurm_job"], summary["steps"]) == (state, "12_0", 40)
    assert FAILED_JOBS == [str(job_dir)] and ret.return_value != ret.return_value  # nan: the sweep goes on
    FAILED_JOBS.clear()


# --- signals during training, on every launcher -------------------------------------------------------------------

def test_sigterm_to_every_worker_and_to_torchrun_saves_once_and_completely(tmp_path):
    """Slurm signals every process of a step at once: torchrun's agent passes one more SIGTERM on to its workers.
    The repeated signal is absorbed: rank 0 writes its checkpoint in full, the others wait for it at a barrier."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), "data=synthetic", "data.train_size=4096", "logger=none",
                             "batch=256", "max_steps=400", "epochs=30", "threads=1", "logger.every_steps=1",
                             f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    for pid in workers + [proc.pid]:
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert "SIGTERM: checkpoint saved at step" in out, out[-2000:] + err[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and ckpt["step"] == summary["steps"] < 400
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("signals, name, warned", [
    (["SIGTERM", "SIGTERM"], "SIGTERM", False),            # Slurm's, then torchrun's agent passing it on
    (["SIGINT", "SIGINT", "SIGINT"], "SIGINT", False),     # Ctrl-C, impatiently
    (["SIGUSR2", "SIGTERM"], "SIGUSR2", True),             # the time-limit warning, then the requeue's SIGTERM
    (["SIGTERM", "SIGUSR2"], "SIGTERM", True),
])
def test_repeated_signals_are_absorbed_while_a_stop_is_pending(signals, name, warned):
    """Before, a second signal restored the default handler and killed the process (rank 0 mid-save)."""
    code = ("import os, signal\nfrom engine.loop import StopFlag\nwith StopFlag() as stop:\n"
            f"    for s in {signals!r}:\n        os.kill(os.getpid(), getattr(signal, s))\n"
            "    print(stop.signal_name, stop.warned)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.split()) == (0, [name, str(warned)]), r.stderr[-2000:]


def test_process_rank_is_read_without_raising():
    """The error paths ask for the rank: a step that cannot hold one DDP run still answers."""
    env = step_env(3, 7, "n[1-4]", "2(x3),1")
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        assert distributed.env_rank() == 3
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("ranks, visible, devices", [(2, "3,5", [0, 1]), (3, "3,5", None)])
def test_a_ray_job_given_two_gpus_is_one_ddp_run_with_a_rank_on_each(monkeypatch, tmp_path, ranks, visible, devices):
    """hydra.launcher.ray.remote.num_gpus=2: the job's task runs torchrun with one rank per GPU Ray gave it
    (CUDA_VISIBLE_DEVICES=3,5 here), and rank r takes cuda:r of what it sees; more ranks than GPUs are refused. On
    paper: the command the task runs, and the device each rank of it would take."""
    from hydra_plugins.large_batch_ray.ray_launcher import ddp_command
    command = ddp_command(["optim=lars", "batch=4k"], tmp_path / "0_optim=lars", 2, threads=4)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5].endswith("train.py") and command[6:] == ["optim=lars", "batch=4k", "threads=4",
                                                               f"hydra.run.dir='{tmp_path / '0_optim=lars'}'"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible.split(",")))
    env = {"CUDA_VISIBLE_DEVICES": visible, "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # as torchrun sets them in the task
    rank_envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(ranks)]
    if devices is None:
        with pytest.raises(ConfigError, match="they would share a GPU"):
            distributed.resolve_device("auto", launch(rank_envs[-1]))
    else:
        assert [distributed.resolve_device("auto", launch(e)) for e in rank_envs] == [torch.device("cuda", d)
                                                                                      for d in devices]
