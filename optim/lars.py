"""LARS: Layer-wise Adaptive Rate Scaling.

You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888, Algorithm 1.
For each parameter tensor ``w`` with gradient ``g`` (one "layer"), learning rate ``lr_t`` of step t, weight decay
``wd``:

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (1 where ||w|| or ||g|| is 0)
    d     = trust * (g + wd * w)                          (weight decay coupled, L2-style, as in the paper)

``lr_in_momentum=True`` (default): the paper's Algorithm 1, the LR inside the momentum buffer

    v  = momentum * v + lr_t * d ;   w -= v                (Nesterov: w -= lr_t * d + momentum * v)

``lr_in_momentum=False``: the form of torch.optim.SGD, timm's Lars and apex's LARC, the LR outside

    buf = momentum * buf + d ;       w -= lr_t * buf       (Nesterov: w -= lr_t * (d + momentum * buf))

The two are equal while the LR is constant (v = lr * buf); under a warmup or a decay they differ: the paper's
buffer carries the LR of the steps that filled it, the torch form rescales the whole history by today's LR.
Goyal et al. 2017 (section 2.2, "momentum correction") discuss the same difference for SGD.

Per param-group switches:
  ``adapt=False``   no trust ratio for the group (trust = 1): LARS becomes momentum SGD with coupled weight decay;
                    with ``lr_in_momentum=False`` exactly torch.optim.SGD. ``param_groups()`` sets it for ndim <= 1.
  ``weight_decay``  independent of ``adapt`` (a group may adapt without decay, or decay without adapting).

``trust_clip=True`` is LARC's clipping (NVIDIA apex): the layer's learning rate ``lr * trust`` is capped at ``lr``,
i.e. ``trust`` is replaced by ``min(trust / lr, 1)`` (1 at lr = 0, where the step is zero anyway).
Zero-norm layers keep trust 1.

``variant="seed"`` is a common simplified variant: decoupled decay ``w -= lr*wd*w`` applied
first, then ``buf = momentum*buf + g``, ``trust = eta*||w||/(||buf|| + eps)`` taken on the momentum buffer, and
``w -= lr*trust*buf`` (its own form; ``lr_in_momentum`` does not apply). Offered for comparison.

Like torch's optimizers: ``maximize``, complex tensors (treated as their ``view_as_real``), a tensor ``lr``, ``lr``
given only in the param groups. The last trust ratio of every adapted tensor is in ``optimizer.trust_ratios``.

Three kernels, the same math: a per-tensor loop (the default on CPU), ``foreach=True`` (torch._foreach_*, the
default on CUDA) and ``fused=True``: each tensor's step compiled by torch.compile into two passes over memory (its
norms, then the update), the least traffic LARS can have (scripts/bench_optim.py). The first fused step compiles
(seconds; cached on disk by inductor); ``variant="seed"`` and ``momentum=0`` take the loop.
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

VARIANTS = ("paper", "seed")


class LARS(LayerwiseOptimizer):
    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8, nesterov: bool = False, trust_clip: bool = False,
                 lr_in_momentum: bool = True, variant: str = "paper", *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"LARS: weight_decay must be finite and >= 0, got {weight_decay}")
        if not 0.0 < eta < math.inf:
            raise ValueError(f"LARS: eta (trust coefficient) must be finite and > 0, got {eta}")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"LARS: eps must be finite and >= 0, got {eps}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov=True needs momentum > 0")
        if variant not in VARIANTS:
            raise ValueError(f"LARS: variant must be one of {VARIANTS}, got {variant!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov,
                        trust_clip=trust_clip, lr_in_momentum=lr_in_momentum, variant=variant, adapt=True,
                        maximize=maximize, foreach=foreach, fused=fused, differentiable=False)
        super().__init__(params, defaults)
        check_kernels(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from before these keys existed: their behaviour then
            group.setdefault("maximize", False)
            group.setdefault("lr_in_momentum", False)
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            has_buffer = group["momentum"] or group["variant"] == "seed"
            params, grads, states = self._gather(group, _init_state if has_buffer else lambda s, p: None)
            if not params:
                continue
            bufs = [as_real(s["momentum_buffer"]) if has_buffer else None for s in states]
            if group["fused"] and group["momentum"] and group["variant"] == "paper":
                kernel = _lars_fused
            elif use_foreach(group["foreach"], params):
                kernel = _lars_foreach
            else:
                kernel = _lars_single
            hyper = {k: group[k] for k in ("momentum", "weight_decay", "eta", "eps", "nesterov", "trust_clip",
                                           "lr_in_momentum", "variant", "adapt")}
            trusts = kernel([as_real(p) for p in params], grads, bufs, lr=lr_value(group["lr"]), **hyper)
            if group["adapt"]:
                self.trust_ratios.update(zip(params, trusts))
        return loss


def _init_state(state: dict, p: torch.Tensor) -> None:
    # A zero buffer makes the first step buf = m*0 + d = d exactly, as if it were created from d.
    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _clipped(trust: float, lr: float, trust_clip: bool) -> float:
    if not trust_clip:
        return trust
    return min(trust / lr, 1.0) if lr > 0 else 1.0


def _lars_single(params, grads, bufs, *, lr, momentum, weight_decay, eta, eps, nesterov, trust_clip,
                 lr_in_momentum, variant, adapt) -> list[float]:
    """Per-tensor loop, written to allocate nothing: on CPU, fresh temporaries (page faults) cost more than the
    arithmetic, so this path beats foreach there. The trust ratio is a Python float (a host sync, free on CPU).
    With c = the coefficient of d's terms in the buffer (lr*trust inside, trust outside) and out = the factor on
    the buffer (1 inside, lr outside): buf = m*buf + c*(g + wd*w), and w -= out*buf, or for Nesterov
    w -= out*(c*(g + wd*w) + m*buf) = w*(1 - out*c*wd) - out*c*g - out*m*buf."""
    trusts = []
    for w, g, buf in zip(params, grads, bufs):
        trust = 1.0
        if variant == "seed":
            if weight_decay:
                w.mul_(1 - lr * weight_decay)
            buf.mul_(momentum).add_(g)
            if adapt:
                trust = _trust(eta, norm(w), norm(buf), 0.0, eps, lr, trust_clip)
            w.add_(buf, alpha=-lr * trust)
            trusts.append(trust)
            continue
        if adapt:
            trust = _trust(eta, norm(w), norm(g), weight_decay, eps, lr, trust_clip)
        trusts.append(trust)
        if not momentum:
            w.mul_(1 - lr * trust * weight_decay).add_(g, alpha=-lr * trust)
            continue
        c, out = (lr * trust, 1.0) if lr_in_momentum else (trust, lr)
        buf.mul_(momentum).add_(g, alpha=c)
        if weight_decay:
            buf.add_(w, alpha=c * weight_decay)  # uses w before this step's update, as d does
        if nesterov:
            w.mul_(1 - out * c * weight_decay).add_(g, alpha=-out * c).add_(buf, alpha=-out * momentum)
        else:
            w.add_(buf, alpha=-out)
    return trusts


def _trust(eta, w_norm, other_norm, weight_decay, eps, lr, trust_clip) -> float:
    """Scalar twin of the vector computation in _lars_foreach (1 where a norm is 0)."""
    if w_norm == 0 or other_norm == 0:
        return 1.0
    return _clipped(eta * w_norm / (other_norm + weight_decay * w_norm + eps), lr, trust_clip)


def _clip_vector(raw: torch.Tensor, lr: float, trust_clip: bool) -> torch.Tensor:
    if not trust_clip:
        return raw
    return torch.clamp(raw / lr, max=1.0) if lr > 0 else torch.ones_like(raw)


def _lars_foreach(params, grads, bufs, *, lr, momentum, weight_decay, eta, eps, nesterov, trust_clip,
                  lr_in_momentum, variant, adapt) -> list[torch.Tensor]:
    """The same math with torch._foreach_* kernels over all tensors of a group (one launch per op, not per tensor).
    The trust ratios stay on the device (no host sync)."""
    dtype, device = params[0].dtype, params[0].device
    trust = torch.ones(len(params), device=device, dtype=norm_dtype(dtype))
    if variant == "seed":
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        if adapt:
            w_norm, b_norm = stacked_norms(params), stacked_norms(bufs)
            trust = trust_ratio(_clip_vector(eta * w_norm / (b_norm + eps), lr, trust_clip), 1.0, w_norm, b_norm)
            torch._foreach_add_(params, torch._foreach_mul(bufs, list(trust.to(dtype).unbind(0))), alpha=-lr)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)
        return list(trust.unbind(0))
    inside = lr_in_momentum and momentum
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else torch._foreach_mul(grads, 1.0)
    if adapt:
        w_norm, g_norm = stacked_norms(params), stacked_norms(grads)
        raw = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
        trust = trust_ratio(_clip_vector(raw, lr, trust_clip), 1.0, w_norm, g_norm)
        scale = trust * lr if inside else trust  # the coefficient of (g + wd*w) that enters the buffer
        torch._foreach_mul_(d, list(scale.to(dtype).unbind(0)))
    elif inside:  # no trust ratios: the Python scalar keeps the fused kernel (a list of 0-d tensors falls off it)
        torch._foreach_mul_(d, lr)
    if momentum:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        step = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    else:
        step = d
    torch._foreach_add_(params, step, alpha=-1.0 if inside else -lr)
    return list(trust.unbind(0))


def _lars_fused(params, grads, bufs, *, lr, momentum, weight_decay, eta, eps, nesterov, trust_clip,
                lr_in_momentum, variant, adapt) -> list[torch.Tensor]:
    """The paper variant with momentum, one compiled kernel per tensor (``_lars_tensor``). The switches travel as
    values (0/1) in one small tensor, so every group and every LR shares one compiled graph. A tensor whose
    gradient or buffer is laid out differently from it takes the loop. The trust ratios stay tensors."""
    trusts = []
    hypers = {}
    for w, g, buf in zip(params, grads, bufs):
        views = flat(w, g, buf)
        if views is None:
            trusts += _lars_single([w], [g], [buf], lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                   eps=eps, nesterov=nesterov, trust_clip=trust_clip, lr_in_momentum=lr_in_momentum,
                                   variant=variant, adapt=adapt)
            continue
        key = (w.dtype, w.device)
        if key not in hypers:  # c = trust * c_scale enters the buffer; w -= out * (the buffer, or Nesterov's step)
            c_scale, out = (lr, 1.0) if lr_in_momentum else (1.0, lr)
            hypers[key] = torch.tensor([lr, momentum, weight_decay, eta, eps, c_scale, out, nesterov, trust_clip,
                                        adapt], dtype=norm_dtype(w.dtype), device=w.device)
        trusts.append(compiled(_lars_tensor)(*views, hypers[key]))
    return trusts


def _lars_tensor(w, g, buf, hyper):
    """One tensor's step (1-D views), the loop's formulas: trust from |w| and |g| (one pass), then
    buf = m*buf + c*(g + wd*w) and w -= out*buf, or w -= out*(c*(g + wd*w) + m*buf) with Nesterov (a second)."""
    lr, momentum, wd, eta, eps, c_scale, out, nesterov, trust_clip, adapt = hyper.unbind(0)
    w_norm = torch.linalg.vector_norm(w, dtype=hyper.dtype)
    g_norm = torch.linalg.vector_norm(g, dtype=hyper.dtype)
    one = torch.ones_like(w_norm)
    trust = eta * w_norm / (g_norm + wd * w_norm + eps)
    clipped = torch.where(lr > 0, torch.clamp(trust / lr, max=1.0), one)
    trust = torch.where(trust_clip > 0, clipped, trust)
    trust = torch.where((w_norm > 0) & (g_norm > 0) & (adapt > 0), trust, one)
    c = trust * c_scale
    d = c * (g + wd * w)
    new_buf = momentum * buf + d
    step = torch.where(nesterov > 0, d + momentum * new_buf, new_buf)
    buf.copy_(new_buf)
    w.sub_(out * step)
    return trust
