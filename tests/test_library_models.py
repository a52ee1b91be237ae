"""Any timm or torchvision classification model by name (model=timm|torchvision model.name=NAME): built without
pretrained weights for the data's channels, classes and image size, trained a step or two; a name or an image size
that cannot work is one line before any run dir."""
import math
import re

import pytest
import torch

from engine.compose import load_cfg
from engine.models import build_model
from tests.helpers import checks, run_train

SMALL = ["logger=none", "threads=1", "batch=16", "max_steps=2", "warmup=none", "epochs=1"]

TRAINS = [  # (model, channels, image size): 1 x 28 x 28 is Fashion-MNIST's shape (its preflight is below)
    (["model=timm", "model.name=resnet10t"], 1, 28),
    (["model=timm", "model.name=resnet10t"], 3, 32),
    (["model=torchvision", "model.name=mobilenet_v3_small"], 1, 28),
    (["model=torchvision", "model.name=mobilenet_v3_small"], 3, 32),
    (["model=timm", "model.name=vit_tiny_patch16_224"], 3, 32),  # a ViT at its own patch size
]


@pytest.mark.parametrize("model, channels, size", TRAINS, ids=[f"{m[1]}-{c}x{s}" for m, c, s in TRAINS])
def test_a_library_model_by_name_takes_the_datas_shape_and_trains(tmp_path, model, channels, size):
    overrides = ["data=synthetic", "data.train_size=64", "data.test_size=32", f"data.channels={channels}",
                 f"data.image_size={size}", *SMALL, *model]
    cfg = load_cfg(overrides)
    logits = build_model(cfg.model, (channels, size, size), 10).eval()(torch.zeros(2, channels, size, size))
    assert logits.shape == (2, 10)
    summary, _ = run_train(tmp_path, overrides)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"]) and not summary["diverged"]


@pytest.mark.parametrize("model", [m for m, c, _ in TRAINS if c == 1], ids=lambda m: m[1])
def test_a_library_model_passes_fashion_mnists_preflight(tmp_path, model):
    """The whole preflight on Fashion-MNIST (the model built for 1 x 28 x 28 on the meta device, a forward pass
    included); training on that shape is the test above."""
    assert checks(["data=fashion_mnist", *SMALL, *model, f"hydra.run.dir={tmp_path / 'run'}"]).returncode == 0


REFUSED = [  # (overrides, what the one line says)
    (["model=timm", "model.name=convnxt_tiny"], "model.name=convnxt_tiny is not a timm model: did you mean convnext_tiny"),
    (["model=torchvision", "model.name=resnet19"], "is not a torchvision model: did you mean resnet18"),
    (["model=timm", "model.name=inception_v3"], "model=timm model.name=inception_v3 cannot take 1-channel 28x28"),
    (["model=convnext_tiny"], "(it is a timm model: model=timm model.name=convnext_tiny)"),
    (["model=mobilenet_v3_large"], "model=torchvision model.name=mobilenet_v3_large"),
]


@pytest.mark.parametrize("overrides, said", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_name_or_size_that_cannot_work_is_one_line(tmp_path, overrides, said):
    r = checks(["data=synthetic", *SMALL, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("library, name", [("timm", "resnet10t"), ("torchvision", "mobilenet_v3_small")])
def test_the_weights_load_strictly_into_the_library_and_give_the_same_logits(tmp_path, library, name):
    """model.safetensors (the safetensors library) holds the unwrapped model's keys: a fresh model of the library
    loads it with strict=True and computes what the checkpoint's model computes; the EMA's and best.pt's beside."""
    from safetensors.torch import load_file
    overrides = ["data=synthetic", "data.train_size=80", "data.test_size=32", "data.val_split=16", "data.channels=3",
                 "data.image_size=32",
                 *SMALL, f"model={library}", f"model.name={name}", "ema.enabled=true", "ema.every_steps=1"]
    _, run_dir = run_train(tmp_path, overrides)
    if library == "timm":
        import timm
        fresh = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        import torchvision
        fresh = torchvision.models.get_model(name, weights=None, num_classes=10)
    fresh.load_state_dict(load_file(run_dir / "model.safetensors"), strict=True)
    ours = build_model(load_cfg(overrides).model, (3, 32, 32), 10)
    ours.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
    fresh.load_state_dict(load_file(run_dir / "model_ema.safetensors"), strict=True)
    fresh.load_state_dict(load_file(run_dir / "checkpoints" / "best.safetensors"), strict=True)


def target_model(**keys):
    from engine.config import ModelConfig
    return ModelConfig.model_validate(keys)


@pytest.mark.parametrize("keys, shape", [
    ({"_target_": "timm.models.vision_transformer.VisionTransformer", "patch_size": 7, "embed_dim": 32, "depth": 1,
      "num_heads": 2}, (1, 28, 28)),                                     # img_size, in_chans, num_classes by name
    ({"_target_": "torchvision.models.squeezenet1_1"}, (3, 64, 64)),   # num_classes through **kwargs
], ids=["timm class", "torchvision factory"])
def test_a_model_by_target_takes_the_datas_shape_and_its_files_keywords(keys, shape):
    from engine.datasets import data_shape
    from engine.models import check_model
    cfg = target_model(**keys)
    assert cfg.name == keys["_target_"].rsplit(".", 1)[-1]
    assert build_model(cfg, shape, 7).eval()(torch.zeros(2, *shape)).shape == (2, 7)
    data = load_cfg(["data=synthetic", f"data.channels={shape[0]}", f"data.image_size={shape[1]}",
                     "data.num_classes=7"]).data
    assert check_model(cfg, *data_shape(data), data.name)  # the preflight's meta-device build takes it too


@pytest.mark.parametrize("keys, said", [
    ({"_target_": "no_such_module.Net"}, "model._target_=no_such_module.Net cannot be imported"),
    ({"_target_": "torchvision.models.squeezenet1_1", "depth": 3}, "cannot take 1-channel 28x28 images"),
    ({"_target_": "torch.nn.Flatten"}, "gives 784 outputs for the 10 classes"),
], ids=["import", "keyword", "no class count"])
def test_a_model_by_target_that_cannot_work_is_one_line(keys, said):
    from engine.datasets import data_shape
    from engine.errors import ConfigError
    from engine.models import check_model
    data = load_cfg([]).data
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_model(target_model(**keys), *data_shape(data), data.name)


def test_a_registry_model_takes_no_keywords_of_its_own():
    with pytest.raises(ValueError, match="model.hidden is not a setting of model=resnet_small"):
        target_model(name="resnet_small", hidden=3)
