"""Learning-rate schedules as pure functions of the optimizer step.

``LRSchedule(...)(step)`` is the learning rate used by optimizer step ``step`` (0-based: step 0 is the first
update). Every length is in optimizer steps, never micro-batches, and nothing is stateful, so a resumed run
continues the curve exactly from its saved step and the preview script shows exactly what training uses.

Warmup shapes for t < W (W = warmup_steps, peak = peak LR). A ramp that
starts at 0 (cosine; linear with start_factor 0; inverse_sqrt) is evaluated at t + 1 for step t, so no optimizer
step is wasted at LR 0 and the last warmup step reaches the peak (as the common LambdaLR inverse-sqrt code does):
  none         -
  constant     factor * peak                          (Goyal et al.: hurts at 8k; kept for comparison)
  linear       peak * (s + (1 - s) * t / W)           (s = start_factor; torch LinearLR; s = 1/k is Goyal's
                                                       gradual warmup from the small-batch LR)
  exponential  peak * exp((t / W - 1) * log r)        (starts at peak / r)
  cosine       peak * (1 - cos(pi * t / W)) / 2
Decays for t >= W, with progress p = (t - W) / (T - W) in [0, 1), T = total_steps, f = min_factor:
  constant     peak
  cosine       peak * (f + (1 - f) * (1 + cos(pi * p)) / 2)        (torch CosineAnnealingLR, eta_min = f * peak)
  step         peak * gamma ** (number of milestones <= t)          (milestones in absolute steps)
  poly         peak * (f + (1 - f) * (1 - p) ** power)             (LARS / MLPerf use power 2)
Schedules that carry their own ramp (the warmup shape is not applied):
  inverse_sqrt with u = t + 1: u <= W: u / W; u > W: sqrt(W / u)  (the Transformer's LambdaLR rule)
  onecycle     torch.optim.lr_scheduler.OneCycleLR (cosine anneal): peak/div_factor -> peak over pct_start * T,
               then -> peak / (div_factor * final_div_factor); with cycle_momentum, momentum (beta1 for Adam)
               goes max_momentum -> base_momentum -> max_momentum inversely to the LR, as torch's
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Warmup shapes: x = t / W in [0, 1) -> the LR as a fraction of the peak. Adding a warmup is an entry here and a
# conf/warmup/NAME.yaml (a test keeps the two lists equal).
WARMUP_SHAPES = {
    "constant": lambda s, x: s.constant_factor,
    "linear": lambda s, x: s.start_factor + (1 - s.start_factor) * x,
    "exponential": lambda s, x: math.exp((x - 1) * math.log(s.exp_ratio)),
    "cosine": lambda s, x: (1 - math.cos(math.pi * x)) / 2,
}
WARMUPS = ("none", *WARMUP_SHAPES)
DECAYS = ("constant", "cosine", "step", "poly", "inverse_sqrt", "onecycle")
OWN_RAMP = ("inverse_sqrt", "onecycle")


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup: str = "none"
    warmup_steps: int = 0
    start_factor: float = 0.0      # linear warmup: LR at t=0 as a fraction of peak
    constant_factor: float = 0.1   # constant warmup: the flat fraction of peak
    exp_ratio: float = 100.0       # exponential warmup: r, the LR starts at peak / r
    decay: str = "cosine"
    min_factor: float = 0.0        # cosine / poly floor as a fraction of peak
    milestones: tuple[int, ...] = field(default_factory=tuple)  # step decay, absolute optimizer steps
    gamma: float = 0.1
    power: float = 2.0
    pct_start: float = 0.3         # onecycle
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = False   # onecycle: momentum (or Adam's beta1) moves inversely to the LR, as torch's
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self):
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {self.warmup!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"schedule must be one of {DECAYS}, got {self.decay!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0 or (self.warmup_steps >= self.total_steps and self.uses_warmup):
            raise ValueError(f"warmup of {self.warmup_steps} steps must be shorter than the run "
                             f"({self.total_steps} steps)")
        if self.decay == "inverse_sqrt" and self.warmup_steps < 1:
            raise ValueError("schedule inverse_sqrt needs warmup steps >= 1 (its ramp length)")
        if self.decay == "onecycle":
            up = self.pct_start * self.total_steps - 1  # torch OneCycleLR's phase boundaries
            if not 1 <= up < self.total_steps - 1:
                raise ValueError(f"schedule=onecycle: pct_start={self.pct_start} of {self.total_steps} steps leaves "
                                 f"{max(up, 0):g} steps to ramp up and {self.total_steps - 1 - max(up, 0):g} to "
                                 f"anneal; each needs at least 1: change pct_start or lengthen the run")
        if self.decay == "step" and any(not 0 < m < self.total_steps for m in self.milestones):
            raise ValueError(f"schedule=step: milestones {list(self.milestones)} (in steps) must lie inside the run "
                             f"(1..{self.total_steps - 1}): move them, or lengthen the run")

    @property
    def uses_warmup(self) -> bool:
        """Whether the warmup group applies (inverse_sqrt uses only its length, onecycle neither)."""
        return self.warmup != "none" and self.decay not in OWN_RAMP and self.warmup_steps > 0

    @property
    def ramp_steps(self) -> int:
        """Where the LR first reaches its peak (for plots and the start-up plan)."""
        if self.decay == "onecycle":
            return int(self.pct_start * self.total_steps)
        if self.decay == "inverse_sqrt" or self.uses_warmup:
            return self.warmup_steps
        return 0

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def factor(self, t: int) -> float:
        """LR at optimizer step t as a fraction of the peak LR."""
        W, T = self.warmup_steps, self.total_steps
        if self.decay == "onecycle":
            return self._onecycle(t)
        if self.decay == "inverse_sqrt":  # a ramp from 0: evaluated at t + 1, so step 0 is not wasted at LR 0
            return (t + 1) / W if t + 1 <= W else math.sqrt(W / (t + 1))
        if self.uses_warmup and t < W:
            starts_at_zero = self._warmup(0.0) == 0.0
            return self._warmup((t + 1 if starts_at_zero else t) / W)
        if self.decay == "step":
            return self.gamma ** sum(t >= m for m in self.milestones)
        p = min(max(t - W if self.uses_warmup else t, 0) / max(T - (W if self.uses_warmup else 0), 1), 1.0)
        f = self.min_factor
        if self.decay == "cosine":
            return f + (1 - f) * (1 + math.cos(math.pi * p)) / 2
        if self.decay == "poly":
            return f + (1 - f) * (1 - p) ** self.power
        return 1.0  # constant

    def _warmup(self, x: float) -> float:
        return WARMUP_SHAPES[self.warmup](self, x)

    def _onecycle_phase(self, t: int) -> tuple[bool, float]:
        """(rising?, progress through the phase) at step t, with torch OneCycleLR's phase boundaries."""
        end_up = float(self.pct_start * self.total_steps) - 1
        end_down = self.total_steps - 1
        if t <= end_up:
            return True, t / end_up
        return False, (t - end_up) / (end_down - end_up)

    @staticmethod
    def _cos_anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * min(pct, 1.0)) + 1)

    def _onecycle(self, t: int) -> float:
        initial = 1 / self.div_factor
        final = initial / self.final_div_factor
        rising, pct = self._onecycle_phase(t)
        return self._cos_anneal(initial, 1.0, pct) if rising else self._cos_anneal(1.0, final, pct)

    def momentum(self, t: int) -> float | None:
        """The momentum (SGD, LARS) or beta1 (Adam, LAMB) for step t where the schedule cycles it, else None."""
        if self.decay != "onecycle" or not self.cycle_momentum:
            return None
        rising, pct = self._onecycle_phase(t)
        lo, hi = self.base_momentum, self.max_momentum
        return self._cos_anneal(hi, lo, pct) if rising else self._cos_anneal(lo, hi, pct)

    def state_dict(self) -> dict:
        """The schedule's parameters; the LR itself is a function of the step saved beside it."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def apply_lr(optimizer, lr: float, momentum: float | None = None) -> None:
    """Set the LR of every param group (a group may scale it with its own ``lr_scale``, default 1), and the
    momentum where the schedule cycles it: ``momentum`` for SGD/LARS, ``betas[0]`` for Adam/LAMB."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum
