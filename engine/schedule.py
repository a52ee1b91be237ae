"""What happens at each optimizer step, owned by one object per run: where the run is (steps, images, tau), the
step's global batch and its split, its LR and momentum, AdaScale's gain, and whether an epoch or the run has ended.

The loop asks ``next_step()`` once per step and gets a ``Step`` with all of it; after the step's gradients
``set_lr(optimizer, step)`` sets the LR (AdaScale's depends on them), and ``advance(step, gain)`` counts the step
done. A checkpoint saves ``state_dict()`` and a resume restores it, whole. One class per clock, chosen once by
``choose_schedule`` (the one place the batch schedule's and the scaling rule's names are told apart):
- ``StepSchedule``: a constant batch; progress is the optimizer step, as in every paper's schedule;
- ``ImageSchedule``: the batch changes (batch_schedule=ramp|step|adaptive); progress is images seen, in steps of the
  target batch, and the LR follows the batch by the scaling rule (step: only the rest of the decay its cap leaves);
- ``TauSchedule``: AdaScale (Johnson et al. 2020, arXiv 2007.05105); progress is the scale-invariant iteration tau,
  the sum of the measured gains, and the LR is the reference schedule at tau times the gain.
The LR shape (warmup, decay) is the plan's ``lr_schedule``, a pure function of the position (optim/schedules.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from optim import MEASURES_GAIN, adascale_gain, apply_lr, lr_multiplier

from .diagnostics import NoiseScale


@dataclass(frozen=True)
class Progress:
    step: int = 0        # optimizer steps done
    images: int = 0      # training images seen, over the whole run (all ranks, all resumes)
    tau: float = 0.0     # the sum of the steps' gains (1 per step except under AdaScale)

    def advanced(self, batch: int, gain: float = 1.0) -> Progress:
        return Progress(self.step + 1, self.images + batch, self.tau + gain)


@dataclass(frozen=True)
class Step:
    """One optimizer step, as the schedule decides it before the step runs."""
    index: int              # steps done before it (0 for the first)
    images: int             # images seen before it
    batch: int              # its global batch
    accum_steps: int        # micro-batches per rank
    lr: float               # its LR (AdaScale: at gain 1; lr_and_gain gives the applied one)
    momentum: float | None  # where the LR schedule cycles it (onecycle), else None


class StepSchedule:
    """Counted in optimizer steps of one constant global batch."""
    fixed_batch = True      # every step has the global batch
    measures_gain = False   # the LR's factor is measured each step (AdaScale)

    def __init__(self, plan, noise_scale: NoiseScale | None = None):
        self.plan = plan
        self.at = Progress()
        self.before = self.at       # where the last step started
        self.decided: int | None = None  # batch_schedule=adaptive: the batch of the next step (its last decision)
        self.gain = 1.0             # the last step's gain
        self.noise_scale = noise_scale if noise_scale is not None else NoiseScale()

    # --- where the run is ---------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.at.step

    @property
    def images(self) -> int:
        return self.at.images

    def position(self, at: Progress | None = None) -> float:
        """The LR schedule's argument."""
        return (at or self.at).step

    def done(self, at: Progress) -> bool:
        """Whether the budget is spent at ``at`` (max_steps aside)."""
        return at.step >= self.plan.total_steps

    @property
    def finished(self) -> bool:
        return self.finished_at(self.at)

    def finished_at(self, at: Progress) -> bool:
        return bool(self.plan.max_steps and at.step >= self.plan.max_steps) or self.done(at)

    @property
    def epoch(self) -> float:
        return self.at.step / self.plan.steps_per_epoch

    def epoch_ended(self) -> bool:
        """Whether the last step ended an epoch."""
        return self.at.step % self.plan.steps_per_epoch == 0

    @property
    def epoch_images(self) -> int:
        """Images an epoch trains on: a constant batch drops each pass's last partial batch."""
        return self.plan.steps_per_epoch * self.plan.global_batch

    def crossed(self, every_epochs: float | None) -> bool:
        """Whether the last step crossed a multiple of ``every_epochs`` epochs' images (counted in images, so the
        points are the same at every batch and under a changing batch)."""
        if not every_epochs:
            return False
        interval = every_epochs * self.epoch_images
        return (math.floor(self.before.images / interval + 1e-9) != math.floor(self.at.images / interval + 1e-9))

    # --- the next step ------------------------------------------------------------------------------------------
    def next_step(self) -> Step:
        return self._step_at(self.at)

    def steps_ahead(self, train_size: int) -> list[Step]:
        """The steps known now, for a loader to read on across them: those that start in the current epoch (one,
        where the batch or the LR depends on this step's gradients)."""
        steps, at = [], self.at
        while not self.finished_at(at) and self._same_epoch(at, train_size):
            steps.append(self._step_at(at))
            if self.plan.measures_noise:
                break
            at = at.advanced(steps[-1].batch)
        return steps

    def _same_epoch(self, at: Progress, train_size: int) -> bool:
        return at.step // self.plan.steps_per_epoch == self.at.step // self.plan.steps_per_epoch

    def _step_at(self, at: Progress) -> Step:
        plan = self.plan
        batch = plan.batches.next(at.images, self.decided)
        position = self.position(at)
        return Step(index=at.step, images=at.images, batch=batch,
                    accum_steps=batch // (plan.micro_batch * plan.world_size),
                    lr=plan.lr_schedule(position) * self._batch_factor(at, batch),
                    momentum=plan.lr_schedule.momentum(position))

    def _batch_factor(self, at: Progress, batch: int) -> float:
        return 1.0

    def lr_and_gain(self, step: Step) -> tuple[float, float]:
        """The LR of ``step`` once its gradients are measured, and the gain in it (1 but for AdaScale)."""
        return step.lr, 1.0

    def set_lr(self, optimizer, step: Step) -> tuple[float, float]:
        """Set ``step``'s LR (and momentum, where the LR schedule cycles it) on every param group of ``optimizer``;
        returns the LR and its gain, for the log."""
        lr, gain = self.lr_and_gain(step)
        apply_lr(optimizer, lr, step.momentum)
        return lr, gain

    def advance(self, step: Step, gain: float = 1.0) -> None:
        """Count ``step`` done (tau moves by its gain); an adaptive batch is decided every N steps."""
        self.before, self.at = self.at, self.at.advanced(step.batch, gain)
        self.gain = gain
        if self.plan.batches.decides_after(self.at.step):
            self.decided = self.plan.batches.decide(self.noise_scale.b_simple, step.batch)

    # --- what is logged, saved and planned ----------------------------------------------------------------------
    def record(self) -> dict:
        """What this clock adds to a logged row and to summary.json."""
        return {}

    def state_dict(self) -> dict:
        return {"step": self.at.step, "images": self.at.images, "tau": self.at.tau, "batch": self.decided,
                "gain": self.gain, "noise_scale": self.noise_scale.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.at = self.before = Progress(state["step"], state["images"], state["tau"])
        self.decided, self.gain = state["batch"], state["gain"]
        self.noise_scale.load_state_dict(state["noise_scale"])

    def unit(self) -> str:
        """How the plan line names a step of the schedule."""
        return ""

    def follows(self) -> str:
        """What the LR follows when the batch changes."""
        return f"the {self.plan.rule} rule"

    def describe(self) -> list[str]:
        """The plan's lines about this clock."""
        return []


class ImageSchedule(StepSchedule):
    """Counted in images, in steps of the target batch; the LR at batch b is the schedule's times the scaling rule's
    ratio at b (batch_schedule=step: the rest of the decay its cap leaves)."""
    fixed_batch = False

    @property
    def total_images(self) -> int:
        return self.plan.total_steps * self.plan.global_batch  # the target batch's budget: same epochs = same images

    def position(self, at=None):
        return (at or self.at).images / self.plan.global_batch

    def done(self, at):
        return at.images >= self.total_images

    @property
    def epoch(self):
        return self.at.images / self.plan.train_size

    def epoch_ended(self):
        return self.before.images // self.plan.train_size != self.at.images // self.plan.train_size

    @property
    def epoch_images(self):
        return self.plan.train_size  # a changing batch drops nothing: the stream runs on across epochs

    def _same_epoch(self, at, train_size):
        return at.images // train_size == self.at.images // train_size

    def _batch_factor(self, at, batch):
        plan, batches = self.plan, self.plan.batches
        if not batches.scales_lr:
            return batches.lr_residual(at.images)
        rule, ref = plan.rule, plan.ref_batch
        return lr_multiplier(rule, batch, ref) / lr_multiplier(rule, plan.global_batch, ref)

    def unit(self):
        return f" (steps at batch {self.plan.global_batch:,}, counted in images)"

    def describe(self):
        plan = self.plan
        budget = (f"{self.total_images:,} images (the budget of batch {plan.global_batch:,} for "
                  f"{plan.total_steps:,} steps)")
        steps = f"{plan.run_steps:,} step{'s' * (plan.run_steps != 1)}"
        if plan.capped:
            return [f"{budget}; max_steps stops this run after {steps}, before "
                    f"{'it may reach ' if plan.batches.measured else ''}the budget"]
        return [f"{budget} in {'at most' if plan.batches.measured else 'exactly'} {steps}"]


class TauSchedule(ImageSchedule):
    """AdaScale: the reference schedule (``total_steps`` steps of ``ref_batch``) at tau, times the gain r_t."""
    measures_gain = True

    def position(self, at=None):
        return (at or self.at).tau

    def done(self, at):
        return at.tau >= self.plan.total_steps - 1e-9

    def _batch_factor(self, at, batch):
        return 1.0

    def lr_and_gain(self, step):
        gain = adascale_gain(*self.noise_scale.smoothed, step.batch, self.plan.ref_batch)
        return gain * step.lr, gain

    def record(self):
        return {"adascale_gain": self.gain, "adascale_tau": self.at.tau}

    def unit(self):
        return " (steps of the reference batch, tau)"

    def follows(self):
        return "AdaScale's gain"

    def describe(self):
        plan = self.plan
        return [f"AdaScale: the reference schedule (lr {plan.base_lr:g} at batch {plan.ref_batch}, "
                f"{plan.total_steps:,} step{'s' * (plan.total_steps != 1)}) times the measured gain r in "
                f"[1, batch/{plan.ref_batch}]; tau advances by r per step and the run ends at tau = "
                f"{plan.total_steps:,}"]


def choose_schedule(rule: str, batches) -> type[StepSchedule]:
    """The one place the run's clock is chosen: AdaScale counts tau; a changing batch counts images; else steps."""
    if rule in MEASURES_GAIN:
        return TauSchedule
    return ImageSchedule if batches.varies else StepSchedule


def run_steps(plan) -> tuple[int, bool]:
    """The steps a run of ``plan`` takes, and whether max_steps may stop it before its budget. Exact for the
    deterministic batch schedules; an upper bound for a measured batch (every step at ``start``) or clock (AdaScale:
    a gain of 1 throughout)."""
    schedule = plan.schedule_class(plan)
    cap = plan.max_steps or math.inf
    if schedule.fixed_batch or schedule.measures_gain:
        budget = plan.total_steps
    elif plan.batches.measured:
        budget = -(-schedule.total_images // plan.batches.first)
    else:
        steps, at = 0, Progress()
        while not schedule.done(at) and steps < cap:
            at = at.advanced(plan.batches.at(at.images))
            steps += 1
        return steps, not schedule.done(at)
    return int(min(budget, cap)), cap < budget
