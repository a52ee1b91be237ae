"""Every recipe composes, plans on its own dataset, and carries the paper's numbers (hand-copied from the papers)."""
import math

import pytest

from engine.cli import group_options
from engine.datasets import train_size_of
from engine.plan import make_plan
from tests.helpers import CONF, load_cfg

IMAGENET = 1_281_167


def plan_of(recipe, *extra):
    cfg = load_cfg([f"recipe={recipe}", *extra])
    return cfg, make_plan(cfg, train_size_of(cfg.data))


def test_there_are_paper_and_cpu_scale_recipes():
    names = group_options("recipe")
    assert len([n for n in names if not n.startswith("fmnist_")]) >= 5
    assert {"fmnist_goyal_warmup", "fmnist_large_batch_optimizers", "fmnist_sqrt_vs_linear"} <= set(names)


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_composes_and_plans(recipe):
    cfg, plan = plan_of(recipe)
    assert plan.global_batch == plan.micro_batch * plan.accum_steps
    assert 0 <= plan.warmup_steps < plan.total_steps and plan.peak_lr > 0
    text = (CONF / "recipe" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_")
    if not recipe.startswith("fmnist_"):
        assert "arXiv" in text or "mlcommons" in text  # each paper recipe names its source


def test_goyal_8k_is_the_papers_recipe():
    cfg, p = plan_of("goyal2017_resnet50_8k")
    steps_per_epoch = IMAGENET // 8192
    assert (cfg.data.name, cfg.model.name, cfg.optim.target) == ("imagenet", "resnet50", "torch.optim.SGD")
    assert cfg.optim.nesterov and cfg.optim.weight_decay == 1e-4 and cfg.label_smoothing == 0.0
    assert p.micro_batch == 32  # BN over 32 images, as the paper's workers
    assert p.peak_lr == pytest.approx(3.2) and p.lr_schedule(0) == pytest.approx(0.1)  # 0.1 -> 0.1 * 32
    assert p.warmup_steps == 5 * steps_per_epoch and p.total_steps == 90 * steps_per_epoch
    lr = [p.lr_schedule(e * steps_per_epoch) for e in (29, 30, 59, 60, 79, 80, 89)]
    assert lr == pytest.approx([3.2, 0.32, 0.32, 0.032, 0.032, 0.0032, 0.0032])  # x0.1 at 30/60/80


def test_goyal_256_baseline():
    _, p = plan_of("goyal2017_resnet50_256")
    assert p.peak_lr == pytest.approx(0.1) and p.warmup_steps == 0


@pytest.mark.parametrize("recipe,batch,lr,warmup_epochs,epochs", [
    ("lars2017_resnet50_8k", 8192, 30.0, 5, 100), ("lars2017_resnet50_32k", 32768, 40.0, 12, 100)])
def test_lars_recipes_follow_table_4(recipe, batch, lr, warmup_epochs, epochs):
    cfg, p = plan_of(recipe)
    spe = IMAGENET // batch
    assert cfg.optim.target == "optim.LARS" and cfg.optim.eta == 0.001 and cfg.optim.weight_decay == 5e-4
    assert (p.global_batch, p.peak_lr, p.warmup_steps, p.total_steps) == (batch, lr, warmup_epochs * spe, epochs * spe)
    assert p.lr_schedule.decay == "poly" and p.lr_schedule.power == 2.0
    assert p.lr_schedule(p.total_steps - 1) < 1e-3 * lr  # poly(2) to zero


def test_lamb_32k_and_nado_step_budgets():
    _, lamb = plan_of("lamb2019_resnet50_32k")
    assert lamb.global_batch == 32768 and lamb.warmup_steps == 500
    assert abs(lamb.total_steps - 3519) < 20  # the author repo's 3519 iterations
    assert lamb.peak_lr == pytest.approx(0.04 / math.sqrt(2), rel=1e-3)
    _, nado = plan_of("nado2021_nesterov_resnet50_32k")
    assert nado.total_steps == 2512  # the paper's step budget


def test_mlperf_ends_at_its_end_lr():
    cfg, p = plan_of("mlperf_lars_resnet50_16k")
    assert p.global_batch == 16384 and p.peak_lr == 25.0 and cfg.optim.weight_decay == 2e-4
    assert p.lr_schedule(p.total_steps) == pytest.approx(1e-4)  # poly(2) down to the end LR 1e-4


def test_command_line_overrides_a_recipe():
    _, p = plan_of("goyal2017_resnet50_8k", "batch=4k", "warmup=none")
    assert p.global_batch == 4096 and p.peak_lr == pytest.approx(1.6) and not p.lr_schedule.uses_warmup


def test_torchvision_vit_b16_is_their_recipe():
    cfg, p = plan_of("torchvision_vit_b16_4k")
    spe = IMAGENET // 4096
    assert (cfg.model.name, cfg.optim.target, p.global_batch, p.micro_batch) == ("vit_b16", "torch.optim.AdamW", 4096, 64)
    assert p.peak_lr == 0.003 and cfg.optim.weight_decay == 0.3 and p.rule == "none"
    assert (p.warmup_steps, p.total_steps) == (30 * spe, 300 * spe)
    assert p.lr_schedule(0) == pytest.approx(0.003 * 0.033) and p.lr_schedule.decay == "cosine"
    assert (cfg.label_smoothing, cfg.grad_clip, cfg.precision) == (0.11, 1.0, "fp16")
    d = cfg.data
    assert (d.mixup_alpha, d.cutmix_alpha, d.auto_augment, d.repeated_aug) == (0.2, 1.0, "ra", 3)
    assert cfg.ema.enabled and (cfg.ema.decay, cfg.ema.every_steps) == (0.99998, 32)


def test_vit_lamb_32k_scales_the_4k_recipe_by_the_square_root():
    cfg, p = plan_of("vit_b16_lamb_32k")
    assert cfg.optim.target == "optim.LAMB" and p.global_batch == 32768
    assert p.peak_lr == pytest.approx(0.003 * math.sqrt(8))
    assert p.warmup_steps == 30 * (IMAGENET // 32768) and cfg.data.mixup_alpha == 0.2 and cfg.ema.enabled


@pytest.mark.parametrize("optim,batch,peak_lr,warmup_steps,total_steps,accum", [
    ("sgd", "256", 0.6, 117, 936, 2),      # 234 steps/epoch; warmup half an epoch; linear rule from sgd.yaml's 0.6
    ("sgd", "16k", 38.4, 2, 12, 128),      # 3 steps/epoch (the partial 4th batch is dropped)
    ("lars", "4k", 16.0, 7, 56, 32),       # sqrt rule: 4 x sqrt(16)
    ("adamw", "1k", 4e-3, 29, 232, 8),     # sqrt rule: 2e-3 x sqrt(4)
])
def test_accuracy_vs_batch_recipe_keeps_each_optimizers_rule(optim, batch, peak_lr, warmup_steps, total_steps, accum):
    cfg, p = plan_of("fmnist_accuracy_vs_batch", f"optim={optim}", f"batch={batch}")
    assert (p.peak_lr, p.warmup_steps, p.total_steps, p.accum_steps) == (pytest.approx(peak_lr), warmup_steps,
                                                                         total_steps, accum)
    assert cfg.eval.every_epochs == 0.25 and cfg.label_smoothing == 0 and cfg.checkpoint.keep_steps[0] == 16
