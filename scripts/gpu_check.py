"""The GPU check's measurements, one table (scripts/gpu_check.sh runs this, each part under its own time limit).

    python scripts/gpu_check.py --part optim|loop|decode[,...] [--out FILE] [--dry-run]

optim:  one optimizer step on ResNet-50's tensors: LARS against torch's fused SGD, LAMB against fused AdamW (wall ms,
        host syncs per step; goal <= 1.5x).
loop:   train.py's loop against a bare bf16 + channels_last loop, on ResNet-50 at 224 px (synthetic; goal >= 0.97) and
        on a CIFAR-size ResNet-18 with accumulation and augmentation (goal >= 0.9): images/s, host syncs per step.
decode: data.decode=device (batched nvjpeg, then crops per image or batched: device_crop) against nvjpeg's batched
        decode alone, images/s.

Host syncs: on CUDA, what torch.cuda.set_sync_debug_mode("warn") reports; on the CPU (--dry-run) their twin, reads
of a tensor's value (aten._local_scalar_dense). Every row is appended to --out as it is measured, so a part that
runs out of time still returns what it had. --dry-run runs the same code on the CPU at tiny sizes (tests).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train as train_script  # noqa: E402
from engine import loop  # noqa: E402
from engine.compose import compose_cfg  # noqa: E402
from optim import LAMB, LARS, param_groups  # noqa: E402


class Table:
    def __init__(self, out: Path | None):
        self.out = out

    def row(self, part: str, what: str, value: float, unit: str, note: str = "") -> None:
        line = f"| {part} | {what} | {value:,.3g} | {unit} | {note} |"
        print(line, flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(line + "\n")


@contextlib.contextmanager
def syncs(device: torch.device):
    """Counts host syncs inside the block: CUDA's sync debug mode, or on the CPU reads of a tensor's value."""
    count = [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # each synchronising operation's own warning (set_sync_debug_mode also warns, once per process)
        where = [f"{Path(w.filename).name}:{w.lineno}" for w in seen
                 if "called a synchronizing CUDA operation" in str(w.message)]
        count[0] = len(where)
        count.extend(where)  # the Python lines that synchronised, for the table's note
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                count[0] += 1
            return func(*args, **(kwargs or {}))
    with Reads():
        yield count


def wait(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- optim ---------------------------------------------------------------------------------------------------------

def part_optim(table: Table, device: torch.device, dry: bool) -> None:
    from torchvision.models import resnet18, resnet50
    model = (resnet18(num_classes=10) if dry else resnet50()).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    pairs = [("LARS", lambda g: LARS(g, lr=1.0, momentum=0.9, weight_decay=5e-5),
              "SGD fused", lambda g: torch.optim.SGD(g, lr=1.0, momentum=0.9, weight_decay=5e-5, **fused)),
             ("LAMB", lambda g: LAMB(g, lr=1e-3, weight_decay=0.01),
              "AdamW fused", lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.01, **fused))]
    steps = 3 if dry else 50
    for ours, make_ours, theirs, make_theirs in pairs:
        ms = {}
        for name, make in ((ours, make_ours), (theirs, make_theirs)):
            opt = make(param_groups(model, 5e-5) if name in ("LARS", "LAMB") else model.parameters())
            opt.step()  # state allocated
            times, reads = [], 0
            for _ in range(steps):
                wait(device)
                t0 = time.perf_counter()
                with syncs(device) as n:
                    opt.step()
                wait(device)
                times.append((time.perf_counter() - t0) * 1e3)
                reads += n[0]
            ms[name] = statistics.median(times)
            table.row("optim", f"{name} step", ms[name], "ms", f"{reads / steps:g} host syncs/step")
            if device.type == "cuda" and name in ("LARS", "LAMB"):
                table.row("optim", f"{name} step, CUDA graph replay", *graph_replay_ms(opt, steps))
        table.row("optim", f"{ours} / {theirs}", ms[ours] / ms[theirs], "x", "goal <= 1.5")


def graph_replay_ms(opt: torch.optim.Optimizer, steps: int) -> tuple[float, str, str]:
    """The step's GPU time alone: captured once in a CUDA graph and replayed, so no kernel is launched from Python.
    Against the eager step's time, the difference is what the host's launches cost."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    except Exception as e:  # a step that cannot be captured says why
        return float("nan"), "ms", f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "ms", "the kernels alone, launched by the graph"


# --- loop ----------------------------------------------------------------------------------------------------------

def loop_setups(dry: bool) -> list[tuple[str, list[str], float]]:
    if dry:
        return [("resnet_small 16 px", ["model=resnet_small", "data.image_size=16", "data.channels=3", "batch=32",
                                        "max_steps=4"], 0.97),
                ("resnet_small accum+aug", ["model=resnet_small", "data.image_size=16", "data.channels=3",
                                            "batch=32", "micro_batch=8", "data.augment=true", "max_steps=4"], 0.9)]
    return [("ResNet-50 224 px bf16", ["model=resnet50", "data.image_size=224", "data.channels=3", "batch=256",
                                       "data.train_size=16384", "max_steps=40", "precision=bf16",
                                       "channels_last=true"], 0.97),
            ("ResNet-18 32 px accum+aug", ["model=resnet18", "data.image_size=32", "data.channels=3", "batch=1024",
                                           "micro_batch=256", "data.augment=true", "data.train_size=65536",
                                           "max_steps=40", "precision=bf16", "channels_last=true"], 0.9)]


