"""LARS against a hand-written per-tensor implementation of the paper's Algorithm 1 (float64, several steps)."""
import copy

import pytest
import torch

from optim import LARS, param_groups


def reference_lars(params, grads_per_step, lr, momentum, wd, eta, eps, nesterov, trust_clip, adapt):
    """Plain Python over tensors: the paper's formulas (arXiv 1708.03888, Algorithm 1), nothing shared with optim/."""
    w = [p.detach().clone() for p in params]
    buf = [None] * len(w)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            wn, gn = float(w[i].norm()), float(g.norm())
            if adapt and wn > 0 and gn > 0:
                trust = eta * wn / (gn + wd * wn + eps)
                if trust_clip:
                    trust = min(trust / lr, 1.0)
            else:
                trust = 1.0
            d = trust * (g + wd * w[i])
            buf[i] = d.clone() if buf[i] is None else momentum * buf[i] + d
            step = d + momentum * buf[i] if nesterov else buf[i]
            w[i] = w[i] - lr * step
    return w


# the loop, foreach and the compiled kernel; the compiled cases share one worker, which compiles once
KERNELS = [False, True, pytest.param("fused", marks=pytest.mark.xdist_group("compiled"))]


def make_problem(seed=0, steps=4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (5,), (3, 4, 2, 2), (7,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return params, grads


def kernel(foreach) -> dict:
    """The kernel a test case runs: the loop (False), foreach (True) or the compiled one ("fused")."""
    return {"fused": True} if foreach == "fused" else {"foreach": foreach}


def run_ours(params, grads_per_step, foreach, **kw):
    adapt = kw.pop("adapt")
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS([{"params": ps, "adapt": adapt}], **kernel(foreach), **kw)
    for grads in grads_per_step:
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("nesterov,wd,trust_clip,adapt", [
    (False, 0.0, False, True), (True, 0.0, False, True), (False, 5e-4, False, True), (True, 1e-2, False, True),
    (False, 1e-2, True, True), (True, 1e-2, False, False)])
def test_lars_matches_paper_algorithm(foreach, nesterov, wd, trust_clip, adapt):
    params, grads = make_problem()
    hp = dict(lr=2.0, momentum=0.9, weight_decay=wd, eta=0.001, eps=1e-8, nesterov=nesterov, trust_clip=trust_clip)
    ours, _ = run_ours(params, grads, foreach, adapt=adapt, **hp)
    ref = reference_lars(params, grads, hp["lr"], hp["momentum"], wd, hp["eta"], hp["eps"], nesterov, trust_clip,
                         adapt)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_without_adaptation_is_torch_sgd(nesterov):
    params, grads = make_problem(1)
    ours, _ = run_ours(params, grads, True, adapt=False, lr=0.1, momentum=0.9, weight_decay=1e-3,
                       nesterov=nesterov)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        sgd.step()
    for a, b in zip(ours, ps, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_weight_decay_changes_the_update():
    """timm PR #1094: decay silently ignored. Both the trust ratio and the direction must see it."""
    params, grads = make_problem(2, steps=1)
    a, _ = run_ours(params, grads, True, adapt=True, lr=1.0, momentum=0.0, weight_decay=0.0)
    b, _ = run_ours(params, grads, True, adapt=True, lr=1.0, momentum=0.0, weight_decay=0.1)
    assert all(not torch.allclose(x, y) for x, y in zip(a, b, strict=True))


def test_zero_norms_give_trust_one():
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    v = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    w.grad = torch.ones_like(w)
    v.grad = torch.zeros_like(v)
    opt = LARS([w, v], lr=0.5, momentum=0.0, weight_decay=0.0)
    opt.step()
    assert list(opt.trust_ratios.values()) == [1.0, 1.0]
    torch.testing.assert_close(w.detach(), torch.full((4, 3), -0.5, dtype=torch.float64))  # plain step, trust 1
    torch.testing.assert_close(v.detach(), torch.ones(4, 3, dtype=torch.float64))


def test_seed_variant_follows_the_notes():
    """variant=seed: decoupled decay first, buf = m*buf + g, trust on ||buf||, w -= lr*trust*buf."""
    params, grads = make_problem(3)
    lr, m, wd, eta, eps = 1.5, 0.9, 1e-2, 0.001, 1e-9
    for foreach in (False, True):
        ours, _ = run_ours(params, grads, foreach, adapt=True, lr=lr, momentum=m, weight_decay=wd, eta=eta, eps=eps,
                           variant="seed")
        w = [p.clone() for p in params]
        buf = [torch.zeros_like(p) for p in params]
        for gs in grads:
            for i, g in enumerate(gs):
                w[i] = w[i] - lr * wd * w[i]
                buf[i] = m * buf[i] + g
                trust = eta * float(w[i].norm()) / (float(buf[i].norm()) + eps)
                w[i] = w[i] - lr * trust * buf[i]
        for a, b in zip(ours, w, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    params, grads = make_problem(4, steps=6)
    full, _ = run_ours(params, grads, True, adapt=True, lr=1.0, momentum=0.9, weight_decay=1e-3, nesterov=True)
    half, opt = run_ours(params, grads[:3], True, adapt=True, lr=1.0, momentum=0.9, weight_decay=1e-3, nesterov=True)
    ps = [torch.nn.Parameter(p.clone()) for p in half]
    opt2 = LARS([{"params": ps, "adapt": True}], lr=1.0, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for gs in grads[3:]:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(full, ps, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_track_float64(dtype):
    params, grads = make_problem(5)
    ref, _ = run_ours(params, grads, True, adapt=True, lr=1.0, momentum=0.9, weight_decay=1e-3)
    low, _ = run_ours([p.to(dtype) for p in params], [[g.to(dtype) for g in gs] for gs in grads], True,
                      adapt=True, lr=1.0, momentum=0.9, weight_decay=1e-3)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(low, ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_grad_scaler_path_unscales_before_the_trust_ratio():
    """apex #1030: norms of loss-scaled gradients. With unscale_ first, fp16-style scaling changes nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    results = []
    for m, use_scaler in ((model, False), (twin, True)):
        opt = LARS(param_groups(m, 1e-3), lr=1.0, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(m(x), y)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_with_the_value():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="-1"):
        LARS(p, lr=-1)
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, lr=1, momentum=1.5)
    with pytest.raises(ValueError, match="variant"):
        LARS(p, lr=1, variant="timm")


# --- under a changing LR: the paper's Algorithm 1 (LR inside the buffer) against the torch/timm/apex form ------

LRS = [0.2 * (k + 1) for k in range(10)] + [2.0 * 0.5 ** k for k in range(1, 5)]  # warmup, then a step decay


def reference_paper_form(params, grads_per_step, lrs, momentum, wd, eta, eps, nesterov, trust_clip):
    """arXiv 1708.03888 Algorithm 1, per tensor: v = m*v + lr_t*trust*(g + wd*w); w -= v."""
    w = [p.detach().clone() for p in params]
    v = [torch.zeros_like(p) for p in w]
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        for i, g in enumerate(grads):
            wn, gn = float(w[i].norm()), float(g.norm())
            trust = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
            if trust_clip and wn > 0 and gn > 0:
                trust = min(trust / lr, 1.0)
            local = lr * trust * (g + wd * w[i])
            v[i] = momentum * v[i] + local
            w[i] = w[i] - (local + momentum * v[i] if nesterov else v[i])
    return w


def reference_timm_lars(params, grads_per_step, lrs, momentum, wd, eta, eps, nesterov, trust_clip):
    """timm's Lars(always_adapt=True) semantics (timm/optim/lars.py): adapt, then torch SGD with the LR outside."""
    w = [p.detach().clone() for p in params]
    buf = [None] * len(w)
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        for i, g in enumerate(grads):
            wn, gn = w[i].norm(), g.norm()
            ratio = eta * wn / (gn + wn * wd + eps)
            ratio = torch.where(wn > 0, torch.where(gn > 0, ratio, 1.0), 1.0)
            if trust_clip:
                ratio = torch.minimum(ratio / lr, torch.tensor(1.0, dtype=ratio.dtype))
            d = (g + wd * w[i]) * ratio
            buf[i] = d.clone() if buf[i] is None else buf[i] * momentum + d
            w[i] = w[i] - lr * (d + momentum * buf[i] if nesterov else buf[i])
    return w


def run_with_lrs(params, grads_per_step, lrs, foreach, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS(ps, **kernel(foreach), **kw)
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


CASES = [(False, 0.0, False), (True, 0.0, False), (False, 5e-3, False), (True, 1e-2, False), (False, 1e-2, True),
         (True, 1e-2, True)]


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("nesterov,wd,trust_clip", CASES)
def test_paper_form_under_a_changing_lr(foreach, nesterov, wd, trust_clip):
    params, grads = make_problem(7, steps=len(LRS))
    hp = dict(momentum=0.9, eta=0.02, eps=1e-8)
    ours = run_with_lrs(params, grads, LRS, foreach, weight_decay=wd, nesterov=nesterov, trust_clip=trust_clip, **hp)
    ref = reference_paper_form(params, grads, LRS, wd=wd, nesterov=nesterov, trust_clip=trust_clip, **hp)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("nesterov,wd,trust_clip", CASES)
def test_torch_form_under_a_changing_lr_is_timm_lars(foreach, nesterov, wd, trust_clip):
    params, grads = make_problem(8, steps=len(LRS))
    hp = dict(momentum=0.9, eta=0.02, eps=1e-8)
    ours = run_with_lrs(params, grads, LRS, foreach, weight_decay=wd, nesterov=nesterov, trust_clip=trust_clip,
                        lr_in_momentum=False, **hp)
    ref = reference_timm_lars(params, grads, LRS, wd=wd, nesterov=nesterov, trust_clip=trust_clip, **hp)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_the_two_forms_differ_under_warmup_and_agree_at_constant_lr():
    params, grads = make_problem(9, steps=10)
    warm = [0.1 * (k + 1) for k in range(10)]
    paper = run_with_lrs(params, grads, warm, False, weight_decay=1e-3)
    torch_form = run_with_lrs(params, grads, warm, False, weight_decay=1e-3, lr_in_momentum=False)
    assert max(float((a - b).abs().max()) for a, b in zip(paper, torch_form, strict=True)) > 1e-4
    const = [0.5] * 10
    paper = run_with_lrs(params, grads, const, False, weight_decay=1e-3)
    torch_form = run_with_lrs(params, grads, const, False, weight_decay=1e-3, lr_in_momentum=False)
    for a, b in zip(paper, torch_form, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lr_in_momentum", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_unadapted_groups_under_a_changing_lr(lr_in_momentum, nesterov):
    """adapt=False: the torch form is torch.optim.SGD exactly; the paper form is SGD with the LR in the buffer."""
    params, grads = make_problem(10, steps=len(LRS))
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS([{"params": ps, "adapt": False}], momentum=0.9, weight_decay=1e-3, nesterov=nesterov,
               lr_in_momentum=lr_in_momentum)
    twins = [torch.nn.Parameter(p.clone()) for p in params]
    sgd = torch.optim.SGD(twins, lr=1.0, momentum=0.9, weight_decay=0.0 if lr_in_momentum else 1e-3,
                          nesterov=nesterov)
    for lr, gs in zip(LRS, grads, strict=True):
        opt.param_groups[0]["lr"] = lr
        if lr_in_momentum:  # SGD at lr 1 on the LR-scaled, decayed gradient is the paper's form
            for t, g in zip(twins, gs, strict=True):
                t.grad = lr * (g + 1e-3 * t.detach())
        else:
            sgd.param_groups[0]["lr"] = lr
            for t, g in zip(twins, gs, strict=True):
                t.grad = g.clone()
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        sgd.step()
    for a, b in zip(ps, twins, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("lr_in_momentum, nesterov, weight_decay", [(True, False, 0.0), (True, True, 1e-4),
                                                                     (False, False, 1e-4), (True, False, 5e-4)])
def test_an_unadapted_group_multiplies_by_the_python_lr_and_reads_no_host(lr_in_momentum, nesterov, weight_decay):
    """BatchNorm and bias tensors (adapt=False) take the plain update: lr as a Python scalar keeps _foreach_mul_ on
    its fused path (a list of 0-d tensors launches one kernel per tensor), and step() never reads the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(6)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference, strict=True):
        p.grad = torch.randn(5)
        q.grad = p.grad.clone()
    hyper = dict(lr=0.3, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, lr_in_momentum=lr_in_momentum)
    fast = LARS([{"params": params, "adapt": False}], foreach=True, **hyper)
    loop = LARS([{"params": reference, "adapt": False}], foreach=False, **hyper)
    for _ in range(2):
        with Ops() as ops:
            fast.step()
        loop.step()
    assert "aten._foreach_mul_.List" not in ops.seen and "aten._local_scalar_dense.default" not in ops.seen
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
