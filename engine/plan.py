"""The run's arithmetic, decided before any work: batch split, step counts, the optimizer and its scaled
hyperparameters, the LR schedule.

Used by train.py, the preflight check and scripts/lr_schedule.py alike, so the preview can never disagree with
training, and an optimizer file whose keywords its class does not take fails before any run dir exists.
"""
from __future__ import annotations

import inspect
import math
import re
import textwrap
from dataclasses import dataclass, field

import torch
from hydra.utils import get_class

from optim import BatchSchedule, LayerwiseOptimizer, LRSchedule, lr_multiplier, param_groups, scale_adam

from .config import ConfigError

MICRO_BATCH_CAP = 256  # automatic micro-batch: the largest divisor of the per-rank batch that is <= this


def auto_micro_batch(per_rank: int, cap: int = MICRO_BATCH_CAP) -> int:
    """Largest divisor of ``per_rank`` that is <= cap (256 divides every power-of-two batch >= 256)."""
    for m in range(min(per_rank, cap), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


def plural(n: int, word: str) -> str:
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
    batches: BatchSchedule | None = None  # the global batch over the run (constant unless batch_schedule says)
    max_steps: int | None = None
    probe_micro: int = 1   # micro-batches in the noise scale's small-batch gradient (adaptive: probe / micro)
    micro_common: int = 0  # every per-rank batch of the run is a multiple of this: micro_batch divides it

    def set_micro_batch(self, micro: int) -> None:
        """micro_batch=auto on CUDA: the size that fits (a divisor of ``micro_common``)."""
        self.micro_batch, self.accum_steps = micro, self.global_batch // self.world_size // micro

    # --- what changes step to step. Under a constant batch (and no AdaScale) every quantity is indexed by the
    # optimizer step, exactly as before batch schedules existed; otherwise progress is counted in images seen
    # (the LR schedule's unit is then a step at the target batch) or, under AdaScale, in scale-invariant steps tau.
    @property
    def fixed(self) -> bool:
        return not self.batches.varies and self.rule != "adascale"

    @property
    def total_images(self) -> int:
        return self.total_steps * self.global_batch  # the budget at the target batch: "same epochs" = same images

    def batch_at(self, images: int, current: int | None) -> int:
        """The global batch of the next step (adaptive: the last decision, or ``start`` before any)."""
        if self.batches.kind == "adaptive":
            return current or self.batches.start
        return self.batches.at(images)

    def accum_at(self, batch: int) -> int:
        return batch // (self.micro_batch * self.world_size)

    def position(self, step: int, images: int, tau: float) -> float:
        """Where the LR schedule is evaluated: the step; images / target batch; or AdaScale's tau."""
        if self.rule == "adascale":
            return tau
        return step if self.fixed else images / self.global_batch

    def lr(self, step: int, images: int, batch: int, tau: float = 0.0, gain: float = 1.0) -> float:
        """The LR of the step that starts after ``step`` steps and ``images`` images, at global batch ``batch``."""
        lr = self.schedule(self.position(step, images, tau))
        if self.rule == "adascale":
            return gain * lr
        if self.fixed:
            return lr
        if self.batches.kind == "step":  # the batch increase replaces the decay: no rescaling, the cap's rest
            return lr * self.batches.lr_residual(images)
        return lr * lr_multiplier(self.rule, batch, self.ref_batch) / lr_multiplier(self.rule, self.global_batch,
                                                                                     self.ref_batch)

    def momentum(self, step: int, images: int, tau: float) -> float | None:
        return self.schedule.momentum(self.position(step, images, tau))

    def finished(self, step: int, images: int, tau: float = 0.0) -> bool:
        if self.max_steps and step >= self.max_steps:
            return True
        if self.rule == "adascale":
            return tau >= self.total_steps - 1e-9  # the reference run's length, in scale-invariant steps
        return step >= self.total_steps if self.fixed else images >= self.total_images

    def epoch_ended(self, step: int, images_before: int, images_after: int) -> bool:
        if self.fixed:
            return step % self.steps_per_epoch == 0
        return images_before // self.train_size != images_after // self.train_size

    @property
    def epoch_images(self) -> int:
        """Images an epoch trains on: a fixed batch drops each pass's last partial batch; a changing one does not."""
        return self.steps_per_epoch * self.global_batch if self.fixed else self.train_size

    def crossed(self, every_epochs: float | None, images_before: int, images_after: int) -> bool:
        """Whether this step crossed a multiple of ``every_epochs`` epochs' images (counted in images, so the
        points are the same at every batch and under a changing batch)."""
        if not every_epochs:
            return False
        interval = every_epochs * self.epoch_images
        return math.floor(images_before / interval + 1e-9) != math.floor(images_after / interval + 1e-9)

    def epoch_of(self, step: int, images: int) -> float:
        return step / self.steps_per_epoch if self.fixed else images / self.train_size

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
        dropped = self.train_size - self.epoch_images
        lines = [f"plan: global batch {self.global_batch:,} = micro {self.micro_batch} x accum {self.accum_steps} "
                 f"x ranks {self.world_size}; {plural(self.steps_per_epoch, 'step')}/epoch, "
                 f"{plural(self.total_steps, 'step')} in all"
                 + (f" (stopping at {self.run_steps:,})" if self.run_steps < self.total_steps else "")]
        if not self.fixed:
            lines = [f"plan: target global batch {self.global_batch:,} = micro {self.micro_batch} x accum "
                     f"{self.accum_steps} x ranks {self.world_size}; the batch changes during the run (below)"]
        if dropped:
            lines.append(f"      {dropped:,} of {self.train_size:,} images ({dropped / self.train_size:.0%}) are left "
                         f"out of each epoch (the last partial batch): an epoch is "
                         f"{self.epoch_images / self.train_size:.2f} passes' worth")
        if self.rule == "none":
            lr = f"global LR {self.peak_lr:g} (no scaling)"
        else:
            lr = (f"lr {self.base_lr:g} @ batch {self.ref_batch} x {self.peak_lr / self.base_lr:.4g} ({self.rule} "
                  f"rule) = peak {self.peak_lr:g}")
        lines.append(f"      {self.optimizer_name}: {lr}")
        lines += [f"      {note}" for note in self.notes]  # e.g. adam_sde's rescaled betas and eps
        first, end = s(0), s(self.total_steps - 1)
        unit = "" if self.fixed else (" (steps of the reference batch, tau)" if self.rule == "adascale" else
                                     f" (steps at batch {self.global_batch:,}, counted in images)")
        lines.append(f"      LR {first:.4g} at step 0 -> peak {s.peak_lr:.4g} at step {s.ramp_steps} "
                     f"({self._ramp()}) -> {end:.4g} at step {self.total_steps - 1} ({s.decay} decay){unit}")
        lines += self._describe_batches()
        # short lines a terminal or a Slurm log shows whole; a long one continues indented under its first
        return "\n".join(textwrap.fill(line, 120, subsequent_indent=" " * 8, break_on_hyphens=False) for line in lines)

    def preview(self) -> list[tuple[float, int]]:
        """(LR, global batch) of every optimizer step, without training: what scripts/lr_schedule.py plots."""
        if self.batches.kind == "adaptive" or self.rule == "adascale":
            what = "batch_schedule=adaptive" if self.batches.kind == "adaptive" else "scaling=adascale"
            raise ConfigError(f"{what} decides the batch or LR from gradients measured during training, so it cannot "
                              f"be previewed: plot a run's realised batch, gain and LR with "
                              f"scripts/plot_noise_scale.py RUN_DIR")
        rows, step, images = [], 0, 0
        while not self.finished(step, images):
            batch = self.batch_at(images, None)
            rows.append((self.lr(step, images, batch), batch))
            step, images = step + 1, images + batch
        return rows

    def _describe_batches(self) -> list[str]:
        b = self.batches
        lines = []
        if b.kind == "ramp" and b.varies:
            stages = (b.batch - b.start) // b.increment
            lines.append(f"      batch ramp: {b.start:,} -> {b.batch:,} in {plural(stages, 'stage')} of +{b.increment:,} "
                         f"over {b.ramp_images:,} images; " + (
                             "the LR follows AdaScale's gain at the current batch" if self.rule == "adascale" else
                             f"the LR follows the {self.rule} rule at the current batch "
                             f"({self.lr(0, 0, b.start):.4g} at {b.start:,} in step 0)"))
        elif b.kind == "step" and b.varies:
            sizes = [b.at(m) for m in b.milestones]
            lines.append(f"      batch steps (Smith et al.): {b.start:,} x{b.factor:g} at images "
                         f"{', '.join(f'{m:,}' for m in b.milestones)} -> {', '.join(f'{x:,}' for x in sizes)}; the LR "
                         f"is not rescaled" + (f", and decays x{b.lr_residual(b.milestones[-1]):.4g} where the cap "
                                               f"{b.batch:,} stops the batch" if b.milestones and
                                               b.lr_residual(b.milestones[-1]) < 1 else ""))
        elif b.kind == "adaptive":
            lines.append(f"      adaptive batch: clamp({b.k:g} x B_simple, {b.start:,}, {b.batch:,}) in multiples of "
                         f"{b.multiple:,}, decided every {plural(b.every, 'step')} from a probe of "
                         f"{self.probe_micro * self.micro_batch} images per rank; the LR follows "
                         + ("AdaScale's gain" if self.rule == "adascale" else f"the {self.rule} rule")
                         + " at the current batch")
        if self.rule == "adascale":
            lines.append(f"      AdaScale: the reference schedule (lr {self.base_lr:g} at batch {self.ref_batch}, "
                         f"{plural(self.total_steps, 'step')}) times the measured gain r in [1, batch/"
                         f"{self.ref_batch}]; tau advances by r per step and the run ends at tau = {self.total_steps:,}")
        if not self.fixed and self.rule != "adascale":
            bound = "exactly" if b.kind != "adaptive" else "at most"
            lines.append(f"      {self.total_images:,} images (the budget of batch {self.global_batch:,} for "
                         f"{self.total_steps:,} steps) in {bound} {plural(self.run_steps, 'step')}")
        return lines

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


# Keywords many optimizer classes share, with the range outside which no run can work, for classes that do not
# check them themselves (torch's SGD and RMSprop take momentum=1.5: a buffer that never forgets, a step that grows).
SHARED_KEYWORD_RANGES = {"momentum": (0.0, 1.0), "dampening": (0.0, 1.0)}


def _check_constructor(plan: Plan) -> None:
    """Build the optimizer on a dummy parameter: its own TypeError / ValueError is the one line."""
    for key, (lo, hi) in SHARED_KEYWORD_RANGES.items():
        value = plan.optimizer_kwargs.get(key)
        if isinstance(value, (int, float)) and not lo <= value < hi:
            raise ConfigError(f"optim.{key}={value:g} is invalid: {key} must lie in [{lo:g}, {hi:g})")
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
    probe = cfg.batch_schedule.probe if batches.kind == "adaptive" else None
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


def _check_measured(cfg, plan: "Plan") -> None:
    """adaptive and adascale act on the gradient-noise estimate: they need a small-batch gradient inside every
    step, and unscaled gradients."""
    adaptive, adascale = plan.batches.kind == "adaptive", plan.rule == "adascale"
    if not (adaptive or adascale):
        return
    what = "batch_schedule=adaptive" if adaptive else "scaling=adascale"
    if cfg.precision == "fp16":
        raise ConfigError(f"{what} measures gradient norms, which fp16's loss scaling distorts: use precision=bf16 "
                          f"or fp32")
    smallest = min(plan.batches.sizes()) // plan.world_size
    if adaptive:
        probe = cfg.batch_schedule.probe
        if probe % plan.micro_batch or not probe < smallest:
            raise ConfigError(f"batch_schedule.probe={probe} must be a multiple of micro_batch={plan.micro_batch} "
                              f"and below the smallest per-rank batch ({smallest}): the noise scale compares the "
                              f"probe's gradient with the whole step's")
        plan.probe_micro = probe // plan.micro_batch
    elif smallest < 2 * plan.micro_batch:
        raise ConfigError(f"scaling=adascale estimates its gain from micro-batch and global-batch gradients, so "
                          f"every per-rank batch needs 2 or more micro-batches: at batch {min(plan.batches.sizes())} "
                          f"x ranks {plan.world_size} use micro_batch <= {smallest // 2}")
    if adascale:
        if not issubclass(plan.optimizer_cls, torch.optim.SGD):
            raise ConfigError(f"scaling=adascale is defined for momentum SGD (Johnson et al. 2020), not for "
                              f"{plan.optimizer_target}: use optim=sgd, or another scaling rule")
        if plan.batches.kind == "step":
            raise ConfigError("batch_schedule=step replaces the LR decay by batch growth and scaling=adascale sets the "
                              "LR from its gain: use one of them")


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
    total_steps = max(int(round(cfg.epochs * steps_per_epoch)), 1)
    batches = _batch_schedule(cfg, total_steps, train_size)
    micro = _micro_batch(cfg, batches, world_size)
    micro_common = math.gcd(*(b // world_size for b in batches.sizes()))

    o, rule, ref_batch = cfg.optim, cfg.scaling.rule, cfg.scaling.ref_batch
    cls = optimizer_class(o.target)
    # the batch whose scaling sets the peak LR: the target, or the start under batch_schedule=step (Smith et al.)
    lr_batch = batches.start if batches.kind == "step" else global_batch
    peak_lr = o.lr * lr_multiplier(rule, lr_batch, ref_batch)
    kwargs, notes = _scaled_kwargs(cls, o.kwargs, rule, lr_batch, ref_batch)

    # the LR schedule's unit: an optimizer step at the target batch, or under AdaScale a step at ref_batch
    unit_batch = ref_batch if rule == "adascale" else global_batch
    unit_steps_per_epoch = max(train_size // unit_batch, 1)
    horizon = max(int(round(cfg.epochs * unit_steps_per_epoch)), 1) if rule == "adascale" else total_steps
    schedule = _lr_schedule(cfg, o.lr if rule == "adascale" else peak_lr, horizon, unit_batch, unit_steps_per_epoch)
    warmup_steps = schedule.warmup_steps
    plan = Plan(global_batch, micro, per_rank // micro, world_size, train_size, steps_per_epoch, horizon,
                0, warmup_steps, rule, ref_batch, o.lr, peak_lr, o.weight_decay, o.target, cls, kwargs, schedule,
                notes, batches=batches, max_steps=cfg.max_steps, micro_common=micro_common)
    plan.run_steps = _run_steps(plan)
    if (cfg.data.repeated_aug or 0) > 1 and cfg.data.name != "imagenet":
        raise ConfigError(f"data.repeated_aug={cfg.data.repeated_aug} is DeiT's sampler for the ImageNet loader under "
                          f"DDP; the in-memory datasets do not offer it: set data.repeated_aug=0")
    if cfg.data.auto_augment is not None and cfg.data.name != "imagenet":
        raise ConfigError(f"data.auto_augment={cfg.data.auto_augment} runs per image in DataLoader workers (data=imagenet); "
                          f"for the in-memory datasets it would cost about 1-2 ms per image in the training process "
                          f"(measured here: about 10x a default step), so it is not offered: set data.auto_augment=null")
    if not plan.fixed and (cfg.data.repeated_aug or 0) > 1:
        raise ConfigError(f"data.repeated_aug={cfg.data.repeated_aug} deals each global batch's copies to ranks and "
                          f"needs a constant batch; batch_schedule={batches.kind} / scaling={rule} change it during "
                          f"the run: set data.repeated_aug=0 or batch_schedule=constant with a fixed scaling rule")
    _check_measured(cfg, plan)
    _check_constructor(plan)
    return plan


def _run_steps(plan: Plan) -> int:
    """The steps this run takes: exact for the deterministic batch schedules, an upper bound for adaptive (every
    step at ``start``) and AdaScale (a gain of 1 throughout)."""
    cap = plan.max_steps or math.inf
    if plan.rule == "adascale":
        return int(min(plan.total_steps, cap))
    if plan.fixed:
        return int(min(plan.total_steps, cap))
    if plan.batches.kind == "adaptive":
        return int(min(-(-plan.total_images // plan.batches.start), cap))
    steps, images = 0, 0
    while images < plan.total_images and steps < cap:
        images += plan.batches.at(images)
        steps += 1
    return steps
