"""Checkpoints written atomically: a temporary file in the same folder, fsync, then rename over the old one.

A kill at any moment leaves either the previous complete ``last.pt`` or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from .config import ConfigError


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ConfigError(f"resume={path}: no such checkpoint file") from None
    except Exception as e:
        raise ConfigError(f"resume={path}: not a readable checkpoint ({type(e).__name__}); use a checkpoints/last.pt "
                          f"written by train.py") from None
    missing = {"model", "optimizer", "step", "epoch"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ConfigError(f"resume={path}: checkpoint lacks {sorted(missing)}; use a checkpoints/last.pt written by "
                          f"train.py")
    return ckpt
