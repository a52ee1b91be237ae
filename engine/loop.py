"""The training loop: one optimizer step per global batch, accumulated over micro-batches (and ranks).

Per optimizer step (the only unit every schedule, log and checkpoint counts in):
  1. the data code hands over this rank's micro-batches of the step, ready (a pure function of seed, batch, step);
  2. each micro-batch's loss is scaled by 1/accum_steps and back-propagated; DDP all-reduces (averaging over
     ranks) only on the last micro-batch (``no_sync``), so the gradient is the exact mean over the global batch;
  3. the LR for the step is set from the schedule, gradients are unscaled (fp16), their norm taken, optionally
     clipped; loss, norm (and the noise scale's small-batch norm) are read to the host together: the one host
     sync of the step, which is also the finiteness check; then the optimizer steps;
  4. the per-step duties: log, layer diagnostics, evaluate and checkpoint at epoch ends or every N steps, stop
     cleanly on SIGTERM / SIGINT.
BatchNorm statistics are per micro-batch ("ghost batch", as Goyal et al.'s 32 images per worker).
"""
from __future__ import annotations

import contextlib
import errno
import math
import shutil
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import diagnostics as diag
from .checkpoint import rng_state, save_checkpoint
from .datasets import eval_split
from .distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_min,
    all_reduce_sum,
    average_batch_norm_statistics,
    barrier,
    unwrap,
)
from .ema import update_ema
from .errors import RunError
from .run import Run, RunState
from .schedule import Step
from .steps import training_steps


def fit(run: Run, warned: bool = False) -> RunState:
    """``warned``: Slurm's time-limit warning came before the first step (train.py kept it): stop after it."""
    schedule, state = run.schedule, run.state
    with StopFlag(warned) as stop:
        for step, micro_batches in training_steps(run.data, schedule, run.cfg, run.dist.rank, run.device):
            t0 = time.perf_counter()
            inspect = _inspecting(run, step.index)
            weights_before = [p.detach().clone() for p in run.params] if inspect else None
            stats = train_step(run, step, micro_batches, stop.signal_name is not None, stop.warned)
            if stats is None:  # diverged: the weights are those before this step
                break
            schedule.advance(step, stats.gain)
            state.count(step.batch, time.perf_counter() - t0, stats.loss)
            update_ema(run.ema, run.model, schedule.step, run.cfg, run.plan, schedule.position())
            last = schedule.finished
            log_step(run, stats, step.batch, time.perf_counter() - t0, last)
            if inspect:
                log_layers(run, weights_before)
            end_of_epoch = schedule.epoch_ended()
            if (end_of_epoch or last or _every(run.cfg.eval.every_steps, schedule.step)
                    or schedule.crossed(run.cfg.eval.every_epochs)):
                with contextlib.suppress(EvaluationStopped):  # a signal: the checkpoint below, then the stop
                    run_eval(run)
            ckpt = run.cfg.checkpoint
            epoch = int(schedule.epoch)
            # a signal reached this rank or another one: all ranks stop after the same step (a single process
            # stops after the step the signal came in, evaluation included)
            stopping = stats.stop or (not run.dist.enabled and stop.signal_name is not None)
            if (end_of_epoch or last or _every(ckpt.every_steps, schedule.step) or schedule.step in ckpt.keep_steps
                    or state.improved) and not stopping:
                save(run, epoch)
            if stopping:
                preempt(run, "SIGUSR2" if stop.warned else stop.signal_name or "SIGTERM", epoch)
                break
    return state


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's numbers, read from the device once."""
    loss: float
    grad_norm: float
    lr: float
    gain: float     # AdaScale's r_t; 1 on the other clocks
    stop: bool      # some rank was asked to stop
    warned: bool    # some rank was warned of its time limit (SIGUSR2)


