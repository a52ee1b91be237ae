"""Build any of the four optimizers by name from plain keyword arguments (no Hydra here)."""
from __future__ import annotations

import torch

from .lamb import LAMB
from .lars import LARS

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")


def create_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9, nesterov: bool = False,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eta: float = 0.001,
                     trust_clip: bool = False, trust_bounds=None, variant: str = "paper", lr_in_momentum: bool = True,
                     bias_correction: bool = True) -> torch.optim.Optimizer:
    """``groups`` come from ``param_groups()`` and carry their own weight_decay (and ``adapt`` for LARS/LAMB)."""
    if name == "sgd":
        return torch.optim.SGD(_plain(groups), lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(_plain(groups), lr=lr, betas=tuple(betas), eps=eps)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta, eps=eps, nesterov=nesterov, trust_clip=trust_clip,
                    variant=variant, lr_in_momentum=lr_in_momentum)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=tuple(betas), eps=eps, bias_correction=bias_correction,
                    trust_bounds=tuple(trust_bounds) if trust_bounds is not None else None)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _plain(groups):
    """torch's optimizers do not know ``adapt``; drop it so their state_dict stays standard."""
    return [{k: v for k, v in g.items() if k != "adapt"} for g in groups]
