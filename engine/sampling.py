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


def stream_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Images ``start .. start + count`` of the run's image stream: the epochs' permutations one after another
    (a batch may straddle two epochs). Used when the batch changes during a run, so the images a run sees are a
    pure function of (seed, batch schedule), whatever the micro-batch or number of ranks."""
    parts = []
    while count > 0:
        epoch, offset = divmod(start, n)
        take = min(count, n - offset)
        parts.append(epoch_order(n, seed, epoch)[offset:offset + take])
        start, count = start + take, count - take
    return torch.cat(parts)


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index tensors of every full global batch of ``epoch``, in order."""
    order = epoch_order(n, seed, epoch)
    return list(order[: (n // global_batch) * global_batch].split(global_batch))
