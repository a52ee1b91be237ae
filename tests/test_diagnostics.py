"""Gradient noise scale against its closed form, and the diagnostics a training run logs."""
import json

import torch

from engine.diagnostics import NoiseScale, update_ratios
from tests.helpers import TINY, run_train


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


def test_estimates_are_exact_without_sampling_noise():
    G2, trace = 4.0, 100.0
    small, big = G2 + trace / 10, G2 + trace / 1000  # E|G_B|^2 = |G|^2 + tr(Sigma)/B
    g, s = NoiseScale.estimates(10, small, 1000, big)
    assert abs(g - G2) < 1e-9 and abs(s - trace) < 1e-9


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
    assert "noise_scale_b_simple" in summary  # a float; early in training it can be noisy
