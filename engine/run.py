"""The live run: what the loop works on (``Run``, built by train.py) and the run's own state (``RunState``).

Where the run is (steps, images, tau), its batch and gain are its schedule's (engine/schedule.py); what a checkpoint
holds and how it is written is engine/checkpoint.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .data import TrainData
from .distributed import DistContext
from .metrics import ProgressBar, RunLogger
from .plan import Plan
from .schedule import StepSchedule


@dataclass
class RunState:
    """What a run measures and decides that is neither the model's, the optimizer's nor the schedule's."""
    train_time: float = 0.0     # seconds in training steps of this process (evaluation excluded)
    steps_this_process: int = 0
    images_this_process: int = 0
    train_loss: float = math.nan
    diverged: bool = False
    stopped_by: str | None = None  # a signal's name when preempted
    last_eval: dict = field(default_factory=dict)
    test_eval: dict = field(default_factory=dict)  # with data.val_split: the test split, once, at the end
    last_eval_step: int = -1
    wandb_id: str | None = None
    best_val_acc: float = -1.0  # the best evaluation so far: checkpoints/best.pt holds that step
    improved: bool = False      # the last evaluation beat it: the next save also writes best.pt
    first_step_time: float = 0.0  # this process's first step: its one-time set-up (cuDNN autotuning, NCCL, compile)
    first_step_images: int = 0

    def count(self, batch: int, seconds: float, loss: float) -> None:
        """One training step of this process done."""
        self.steps_this_process += 1
        self.images_this_process += batch
        self.train_time += seconds
        if self.steps_this_process == 1:
            self.first_step_time, self.first_step_images = seconds, batch
        self.train_loss = loss

    @property
    def images_per_s(self) -> float:
        """This process's steady-state throughput: its first step left out (a run of one step has only that)."""
        if self.steps_this_process > 1 and self.train_time > self.first_step_time:
            return (self.images_this_process - self.first_step_images) / (self.train_time - self.first_step_time)
        return self.images_this_process / self.train_time if self.train_time else 0.0


@dataclass
class Run:
    """What the loop works on, built by train.py."""
    model: torch.nn.Module          # possibly DDP- and compile-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # enabled only for fp16
    data: TrainData
    plan: Plan
    schedule: StepSchedule          # where the run is, and what each step does
    cfg: Config
    device: torch.device
    dist: DistContext
    logger: RunLogger
    progress: ProgressBar
    state: RunState
    run_dir: Path
    ema: torch.nn.Module | None = None  # torch.optim.swa_utils.AveragedModel when ema.enabled

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]
