"""The run's arithmetic, decided before any work: the batch split, the clock and step counts, the optimizer and its
scaled hyperparameters, the LR schedule. One frozen `Plan`, built by `make_plan`.

Used by train.py, the preflight check and scripts/lr_schedule.py alike, so the preview can never disagree with
training, and an optimizer file whose keywords its class does not take fails before any run dir exists. The text
the plan prints is in plan_text.py; the optimizer's class and keywords in optimizer_class.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from optim import BATCH_SCHEDULES, BatchSchedule, LRSchedule, lr_multiplier

from .datasets import in_memory
from .errors import ConfigError
from .optimizer_class import check_constructor, optimizer_class, scaled_kwargs
from .plan_text import describe
from .schedule import StepSchedule, choose_schedule, run_steps

MAX_STEPS = 1e12  # a horizon past this is a typo (epochs=1e308), not a run
MICRO_BATCH_CAP = 256  # automatic micro-batch: the largest divisor of the per-rank batch that is <= this


def auto_micro_batch(per_rank: int, cap: int = MICRO_BATCH_CAP) -> int:
    """Largest divisor of ``per_rank`` that is <= cap (256 divides every power-of-two batch >= 256)."""
    for m in range(min(per_rank, cap), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


@dataclass(frozen=True, kw_only=True)
class Plan:
    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int
    train_size: int
    steps_per_epoch: int
    total_steps: int       # the schedule's horizon: epochs x steps_per_epoch (AdaScale: of the reference batch)
    run_steps: int         # steps this run takes: total_steps, or max_steps if smaller (an upper bound if measured)
    capped: bool           # max_steps (may) stop the run before its budget
    warmup_steps: int
    rule: str
    ref_batch: int
    base_lr: float
    peak_lr: float
    weight_decay: float
    optimizer_target: str
    optimizer_cls: type
    optimizer_kwargs: dict  # the class's keywords after the scaling rule (adam_sde rescales betas and eps)
    lr_schedule: LRSchedule  # warmup and decay: the LR as a function of the schedule's position
    schedule_class: type[StepSchedule]  # the run's clock, chosen once: steps, images or AdaScale's tau
    batches: BatchSchedule   # the global batch over the run (constant unless batch_schedule says)
    notes: list[str] = field(default_factory=list)
    max_steps: int | None = None
    probe_micro: int = 1    # micro-batches in the noise scale's small-batch gradient (adaptive: probe / micro)
    micro_common: int = 0   # micro_batch=auto's candidates divide this (every per-rank batch; adaptive: its probe)
    micro_largest: int = 0  # ... and are at most this (AdaScale: half the smallest per-rank batch)
    measures_noise: bool = False  # the gradient-noise estimate drives the batch or the LR

    @property
    def total_images(self) -> int:
        return self.total_steps * self.global_batch  # the budget at the target batch: "same epochs" = same images

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_cls.__name__

    def describe(self) -> str:
        return describe(self)

    def preview(self) -> list[tuple[float, int]]:
        """(LR, global batch) of every optimizer step, without training: what scripts/lr_schedule.py plots."""
        if self.measures_noise:
            what = "batch_schedule=adaptive" if self.batches.measured else f"scaling={self.rule}"
            raise ConfigError(f"{what} decides the batch or LR from gradients measured during training, so it cannot "
                              f"be previewed: plot a run's realised batch, gain and LR with "
                              f"scripts/plot_noise_scale.py RUN_DIR")
        rows, schedule = [], self.schedule_class(self)
        while not schedule.finished:
            step = schedule.next_step()
            rows.append((step.lr, step.batch))
            schedule.advance(step)
        return rows


def _warmup_steps(w, global_batch: int, ref_batch: int, steps_per_epoch: int) -> int:
    if w.steps is not None:
        return w.steps
    epochs = w.epochs or 0.0
    if w.scale_with_batch:
        epochs *= global_batch / ref_batch
    return int(round(epochs * steps_per_epoch))


def _lr_schedule(cfg, peak_lr: float, horizon: int, unit_batch: int, unit_steps_per_epoch: int) -> LRSchedule:
    """Warmup then decay over ``horizon`` steps of ``unit_batch`` images (the global batch, or AdaScale's
    ref_batch), peaking at ``peak_lr``."""
    w, sc, base_lr = cfg.warmup, cfg.schedule, cfg.optim.lr
    warmup_steps = _warmup_steps(w, unit_batch, cfg.scaling.ref_batch, unit_steps_per_epoch)
    if w.name != "none" and warmup_steps >= horizon and sc.name != "onecycle":
        raise ConfigError(f"warmup of {warmup_steps} steps (warmup.epochs={w.epochs}, warmup.steps={w.steps}) is as "
                          f"long as the run or longer ({horizon} steps = epochs {cfg.epochs} x "
                          f"{unit_steps_per_epoch} steps/epoch): shorten the warmup, or use warmup=none")
    # a setting of the warmup or schedule group named as a field of LRSchedule is that field (a new warmup or decay
    # with a new setting adds it to engine/config.py and LRSchedule, and nothing here); the others are mapped below
    fields = set(LRSchedule.__dataclass_fields__) - {"peak_lr", "total_steps", "warmup", "decay", "milestones"}
    shape = {k: v for group in (w, sc) for k, v in group.model_dump().items() if k in fields}
    shape.update(warmup=w.name, warmup_steps=warmup_steps, decay=sc.name, constant_factor=w.factor,
                 exp_ratio=w.ratio)
    if w.start_at_ref_lr:  # Goyal et al.: gradual warmup starts at, constant warmup stays at, the unscaled LR
        shape.update(start_factor=base_lr / peak_lr, constant_factor=base_lr / peak_lr)
    if sc.name == "step":
        if sc.milestone_epochs:
            shape["milestones"] = tuple(int(round(e * unit_steps_per_epoch)) for e in sc.milestone_epochs)
        else:
            shape["milestones"] = tuple(int(round(f * horizon)) for f in sc.milestones or ())
    shape = {k: v for k, v in shape.items() if v is not None}  # what the option does not set keeps the default
    try:
        return LRSchedule(peak_lr=peak_lr, total_steps=horizon, **shape)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _batch_schedule(cfg, total_steps: int, train_size: int) -> BatchSchedule:
    try:
        return BATCH_SCHEDULES[cfg.batch_schedule.name].from_config(cfg.batch_schedule, cfg.batch,
                                                                    total_steps * cfg.batch, train_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _micro_batch(cfg, batches: BatchSchedule, world_size: int, measures_gain: bool) -> int:
    """micro_batch must divide every per-rank batch the schedule uses; null = the largest such size <= 256."""
    sizes = batches.sizes()
    for b in sizes:
        if b % world_size:
            raise ConfigError(f"batch {b} of batch_schedule={cfg.batch_schedule.name} does not divide over "
                              f"{world_size} ranks: use batches that are multiples of {world_size}")
    common = _auto_common(batches, world_size)
    explicit = cfg.micro_batch if isinstance(cfg.micro_batch, int) else None  # "auto": searched on CUDA at start
    micro = explicit or auto_micro_batch(common, min(MICRO_BATCH_CAP, _auto_largest(batches, world_size,
                                                                                    measures_gain)))
    if math.gcd(*(b // world_size for b in sizes)) % micro:
        what = (f"batch={cfg.batch}" if len(sizes) == 1 else
                f"the batches of batch_schedule={cfg.batch_schedule.name} ({', '.join(map(str, sizes[:4]))}"
                f"{', ...' if len(sizes) > 4 else ''})")
        raise ConfigError(f"{what} does not split into micro_batch={micro} x ranks={world_size}: micro_batch must "
                          f"divide {math.gcd(*(b // world_size for b in sizes))} (the per-rank batch)")
    return micro


def _auto_common(batches: BatchSchedule, world_size: int) -> int:
    """What every micro-batch size divides: each per-rank batch, and under batch_schedule=adaptive its probe."""
    common = math.gcd(*(b // world_size for b in batches.sizes()))
    return math.gcd(common, batches.probe) if batches.measured else common


def _auto_largest(batches: BatchSchedule, world_size: int, measures_gain: bool) -> int:
    """The largest micro-batch the run's rules allow: AdaScale measures its gain from 2+ micro-batches per step."""
    smallest = min(batches.sizes()) // world_size
    return max(smallest // 2, 1) if measures_gain else smallest


def _check_measured(cfg, batches: BatchSchedule, micro: int, world_size: int, optimizer_cls: type,
                    measures_gain: bool) -> int:
    """batch_schedule=adaptive and scaling=adascale act on the gradient-noise estimate: they need a small-batch
    gradient inside every step, and unscaled gradients. Returns the micro-batches in the small-batch gradient."""
    if not (batches.measured or measures_gain):
        return 1
    what = "batch_schedule=adaptive" if batches.measured else f"scaling={cfg.scaling.rule}"
    if cfg.precision == "fp16":
        raise ConfigError(f"{what} measures gradient norms, which fp16's loss scaling distorts: use precision=bf16 "
                          f"or fp32")
    smallest = min(batches.sizes()) // world_size
    probe_micro = 1
    if batches.measured:
        probe = batches.probe
        if probe % micro or not probe < smallest:
            raise ConfigError(f"batch_schedule.probe={probe} must be a multiple of micro_batch={micro} "
                              f"and below the smallest per-rank batch ({smallest}): the noise scale compares the "
                              f"probe's gradient with the whole step's")
        probe_micro = probe // micro
    elif smallest < 2 * micro:
        raise ConfigError(f"scaling=adascale estimates its gain from micro-batch and global-batch gradients, so "
                          f"every per-rank batch needs 2 or more micro-batches: at batch {min(batches.sizes())} "
                          f"x ranks {world_size} use micro_batch <= {smallest // 2}")
    if measures_gain:
        if not issubclass(optimizer_cls, torch.optim.SGD):
            raise ConfigError(f"scaling=adascale is defined for momentum SGD (Johnson et al. 2020), not for "
                              f"{cfg.optim.target}: use optim=sgd, or another scaling rule")
        if not batches.scales_lr:
            raise ConfigError(f"batch_schedule={cfg.batch_schedule.name} replaces the LR decay by batch growth and "
                              f"scaling=adascale sets the LR from its gain: use one of them")
        if min(batches.sizes()) < cfg.scaling.ref_batch:
            raise ConfigError(f"scaling=adascale at batch {min(batches.sizes())}, below scaling.ref_batch="
                              f"{cfg.scaling.ref_batch}: its gain is defined for batches at or above the reference "
                              f"(S = batch / ref_batch >= 1); use a larger batch or a smaller scaling.ref_batch")
    return probe_micro


def _check_data_options(cfg, fixed_batch: bool) -> None:
    d = cfg.data
    if (d.repeated_aug or 0) > 1 and in_memory(d):
        raise ConfigError(f"data.repeated_aug={d.repeated_aug} is DeiT's sampler for the ImageNet loader under "
                          f"DDP; the in-memory datasets do not offer it: set data.repeated_aug=0")
    if d.auto_augment is not None and in_memory(d):
        raise ConfigError(f"data.auto_augment={d.auto_augment} runs per image in DataLoader workers (data=imagenet); "
                          f"for the in-memory datasets it would cost about 1-2 ms per image in the training process "
                          f"(measured here: about 10x a default step), so it is not offered: set data.auto_augment=null")
    if not fixed_batch and (d.repeated_aug or 0) > 1:
        raise ConfigError(f"data.repeated_aug={d.repeated_aug} deals each global batch's copies to ranks and "
                          f"needs a constant batch; batch_schedule={cfg.batch_schedule.name} / scaling="
                          f"{cfg.scaling.rule} change it during the run: set data.repeated_aug=0 or "
                          f"batch_schedule=constant with a fixed scaling rule")


def make_plan(cfg, train_size: int, world_size: int = 1) -> Plan:
    global_batch = cfg.batch
    if global_batch % world_size:
        raise ConfigError(f"batch={global_batch} does not divide over {world_size} ranks: use a multiple of "
                          f"{world_size}")
    per_rank = global_batch // world_size
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"batch={global_batch} is larger than the training set ({train_size} images): use a "
                          f"batch <= {train_size}")
    if not cfg.epochs * steps_per_epoch < MAX_STEPS:
        raise ConfigError(f"epochs={cfg.epochs:g} is {cfg.epochs * steps_per_epoch:.3g} steps at batch {global_batch}: "
                          f"use at most {MAX_STEPS / steps_per_epoch:.3g} epochs")
    total_steps = max(int(round(cfg.epochs * steps_per_epoch)), 1)
    o, rule, ref_batch = cfg.optim, cfg.scaling.rule, cfg.scaling.ref_batch
    batches = _batch_schedule(cfg, total_steps, train_size)
    schedule_class = choose_schedule(rule, batches)
    measures_gain = schedule_class.measures_gain
    micro = _micro_batch(cfg, batches, world_size, measures_gain)

    cls = optimizer_class(o.target)
    # the batch whose scaling sets the peak LR: the target, or the start under batch_schedule=step (Smith et al.)
    peak_lr = o.lr * lr_multiplier(rule, batches.lr_batch, ref_batch)
    kwargs, notes = scaled_kwargs(cls, o.kwargs, rule, batches.lr_batch, ref_batch)

    # the LR schedule's unit: an optimizer step at the target batch, or under AdaScale a step at ref_batch
    unit_batch = ref_batch if measures_gain else global_batch
    unit_steps_per_epoch = max(train_size // unit_batch, 1)
    horizon = max(int(round(cfg.epochs * unit_steps_per_epoch)), 1) if measures_gain else total_steps
    lr_schedule = _lr_schedule(cfg, o.lr if measures_gain else peak_lr, horizon, unit_batch, unit_steps_per_epoch)
    _check_data_options(cfg, schedule_class.fixed_batch)
    probe_micro = _check_measured(cfg, batches, micro, world_size, cls, measures_gain)
    check_constructor(cls, kwargs, o.target, peak_lr, o.weight_decay)
    plan = Plan(global_batch=global_batch, micro_batch=micro, accum_steps=per_rank // micro, world_size=world_size,
                train_size=train_size, steps_per_epoch=steps_per_epoch, total_steps=horizon, run_steps=0,
                capped=False, warmup_steps=lr_schedule.warmup_steps, rule=rule, ref_batch=ref_batch, base_lr=o.lr,
                peak_lr=peak_lr, weight_decay=o.weight_decay, optimizer_target=o.target, optimizer_cls=cls,
                optimizer_kwargs=kwargs, lr_schedule=lr_schedule, schedule_class=schedule_class, batches=batches,
                notes=notes, max_steps=cfg.max_steps, probe_micro=probe_micro,
                micro_common=_auto_common(batches, world_size),
                micro_largest=_auto_largest(batches, world_size, measures_gain),
                measures_noise=batches.measured or measures_gain)
    steps, capped = run_steps(plan)
    return replace(plan, run_steps=steps, capped=capped)