def train_step(run: Run, step: Step, micro_batches, stop: bool = False, warned: bool = False) -> StepStats | None:
    """Forward/backward over the step's micro-batches, then the optimizer step. Returns the step's host-side
    numbers (and whether any rank was asked to stop, and whether any was warned of its time limit), or None when
    the loss or gradient is not finite (the optimizer does not step then)."""
    model, params, accum = run.model, run.params, step.accum_steps
    small_batch = SmallBatchGradient(run, accum)
    loss_sum = torch.zeros((), device=run.device)
    for k, (x, y) in enumerate(micro_batches):
        last = k == accum - 1
        with contextlib.nullcontext() if (last or not run.dist.enabled) else model.no_sync():
            with autocast(run.device, run.cfg.precision):
                loss = F.cross_entropy(model(x), y, label_smoothing=run.cfg.label_smoothing)
            scaled = loss / accum
            run.scaler.scale(scaled).backward()
        loss_sum += scaled.detach().float()
        small_batch.after_backward(k, params)
    run.scaler.unscale_(run.optimizer)  # norms (clipping, LARS/LAMB trust ratios) on true gradients
    if run.cfg.grad_clip is not None:  # it returns the norm before clipping: computed once
        gnorm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip, foreach=True)
    else:
        gnorm = grad_norm(params)
    # the loss, every rank's stop request and small-batch norm in one all-reduce; the host reads once
    flags = torch.stack([torch.full((), float(f), device=run.device, dtype=torch.float64) for f in (stop, warned)])
    reduced = all_reduce_sum(torch.cat([loss_sum.double().view(1), small_batch.sq_norm().view(1), flags]))
    loss, small, stops, warnings, gnorm_value = torch.cat([reduced, gnorm.double().view(1)]).tolist()
    loss, small = loss / run.dist.world_size, small / run.dist.world_size
    # fp16: an inf gradient is the GradScaler's business (it skips the step); a NaN/inf loss is divergence
    if not math.isfinite(loss) or (not run.scaler.is_enabled() and not math.isfinite(gnorm_value)):
        run.optimizer.zero_grad(set_to_none=True)
        diverge(run, loss, gnorm_value, step.lr)
        return None
    small_batch.update(run.schedule.noise_scale, small, step.batch, gnorm_value ** 2)
    lr, gain = run.schedule.set_lr(run.optimizer, step)  # AdaScale's gain: from the noise scale just updated
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss, grad_norm=gnorm_value, lr=lr, gain=gain, stop=stops > 0, warned=warnings > 0)


class SmallBatchGradient:
    """The small-batch gradient norm the noise scale sets against the step's (McCandlish et al. 2018), gathered
    during one step's backward passes. The diagnostic measures every micro-batch's own gradient; AdaScale and the
    adaptive batch keep their probe, the rank's first ``plan.probe_micro`` micro-batches (the estimator recipes/
    section 5 was measured with). Off with too few micro-batches, and under fp16 (scaled gradients)."""

    def __init__(self, run: Run, accum: int):
        plan = run.plan
        self.accum, self.probe, self.micro_batch = accum, plan.probe_micro, plan.micro_batch
        self.ddp, self.ranks = run.dist.enabled, run.dist.world_size
        measure = run.cfg.diagnostics.noise_scale or plan.measures_noise
        self.on = measure and accum > self.probe and not run.scaler.is_enabled()
        self.per_micro = diag.MicroBatchNorms(run.device) if self.on and not plan.measures_noise else None
        self.probe_sq = torch.zeros((), device=run.device, dtype=torch.float64)

    def after_backward(self, k: int, params) -> None:
        """After micro-batch ``k``'s backward: its own gradient (the sum so far less the last), or the probe's."""
        if self.per_micro is not None and not (k == self.accum - 1 and self.ddp):  # DDP's last backward averages
            self.per_micro.add([p.grad for p in params])
        elif self.on and self.per_micro is None and k == self.probe - 1:  # the rank's first micro-batches
            self.probe_sq = diag.sq_norm(p.grad for p in params) * (self.accum / self.probe) ** 2

    def sq_norm(self) -> torch.Tensor:
        """This rank's estimate of |G_small|^2, scaled to the step's accumulation (0 when off), on the device."""
        if self.per_micro is not None:
            return self.per_micro.total * self.accum ** 2 / self.per_micro.count
        return self.probe_sq

    def update(self, noise_scale, small: float, batch: int, big_sq: float) -> None:
        """The estimator's update from the ranks' mean ``small`` and the step's |G|^2 (host numbers)."""
        if not self.on:
            return
        if self.per_micro is not None:
            noise_scale.update(self.micro_batch, small, batch, big_sq, samples=self.per_micro.count * self.ranks)
        else:
            noise_scale.update(self.probe * self.micro_batch, small, batch, big_sq)


# --- the per-step duties ---------------------------------------------------------------------------------------

def log_step(run: Run, stats: StepStats, batch: int, seconds: float, last: bool) -> None:
    schedule, state = run.schedule, run.state
    if run.dist.is_main and (_every(run.cfg.logger.every_steps, schedule.step) or last):
        row = {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr, "batch": batch,
               "epoch": schedule.epoch, "images": schedule.images, "images_per_s": batch / seconds}
        noise = schedule.noise_scale
        if noise.updates:  # B_simple and the two estimates it divides
            grad_sq, trace = noise.parts
            row |= {"noise_scale/b_simple": noise.b_simple, "noise_scale/grad_sq": grad_sq,
                    "noise_scale/trace": trace}
        row.update(schedule.record())
        run.logger.log(schedule.step, row)
    run.progress.update(schedule.step, f"loss {stats.loss:.4f} lr {stats.lr:.4g}" + (
        f" batch {batch}" if not schedule.fixed_batch else ""), state.images_per_s, state.train_time)


