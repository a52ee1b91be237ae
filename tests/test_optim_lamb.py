"""LAMB against a hand-written per-tensor implementation of arXiv 1904.00962 (float64, several steps)."""
import copy

import pytest
import torch

from optim import LAMB


def reference_lamb(params, grads_per_step, lr, b1, b2, eps, wd, adapt, bounds=None, bias_correction=True):
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t) if bias_correction else m[i]
            v_hat = v[i] / (1 - b2 ** t) if bias_correction else v[i]
            r = m_hat / (v_hat.sqrt() + eps) + wd * w[i]
            wn, rn = float(w[i].norm()), float(r.norm())
            trust = wn / rn if (adapt and wn > 0 and rn > 0) else 1.0
            if bounds and adapt and wn > 0 and rn > 0:
                trust = min(max(trust, bounds[0]), bounds[1])
            w[i] = w[i] - lr * trust * r
    return w


# the loop, foreach and the compiled kernel; the compiled cases share one worker, which compiles once
KERNELS = [False, True, pytest.param("fused", marks=pytest.mark.xdist_group("compiled"))]


def make_problem(seed=0, steps=5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (2, 3, 3, 3), (4,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return params, grads


def run_ours(params, grads_per_step, foreach, adapt=True, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LAMB([{"params": ps, "adapt": adapt}], **({"fused": True} if foreach == "fused" else {"foreach": foreach}),
                **kw)
    for grads in grads_per_step:
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("wd,bounds,bias_correction", [(0.0, None, True), (0.01, None, True), (0.1, (0.5, 2.0), True),
                                                       (0.01, None, False)])
def test_lamb_matches_paper_algorithm(foreach, wd, bounds, bias_correction):
    params, grads = make_problem()
    ours, _ = run_ours(params, grads, foreach, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd,
                       trust_bounds=bounds, bias_correction=bias_correction)
    ref = reference_lamb(params, grads, 0.01, 0.9, 0.99, 1e-6, wd, True, bounds, bias_correction)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_without_adaptation_is_torch_adamw(foreach, wd):
    params, grads = make_problem(1)
    ours, _ = run_ours(params, grads, foreach, adapt=False, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                       weight_decay=wd)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    ref = (torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd) if wd
           else torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8))
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        ref.step()
    for a, b in zip(ours, ps, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


def test_decay_sits_inside_the_trust_ratio():
    """cybertronai/pytorch-lamb #3: decay added to the gradient instead of the update. With a zero gradient,
    the paper's update is r = wd*w, trust = ||w||/||wd*w|| = 1/wd, so w -= lr*w exactly."""
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    LAMB([w], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), w0 * 0.9)


def test_zero_norms_give_trust_one():
    w = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    w.grad = torch.ones_like(w)
    opt = LAMB([w], lr=0.1)
    opt.step()
    assert float(opt.trust_ratios[w]) == 1.0
    assert torch.all(w.detach() < 0)  # the plain Adam step happened


def test_state_dict_round_trip_continues_identically():
    params, grads = make_problem(2, steps=6)
    full, _ = run_ours(params, grads, True, lr=0.01, weight_decay=0.01)
    half, opt = run_ours(params, grads[:3], True, lr=0.01, weight_decay=0.01)
    ps = [torch.nn.Parameter(p.clone()) for p in half]
    opt2 = LAMB([{"params": ps, "adapt": True}], lr=0.01, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for gs in grads[3:]:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(full, ps, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_track_float64(dtype):
    params, grads = make_problem(3)
    ref, _ = run_ours(params, grads, True, lr=0.01, weight_decay=0.01)
    low, _ = run_ours([p.to(dtype) for p in params], [[g.to(dtype) for g in gs] for gs in grads], True, lr=0.01,
                      weight_decay=0.01)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(low, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_bad_arguments_raise_with_the_value():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="1.5"):
        LAMB(p, lr=0.1, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="trust_bounds"):
        LAMB(p, lr=0.1, trust_bounds=(2.0, 1.0))
