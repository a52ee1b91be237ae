"""Datasets held in memory as uint8 tensors, with batched augmentation on the training device.

Every dataset exposes ``train_x``/``train_y``/``test_x``/``test_y`` (images uint8 N x C x H x W, labels int64),
``mean``/``std`` per channel and ``num_classes``; the model reads its input shape from here.

Batch order is a pure function of (seed, epoch): a seeded permutation per epoch, cut into global batches (the last
partial batch dropped, so every optimizer step sees exactly ``global_batch`` images). Augmentation parameters are
a pure function of (seed, step) drawn for the whole global batch, then sliced: so what a run sees depends only on
``seed`` and ``batch``, never on ``micro_batch`` or the number of ranks, and a resumed run sees the same images.
"""
from __future__ import annotations

import functools
import gzip
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .errors import ConfigError

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                       "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
DOWNLOAD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "large-batch-recipes"


class TrainData(Protocol):
    """What the loop and train.py read from a dataset, in memory (TensorData) or on disk (ImageFolderData)."""
    source: str
    num_classes: int
    train_size: int
    image_shape: tuple[int, int, int]

    def to(self, device) -> TrainData: ...

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

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "TensorData":
        """Move everything to ``device`` once (uint8: 47 MB for Fashion-MNIST), so batches are index ops there."""
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return TensorData(**move, num_classes=self.num_classes, mean=self.mean, std=self.std, source=self.source)

    def split_validation(self, n: int) -> "TensorData":
        """The same data with ``n`` training images held out as the evaluation split (in place of the test split).
        The held-out images are fixed (a seed of their own), so every run, seed and batch validates on the same
        ones; the test split stays for the final ``test_*`` numbers."""
        if not 0 < n < self.train_size:
            raise ConfigError(f"data.val_split={n} must be below the training set's {self.train_size} images")
        order = torch.randperm(self.train_size, generator=torch.Generator().manual_seed(2_718_281))
        val, train = order[:n].sort().values, order[n:].sort().values
        return TensorData(self.train_x[train], self.train_y[train], self.train_x[val], self.train_y[val],
                          num_classes=self.num_classes, mean=self.mean, std=self.std,
                          source=f"{self.source}, {n} training images held out for validation")

    def train_micro_batches(self, epoch: int, first_step: int, plan, rank: int, seed: int, augment: "Augment | None",
                            device, mix: "Mix | None" = None):
        """(x, y) of this rank's micro-batches, step after step, from ``first_step`` of ``epoch`` to its end.

        Generated lazily: nothing proportional to the global batch is held beyond one index tensor.
        """
        for i, index in enumerate(global_batches(self.train_size, plan.global_batch, seed, epoch)[first_step:]):
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


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set used in ``epoch`` (CPU, int64)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
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


@dataclass
class Augment:
    """Random crop with zero padding and horizontal flip, drawn for a whole global batch at once."""
    padding: int = 2
    hflip: bool = True

    def draw(self, size: int, seed: int, step: int) -> torch.Tensor:
        """(size, 3) int64 rows of (dy, dx, flip) for global step ``step``: a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1)
        shifts = torch.randint(0, 2 * self.padding + 1, (size, 2), generator=g)
        flips = torch.randint(0, 2, (size, 1), generator=g) if self.hflip else torch.zeros(size, 1, dtype=torch.long)
        return torch.cat([shifts, flips], dim=1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Crop every image at its own offset and flip where asked: one gather, no Python loop over images."""
        n, c, h, w = x.shape
        p = self.padding
        params = params.to(x.device)
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = params[:, 0:1] + torch.arange(h, device=x.device)          # (n, h)
            cols = params[:, 1:2] + torch.arange(w, device=x.device)          # (n, w)
            cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)     # a flip reverses the column order
            idx_n = torch.arange(n, device=x.device)[:, None, None]
            x = padded[idx_n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        elif self.hflip:
            x = torch.where(params[:, 2].bool()[:, None, None, None], x.flip(3), x)
        return x.contiguous()


class Mix:
    """MixUp (Zhang et al. 2018) / CutMix (Yun et al. 2019) from torchvision.transforms.v2, on soft targets.

    torchvision mixes each image with its neighbour in the batch it is given, drawing lambda (and CutMix's box, and
    which of the two) from torch's global generator. To keep what a run sees independent of micro_batch and ranks,
    each image's partner is drawn from the whole global batch (a permutation, a pure function of seed and step), the
    pair is handed to torchvision interleaved (partner, image), and torchvision runs under a generator seeded by
    (seed, step): every micro-batch of a step shares one lambda and one box, as one big batch would.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        from torchvision.transforms import v2
        choices = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
            [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    @staticmethod
    def _seed(seed: int, step: int) -> int:
        return (seed * 7_919 + step * 104_729 + 2) % 2 ** 63

    def partners(self, size: int, seed: int, step: int) -> torch.Tensor:
        return torch.randperm(size, generator=torch.Generator().manual_seed(self._seed(seed, step)))

    def apply(self, x, y, x_partner, y_partner, seed: int, step: int):
        pairs = torch.stack([x_partner, x], 1).flatten(0, 1)   # p0, x0, p1, x1, ...: x_i's neighbour is p_i
        labels = torch.stack([y_partner, y], 1).flatten(0, 1)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed would also reseed CUDA's,
            torch.default_generator.manual_seed(self._seed(seed, step) + 1)  # and every rank's dropout would repeat
            mixed, soft = self.transform(pairs, labels)
        return mixed[1::2].contiguous(), soft[1::2]


def make_mix(cfg_data, num_classes: int) -> Mix | None:
    mixup, cutmix = cfg_data.mixup_alpha or 0.0, cfg_data.cutmix_alpha or 0.0
    return Mix(mixup, cutmix, num_classes) if mixup > 0 or cutmix > 0 else None


def normalize(x: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> normalised float, on whatever device x is on."""
    mean, std = _norm_constants(tuple(mean), tuple(std), x.device, dtype)
    return (x.to(dtype) - mean) / std


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple, std: tuple, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per device: a tensor made from Python numbers is a host-to-device copy on a GPU."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1) * 255,
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1) * 255)