def log_layers(run: Run, before: list[torch.Tensor]) -> None:
    """Per-layer update ratios ||dw||/||w|| and (LARS/LAMB) trust ratios of the adapted tensors."""
    ratios = diag.update_ratios(before, run.params)
    run.logger.log(run.schedule.step, {**diag.stats("update_ratio", ratios), **diag.trust_ratio_stats(run.optimizer)})
    run.logger.histogram(run.schedule.step, "update_ratio/layers", ratios)
    if (trust := diag.trust_ratios(run.optimizer)) is not None:
        run.logger.histogram(run.schedule.step, "trust_ratio/layers", trust)
        run.logger.per_layer(run.schedule.step, "trust_ratio", diag.trust_ratios_by_name(run.model, run.optimizer))


def measure(run: Run, data, split: str) -> dict:
    """SPLIT_loss, SPLIT_acc and SPLIT_top5 of the model (and SPLIT_acc_ema... of its average) on ``data``'s
    evaluation images, with the BatchNorm statistics averaged over the ranks first. Evaluation runs the model
    uncompiled: through torch.compile, eval mode and the last partial batch would each compile another graph."""
    average_batch_norm_statistics(run.model)
    models = {"": unwrap(run.model)} | ({"_ema": run.ema} if run.ema is not None else {})
    return {f"{split}_{k}{suffix}": v for suffix, model in models.items()
            for k, v in evaluate(model, data, run.device, run.cfg.precision, run.dist, run.cfg.channels_last,
                                 bool(run.cfg.data.eval_hflip)).items()}


def run_eval(run: Run) -> None:
    """Evaluation during training: on the held-out validation images (``val_*``), which select ``best.pt``; with
    ``data.val_split=0`` on the test split (``test_*``), and nothing is selected on it."""
    state, schedule, split = run.state, run.schedule, eval_split(run.cfg.data)
    state.last_eval = measure(run, run.data, split)
    state.last_eval_step = schedule.step
    acc = state.last_eval[f"{split}_acc"]
    if split == "val" and acc > state.best_val_acc and math.isfinite(state.last_eval["val_loss"]):
        state.best_val_acc, state.improved = acc, True
    if run.dist.is_main:
        run.logger.log(schedule.step, {**state.last_eval, "epoch": schedule.epoch})
    top5 = state.last_eval.get(f"{split}_top5")
    run.progress.write(f"epoch {schedule.epoch:.4g} step {schedule.step}: train loss "
                       f"{state.train_loss:.4f} {split} acc {acc:.4f} {split} loss {state.last_eval[f'{split}_loss']:.4f}"
                       + (f" {split} top-5 {top5:.4f}" if top5 is not None else ""))


def save(run: Run, epoch: int) -> bool:
    """Checkpoint (rank 0; every rank holds the same weights). Returns whether a checkpoint was written."""
    if not run.cfg.checkpoint.enabled:
        return False
    average_batch_norm_statistics(run.model)  # what is saved describes every rank's images, as evaluation does
    bad = nonfinite_tensor(run)
    if all_reduce_min(int(bad is None), run.device) == 0:  # every rank skips together: the save is a collective
        run.state.improved = False
        where = bad or "another rank's state"
        run.progress.write(f"checkpoint at step {run.schedule.step} not written: {where} holds inf or NaN; "
                           f"checkpoints/last.pt keeps the last finite state, to resume from with a smaller LR")
        return False
    rng = gather_rng(run.device)  # every rank takes part; rank 0 writes them all
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # every kernel writing the weights and state is done before they are copied
    if run.dist.is_main:
        path = run.run_dir / "checkpoints" / "last.pt"
        try:
            save_checkpoint(path, state=run.state, schedule=run.schedule, model=run.model, optimizer=run.optimizer,
                            scaler=run.scaler, cfg=run.cfg, epoch=epoch, ema=run.ema, plan=run.plan, rng=rng)
            if run.schedule.step in run.cfg.checkpoint.keep_steps:  # fixed points for later measurement
                shutil.copyfile(path, path.with_name(f"step-{run.schedule.step}.pt"))
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError from its zip writer
            full = "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC or "enforce fail" in str(e)
            raise RunError(f"checkpoint at step {run.schedule.step} could not be written to {path}: "
                           f"{'the disk is full' if full else e}; the previous last.pt, if any, is intact") from None
    run.state.improved = False  # on every rank: they must agree on when the next save (a collective) comes
    return True


