import torch

from engine.config import ModelConfig
from engine.models import build_model
from optim import param_groups


def check_groups(model, wd):
    groups = param_groups(model, wd)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        if p.ndim <= 1:
            assert g["weight_decay"] == 0.0 and g["adapt"] is False, name
        else:
            assert g["weight_decay"] == wd and g["adapt"] is True, name
    return groups


def test_resnet_groups_by_shape():
    model = build_model(ModelConfig(name="resnet18", zero_init_residual=True), (3, 32, 32), 10)
    groups = check_groups(model, 1e-4)
    plain = {id(p) for p in groups[1]["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert id(m.weight) in plain and id(m.bias) in plain
    assert id(model.fc.bias) in plain and id(model.fc.weight) not in plain


def test_vit_groups_by_shape():
    model = build_model(ModelConfig(name="vit_tiny"), (3, 32, 32), 10)
    groups = check_groups(model, 0.05)
    plain = {id(p) for p in groups[1]["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert id(m.weight) in plain
    # positional embedding and class token are >1-D: decayed and adapted, as the shape rule says
    assert id(model.vit.class_token) not in plain


def test_frozen_parameters_are_left_out():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [model.weight]


def test_a_models_own_no_weight_decay_names_are_exempt_as_timm_does():
    """timm's ViT names pos_embed and cls_token in no_weight_decay() (3-D, so the shape rule alone decayed them):
    they join the biases and norms, with no decay and no trust ratio; everything else is decayed."""
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    exempt = model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= set(exempt)
    decayed, plain = param_groups(model, 0.05)
    expected_plain = {n for n, p in model.named_parameters() if p.ndim <= 1 or n in exempt}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == expected_plain
    assert (plain["weight_decay"], plain["adapt"], decayed["weight_decay"], decayed["adapt"]) == (0.0, False, 0.05, True)
