"""Global-batch schedules: the batch as a function of training progress, like the LR.

Progress is measured in images seen (never in steps: a step's size changes with the batch), so a ramp or a
milestone means the same point of training at any batch. ``BatchSchedule.at(images)`` is the global batch of the
optimizer step that starts after ``images`` training images.

  constant  batch                                                       (the default; today's behaviour)
  ramp      start, start + increment, ..., batch: Megatron-LM's --rampup-batch-size. The ramp's images are split
            into equal stages, one per batch size below the target; from ``ramp_images`` on, the target batch.
  step      min(start * factor ** j, batch), j = milestones passed (Smith, Kindermans, Ying, Le 2018, arXiv
            1711.00489: increase the batch instead of decaying the LR). Where the cap stops the batch from growing,
            the LR takes the rest of the factor (``lr_residual``): Smith et al.'s "hybrid" schedule.
  adaptive  decided from measurement every ``every`` steps: B = clamp(k * B_simple, start, batch), rounded down to
            a multiple of ``multiple`` (McCandlish et al. 2018, arXiv 1812.06162: the critical batch is about the
            gradient noise scale B_noise, of which B_simple is the estimate). ``at`` is not defined for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

BATCH_SCHEDULES = ("constant", "ramp", "step", "adaptive")


@dataclass(frozen=True)
class BatchSchedule:
    kind: str
    batch: int                       # the target (largest) global batch
    start: int | None = None         # the first batch (ramp, step, adaptive)
    ramp_images: int = 0             # ramp: images over which the batch rises
    increment: int | None = None     # ramp: batch increment per stage
    factor: float = 2.0              # step: batch multiplier at each milestone
    milestones: tuple[int, ...] = field(default_factory=tuple)  # step: in images
    k: float = 1.0                   # adaptive: B = k * B_simple
    every: int = 1                   # adaptive: decide every N optimizer steps
    multiple: int = 1                # adaptive: every batch is a multiple of this

    def __post_init__(self):
        if self.kind not in BATCH_SCHEDULES:
            raise ValueError(f"batch_schedule must be one of {BATCH_SCHEDULES}, got {self.kind!r}")
        if self.kind == "constant":
            return
        start = self.start
        if start is None or not 0 < start <= self.batch:
            raise ValueError(f"batch_schedule.start={start} must lie in 1..batch ({self.batch})")
        if self.kind == "ramp":
            if self.increment is None or self.increment < 1 or (self.batch - start) % self.increment:
                raise ValueError(f"batch_schedule.increment={self.increment} must be >= 1 and divide batch - start "
                                 f"= {self.batch - start} (a ramp of equal increments, as Megatron-LM's)")
            if self.ramp_images < 0:
                raise ValueError(f"batch_schedule ramp length {self.ramp_images} images must be >= 0")
        if self.kind == "step":
            if not self.factor > 1:
                raise ValueError(f"batch_schedule.factor={self.factor} must be > 1 (the batch grows at each "
                                 f"milestone)")
            for j in range(len(self.milestones) + 1):
                b = start * self.factor ** j
                if b < self.batch and abs(b - round(b)) > 1e-9:
                    raise ValueError(f"batch_schedule: start {start} x factor {self.factor:g}^{j} = {b:g} is not a "
                                     f"whole batch: choose a start and factor whose products are integers")
        if self.kind == "adaptive":
            if self.multiple < 1 or start % self.multiple or self.batch % self.multiple:
                raise ValueError(f"batch_schedule.multiple={self.multiple} must divide batch_schedule.start={start} "
                                 f"and batch={self.batch}")
            if not self.k > 0 or self.every < 1:
                raise ValueError(f"batch_schedule: k={self.k} must be > 0 and every={self.every} >= 1")

    @property
    def varies(self) -> bool:
        return self.kind != "constant" and self.start != self.batch

    @property
    def measured(self) -> bool:
        """Whether the batch is decided from gradients measured while training (so it cannot be known ahead)."""
        return self.kind == "adaptive"

    def next(self, images: int, decided: int | None) -> int:
        """The global batch of the step after ``images`` images (adaptive: the last decision, or ``start``)."""
        return (decided or self.start) if self.measured else self.at(images)

    def decides_after(self, step: int) -> bool:
        """adaptive: whether the batch is decided again after optimizer step ``step``."""
        return self.measured and step % self.every == 0

    def describe(self, lr_follows: str, probe_images: int) -> str:
        """The plan's line for this schedule ('' when the batch is constant)."""
        if self.kind == "ramp" and self.varies:
            stages = (self.batch - self.start) // self.increment
            return (f"batch ramp: {self.start:,} -> {self.batch:,} in {stages:,} stage{'s' * (stages != 1)} of "
                    f"+{self.increment:,} over {self.ramp_images:,} images; the LR follows {lr_follows}")
        if self.kind == "step" and self.varies:
            sizes = [self.at(m) for m in self.milestones]
            rest = self.lr_residual(self.milestones[-1]) if self.milestones else 1.0
            return (f"batch steps (Smith et al.): {self.start:,} x{self.factor:g} at images "
                    f"{', '.join(f'{m:,}' for m in self.milestones)} -> {', '.join(f'{x:,}' for x in sizes)}; the LR "
                    f"is not rescaled" + (f", and decays x{rest:.4g} where the cap {self.batch:,} stops the batch"
                                          if rest < 1 else ""))
        if self.kind == "adaptive":
            return (f"adaptive batch: clamp({self.k:g} x B_simple, {self.start:,}, {self.batch:,}) in multiples of "
                    f"{self.multiple:,}, decided every {self.every:,} step{'s' * (self.every != 1)} from a probe of "
                    f"{probe_images} images per rank; the LR follows {lr_follows}")
        return ""

    def sizes(self) -> list[int]:
        """Every batch the schedule can use (adaptive: the smallest and largest and each multiple between)."""
        if self.kind == "constant":
            return [self.batch]
        if self.kind == "ramp":
            return list(range(self.start, self.batch + 1, self.increment))
        if self.kind == "step":
            return sorted({self._step_batch(j) for j in range(len(self.milestones) + 1)})
        return list(range(self.start, self.batch + 1, self.multiple))

    def at(self, images: int) -> int:
        """The global batch of the step that starts after ``images`` training images (not for adaptive)."""
        if self.kind == "constant":
            return self.batch
        if self.kind == "ramp":
            stages = (self.batch - self.start) // self.increment
            if stages == 0 or images >= self.ramp_images:
                return self.batch
            per_stage = self.ramp_images / stages
            return self.start + int(images // per_stage) * self.increment
        if self.kind == "step":
            return self._step_batch(self._passed(images))
        raise ValueError("batch_schedule=adaptive is decided from measurements; use decide()")

    def lr_residual(self, images: int) -> float:
        """step: the LR factor for milestones whose batch growth the cap stopped (1 where the batch grew)."""
        if self.kind != "step":
            return 1.0
        j = self._passed(images)
        return self._step_batch(j) / (self.start * self.factor ** j)

    def decide(self, b_simple: float, current: int) -> int:
        """adaptive: the next batch from the measured noise scale (unchanged while there is no estimate)."""
        if not math.isfinite(b_simple) or b_simple <= 0:
            return current
        target = int(self.k * b_simple // self.multiple) * self.multiple
        return min(max(target, self.start), self.batch)

    def _passed(self, images: int) -> int:
        return sum(images >= m for m in self.milestones)

    def _step_batch(self, j: int) -> int:
        return min(int(round(self.start * self.factor ** j)), self.batch)
