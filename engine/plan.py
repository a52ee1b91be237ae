"""The run's arithmetic, decided before any work: the batch split, the clock and step counts, the optimizer and its
scaled hyperparameters, the LR schedule. One frozen `Plan`, built by `make_plan`.

Used by train.py, the preflight check and scripts/lr_schedule.py alike, so the preview can never disagree with
training, and an optimizer file whose keywords its class does not take fails before any run dir exists. The text
the plan prints is in plan_text.py; the optimizer's class and keywords in optimizer_class.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from optim import BatchSchedule, LRSchedule, lr_multiplier

from .clock import ImageClock, Progress, StepClock, TauClock, crossed
from .datasets import in_memory
from .errors import ConfigError
from .optimizer_class import build_optimizer, check_constructor, optimizer_class, scaled_kwargs
from .plan_text import describe

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
    schedule: LRSchedule
    clock: StepClock        # chosen once by make_plan: steps, images or AdaScale's tau
    batches: BatchSchedule  # the global batch over the run (constant unless batch_schedule says)
    notes: list[str] = field(default_factory=list)
    max_steps: int | None = None
    probe_micro: int = 1    # micro-batches in the noise scale's small-batch gradient (adaptive: probe / micro)
    micro_common: int = 0   # micro_batch=auto's candidates divide this (every per-rank batch; adaptive: its probe)
    micro_largest: int = 0  # ... and are at most this (AdaScale: half the smallest per-rank batch)
    measures_noise: bool = False  # the gradient-noise estimate drives the batch or the LR

    start = Progress()

    @property
    def fixed(self) -> bool:
        """Every step has the global batch and progress is counted in steps."""
        return self.clock.fixed_batch

    @property
    def total_images(self) -> int:
        return self.total_steps * self.global_batch  # the budget at the target batch: "same epochs" = same images

    def batch_at(self, images: int, decided: int | None) -> int:
        return self.batches.next(images, decided)

    def accum_at(self, batch: int) -> int:
        return batch // (self.micro_batch * self.world_size)

    def lr(self, at: Progress, batch: int, gain: float = 1.0) -> float:
        """The LR of the step that starts at ``at``, at global batch ``batch``."""
        return self.clock.lr(self.schedule(self.clock.position(at)), at, batch, gain)

    def momentum(self, at: Progress) -> float | None:
        return self.schedule.momentum(self.clock.position(at))

    def finished(self, at: Progress) -> bool:
        return bool(self.max_steps and at.step >= self.max_steps) or self.clock.done(at)

    def epoch_of(self, at: Progress) -> float:
        return self.clock.epoch_of(at)

    def epoch_ended(self, before: Progress, after: Progress) -> bool:
        return self.clock.epoch_ended(before, after)

    def crossed(self, every_epochs: float | None, before: Progress, after: Progress) -> bool:
        """Whether this step crossed a multiple of ``every_epochs`` epochs' images (counted in images, so the
        points are the same at every batch and under a changing batch)."""
        return bool(every_epochs) and crossed(every_epochs * self.clock.epoch_images, before, after)

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_cls.__name__

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(self, model)

    def describe(self) -> str:
        return describe(self)

    def preview(self) -> list[tuple[float, int]]:
        """(LR, global batch) of every optimizer step, without training: what scripts/lr_schedule.py plots."""
        if self.measures_noise:
            what = f"batch_schedule={self.batches.kind}" if self.batches.measured else f"scaling={self.rule}"
            raise ConfigError(f"{what} decides the batch or LR from gradients measured during training, so it cannot "
                              f"be previewed: plot a run's realised batch, gain and LR with "
                              f"scripts/plot_noise_scale.py RUN_DIR")
        rows, at = [], self.start
        while not self.finished(at):
            batch = self.batch_at(at.images, None)
            rows.append((self.lr(at, batch), batch))
            at = at.advanced(batch)
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
    shape = {"warmup": w.name, "warmup_steps": warmup_steps, "decay": sc.name}
    if w.start_at_ref_lr:  # Goyal et al.: gradual warmup starts at, constant warmup stays at, the unscaled LR
        shape.update(start_factor=base_lr / peak_lr, constant_factor=base_lr / peak_lr)
    else:
        shape.update(start_factor=w.start_factor, constant_factor=w.factor)
    shape.update(exp_ratio=w.ratio, min_factor=sc.min_factor, gamma=sc.gamma, power=sc.power,
                 pct_start=sc.pct_start, div_factor=sc.div_factor, final_div_factor=sc.final_div_factor,
                 cycle_momentum=sc.cycle_momentum, base_momentum=sc.base_momentum, max_momentum=sc.max_momentum)
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
    b, batch = cfg.batch_schedule, cfg.batch
    kw = {"kind": b.name, "batch": batch}
    if b.name != "constant":
        kw["start"] = b.start
    if b.name == "ramp":
        kw.update(increment=b.increment or b.start, ramp_images=int(round((b.epochs or 0.0) * train_size)))
    elif b.name == "step":
        kw.update(factor=b.factor, milestones=tuple(int(round(f * total_steps * batch)) for f in b.milestones or ()))
    elif b.name == "adaptive":
        kw.update(k=b.k, every=b.every, multiple=b.multiple)
    try:
        return BatchSchedule(**kw)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _micro_batch(cfg, batches: BatchSchedule, world_size: int) -> int:
    """micro_batch must divide every per-rank batch the schedule uses; null = the largest such size <= 256."""
    sizes = batches.sizes()
    for b in sizes:
        if b % world_size:
            raise ConfigError(f"batch {b} of batch_schedule={batches.kind} does not divide over {world_size} ranks: "
                              f"use batches that are multiples of {world_size}")
    common = math.gcd(*(b // world_size for b in sizes))
    probe = cfg.batch_schedule.probe if batches.measured else None
    # adascale measures its gain from 2+ micro-batches per step: the automatic size leaves room for them
    cap = min(MICRO_BATCH_CAP, max(min(sizes) // world_size // 2, 1)) if cfg.scaling.rule == "adascale" else MICRO_BATCH_CAP
    explicit = cfg.micro_batch if isinstance(cfg.micro_batch, int) else None  # "auto": searched on CUDA at start
    micro = explicit or auto_micro_batch(math.gcd(common, probe) if probe else common, cap)
    if common % micro:
        what = (f"batch={cfg.batch}" if len(sizes) == 1 else
                f"the batches of batch_schedule={batches.kind} ({', '.join(map(str, sizes[:4]))}"
                f"{', ...' if len(sizes) > 4 else ''})")
        raise ConfigError(f"{what} does not split into micro_batch={micro} x ranks={world_size}: micro_batch must "
                          f"divide {common} (the per-rank batch)")
    return micro


def _auto_common(cfg, batches: BatchSchedule, world_size: int) -> int:
    """What every micro-batch size divides: each per-rank batch, and under batch_schedule=adaptive its probe."""
    common = math.gcd(*(b // world_size for b in batches.sizes()))
    return math.gcd(common, cfg.batch_schedule.probe) if batches.measured else common


def _auto_largest(cfg, batches: BatchSchedule, world_size: int) -> int:
    """The largest micro-batch the run's rules allow: AdaScale measures its gain from 2+ micro-batches per step."""
    smallest = min(batches.sizes()) // world_size
    return max(smallest // 2, 1) if cfg.scaling.rule == "adascale" else smallest


def _check_measured(cfg, batches: BatchSchedule, micro: int, world_size: int, optimizer_cls: type) -> int:
    """batch_schedule=adaptive and scaling=adascale act on the gradient-noise estimate: they need a small-batch
    gradient inside every step, and unscaled gradients. Returns the micro-batches in the small-batch gradient."""
    adaptive, adascale = batches.measured, cfg.scaling.rule == "adascale"
    if not (adaptive or adascale):
        return 1
    what = "batch_schedule=adaptive" if adaptive else "scaling=adascale"
    if cfg.precision == "fp16":
        raise ConfigError(f"{what} measures gradient norms, which fp16's loss scaling distorts: use precision=bf16 "
                          f"or fp32")
    smallest = min(batches.sizes()) // world_size
    probe_micro = 1
    if adaptive:
        probe = cfg.batch_schedule.probe
        if probe % micro or not probe < smallest:
            raise ConfigError(f"batch_schedule.probe={probe} must be a multiple of micro_batch={micro} "
                              f"and below the smallest per-rank batch ({smallest}): the noise scale compares the "
                              f"probe's gradient with the whole step's")
        probe_micro = probe // micro
    elif smallest < 2 * micro:
        raise ConfigError(f"scaling=adascale estimates its gain from micro-batch and global-batch gradients, so "
                          f"every per-rank batch needs 2 or more micro-batches: at batch {min(batches.sizes())} "
                          f"x ranks {world_size} use micro_batch <= {smallest // 2}")
    if adascale:
        if not issubclass(optimizer_cls, torch.optim.SGD):
            raise ConfigError(f"scaling=adascale is defined for momentum SGD (Johnson et al. 2020), not for "
                              f"{cfg.optim.target}: use optim=sgd, or another scaling rule")
        if batches.kind == "step":
            raise ConfigError("batch_schedule=step replaces the LR decay by batch growth and scaling=adascale sets the "
                              "LR from its gain: use one of them")
        if min(batches.sizes()) < cfg.scaling.ref_batch:
            raise ConfigError(f"scaling=adascale at batch {min(batches.sizes())}, below scaling.ref_batch="
                              f"{cfg.scaling.ref_batch}: its gain is defined for batches at or above the reference "
                              f"(S = batch / ref_batch >= 1); use a larger batch or a smaller scaling.ref_batch")
    return probe_micro


def _choose_clock(rule: str, batches: BatchSchedule, *, total_steps: int, steps_per_epoch: int, global_batch: int,
                  train_size: int, ref_batch: int, base_lr: float) -> StepClock:
    """The one place the run's clock is chosen: AdaScale counts tau; a changing batch counts images, the LR following
    the scaling rule (or, for batch_schedule=step, only the rest of the decay the cap leaves); else steps."""
    common = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                  train_size=train_size)
    if rule == "adascale":
        return TauClock(**common, ref_batch=ref_batch, base_lr=base_lr)
    if not batches.varies:
        return StepClock(**common)
    if batches.kind == "step":  # the batch increase replaces the decay: no rescaling, the cap's rest
        return ImageClock(**common, batch_factor=lambda images, batch: batches.lr_residual(images))
    at_target = lr_multiplier(rule, global_batch, ref_batch)
    return ImageClock(**common, batch_factor=lambda images, batch: lr_multiplier(rule, batch, ref_batch) / at_target)


