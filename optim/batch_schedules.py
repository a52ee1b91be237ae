"""Global-batch schedules: the batch as a function of training progress, like the LR. One class per kind.

Progress is measured in images seen (never in steps: a step's size changes with the batch), so a ramp or a
milestone means the same point of training at any batch. ``at(images)`` is the global batch of the optimizer step
that starts after ``images`` training images.

  constant  batch                                                       (the default)
  ramp      start, start + increment, ..., batch: Megatron-LM's --rampup-batch-size. The ramp's images are split
            into equal stages, one per batch size below the target; from ``ramp_images`` on, the target batch.
  step      min(start * factor ** j, batch), j = milestones passed (Smith, Kindermans, Ying, Le 2018, arXiv
            1711.00489: increase the batch instead of decaying the LR). The LR keeps the start batch's scaling, and
            where the cap stops the batch from growing, the LR takes the rest of the factor (``lr_residual``): Smith
            et al.'s "hybrid" schedule.
  adaptive  decided from measurement every ``every`` steps: B = clamp(k * B_simple, start, batch), rounded down to
            a multiple of ``multiple`` (McCandlish et al. 2018, arXiv 1812.06162: the critical batch is about the
            gradient noise scale B_noise, of which B_simple is the estimate). ``at`` is not defined for it.

Adding a kind is a subclass here, registered in ``BATCH_SCHEDULES`` under its config name, that builds itself from
its config group (``from_config``) and says its sizes, its batch at each point and its plan line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchSchedule:
    batch: int                       # the target (largest) global batch
    start: int | None = None         # the first batch (every kind but constant)

    measured = False        # decided from gradients measured while training (so it cannot be known ahead)
    scales_lr = True        # the LR follows the scaling rule at the current batch (step: only at its start)
    needs_start = True

    def __post_init__(self):
        if self.start is not None and not 0 < self.start <= self.batch or self.start is None and self.needs_start:
            raise ValueError(f"batch_schedule.start={self.start} must lie in 1..batch ({self.batch})")

    @classmethod
    def from_config(cls, group, batch: int, total_images: int, train_size: int) -> BatchSchedule:
        """From the config group ``batch_schedule`` (its settings as attributes), the target batch, the run's image
        budget and the training-set size."""
        return cls(batch=batch, start=group.start)

    @property
    def first(self) -> int:
        return self.batch if self.start is None else self.start

    @property
    def varies(self) -> bool:
        return self.first != self.batch

    @property
    def lr_batch(self) -> int:
        """The batch whose scaling sets the peak LR: the target (step: its start, as Smith et al.'s)."""
        return self.batch

    def sizes(self) -> list[int]:
        """Every batch the schedule can use."""
        raise NotImplementedError(f"{type(self).__name__} does not say its sizes")

    def at(self, images: int) -> int:
        """The global batch of the step that starts after ``images`` training images."""
        raise NotImplementedError(f"{type(self).__name__} does not say its batch at each point")

    def next(self, images: int, decided: int | None) -> int:
        """The global batch of the step after ``images`` images (adaptive: the last decision, or ``start``)."""
        return self.at(images)

    def lr_residual(self, images: int) -> float:
        """The LR factor this schedule adds at ``images`` (1 but where step's cap stops the batch)."""
        return 1.0

    def decides_after(self, step: int) -> bool:
        """Whether the batch is decided again after optimizer step ``step`` (adaptive only)."""
        return False

    def describe(self, lr_follows: str, probe_images: int) -> str:
        """The plan's line for this schedule."""
        raise NotImplementedError(f"{type(self).__name__} does not write its plan line")


@dataclass(frozen=True)
class ConstantBatch(BatchSchedule):
    needs_start = False

    @classmethod
    def from_config(cls, group, batch, total_images, train_size):
        return cls(batch=batch)

    def sizes(self):
        return [self.batch]

    def at(self, images):
        return self.batch

    def describe(self, lr_follows, probe_images):
        return ""


@dataclass(frozen=True)
class RampBatch(BatchSchedule):
    ramp_images: int = 0             # images over which the batch rises
    increment: int | None = None     # batch increment per stage

    def __post_init__(self):
        super().__post_init__()
        if self.increment is None or self.increment < 1 or (self.batch - self.first) % self.increment:
            raise ValueError(f"batch_schedule.increment={self.increment} must be >= 1 and divide batch - start "
                             f"= {self.batch - self.first} (a ramp of equal increments, as Megatron-LM's)")
        if self.ramp_images < 0:
            raise ValueError(f"batch_schedule ramp length {self.ramp_images} images must be >= 0")

    @classmethod
    def from_config(cls, group, batch, total_images, train_size):
        return cls(batch=batch, start=group.start, increment=group.increment or group.start,
                   ramp_images=int(round((group.epochs or 0.0) * train_size)))

    def sizes(self):
        return list(range(self.first, self.batch + 1, self.increment))

    def at(self, images):
        stages = (self.batch - self.first) // self.increment
        if stages == 0 or images >= self.ramp_images:
            return self.batch
        return self.first + int(images // (self.ramp_images / stages)) * self.increment

    def describe(self, lr_follows, probe_images):
        if not self.varies:
            return ""
        stages = (self.batch - self.first) // self.increment
        return (f"batch ramp: {self.first:,} -> {self.batch:,} in {stages:,} stage{'s' * (stages != 1)} of "
                f"+{self.increment:,} over {self.ramp_images:,} images; the LR follows {lr_follows}")


@dataclass(frozen=True)
class StepBatch(BatchSchedule):
    factor: float = 2.0              # batch multiplier at each milestone
    milestones: tuple[int, ...] = field(default_factory=tuple)  # in images

    scales_lr = False  # the batch increase replaces the decay: the LR is the start batch's

    def __post_init__(self):
        super().__post_init__()
        if not self.factor > 1:
            raise ValueError(f"batch_schedule.factor={self.factor} must be > 1 (the batch grows at each milestone)")
        for j in range(len(self.milestones) + 1):
            b = self.first * self.factor ** j
            if b < self.batch and abs(b - round(b)) > 1e-9:
                raise ValueError(f"batch_schedule: start {self.first} x factor {self.factor:g}^{j} = {b:g} is not a "
                                 f"whole batch: choose a start and factor whose products are integers")

    @classmethod
    def from_config(cls, group, batch, total_images, train_size):
        return cls(batch=batch, start=group.start, factor=group.factor,
                   milestones=tuple(int(round(f * total_images)) for f in group.milestones or ()))

    @property
    def lr_batch(self):
        return self.first

    def sizes(self):
        return sorted({self._batch(j) for j in range(len(self.milestones) + 1)})

    def at(self, images):
        return self._batch(self._passed(images))

    def lr_residual(self, images):
        j = self._passed(images)
        return self._batch(j) / (self.first * self.factor ** j)

    def describe(self, lr_follows, probe_images):
        if not self.varies:
            return ""
        sizes = [self.at(m) for m in self.milestones]
        rest = self.lr_residual(self.milestones[-1]) if self.milestones else 1.0
        return (f"batch steps (Smith et al.): {self.first:,} x{self.factor:g} at images "
                f"{', '.join(f'{m:,}' for m in self.milestones)} -> {', '.join(f'{x:,}' for x in sizes)}; the LR "
                f"is not rescaled" + (f", and decays x{rest:.4g} where the cap {self.batch:,} stops the batch"
                                      if rest < 1 else ""))

    def _passed(self, images: int) -> int:
        return sum(images >= m for m in self.milestones)

    def _batch(self, j: int) -> int:
        return min(int(round(self.first * self.factor ** j)), self.batch)


@dataclass(frozen=True)
class AdaptiveBatch(BatchSchedule):
    k: float = 1.0                   # B = k * B_simple
    every: int = 1                   # decide every N optimizer steps
    multiple: int = 1                # every batch is a multiple of this
    probe: int | None = None         # images per rank in the small-batch gradient (checked by the plan)

    measured = True

    def __post_init__(self):
        super().__post_init__()
        if self.multiple < 1 or self.first % self.multiple or self.batch % self.multiple:
            raise ValueError(f"batch_schedule.multiple={self.multiple} must divide batch_schedule.start={self.first} "
                             f"and batch={self.batch}")
        if not self.k > 0 or self.every < 1:
            raise ValueError(f"batch_schedule: k={self.k} must be > 0 and every={self.every} >= 1")

    @classmethod
    def from_config(cls, group, batch, total_images, train_size):
        return cls(batch=batch, start=group.start, k=group.k, every=group.every, multiple=group.multiple,
                   probe=group.probe)

    def sizes(self):
        """The smallest and largest and each multiple between."""
        return list(range(self.first, self.batch + 1, self.multiple))

    def at(self, images):
        raise ValueError("batch_schedule=adaptive is decided from measurements; use decide()")

    def next(self, images, decided):
        return decided or self.first

    def decides_after(self, step):
        return step % self.every == 0

    def decide(self, b_simple: float, current: int) -> int:
        """The next batch from the measured noise scale (unchanged while there is no estimate)."""
        if not math.isfinite(b_simple) or b_simple <= 0:
            return current
        target = int(self.k * b_simple // self.multiple) * self.multiple
        return min(max(target, self.first), self.batch)

    def describe(self, lr_follows, probe_images):
        return (f"adaptive batch: clamp({self.k:g} x B_simple, {self.first:,}, {self.batch:,}) in multiples of "
                f"{self.multiple:,}, decided every {self.every:,} step{'s' * (self.every != 1)} from a probe of "
                f"{probe_images} images per rank; the LR follows {lr_follows}")


# the config name of each kind (conf/batch_schedule/NAME.yaml; a test keeps the two equal)
BATCH_SCHEDULES = {"constant": ConstantBatch, "ramp": RampBatch, "step": StepBatch, "adaptive": AdaptiveBatch}
