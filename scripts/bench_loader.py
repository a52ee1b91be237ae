"""ImageNet loader throughput per core: PIL + torchvision.transforms (what the loader used before) against
torchvision.io.decode_image + transforms.v2 (engine.datasets_disk.DecodedImages, what it uses now), one process,
same JPEGs, interleaved repeats; on a GPU also data.decode=device (one batched nvjpeg decode_jpeg call per 64 images,
then the same crop, flip and normalisation per image on the GPU), per GPU.

    python scripts/bench_loader.py [--images 200] [--repeats 3]

Prints images/s per core for each path and their ratio. With W DataLoader workers a loader delivers at most about
W x the per-core figure: divide the images/s a GPU trains at by it for the cores each GPU needs.
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

    from engine.datasets_disk import DecodedImages
    t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])  # uint8: normalised on
    # the training device, as the loader does
    return DecodedImages([(str(p), 0) for p in paths], t, train=True, on_device=on_device, batched_crop=batched_crop)


def decoded_images_path(paths):
    data = train_images(paths)
    for i in range(len(paths)):
        data[(i, 0, 0, 0)]


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
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core: what one DataLoader worker does
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        ways = {"PIL + transforms": pil_path, "decode_image + v2 (ours)": decoded_images_path}
        if torch.cuda.is_available():
            ways["data.decode=device on CUDA, batches of 64"] = device_batched_path
        times = {name: [] for name in ways}
        for fn in ways.values():  # imports and first-call setup stay out of the timings
            fn(paths[:4])
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every path alike
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn(paths)
                times[name].append(time.perf_counter() - t0)
    print(f"{args.images} JPEGs of 500x375, {kb:.0f} KB on average; median of {args.repeats} interleaved repeats")
    rate = {name: args.images / statistics.median(ts) for name, ts in times.items()}
    for name, r in rate.items():
        print(f"  {name:48s} {r:8.0f} images/s per {'GPU' if 'CUDA' in name else 'core'}")
    print(f"  ratio decode_image + v2 / PIL: {rate['decode_image + v2 (ours)'] / rate['PIL + transforms']:.2f}x")


if __name__ == "__main__":
    main()
