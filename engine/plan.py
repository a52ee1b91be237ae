"""The run's arithmetic, decided before any work: batch split, step counts, the optimizer and its scaled
hyperparameters, the LR schedule.

Used by train.py, the preflight check and scripts/lr_schedule.py alike, so the preview can never disagree with
training, and an optimizer file whose keywords its class does not take fails before any run dir exists.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from hydra.utils import get_class

from optim import LayerwiseOptimizer, LRSchedule, lr_multiplier, param_groups, scale_adam

from .config import ConfigError

MICRO_BATCH_CAP = 256  # automatic micro-batch: the largest divisor of the per-rank batch that is <= this


def auto_micro_batch(per_rank: int, cap: int = MICRO_BATCH_CAP) -> int:
    """Largest divisor of ``per_rank`` that is <= cap (256 divides every power-of-two batch >= 256)."""
    for m in range(min(per_rank, cap), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


@dataclass
class Plan:
    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int
    train_size: int
    steps_per_epoch: int
    total_steps: int       # the schedule's horizon: epochs x steps_per_epoch
    run_steps: int         # steps this run takes: total_steps, or max_steps if smaller
    warmup_steps: int
    rule: str
    ref_batch: int
    base_lr: float
    peak_lr: float
    weight_decay: float
    optimizer_target: str
    optimizer_cls: type
    optimizer_kwargs: dict  # the class's keywords after the scaling rule (adam_sde rescales betas and eps)
    schedule: LRSchedule
    notes: list[str] = field(default_factory=list)

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_cls.__name__

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The configured class over ``param_groups(model)``: decay and (LARS/LAMB) adaptation on ndim > 1 only."""
        groups = param_groups(model, self.weight_decay)
        if not issubclass(self.optimizer_cls, LayerwiseOptimizer):
            groups = [{k: v for k, v in g.items() if k != "adapt"} for g in groups]  # torch's don't know it
        return self.optimizer_cls(groups, lr=self.peak_lr, **self.optimizer_kwargs)

    def describe(self) -> str:
        """The whole arithmetic on a few short lines: what a user checks before spending a cluster on it."""
        s = self.schedule
        dropped = self.train_size - self.steps_per_epoch * self.global_batch
        lines = [f"plan: global batch {self.global_batch:,} = micro {self.micro_batch} x accum {self.accum_steps} "
                 f"x ranks {self.world_size}; {_plural(self.steps_per_epoch, 'step')}/epoch, "
                 f"{_plural(self.total_steps, 'step')} in all"
                 + (f" (stopping at {self.run_steps:,})" if self.run_steps < self.total_steps else "")]
        if dropped:
            lines.append(f"      {dropped:,} of {self.train_size:,} images ({dropped / self.train_size:.0%}) are left "
                         f"out of each epoch (the last partial batch): an epoch is "
                         f"{self.steps_per_epoch * self.global_batch / self.train_size:.2f} passes' worth")
        if self.rule == "none":
            lr = f"global LR {self.peak_lr:g} (no scaling)"
        else:
            lr = (f"lr {self.base_lr:g} @ batch {self.ref_batch} x {self.peak_lr / self.base_lr:.4g} ({self.rule} "
                  f"rule) = peak {self.peak_lr:g}")
        lines.append(f"      {self.optimizer_name}: {lr}" + "".join(f"; {n}" for n in self.notes))
        first, end = s(0), s(self.total_steps - 1)
        lines.append(f"      LR {first:.4g} at step 0 -> peak {self.peak_lr:.4g} at step {s.ramp_steps} "
                     f"({self._ramp()}) -> {end:.4g} at step {self.total_steps - 1} ({s.decay} decay)")
        return "\n".join(lines)

    def _ramp(self) -> str:
        s = self.schedule
        if s.decay == "onecycle":
            return "onecycle's own ramp"
        if s.decay == "inverse_sqrt":
            return "inverse_sqrt's own linear ramp"
        return f"{s.warmup} warmup" if s.uses_warmup else "no warmup"


def optimizer_class(target: str) -> type:
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"optim._target_={target!r} is not an importable class: use an import path such as "
                          f"torch.optim.SGD or optim.LARS") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optim._target_={target!r} is not a torch.optim.Optimizer subclass")
    return cls


