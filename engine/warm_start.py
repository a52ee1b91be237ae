"""Warm starts: ``model.init=PATH`` loads weights alone into a new run; the optimizer, the step and the RNG start
fresh. PATH is a checkpoint of this project (its EMA weights with ``model.init_ema=true``), a ``.safetensors`` file
(the safetensors library), or a torch state dict. ``model.init_skip`` holds key patterns (fnmatch, as in
``head.*``) left as the model initialised them, e.g. a classifier whose class count changed.

The match is checked before any run dir exists (engine/cli.py), against the model built on the meta device: a key of
the file that the model lacks, or a shape that differs, is one line unless a pattern skips it. Keys of the model that
the file lacks stay initialised and are counted."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from .errors import ConfigError

WRAPPERS = ("module.", "_orig_mod.")  # DDP's and torch.compile's prefixes: the keys of the unwrapped model


def read_weights(path: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of PATH by key, on the CPU, without wrapper prefixes."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.init={path} is not a file: give a checkpoint of this project (checkpoints/last.pt), "
                          f"a .safetensors file or a torch state dict")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            weights = load_file(str(file))
        else:
            weights = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"model.init={path} cannot be read ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if isinstance(weights, dict) and "model" in weights and isinstance(weights["model"], dict):  # a checkpoint of ours
        if ema:
            if weights.get("ema") is None:
                raise ConfigError(f"model.init_ema=true, but model.init={path} holds no EMA weights "
                                  f"(its run had ema.enabled=false)")
            weights = {k: v for k, v in weights["ema"].items() if k != "n_averaged"}  # AveragedModel's own counter
        else:
            weights = weights["model"]
    elif ema:
        raise ConfigError(f"model.init_ema=true needs a checkpoint of this project; model.init={path} is a plain "
                          f"set of weights")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"model.init={path} is not a state dict (a mapping of names to tensors)")
    return {_unwrapped(k): v for k, v in weights.items()}


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPERS):
        key = key.split(".", 1)[1]
    return key


@dataclass
class Match:
    loaded: list[str]
    skipped: list[str]  # in the file, left out by model.init_skip
    kept: list[str]     # in the model, not in the file (or skipped): as the model initialised them

    def describe(self, path: str) -> str:
        return (f"      warm start: {len(self.loaded)} tensors loaded from {path}, {len(self.skipped)} skipped "
                f"(model.init_skip), {len(self.kept)} left as initialised")


def match(model_shapes: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], skip: list[str],
          path: str) -> Match:
    """Which keys load; a key the model lacks or a shape that differs, not skipped, is a ConfigError."""
    def skipped(key: str) -> bool:
        return any(fnmatchcase(key, pattern) for pattern in skip)

    loaded, left_out = [], []
    for key, tensor in weights.items():
        if skipped(key):
            left_out.append(key)
        elif key not in model_shapes:
            raise ConfigError(f"model.init={path}: its tensor {key} is not in the model; model.init_skip=[PATTERN,...] "
                              f"leaves keys out")
        elif tuple(tensor.shape) != model_shapes[key]:
            raise ConfigError(f"model.init={path}: {key} has shape {list(tensor.shape)} there and "
                              f"{list(model_shapes[key])} in the model; model.init_skip=['{key}'] leaves it initialised")
        else:
            loaded.append(key)
    return Match(loaded, left_out, [k for k in model_shapes if k not in set(loaded)])


def check_init(cfg_model, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """The preflight's check: PATH reads, and its keys and shapes fit the model (built on the meta device)."""
    if cfg_model.init is not None:
        match(model_shapes, read_weights(cfg_model.init, cfg_model.init_ema), cfg_model.init_skip, cfg_model.init)


def warm_start(model: torch.nn.Module, cfg_model) -> Match:
    """Copies the matched tensors of model.init into ``model`` (before the optimizer and the EMA are built)."""
    weights = read_weights(cfg_model.init, cfg_model.init_ema)
    state = model.state_dict()
    found = match({k: tuple(v.shape) for k, v in state.items()}, weights, cfg_model.init_skip, cfg_model.init)
    with torch.no_grad():
        for key in found.loaded:
            state[key].copy_(weights[key])
    return found
