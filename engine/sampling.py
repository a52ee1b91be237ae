"""The order a run sees its images in: a pure function of (seed, epoch), or of (seed, images seen) under a
changing batch, whatever the micro-batch, the number of ranks or the resumes."""
from __future__ import annotations

import functools

import torch

from .seeds import epoch_order_seed


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set used in ``epoch`` (CPU, int64)."""
    g = torch.Generator().manual_seed(epoch_order_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def grouped_order(shard_of: torch.Tensor, shards: int, group: int, seed: int, epoch: int) -> torch.Tensor:
    """For images in shards (``shard_of[i]``: the shard of position i): the epoch's shards in a random order, then
    the images of each run of ``group`` of them in a random order, so a loader reads ``group`` shards at a time.
    A pure function of (seed, epoch); one group of every shard is ``epoch_order`` itself."""
    n = len(shard_of)
    if group >= shards:
        return epoch_order(n, seed, epoch)
    g = torch.Generator().manual_seed(epoch_order_seed(seed, epoch))
    place = torch.empty(shards, dtype=torch.long)
    place[torch.randperm(shards, generator=g)] = torch.arange(shards)  # each shard's place in the epoch
    group_of = place[shard_of] // group
    members = torch.sort(group_of, stable=True).indices  # each group's positions, ascending
    counts = torch.bincount(group_of, minlength=-(-shards // group)).tolist()
    return torch.cat([part[torch.randperm(len(part), generator=g)] for part in members.split(counts)])


def stream_indices(n: int, seed: int, start: int, count: int, order=epoch_order) -> torch.Tensor:
    """Images ``start .. start + count`` of the run's image stream: the epochs' permutations (``order(n, seed,
    epoch)``) one after another (a batch may straddle two epochs). Used when the batch changes during a run, so the
    images a run sees are a pure function of (seed, batch schedule), whatever the micro-batch or number of ranks."""
    parts = []
    while count > 0:
        epoch, offset = divmod(start, n)
        take = min(count, n - offset)
        parts.append(order(n, seed, epoch)[offset:offset + take])
        start, count = start + take, count - take
    return torch.cat(parts)


def global_batches(n: int, global_batch: int, seed: int, epoch: int, order=epoch_order) -> list[torch.Tensor]:
    """Index tensors of every full global batch of ``epoch``, in order."""
    images = order(n, seed, epoch)
    return list(images[: (n // global_batch) * global_batch].split(global_batch))