def _scaled_kwargs(cls: type, kwargs: dict, rule: str, batch: int, ref_batch: int) -> tuple[dict, list[str]]:
    if rule != "adam_sde":
        return kwargs, []
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    if "betas" not in kwargs and "betas" not in defaults:
        raise ConfigError(f"scaling=adam_sde rescales Adam's betas and eps, and {cls.__name__} has no betas: use "
                          f"another scaling rule")
    betas = tuple(kwargs.get("betas", defaults.get("betas")))
    eps = kwargs.get("eps", defaults.get("eps", 1e-8))
    try:
        (b1, b2), eps2 = scale_adam(betas, eps, batch, ref_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    note = f"adam_sde: betas ({betas[0]:g}, {betas[1]:g}) -> ({b1:.6g}, {b2:.6g}), eps {eps:g} -> {eps2:.3g}"
    return {**kwargs, "betas": (b1, b2), "eps": eps2}, [note]


def _check_constructor(plan: Plan) -> None:
    """Build the optimizer on a dummy parameter: its own TypeError / ValueError is the one line."""
    try:
        plan.build_optimizer(torch.nn.Linear(2, 2))
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m:
            raise ConfigError(f"optim.{m.group(1)} is not a keyword of {plan.optimizer_target}: remove it or fix "
                              f"its spelling") from None
        raise ConfigError(f"optim: {plan.optimizer_name} rejects its settings: {e}") from None
    except ValueError as e:
        raise ConfigError(f"optim: {plan.optimizer_name} rejects its settings: {e}") from None


def _warmup_steps(w, global_batch: int, ref_batch: int, steps_per_epoch: int) -> int:
    if w.steps is not None:
        return w.steps
    epochs = w.epochs or 0.0
    if w.scale_with_batch:
        epochs *= global_batch / ref_batch
    return int(round(epochs * steps_per_epoch))


def make_plan(cfg, train_size: int, world_size: int = 1) -> Plan:
    global_batch = cfg.batch
    if global_batch % world_size:
        raise ConfigError(f"batch={global_batch} does not divide over {world_size} ranks: use a multiple of "
                          f"{world_size}")
    per_rank = global_batch // world_size
    micro = cfg.micro_batch or auto_micro_batch(per_rank)
    if per_rank % micro:
        raise ConfigError(f"batch={global_batch} does not split into micro_batch={micro} x ranks={world_size}: "
                          f"micro_batch must divide {per_rank} (the per-rank batch)")
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"batch={global_batch} is larger than the training set ({train_size} images): use a "
                          f"batch <= {train_size}")
    total_steps = max(int(round(cfg.epochs * steps_per_epoch)), 1)
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    o, rule, ref_batch = cfg.optim, cfg.scaling.rule, cfg.scaling.ref_batch
    cls = optimizer_class(o.target)
    peak_lr = o.lr * lr_multiplier(rule, global_batch, ref_batch)
    kwargs, notes = _scaled_kwargs(cls, o.kwargs, rule, global_batch, ref_batch)

    w, sc = cfg.warmup, cfg.schedule
    warmup_steps = _warmup_steps(w, global_batch, ref_batch, steps_per_epoch)
    if w.name != "none" and warmup_steps >= total_steps and sc.name != "onecycle":
        raise ConfigError(f"warmup of {warmup_steps} steps (warmup.epochs={w.epochs}, warmup.steps={w.steps}) is as "
                          f"long as the run or longer ({total_steps} steps = epochs {cfg.epochs} x "
                          f"{steps_per_epoch} steps/epoch): shorten the warmup, or use warmup=none")
    shape = {"warmup": w.name, "warmup_steps": warmup_steps, "decay": sc.name}
    if w.start_at_ref_lr:  # Goyal et al.: gradual warmup starts at, constant warmup stays at, the unscaled LR
        shape.update(start_factor=o.lr / peak_lr, constant_factor=o.lr / peak_lr)
    else:
        shape.update(start_factor=w.start_factor, constant_factor=w.factor)
    shape.update(exp_ratio=w.ratio, min_factor=sc.min_factor, gamma=sc.gamma, power=sc.power,
                 pct_start=sc.pct_start, div_factor=sc.div_factor, final_div_factor=sc.final_div_factor,
                 cycle_momentum=sc.cycle_momentum, base_momentum=sc.base_momentum, max_momentum=sc.max_momentum)
    if sc.name == "step":
        if sc.milestone_epochs:
            shape["milestones"] = tuple(int(round(e * steps_per_epoch)) for e in sc.milestone_epochs)
        else:
            shape["milestones"] = tuple(int(round(f * total_steps)) for f in sc.milestones or ())
    shape = {k: v for k, v in shape.items() if v is not None}  # what the option does not set keeps the default
    try:
        schedule = LRSchedule(peak_lr=peak_lr, total_steps=total_steps, **shape)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plan = Plan(global_batch, micro, per_rank // micro, world_size, train_size, steps_per_epoch, total_steps,
                run_steps, warmup_steps, rule, ref_batch, o.lr, peak_lr, o.weight_decay, o.target, cls, kwargs, schedule,
                notes)
    _check_constructor(plan)
    return plan