def ours(overrides: list[str], device: torch.device) -> tuple[float, float]:
    """train.py's images/s (steady state), its host syncs per step over steps 2-4 and the lines that synced."""
    counted, calls, original, places = [], [0], loop.train_step, collections.Counter()

    edges = []  # (entry, exit) wall times of the steps after the counted ones

    def counting(*a, **k):
        calls[0] += 1
        if not 2 <= calls[0] <= 4:
            entry = time.perf_counter()
            result = original(*a, **k)
            if calls[0] > 5:
                edges.append((entry, time.perf_counter()))
            return result
        with syncs(device) as n:
            result = original(*a, **k)
            wait(device)
        counted.append(n[0])
        places.update(n[1:])
        return result
    loop.train_step = counting
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            summary = train_script.train(compose_cfg(["data=synthetic", "logger=none", "diagnostics.every=0",
                                                      "diagnostics.noise_scale=false", "checkpoint.enabled=false",
                                                      "data.test_size=256", f"device={device.type}", *overrides]),
                                         Path(tmp))
    finally:
        loop.train_step = original
    # the host's work between two steps (log, progress, clock), after the step's host read: the GPU waits meanwhile
    between = [b[0] - a[1] for a, b in itertools.pairwise(edges)]
    per_step = [b[0] - a[0] for a, b in itertools.pairwise(edges)]
    return (summary["images_per_s"], statistics.mean(counted) if counted else float("nan"),
            ", ".join(f"{place} x{n}" for place, n in places.most_common()),
            (statistics.median(between) * 1e3, statistics.median(per_step) * 1e3) if between else None)


def bare(overrides: list[str], device: torch.device, read_before_step: bool = False) -> float:
    """The loop a user writes by hand: the same model, batch and data on the device, bf16 autocast and channels_last
    as set, SGD; images/s after a warm-up step. ``read_before_step``: the loss read to the host before the optimizer
    step, where train.py reads its one number per step (its finiteness check), to show what that read costs."""
    from engine.compose import load_cfg
    from engine.datasets import load_data
    from engine.distributed import resolve_precision
    from engine.models import build_model
    cfg = load_cfg(["data=synthetic", *overrides])
    data = load_data(cfg.data).to(device)
    model = build_model(cfg.model, data.image_shape, data.num_classes).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **({"fused": True} if device.type == "cuda"
                                                                        else {}))
    micro = cfg.micro_batch if isinstance(cfg.micro_batch, int) else cfg.batch
    steps = cfg.max_steps or 10
    order = torch.randperm(data.train_size, device=device)
    mean = torch.tensor([0.5] * data.image_shape[0], device=device).view(1, -1, 1, 1) * 255
    dtype = torch.bfloat16 if resolve_precision(cfg.precision, device) == "bf16" else None  # auto as train.py
    t0 = 0.0
    for step in range(steps):
        if step == 1:
            wait(device)
            t0 = time.perf_counter()
        idx = order[(step * cfg.batch) % (data.train_size - cfg.batch):][:cfg.batch]
        for part in idx.split(micro):
            x = ((data.train_x[part].float() - mean) / 64).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), data.train_y[part]) * (len(part) / cfg.batch)
            loss.backward()
        if read_before_step:
            loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wait(device)
    return cfg.batch * (steps - 1) / (time.perf_counter() - t0)


def part_loop(table: Table, device: torch.device, dry: bool) -> None:
    for name, overrides, goal in loop_setups(dry):
        images_per_s, reads, places, gap = ours(overrides, device)
        table.row("loop", f"ours, {name}", images_per_s, "images/s",
                  f"{reads:g} host syncs/step (goal 1){': ' + places if places else ''}")
        if gap is not None:
            table.row("loop", f"ours, host work between steps, {name}", gap[0], "ms", f"of {gap[1]:.3g} ms/step")
        hand = bare(overrides, device)
        table.row("loop", f"bare, {name}", hand, "images/s")
        table.row("loop", f"bare reading the loss before each step, {name}", bare(overrides, device, True),
                  "images/s", "train.py's one host read, where it sits")
        table.row("loop", f"ours / bare, {name}", images_per_s / hand, "x", f"goal >= {goal}")


# --- decode --------------------------------------------------------------------------------------------------------

def part_decode(table: Table, device: torch.device, dry: bool) -> None:
    from bench_loader import train_images, write_jpegs
    from torchvision.io import decode_jpeg, read_file
    n = 16 if dry else 512
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), n)
        raw = [read_file(str(p)) for p in paths]
        decode_jpeg(raw[:4], device=device.type)  # nvjpeg's set-up
        wait(device)
        t0 = time.perf_counter()
        for k in range(0, n, 64):
            decode_jpeg(raw[k:k + 64], device=device.type)
        wait(device)
        alone = n / (time.perf_counter() - t0)
        table.row("decode", "nvjpeg batched decode alone" if device.type == "cuda" else "batched decode (CPU)",
                  alone, "images/s")
        for crop in ("per_image", "batched"):
            data = train_images(paths, on_device=True, batched_crop=crop == "batched")
            items = [data[(i, 0, 0, 0)] for i in range(n)]
            data.decode_batch(items[:4], device.type)
            wait(device)
            t0 = time.perf_counter()
            for k in range(0, n, 64):
                data.decode_batch(items[k:k + 64], device.type)
            wait(device)
            ours_rate = n / (time.perf_counter() - t0)
            table.row("decode", f"data.decode=device device_crop={crop} (decode, crop, flip, normalise)", ours_rate,
                      "images/s", f"{ours_rate / alone:.2f}x of decoding alone")


PARTS = {"optim": part_optim, "loop": part_loop, "decode": part_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, help=f"one or several of {', '.join(PARTS)}, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="append each row to this file as it is measured")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    args = ap.parse_args()
    parts = args.part.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"--part {unknown[0]} is not a part: choose from {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU is visible; --dry-run runs the check on the CPU at tiny sizes")
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    for part in parts:
        PARTS[part](Table(args.out), device, args.dry_run)


if __name__ == "__main__":
    main()
