"""ImageNet loader throughput per core: PIL + torchvision.transforms (what the loader used before) against
torchvision.io.decode_image + transforms.v2 (engine.datasets_disk.DecodedImages, what it uses now), from the
ImageFolder files and from WebDataset shards of the same files (data.format=shards, engine/shards.py), one process,
same JPEGs, interleaved repeats; on a GPU also data.decode=device (one batched nvjpeg decode_jpeg call per 64 images,
then the same crop, flip and normalisation per image on the GPU), per GPU.

    python scripts/bench_loader.py [--images 200] [--repeats 3] [--cold] [--small-files 100000]

Prints images/s per core for each path and their ratio. With W DataLoader workers a loader delivers at most about
W x the per-core figure: divide the images/s a GPU trains at by it for the cores each GPU needs. ``--cold`` drops
the page cache before each timing (root only; Linux's /proc/sys/vm/drop_caches). ``--small-files N`` also times
reading (not decoding) N files of 4 KB from one folder against the same bytes in shards of 1,000: the cost of
opening files, which a network filesystem multiplies and a local disk barely shows.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """ImageNet-like JPEGs: 500 x 375, smooth content plus noise so they compress to ImageNet's typical size."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(375, 500), mode="bilinear")
        img = (base[0] * 200 + torch.rand(3, 375, 500, generator=g) * 55).clamp(0, 255).byte()
        path = folder / f"{i}.JPEG"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=90)
        paths.append(path)
    return paths


def pil_path(paths):
    from PIL import Image
    from torchvision import transforms
    t = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for p in paths:
        with Image.open(p) as im:
            t(im.convert("RGB"))


def train_images(paths, on_device: bool = False, batched_crop: bool = False):
    """The training images as the ImageNet loader makes them (engine.datasets_disk.DecodedImages)."""
    from torchvision.transforms import v2

    from engine.datasets_disk import DecodedImages, FolderFiles
    t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])  # uint8: normalised on
    # the training device, as the loader does
    return DecodedImages(FolderFiles((str(p), 0) for p in paths), t, train=True, on_device=on_device,
                         batched_crop=batched_crop)


def decoded_images_path(paths):
    data = train_images(paths)
    for i in range(len(paths)):
        data[(i, 0, 0, 0)]


def write_shards(folder: Path, paths: list[Path], per_shard: int = 100):
    """The same files as WebDataset shards (engine/shards.py's layout), read through ShardFiles."""
    from engine.shards import ShardFiles, sample_key, shard_name, tar_bytes
    folder.mkdir()
    shards = []
    for n, start in enumerate(range(0, len(paths), per_shard)):
        part = paths[start:start + per_shard]
        members = [m for i, p in enumerate(part, start) for m in ((f"{sample_key(i)}.jpg", p.read_bytes()),
                                                                 (f"{sample_key(i)}.cls", b"0"))]
        (folder / shard_name("train", n)).write_bytes(tar_bytes(members))
        shards.append({"name": shard_name("train", n), "count": len(part)})
    manifest = {"splits": {"train": {"count": len(paths), "labels": [0] * len(paths), "shards": shards}}}
    return ShardFiles(folder, "train", manifest)


def shard_images_path(files):
    from torchvision.transforms import v2

    from engine.datasets_disk import DecodedImages
    data = DecodedImages(files, v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]),
                         train=True)
    for i in range(len(files)):
        data[(i, 0, 0, 0)]


def read_all(files):
    for i in range(len(files)):
        files.read(i)


def drop_page_cache() -> bool:
    import os
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(ways: dict, arg_of: dict, repeats: int, cold: bool) -> dict:
    """Median seconds of each way, interleaved so drift in machine load hits every way alike."""
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            if cold:
                drop_page_cache()
            t0 = time.perf_counter()
            fn(arg_of[name])
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_batched_path(paths, batch: int = 64):
    """data.decode=device: here the files are read in this process too (in a run, the workers read them)."""
    data = train_images(paths, on_device=True)
    for k in range(0, len(paths), batch):
        data.decode_batch([data[(i, 0, 0, 0)] for i in range(k, min(k + batch, len(paths)))], "cuda")
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timing (root only)")
    ap.add_argument("--small-files", type=int, default=0, help="also time reading this many 4 KB files")
    args = ap.parse_args()
    if args.cold and not drop_page_cache():
        ap.error("--cold: the page cache cannot be dropped here (not root, or /proc/sys/vm is read-only)")
    torch.set_num_threads(1)  # per core: what one DataLoader worker does
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        shards = write_shards(Path(tmp) / "shards", paths)
        ways = {"PIL + transforms": pil_path, "decode_image + v2 (ours), folder": decoded_images_path,
                "decode_image + v2 (ours), shards": shard_images_path}
        arg_of = {name: paths for name in ways} | {"decode_image + v2 (ours), shards": shards}
        if torch.cuda.is_available():
            ways["data.decode=device on CUDA, batches of 64"] = device_batched_path
            arg_of["data.decode=device on CUDA, batches of 64"] = paths
        for name, fn in ways.items():  # imports and first-call setup stay out of the timings
            fn(arg_of[name][:4] if isinstance(arg_of[name], list) else arg_of[name])
        seconds = timed(ways, arg_of, args.repeats, args.cold)
        small = small_files(Path(tmp), args.small_files, args.repeats, args.cold) if args.small_files else None
    print(f"{args.images} JPEGs of 500x375, {kb:.0f} KB on average; median of {args.repeats} interleaved repeats, "
          f"{'cold' if args.cold else 'warm'} page cache")
    rate = {name: args.images / s for name, s in seconds.items()}
    for name, r in rate.items():
        print(f"  {name:48s} {r:8.0f} images/s per {'GPU' if 'CUDA' in name else 'core'}")
    print(f"  ratio decode_image + v2 / PIL: {rate['decode_image + v2 (ours), folder'] / rate['PIL + transforms']:.2f}x;"
          f" shards / folder: {rate['decode_image + v2 (ours), shards'] / rate['decode_image + v2 (ours), folder']:.2f}x")
    if small:
        print(f"{args.small_files:,} files of 4 KB, read (no decoding): " + ", ".join(
            f"{name} {args.small_files / s:,.0f} files/s" for name, s in small.items())
            + f"; shards / folder: {small['folder'] / small['shards']:.2f}x")


def small_files(tmp: Path, n: int, repeats: int, cold: bool) -> dict:
    """Reading n small files from one folder against the same bytes in shards of 1,000 (ShardFiles.read)."""
    from engine.datasets_disk import FolderFiles
    folder = tmp / "small"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:07d}.jpg")
        paths[-1].write_bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).numpy().tobytes())
    files = {"folder": FolderFiles((str(p), 0) for p in paths), "shards": write_shards(tmp / "small_shards", paths, 1000)}
    return timed({name: read_all for name in files}, files, repeats, cold)


if __name__ == "__main__":
    main()
