"""Write an ImageFolder tree (SRC/train, SRC/val) as WebDataset shards in DST, for data=imagenet data.format=shards.

    python scripts/make_shards.py /data/imagenet /data/imagenet-shards --shard-size 1000

Each split becomes DST/SPLIT-NNNNNN.tar of --shard-size images each (KEY.jpg and KEY.cls, KEY the image's index in
the order the folder reader lists them; each file's bytes as they are), wids' shard index DST/SPLIT.json, and last
DST/manifest.json (class names, labels, each shard's count, size and SHA-256). The format: engine/shards.py.

A run stopped halfway resumes: a shard already in DST that equals the one SRC gives is kept (shards are written to
a temporary name, then renamed, so none is half-written). DST holding anything else (another dataset's shards, other
files) is refused before anything is written. Files that cannot be read are named in one line at the end, with exit
1 and no manifest: their shards are not written; the rest are, so a run after they are fixed writes only those.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from engine.datasets_disk import check_imagenet, image_folder
from engine.errors import ConfigError
from engine.shards import FORMAT, MANIFEST, sample_key, sha256_of, shard_name, tar_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the ImageFolder tree: SRC/train/CLASS/IMAGE and SRC/val/CLASS/IMAGE")
    p.add_argument("dst", help="the folder to write the shards into (new, empty, or a stopped run's)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000: about 110 MB "
                   "of ImageNet's JPEGs)")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size={args.shard_size} must be >= 1")
    return args


def plan_shards(src: Path, shard_size: int) -> tuple[list[str], dict]:
    """The classes, and per split the (path, label) samples of each shard, in the folder reader's order."""
    check_imagenet(str(src))
    splits, classes = {}, None
    for split in ("train", "val"):
        folder = image_folder(src / split)
        classes = classes or folder.classes
        samples = folder.samples
        splits[split] = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    return classes, splits


def check_destination(dst: Path, expected: set[str], manifest: dict) -> None:
    """DST may be absent, empty, or hold this very dataset's files (a stopped or finished run)."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ConfigError(f"{dst} is a file: choose a folder for the shards")
    other = sorted(p.name for p in dst.iterdir() if p.name not in expected and not p.name.startswith(".tmp-"))
    if other:
        raise ConfigError(f"{dst} holds {other[0]} ({len(other)} file(s) that are not this dataset's shards): "
                          f"choose an empty or new folder")
    old = dst / MANIFEST
    if old.is_file():
        written = json.loads(old.read_text())
        if {k: written.get(k) for k in ("classes", "shard_size")} != {k: manifest[k] for k in ("classes", "shard_size")}:
            raise ConfigError(f"{old} describes other shards (other classes or --shard-size): choose an empty or "
                              f"new folder")


def shard_members(samples: list[tuple[str, int]], start: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The tar members of one shard, and the files that could not be read."""
    members, unreadable = [], []
    for offset, (path, label) in enumerate(samples):
        key = sample_key(start + offset)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            unreadable.append(f"{path} ({e.strerror or type(e).__name__})")
            continue
        suffix = Path(path).suffix.lower()
        members += [(f"{key}{'.jpg' if suffix == '.jpeg' else suffix}", data), (f"{key}.cls", str(label).encode())]
    return members, unreadable


def write_shard(path: Path, content: bytes) -> str:
    """Write ``content`` to ``path`` (atomically) unless it is there already; refuse a different file there."""
    digest = hashlib.sha256(content).hexdigest()
    if path.exists():
        if sha256_of(path) != digest:
            raise ConfigError(f"{path} exists and differs from the shard SRC gives (another dataset's, or SRC "
                              f"changed): choose an empty or new folder")
        return digest
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return digest


def make_shards(src: Path, dst: Path, shard_size: int, progress=None) -> list[str]:
    """Write or complete the shards; returns the files that could not be read (then no manifest is written)."""
    classes, splits = plan_shards(src, shard_size)
    manifest = {"format": FORMAT, "source": str(src), "shard_size": shard_size, "classes": classes, "splits": {}}
    expected = {MANIFEST} | {f"{s}.json" for s in splits} | {shard_name(s, n) for s, shards in splits.items()
                                                            for n in range(len(shards))}
    check_destination(dst, expected, manifest)
    dst.mkdir(parents=True, exist_ok=True)
    unreadable = []
    total = sum(len(shards) for shards in splits.values())
    done = 0
    for split, shards in splits.items():
        entries, labels, start = [], [], 0
        for number, samples in enumerate(shards):
            members, missing = shard_members(samples, start)
            unreadable += missing
            name = shard_name(split, number)
            if not missing:
                content = tar_bytes(members)
                entries.append({"name": name, "count": len(samples), "bytes": len(content),
                                "sha256": write_shard(dst / name, content)})
            labels += [label for _, label in samples]
            start += len(samples)
            done += 1
            if progress:
                progress(done, total, name, len(samples))
        manifest["splits"][split] = {"count": start, "labels": labels, "shards": entries}
    if unreadable:
        return unreadable
    for split, entry in manifest["splits"].items():  # wids' shard index, for random access by other tools too
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                 "shardlist": [{"url": s["name"], "nsamples": s["count"], "filesize": s["bytes"]}
                               for s in entry["shards"]]}
        (dst / f"{split}.json").write_text(json.dumps(index, indent=1) + "\n")
    (dst / MANIFEST).write_text(json.dumps(manifest) + "\n")  # last: its presence says the shards are complete
    return []


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm
    bar = None

    def progress(done, total, name, count):
        nonlocal bar
        bar = bar or tqdm(total=total, unit="shard", file=sys.stderr, mininterval=1.0)
        bar.set_postfix_str(f"{name} ({count} images)")
        bar.update(1)
    try:
        unreadable = make_shards(Path(args.src), Path(args.dst), args.shard_size, progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if unreadable:
        print(f"error: {len(unreadable)} file(s) could not be read, their shards are not written and there is no "
              f"manifest yet (first: {unreadable[0]}): fix or replace them and run this again, it resumes",
              file=sys.stderr)
        return 1
    print(f"shards of {args.src} in {args.dst} ({Path(args.dst) / MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
