"""Pieces shared by LARS and LAMB: weight-decay / adaptation grouping and the trust ratio."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split a model's trainable tensors into two param groups, decided by shape, not by name.

    Tensors with ndim <= 1 (biases, BatchNorm/LayerNorm gains and shifts, ViT's cls token is 3-D so it stays)
    get ``weight_decay=0.0`` and ``adapt=False`` (no layer-wise trust ratio), as in Goyal et al. 2017 (no decay on
    BN/bias) and the LARS/LAMB reference implementations. Every other tensor gets ``weight_decay`` and
    ``adapt=True``. Empty groups are left out, so the result can be passed to any torch optimizer.
    """
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "adapt": True},
        {"params": plain, "weight_decay": 0.0, "adapt": False},
    ]
    return [g for g in groups if g["params"]]


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


def stacked_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor as one vector (one fused kernel per dtype/device with foreach)."""
    return torch.stack(torch._foreach_norm(tensors)).to(norm_dtype(tensors[0].dtype))
