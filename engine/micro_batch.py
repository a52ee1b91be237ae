"""micro_batch=auto on CUDA: the largest micro-batch whose whole training step fits in GPU memory, found by trial
steps that leave no trace (composer's ``device_train_microbatch_size='auto'``), agreed by every rank, and a new
plan through make_plan and all its checks (so AdaScale keeps its 2+ micro-batches per step)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import distributed
from .errors import RunError
from .loop import autocast
from .metrics import say
from .plan import Plan, auto_micro_batch, make_plan


def choose_micro_batch(plan: Plan, model, optimizer, data, cfg, device, dist) -> Plan:
    """micro_batch=auto on CUDA: the largest divisor of the per-rank batch whose whole training step fits with 10 %
    of the GPU to spare (the EMA copy is already allocated); all ranks try each size together and agree."""
    say_main = say if dist.is_main else (lambda *_: None)

    def fits(size: int) -> None:
        torch.cuda.reset_peak_memory_stats(device)
        try_training_step(model, optimizer, data.image_shape, data.num_classes, device, cfg.precision, size,
                          cfg.channels_last)
        check_headroom(device)

    micro = largest_fitting_micro_batch(fits, plan.micro_common, say_main,
                                        agree=lambda fitted: distributed.all_reduce_min(int(fitted), device) == 1,
                                        largest=plan.micro_largest)
    plan = make_plan(cfg.model_copy(update={"micro_batch": micro}), plan.train_size, plan.world_size)  # its checks
    say_main(f"micro_batch=auto: {micro} images per micro-batch fit ({plan.accum_steps} per step per rank)")
    return plan


HEADROOM = 0.10  # of the GPU's memory left free by the chosen micro-batch (fragmentation, evaluation, the allocator)


def out_of_memory(e: BaseException) -> bool:
    """CUDA's allocator error, or cuBLAS/cuDNN failing to allocate their workspaces (a plain RuntimeError)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("ALLOC_FAILED", "CUDA out of memory")))


def largest_fitting_micro_batch(fits, per_rank: int, say=print, agree=lambda fitted: fitted,
                                largest: int | None = None) -> int:
    """composer's ``device_train_microbatch_size='auto'``: try the largest divisor of ``per_rank`` (at most
    ``largest``, the plan's own limit) and halve (to the largest divisor at or below half) on out-of-memory until
    ``fits(size)`` returns. Under DDP every rank tries each size and ``agree`` (an all-reduce) says whether all of
    them fitted: a rank that searched alone would hang the others in their next collective."""
    size = auto_micro_batch(per_rank, largest) if largest else per_rank
    while True:
        try:
            fits(size)
            fitted = True
        except Exception as e:
            if not out_of_memory(e):
                raise
            fitted = False
        if agree(fitted):
            return size
        if size == 1:
            raise RunError("micro_batch=auto: one image per micro-batch does not fit in GPU memory; use a smaller "
                           "model, precision=bf16, or more GPUs")
        smaller = auto_micro_batch(per_rank, size // 2)
        say(f"micro_batch=auto: {size} does not fit in GPU memory, trying {smaller}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = smaller


def try_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, image_shape, num_classes: int,
                      device, precision: str, size: int, channels_last: bool = False) -> None:
    """One whole training step of ``size`` images (forward, backward, the optimizer's step and its state) in the
    run's memory format, leaving no trace: weights, BatchNorm statistics, optimizer state and generators as they
    were, gradients cleared."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.randn(size, *image_shape, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), torch.zeros(size, dtype=torch.long, device=device) % num_classes)
            loss.backward()
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
        getattr(optimizer, "trust_ratios", {}).clear()


def check_headroom(device, fraction: float = HEADROOM) -> None:
    """After a trial step: its peak, with what other processes hold, must leave ``fraction`` of the GPU free."""
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    needed = torch.cuda.max_memory_reserved(device) + others
    if needed > (1 - fraction) * total:
        raise torch.cuda.OutOfMemoryError(f"the step needs {needed / 2**30:.1f} of {total / 2**30:.1f} GiB, leaving "
                                          f"less than {fraction:.0%} free")
