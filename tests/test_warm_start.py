"""Warm starts (model.init=PATH, engine/warm_start.py): the weights alone of a checkpoint of ours, a .safetensors file
or a state dict; key patterns skipped (model.init_skip); what cannot fit is one line before any run dir; a resume
keeps its own weights. Reference: the source run's own last evaluation of the same weights."""
import pytest
import torch

from engine.compose import load_cfg
from engine.datasets import load_data
from engine.distributed import DistContext
from engine.loop import evaluate
from engine.models import build_model
from engine.warm_start import warm_start
from tests.helpers import TINY, checks, run_train

SOURCE = [*TINY, "data.val_split=128", "batch=64", "max_steps=3", "warmup=none", "ema.enabled=true", "ema.every_steps=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished run (3 steps, with EMA) and its weights in the three forms model.init takes."""
    summary, run_dir = run_train(tmp_path_factory.mktemp("source"), SOURCE)
    state_dict = run_dir / "state_dict.pt"  # as DDP's model would save it: module.-prefixed keys
    torch.save({f"module.{k}": v for k, v in torch.load(run_dir / "checkpoints" / "last.pt",
                                                        weights_only=False)["model"].items()}, state_dict)
    return summary, run_dir, {"checkpoint": run_dir / "checkpoints" / "last.pt",
                              "safetensors": run_dir / "model.safetensors", "state dict": state_dict}


@pytest.mark.parametrize("form", ["checkpoint", "safetensors", "state dict"])
def test_a_warm_start_begins_at_the_source_runs_validation_loss(source, form):
    summary, _, paths = source
    cfg = load_cfg([*SOURCE, f"model.init={paths[form]}", "seed=1"])  # another seed: another initialisation
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.image_shape, data.num_classes)
    found = warm_start(model, cfg.model)
    assert (len(found.skipped), len(found.kept)) == (0, 0) and len(found.loaded) == len(model.state_dict())
    result = evaluate(model, data, torch.device("cpu"), "fp32", DistContext())
    assert abs(result["loss"] - summary["val_loss"]) <= 1e-6


def test_the_ema_weights_load_with_init_ema(source):
    summary, _, paths = source
    cfg = load_cfg([*SOURCE, f"model.init={paths['checkpoint']}", "model.init_ema=true"])
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.image_shape, data.num_classes)
    warm_start(model, cfg.model)
    result = evaluate(model, data, torch.device("cpu"), "fp32", DistContext())
    assert abs(result["loss"] - summary["val_loss_ema"]) <= 1e-6


def test_a_new_class_count_trains_with_the_head_skipped(source, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    _, _, paths = source
    summary, _ = run_train(tmp_path, [*SOURCE, "data.num_classes=5", f"model.init={paths['checkpoint']}",
                                      "model.init_skip=[head.*]", "ema.enabled=false"])
    assert summary["steps"] == 3 and summary["val_loss"] == summary["val_loss"]  # trained, finite
    line = next(m for m in caplog.messages if "warm start:" in m)
    assert "tensors loaded from" in line and "2 skipped (model.init_skip), 2 left as initialised" in line


REFUSED = [  # (overrides beyond SOURCE, given the source run's paths; what the one line says)
    (lambda p: ["model.init=/nonexistent/last.pt"], "model.init=/nonexistent/last.pt is not a file"),
    (lambda p: [f"model.init={p['checkpoint']}", "data.num_classes=5"],
     "head.2.weight has shape [10, 64] there and [5, 64] in the model; model.init_skip=['head.2.weight']"),
    (lambda p: [f"model.init={p['checkpoint']}", "model=resnet_small", "model.width=8"], "has shape"),
    (lambda p: [f"model.init={p['checkpoint']}", "model=vit_tiny"], "is not in the model"),
    (lambda p: [f"model.init={p['safetensors']}", "model.init_ema=true"], "needs a checkpoint of this project"),
    (lambda p: [f"model.init={p['checkpoint'].parent.parent / 'summary.json'}"], "cannot be read"),
]


@pytest.mark.parametrize("extra, said", REFUSED, ids=["missing", "classes", "width", "other model", "ema of a file",
                                                      "not weights"])
def test_what_cannot_warm_start_is_one_line_before_any_run_dir(source, tmp_path, extra, said):
    run_dir = tmp_path / "run"
    r = checks([*SOURCE, *extra(source[2]), f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not run_dir.exists()


def test_a_run_without_ema_refuses_init_ema(tmp_path):
    _, run_dir = run_train(tmp_path, [*TINY, "batch=64", "max_steps=1", "warmup=none"], "plain")
    r = checks([*TINY, f"model.init={run_dir / 'checkpoints' / 'last.pt'}", "model.init_ema=true",
                f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "holds no EMA weights" in r.stderr


def test_a_resume_keeps_its_own_weights_and_says_so(source, tmp_path, caplog):
    """A warm-started run stopped after its first step, its init file gone: the resume passes the checks, does not
    read the file, and ends where the uninterrupted warm-started run ends."""
    caplog.set_level("INFO", logger="train")
    _, src, paths = source
    init = tmp_path / "init.pt"
    init.write_bytes(paths["checkpoint"].read_bytes())
    run = [*SOURCE, "ema.enabled=false", f"model.init={init}"]
    straight, straight_dir = run_train(tmp_path, run, "straight")
    run_train(tmp_path, [*run, "max_steps=1"], "resumed")
    init.unlink()
    assert checks([*run, "resume=auto", f"hydra.run.dir={tmp_path / 'resumed'}"]).returncode == 0
    resumed, resumed_dir = run_train(tmp_path, [*run, "resume=auto"], "resumed")
    assert any(f"model.init={init} is not loaded: a resume keeps its own weights" in m for m in caplog.messages)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"] for d in (straight_dir, resumed_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
