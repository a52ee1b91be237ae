"""Command-line checks that run before Hydra starts a job: bad input is one line on stderr and exit code 2,
before any run dir exists, so nothing is created or overwritten."""
from __future__ import annotations

import difflib
import errno
import fcntl
import itertools
import os
import re
import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from . import slurm
from .checkpoint import RUN_FILES, already_done, to_resume
from .compose import CONF_DIR
from .config import load_config
from .datasets import check_data_available, check_model, train_size_of
from .distributed import env_rank, env_world_size, resolve_device
from .errors import ConfigError
from .plan import make_plan

MAX_CHECKED_JOBS = 256


def fail(message: str) -> None:
    """One line on stderr and exit 2. Under torchrun or srun every rank runs the same checks: only rank 0 prints,
    so the line appears once, before the launcher's own report of the failed workers."""
    if env_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


_NOT_IN_STRUCT = re.compile(r"Could not override '([\w.]+)'")


def _unknown_key(exc: Exception, overrides: list[str]) -> str | None:
    """Hydra's 'Could not override X ... not in struct' as one line, with a did-you-mean from the keys the
    selected options do have."""
    m = _NOT_IN_STRUCT.search(str(exc))
    if m is None:
        return None
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    try:
        cfg = compose("config", overrides=[o for o in overrides if not o.startswith(f"{key}=")])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = [str(k) for k in node.keys()] if node is not None else []
    except Exception:
        known = []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)" if close else ""
    where = f"'{parent}' as selected" if parent else "the config"
    advice = (f"a keyword of the optimizer class that its file lacks is added with +{key}=VALUE"
              if parent == "optim" else "the settings of each option are the keys of its file in conf/")
    return f"{key} is not a setting of {where}{hint}: {advice}"


def condense(exc: Exception) -> str:
    """Hydra and OmegaConf errors span many lines (search paths, hints) and hide the reason in their cause;
    keep the lines that say what is wrong, the cause's first."""
    text = str(exc)
    if exc.__cause__ is not None:
        text = f"{exc.__cause__}\n{text}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Config search path", "provider=", "Set the environment", "object_type=",
                          "reference_type=", "To append", "child_node", "ref_type", "parent_node")):
            continue
        if ln.startswith(("full_key:",)):
            keep.append(f"({ln})")
            continue
        keep.append(ln)
    return " ".join(keep)[:600] or type(exc).__name__


def _jobs(args: list[str]) -> list[list[str]] | None:
    """The override lists of every job the command line describes (a sweep expands to its grid)."""
    parsed = OverridesParser.create().parse_overrides(args)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if o.is_discrete_sweep():
                choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            else:
                return None  # range/interval sweeps (optuna): each job is checked when it starts
        else:
            choices.append([o.input_line])
    jobs = list(itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS))
    return [list(j) for j in jobs]


def _check_group_options(args: list[str], conf_dir: Path) -> None:
    for a in args:
        key, _, value = a.partition("=")
        key = key.lstrip("+~")
        if "." in key or not value or not (conf_dir / key).is_dir():
            continue
        options = group_options(key, conf_dir)
        for v in value.strip("[]").split(","):  # a sweep (a,b) or a list of options merged into one ([a,b])
            if v not in options and v != "null":
                fail(f"{key}={v} is not an option of '{key}': choose one of {', '.join(options)}")


def check_threads(threads: int | None) -> None:
    """More threads than this process may run on is a 100x slowdown from oversubscription, not a speedup."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads is not None and threads > allowed:
        raise ConfigError(f"threads={threads} is more than the {allowed} CPUs this process may use: use 1..{allowed} "
                          f"(or null = all of them)")


_LOCKS = []  # open lock files: held for the life of the process


def lock_run_dir(run_dir: Path) -> None:
    """One run per folder: a second run started into a folder another process is using is refused. Also
    refuses a folder (or the nearest existing parent) this process cannot write to, and removes checkpoint
    temporaries a killed run left behind."""
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"hydra.run.dir={run_dir}: {existing} is not writable; choose a folder you can write to")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a")  # not "w": the holder's pid stays until the lock is ours
    except OSError as e:
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"hydra.run.dir={run_dir} is in use by another running train.py; wait for it, or "
                              f"choose another folder") from None
        raise
    try:  # a few bytes on disk now: a full disk is this one line, not Hydra's traceback writing .hydra/
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        if existing != run_dir:  # this call made the folder: leave nothing behind
            handle.close()
            shutil.rmtree(existing / run_dir.relative_to(existing).parts[0], ignore_errors=True)
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write there ({why}); free space or choose another "
                          f"folder") from None
    _LOCKS.append(handle)
    for stale in (run_dir / "checkpoints").glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def check_sweep_dir(sweep_dir: str | None) -> None:
    """A sweep launched again into a folder whose jobs hold runs, without resume=auto, is refused before any job
    starts, whatever the launcher (otherwise each job would refuse inside itself, next to a finished run)."""
    if sweep_dir is None or "${" in sweep_dir or not Path(sweep_dir).is_dir():
        return
    root = Path(sweep_dir)
    held = sorted(p for f in RUN_FILES for p in root.glob(f"*/{f}"))
    if held:
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} already holds the runs of a sweep ({held[0]}): pass "
                          f"resume=auto to continue its jobs, or choose another hydra.sweep.dir")


def preflight(argv: list[str], check_files: bool = True, conf_dir: Path = CONF_DIR) -> None:
    """Compose and check every job's config as Hydra will, and the run plan (batch split, warmup length);
    with ``check_files``, also that the dataset and a resume checkpoint exist (the preview needs neither)."""
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version",
                 "--shell-completion", "-sc") or a.startswith("--cfg") for a in argv):
        return
    args = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if multirun:
        run_dir = None  # each job's folder is decided by the sweep
    _check_group_options(args, conf_dir)

    try:
        jobs = _jobs(args)
        if multirun and check_files and not any(a.split("=", 1)[0] == "resume" and a != "resume=null" for a in args):
            check_sweep_dir(next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")), None))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:
        fail(condense(e))
    if jobs is None:
        return
    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        for overrides in jobs:
            try:
                cfg = load_config(compose("config", overrides=overrides))
                cfg.resume = slurm.resume_mode(cfg.resume)
                plan = make_plan(cfg, train_size_of(cfg.data), env_world_size())
                check_model(cfg.model, cfg.data)
                if not check_files:
                    continue
                resolve_device(cfg.device)
                check_threads(cfg.threads)
                check_data_available(cfg.data)
                resume = None
                if run_dir is not None or cfg.resume not in (None, "auto"):
                    resume = to_resume(cfg, Path(run_dir or "."), plan)  # refusals happen here, before Hydra writes
                if run_dir is not None and env_rank() == 0:
                    lock_run_dir(Path(run_dir))
                if run_dir and (resume or cfg.resume == "auto") and (
                        done := already_done(Path(run_dir), resume and resume.ckpt, plan)):
                    if env_rank() == 0:
                        print(done, flush=True)
                    sys.exit(0)  # a finished run stays exactly as it was
            except ConfigError as e:
                fail(str(e) + (f" [job: {' '.join(overrides)}]" if len(jobs) > 1 else ""))
            except Exception as e:
                fail(_unknown_key(e, overrides) or condense(e))
