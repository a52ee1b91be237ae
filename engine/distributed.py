"""The process group of one DDP run, whoever started the processes: torchrun (its RANK/WORLD_SIZE/LOCAL_RANK), or
Slurm's srun and Hydra's submitit launcher without torchrun (Slurm's own variables, engine/slurm.py); one run dir for
all ranks.

Only rank 0 writes (logs, checkpoints, summary, wandb). Under DDP each rank takes a disjoint, contiguous slice of
every global batch (see engine/loop.py), so the union of the ranks' data is exactly the single-process batch.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from . import slurm
from .errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """This process's place in the run, read from its launcher's variables before any process group exists."""
    launcher: str = "single"        # single | torchrun | slurm
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None  # Slurm only: torchrun's env:// rendezvous has its own
    master_port: int | None = None


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why torchrun's variables in this environment cannot be a rank of a run (left over in a shell, typed by
    hand), or None where they can (or are absent)."""
    if "RANK" not in environ:
        return None
    given = " ".join(f"{k}={environ[k]}" for k in TORCHRUN_VARIABLES if k in environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if key in environ and not environ[key].strip().isdigit():
            return f"{key}={environ[key]} is not a whole number ({given})"
    rank, world = int(environ["RANK"]), int(environ.get("WORLD_SIZE", "1"))
    if world < 1 or rank >= world:
        return f"RANK={rank} is not below WORLD_SIZE={world} ({given})"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not environ.get(k)]
    if missing:
        return (f"{given} are set, as torchrun sets them, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: left over in this shell? Unset them "
                f"(unset {' '.join(k for k in TORCHRUN_VARIABLES if k in environ)}), or start the ranks with torchrun")
    return None


def launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's variables win (torchrun inside an sbatch script); then a multi-task srun step; else one process."""
    if "RANK" in environ:
        if (problem := torchrun_problem(environ)) is not None:
            raise ConfigError(problem)
        world = int(environ.get("WORLD_SIZE", "1"))
        return Launch("torchrun", int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", "0")),
                      int(environ.get("LOCAL_WORLD_SIZE", world)))
    try:
        task = slurm.task(environ)
    except slurm.SlurmError as e:
        raise ConfigError(str(e)) from None
    if task is None:
        return Launch()
    return Launch("slurm", task.rank, task.world_size, task.local_rank, task.local_world_size, task.master_addr,
                  task.master_port)


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


def cuda_index(where: Launch, visible: int) -> int:
    """The GPU this rank trains on. One process alone takes cuda:0 of what it sees (under Ray, the GPU Ray gave its
    job). One task per GPU: a task that sees all of its node's GPUs takes cuda:local_rank; one that Slurm bound to
    its own GPU (--gpus-per-task=1) sees one and takes cuda:0. Under Slurm any other count is refused (tasks would
    share a GPU or leave some idle); torchrun may use fewer processes than GPUs, never more."""
    if where.world_size == 1:
        return 0
    if where.launcher == "torchrun":
        if where.local_world_size <= visible:
            return where.local_rank
        raise ConfigError(f"{where.local_world_size} ranks on this node but {visible} GPU(s) visible: they would "
                          f"share a GPU; start at most {visible} (torchrun --nproc-per-node), or give the job more "
                          f"GPUs (hydra.launcher.ray.remote.num_gpus, --gpus-per-node)")
    if visible == 1:
        return 0
    if visible == where.local_world_size:
        return where.local_rank
    raise ConfigError(f"{where.local_world_size} tasks per node but each task sees {visible} GPUs: run one task "
                      f"per GPU (--ntasks-per-node=GPUS_PER_NODE), or bind one GPU per task (--gpus-per-task=1)")


