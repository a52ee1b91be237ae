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
            if foreach is None:
                foreach = all(p.device.type in ("cpu", "cuda") for p in params)
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
    """Reference per-tensor loop: the formulas of the module docstring, one tensor at a time."""
    trusts = []
    for j, (w, g) in enumerate(zip(params, grads)):
        if variant == "seed":
            if weight_decay:
                w.mul_(1 - lr * weight_decay)
            buf = bufs[j]
            buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
            bufs[j] = buf
            trust = torch.ones((), device=w.device, dtype=norm_dtype(w.dtype))
            if adapt:
                w_norm, b_norm = w.norm().to(norm_dtype(w.dtype)), buf.norm().to(norm_dtype(w.dtype))
                trust = trust_ratio(_clip(eta * w_norm / (b_norm + eps), lr, trust_clip), 1.0, w_norm, b_norm)
            w.add_(buf * trust.to(w.dtype), alpha=-lr)
            trusts.append(trust)
            continue
        d = g.add(w, alpha=weight_decay) if weight_decay else g.clone()
        trust = torch.ones((), device=w.device, dtype=norm_dtype(w.dtype))
        if adapt:
            w_norm, g_norm = w.norm().to(norm_dtype(w.dtype)), g.norm().to(norm_dtype(w.dtype))
            raw = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
            trust = trust_ratio(_clip(raw, lr, trust_clip), 1.0, w_norm, g_norm)
            d.mul_(trust.to(d.dtype))
        trusts.append(trust)
        if momentum:
            buf = bufs[j]
            buf = d.clone() if buf is None else buf.mul_(momentum).add_(d)
            bufs[j] = buf
            step = d.add(buf, alpha=momentum) if nesterov else buf
        else:
            step = d
        w.add_(step, alpha=-lr)
    return bufs, torch.stack(trusts)


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
