"""The generic invariants torch checks for every one of its own optimizers (torch's test_optim.py /
common_optimizers.py) and the bodies of timm's tests/test_optim.py, run against LARS and LAMB with each kernel.
torch.optim.SGD / AdamW pass every one of these; each case is written so that it compares against an independent
run (uninterrupted, float64, view_as_real, negated gradient, ...), never against a stored number."""
import copy
import io
import pickle

import pytest
import torch

from optim import LAMB, LARS

FACTORIES = {
    "lars-loop": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "weight_decay": 1e-2, "nesterov": True, "foreach": False,
                                                **kw}),
    "lars-foreach": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "weight_decay": 1e-2, "nesterov": True,
                                                   "foreach": True, **kw}),
    "lars-clip-loop": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "trust_clip": True, "foreach": False, **kw}),
    "lars-clip-foreach": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "trust_clip": True, "foreach": True, **kw}),
    "lars-torchform-loop": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "lr_in_momentum": False, "foreach": False,
                                                          **kw}),
    "lars-fused": lambda ps, **kw: LARS(ps, **{"lr": 0.5, "weight_decay": 1e-2, "nesterov": True, "trust_clip": True,
                                                 "fused": True, **kw}),
    "lamb-loop": lambda ps, **kw: LAMB(ps, **{"lr": 0.01, "weight_decay": 1e-2, "foreach": False, **kw}),
    "lamb-foreach": lambda ps, **kw: LAMB(ps, **{"lr": 0.01, "weight_decay": 1e-2, "foreach": True, **kw}),
    "lamb-fused": lambda ps, **kw: LAMB(ps, **{"lr": 0.01, "weight_decay": 1e-2, "fused": True, **kw}),
}
# the compiled kernel's cases share one worker, which compiles once
KINDS = [pytest.param(k, marks=pytest.mark.xdist_group("compiled")) if k.endswith("fused") else k
         for k in FACTORIES]
SHAPES = [(6, 5), (5,), (2, 3, 3, 3)]


