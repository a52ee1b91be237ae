"""The per-step micro-batch iterator the loop reads: for each optimizer step, the schedule's ``Step`` and this rank's
micro-batches, ready (normalised, augmented, mixed, in the model's memory format)."""
from __future__ import annotations

import itertools

import torch

from .sampling import stream_indices
from .transforms import Augment, make_mix


def training_steps(data, schedule, cfg, rank: int, device):
    """``(step, micro_batches)`` for every optimizer step from where ``schedule`` stands to the run's last.

    ``micro_batches`` yields this rank's (x, y) pairs of that step, normalised, augmented (a pure function of
    (seed, step)) and in the memory format the model wants: the loop sees only ready tensors. The steps come in
    groups the schedule knows ahead (``steps_ahead``: the rest of the epoch, or one step where the batch or LR
    depends on this step's gradients), asked for after the loop has advanced it past the previous group, so an
    adaptive batch decided after step t sizes step t + 1. Under a constant batch they walk the epochs' global
    batches (the last partial one dropped); under a batch schedule, the image stream (``stream_indices``).
    """
    augment = Augment(cfg.data.crop_padding or 0, bool(cfg.data.hflip)) if cfg.data.augment else None
    mix = make_mix(cfg.data, data.num_classes)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    plan = schedule.plan

    def ready(stream, count):
        return ((x.contiguous(memory_format=memory_format), y) for x, y in itertools.islice(stream, count))

    while not schedule.finished:
        ahead = schedule.steps_ahead(data.train_size)
        if schedule.fixed_batch:
            epoch, first = divmod(ahead[0].index, plan.steps_per_epoch)
            stream = data.train_micro_batches(epoch, first, plan, rank, cfg.seed, augment, device, mix)
        else:
            stream = data.stream_micro_batches(
                [(s.index, stream_indices(data.train_size, cfg.seed, s.images, s.batch, data.order))
                 for s in ahead],
                plan.micro_batch, plan.world_size, rank, cfg.seed, augment, device, mix)
        for step in ahead:
            yield step, ready(stream, step.accum_steps)
