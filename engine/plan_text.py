"""The plan as the few lines train.py and the preflight print: what a user checks before spending a cluster on it."""
from __future__ import annotations

import textwrap

from optim import UNSCALED


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def describe(plan) -> str:
    s, schedule = plan.lr_schedule, plan.schedule_class(plan)
    if schedule.fixed_batch:
        lines = [f"plan: global batch {plan.global_batch:,} = micro {plan.micro_batch} x accum {plan.accum_steps} "
                 f"x ranks {plan.world_size}; {plural(plan.steps_per_epoch, 'step')}/epoch, "
                 f"{plural(plan.total_steps, 'step')} in all"
                 + (f" (stopping at {plan.run_steps:,})" if plan.run_steps < plan.total_steps else "")]
    elif plan.batches.varies:
        lines = [f"plan: target global batch {plan.global_batch:,} = micro {plan.micro_batch} x accum "
                 f"{plan.accum_steps} x ranks {plan.world_size}; the batch changes during the run (below)"]
    else:
        lines = [f"plan: global batch {plan.global_batch:,} = micro {plan.micro_batch} x accum {plan.accum_steps} "
                 f"x ranks {plan.world_size}; the LR follows {schedule.follows()} (below)"]
    dropped = plan.train_size - schedule.epoch_images
    if dropped:
        lines.append(f"      {dropped:,} of {plan.train_size:,} images ({dropped / plan.train_size:.0%}) are left "
                     f"out of each epoch (the last partial batch): an epoch is "
                     f"{schedule.epoch_images / plan.train_size:.2f} passes' worth")
    if plan.rule in UNSCALED:
        lr = f"global LR {plan.peak_lr:g} (no scaling)"
    else:
        lr = (f"lr {plan.base_lr:g} @ batch {plan.ref_batch} x {plan.peak_lr / plan.base_lr:.4g} ({plan.rule} "
              f"rule) = peak {plan.peak_lr:g}")
    lines.append(f"      {plan.optimizer_name}: {lr}")
    lines += [f"      {note}" for note in plan.notes]  # e.g. adam_sde's rescaled betas and eps
    first, end = s(0), s(plan.total_steps - 1)
    lines.append(f"      LR {first:.4g} at step 0 -> peak {s.peak_lr:.4g} at step {s.ramp_steps} "
                 f"({_ramp(s)}) -> {end:.4g} at step {plan.total_steps - 1} ({s.decay} decay){schedule.unit()}")
    b = plan.batches
    follows = schedule.follows() + " at the current batch"
    if b.varies and b.scales_lr and not (b.measured or schedule.measures_gain):  # known ahead: say where it starts
        follows += f" ({schedule.next_step().lr:.4g} at {b.first:,} in step 0)"
    if line := b.describe(follows, plan.probe_micro * plan.micro_batch):
        lines.append(f"      {line}")
    lines += [f"      {line}" for line in schedule.describe()]
    # short lines a terminal or a Slurm log shows whole; a long one continues indented under its first
    return "\n".join(textwrap.fill(line, 120, subsequent_indent=" " * 8, break_on_hyphens=False) for line in lines)


def _ramp(s) -> str:
    if s.decay == "onecycle":
        return "onecycle's own ramp"
    if s.decay == "inverse_sqrt":
        return "inverse_sqrt's own linear ramp"
    return f"{s.warmup} warmup" if s.uses_warmup else "no warmup"
