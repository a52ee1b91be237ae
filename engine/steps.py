"""The per-step micro-batch iterator the loop reads: for each optimizer step, its global batch size and this rank's
micro-batches, ready (normalised, augmented, mixed, in the model's memory format)."""
from __future__ import annotations

import itertools

import torch

from .sampling import stream_indices
from .transforms import Augment, make_mix


def training_steps(data, plan, cfg, rank: int, device, state):
    """``(step, batch, micro_batches)`` for every optimizer step from ``state``'s to the run's last.

    ``micro_batches`` yields this rank's (x, y) pairs of that step, normalised, augmented (a pure function of
    (seed, step)) and in the memory format the model wants: the loop sees only ready tensors. Under a constant
    batch the steps walk the epochs' global batches (the last partial one dropped); under a batch schedule they
    walk the image stream (``stream_indices``), as many steps at a time as are known ahead (``steps_ahead``), reading
    ``state`` before each group, so an adaptive batch decided after step t sizes step t + 1.
    """
    augment = Augment(cfg.data.crop_padding or 0, bool(cfg.data.hflip)) if cfg.data.augment else None
    mix = make_mix(cfg.data, data.num_classes)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def ready(stream, count):
        return ((x.contiguous(memory_format=memory_format), y) for x, y in itertools.islice(stream, count))

    if plan.fixed:
        step = state.step
        while step < plan.run_steps:
            epoch, first = divmod(step, plan.steps_per_epoch)
            stream = data.train_micro_batches(epoch, first, plan, rank, cfg.seed, augment, device, mix)
            for step in range(step, min((epoch + 1) * plan.steps_per_epoch, plan.run_steps)):
                yield step, plan.global_batch, ready(stream, plan.accum_steps)
            step += 1
        return
    while not plan.finished(state.at):
        ahead = steps_ahead(plan, state, data.train_size)
        stream = data.stream_micro_batches([(step, stream_indices(data.train_size, cfg.seed, images, batch))
                                           for step, images, batch in ahead],
                                          plan.micro_batch, plan.world_size, rank, cfg.seed, augment, device, mix)
        for step, _, batch in ahead:
            yield step, batch, ready(stream, plan.accum_at(batch))


def steps_ahead(plan, state, train_size: int) -> list[tuple[int, int, int]]:
    """(step, images before it, its batch) of the steps whose batches are known now: the next one under
    a measured batch or clock (they depend on this step's gradients), else the steps that start in the current epoch,
    so a loader with workers reads on across their boundaries."""
    at, epoch = state.at, state.images // train_size
    ahead = []
    while not plan.finished(at) and at.images // train_size == epoch:
        batch = plan.batch_at(at.images, state.batch)
        ahead.append((at.step, at.images, batch))
        if plan.measures_noise:
            break
        at = at.advanced(batch)
    return ahead
