"""Where a run is, and when it is done: one value the loop advances (`Progress`) and one `Clock` that reads it.

make_plan (engine/plan.py) chooses the clock once; everything that asks "where are we", "which epoch" or "are we
done" asks the plan's clock:
- `StepClock`: a constant batch; progress is the optimizer step, as in every paper's schedule;
- `ImageClock`: the batch changes (batch_schedule=ramp|step|adaptive); progress is images seen, in steps of the
  target batch, and the LR follows the batch by the scaling rule;
- `TauClock`: AdaScale (Johnson et al. 2020, arXiv 2007.05105); progress is the scale-invariant iteration tau, the
  sum of the measured gains, and the LR is the reference schedule at tau times the gain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from optim import adascale_gain


@dataclass(frozen=True)
class Progress:
    step: int = 0        # optimizer steps done
    images: int = 0      # training images seen, over the whole run (all ranks, all resumes)
    tau: float = 0.0     # the sum of the steps' gains (1 per step except under AdaScale)

    def advanced(self, batch: int, gain: float = 1.0) -> Progress:
        return Progress(self.step + 1, self.images + batch, self.tau + gain)


@dataclass(frozen=True)
class StepClock:
    """Counted in optimizer steps of one constant global batch."""
    total_steps: int       # the schedule's horizon
    steps_per_epoch: int
    global_batch: int
    train_size: int
    fixed_batch = True     # every step has the global batch
    measured = False       # whether where the run is depends on measurements made while training

    def position(self, at: Progress) -> float:
        """The LR schedule's argument."""
        return at.step

    def done(self, at: Progress) -> bool:
        return at.step >= self.total_steps

    def epoch_of(self, at: Progress) -> float:
        return at.step / self.steps_per_epoch

    def epoch_ended(self, before: Progress, after: Progress) -> bool:
        return after.step % self.steps_per_epoch == 0

    @property
    def epoch_images(self) -> int:
        """Images an epoch trains on: a constant batch drops each pass's last partial batch."""
        return self.steps_per_epoch * self.global_batch

    def lr(self, scheduled: float, at: Progress, batch: int, gain: float) -> float:
        return scheduled

    def gain(self, noise_scale, batch: int) -> float:
        return 1.0

    def record(self, at: Progress, gain: float) -> dict:
        """What this clock adds to a logged row and to summary.json."""
        return {}

    def unit(self) -> str:
        """How the plan line names a step of the schedule."""
        return ""

    def follows(self, rule: str) -> str:
        """What the LR follows when the batch changes."""
        return f"the {rule} rule"

    def describe(self, run_steps: int, batch_measured: bool, capped: bool) -> list[str]:
        """The plan's lines about this clock."""
        return []


@dataclass(frozen=True)
class ImageClock(StepClock):
    """Counted in images, in steps of the target batch; the LR at batch b is the schedule's times ``batch_factor``
    (the scaling rule's ratio, or the rest of the decay a step schedule's cap leaves)."""
    batch_factor: Callable[[int, int], float] = lambda images, batch: 1.0  # (images before the step, its batch)
    fixed_batch = False

    @property
    def total_images(self) -> int:
        return self.total_steps * self.global_batch  # the budget at the target batch: "same epochs" = same images

    def position(self, at):
        return at.images / self.global_batch

    def done(self, at):
        return at.images >= self.total_images

    def epoch_of(self, at):
        return at.images / self.train_size

    def epoch_ended(self, before, after):
        return before.images // self.train_size != after.images // self.train_size

    @property
    def epoch_images(self):
        return self.train_size  # a changing batch drops nothing: the stream runs on across epochs

    def lr(self, scheduled, at, batch, gain):
        return scheduled * self.batch_factor(at.images, batch)

    def unit(self):
        return f" (steps at batch {self.global_batch:,}, counted in images)"

    def describe(self, run_steps, batch_measured, capped):
        budget = f"{self.total_images:,} images (the budget of batch {self.global_batch:,} for {self.total_steps:,} steps)"
        if capped:
            return [f"{budget}; max_steps stops this run after {run_steps:,} step{'s' * (run_steps != 1)}, before "
                    f"{'it may reach ' if batch_measured else ''}the budget"]
        bound = "at most" if batch_measured else "exactly"
        return [f"{budget} in {bound} {run_steps:,} step{'s' * (run_steps != 1)}"]


@dataclass(frozen=True)
class TauClock(ImageClock):
    """AdaScale: the reference schedule (``total_steps`` steps of ``ref_batch``) at tau, times the gain r_t."""
    ref_batch: int = 256
    base_lr: float = 0.0   # the reference LR (for the plan line)
    measured = True

    def position(self, at):
        return at.tau

    def done(self, at):
        return at.tau >= self.total_steps - 1e-9

    def lr(self, scheduled, at, batch, gain):
        return gain * scheduled

    def gain(self, noise_scale, batch):
        return adascale_gain(*noise_scale.smoothed, batch, self.ref_batch)

    def record(self, at, gain):
        return {"adascale_gain": gain, "adascale_tau": at.tau}

    def unit(self):
        return " (steps of the reference batch, tau)"

    def follows(self, rule):
        return "AdaScale's gain"

    def describe(self, run_steps, batch_measured, capped):
        return [f"AdaScale: the reference schedule (lr {self.base_lr:g} at batch {self.ref_batch}, {self.total_steps:,} "
                f"step{'s' * (self.total_steps != 1)}) times the measured gain r in [1, batch/{self.ref_batch}]; tau "
                f"advances by r per step and the run ends at tau = {self.total_steps:,}"]


def crossed(interval_images: float, before: Progress, after: Progress) -> bool:
    """Whether a step crossed a multiple of ``interval_images``."""
    return math.floor(before.images / interval_images + 1e-9) != math.floor(after.images / interval_images + 1e-9)