def resolve_device(name: str, where: Launch | None = None) -> torch.device:
    """auto = the GPU where there is one; cuda without a GPU is an input error, caught before any work. Under DDP,
    the rank's own GPU (cuda_index)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", cuda_index(where or launch(), torch.cuda.device_count()))
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto = bf16 autocast where the device computes in bf16 natively (a GPU with bf16 support; a CPU with AMX or
    AVX512-BF16, where oneDNN's bf16 convolutions are about 1.4x fp32's), else fp32: without those units bf16 is
    emulated, slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bf16" if native else "fp32"
    return "fp32"


def set_numerics(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """On CUDA, TF32 for fp32 matmuls and convolutions together (cuDNN's default runs convolutions in TF32 and
    matmuls in full fp32: neither comparable nor fast). deterministic: cudnn.benchmark off and torch's deterministic
    algorithms; otherwise cuDNN picks the fastest convolution per shape. The CPU's numerics are left as they are.
    (Here, not in train.py: submitit pickles train.py's functions by value, and torch.backends.cudnn cannot be.)"""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic)


def env_rank() -> int:
    """This process's rank from its launcher's variables (0 when alone, or when they cannot be a rank's: then this
    process says why). Never raises: error paths use it so that only rank 0 speaks."""
    if "RANK" in os.environ:
        return 0 if torchrun_problem() else int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0")) if slurm.in_step() else 0


def env_world_size() -> int:
    return launch().world_size


def env_local_rank() -> int:
    """This process's rank on its machine (0 when alone, or when the launcher's variables are not a rank's)."""
    try:
        return launch().local_rank
    except ConfigError:
        return 0


def init(device: torch.device) -> DistContext:
    """Join the run's process group (gloo on CPU, NCCL on CUDA); a no-op in a single process."""
    where = launch()
    if where.world_size == 1:
        return DistContext()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _init_group(where)
    return DistContext(dist.get_rank(), dist.get_world_size(), where.local_rank)


RENDEZVOUS_TIMEOUT = None  # a timedelta; None: torch.distributed's own default (30 min for gloo, 10 for NCCL)
WAIT_NOTICE_S = 5.0        # a rendezvous that takes longer says once what it waits for


def _init_group(where: Launch) -> None:
    """gloo for CPU tensors, and NCCL for CUDA tensors where a GPU exists (one group serves both). torchrun's
    rendezvous is env://; under Slurm every task knows the master and port from the job (engine/slurm.py). A rank
    whose peers do not come says so after a few seconds, and gives up at torch's timeout with one line."""
    import threading
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    address = (f"{where.master_addr}:{where.master_port}" if where.launcher == "slurm" else
               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
    waiting = threading.Timer(WAIT_NOTICE_S, lambda: print(
        f"rank {where.rank}: waiting at {address} for all {where.world_size} ranks to start (torch.distributed's "
        f"timeout ends the wait)", file=sys.stderr, flush=True))
    waiting.daemon = True
    waiting.start()
    timeout = {"timeout": RENDEZVOUS_TIMEOUT} if RENDEZVOUS_TIMEOUT is not None else {}
    try:
        if where.launcher == "slurm":
            dist.init_process_group(backend, init_method=f"tcp://{address}", rank=where.rank,
                                    world_size=where.world_size, **timeout)
        else:
            dist.init_process_group(backend, **timeout)
    except dist.DistError as e:  # DistStoreError: the peers never came
        raise ConfigError(f"rank {where.rank} of {where.world_size} gave up waiting at {address} for the other ranks "
                       f"({type(e).__name__}): start every rank (torchrun --nproc_per_node=N), or unset "
                       f"{' '.join(k for k in TORCHRUN_VARIABLES if k in os.environ) or 'the launcher variables'}"
                       ) from None
    finally:
        waiting.cancel()


def shared_run_dir(pattern: str = "outputs/%Y-%m-%d/%H-%M-%S") -> str:
    """The run dir every rank uses when the command names none: a Slurm job's is named by its job id (a requeued job
    finds it again); torchrun's is rank 0's time, broadcast to all ranks (Hydra resolves ``${now:...}`` in each
    process, and ranks started a second apart would write to different dirs)."""
    if (named := slurm.default_run_dir()) is not None:
        return named
    if not dist.is_initialized():
        _init_group(launch())
    name = [time.strftime(pattern) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def wrap_ddp(model: torch.nn.Module, static_graph: bool) -> torch.nn.parallel.DistributedDataParallel:
    """DDP with gradients as views of its buckets (no copy into the buckets and back, one gradient's memory less)
    and, where valid (``static_graph_valid``), a static graph: DDP then skips its per-step graph bookkeeping."""
    return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, static_graph=static_graph)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP's and torch.compile's wrappers: its state_dict keys carry no ``module.`` or
    ``_orig_mod.``."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def static_graph_valid(accum_steps: int, batch_varies: bool) -> bool:
    """A static graph needs every step's backward to synchronise: a first step that accumulates under ``no_sync``
    fails an internal assert in DDP's reducer (torch 2.14, tests/test_gpu_settings.py), so only steps of one
    micro-batch, and a batch that never grows into accumulation, qualify."""
    return accum_steps == 1 and not batch_varies


def average_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Every rank's BatchNorm running statistics replaced by their mean over the ranks, as timm does before each
    evaluation (--dist-bn reduce). Under DDP each rank's statistics follow its own images (DDP broadcasts rank 0's
    buffers before each forward pass), so evaluating or saving rank 0's alone would describe a model no process
    trained. SyncBatchNorm's are the same on every rank already. One collective for all of them."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [b for m in unwrap(model).modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
               and m.track_running_stats and m.running_mean is not None for b in (m.running_mean, m.running_var)]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    with torch.no_grad():
        for b, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(mean.view_as(b))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (a list of one in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
