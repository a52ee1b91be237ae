"""Schedules and scaling rules against torch's own schedulers and hand-written formulas."""
import math

import pytest
import torch

from optim import LRSchedule, apply_lr, lr_multiplier, scale_adam


def torch_lrs(make_scheduler, steps, lr):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_cosine_equals_torch_sequential_lr():
    total, warmup, peak = 200, 16, 1e-3
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-3, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=1e-4)], milestones=[warmup]),
        total, peak)
    ours = LRSchedule(peak_lr=peak, total_steps=total, warmup="linear", warmup_steps=warmup, start_factor=1e-3,
                      decay="cosine", min_factor=1e-4 / peak)
    for t, lr in enumerate(theirs):
        assert ours(t) == pytest.approx(lr, rel=1e-9, abs=1e-15), t


@pytest.mark.parametrize("total,pct", [(100, 0.3), (1000, 0.1), (37, 0.25)])
def test_onecycle_equals_torch(total, pct):
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.4, total_steps=total, pct_start=pct, anneal_strategy="cos", div_factor=25,
        final_div_factor=1e4, cycle_momentum=False), total, 0.4)
    ours = LRSchedule(peak_lr=0.4, total_steps=total, decay="onecycle", pct_start=pct)
    for t, lr in enumerate(theirs):
        assert ours(t) == pytest.approx(lr, rel=1e-9, abs=1e-15), t


def test_inverse_sqrt_equals_the_transformer_lambda_lr():
    total, warmup = 500, 40

    def lr_lambda(step):  # the usual Transformer LambdaLR, written out
        if step == 0:
            return 1e-8
        if step <= warmup:
            return step / warmup
        return (warmup ** 0.5) / (step ** 0.5)

    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda), total + 1, 1e-3)
    ours = LRSchedule(peak_lr=1e-3, total_steps=total, warmup="linear", warmup_steps=warmup, decay="inverse_sqrt")
    # the common LambdaLR form's step 0 is a (near-)zero LR, a wasted step; our optimizer step k uses that form's step k + 1
    for t in range(total):
        assert ours(t) == pytest.approx(theirs[t + 1], rel=1e-12), t
    assert ours(0) == 1e-3 / warmup


def test_step_decay_equals_multistep_lr():
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[30, 60, 80], gamma=0.1),
                       90, 3.2)
    ours = LRSchedule(peak_lr=3.2, total_steps=90, decay="step", milestones=(30, 60, 80))
    for t, lr in enumerate(theirs):
        assert ours(t) == pytest.approx(lr, rel=1e-12), t


def test_poly_equals_polynomial_lr():
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=100, power=2.0), 100, 2.0)
    ours = LRSchedule(peak_lr=2.0, total_steps=100, decay="poly", power=2.0)
    for t, lr in enumerate(theirs):
        assert ours(t) == pytest.approx(lr, rel=1e-9, abs=1e-15), t


@pytest.mark.parametrize("warmup,expected", [
    # (shape, LR at t = 0, W/2, W-1 as a fraction of peak), from hand-written formulas with W = 10; the shapes that
    # start at 0 (linear from 0, cosine) are evaluated at t + 1 (SPEC: no optimizer step at LR 0)
    ("constant", [0.1, 0.1, 0.1]),
    ("linear", [0.1, 0.6, 1.0]),
    ("exponential", [0.01, math.exp(-0.5 * math.log(100)), math.exp(-0.1 * math.log(100))]),
    ("cosine", [(1 - math.cos(math.pi * 0.1)) / 2, (1 - math.cos(math.pi * 0.6)) / 2, 1.0]),
])
def test_warmup_shapes_follow_the_formulas(warmup, expected):
    s = LRSchedule(peak_lr=2.0, total_steps=100, warmup=warmup, warmup_steps=10, decay="constant",
                   start_factor=0.0)
    assert [s.factor(t) for t in (0, 5, 9)] == pytest.approx(expected)
    assert s(10) == 2.0 and s(99) == 2.0


def test_warmup_must_be_shorter_than_the_run():
    with pytest.raises(ValueError, match="shorter than the run"):
        LRSchedule(peak_lr=1.0, total_steps=10, warmup="linear", warmup_steps=10)


def test_schedule_is_a_pure_function_of_the_step():
    """pytorch #60265: resuming mid-warmup must continue the curve, so the LR depends on the step alone."""
    a = LRSchedule(peak_lr=1.0, total_steps=50, warmup="linear", warmup_steps=20)
    b = LRSchedule(**a.state_dict())
    assert [a(t) for t in range(50)] == [b(t) for t in range(50)]
    assert b(7) == a(7) and b(7) < b(8) < a(20)


@pytest.mark.parametrize("rule,batch,expected", [
    ("none", 8192, 0.1), ("linear", 8192, 3.2), ("sqrt", 8192, 0.1 * math.sqrt(32)), ("adam_sde", 1024, 0.2),
    ("linear", 128, 0.05)])
def test_scaling_rules_peak_lr(rule, batch, expected):
    """Goyal et al. Table 2a: 0.1 x 32 = 3.2 at 8k (linear), sqrt(32) x 0.1 (square root)."""
    assert 0.1 * lr_multiplier(rule, batch, 256) == pytest.approx(expected)


def test_adam_sde_rescales_betas_and_eps():
    (b1, b2), eps = scale_adam((0.9, 0.999), 1e-8, 1024, 256)  # kappa = 4
    assert (b1, b2, eps) == pytest.approx((0.6, 0.996, 5e-9))
    with pytest.raises(ValueError, match="beta1"):
        scale_adam((0.9, 0.999), 1e-8, 4096, 256)  # kappa = 16 > 1/(1-0.9)


@pytest.mark.parametrize("adam", [False, True], ids=["sgd-momentum", "adam-beta1"])
def test_onecycle_momentum_cycling_equals_torch(adam):
    total = 60
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.4) if adam else torch.optim.SGD([p], lr=0.4, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=total, pct_start=0.25,
                                                cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)
    ours = LRSchedule(peak_lr=0.4, total_steps=total, decay="onecycle", pct_start=0.25, cycle_momentum=True,
                      base_momentum=0.8, max_momentum=0.95)
    mine = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0) if adam else \
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.5)
    for t in range(total):
        apply_lr(mine, ours(t), ours.momentum(t))
        theirs, got = opt.param_groups[0], mine.param_groups[0]
        key = "betas" if adam else "momentum"
        assert got["lr"] == pytest.approx(theirs["lr"], rel=1e-9) and got[key] == pytest.approx(theirs[key]), t
        opt.step()
        sched.step()
    assert LRSchedule(peak_lr=0.4, total_steps=total, decay="cosine").momentum(3) is None
