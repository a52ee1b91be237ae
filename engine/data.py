"""Datasets held in memory as uint8 tensors, with batched augmentation on the training device.

Every dataset exposes ``train_x``/``train_y``/``test_x``/``test_y`` (images uint8 N x C x H x W, labels int64),
``mean``/``std`` per channel and ``num_classes``; the model reads its input shape from here.

Batch order is a pure function of (seed, epoch): a seeded permutation per epoch, cut into global batches (the last
partial batch dropped, so every optimizer step sees exactly ``global_batch`` images). Augmentation parameters are
a pure function of (seed, step) drawn for the whole global batch, then sliced: so what a run sees depends only on
``seed`` and ``batch``, never on ``micro_batch`` or the number of ranks, and a resumed run sees the same images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .errors import ConfigError
from .sampling import epoch_order, global_batches
from .transforms import Augment, Mix, normalize, to_device

DOWNLOAD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "large-batch-recipes"


class TrainData(Protocol):
    """What the loop and train.py read from a dataset, in memory (TensorData) or on disk (ImageFolderData)."""
    source: str
    num_classes: int
    train_size: int
    image_shape: tuple[int, int, int]

    def to(self, device) -> TrainData: ...

    def order(self, n: int, seed: int, epoch: int) -> torch.Tensor: ...  # the epoch's order (engine/sampling.py)

    def train_micro_batches(self, epoch: int, first_step: int, plan, rank: int, seed: int, augment, device,
                            mix=None) -> Iterator: ...

    def stream_micro_batches(self, steps: list, micro_batch: int, world_size: int, rank: int, seed: int, augment,
                             device, mix=None) -> Iterator: ...

    def test_batches(self, rank: int, world_size: int, device, chunk: int = ...) -> Iterator: ...


@dataclass
class TensorData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    test_split: "TensorData | None" = None  # with a held-out validation split: the test split alone, for test_*

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    order = staticmethod(epoch_order)  # each epoch a permutation of (seed, epoch)

    def to(self, device) -> "TensorData":
        """Move everything to ``device`` once (uint8: 47 MB for Fashion-MNIST), so batches are index ops there."""
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return TensorData(**move, num_classes=self.num_classes, mean=self.mean, std=self.std, source=self.source,
                          test_split=self.test_split)  # the test split moves at the end, when it is read

    def split_validation(self, n: int) -> "TensorData":
        """The same data with ``n`` training images held out as the evaluation split (``held_out``); the test split
        stays aside, as ``test_split`` (no training images: the full set is not kept), for the final ``test_*``."""
        train, val = held_out(self.train_size, n)
        return TensorData(self.train_x[train], self.train_y[train], self.train_x[val], self.train_y[val],
                          num_classes=self.num_classes, mean=self.mean, std=self.std,
                          source=f"{self.source}, {n} training images held out",
                          test_split=TensorData(self.train_x[:0], self.train_y[:0], self.test_x, self.test_y,
                                                self.num_classes, self.mean, self.std, self.source))

    def train_micro_batches(self, epoch: int, first_step: int, plan, rank: int, seed: int, augment: "Augment | None",
                            device, mix: "Mix | None" = None):
        """(x, y) of this rank's micro-batches, step after step, from ``first_step`` of ``epoch`` to its end.

        Generated lazily: nothing proportional to the global batch is held beyond one index tensor.
        """
        for i, index in enumerate(global_batches(self.train_size, plan.global_batch, seed, epoch, self.order)
                                  [first_step:]):
            step = epoch * plan.steps_per_epoch + first_step + i
            yield from self.one_step_micro_batches(index, step, plan.micro_batch, plan.world_size, rank, seed, augment,
                                               device, mix)

    def one_step_micro_batches(self, index: torch.Tensor, step: int, micro_batch: int, world_size: int, rank: int,
                           seed: int, augment: "Augment | None", device, mix: "Mix | None" = None):
        """This rank's micro-batches of one step, whose global batch is the images ``index``. Augmentation (and
        MixUp/CutMix partners) are drawn for the whole global batch (a pure function of seed and step), then sliced."""
        per_rank = len(index) // world_size
        aug = augment.draw(len(index), seed, step) if augment else None
        partner = mix.partners(len(index), seed, step) if mix else None
        index, aug, partner = (to_device(t, device) for t in (index, aug, partner))  # once per step, not per image
        for k in range(per_rank // micro_batch):
            at = torch.arange(rank * per_rank + k * micro_batch, rank * per_rank + (k + 1) * micro_batch,
                              device=index.device)
            x, y = self._images(index, at, aug, augment, device)
            if mix is not None:
                x, y = mix.apply(x, y, *self._images(index, partner[at], aug, augment, device), seed, step)
            yield x, y

    def stream_micro_batches(self, steps: list, micro_batch: int, world_size: int, rank: int, seed: int,
                            augment: "Augment | None", device, mix: "Mix | None" = None):
        """``one_step_micro_batches`` of several ``(step, index)`` in a row (built lazily, one step at a time)."""
        for step, index in steps:
            yield from self.one_step_micro_batches(index, step, micro_batch, world_size, rank, seed, augment, device, mix)

    def _images(self, index, at, aug, augment, device):
        """Normalised, augmented images (and labels) at positions ``at`` of the global batch ``index``."""
        part = index[at]
        x = self.train_x[part].to(device, non_blocking=True)
        if augment is not None:
            x = augment.apply(x, aug[at])
        return normalize(x, self.mean, self.std), self.train_y[part].to(device, non_blocking=True)

    def test_batches(self, rank: int, world_size: int, device, chunk: int = 1024):
        """The test split in chunks, each rank a strided share."""
        idx = torch.arange(rank, len(self.test_y), world_size)
        for part in idx.split(chunk):
            x = normalize(self.test_x[part].to(device, non_blocking=True), self.mean, self.std)
            yield x, self.test_y[part].to(device, non_blocking=True)


def check_val_split(n: int, train_size: int) -> None:
    if n and n >= train_size:
        raise ConfigError(f"data.val_split={n} must be below the training set's {train_size} images (a smaller count, "
                          f"or 0 to evaluate on the test split)")


def held_out(train_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) with ``n`` of ``train_size`` images held out. The held-out images are
    fixed (a seed of their own), so every run, seed and batch validates on the same ones."""
    check_val_split(n, train_size)
    order = torch.randperm(train_size, generator=torch.Generator().manual_seed(2_718_281))
    return order[n:].sort().values, order[:n].sort().values


# --- synthetic ------------------------------------------------------------------------------------------------------

def make_synthetic(train_size: int, test_size: int, image_size: int, channels: int, num_classes: int,
                   seed: int = 0) -> TensorData:
    """Deterministic random images: uniform noise plus a brightness offset set by the class, so it is learnable."""
    g = torch.Generator().manual_seed(12345 + seed)

    def split(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        # uint8 draws are the int64 draws (one 32-bit number each), at a third of the time and an eighth of the memory
        x = torch.randint(0, 64, (n, channels, image_size, image_size), generator=g, dtype=torch.uint8)
        x += (y * 191 // max(num_classes - 1, 1)).to(torch.uint8)[:, None, None, None]
        return x, y

    train_x, train_y = split(train_size)
    test_x, test_y = split(test_size)
    return TensorData(train_x, train_y, test_x, test_y, num_classes=num_classes, mean=(0.5,) * channels,
                      std=(0.3,) * channels, source="synthetic")