def _check_data_options(cfg, clock: StepClock) -> None:
    d = cfg.data
    if (d.repeated_aug or 0) > 1 and in_memory(d):
        raise ConfigError(f"data.repeated_aug={d.repeated_aug} is DeiT's sampler for the ImageNet loader under "
                          f"DDP; the in-memory datasets do not offer it: set data.repeated_aug=0")
    if d.auto_augment is not None and in_memory(d):
        raise ConfigError(f"data.auto_augment={d.auto_augment} runs per image in DataLoader workers (data=imagenet); "
                          f"for the in-memory datasets it would cost about 1-2 ms per image in the training process "
                          f"(measured here: about 10x a default step), so it is not offered: set data.auto_augment=null")
    if not clock.fixed_batch and (d.repeated_aug or 0) > 1:
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
    batches = _batch_schedule(cfg, total_steps, train_size)
    micro = _micro_batch(cfg, batches, world_size)

    o, rule, ref_batch = cfg.optim, cfg.scaling.rule, cfg.scaling.ref_batch
    cls = optimizer_class(o.target)
    # the batch whose scaling sets the peak LR: the target, or the start under batch_schedule=step (Smith et al.)
    lr_batch = batches.start if batches.kind == "step" else global_batch
    peak_lr = o.lr * lr_multiplier(rule, lr_batch, ref_batch)
    kwargs, notes = scaled_kwargs(cls, o.kwargs, rule, lr_batch, ref_batch)

    # the LR schedule's unit: an optimizer step at the target batch, or under AdaScale a step at ref_batch
    adascale = rule == "adascale"
    unit_batch = ref_batch if adascale else global_batch
    unit_steps_per_epoch = max(train_size // unit_batch, 1)
    horizon = max(int(round(cfg.epochs * unit_steps_per_epoch)), 1) if adascale else total_steps
    schedule = _lr_schedule(cfg, o.lr if adascale else peak_lr, horizon, unit_batch, unit_steps_per_epoch)
    clock = _choose_clock(rule, batches, total_steps=horizon, steps_per_epoch=steps_per_epoch,
                          global_batch=global_batch, train_size=train_size, ref_batch=ref_batch, base_lr=o.lr)
    _check_data_options(cfg, clock)
    probe_micro = _check_measured(cfg, batches, micro, world_size, cls)
    run_steps, capped = _run_steps(clock, batches, cfg.max_steps)
    plan = Plan(global_batch=global_batch, micro_batch=micro, accum_steps=per_rank // micro, world_size=world_size,
                train_size=train_size, steps_per_epoch=steps_per_epoch, total_steps=horizon,
                run_steps=run_steps, capped=capped, warmup_steps=schedule.warmup_steps, rule=rule,
                ref_batch=ref_batch, base_lr=o.lr, peak_lr=peak_lr, weight_decay=o.weight_decay,
                optimizer_target=o.target, optimizer_cls=cls, optimizer_kwargs=kwargs, schedule=schedule,
                clock=clock, batches=batches, notes=notes, max_steps=cfg.max_steps, probe_micro=probe_micro,
                micro_common=_auto_common(cfg, batches, world_size), micro_largest=_auto_largest(cfg, batches, world_size),
                measures_noise=batches.measured or clock.measured)
    check_constructor(plan)
    return plan


def _run_steps(clock: StepClock, batches: BatchSchedule, max_steps: int | None) -> tuple[int, bool]:
    """The steps this run takes, and whether max_steps may stop it before its budget. Exact for the deterministic
    batch schedules; an upper bound for a measured batch (every step at ``start``) or clock (AdaScale: a gain of 1
    throughout)."""
    cap = max_steps or math.inf
    if clock.fixed_batch or clock.measured:
        budget = clock.total_steps
    elif batches.measured:
        budget = -(-clock.total_images // batches.start)
    else:
        steps, at = 0, Progress()
        while not clock.done(at) and steps < cap:
            at = at.advanced(batches.at(at.images))
            steps += 1
        return steps, not clock.done(at)
    return int(min(budget, cap)), cap < budget
