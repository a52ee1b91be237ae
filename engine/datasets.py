"""The dataset registry: each dataset declares how it loads, its training-set size without loading, its cheap
preflight check, and whether it lives in memory. Adding a dataset is an entry here and a conf/data/NAME.yaml
(tests/test_structure.py keeps the two equal); nothing else asks a dataset's name.

In memory (Fashion-MNIST, CIFAR, synthetic): uint8 tensors, batched augmentation on the device, `data.val_split`.
On disk (ImageNet folders): decoded per image in DataLoader workers or on the device, with per-image policies
(`data.auto_augment`), repeated augmentation (`data.repeated_aug`) and its own val/ folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import datasets_disk as disk
from .data import TrainData, check_val_split, make_synthetic
from .distributed import env_local_rank
from .errors import ConfigError
from .fashion_mnist import load_fashion_mnist_once
from .shards import MANIFEST, check_shards, is_url, read_manifest


@dataclass(frozen=True)
class Dataset:
    load: Callable[..., TrainData]         # cfg.data -> the data (train and test splits)
    train_size: Callable[..., int]         # cfg.data -> training images, without loading
    check: Callable[..., None]             # cfg.data -> None, or a ConfigError before any run dir exists
    shape: Callable[..., tuple]            # cfg.data -> ((channels, height, width), classes), without loading
    in_memory: bool = True                 # False: per-image decoding, auto_augment, repeated_aug, decode


def _fashion_train_size(root: str | None) -> int:
    """Read by the preflight (once per process, as the run's own load): a corrupt file is refused before any run
    dir, and the plan is made for the images the files hold (an IDX set of 100 images is not 60,000)."""
    return load_fashion_mnist_once(root).train_size


def _fashion_size_for_plan(root: str | None) -> int:
    try:
        return _fashion_train_size(root)
    except ConfigError:  # missing or damaged: the data check says so; the LR preview needs no data
        return 60_000


def _imagenet_classes(cfg_data) -> int:
    """The class folders of train/ or the shards' classes (the model's output size), or ImageNet-1k's 1000 where
    there is no data yet."""
    root = cfg_data.root
    if cfg_data.format == "shards":
        known = root and (is_url(root) or (Path(root) / MANIFEST).is_file())
        return len(read_manifest(root)["classes"]) if known else 1000
    train = Path(root or "") / "train"
    return sum(p.is_dir() for p in train.iterdir()) if root and train.is_dir() else 1000


def _check_imagenet(cfg_data) -> None:
    if cfg_data.format == "shards":  # one process per machine reads the shards for their checksums
        check_shards(cfg_data.root, checksums=env_local_rank() == 0)
    else:
        disk.check_imagenet(cfg_data.root)


DATASETS = {
    "fashion_mnist": Dataset(lambda c: load_fashion_mnist_once(c.root), lambda c: _fashion_size_for_plan(c.root),
                             lambda c: _fashion_train_size(c.root), lambda c: ((1, 28, 28), 10)),
    "cifar10": Dataset(lambda c: disk.load_cifar("cifar10", c.root), lambda c: 50_000,
                       lambda c: disk.check_cifar("cifar10", c), lambda c: ((3, 32, 32), 10)),
    "cifar100": Dataset(lambda c: disk.load_cifar("cifar100", c.root), lambda c: 50_000,
                        lambda c: disk.check_cifar("cifar100", c), lambda c: ((3, 32, 32), 100)),
    "imagenet": Dataset(disk.load_imagenet, lambda c: 1_281_167, _check_imagenet,
                        lambda c: ((3, 224, 224), _imagenet_classes(c)), in_memory=False),
    "synthetic": Dataset(lambda c: make_synthetic(c.train_size, c.test_size, c.image_size, c.channels,
                                                  c.num_classes),
                         lambda c: c.train_size, lambda c: None,
                         lambda c: ((c.channels, c.image_size, c.image_size), c.num_classes)),
}


def load_data(cfg_data) -> TrainData:
    """The dataset as configured: with ``data.val_split`` images held out of training for validation, and the
    untouched data kept aside as ``test_split``, read once at the end."""
    data = DATASETS[cfg_data.name].load(cfg_data)
    return data.split_validation(cfg_data.val_split) if cfg_data.val_split else data


def eval_split(cfg_data) -> str:
    """What evaluation during training reads: ``val`` (images held out of training, for selection) or ``test``."""
    return "val" if cfg_data.val_split else "test"


def check_data_available(cfg_data) -> None:
    """Cheap presence check (no training read) so a missing dataset is reported before any run dir exists."""
    DATASETS[cfg_data.name].check(cfg_data)


def train_size_of(cfg_data) -> int:
    """Training-set size without loading the data (held-out validation images excluded), for the plan and the
    schedule preview."""
    size = DATASETS[cfg_data.name].train_size(cfg_data)
    check_val_split(cfg_data.val_split, size)
    return size - (cfg_data.val_split or 0)


def data_shape(cfg_data) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), classes) of the configured dataset, without loading it."""
    return DATASETS[cfg_data.name].shape(cfg_data)


def in_memory(cfg_data) -> bool:
    return DATASETS[cfg_data.name].in_memory
