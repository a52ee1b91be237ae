"""The training loop: global batches split into micro-batches (and ranks), one optimizer step per global batch.

Per optimizer step t (the only unit every schedule, log and checkpoint counts in):
  1. the global batch t is fixed by (seed, batch) alone; this rank takes its contiguous slice;
  2. each micro-batch's loss is scaled by 1/accum_steps and back-propagated (DDP all-reduces, averaging over ranks,
     only on the last micro-batch: ``no_sync``), so the gradient is the exact mean over the global batch;
  3. the LR for step t is set from the schedule, gradients are unscaled (fp16), optionally clipped, checked for
     NaN/inf, and the optimizer steps.
BatchNorm statistics are per micro-batch ("ghost batch", as Goyal et al.'s 32 images per worker).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from optim import apply_lr

from . import checkpoint as ckpt
from . import diagnostics as diag
from .data import Augment
from .distributed import DistContext, all_reduce_sum


@dataclass
class LoopState:
    step: int = 0               # optimizer steps done
    images: int = 0             # training images processed by all ranks in this process's lifetime
    train_time: float = 0.0     # seconds spent in training steps (evaluation excluded)
    train_loss: float = math.nan
    diverged: bool = False
    stopped_by: str | None = None  # a signal's name when preempted
    last_eval: dict = field(default_factory=dict)
    last_eval_step: int = -1
    noise_scale: diag.NoiseScale = field(default_factory=diag.NoiseScale)


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint at the next step boundary and exit (what Slurm and cloud
    preemption send). A second signal falls back to the default behaviour."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): no preemption handling
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.signal_name is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal_name = signal.Signals(signum).name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, data, device, precision: str, dist: DistContext, channels_last: bool = False) -> dict:
    """Test loss and accuracy over the whole test split (each rank a strided share, summed across ranks)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in data.test_batches(dist.rank, dist.world_size, device):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    all_reduce_sum(totals)
    model.train()
    loss, correct, count = totals.tolist()
    return {"val_loss": loss / count, "val_acc": correct / count}


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def fit(**kwargs) -> LoopState:
    with StopFlag() as stop:
        return _fit(stop=stop, **kwargs)


