"""Models: a small ResNet for 28x28 images (the default), torchvision ResNet-18/50 and ViTs, and any classification
model of timm or torchvision by name (model=timm|torchvision model.name=NAME, built without pretrained weights).

ResNets get a CIFAR-size stem (3x3 stride-1 conv, no max-pool) for images <= 64 px, and the last BatchNorm gamma
of every residual block set to 0 when ``zero_init_residual`` (Goyal et al. 2017, section 5.1).
ViTs: DeiT-Tiny/Small widths (192/384, 12 layers, 3/6 heads) with patch 4 for small images, ViT-B/16 at 224 px.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import VisionTransformer

from .errors import ConfigError


class SmallResNet(nn.Module):
    """A stride-2 stem (28x28 -> 14), then three stages of BasicBlocks: widths w, 2w, 4w at 14, 7 and 4 px.
    ``blocks`` gives each stage's block count; a 0 leaves the stage out.

    The default run's blocks (0, 1, 2) spend the convolutions at 7x7 and 4x4, where they are cheap: on 28x28 grey
    images as accurate per epoch as one block per stage, in 0.85-0.90x its time a step on a CPU (docs/benchmarks.md).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 blocks: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, (cout, count) in enumerate(zip((width, 2 * width, 4 * width), blocks, strict=True)):
            for k in range(count):
                stride = 2 if i > 0 and k == 0 else 1
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                stages.append(BasicBlock(cin, cout, stride, down))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def _zero_init_last_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def _torchvision_resnet(factory, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    model = factory(num_classes=num_classes)
    if image_size <= 64:  # CIFAR stem: keep resolution, no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


class ViT(nn.Module):
    """torchvision's VisionTransformer, with a 1x1 conv in front for grey images (it expects 3 channels)."""

    def __init__(self, in_channels, image_size, num_classes, patch_size, width, depth, heads, dropout):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} does not divide the image size {image_size}")
        self.to_rgb = nn.Conv2d(in_channels, 3, 1) if in_channels != 3 else nn.Identity()
        self.vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth,
                                     num_heads=heads, hidden_dim=width, mlp_dim=4 * width, dropout=dropout,
                                     num_classes=num_classes)

    def forward(self, x):
        return self.vit(self.to_rgb(x))


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_b16": (768, 12, 12)}


def _vit(name):
    def build(cfg_model, channels, size, num_classes):
        width, depth, heads = VIT_SIZES[name]
        patch = cfg_model.patch_size or (16 if name == "vit_b16" or size > 64 else 4)
        return ViT(channels, size, num_classes, patch, width, depth, heads, cfg_model.dropout or 0.0)
    return build


LIBRARIES = ("timm", "torchvision")  # model=timm|torchvision model.name=NAME: any classification model of either


def library_models(library: str) -> list[str]:
    """The names a library builds: timm's registry, or torchvision's classification models."""
    if library == "timm":
        import timm
        return timm.list_models()
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def check_library_name(library: str, name: str) -> None:
    names = library_models(library)
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        listed = "timm.list_models()" if library == "timm" else "torchvision.models.list_models(torchvision.models)"
        raise ConfigError(f"model.name={name} is not a {library} model" + (
            f": did you mean {', '.join(close)}?" if close else "") + f" ({listed} lists them)")


def _timm_model(cfg_model, channels: int, size: int, num_classes: int) -> nn.Module:
    """timm.create_model with pretrained=False; the image size where the model takes one (ViTs, Swin, ...)."""
    import timm
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=channels)
    try:
        return timm.create_model(cfg_model.name, img_size=size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(cfg_model.name, **kwargs)


def _torchvision_model(cfg_model, channels: int, size: int, num_classes: int) -> nn.Module:
    """torchvision.models.get_model with weights=None; its first convolution takes the data's channels."""
    import torchvision
    try:
        model = torchvision.models.get_model(cfg_model.name, weights=None, num_classes=num_classes, image_size=size)
    except TypeError as e:
        if "image_size" not in str(e):
            raise
        model = torchvision.models.get_model(cfg_model.name, weights=None, num_classes=num_classes)
    if channels != 3:
        parent, key, conv = next((m, k, c) for m in model.modules() for k, c in m.named_children()
                                 if isinstance(c, nn.Conv2d))
        setattr(parent, key, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                       conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))
    return model


