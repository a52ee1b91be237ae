"""torchrun / DistributedDataParallel plumbing: process group from torchrun's env vars, one run dir for all ranks.

Only rank 0 writes (logs, checkpoints, summary, wandb). Under DDP each rank takes a disjoint, contiguous slice of
every global batch (see engine/loop.py), so the union of the ranks' data is exactly the single-process batch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """auto = the GPU where there is one; cuda without a GPU is an input error, caught before any work."""
    from .config import ConfigError
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str = "cpu") -> DistContext:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); a no-op in a single process."""
    world = env_world_size()
    if world == 1:
        return DistContext()
    if not dist.is_initialized():
        _init_group()
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def _init_group() -> None:
    """gloo for CPU tensors, and NCCL for CUDA tensors where a GPU exists (one group serves both)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def shared_run_dir(pattern: str = "outputs/%Y-%m-%d/%H-%M-%S") -> str:
    """Rank 0's timestamped run dir, broadcast to all ranks, so that Hydra gives every rank the same folder.

    Hydra resolves ``${now:...}`` in each process; ranks started a second apart would write to different dirs.
    """
    if not dist.is_initialized():
        _init_group()
    name = [time.strftime(pattern) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(value: int, device) -> int:
    t = torch.tensor([value], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