def _fit(*, stop: StopFlag, model, optimizer, data, plan, cfg, device: torch.device, run_dir: Path, logger, dist,
        progress, resume_from: dict | None = None, scaler=None) -> LoopState:
    state = LoopState(noise_scale=diag.NoiseScale(cfg.diagnostics.noise_ema))
    if resume_from is not None:
        state.step = resume_from["step"]
        state.noise_scale.load_state_dict(resume_from.get("noise_scale") or {})
    precision = cfg.precision.value if hasattr(cfg.precision, "value") else str(cfg.precision)
    augment = Augment(cfg.data.crop_padding, cfg.data.hflip) if cfg.data.augment else None
    params = [p for p in model.parameters() if p.requires_grad]
    ckpt_path = run_dir / "checkpoints" / "last.pt"

    def save(epoch: int):
        if dist.is_main and cfg.checkpoint.enabled:
            raw = model.module if hasattr(model, "module") else model
            ckpt.save_atomic({"model": getattr(raw, "_orig_mod", raw).state_dict(),
                              "optimizer": optimizer.state_dict(), "scheduler": plan.schedule.state_dict(),
                              "scaler": scaler.state_dict() if scaler is not None else None,
                              "step": state.step, "epoch": epoch, "rng": ckpt.rng_state(),
                              "global_batch": plan.global_batch, "seed": cfg.seed,
                              "noise_scale": state.noise_scale.state_dict()}, ckpt_path)

    def run_eval():
        state.last_eval = evaluate(model, data, device, precision, dist, channels_last=cfg.channels_last)
        state.last_eval_step = state.step
        if dist.is_main:
            logger.log(state.step, {**state.last_eval, "epoch": state.step / plan.steps_per_epoch})

    first_epoch = state.step // plan.steps_per_epoch
    total_epochs = math.ceil(plan.total_steps / plan.steps_per_epoch)
    for epoch in range(first_epoch, total_epochs):
        first = state.step - epoch * plan.steps_per_epoch
        micro_batches = data.train_micro_batches(epoch, first, plan, dist.rank, cfg.seed, augment, device)
        for _ in range(first, plan.steps_per_epoch):
            if state.step >= plan.run_steps:
                break
            t0 = time.perf_counter()
            inspect = cfg.diagnostics.every and (state.step + 1) % cfg.diagnostics.every == 0 and dist.is_main
            track_noise = cfg.diagnostics.noise_scale and plan.accum_steps > 1 and scaler is None
            loss_sum = torch.zeros((), device=device)
            for k in range(plan.accum_steps):
                x, y = next(micro_batches)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                last = k == plan.accum_steps - 1
                sync = contextlib.nullcontext() if (last or not dist.enabled) else model.no_sync()
                with sync:
                    with autocast(device, precision):
                        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                    scaled = loss / plan.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += scaled.detach().float()
                if track_noise and k == 0:  # this rank's first micro-batch alone: the small-batch gradient
                    small_sq = diag.sq_norm(p.grad for p in params) * plan.accum_steps ** 2
            lr = plan.schedule(state.step)
            apply_lr(optimizer, lr, plan.schedule.momentum(state.step))
            if scaler is not None:
                scaler.unscale_(optimizer)  # norms (clipping, LARS/LAMB trust ratios) on true gradients
            gnorm = grad_norm(params)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            loss_value = all_reduce_sum(loss_sum).item() / dist.world_size
            # fp16: an inf gradient is the GradScaler's business (it skips the step); a NaN/inf loss is divergence
            if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(gnorm.item())):
                state.diverged = True  # the weights are still those before this step; the checkpoint too
                optimizer.zero_grad(set_to_none=True)
                progress.write(f"diverged at step {state.step}: loss {loss_value}, grad norm {gnorm.item()}")
                logger.log(state.step, {"loss": loss_value, "grad_norm": gnorm.item(), "lr": lr, "diverged": 1})
                run_eval()  # the weights as they are now, so the summary has numbers (likely poor ones)
                return state
            if track_noise:
                state.noise_scale.update(plan.micro_batch, small_sq, plan.global_batch, gnorm.item() ** 2)
            before = [p.detach().clone() for p in params] if inspect else None
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            state.step += 1
            state.train_time += dt
            state.images += plan.global_batch
            state.train_loss = loss_value
            if inspect:
                ratios = diag.update_ratios(before, params)
                logger.log(state.step, {**diag.stats("update_ratio", ratios), **diag.trust_ratio_stats(optimizer)})
                logger.histogram(state.step, "update_ratio/layers", ratios)
                if (trust := diag.trust_ratios(optimizer)) is not None:
                    logger.histogram(state.step, "trust_ratio/layers", trust)
                del before
            if state.step % cfg.logger.every_steps == 0 or state.step == plan.run_steps:
                if dist.is_main:
                    row = {"loss": loss_value, "lr": lr, "grad_norm": gnorm.item(),
                           "epoch": state.step / plan.steps_per_epoch, "images_per_s": plan.global_batch / dt}
                    if state.noise_scale.updates:
                        row["noise_scale/b_simple"] = state.noise_scale.b_simple
                    logger.log(state.step, row)
            progress.update(state.step, f"loss {loss_value:.4f} lr {lr:.4g}")
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                save(epoch)
            if stop.signal_name is not None:
                state.stopped_by = stop.signal_name
                save(epoch)
                progress.write(f"{stop.signal_name}: checkpoint saved at step {state.step}, exiting")
                return state
        if state.step % plan.steps_per_epoch:
            break  # stopped mid-epoch by max_steps
        run_eval()
        progress.write(f"epoch {epoch + 1}/{total_epochs} step {state.step}: train loss {state.train_loss:.4f} "
                       f"test acc {state.last_eval['val_acc']:.4f} test loss {state.last_eval['val_loss']:.4f}")
        save(epoch + 1)
        if state.step >= plan.run_steps:
            break
    if state.last_eval_step != state.step:  # ended mid-epoch: evaluate and checkpoint where it stopped
        run_eval()
        save(state.step // plan.steps_per_epoch)
    return state
