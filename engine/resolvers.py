"""The OmegaConf resolvers conf/ uses for run folders (config.yaml's hydra: section) and for the optuna study
(hparams_search/).

Registered once, when this module is first imported: by engine/cli.py (train.py's preflight) and engine/compose.py
(composition from Python), the two ways a config is composed.
"""
from __future__ import annotations

import hashlib
import urllib.parse
from pathlib import Path

from omegaconf import OmegaConf

from .distributed import env_rank
from .records import job_folder


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
    """A job folder name from its overrides, one folder whatever the values: characters other than letters, digits
    and ``_.-~=,+[]`` are %-escaped (``/`` is %2F), so two different override lists never share a name; a name too
    long for a file system keeps its first 180 characters and a hash of the whole."""
    name = urllib.parse.quote(text, safe="=,+[]")
    if len(name) > 200:
        name = f"{name[:180]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def made_dir(path: str) -> str:
    """The folder, created: the optuna study's sqlite file lives in the sweep folder, made first."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def trials_so_far(storage: str | None, study_name: str | None) -> int:
    """The number of trials an optuna study stored at ``storage`` holds (finished, failed or interrupted); 0 for a
    new one."""
    if not storage or not study_name:
        return 0
    import optuna  # here: Hydra imports every plugin module at each start, and optuna warns on import
    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # optuna's answer for a study that is not stored yet
        return 0


def continued_seed(seed: int, storage: str | None, study_name: str | None) -> int:
    """The sampler's seed plus the trials already stored: the same command again continues the search with new
    proposals instead of repeating the first command's."""
    return int(seed) + trials_so_far(storage, study_name)


def gpus_here() -> int:
    """1 where this machine sees a GPU, else 0: a Ray job's default num_gpus (conf/hydra/launcher/ray.yaml)."""
    import torch
    return int(torch.cuda.is_available())


for _name, _fn in (("resume_subdir", resume_subdir), ("safe_name", safe_name), ("made_dir", made_dir),
                   ("continued_seed", continued_seed), ("job_folder", job_folder),
                   ("gpus_here", gpus_here)):
    OmegaConf.register_new_resolver(_name, _fn, replace=True)
