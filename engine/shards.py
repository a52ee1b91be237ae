"""ImageNet as WebDataset shards: the format scripts/make_shards.py writes, and the reader datasets_disk.py uses.

A shard is a tar of samples in the WebDataset layout (``KEY.jpg`` with ``KEY.cls``, the file's own suffix kept:
``.png``, ``.webp``), KEY the image's index in its split (the order torchvision's ImageFolder lists the folder
tree in), so index i of the shards is index i of the folders: the same (seed, epoch) order, the same crop of the
same bytes, and a resume lands where the folder reader's does. ``DST`` holds, per split, ``SPLIT-NNNNNN.tar`` and
wids' shard index ``SPLIT.json`` (``wids-shard-index-v1``: each shard's name and sample count, what random access
needs), and one ``manifest.json``: the class names, each split's labels, and each shard's sample count, size and
SHA-256. Samples are read by index through ``wids.IndexedTarSamples`` (the tar's headers indexed once per process,
the file memory-mapped).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import torch

from .errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = "webdataset-imagenet-1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
OPEN_SHARDS = 64  # per process: each is a memory map and a file descriptor


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, content)`` in this order whose bytes depend on nothing else (no times, owners or modes from
    the machine), so a shard written again is the same file, and a resumed writer can tell its own shards."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(content), 0, 0o444, 0, 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def local_file(root: str | Path, name: str) -> Path:
    """``root/name`` on this machine: the path itself, or for a URL root (``https://``, ``gs://``, ``file://``, any
    scheme wids' downloader takes) a copy in the cache ``$WIDS_CACHE`` (default /tmp/_wids_cache), fetched once by
    wids and renamed into place whole, under a lock that the loader workers share."""
    if not is_url(root):
        return Path(root) / name
    from wids.wids_dl import ULockFile, download_file
    cache = Path(os.environ.get("WIDS_CACHE", "/tmp/_wids_cache")) / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / name
    with ULockFile(str(local) + ".lock"):
        if not local.exists():
            tmp = local.with_name(f".{name}.tmp-{os.getpid()}")
            try:
                download_file(f"{str(root).rstrip('/')}/{name}", str(tmp))
                os.replace(tmp, local)
            except Exception as e:
                tmp.unlink(missing_ok=True)
                raise ConfigError(f"{str(root).rstrip('/')}/{name} cannot be fetched ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return local


def read_manifest(root: str | Path) -> dict:
    """The manifest of the shards at ``root``, parsed once per process while the file is unchanged (a run asks for
    it for the class count, the checks and the reader; ImageNet's holds 1.3 M labels)."""
    path = local_file(root, MANIFEST)
    if not path.is_file():
        raise ConfigError(f"data.root={root} holds no {MANIFEST}: write the shards with scripts/make_shards.py "
                          f"IMAGENET_FOLDER {root}")
    stat = path.stat()
    return _parsed_manifest(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parsed_manifest(path: str, mtime_ns: int, size: int) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
        ok = manifest.get("format") == FORMAT and all(s in manifest["splits"] for s in ("train", "val"))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(f"{path} is not a manifest scripts/make_shards.py wrote (format {FORMAT}, splits train "
                          f"and val): write the shards again")
    return manifest


def check_shards(root: str | None, checksums: bool = True) -> dict:
    """Every refusal before a step, one line each: no manifest, a missing shard, one whose size, SHA-256 or sample
    count disagrees with the manifest (a truncated or replaced tar), labels outside the classes. Returns the
    manifest. The checksums read every shard once."""
    if root is None:
        raise ConfigError("data=imagenet data.format=shards needs data.root: the folder make_shards.py wrote")
    manifest = read_manifest(root)
    classes = len(manifest["classes"])
    for split, entry in manifest["splits"].items():
        counts = [s["count"] for s in entry["shards"]]
        labels = entry["labels"]
        if sum(counts) != entry["count"] or len(labels) != entry["count"]:
            raise ConfigError(f"{root}/{MANIFEST}: {split} counts {entry['count']} images, its shards "
                              f"{sum(counts)} and its labels {len(labels)}: write the shards again")
        if labels and not 0 <= min(labels) <= max(labels) < classes:
            raise ConfigError(f"{root}/{MANIFEST}: {split} labels lie outside 0..{classes - 1}")
        for shard in entry["shards"]:
            _check_shard(local_file(root, shard["name"]), shard, checksums)
    return manifest


def _check_shard(path: Path, shard: dict, checksum: bool) -> None:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the manifest lists it ({shard['count']} images); restore it, or "
                          f"write the shards again with scripts/make_shards.py (it resumes)")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise ConfigError(f"{path} is {size:,} bytes and the manifest says {shard['bytes']:,} (truncated or "
                          f"replaced): restore it, or write it again with scripts/make_shards.py")
    if checksum and sha256_of(path) != shard["sha256"]:
        raise ConfigError(f"{path}: its SHA-256 is not the manifest's (damaged or replaced): restore it, or write it "
                          f"again with scripts/make_shards.py")
    try:
        count = len(_open_tar(path))
    except Exception as e:
        raise ConfigError(f"{path} is not a readable tar ({type(e).__name__}): write it again") from None
    if count != shard["count"]:
        raise ConfigError(f"{path} holds {count} samples and the manifest says {shard['count']}: write the shards "
                          f"again")


def _open_tar(path: Path):
    from wids.wids import IndexedTarSamples  # wids' random access to a WebDataset tar (not in its __all__)
    return IndexedTarSamples(path=str(path))


class ShardFiles:
    """A split's images in shards as the folder reader's ``samples`` are: ``(name, label)`` by index, and ``read``
    for an image's bytes. ``index`` maps its positions to the split's (``subset``: images held out of train)."""

    def __init__(self, root: str | Path, split: str, manifest: dict, index: list[int] | None = None):
        entry = manifest["splits"][split]
        self.root, self.split, self.manifest = root if is_url(root) else Path(root), split, manifest
        self.names = [s["name"] for s in entry["shards"]]
        self.starts, start = [], 0
        for shard in entry["shards"]:
            self.starts.append(start)
            start += shard["count"]
        self.all_labels = entry["labels"]
        self.index = list(range(entry["count"])) if index is None else index
        self._open: dict[str, object] = {}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = self.index[i]
        return f"{self.root}/{self.names[self._shard_of(j)]}:{sample_key(j)}", self.all_labels[j]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        return list(self) == list(other)

    def shard_of_positions(self) -> torch.Tensor:
        """The shard of each position (int64)."""
        starts = torch.tensor(self.starts[1:], dtype=torch.long)
        return torch.bucketize(torch.tensor(self.index, dtype=torch.long), starts, right=True)

    @property
    def labels(self) -> list[int]:
        return [self.all_labels[j] for j in self.index]

    def subset(self, positions: list[int]) -> "ShardFiles":
        return ShardFiles(self.root, self.split, self.manifest, [self.index[p] for p in positions])

    def read(self, i: int) -> bytes:
        j = self.index[i]
        s = self._shard_of(j)
        data, spans = self._tar(self.names[s])
        start, end = spans[j - self.starts[s]]
        return data[start:end]

    def _shard_of(self, j: int) -> int:
        import bisect
        return bisect.bisect_right(self.starts, j) - 1

    def _tar(self, name: str) -> tuple:
        """A shard's memory map and each sample's image span in it, from wids' index of the tar's headers (built once
        per process and shard): a read is then one slice of the map."""
        if name not in self._open:
            if len(self._open) >= OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))[2].close()
            tar = _open_tar(local_file(self.root, name))
            spans = []
            for members in tar.samples:
                entries = [tar.reader.by_index[m] for m in members]  # (name, header offset, size)
                member, offset, size = next((e for e in entries if e[0].lower().endswith(IMAGE_EXTENSIONS)),
                                            (None, 0, 0))
                if member is None:
                    raise OSError(f"{self.root}/{name}: a sample holds no image ({', '.join(IMAGE_EXTENSIONS)})")
                spans.append((offset + 512, offset + 512 + size))
            self._open[name] = (tar.reader.mmapped_file, spans, tar)
        return self._open[name][:2]

    def __getstate__(self):  # to DataLoader workers: each opens its own
        return {**self.__dict__, "_open": {}}
