"""The optimizer a config names: its class from `_target_`, its keywords after the scaling rule (adam_sde rescales
Adam's betas and eps), and a trial construction whose own TypeError / ValueError becomes the one error line."""
from __future__ import annotations

import inspect
import re

import torch
from hydra.utils import get_class

from optim import RESCALES_ADAM, LayerwiseOptimizer, param_groups, scale_adam

from .errors import ConfigError


def optimizer_class(target: str) -> type:
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"optim._target_={target!r} is not an importable class: use an import path such as "
                          f"torch.optim.SGD or optim.LARS") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optim._target_={target!r} is not a torch.optim.Optimizer subclass")
    return cls


def scaled_kwargs(cls: type, kwargs: dict, rule: str, batch: int, ref_batch: int) -> tuple[dict, list[str]]:
    if rule not in RESCALES_ADAM:
        return kwargs, []
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    if "betas" not in kwargs and "betas" not in defaults:
        raise ConfigError(f"scaling={rule} rescales Adam's betas and eps, and {cls.__name__} has no betas: use "
                          f"another scaling rule")
    betas = tuple(kwargs.get("betas", defaults.get("betas")))
    eps = kwargs.get("eps", defaults.get("eps", 1e-8))
    try:
        (b1, b2), eps2 = scale_adam(betas, eps, batch, ref_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    note = f"{rule}: betas ({betas[0]:g}, {betas[1]:g}) -> ({b1:.6g}, {b2:.6g}), eps {eps:g} -> {eps2:.3g}"
    return {**kwargs, "betas": (b1, b2), "eps": eps2}, [note]


# Keywords many optimizer classes share, with the range outside which no run can work, for classes that do not
# check them themselves (torch's SGD and RMSprop take momentum=1.5: a buffer that never forgets, a step that grows).
SHARED_KEYWORD_RANGES = {"momentum": (0.0, 1.0), "dampening": (0.0, 1.0)}


def check_keyword_types(cls: type, kwargs: dict) -> None:
    """Each keyword has the type of the constructor's default (a class may not check it: torch's SGD trains with
    nesterov='maybe'): a bool takes true or false, a number a number, a tuple of numbers a list of them. An
    Adam-style class (one with betas) divides by sqrt(v) + eps, and v is 0 where a gradient is 0: eps > 0."""
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty and p.default is not None}
    for key, value in kwargs.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, tuple) and all(isinstance(d, (int, float)) for d in default):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in value)
            wanted = "a list of numbers"
        else:
            continue
        if not ok:
            raise ConfigError(f"optim.{key}={value} is invalid: {cls.__name__}'s {key} takes {wanted}")
    eps = kwargs.get("eps", defaults.get("eps"))
    if "betas" in defaults and isinstance(eps, (int, float)) and not eps > 0:
        raise ConfigError(f"optim.eps={eps:g} is invalid: {cls.__name__} divides by sqrt(v) + eps, and v is 0 where a "
                          f"gradient is 0 (0/0 = NaN at the first step): eps must be > 0")


def check_constructor(cls: type, kwargs: dict, target: str, lr: float, weight_decay: float) -> None:
    """Build the optimizer on a dummy parameter: its own TypeError / ValueError is the one line."""
    check_keyword_types(cls, kwargs)
    for key, (lo, hi) in SHARED_KEYWORD_RANGES.items():
        value = kwargs.get(key)
        if isinstance(value, (int, float)) and not lo <= value < hi:
            raise ConfigError(f"optim.{key}={value:g} is invalid: {key} must lie in [{lo:g}, {hi:g})")
    try:
        build_optimizer(torch.nn.Linear(2, 2), cls, kwargs, lr, weight_decay)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m:
            raise ConfigError(f"optim.{m.group(1)} is not a keyword of {target}: remove it or fix "
                              f"its spelling") from None
        raise ConfigError(f"optim: {cls.__name__} rejects its settings: {e}") from None
    except ValueError as e:
        raise ConfigError(f"optim: {cls.__name__} rejects its settings: {e}") from None


def build_optimizer(model: torch.nn.Module, cls: type, kwargs: dict, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """``cls`` over ``param_groups(model)``: decay and (LARS/LAMB) adaptation on ndim > 1 only."""
    groups = param_groups(model, weight_decay)
    if not issubclass(cls, LayerwiseOptimizer):
        groups = [{k: v for k, v in g.items() if k != "adapt"} for g in groups]  # torch's don't know it
    return cls(groups, lr=lr, **kwargs)
