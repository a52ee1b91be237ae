"""Gradient noise scale against its closed form, and the diagnostics a training run logs."""
import json
import subprocess
import sys

import pytest
import torch

from engine.diagnostics import NoiseScale, update_ratios
from tests.helpers import ROOT, TINY, load_cfg, run_train


def test_noise_scale_matches_closed_form_on_a_linear_model():
    """Loss_i(w) = w . z_i with z_i ~ N(G, Sigma): per-example gradients have mean G and covariance Sigma exactly,
    so B_simple = tr(Sigma) / |G|^2 is known. Feed the estimator micro-batch (16) and global-batch (256) gradient
    norms the way accumulation produces them (the small batch is the first part of the big one)."""
    g = torch.Generator().manual_seed(0)
    dim = 50
    G = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(dim, generator=g, dtype=torch.float64) * 2  # diagonal std devs
    truth = float((sigma ** 2).sum() / G.pow(2).sum())
    tracker = NoiseScale(beta=0.99)
    for _ in range(3000):
        z = G + sigma * torch.randn(256, dim, generator=g, dtype=torch.float64)  # per-example gradients
        small, big = z[:16].mean(0), z.mean(0)
        tracker.update(16, float(small.pow(2).sum()), 256, float(big.pow(2).sum()))
    assert abs(tracker.b_simple - truth) / truth < 0.2, (tracker.b_simple, truth)


def test_every_micro_batch_measured_is_as_exact_over_a_tenth_of_the_steps():
    """The same linear model, the step's 16 micro-batches of 16 each measured (the mean of their squared norms, 16
    samples per update): 300 steps give what one micro-batch per step needed 3000 for, so the average is 10x
    shorter and follows a changing noise scale 10x sooner."""
    g = torch.Generator().manual_seed(0)
    dim = 50
    G = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(dim, generator=g, dtype=torch.float64) * 2
    truth = float((sigma ** 2).sum() / G.pow(2).sum())
    tracker = NoiseScale(beta=0.99)
    for _ in range(300):
        z = G + sigma * torch.randn(256, dim, generator=g, dtype=torch.float64)
        micro = z.view(16, 16, dim).mean(1)  # each micro-batch's own gradient
        small = float(micro.pow(2).sum(1).mean())
        tracker.update(16, small, 256, float(z.mean(0).pow(2).sum()), samples=16)
    assert abs(tracker.b_simple - truth) / truth < 0.2, (tracker.b_simple, truth)
    assert tracker.updates == 300 * 16


def test_micro_batch_norms_are_each_micro_batch_s_own_gradient():
    """Accumulated as train_step does (loss / accum, backward into .grad), against a backward per micro-batch."""
    from engine.diagnostics import MicroBatchNorms
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    loss = lambda x, y: torch.nn.functional.cross_entropy(model(x), y) / len(batches)
    expected = 0.0
    for x, y in batches:
        grads = torch.autograd.grad(loss(x, y), list(model.parameters()))
        expected += sum(float(t.double().pow(2).sum()) for t in grads)
    norms = MicroBatchNorms("cpu")
    for x, y in batches:
        loss(x, y).backward()
        norms.add([p.grad for p in model.parameters()])
    assert norms.count == 4 and abs(float(norms.total) - expected) < 1e-6 * expected  # float32 increments


def test_estimates_are_exact_without_sampling_noise():
    G2, trace = 4.0, 100.0
    small, big = G2 + trace / 10, G2 + trace / 1000  # E|G_B|^2 = |G|^2 + tr(Sigma)/B
    g, s = NoiseScale.estimates(10, small, 1000, big)
    assert abs(g - G2) < 1e-9 and abs(s - trace) < 1e-9


