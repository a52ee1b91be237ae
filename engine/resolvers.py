"""The OmegaConf resolvers conf/ uses for run folders (config.yaml's hydra: section, hparams_search's study file).

Registered once, when this module is first imported: by engine/cli.py (train.py's preflight) and engine/compose.py
(composition from Python), the two ways a config is composed.
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from .distributed import env_rank


def resume_subdir(output_dir: str) -> str | None:
    """Where Hydra writes this start's record: .hydra/ for the first, .hydra/resume-N/ for the N-th resume."""
    if env_rank() != 0:
        return None  # Hydra writes no record: the run's one record is rank 0's
    record = Path(output_dir) / ".hydra"
    if not (record / "config.yaml").exists():
        return ".hydra"
    n = 1 + sum(1 for p in record.glob("resume-*") if p.is_dir())
    return f".hydra/resume-{n}"


def safe_name(text: str) -> str:
    """A job folder name from its overrides: any value, no nesting (a / becomes _)."""
    return re.sub(r"[^\w.,=+\-\[\]]", "_", text)[:200]


def made_dir(path: str) -> str:
    """The folder, created: the optuna study's sqlite file lives in the sweep folder, made first."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


for _name, _fn in (("resume_subdir", resume_subdir), ("safe_name", safe_name), ("made_dir", made_dir)):
    OmegaConf.register_new_resolver(_name, _fn, replace=True)
