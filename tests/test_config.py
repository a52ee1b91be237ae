"""Every option of every group composes, builds its part, and the plan's numbers are right."""
import math

import pytest
import torch

from engine.cli import group_options
from engine.config import parse_batch
from engine.errors import ConfigError
from engine.models import build_model
from engine.plan import auto_micro_batch, make_plan
from tests.helpers import build_plan_optimizer, compose_cfg, load_cfg

GROUPS = ["optim", "warmup", "schedule", "scaling", "model", "data", "logger"]


def test_every_spec_option_exists():
    spec = {"optim": {"sgd", "adamw", "lars", "lamb"},
            "warmup": {"none", "constant", "linear", "exponential", "cosine"},
            "schedule": {"constant", "cosine", "step", "poly", "inverse_sqrt", "onecycle"},
            "scaling": {"none", "linear", "sqrt", "adam_sde"},
            "model": {"resnet_small", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_b16"},
            "data": {"fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic"},
            "logger": {"wandb", "csv", "tensorboard", "none"}}
    for group, options in spec.items():
        assert options <= set(group_options(group)), group


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_plans(group, option):
    overrides = [f"{group}={option}"]
    if group == "scaling" and option == "adam_sde":
        overrides.append("optim=adamw")
    cfg = load_cfg(overrides)
    train_size = {"imagenet": 1_281_167, "synthetic": cfg.data.train_size}.get(option, 50_000)
    plan = make_plan(cfg, train_size)
    assert plan.peak_lr > 0 and plan.total_steps > plan.warmup_steps


@pytest.mark.parametrize("option", group_options("optim"))
def test_every_optimizer_builds_and_steps(option):
    cfg = load_cfg([f"optim={option}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_plan_optimizer(make_plan(cfg, 50_000), model)
    model(torch.randn(2, 4)).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)


@pytest.mark.parametrize("option,shape", [("resnet_small", (1, 28, 28)), ("resnet18", (3, 32, 32)),
                                          ("resnet50", (3, 32, 32)), ("vit_tiny", (3, 32, 32)),
                                          ("vit_small", (1, 28, 28)), ("vit_b16", (3, 64, 64))])
def test_every_model_builds_and_runs(option, shape):
    cfg = load_cfg([f"model={option}"])
    if option == "vit_b16":
        cfg.model.patch_size = 16  # 224 px in real use; 64 px keeps the test fast
    model = build_model(cfg.model, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def _basic_block_params(cin: int, cout: int, stride: int) -> int:
    """A BasicBlock's parameters by hand: two 3x3 convs and two BatchNorms, and a 1x1 conv and BatchNorm on the
    shortcut where the shape changes (He et al. 2016, option B)."""
    shortcut = cin * cout + 2 * cout if stride != 1 or cin != cout else 0
    return 9 * cin * cout + 9 * cout * cout + 4 * cout + shortcut


@pytest.mark.parametrize("blocks,feature_size", [((1, 1, 1), 4), ((0, 1, 2), 4), ((1, 0, 0), 14), ((0, 0, 2), 7),
                                                 ((2, 1, 0), 7)])
def test_resnet_small_blocks_per_stage(blocks, feature_size):
    """model.blocks: each stage's BasicBlock count (widths w, 2w, 4w; the first block of stages 2 and 3 halves the
    size), a 0 leaving the stage out; the parameter count against a hand count, the head's input size by hand."""
    from torchvision.models.resnet import BasicBlock
    w = 8
    cfg = load_cfg(["model=resnet_small", f"model.width={w}", f"model.blocks=[{','.join(map(str, blocks))}]"])
    model = build_model(cfg.model, (1, 28, 28), 10)
    expected, cin = 9 * w + 2 * w, w  # the stride-2 stem and its BatchNorm
    for i, (cout, count) in enumerate(zip((w, 2 * w, 4 * w), blocks, strict=True)):
        for k in range(count):
            expected, cin = expected + _basic_block_params(cin, cout, 2 if i and not k else 1), cout
    expected += cin * 10 + 10  # the linear head
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == sum(blocks)
    assert model.stages(model.stem(torch.randn(2, 1, 28, 28))).shape == (2, cin, feature_size, feature_size)


def test_resnet_small_without_blocks_is_the_three_stage_network():
    """A config without model.blocks (a checkpoint's from before it existed) builds one block per stage: the
    network whose 77,754 parameters the default run logged before (77,072 with weight decay, 682 without)."""
    cfg = load_cfg(["model=resnet_small"])
    cfg.model.blocks = None
    assert sum(p.numel() for p in build_model(cfg.model, (1, 28, 28), 10).parameters()) == 77_754


def test_optimizer_files_choose_their_scaling_rule_and_the_command_line_wins():
    assert compose_cfg([]).scaling.rule == "linear"
    assert compose_cfg(["optim=lars"]).scaling.rule == "sqrt"
    assert compose_cfg(["optim=lamb"]).scaling.rule == "sqrt"
    assert compose_cfg(["optim=adamw"]).scaling.rule == "sqrt"
    assert compose_cfg(["optim=lars", "scaling=linear"]).scaling.rule == "linear"
    assert compose_cfg(["scaling=none", "optim=lars"]).scaling.rule == "none"


@pytest.mark.parametrize("text,value", [(256, 256), ("256", 256), ("4k", 4096), ("32k", 32768), ("32K", 32768),
                                        ("32768", 32768)])
def test_batch_values(text, value):
    assert parse_batch(text) == value


@pytest.mark.parametrize("text", ["12q", "0", "-256", "1.5k", "", "k", 2.0])
def test_bad_batch_values(text):
    with pytest.raises(ConfigError, match="batch="):
        parse_batch(text)


def plan_for(overrides, train_size=60_000, world_size=1):
    cfg = load_cfg(overrides)
    return make_plan(cfg, train_size, world_size)


def test_default_plan_numbers():
    p = plan_for([])
    assert (p.global_batch, p.micro_batch, p.accum_steps, p.world_size) == (256, 256, 1, 1)
    assert p.steps_per_epoch == 60_000 // 256 == 234
    assert p.total_steps == 8 * 234 and p.warmup_steps == 234
    assert p.base_lr == 0.6 and p.peak_lr == pytest.approx(0.6)


def test_lars_32k_plan_numbers():
    p = plan_for(["optim=lars", "batch=32k"])
    assert (p.global_batch, p.micro_batch, p.accum_steps) == (32768, 256, 128)
    assert p.steps_per_epoch == 1 and p.total_steps == 8  # 8 epochs of one step
    assert p.peak_lr == pytest.approx(4.0 * math.sqrt(128))  # sqrt rule chosen by optim/lars.yaml


def test_linear_rule_and_goyal_warmup_start():
    p = plan_for(["batch=8k", "optim.lr=0.1", "warmup.start_at_ref_lr=true", "warmup.epochs=5", "epochs=90"],
                 1_281_167)
    assert p.peak_lr == pytest.approx(3.2)
    assert p.lr_schedule(0) == pytest.approx(0.1)  # Goyal: start at the small-batch LR
    assert p.lr_schedule(p.warmup_steps) == pytest.approx(3.2)
    assert p.warmup_steps == round(5 * (1_281_167 // 8192))


def test_plan_over_ranks_and_explicit_micro_batch():
    p = plan_for(["batch=4k", "micro_batch=128"], world_size=4)
    assert (p.micro_batch, p.accum_steps, p.world_size) == (128, 8, 4)
    assert p.micro_batch * p.accum_steps * p.world_size == p.global_batch


def test_auto_micro_batch_rule():
    assert auto_micro_batch(32768) == 256 and auto_micro_batch(100) == 100 and auto_micro_batch(1000) == 250


@pytest.mark.parametrize("overrides,match", [
    (["micro_batch=100"], "micro_batch=100"),
    (["warmup.epochs=15"], "warmup of 3510 steps"),
    (["batch=128k"], "larger than the training set"),
    (["optim=adamw", "scaling=adam_sde", "batch=8k"], "beta1"),
])
def test_plan_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_for(overrides)


def test_max_steps_keeps_the_schedule_shape():
    full, short = plan_for([]), plan_for(["max_steps=5"])
    assert short.run_steps == 5 and short.total_steps == full.total_steps
    assert [short.lr_schedule(t) for t in range(5)] == [full.lr_schedule(t) for t in range(5)]