def nonfinite_tensor(run: Run) -> str | None:
    """The first tensor of what a checkpoint holds (weights, buffers such as BatchNorm's running statistics, which
    a diverging forward pass fills with inf, optimizer and EMA state) that is not finite, or None; one host read."""
    named = [(f"model {k}", v) for k, v in unwrap(run.model).state_dict().items()]
    named += [(f"optimizer state {k}", v) for state in run.optimizer.state.values() for k, v in state.items()
              if isinstance(v, torch.Tensor)]
    if run.ema is not None:
        named += [(f"EMA {k}", v) for k, v in run.ema.state_dict().items()]
    named = [(k, v) for k, v in named if v.is_floating_point()]
    if not named or bool(torch.stack([torch.isfinite(v).all() for _, v in named]).all()):
        return None
    return next(k for k, v in named if not bool(torch.isfinite(v).all()))


def gather_rng(device) -> list[dict]:
    """Every rank's generators, in rank order (each rank restores its own on resume)."""
    return all_gather_objects(rng_state(device))


def preempt(run: Run, signal_name: str, epoch: int) -> None:
    """Every rank: rank 0 writes the checkpoint, and no rank leaves before it is written (a rank that exits early
    would let Slurm or torchrun tear the job down mid-save)."""
    run.state.stopped_by = signal_name
    run.logger.mark_preempting()
    saved = save(run, epoch)
    barrier()
    run.progress.write(f"{signal_name}: " + (f"checkpoint saved at step {run.schedule.step}, exiting" if saved else
                                             f"stopping at step {run.schedule.step}; checkpoint.enabled=false, so "
                                             f"nothing is saved to resume from"))


def diverge(run: Run, loss: float, gnorm: float, lr: float) -> None:
    state = run.state
    state.diverged = True
    run.progress.write(f"diverged at step {run.schedule.step}: loss {loss}, grad norm {gnorm}")
    if run.dist.is_main:
        run.logger.log(run.schedule.step, {"loss": loss, "grad_norm": gnorm, "lr": lr, "diverged": 1})
    run_eval(run)  # the weights as they are now, so the summary has numbers (likely poor ones)


# --- pieces ----------------------------------------------------------------------------------------------------

def _every(n: int | None, step: int) -> bool:
    return bool(n) and step % n == 0


def _inspecting(run: Run, step: int) -> bool:
    return bool(run.cfg.diagnostics.every) and (step + 1) % run.cfg.diagnostics.every == 0 and run.dist.is_main


class EvaluationStopped(Exception):
    """A signal came during an evaluation of a single-process run: it stops at the next batch (an evaluation of a
    large test split can take minutes, and Slurm kills a job 30 s after its SIGTERM)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


_ACTIVE_FLAGS: list["StopFlag"] = []


def stop_requested() -> str | None:
    """The signal any active StopFlag has caught, or None."""
    return next((f.signal_name for f in _ACTIVE_FLAGS if f.signal_name is not None), None)


class StopFlag:
    """SIGTERM, SIGINT and SIGHUP (preemption, a requeue, Ctrl-C, a closed terminal) and SIGUSR2 (Slurm's warning
    of the time limit: ``--signal=USR2@N``, submitit's ``signal_delay_s``) ask the loop to checkpoint at the next
    step boundary that every rank agrees on, and exit; a warned job then requeues itself (train.py). A repeated signal (torchrun's agent
    passes Slurm's SIGTERM on once more; Slurm signals again when it requeues) is absorbed: the checkpoint is written
    in full and every rank reaches the barrier after it."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)  # SIGHUP: a closed terminal or ssh

    def __init__(self, warned: bool = False):
        self.signal_name = "SIGUSR2" if warned else None
        self.warned = warned  # SIGUSR2 came: the job is near its time limit
        self.previous = {}

    def __enter__(self):
        _ACTIVE_FLAGS.append(self)
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): no preemption handling
                pass
        return self

    def __exit__(self, *exc):
        _ACTIVE_FLAGS.remove(self)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.warned = self.warned or signum == signal.SIGUSR2
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, data, device, precision: str, dist: DistContext, channels_last: bool = False,
             hflip: bool = False) -> dict:
    """Loss, top-1 and (above 5 classes) top-5 accuracy over the whole evaluation split (each rank a strided share,
    summed across ranks), as the ImageNet papers and torchvision's references report them. ``hflip``: each image's
    logits averaged with its mirror image's (test-time augmentation, as airbench evaluates)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 correct, count, top-5 correct
    top5 = data.num_classes > 5
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in data.test_batches(dist.rank, dist.world_size, device):
        if not dist.enabled and (name := stop_requested()) is not None:  # ranks would stop at different batches
            model.train()
            raise EvaluationStopped(name)
        with autocast(device, precision):
            logits = model(x.contiguous(memory_format=memory_format))
            if hflip:
                logits = (logits + model(x.flip(-1).contiguous(memory_format=memory_format))) / 2
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
        if top5:
            totals[3] += (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
    all_reduce_sum(totals)
    model.train()
    loss, correct, count, correct5 = totals.tolist()
    return {"loss": loss / count, "acc": correct / count} | ({"top5": correct5 / count} if top5 else {})


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
