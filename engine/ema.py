"""An exponential moving average of the weights, from torch's own ``swa_utils`` (``AveragedModel`` with
``get_ema_multi_avg_fn``; buffers averaged too, so BatchNorm statistics follow the averaged weights).

Decay as torchvision's classification reference sets it (references/classification/train.py): the average is
updated every ``every_steps`` optimizer steps, with ``alpha = min(1, (1 - decay) * batch * every_steps / epochs)``
and decay ``1 - alpha``, so one setting means the same averaging horizon at any batch and run length; during the
LR warmup the average is reset to the current weights at each update (torchvision resets it for the warmup epochs).
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import unwrap


def make_ema(model: torch.nn.Module, cfg, plan) -> AveragedModel | None:
    if not cfg.ema.enabled:
        return None
    alpha = min(1.0, (1 - cfg.ema.decay) * plan.global_batch * cfg.ema.every_steps / cfg.epochs)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - alpha), use_buffers=True)
    ema.decay = 1 - alpha  # for the plan line and the record
    return ema


def update_ema(ema: AveragedModel | None, model: torch.nn.Module, step: int, cfg, plan, position: float | None = None
               ) -> None:
    """After optimizer step ``step`` (1-based count of steps done); ``position`` is where the LR schedule stands
    (the step, unless a batch schedule counts progress in images)."""
    if ema is None or step % cfg.ema.every_steps:
        return
    if (step if position is None else position) <= plan.warmup_steps:
        ema.n_averaged.zero_()  # the next update copies the weights: no averaging across the warmup
    ema.update_parameters(unwrap(model))
