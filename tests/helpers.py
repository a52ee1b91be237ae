"""Short trainings in-process, from the same composition train.py uses (engine.compose)."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from engine import cli
from engine.compose import CONF_DIR as CONF
from engine.compose import TINY, compose_cfg, load_cfg

__all__ = ["CONF", "ENV", "ROOT", "TINY", "checks", "compose_cfg", "load_cfg", "python", "run_train",
           "sweep_in_process", "train_in_process", "train_command"]

ROOT = Path(__file__).resolve().parent.parent  # the repository
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def python(args, cwd=ROOT, timeout=300, env=ENV) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess, its output captured: for what the process boundary is part of (exit codes,
    stderr lines, signals, launchers)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def checks(args, conf_dir: Path = CONF) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` up to the end of its checks (engine.cli.preflight, which train.py runs before
    Hydra), in this process: the exit code and what a refusal prints. For tests of what is refused and how it is
    said (``args``: the command line handed on to Hydra when the checks pass); test_cli.py runs the same refusals
    through a real process once."""
    out, err = io.StringIO(), io.StringIO()
    code, argv = 0, [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            argv = cli.preflight(argv, conf_dir=conf_dir)  # passed: what train.py hands on to Hydra
        except SystemExit as e:
            code = e.code
        finally:
            while cli._LOCKS:  # a run dir that passed stays locked for the life of the process: not this one's
                cli._LOCKS.pop().close()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_train(tmp_path: Path, overrides=(), name="run"):
    import train
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return train.train(compose_cfg(list(overrides)), run_dir), run_dir


def sweep_in_process(args: list[str], monkeypatch) -> None:
    """``python train.py -m ARGS`` in this process (its imports done once): the preflight, then Hydra's launcher."""
    train_in_process(["-m", *args], monkeypatch)


def train_in_process(args: list[str], monkeypatch) -> None:
    """``python train.py ARGS`` in this process, as its ``__main__`` runs it: the preflight, then Hydra. The list of
    failed jobs is this command's own meanwhile (earlier tests' are not its failures); the same list object, as
    train.py and the launchers hold it by name."""
    import runpy

    from engine.sweep import FAILED_JOBS
    earlier = list(FAILED_JOBS)
    FAILED_JOBS.clear()
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), *args])
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        FAILED_JOBS[:] = earlier
        while cli._LOCKS:  # a job's folder stays locked for the life of its process: not this one's
            cli._LOCKS.pop().close()


def train_command(args, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in this process (its imports done once): its exit code and what it printed, for the
    tests of what a command does to a run's files. What only a real process shows (signals, launchers, exit codes
    of several ranks) stays with ``python``."""
    capsys.readouterr()
    code = 0
    try:
        train_in_process([str(a) for a in args], monkeypatch)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def build_plan_optimizer(plan, model):
    """The optimizer train.py builds for ``plan``."""
    from engine.optimizer_class import build_optimizer
    return build_optimizer(model, plan.optimizer_cls, plan.optimizer_kwargs, plan.peak_lr, plan.weight_decay)
