"""torchrun with 2 gloo processes against the single-process run: same update, one run dir, rank-0-only outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, run_train

COMMON = ["data=synthetic", "precision=fp32", "data.train_size=512", "data.test_size=128", "logger=wandb", "logger.mode=offline",
          "epochs=2", "warmup.steps=2", "model=vit_tiny", "data.image_size=14", "model.patch_size=7", "batch=64",
          "max_steps=3", "threads=1", "optim=lars"]  # a ViT of 4 tokens: no batch statistics, little compute


def launch(args, cwd, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc else []) + [str(ROOT / "train.py"), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The weights of the same run in one process (in-process: the process boundary is not what is compared)."""
    setting = [a for a in COMMON if not a.startswith("logger")]  # what is logged does not change the weights
    _, run_dir = run_train(tmp_path_factory.mktemp("one"), [*setting, "micro_batch=16", "logger=none"])
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.xdist_group("one_process")  # one worker computes the reference once for both
def test_two_ranks_match_one_process(tmp_path, one_process):
    r = launch(COMMON + ["micro_batch=16"], tmp_path, nproc=2)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks agreed on rank 0's run dir
    two = runs[0]
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["world_size"], summary["accum_steps"], summary["micro_batch"]) == (2, 2, 16)
    assert r.stdout.count("final test accuracy") == 1  # only rank 0 reports
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in one_process:
        torch.testing.assert_close(one_process[k], b[k], rtol=1e-4, atol=2e-6, msg=k)


def test_batch_must_divide_over_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), "data=synthetic", "batch=63", "logger=none"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.count("does not divide over 2 ranks") == 1  # rank 0's line only
    assert r.stderr.lstrip().startswith("error: batch=63 does not divide over 2 ranks")  # before torchrun's report
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def _worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process whose RANK is ``rank`` (read from /proc)."""
    import time
    deadline = time.time() + 60
    while time.time() < deadline:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == launcher_pid:  # field 4 of /proc/PID/stat: the parent's pid
                children.append(stat.parent.name)
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError("no worker found")


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    import signal
    import subprocess
    import time
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    replaced = {"logger", "logger.mode", "max_steps", "epochs", "batch"}
    args = [a for a in COMMON if a.split("=")[0] not in replaced] + [
        "logger=none", "max_steps=200", "epochs=30", "batch=32", "micro_batch=16", "logger.every_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.kill(_worker_with_rank(proc.pid, 1), signal.SIGTERM)  # rank 1 only, as a node's local preemption would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert out.count("SIGTERM: checkpoint saved at step") == 1, out[-2000:] + err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert summary["stopped_by"] == "SIGTERM" and ckpt["step"] == summary["steps"] < 200
    assert "Connection closed by peer" not in err


@pytest.mark.xdist_group("one_process")
def test_two_nodes_match_one_process(tmp_path, one_process):
    """README's multi-node command, as two torchrun launchers on this machine (one process each, c10d rendezvous):
    the same weights as one process, one run dir, one wandb run."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}",
                               "--rdzv_id=two-nodes", str(ROOT / "train.py"), *COMMON, "micro_batch=16"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[1][-2000:] for o in outs)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both nodes wrote into rank 0's run dir
    assert len(list((runs[0] / "wandb").glob("offline-run-*"))) == 1
    assert sum(o[0].count("final test accuracy") for o in outs) == 1  # only rank 0 reports
    b = torch.load(runs[0] / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in one_process:
        torch.testing.assert_close(one_process[k], b[k], rtol=1e-4, atol=2e-6, msg=k)


def test_every_rank_forgets_an_improvement_once_it_is_saved(tmp_path):
    """Saving gathers every rank's generators (a collective), so the ranks must agree on when the next save comes.
    An improved evaluation asks for one (best.pt); rank 0 used to be the only rank to forget it afterwards, and a
    rank above 0 then asked for a save at every step, alone (a 2-task Slurm job hung on it)."""
    from types import SimpleNamespace

    from engine.distributed import DistContext
    from engine.loop import save
    from engine.run import RunState
    state = RunState(improved=True)
    model = torch.nn.Linear(2, 2)
    run = SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(enabled=True)), state=state, schedule=SimpleNamespace(step=7),
                          dist=DistContext(rank=1, world_size=2), device=torch.device("cpu"), model=model,
                          optimizer=torch.optim.SGD(model.parameters()), ema=None)
    assert save(run, epoch=0) and state.improved is False


def _bn_statistics_of_rank(rank: int, port: int, out: str) -> None:
    """One gloo rank: a small ResNet (BatchNorm) and a SyncBatchNorm, statistics of its own, then averaged."""
    import torch.distributed as dist

    from engine.distributed import average_batch_norm_statistics
    from engine.models import SmallResNet
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(SmallResNet(1, 10, 4), torch.nn.SyncBatchNorm(3))
    torch.manual_seed(1 + rank)  # each rank's statistics its own
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 2.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = torch.nn.Module()  # as DDP holds it (DDP itself refuses SyncBatchNorm on the CPU)
    wrapped.module = model
    average_batch_norm_statistics(wrapped)
    torch.save({"own": own, "averaged": model.state_dict()}, f"{out}-{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_holds_the_mean_of_the_ranks_batch_norm_statistics(tmp_path):
    """timm's --dist-bn reduce: after engine.distributed.average_batch_norm_statistics (run before each evaluation
    and checkpoint), both gloo ranks hold the same running statistics, the mean of their own; SyncBatchNorm's and
    every other tensor are left alone."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bn_statistics_of_rank, args=(port, str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    averaged = [k for k in ranks[0]["own"] if "running" in k and not k.startswith("1.")]
    assert len(averaged) == 2 * 9  # mean and var of the ResNet's 9 BatchNorms
    for k in ranks[0]["own"]:
        a, b = ranks[0]["averaged"][k], ranks[1]["averaged"][k]
        if k in averaged:
            torch.testing.assert_close(a, (ranks[0]["own"][k] + ranks[1]["own"][k]) / 2, rtol=0, atol=1e-7)
            assert torch.equal(a, b), k
        else:  # weights, num_batches_tracked, SyncBatchNorm's statistics
            assert torch.equal(a, ranks[0]["own"][k]) and torch.equal(b, ranks[1]["own"][k]), k
