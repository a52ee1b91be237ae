"""The one reader of a run's record files, for the engine and every script: ``metrics.jsonl`` (one JSON object per
line), ``summary.json`` and Hydra's ``.hydra/overrides.yaml``.

A torn last line of metrics.jsonl (a kill or a full disk mid-write) is dropped with one warning; any other line
that is not a JSON object is a ``RecordError`` naming the file and the line. A summary that is missing, torn or not
an object reads as ``{}`` (the run did not finish writing it); its non-finite numbers (``NaN``) read as None.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from .errors import RunError


class RecordError(RunError):
    """A record file that cannot be read: the message names the file (and the line)."""

    def __init__(self, message: str, brief: str | None = None):
        super().__init__(message)
        self.brief = brief or message


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_metrics(path: Path, warn: Callable[[str], None] = warn_on_stderr) -> list[dict]:
    """The rows of a metrics.jsonl ([] where there is none); blank lines are skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if k == len(lines) - 1:
                warn(f"{path}: its last line was cut off mid-write (a kill or a full disk); dropped")
                break
            raise RecordError(f"{path}: line {number} is not JSON; repair or delete that line") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path}: line {number} is not a JSON object (a row of metrics is {{\"step\": ...}})")
        rows.append(row)
    return rows


def load_summary(run_dir: Path) -> dict | None:
    """A run's summary.json (None where there is none), its NaN and inf read as None; a RecordError where it is
    torn or not an object, whose ``brief`` says so in a few words (a table's cell)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} is unreadable ({type(e).__name__})", brief=f"summary.json unreadable "
                          f"({type(e).__name__})") from None
    if not isinstance(summary, dict):
        raise RecordError(f"{path} is not a JSON object", brief="summary.json is not an object")
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json; {} where there is none, or it is torn or not an object (not finished writing)."""
    try:
        return load_summary(run_dir) or {}
    except RecordError:
        return {}


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the job ([] where it recorded none)."""
    import yaml
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        line = f": line {where.line + 1}" if where is not None else ""
        raise RecordError(f"{path}{line} is unreadable ({type(e).__name__})",
                          brief=f"{path} is unreadable ({type(e).__name__})") from None
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise RecordError(f"{path} is not a list of overrides (key=value strings); repair it, or move the job away")
    return overrides


# Settings a resume may change (engine/checkpoint.py refuses the others): a sweep job is found again without them
RESUME_MAY_CHANGE = ("micro_batch", "threads", "logger", "max_steps")


def job_identity(overrides: list[str]) -> tuple[str, ...]:
    """What makes a sweep job this run: its overrides less ``resume``, the launcher's (``hydra.*``) and the settings a
    resume may change (``RESUME_MAY_CHANGE``, a group's keys with it), sorted. ``seed=1`` and ``seed=1 resume=auto
    max_steps=200`` are one job; ``resume=auto`` finds its folder by this, and scripts/summarize.py groups by it."""
    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]
    return tuple(sorted(o for o in overrides if key(o) != "resume" and not key(o).startswith("hydra.")
                        and key(o).split(".")[0] not in RESUME_MAY_CHANGE))


_FOLDERS: dict[str, dict[tuple[str, ...], str]] = {}  # per sweep folder: identity -> its job's folder


def forget_job_folders() -> None:
    """A new command reads the sweep folders again (the preflight calls this: one process may run several)."""
    _FOLDERS.clear()


def job_folder(sweep_dir: str, num: int, name: str, overrides: list[str]) -> str:
    """A sweep job's folder: the one in ``sweep_dir`` that holds a run of the same ``job_identity`` (resume=auto
    continues it there, or finds it finished), else ``NUM_NAME``. The sweep folder is read once per process."""
    if sweep_dir not in _FOLDERS:
        found = {}
        for record in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
            try:
                found.setdefault(job_identity(read_overrides(record.parent.parent)), record.parent.parent.name)
            except RecordError:
                continue  # an unreadable record names no job; the job it was gets a new folder
        _FOLDERS[sweep_dir] = found
    return _FOLDERS[sweep_dir].get(job_identity(list(overrides)), f"{num}_{name}")
