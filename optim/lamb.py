"""LAMB: Layer-wise Adaptive Moments optimizer for Batch training.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962.
For each parameter tensor ``w`` with gradient ``g`` at step t (1-based), global learning rate ``lr``:

    m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g^2
    m_hat = m / (1 - b1^t) ;  v_hat = v / (1 - b2^t)        (bias correction first; bias_correction=False skips it)
    r = m_hat / (sqrt(v_hat) + eps) + wd * w                (decoupled decay inside the trust-ratio norm, as the paper)
    trust = ||w|| / ||r||                                   (1 where ||w|| or ||r|| is 0)
    w -= lr * trust * r

The paper's phi (a clamp of ||w||) is the identity here; ``trust_bounds=(lo, hi)`` clamps the trust ratio instead
if you want bounds (gluon-nlp uses 1e-3..10 on phi). There is no hidden gradient clipping: clip with the training
option ``grad_clip`` (it works for every optimizer).

Like torch's optimizers: ``maximize``, complex tensors (treated as their ``view_as_real``), a tensor ``lr``, ``lr``
given only in the param groups. Per param-group switches: ``adapt=False`` turns the trust ratio off (trust = 1): LAMB becomes AdamW with decoupled
decay ``lr * wd * w`` (exactly torch.optim.AdamW; torch.optim.Adam when the group's weight_decay is 0).
``param_groups()`` sets it, with weight_decay=0, for tensors with ndim <= 1.
The last trust ratio of every adapted tensor is in ``optimizer.trust_ratios`` (keyed by parameter, no host sync).

Three kernels, the same math: a per-tensor loop (the default on CPU), ``foreach=True`` (torch._foreach_*, the
default on CUDA) and ``fused=True``: each tensor's step compiled by torch.compile into two passes over memory (the
moments and the norms of w and r, then the update), near the least traffic LAMB can have
(scripts/bench_optim.py). The first fused step compiles (seconds; cached on disk by inductor).
"""
from __future__ import annotations

import math

import torch

from ._helpers import (
    LayerwiseOptimizer,
    as_real,
    check_kernels,
    compiled,
    flat,
    lr_value,
    norm,
    norm_dtype,
    stacked_norms,
    trust_ratio,
    use_foreach,
)


class LAMB(LayerwiseOptimizer):
    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 trust_bounds: tuple[float, float] | None = None, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"LAMB: lr must be >= 0, got {lr}")
        if not (len(betas) == 2 and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: betas must be two values in [0, 1), got {list(betas)}")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"LAMB: eps must be finite and >= 0, got {eps}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"LAMB: weight_decay must be finite and >= 0, got {weight_decay}")
        if trust_bounds is not None and not (len(trust_bounds) == 2 and 0.0 <= trust_bounds[0] <= trust_bounds[1]):
            raise ValueError(f"LAMB: trust_bounds must be [lo, hi] with 0 <= lo <= hi, got {list(trust_bounds)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction,
                        trust_bounds=tuple(trust_bounds) if trust_bounds is not None else None, adapt=True,
                        maximize=maximize, foreach=foreach, fused=fused, differentiable=False)
        super().__init__(params, defaults)
        check_kernels(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from before the keys existed
            group.setdefault("maximize", False)
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._gather(group, _init_state)
            if not params:
                continue
            for state in states:
                state["step"] += 1
            if group["fused"]:
                kernel = _lamb_fused
            elif use_foreach(group["foreach"], params):
                kernel = _lamb_foreach
            else:
                kernel = _lamb_single
            b1, b2 = group["betas"]
            trusts = kernel([as_real(p) for p in params], grads, [as_real(s["exp_avg"]) for s in states],
                            [as_real(s["exp_avg_sq"]) for s in states], [s["step"] for s in states],
                            lr=lr_value(group["lr"]), beta1=b1, beta2=b2, eps=group["eps"],
                            weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                            trust_bounds=group["trust_bounds"], adapt=group["adapt"])
            if group["adapt"]:
                self.trust_ratios.update(zip(params, trusts))
        return loss


def _init_state(state: dict, p: torch.Tensor) -> None:
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _bias_corrections(steps, beta1, beta2, bias_correction):
    if not bias_correction:
        return [1.0] * len(steps), [1.0] * len(steps)
    return [1 - beta1 ** t for t in steps], [math.sqrt(1 - beta2 ** t) for t in steps]


def _bounded(trust, trust_bounds):  # foreach path: clamp a vector of ratios
    return trust if trust_bounds is None else torch.clamp(trust, trust_bounds[0], trust_bounds[1])


def _lamb_single(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                 bias_correction, trust_bounds, adapt):
    """Per-tensor loop with one temporary per tensor (on CPU, fresh temporaries cost more than the arithmetic).
    r = (m / bc1) / (sqrt(v) / sqrt_bc2 + eps) is computed as m / ((sqrt(v) * bc1 / sqrt_bc2) + eps * bc1)."""
    bc1s, sqrt_bc2s = _bias_corrections(steps, beta1, beta2, bias_correction)
    trusts = []
    for w, g, m, v, bc1, sqrt_bc2 in zip(params, grads, exp_avgs, exp_avg_sqs, bc1s, sqrt_bc2s):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        r = v.sqrt().mul_(bc1 / sqrt_bc2).add_(eps * bc1)
        torch.div(m, r, out=r)
        if weight_decay:
            r.add_(w, alpha=weight_decay)
        trust = 1.0
        if adapt:
            w_norm, r_norm = norm(w), norm(r)
            if w_norm > 0 and r_norm > 0:
                trust = w_norm / r_norm
                if trust_bounds is not None:
                    trust = min(max(trust, trust_bounds[0]), trust_bounds[1])
        w.add_(r, alpha=-lr * trust)
        trusts.append(trust)
    return trusts


def _lamb_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                  bias_correction, trust_bounds, adapt):
    """The same math with torch._foreach_* kernels over all tensors of a group."""
    bc1s, sqrt_bc2s = _bias_corrections(steps, beta1, beta2, bias_correction)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # r = (m / bc1) / (sqrt(v) / sqrt_bc2 + eps) = m / ((sqrt(v) / sqrt_bc2 + eps) * bc1): one buffer, no m_hat copy
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, sqrt_bc2s)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bc1s)
    r = torch._foreach_div(exp_avgs, denom)
    del denom
    if weight_decay:
        torch._foreach_add_(r, params, alpha=weight_decay)
    trust = torch.ones(len(params), device=params[0].device, dtype=norm_dtype(params[0].dtype))
    if adapt:
        w_norm, r_norm = stacked_norms(params), stacked_norms(r)
        trust = trust_ratio(_bounded(w_norm / r_norm, trust_bounds), 1.0, w_norm, r_norm)
        torch._foreach_mul_(r, list(trust.to(params[0].dtype).unbind(0)))
    torch._foreach_add_(params, r, alpha=-lr)
    return list(trust.unbind(0))


