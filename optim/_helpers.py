"""Pieces shared by LARS and LAMB: weight-decay / adaptation grouping, the trust ratio, and the generic
behaviour torch's own optimizers have (complex params, maximize, tensor lr, duplicate params)."""
from __future__ import annotations

import functools
import os
import shutil

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split a model's trainable tensors into two param groups, decided by shape, and by the names the model itself
    exempts.

    Tensors with ndim <= 1 (biases, BatchNorm/LayerNorm gains and shifts) and those the model names in its own
    ``no_weight_decay()`` (timm's convention: a ViT's ``pos_embed`` and ``cls_token``) get ``weight_decay=0.0`` and
    ``adapt=False`` (no layer-wise trust ratio), as in Goyal et al. 2017 (no decay on BN/bias) and the LARS/LAMB
    reference implementations. Every other tensor gets ``weight_decay`` and ``adapt=True``. Empty groups are left
    out, so the result can be passed to any torch optimizer.
    """
    exempt = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    adapted, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or name in exempt else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "adapt": True},
        {"params": plain, "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """What LARS and LAMB share beyond their math: the trust ratios of the last step, kept per parameter (so
    ``add_param_group``, deepcopy and pickling need nothing extra: torch pickles only defaults, state and
    param_groups, and this dict is rebuilt at the next step), and duplicate tensors in a group are an error
    (torch only warns; a duplicate would take the layer-wise step twice)."""

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter group holds the same tensor twice")
        super().add_param_group(param_group)

    @property
    def trust_ratios(self) -> dict[torch.Tensor, float | torch.Tensor]:
        """The last step's trust ratio of every adapted tensor, keyed by the parameter (a Python float from the
        CPU loop, a 0-d tensor from the foreach kernel: no host sync until someone reads it)."""
        return self.__dict__.setdefault("_trust_ratios", {})

    def _gather(self, group: dict, init_state) -> tuple[list, list, list]:
        """Parameters with a gradient, their gradients (negated under ``maximize``) and their state, every tensor
        viewed as real: torch's optimizers treat a complex tensor as its ``view_as_real``."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                init_state(state, p)
            grad = -p.grad if group["maximize"] else p.grad
            params.append(p)
            grads.append(as_real(grad))
            states.append(state)
        return params, grads, states


def as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def lr_value(lr) -> float:
    """A group's lr as a float (a tensor lr, as torch's optimizers accept, is read once per group)."""
    return float(lr)


@functools.cache
def compiled(kernel):
    """``kernel`` (one tensor's step) compiled once per process by torch.compile: inductor fuses its norms into one
    pass over memory and its update into another. Sizes are symbolic (one graph for every tensor) and every
    hyperparameter is a value in a tensor, so a new LR or a new tensor shape does not compile again."""
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def check_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Each group's ``foreach`` and ``fused`` are true, false or None; ``fused=True`` compiles C++ for CPU tensors
    (inductor): say so at construction if no compiler is there."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        for key in ("foreach", "fused"):
            if group[key] not in (None, True, False):
                raise ValueError(f"{name}: {key} must be true, false or null, got {group[key]!r}")
    cxx = os.environ.get("CXX", "g++")
    on_cpu = any(not p.is_cuda for g in optimizer.param_groups if g["fused"] for p in g["params"])
    if on_cpu and shutil.which(cxx) is None:
        raise RuntimeError(f"{name}(fused=True) compiles its step with torch.compile, which needs a C++ compiler for "
                           f"CPU tensors: {cxx!r} is not on PATH (install g++, set CXX, or use fused=False)")


def flat(*tensors: torch.Tensor) -> list[torch.Tensor] | None:
    """Each tensor as a 1-D view in memory order (contiguous or channels_last alike), or None unless all of them
    are dense with the same strides (the fused kernels walk them side by side)."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors):
        return None
    order = sorted(range(first.ndim), key=lambda d: -first.stride(d))
    views = [t.permute(order) for t in tensors]
    if not views[0].is_contiguous():
        return None
    return [v.reshape(-1).detach() for v in views]  # not a view: one compiled graph whatever the base's ndim


def use_foreach(foreach: bool | None, params: list[torch.Tensor]) -> bool:
    """``foreach=None``: foreach on GPUs; on CPUs the allocation-free loop is faster (bench_optim.py).
    foreach kernels need one dtype and device per call; mixed groups take the loop."""
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    same = all(p.dtype == params[0].dtype and p.device == params[0].device for p in params)
    return bool(foreach) and same


def trust_ratio(numerator: torch.Tensor, denominator: torch.Tensor, w_norm: torch.Tensor,
                other_norm: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` elementwise, and exactly 1 where ``w_norm`` or ``other_norm`` is 0.

    A zero weight norm (a freshly zero-initialised layer) or a zero gradient/update norm would give a ratio of 0
    or 0/0; like the reference implementations we fall back to a ratio of 1 (the plain, unadapted step) there.
    """
    ratio = numerator / denominator
    ok = (w_norm > 0) & (other_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and trust ratios in at least float32 (bf16/fp16 norms are too coarse), float64 for float64 params."""
    return torch.promote_types(dtype, torch.float32)


def norm(t: torch.Tensor) -> float:
    """One tensor's L2 norm as a Python float, accumulated in at least float32."""
    return float(torch.linalg.vector_norm(t, dtype=norm_dtype(t.dtype)))


def stacked_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor as one vector (one fused kernel per dtype/device with foreach)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=norm_dtype(tensors[0].dtype)))