def to_device(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """A step's small CPU tensor (indices, augmentation draws) onto the GPU without stalling it: pinned, then
    copied asynchronously (a copy from pageable memory waits for the GPU's queue to drain)."""
    if t is None or torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


# --- Fashion-MNIST -------------------------------------------------------------------------------------------------

def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally .gz): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:  # a truncated or non-gzip .gz, an unreadable file
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); replace it (apt-get install "
                          f"--reinstall dataset-fashion-mnist for the Debian copy)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ConfigError(f"{path} is truncated or malformed: its header is cut short")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise ConfigError(f"{path} is truncated or malformed: {len(data)} bytes, header says {expected}")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def _find_idx(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for cand in (folder / f"{stem}.gz", folder / stem, folder / "FashionMNIST" / "raw" / f"{stem}.gz",
                     folder / "FashionMNIST" / "raw" / stem):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


def _fashion_from(files: dict[str, Path], source: str) -> TensorData:
    t = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = t[f"{split}_x"], t[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ConfigError(f"Fashion-MNIST {split} files in {source} disagree: images {tuple(x.shape)}, "
                              f"labels {tuple(y.shape)}")
        if x.shape[1:] != t["train_x"].shape[1:]:
            raise ConfigError(f"Fashion-MNIST test images in {source} are {tuple(x.shape[1:])}, training images "
                              f"{tuple(t['train_x'].shape[1:])}: both splits must have one image size")
        if int(y.max()) >= 10:
            raise ConfigError(f"Fashion-MNIST {split} labels in {source} go up to {int(y.max())}; expected 0..9")
    return TensorData(t["train_x"].unsqueeze(1), t["train_y"].long(), t["test_x"].unsqueeze(1), t["test_y"].long(),
                      num_classes=10, mean=(0.2860,), std=(0.3530,), source=source)


def load_fashion_mnist(root: str | None) -> TensorData:
    """Found in this order: ``data.root``; the Debian package; torchvision's download (cached)."""
    if root is not None:
        files = _find_idx(Path(root))
        if files is None:
            raise ConfigError(f"data.root={root} holds no Fashion-MNIST IDX files "
                              f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")
        return _fashion_from(files, root)
    files = _find_idx(Path(FASHION_MNIST_DEBIAN))
    if files is not None:
        return _fashion_from(files, FASHION_MNIST_DEBIAN)
    files = _find_idx(DOWNLOAD_CACHE)
    if files is None:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(str(DOWNLOAD_CACHE), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(DOWNLOAD_CACHE), train=False, download=True)
            files = _find_idx(DOWNLOAD_CACHE)
        except Exception as e:  # offline, blocked, partial download
            raise ConfigError(f"Fashion-MNIST not found: data.root is not set, {FASHION_MNIST_DEBIAN} is missing "
                              f"(apt-get install dataset-fashion-mnist), and torchvision's download failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _fashion_from(files, str(DOWNLOAD_CACHE))


# --- synthetic ------------------------------------------------------------------------------------------------------

def make_synthetic(train_size: int, test_size: int, image_size: int, channels: int, num_classes: int,
                   seed: int = 0) -> TensorData:
    """Deterministic random images: uniform noise plus a brightness offset set by the class, so it is learnable."""
    g = torch.Generator().manual_seed(12345 + seed)

    def split(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.randint(0, 64, (n, channels, image_size, image_size), generator=g, dtype=torch.int64)
        x += (y * 191 // max(num_classes - 1, 1))[:, None, None, None]
        return x.to(torch.uint8), y

    train_x, train_y = split(train_size)
    test_x, test_y = split(test_size)
    return TensorData(train_x, train_y, test_x, test_y, num_classes=num_classes, mean=(0.5,) * channels,
                      std=(0.3,) * channels, source="synthetic")


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