def _lamb_fused(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                bias_correction, trust_bounds, adapt):
    """One compiled kernel per tensor (``_lamb_tensor``); the hyperparameters, the bias corrections of the tensor's
    step and the switches travel as values in one small tensor, so every group, LR and step shares one compiled
    graph. A tensor whose gradient or moments are laid out differently from it takes the loop."""
    bc1s, sqrt_bc2s = _bias_corrections(steps, beta1, beta2, bias_correction)
    lo, hi = trust_bounds if trust_bounds is not None else (0.0, math.inf)
    trusts, hypers = [], {}
    for w, g, m, v, step, bc1, sqrt_bc2 in zip(params, grads, exp_avgs, exp_avg_sqs, steps, bc1s, sqrt_bc2s):
        views = flat(w, g, m, v)
        if views is None:
            trusts += _lamb_single([w], [g], [m], [v], [step], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                   weight_decay=weight_decay, bias_correction=bias_correction,
                                   trust_bounds=trust_bounds, adapt=adapt)
            continue
        key = (w.dtype, w.device, bc1, sqrt_bc2)
        if key not in hypers:
            hypers[key] = torch.tensor([lr, beta1, beta2, eps, weight_decay, bc1, sqrt_bc2, adapt, lo, hi],
                                       dtype=norm_dtype(w.dtype), device=w.device)
        trusts.append(compiled(_lamb_tensor)(*views, hypers[key]))
    return trusts


def _lamb_tensor(w, g, m, v, hyper):
    """One tensor's step (1-D views), the loop's formulas: m and v, then r = m / (sqrt(v) * bc1 / sqrt_bc2 +
    eps * bc1) + wd * w with the norms of w and r (one pass), then w -= lr * trust * r (a second)."""
    lr, beta1, beta2, eps, wd, bc1, sqrt_bc2, adapt, lo, hi = hyper.unbind(0)
    new_m = m + (1 - beta1) * (g - m)
    new_v = beta2 * v + (1 - beta2) * g * g
    r = new_m / (torch.sqrt(new_v) * (bc1 / sqrt_bc2) + eps * bc1) + wd * w
    w_norm = torch.linalg.vector_norm(w, dtype=hyper.dtype)
    r_norm = torch.linalg.vector_norm(r, dtype=hyper.dtype)
    trust = torch.clamp(w_norm / r_norm, lo, hi)
    trust = torch.where((w_norm > 0) & (r_norm > 0) & (adapt > 0), trust, torch.ones_like(trust))
    m.copy_(new_m)
    v.copy_(new_v)
    w.sub_((lr * trust) * r)
    return trust
