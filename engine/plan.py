"""The run's arithmetic, decided before any work: batch split, step counts, scaled hyperparameters, LR schedule.

Used by train.py and scripts/lr_schedule.py alike, so the preview can never disagree with training.
"""
from __future__ import annotations

from dataclasses import dataclass

from optim import LRSchedule, lr_multiplier, scale_adam

from .config import ConfigError, parse_batch

MICRO_BATCH_CAP = 256  # automatic micro-batch: the largest divisor of the per-rank batch that is <= this


def _value(x):
    return x.value if hasattr(x, "value") else x


def auto_micro_batch(per_rank: int, cap: int = MICRO_BATCH_CAP) -> int:
    """Largest divisor of ``per_rank`` that is <= cap (256 divides every power-of-two batch >= 256)."""
    for m in range(min(per_rank, cap), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


@dataclass
class Plan:
    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int
    steps_per_epoch: int
    total_steps: int       # the schedule's horizon: epochs x steps_per_epoch
    run_steps: int         # steps this run takes: total_steps, or max_steps if smaller
    warmup_steps: int
    rule: str
    ref_batch: int
    base_lr: float
    peak_lr: float
    betas: tuple[float, float]
    eps: float
    schedule: LRSchedule

    def describe(self, optim_name: str) -> str:
        s = self.schedule
        ramp = {"onecycle": f"onecycle's own ramp ({s.ramp_steps} steps)",
                "inverse_sqrt": f"inverse_sqrt's own linear ramp ({s.warmup_steps} steps)"}.get(
            s.decay, f"{s.warmup} warmup {s.warmup_steps} steps" if s.uses_warmup else "no warmup")
        return (f"plan: global batch {self.global_batch} = micro {self.micro_batch} x accum {self.accum_steps} x "
                f"ranks {self.world_size} | {self.steps_per_epoch} steps/epoch, {self.total_steps} steps total"
                f"{f' (stopping at {self.run_steps})' if self.run_steps < self.total_steps else ''} | {ramp}, "
                f"{s.decay} decay | {optim_name} lr {self.base_lr:g} @ batch {self.ref_batch} -> peak "
                f"{self.peak_lr:g} ({self.rule} rule, x{self.peak_lr / self.base_lr:g})")


def make_plan(cfg, train_size: int, world_size: int = 1) -> Plan:
    global_batch = parse_batch(cfg.batch)
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

    rule, ref_batch = _value(cfg.scaling.rule), cfg.scaling.ref_batch
    base_lr = cfg.optim.lr
    multiplier = lr_multiplier(rule, global_batch, ref_batch)
    peak_lr = base_lr * multiplier
    betas, eps = tuple(cfg.optim.betas), cfg.optim.eps
    if rule == "adam_sde":
        try:
            betas, eps = scale_adam(betas, eps, global_batch, ref_batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    w = cfg.warmup
    warmup_name = _value(w.name)
    if w.steps is not None:
        warmup_steps = w.steps
    else:
        epochs = w.epochs or 0.0
        if w.scale_with_batch:
            epochs *= global_batch / ref_batch
        warmup_steps = int(round(epochs * steps_per_epoch))
    if warmup_name != "none" and warmup_steps >= total_steps and _value(cfg.schedule.name) != "onecycle":
        raise ConfigError(f"warmup of {warmup_steps} steps (warmup.epochs={w.epochs}, warmup.steps={w.steps}) is as "
                          f"long as the run or longer ({total_steps} steps = epochs {cfg.epochs} x "
                          f"{steps_per_epoch} steps/epoch): shorten the warmup, or use warmup=none")
    # Goyal et al.: gradual warmup starts at, and constant warmup stays at, the small-batch (unscaled) LR
    start_factor = base_lr / peak_lr if w.start_at_ref_lr else w.start_factor
    constant_factor = base_lr / peak_lr if w.start_at_ref_lr else w.factor

    sc = cfg.schedule
    if sc.milestone_epochs:
        milestones = tuple(int(round(e * steps_per_epoch)) for e in sc.milestone_epochs)
    else:
        fractions = sc.milestones if sc.milestones is not None else [1 / 3, 2 / 3, 8 / 9]
        milestones = tuple(int(round(f * total_steps)) for f in fractions)
    try:
        schedule = LRSchedule(peak_lr=peak_lr, total_steps=total_steps, warmup=warmup_name,
                              warmup_steps=warmup_steps, start_factor=start_factor, constant_factor=constant_factor,
                              exp_ratio=w.ratio, decay=_value(sc.name), min_factor=sc.min_factor,
                              milestones=milestones, gamma=sc.gamma, power=sc.power, pct_start=sc.pct_start,
                              div_factor=sc.div_factor, final_div_factor=sc.final_div_factor,
                              cycle_momentum=sc.cycle_momentum, base_momentum=sc.base_momentum,
                              max_momentum=sc.max_momentum)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Plan(global_batch, micro, per_rank // micro, world_size, steps_per_epoch, total_steps, run_steps,
                warmup_steps, rule, ref_batch, base_lr, peak_lr, betas, eps, schedule)
