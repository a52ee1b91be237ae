"""Interruptions: SIGTERM and SIGKILL mid-run (a real process), then resume=auto (train.py's main, in this process),
end bit-for-bit where an uninterrupted run ends; a checkpoint write that dies half-way leaves the previous file
loadable."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, TINY, run_train, train_in_process

RUN = ["data=synthetic", "precision=fp32", "data.train_size=1024", "data.test_size=128", "batch=32", "epochs=4", "warmup.steps=6",
       "logger=none", "logger.every_steps=1", "threads=1", "checkpoint.every_steps=3", "data.augment=true",
       "data.crop_padding=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start_and_interrupt(run_dir, sig, after_step):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, ckpt = run_dir / "metrics.jsonl", run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= after_step and ckpt.exists():
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    _, run_dir = run_train(tmp_path_factory.mktemp("straight"), RUN)
    return final_weights(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, straight, sig, monkeypatch):
    run_dir = tmp_path / "run"
    proc = start_and_interrupt(run_dir, sig, after_step=10)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, proc.stderr.read()[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stopped_by"] == "SIGTERM" and 10 <= summary["steps"] < 128
        assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"] == summary["steps"]
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 128
    train_in_process([*RUN, "resume=auto", f"hydra.run.dir={run_dir}"], monkeypatch)
    resumed = final_weights(run_dir)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    from engine import checkpoint
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "optimizer": {}, "step": 1, "epoch": 0}, path)

    def dies_half_way(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "optimizer": {}, "step": 2, "epoch": 0}, path)
    monkeypatch.undo()
    ckpt = checkpoint.load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def test_a_resume_applies_the_optimizer_settings_it_announces(tmp_path):
    """The resume line said `optim.momentum 0.9 -> 0.5` while load_state_dict put the checkpoint's param_groups
    back: the old momentum, nesterov and weight decay trained on, and the new checkpoint recorded the new ones."""
    run = [*TINY, "batch=64", "checkpoint.every_steps=1"]
    changed = ["optim.weight_decay=0.3", "optim.momentum=0.5", "optim.nesterov=false"]
    run_train(tmp_path, [*run, "max_steps=2"], "run")
    run_train(tmp_path, [*run, "max_steps=4", *changed, "resume=auto"], "run")
    groups = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert {(g["momentum"], g["nesterov"]) for g in groups} == {(0.5, False)}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.3]  # no decay on ndim <= 1 tensors
    run_train(tmp_path, [*run, "max_steps=2"], "unchanged")
    unchanged, _ = run_train(tmp_path, [*run, "max_steps=4", "resume=auto"], "unchanged")
    changed_run = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert changed_run["train_loss"] != unchanged["train_loss"]


def test_a_resumed_run_reads_its_checkpoint_once(tmp_path, monkeypatch):
    """The preflight reads last.pt for its refusals and hands it to the run (engine.checkpoint.hand_over): one
    torch.load of it per resume, not one for the checks and one for the run."""
    run_dir = tmp_path / "run"
    args = [*TINY, "batch=128", "max_steps=2", f"hydra.run.dir={run_dir}"]
    run_train(tmp_path, args[:-1], "run")
    reads, torch_load = [], torch.load

    def counted(f, *a, **k):
        reads.append(str(f))
        return torch_load(f, *a, **k)
    monkeypatch.setattr(torch, "load", counted)
    train_in_process([*args[:-2], "max_steps=3", "resume=auto", args[-1]], monkeypatch)
    assert reads.count(str(run_dir / "checkpoints" / "last.pt")) == 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
