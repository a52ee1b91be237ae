"""Batch-size scaling rules: the learning rate (and for adam_sde also Adam's betas and eps) at a global batch
``batch`` from hyperparameters tuned at ``ref_batch``, with kappa = batch / ref_batch.

- ``none``:     lr
- ``linear``:   lr * kappa                  Goyal et al. 2017 (arXiv 1706.02677), for SGD
- ``sqrt``:     lr * sqrt(kappa)            Krizhevsky 2014 (1404.5997), Hoffer et al. 2017; LAMB's BERT runs
- ``adam_sde``: lr * sqrt(kappa), beta_i <- 1 - kappa * (1 - beta_i), eps <- eps / sqrt(kappa)
                Malladi et al. 2022 (arXiv 2205.10287), the SDE scaling rule for Adam/RMSprop. It only exists while
                kappa * (1 - beta_i) < 1; beyond that the rule gives a negative beta and we refuse.
"""
from __future__ import annotations

import math

RULES = ("none", "linear", "sqrt", "adam_sde")


def lr_multiplier(rule: str, batch: int, ref_batch: int) -> float:
    """The factor the base LR is multiplied by at global batch ``batch``."""
    if rule not in RULES:
        raise ValueError(f"scaling rule must be one of {RULES}, got {rule!r}")
    if batch <= 0 or ref_batch <= 0:
        raise ValueError(f"batch and ref_batch must be positive, got batch={batch}, ref_batch={ref_batch}")
    kappa = batch / ref_batch
    return {"none": 1.0, "linear": kappa}.get(rule, math.sqrt(kappa))


def scale_adam(betas: tuple[float, float], eps: float, batch: int, ref_batch: int) -> tuple[tuple[float, float], float]:
    """Malladi et al.'s adam_sde rescaling of (beta1, beta2) and eps for kappa = batch / ref_batch."""
    kappa = batch / ref_batch
    scaled = tuple(1 - kappa * (1 - b) for b in betas)
    for name, b, s in zip(("beta1", "beta2"), betas, scaled):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"scaling=adam_sde: {name}={b} at kappa=batch/ref_batch={kappa:g} becomes {s:g}, "
                             f"outside [0, 1); the rule holds only for kappa < 1/(1-{name}) = {1 / (1 - b):g}")
    return scaled, eps / math.sqrt(kappa)
