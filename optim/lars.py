"""LARS: Layer-wise Adaptive Rate Scaling.

You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888, Algorithm 1.
For each parameter tensor ``w`` with gradient ``g`` (one "layer"), global learning rate ``lr``, weight decay ``wd``:

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (1 where ||w|| or ||g|| is 0)
    d     = trust * (g + wd * w)                          (weight decay coupled, L2-style, as in the paper)
    buf   = momentum * buf + d                            (buf = d on the first step)
    w    -= lr * buf                                      (Nesterov: w -= lr * (d + momentum * buf))

Per param-group switches:
  ``adapt=False``   no trust ratio for the group (trust = 1): LARS becomes torch.optim.SGD with the same
                    momentum / Nesterov / coupled weight decay. ``param_groups()`` sets it for tensors with ndim <= 1.
  ``weight_decay``  independent of ``adapt`` (a group may adapt without decay, or decay without adapting).

``trust_clip=True`` is LARC's clipping (NVIDIA apex): the layer's learning rate ``lr * trust`` is capped at ``lr``,
i.e. ``trust`` is replaced by ``min(trust / lr, 1)``. The step then is ``lr * min(trust / lr, 1) = min(trust, lr)``:
the global LR acts as a ceiling on each layer's adapted LR instead of a multiplier. Zero-norm layers keep trust 1.

``variant="seed"`` is the variant from the user's notes (shared/seeds): decoupled decay ``w -= lr*wd*w`` applied
first, then ``buf = momentum*buf + g``, ``trust = eta*||w||/(||buf|| + eps)`` taken on the momentum buffer, and
``w -= lr*trust*buf``. It is offered for comparison; the paper's algorithm is the default.

The last trust ratio of every tensor is kept in ``optimizer.trust_ratios[group_index]`` (a float32 vector, no
host sync) for logging.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._helpers import norm_dtype, stacked_norms, trust_ratio

VARIANTS = ("paper", "seed")


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 eps: float = 1e-8, nesterov: bool = False, trust_clip: bool = False, variant: str = "paper",
                 foreach: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if not eta > 0.0:
            raise ValueError(f"LARS: eta (trust coefficient) must be > 0, got {eta}")
        if not eps >= 0.0:
            raise ValueError(f"LARS: eps must be >= 0, got {eps}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov=True needs momentum > 0")
        if variant not in VARIANTS:
            raise ValueError(f"LARS: variant must be one of {VARIANTS}, got {variant!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov,
                        trust_clip=trust_clip, variant=variant, adapt=True, foreach=foreach)
        super().__init__(params, defaults)
        self.trust_ratios: list[torch.Tensor | None] = [None] * len(self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:  # foreach wins on GPUs; on CPUs the allocation-free loop is faster (bench_optim.py)
                foreach = all(p.is_cuda for p in params)
            kernel = _lars_foreach if foreach else _lars_single
            hyper = {k: group[k] for k in ("lr", "momentum", "weight_decay", "eta", "eps", "nesterov",
                                           "trust_clip", "variant", "adapt")}
            new_bufs, self.trust_ratios[i] = kernel(params, grads, bufs, **hyper)
            for p, b in zip(params, new_bufs):
                if b is not None:
                    self.state[p]["momentum_buffer"] = b
        return loss


def _clip(trust: torch.Tensor, lr: float, trust_clip: bool) -> torch.Tensor:
    return torch.clamp(trust / lr, max=1.0) if trust_clip else trust


def _lars_single(params, grads, bufs, *, lr, momentum, weight_decay, eta, eps, nesterov, trust_clip, variant,
                 adapt):
    """Per-tensor loop, written to allocate nothing but the first momentum buffer: on CPU, fresh temporaries
    (page faults) cost more than the arithmetic, so this path beats foreach there. The trust ratio is a Python
    float (a host sync, free on CPU). Algebraically the formulas of the module docstring:
    with d = trust*(g + wd*w): buf = m*buf + d, and w - lr*(d + m*buf) = w*(1 - lr*trust*wd) - lr*trust*g - lr*m*buf.
    """
    trusts = []
    for j, (w, g) in enumerate(zip(params, grads)):
        trust = 1.0
        if variant == "seed":
            if weight_decay:
                w.mul_(1 - lr * weight_decay)
            buf = bufs[j] = g.clone() if bufs[j] is None else bufs[j].mul_(momentum).add_(g)
            if adapt:
                trust = _trust(eta, float(w.norm()), float(buf.norm()), 0.0, eps, lr, trust_clip)
            w.add_(buf, alpha=-lr * trust)
            trusts.append(trust)
            continue
        if adapt:
            trust = _trust(eta, float(w.norm()), float(g.norm()), weight_decay, eps, lr, trust_clip)
        trusts.append(trust)
        if momentum:
            if bufs[j] is None:
                buf = bufs[j] = torch.mul(g, trust)
            else:
                buf = bufs[j].mul_(momentum).add_(g, alpha=trust)
            if weight_decay:
                buf.add_(w, alpha=trust * weight_decay)  # uses w before this step's update, as d does
            if nesterov:
                w.mul_(1 - lr * trust * weight_decay).add_(g, alpha=-lr * trust).add_(buf, alpha=-lr * momentum)
            else:
                w.add_(buf, alpha=-lr)
        else:
            w.mul_(1 - lr * trust * weight_decay).add_(g, alpha=-lr * trust)
    return bufs, torch.tensor(trusts, dtype=norm_dtype(params[0].dtype))


def _trust(eta, w_norm, other_norm, weight_decay, eps, lr, trust_clip) -> float:
    """Scalar twin of the vector computation in _lars_foreach (1 where a norm is 0)."""
    if w_norm == 0 or other_norm == 0:
        return 1.0
    trust = eta * w_norm / (other_norm + weight_decay * w_norm + eps)
    return min(trust / lr, 1.0) if trust_clip else trust


def _lars_foreach(params, grads, bufs, *, lr, momentum, weight_decay, eta, eps, nesterov, trust_clip, variant,
                  adapt):
    """The same math with torch._foreach_* kernels over all tensors of a group (one launch per op, not per tensor)."""
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):  # foreach needs one dtype/device per call
        return _lars_single(params, grads, bufs, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                            eps=eps, nesterov=nesterov, trust_clip=trust_clip, variant=variant, adapt=adapt)
    ones = torch.ones(len(params), device=device, dtype=norm_dtype(dtype))
    if variant == "seed":
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        bufs = _momentum_foreach(bufs, grads, momentum)
        trust = ones
        if adapt:
            w_norm, b_norm = stacked_norms(params), stacked_norms(bufs)
            trust = trust_ratio(_clip(eta * w_norm / (b_norm + eps), lr, trust_clip), 1.0, w_norm, b_norm)
            torch._foreach_add_(params, torch._foreach_mul(bufs, list(trust.to(dtype).unbind(0))), alpha=-lr)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)
        return bufs, trust
    trust = ones
    if adapt:
        w_norm, g_norm = stacked_norms(params), stacked_norms(grads)
        raw = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
        trust = trust_ratio(_clip(raw, lr, trust_clip), 1.0, w_norm, g_norm)
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else torch._foreach_mul(grads, 1.0)
    if adapt:
        torch._foreach_mul_(d, list(trust.to(dtype).unbind(0)))
    if momentum:
        bufs = _momentum_foreach(bufs, d, momentum)
        step = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    else:
        step = d
    torch._foreach_add_(params, step, alpha=-lr)
    return bufs, trust


def _momentum_foreach(bufs, d, momentum):
    """buf = momentum * buf + d, with buf = d (a copy) where it does not exist yet."""
    if all(b is None for b in bufs):
        return [t.clone() for t in d]
    if any(b is None for b in bufs):
        bufs = [t.clone() if b is None else b.mul_(momentum).add_(t) for b, t in zip(bufs, d)]
        return bufs
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    return bufs
