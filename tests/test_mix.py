"""MixUp / CutMix (torchvision.transforms.v2): the mixing is what the papers define, one lambda per step, and what a
run sees does not depend on micro_batch or ranks; resume stays bit-exact with them on."""
import pytest
import torch

from engine.data import make_synthetic
from engine.transforms import Augment, Mix
from tests.helpers import TINY, run_train


def step_images(data, micro_batch, world_size, mix, step=3, seed=5):
    index = torch.randperm(data.train_size, generator=torch.Generator().manual_seed(0))[:64]
    xs, ys = [], []
    for rank in range(world_size):
        for x, y in data.one_step_micro_batches(index, step, micro_batch, world_size, rank, seed, Augment(2, True),
                                            "cpu", mix):
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_what_a_step_sees_is_independent_of_micro_batch_and_ranks(mixup, cutmix):
    data = make_synthetic(128, 16, 12, 3, 10)
    mix = Mix(mixup, cutmix, 10)
    x64, y64 = step_images(data, 64, 1, mix)
    for micro, ranks in ((8, 1), (16, 2), (4, 4)):
        x, y = step_images(data, micro, ranks, mix)
        assert torch.equal(x, x64) and torch.equal(y, y64), (micro, ranks)
    assert y64.shape == (64, 10) and torch.allclose(y64.sum(1), torch.ones(64))


def plain_and_mixed(mix, micro_batch):
    """A step's 64 images unmixed, the same step mixed (at ``micro_batch``), and each image's partner."""
    data = make_synthetic(128, 16, 12, 3, 10)
    return (*step_images(data, 64, 1, None), *step_images(data, micro_batch, 1, mix), mix.partners(64, 5, 3))


def test_mixup_blends_each_image_with_its_partner_by_one_lambda():
    plain_x, plain_y, x, y, partner = plain_and_mixed(Mix(0.4, 0.0, 10), 16)
    # lambda from the soft label of image 0, then every pixel and label of the batch must follow it
    lam = float(y[0, plain_y[0]]) if plain_y[0] != plain_y[partner[0]] else None
    if lam is None:  # same class: read lambda from another image
        i = next(i for i in range(64) if plain_y[i] != plain_y[partner[i]])
        lam = float(y[i, plain_y[i]])
    expected_x = lam * plain_x + (1 - lam) * plain_x[partner]
    expected_y = lam * torch.nn.functional.one_hot(plain_y, 10) + (1 - lam) * torch.nn.functional.one_hot(
        plain_y[partner], 10)
    torch.testing.assert_close(x, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected_y.float(), rtol=1e-6, atol=1e-6)


def test_cutmix_pastes_one_box_and_labels_by_its_area():
    plain_x, plain_y, x, y, partner = plain_and_mixed(Mix(0.0, 1.0, 10), 32)
    from_partner = (x == plain_x[partner]) & (x != plain_x)
    box = from_partner.any(0).any(0)  # the pixels where any image took its partner's: one box for the step
    assert torch.equal(torch.where(box, plain_x[partner], plain_x), x)
    lam = 1 - box.float().mean()
    i = next(i for i in range(64) if plain_y[i] != plain_y[partner[i]])
    torch.testing.assert_close(y[i, plain_y[i]], lam, rtol=1e-6, atol=1e-6)


def test_resume_with_mixup_and_cutmix_is_bit_exact(tmp_path):
    run = [*TINY, "batch=64", "micro_batch=16", "data.augment=true", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
           "checkpoint.every_steps=1"]
    straight, a = run_train(tmp_path, run, "straight")
    run_train(tmp_path, run + ["max_steps=7"], "resumed")
    resumed, b = run_train(tmp_path, run + ["resume=auto"], "resumed")
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=False)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert straight["steps"] == resumed["steps"] and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mixing_leaves_the_cuda_generators_alone(monkeypatch):
    """torch.manual_seed also reseeds every CUDA generator (and fork_rng(devices=[]) restores only the CPU one), so
    every micro-batch's forward would start from one CUDA state and dropout masks would repeat."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    plain_and_mixed(Mix(0.2, 1.0, 10), 16)
    assert reseeded == []
