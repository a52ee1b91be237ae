"""Fashion-MNIST from its IDX files: ``data.root``, the Debian package, or torchvision's download (cached)."""
from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import torch

from .data import DOWNLOAD_CACHE, TensorData
from .errors import ConfigError

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                       "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


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


def _local_files(root: str | None) -> tuple[dict[str, Path], str] | None:
    """The IDX files on this machine and where they are, in load_fashion_mnist's order (no download)."""
    if root is not None:
        files = _find_idx(Path(root))
        return (files, root) if files is not None else None
    for folder in (Path(FASHION_MNIST_DEBIAN), DOWNLOAD_CACHE):
        if (files := _find_idx(folder)) is not None:
            return files, str(folder)
    return None


def load_fashion_mnist_once(root: str | None) -> TensorData:
    """load_fashion_mnist, read once per process while its files stay the same (size and mtime): the preflight's
    check and the run then share one read (about 0.3 s of decompression)."""
    found = _local_files(root)
    if found is None:
        return load_fashion_mnist(root)  # its error, or the download
    stamp = tuple((k, str(p), p.stat().st_size, p.stat().st_mtime_ns) for k, p in sorted(found[0].items()))
    return _load_stamped(root, stamp)


@functools.lru_cache(maxsize=1)
def _load_stamped(root: str | None, stamp: tuple) -> TensorData:
    return load_fashion_mnist(root)


def load_fashion_mnist(root: str | None) -> TensorData:
    """Found in this order: ``data.root``; the Debian package; torchvision's download (cached)."""
    if (found := _local_files(root)) is not None:
        return _fashion_from(*found)
    if root is not None:
        raise ConfigError(f"data.root={root} holds no Fashion-MNIST IDX files "
                          f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")
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
