"""Large-batch diagnostics: per-layer trust ratios (LARS/LAMB), per-layer update ratios ||dw||/||w||, and the
gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162).

Gradient noise scale, Appendix A of the paper: for gradients measured at two batch sizes B_small < B_big,
    E|G_B|^2 = |G|^2 + tr(Sigma) / B, so
    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)      (unbiased)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)           (unbiased)
and B_simple = tr(Sigma) / |G|^2, the batch size above which larger batches stop paying off linearly.
Accumulation gives both gradients for free: each micro-batch's own gradient (B_small = micro_batch, before any
all-reduce; MicroBatchNorms) and the full step's gradient (B_big = global batch); the mean over a step's
micro-batches is one estimate, weighted in the EMA as that many samples.

tr(Sigma) changes slowly along a run and its estimate is noisy: it is smoothed by an exponential moving average.
|G|^2 is not: near the peak LR the weights oscillate across a valley and |G|^2 changes up to 13x within five steps
while tr(Sigma) changes at most 1.4x (measured at fixed weights, docs/benchmarks.md), so an average over steps lags
by that much. The diagnostic therefore divides the smoothed tr(Sigma) by this step's own |G|^2 (``per_step_grad``).
AdaScale and the adaptive batch act on a steadier figure: both moving averages, from their probe (the rank's first
micro-batches) as the small batch, the estimator of the paper and of recipes/ section 5.
"""
from __future__ import annotations

import math

import torch

from .distributed import unwrap


def sq_norm(tensors) -> torch.Tensor:
    """Squared L2 norm of all tensors together, as a float64 tensor on their device (no host sync)."""
    ts = [t for t in tensors if t is not None]
    return torch.stack(torch._foreach_norm(ts)).double().pow(2).sum()


class NoiseScale:
    def __init__(self, beta: float = 0.99, per_step_grad: bool = False):
        self.beta, self.per_step_grad = beta, per_step_grad
        self.grad_sq = self.trace = None   # EMAs, bias-corrected on read
        self.step_grad_sq = None           # the last step's own |G|^2 estimate
        self.updates = 0

    @staticmethod
    def estimates(b_small: int, small_sq: float, b_big: int, big_sq: float) -> tuple[float, float]:
        grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
        return grad_sq, trace

    def update(self, b_small: int, small_sq: float, b_big: int, big_sq: float, samples: int = 1) -> None:
        """One step's estimate. ``small_sq`` may be the mean over ``samples`` independent small-batch gradients:
        the EMA then decays as for that many one-sample updates (beta ** samples), so a step that measures every
        micro-batch averages over fewer steps at the same variance, and lags less."""
        self.add(*self.estimates(b_small, small_sq, b_big, big_sq), samples)

    def add(self, g: float, s: float, samples: int = 1) -> None:
        """One step's estimates of |G|^2 and tr(Sigma), as ``samples`` one-sample updates."""
        if self.grad_sq is None:
            self.grad_sq, self.trace = 0.0, 0.0
        decay = self.beta ** samples
        self.grad_sq = decay * self.grad_sq + (1 - decay) * g
        self.trace = decay * self.trace + (1 - decay) * s
        self.step_grad_sq = g
        self.updates += samples

    def state_dict(self) -> dict:
        return {"grad_sq": self.grad_sq, "trace": self.trace, "updates": self.updates,
                "step_grad_sq": self.step_grad_sq}

    def load_state_dict(self, state: dict) -> None:
        self.grad_sq, self.trace = state.get("grad_sq"), state.get("trace")
        self.updates, self.step_grad_sq = state.get("updates", 0), state.get("step_grad_sq")

    @property
    def smoothed(self) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)): the bias-corrected moving averages (nan before any update)."""
        if not self.updates:
            return math.nan, math.nan
        correction = 1 - self.beta ** self.updates
        return self.grad_sq / correction, self.trace / correction

    @property
    def parts(self) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)) that ``b_simple`` divides: the smoothed tr(Sigma), and the smoothed |G|^2 or with
        ``per_step_grad`` the last step's own (nan before any update)."""
        g, s = self.smoothed
        if self.per_step_grad and self.updates:
            g = self.step_grad_sq if self.step_grad_sq is not None else math.nan
        return g, s

    @property
    def b_simple(self) -> float:
        """tr(Sigma) over |G|^2 (``parts``); nan where that |G|^2 is not positive: the step's gradient is within its
        noise, B_simple beyond what it can measure."""
        g, s = self.parts
        return s / g if g > 0 else math.nan


def noise_scale_for(measures_noise: bool, cfg_diagnostics) -> NoiseScale:
    """AdaScale and the adaptive batch act on moving averages of both estimates (``noise_ema``, per step); the
    diagnostic alone divides a short average of tr(Sigma) (``noise_trace_ema``, per micro-batch) by the step's own
    |G|^2."""
    if measures_noise:
        return NoiseScale(cfg_diagnostics.noise_ema)
    return NoiseScale(cfg_diagnostics.noise_trace_ema, per_step_grad=True)


class MicroBatchNorms:
    """The squared norm of each micro-batch's own gradient while the micro-batches accumulate into ``.grad``: the
    increment since the previous micro-batch, from one saved copy of the gradients (no host read)."""

    def __init__(self, device):
        self.previous = None
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0

    def add(self, grads: list[torch.Tensor]) -> None:
        if self.previous is None:
            self.previous = [g.detach().clone() for g in grads]
            self.total += sq_norm(grads)
        else:
            torch._foreach_sub_(self.previous, grads)  # minus this micro-batch's increment
            self.total += sq_norm(self.previous)
            torch._foreach_copy_(self.previous, grads)
        self.count += 1


def stats(name: str, values: torch.Tensor) -> dict:
    v = values.double()
    return {f"{name}/mean": float(v.mean()), f"{name}/min": float(v.min()), f"{name}/max": float(v.max()),
            f"{name}/median": float(v.median())}


def trust_ratios(optimizer) -> torch.Tensor | None:
    """The last trust ratio of every adapted tensor of LARS/LAMB, as one vector (None for other optimizers).
    Non-adapted tensors (BN, biases) are left out: their ratio is 1 by definition, not a measurement."""
    ratios = getattr(optimizer, "trust_ratios", None)
    if not ratios:
        return None
    return torch.stack([torch.as_tensor(r, dtype=torch.float64).cpu() for r in ratios.values()])


def trust_ratios_by_name(model, optimizer) -> dict[str, float]:
    """Each adapted tensor's last trust ratio under its parameter name (e.g. ``layer1.0.conv1.weight``), so a
    user sees which layer is throttled."""
    ratios = getattr(optimizer, "trust_ratios", None) or {}
    return {name: float(ratios[p]) for name, p in unwrap(model).named_parameters() if p in ratios}


def trust_ratio_stats(optimizer) -> dict:
    """Summary of the last per-tensor trust ratios of LARS/LAMB over the adapted tensors ({} for other optimizers)."""
    ratios = trust_ratios(optimizer)
    return {} if ratios is None else stats("trust_ratio", ratios)


def update_ratios(before: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """||w_after - w_before|| / ||w_before|| per tensor (0 where the weight norm is 0)."""
    deltas = torch._foreach_sub([p.detach() for p in params], before)
    d = torch.stack(torch._foreach_norm(deltas)).double()
    w = torch.stack(torch._foreach_norm(before)).double()
    return torch.where(w > 0, d / w, torch.zeros_like(d))
