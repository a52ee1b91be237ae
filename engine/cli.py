"""Command-line checks that run before Hydra starts a job: bad input is one line on stderr and exit code 2,
before any run dir exists, so nothing is created or overwritten."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError, reject_unknown_keys, validate_values

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MAX_CHECKED_JOBS = 256


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


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
    from hydra.core.override_parser.overrides_parser import OverridesParser
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


def _check_group_options(args: list[str]) -> None:
    for a in args:
        key, _, value = a.partition("=")
        key = key.lstrip("+~")
        if "." in key or not value or not (CONF_DIR / key).is_dir():
            continue
        for v in value.split(","):
            if v not in group_options(key) and v != "null":
                fail(f"{key}={v} is not an option of '{key}': choose one of {', '.join(group_options(key))}")


def preflight(argv: list[str], check_files: bool = True) -> None:
    """Compose and check every job's config as Hydra will, and the run plan (batch split, warmup length);
    with ``check_files``, also that the dataset and a resume checkpoint exist (the preview needs neither)."""
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version",
                 "--shell-completion", "-sc") or a.startswith("--cfg") for a in argv):
        return
    args = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    _check_group_options(args)
    from hydra import compose, initialize_config_dir
    from . import checkpoint
    from .data import check_data_available, train_size_of
    from .distributed import env_world_size, resolve_device
    from .plan import make_plan
    try:
        jobs = _jobs(args)
    except Exception as e:
        fail(condense(e))
    if jobs is None:
        return
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        for overrides in jobs:
            try:
                cfg = compose("config", overrides=overrides)
                reject_unknown_keys(cfg)
                cfg = OmegaConf.to_object(cfg)
                validate_values(cfg)
                make_plan(cfg, train_size_of(cfg.data), env_world_size())
                if not check_files:
                    continue
                resolve_device(cfg.device.value)
                check_data_available(cfg.data)
                if cfg.resume not in (None, "auto"):
                    checkpoint.load(Path(cfg.resume))  # a missing or corrupt file fails here, not in a run dir
            except ConfigError as e:
                fail(str(e) + (f" [job: {' '.join(overrides)}]" if len(jobs) > 1 else ""))
            except Exception as e:
                fail(condense(e))
