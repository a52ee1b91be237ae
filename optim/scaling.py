"""Batch-size scaling rules: the learning rate (and for adam_sde also Adam's betas and eps) at a global batch
``batch`` from hyperparameters tuned at ``ref_batch``, with kappa = batch / ref_batch.

- ``none``:     lr
- ``linear``:   lr * kappa                  Goyal et al. 2017 (arXiv 1706.02677), for SGD
- ``sqrt``:     lr * sqrt(kappa)            Krizhevsky 2014 (1404.5997), Hoffer et al. 2017; LAMB's BERT runs
- ``adam_sde``: lr * sqrt(kappa), beta_i <- 1 - kappa * (1 - beta_i), eps <- eps / sqrt(kappa)
                Malladi et al. 2022 (arXiv 2205.10287), the SDE scaling rule for Adam/RMSprop. It only exists while
                kappa * (1 - beta_i) < 1; beyond that the rule gives a negative beta and we refuse.
- ``adascale``: lr * r_t, the AdaScale gain (Johnson, Agrawal, Gu, Guestrin 2020, arXiv 2007.05105, Algorithm 1),
                measured every step; the schedule is the reference run's, evaluated at the scale-invariant
                iteration tau, which advances by r_t per step. ``lr_multiplier`` is 1 for it: the gain is not a
                function of the batch alone.
"""
from __future__ import annotations

import math

# each rule's LR factor as a function of kappa = batch / ref_batch (conf/scaling/NAME.yaml; a test keeps the two equal)
RULES = {"none": lambda kappa: 1.0, "linear": lambda kappa: kappa, "sqrt": math.sqrt, "adam_sde": math.sqrt,
         "adascale": lambda kappa: 1.0}
UNSCALED = ("none",)           # the rule that leaves the LR as tuned
RESCALES_ADAM = ("adam_sde",)  # rules that also rescale Adam's betas and eps (scale_adam)
MEASURES_GAIN = ("adascale",)  # rules whose LR factor is measured each step (adascale_gain), not a function of kappa


def lr_multiplier(rule: str, batch: int, ref_batch: int) -> float:
    """The factor the base LR is multiplied by at global batch ``batch``."""
    if rule not in RULES:
        raise ValueError(f"scaling rule must be one of {tuple(RULES)}, got {rule!r}")
    if batch <= 0 or ref_batch <= 0:
        raise ValueError(f"batch and ref_batch must be positive, got batch={batch}, ref_batch={ref_batch}")
    return RULES[rule](batch / ref_batch)


def adascale_gain(grad_sq: float, trace: float, batch: int, ref_batch: int) -> float:
    """AdaScale's gain r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) at S = batch / ref_batch, where
    sigma^2 = tr(Sigma) / ref_batch is the variance of a reference-batch gradient and mu^2 = |G|^2 (both from the
    noise-scale estimators). r lies in [1, S]: 1 where the gradient is all signal (a bigger batch buys nothing),
    S where it is all noise (the linear rule). Negative estimates (they are unbiased, so noisy) are clamped."""
    scale = batch / ref_batch
    if scale <= 1:
        return 1.0
    sigma_sq, mu_sq = max(trace, 0.0) / ref_batch, max(grad_sq, 0.0)
    if sigma_sq + mu_sq == 0 or not math.isfinite(sigma_sq + mu_sq):
        return 1.0
    return min(max((sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq), 1.0), scale)


def scale_adam(betas: tuple[float, float], eps: float, batch: int, ref_batch: int) -> tuple[tuple[float, float], float]:
    """Malladi et al.'s adam_sde rescaling of (beta1, beta2) and eps for kappa = batch / ref_batch."""
    kappa = batch / ref_batch
    scaled = tuple(1 - kappa * (1 - b) for b in betas)
    for name, b, s in zip(("beta1", "beta2"), betas, scaled):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"scaling=adam_sde: {name}={b} at kappa=batch/ref_batch={kappa:g} becomes {s:g}, "
                             f"outside [0, 1); the rule holds only for kappa < 1/(1-{name}) = {1 / (1 - b):g}")
    return scaled, eps / math.sqrt(kappa)