# The model registry: adding a model is an entry here and a conf/model/NAME.yaml (a test keeps them equal).
MODELS = {
    "timm": _timm_model,
    "torchvision": _torchvision_model,
    "resnet_small": lambda cfg, channels, size, num_classes: SmallResNet(channels, num_classes, cfg.width,
                                                                         tuple(cfg.blocks or (1, 1, 1))),
    "resnet18": lambda cfg, channels, size, num_classes: _torchvision_resnet(resnet18, channels, size, num_classes),
    "resnet50": lambda cfg, channels, size, num_classes: _torchvision_resnet(resnet50, channels, size, num_classes),
    **{name: _vit(name) for name in VIT_SIZES},
}


# What a class by _target_ is told about the data, under the names libraries give it (torchvision's, timm's)
DATA_KEYWORDS = {"num_classes": ("num_classes",), "channels": ("in_channels", "in_chans"),
                 "size": ("image_size", "img_size")}


def target_class(target: str):
    """The class (or factory function) ``model._target_`` names, imported (Hydra's get_object, as the optimizers'
    and loggers' ``_target_`` are)."""
    from hydra.utils import get_object
    try:
        return get_object(target)
    except Exception as e:
        reason = " ".join(str(e.__cause__ or e).split())[:200]  # the import's own error, not Hydra's wrapper
        raise ConfigError(f"model._target_={target} cannot be imported ({reason}): give an import path, "
                          f"module.Class, of a module on the Python path") from None


def _target_model(cfg_model, channels: int, size: int, num_classes: int) -> nn.Module:
    """``model._target_``'s class with the file's own keywords, plus the class count, channels and image size under
    whichever of DATA_KEYWORDS' names its signature takes (the class count also through ``**kwargs``, as
    torchvision's factories take it)."""
    cls = target_class(cfg_model.target)
    params = inspect.signature(cls).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    data = {"num_classes": num_classes, "channels": channels, "size": size}
    given = {"num_classes": num_classes} if open_ended else {}
    for what, names in DATA_KEYWORDS.items():
        if (name := next((n for n in names if n in params), None)) is not None:
            given[name] = data[what]
    return cls(**given, **cfg_model.kwargs)


def build_model(cfg_model, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, size, _ = image_shape
    if cfg_model.target is not None:
        return _target_model(cfg_model, channels, size, num_classes)
    model = MODELS[cfg_model.library or cfg_model.name](cfg_model, channels, size, num_classes)
    if cfg_model.zero_init_residual:
        _zero_init_last_bn(model)
    return model


def check_model(cfg_model, shape: tuple[int, int, int], classes: int, data_name: str) -> dict[str, tuple[int, ...]]:
    """The model's own arguments against the data's shape (a ViT patch that does not divide the image), built on
    the meta device: no memory, no data read. Returns the shape of each tensor of its state_dict."""
    if cfg_model.library is not None:
        check_library_name(cfg_model.library, cfg_model.name)
    try:
        with torch.device("meta"):
            model = build_model(cfg_model, shape, classes)
            if cfg_model.library is not None or cfg_model.target is not None:  # does it take this image size?
                outputs = model.eval()(torch.empty(2, *shape)).shape[-1]
                if outputs != classes:
                    raise ConfigError(f"model._target_={cfg_model.target} gives {outputs} outputs for the "
                                      f"{classes} classes of data={data_name}: its constructor takes no "
                                      f"num_classes (give the class count as one of its keywords in the file)")
    except ConfigError:
        raise
    except Exception as e:
        what = (f"model._target_={cfg_model.target}" if cfg_model.target else
                f"model={cfg_model.library} model.name={cfg_model.name}" if cfg_model.library else f"model={cfg_model.name}")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise ConfigError(f"{what} cannot take {shape[0]}-channel {shape[1]}x{shape[2]} images from data="
                          f"{data_name} ({reason}): choose another model or data.image_size") from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