def make_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def run(opt, params, steps, start=0, lrs=None):
    for k in range(start, start + steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        for p, g in zip(params, grads_for(params, k), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def assert_same(a, b, tol=0.0):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# --- regressions, each of which failed before its fix --------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group_then_step(kind):
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = FACTORIES[kind]([a])
    opt.add_param_group({"params": [b]})
    a.grad = torch.ones(2, 2)
    b.grad = torch.ones(2, 2)
    opt.step()
    assert not torch.equal(b.detach(), torch.ones(2, 2))
    assert set(opt.trust_ratios) == {a, b}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_then_step_continues_like_the_original(kind, how):
    params = make_params()
    opt = FACTORIES[kind](params)
    run(opt, params, 2)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        buf = io.BytesIO()
        torch.save((params, opt), buf)
        buf.seek(0)
        params2, opt2 = torch.load(buf, weights_only=False)
    assert_same(run(opt2, params2, 3, start=2), run(opt, params, 3, start=2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trust_clip", [False, True])
def test_lr_zero_is_a_no_op(kind, trust_clip):
    if trust_clip and kind.startswith("lamb"):
        pytest.skip("trust_clip is LARS's")
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = FACTORIES[kind](params, lr=0.0, **({"trust_clip": True} if trust_clip else {}))
    assert_same(run(opt, params, 3), before)


@pytest.mark.parametrize("kind", KINDS)
def test_complex_params_equal_their_view_as_real(kind):
    g = torch.Generator().manual_seed(3)
    z = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = FACTORIES[kind]([z]), FACTORIES[kind]([r])
    for step in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step), dtype=torch.complex128)
        z.grad, r.grad = grad, torch.view_as_real(grad).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["constructor", "group"])
def test_maximize_equals_descending_the_negated_gradient(kind, where):
    params, twins = make_params(), make_params()
    opt = (FACTORIES[kind](params, maximize=True) if where == "constructor"
           else FACTORIES[kind]([{"params": params, "maximize": True}]))
    ref = FACTORIES[kind](twins)
    for k in range(3):
        for p, t, g in zip(params, twins, grads_for(params, k), strict=True):
            p.grad, t.grad = g, -g
        opt.step()
        ref.step()
    assert_same(params, twins)


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_lr_only_in_the_param_groups(cls):
    """timm's test_optim_factory case 4: every group brings its own lr."""
    a, b = make_params()[:2]
    opt = cls([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()


# --- torch's generic invariants ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_params_without_grad_are_untouched_and_a_no_grad_step_is_a_no_op(kind):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = FACTORIES[kind](params)
    opt.step()  # no grads at all
    assert_same(params, before)
    assert not any(opt.state[p] for p in params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert_same(params[1:], before[1:])
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_param_in_a_group_is_untouched(kind):
    params = make_params()
    params[1].requires_grad_(False)
    frozen = params[1].detach().clone()
    opt = FACTORIES[kind](params)
    for k in range(2):
        for p, g in zip(params, grads_for(params, k), strict=True):
            if p.requires_grad:
                p.grad = g
        opt.step()
    assert torch.equal(params[1].detach(), frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_then_continue_equals_uninterrupted(kind):
    lrs = [0.1 * (k + 1) for k in range(6)]  # a changing LR, as under warmup
    full = make_params()
    uninterrupted = run(FACTORIES[kind](full), full, 6, lrs=lrs)
    half = make_params()
    opt = FACTORIES[kind](half)
    run(opt, half, 3, lrs=lrs)
    saved = copy.deepcopy(opt.state_dict())
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt2 = FACTORIES[kind](fresh, lr=123.0)  # the state dict's lr wins, as in torch
    opt2.load_state_dict(saved)
    assert_same(run(opt2, fresh, 3, start=3, lrs=lrs), uninterrupted)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_tracks_float64(kind, dtype, tol):
    if kind.startswith("lamb") and dtype == torch.float16:
        tol = 0.1  # Adam's second moment (1e-3 * g^2) underflows fp16; torch's AdamW is off by 17.7 on this problem
    ref = make_params()
    low = make_params(dtype)
    run(FACTORIES[kind](ref), ref, 3)
    opt = FACTORIES[kind](low)
    for k in range(3):  # the same float64 gradients, rounded to the low dtype
        for p, g in zip(low, grads_for(ref, k), strict=True):
            p.grad = g.to(dtype)
        opt.step()
    for a, b in zip(low, ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_closure_returns_the_loss(kind):
    params = make_params()
    opt = FACTORIES[kind](params)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_lr_equals_float_lr(kind):
    a, b = make_params(), make_params()
    lr = 0.0625 if kind.startswith("lamb") else 0.5  # exact in float32, so tensor(lr) == lr
    assert_same(run(FACTORIES[kind](a, lr=torch.tensor(lr)), a, 3), run(FACTORIES[kind](b, lr=lr), b, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_params(kind):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    cl = torch.nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    plain = torch.nn.Parameter(w.clone())
    opt_cl, opt_plain = FACTORIES[kind]([cl]), FACTORIES[kind]([plain])
    for k in range(3):
        grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        cl.grad, plain.grad = grad.to(memory_format=torch.channels_last), grad.clone()
        opt_cl.step()
        opt_plain.step()
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl.detach(), plain.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_duplicate_params_are_rejected(kind):
    a = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        FACTORIES[kind]([])
    with pytest.raises(ValueError, match="twice"):
        FACTORIES[kind]([a, a])
    with pytest.raises(ValueError, match="more than one"):
        FACTORIES[kind]([{"params": [a]}, {"params": [a]}])


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_grads_are_rejected(kind):
    a = torch.nn.Parameter(torch.ones(3, 2))
    a.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        FACTORIES[kind]([a]).step()


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip_keeps_hyperparameters_and_state(kind):
    params = make_params()
    opt = FACTORIES[kind](params)
    run(opt, params, 2)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.param_groups[0].keys() == opt.param_groups[0].keys()
    assert clone.defaults == opt.defaults


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_fused_without_a_cpp_compiler_is_refused_at_construction(cls, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="'no-such-compiler' is not on PATH"):
        cls([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=True)
    cls([torch.nn.Parameter(torch.ones(3))], lr=0.1)  # the loop needs none


@pytest.mark.parametrize("cls", [LARS, LAMB])
@pytest.mark.parametrize("key", ["foreach", "fused"])
def test_a_kernel_switch_that_is_not_a_bool_is_refused(cls, key):
    with pytest.raises(ValueError, match=f"{key} must be true, false or null, got 'maybe'"):
        cls([torch.nn.Parameter(torch.ones(3))], lr=0.1, **{key: "maybe"})
