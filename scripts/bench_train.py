"""Throughput of our training loop against a bare hand-written loop, and of the input pipeline against the model.

    python scripts/bench_train.py [--model resnet_small] [--image-size 32] [--batch 256] [--steps 60]

Same process, same model architecture, data, batch, optimizer and augmentation; the runs alternate (ours, bare,
ours, bare) and the best of each counts. "ours" is train.py's train() (plan, logging, checkpoint off,
evaluation excluded from its images/s, default settings); "bare" is the ten-line loop a user would write by hand.
CPU only (the bare loop is CPU code). Also measures what the diagnostics (trust/update ratios every 10 steps, noise scale every step) cost.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train as train_script  # noqa: E402
from engine.compose import compose_cfg, load_cfg  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.data import make_synthetic  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.plan import make_plan  # noqa: E402
from engine.transforms import Augment


def overrides(args):
    return ["data=synthetic", f"data.train_size={args.batch * args.steps}", "data.test_size=256",
            f"data.image_size={args.image_size}", "data.channels=3", "data.augment=true", "data.crop_padding=4",
            f"model={args.model}", f"batch={args.batch}", "epochs=1", "warmup=none", "schedule=constant", "device=cpu",
            "logger=none", "checkpoint.enabled=false", "label_smoothing=0", f"threads={args.threads}",
            "precision=fp32"]  # the bare loop's


def ours(args, extra=()) -> float:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # quiet: just the figure
        summary = train_script.train(compose_cfg(overrides(args) + list(extra)), Path(tmp))
    return summary["images_per_s"]


DIAG_ON = ["diagnostics.every=10", "diagnostics.noise_scale=true"]
DIAG_OFF = ["diagnostics.every=0", "diagnostics.noise_scale=false"]


def bare(args, data) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, width=16, zero_init_residual=True), data.image_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug = Augment(padding=4, hflip=True)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
    order = torch.randperm(data.train_size)
    t0 = time.perf_counter()
    for step, idx in enumerate(order.split(args.batch)):
        x = (aug.apply(data.train_x[idx], aug.draw(len(idx), 0, step)).float() - mean) / std
        loss = F.cross_entropy(model(x), data.train_y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return data.train_size / (time.perf_counter() - t0)


def pipeline_only(args, data) -> float:
    cfg = load_cfg(overrides(args))
    plan = make_plan(cfg, data.train_size)
    aug = Augment(padding=4, hflip=True)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in data.train_micro_batches(0, 0, plan, 0, 0, aug, torch.device("cpu")))
    return n / (time.perf_counter() - t0)


def model_only(args, data) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, width=16, zero_init_residual=True), data.image_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.batch, *data.image_shape)
    y = torch.randint(0, data.num_classes, (args.batch,))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return args.batch * args.steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_small")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = make_synthetic(args.batch * args.steps, 256, args.image_size, 3, 10)
    o, b, d_on, d_off = [], [], [], []
    half = [f"micro_batch={args.batch // 2}"]  # accumulation over 2 micro-batches, so the noise scale is measured
    for _ in range(args.repeats):
        o.append(ours(args))  # default settings (diagnostics every 50 steps)
        b.append(bare(args, data))
        d_on.append(ours(args, DIAG_ON + half))
        d_off.append(ours(args, DIAG_OFF + half))
    pipe, mod = pipeline_only(args, data), model_only(args, data)
    print(f"{args.model}, {args.image_size}x{args.image_size}x3, batch {args.batch}, {args.steps} steps, CPU "
          f"{args.threads} threads (best of {args.repeats}):")
    print(f"  our loop   {max(o):8.0f} images/s")
    print(f"  bare loop  {max(b):8.0f} images/s   ours / bare = {max(o) / max(b):.3f} (goal >= 0.95)")
    print(f"  diagnostics (every 10 steps + noise scale every step, accum 2): {max(d_on):.0f} vs {max(d_off):.0f} "
          f"images/s off: cost {100 * (1 - max(d_on) / max(d_off)):.1f} %")
    print(f"  input pipeline alone {pipe:8.0f} images/s; model alone {mod:8.0f} images/s; "
          f"pipeline / model = {pipe / mod:.1f}x (goal >= 3)")


if __name__ == "__main__":
    main()