@pytest.mark.parametrize("per_step_grad, steps", [(True, 1), (True, 4), (False, 1), (False, 4)])
def test_b_simple_follows_a_swinging_gradient_only_with_the_steps_own(per_step_grad, steps):
    """Near the peak LR |G|^2 swings from step to step while tr(Sigma) holds still (docs/diagnostics.md). Exact
    estimates (no sampling noise) of |G|^2 alternating 1.0 and 0.05 at tr(Sigma) 10: the diagnostic's figure is
    tr(Sigma) over this step's |G|^2 (10 or 200) at once; the moving average of both reads the ratio of their
    averages (hand-computed here), as AdaScale and the adaptive batch use it."""
    beta, b, big, trace = 0.9, 8, 64, 10.0
    ns = NoiseScale(beta, per_step_grad=per_step_grad)
    seen = [1.0 if k % 2 == 0 else 0.05 for k in range(steps)]
    for g in seen:
        ns.update(b, g + trace / b, big, g + trace / big, samples=big // b)
    if per_step_grad:
        expected = trace / seen[-1]
    else:
        decay = beta ** (big // b)
        weights = [(1 - decay) * decay ** (steps - 1 - k) for k in range(steps)]
        expected = trace / (sum(w * g for w, g in zip(weights, seen, strict=True)) / sum(weights))
    assert ns.b_simple == pytest.approx(expected)
    restored = NoiseScale(beta, per_step_grad=per_step_grad)
    restored.load_state_dict(ns.state_dict())
    assert restored.b_simple == pytest.approx(expected)  # a resume logs the same figure


@pytest.mark.parametrize("overrides, beta, per_step_grad", [
    (["diagnostics.noise_trace_ema=0.5"], 0.5, True),                                    # the diagnostic alone
    (["scaling=adascale", "scaling.ref_batch=32", "diagnostics.noise_ema=0.95"], 0.95, False),  # AdaScale acts on it
])
def test_each_noise_estimate_takes_its_own_average(tmp_path, monkeypatch, overrides, beta, per_step_grad):
    from engine import diagnostics
    made = []

    class Recording(NoiseScale):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(diagnostics, "NoiseScale", Recording)
    run_train(tmp_path, [*TINY, "batch=64", "micro_batch=16", "max_steps=2", *overrides])
    (noise,) = made
    assert (noise.beta, noise.per_step_grad) == (beta, per_step_grad) and noise.updates > 0


def test_update_ratios():
    before = [torch.ones(4), torch.zeros(3)]
    after = [torch.full((4,), 1.5), torch.ones(3)]
    assert update_ratios(before, after).tolist() == [0.5, 0.0]


def test_training_logs_trust_update_ratios_and_noise_scale(tmp_path):
    summary, run_dir = run_train(tmp_path, TINY + ["optim=lars", "batch=128", "micro_batch=32", "epochs=3",
                                                   "diagnostics.every=2"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if "update_ratio/mean" in r]
    assert len(diag) == 6 and all(r["step"] % 2 == 0 for r in diag)
    assert all(r["trust_ratio/min"] > 0 and r["update_ratio/max"] > 0 for r in diag)
    noise = [r["noise_scale/b_simple"] for r in rows if "noise_scale/b_simple" in r]
    assert len(noise) == 12 // 10 + 1 and isinstance(summary["noise_scale_b_simple"], float)  # every 10 steps + last
    out = tmp_path / "noise"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_noise_scale.py"), str(run_dir), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "B_simple last" in r.stdout and out.with_suffix(".png").stat().st_size > 10_000


def test_noise_scale_state_round_trips():
    a = NoiseScale()
    for i in range(5):
        a.update(16, 10.0 + i, 256, 2.0)
    b = NoiseScale()
    b.load_state_dict(a.state_dict())
    b.update(16, 3.0, 256, 1.0)
    a.update(16, 3.0, 256, 1.0)
    assert a.b_simple == b.b_simple and b.updates == 6


def test_trust_ratios_are_the_adapted_tensors_only_and_named(tmp_path):
    """The histogram and the statistics describe the same set: the adapted tensors (ndim > 1), not the BN/bias
    tensors whose ratio is 1 by definition; wandb gets one metric per layer under its parameter name."""
    from engine.config import ModelConfig
    from engine.diagnostics import trust_ratios, trust_ratios_by_name
    from engine.models import build_model
    from optim import LARS, param_groups
    blocks = load_cfg(TINY).model.blocks  # the run's below
    model = build_model(ModelConfig(name="resnet_small", width=8, blocks=blocks, zero_init_residual=True), (1, 28, 28),
                        10)
    opt = LARS(param_groups(model, 1e-4), lr=1.0)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    adapted = [n for n, p in model.named_parameters() if p.ndim > 1]
    named = trust_ratios_by_name(model, opt)
    assert sorted(named) == sorted(adapted) and len(trust_ratios(opt)) == len(adapted)
    assert sorted(named.values()) == sorted(trust_ratios(opt).tolist())

    summary, run_dir = run_train(tmp_path, TINY + ["optim=lars", "batch=128", "micro_batch=32", "epochs=1",
                                                   "diagnostics.every=2", "logger=wandb"])
    from tests.wandb_records import finished_records
    assert summary["steps"] == 4, summary
    keys = set()
    for rec in finished_records(next((run_dir / "wandb").glob("offline-run-*/*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    per_layer = {k.removeprefix("trust_ratio/") for k in keys if k.startswith("trust_ratio/")
                 and not k.startswith("trust_ratio/layers")} - {"mean", "min", "max", "median"}
    assert per_layer == set(adapted), sorted(keys)
