"""Short trainings in-process on synthetic data: outputs, accumulation, determinism, resume, divergence."""
import json

import pytest
import torch

from engine.models import build_model
from tests.helpers import TINY, load_cfg, run_train

SUMMARY_KEYS = {"val_acc", "val_loss", "train_loss", "epochs", "steps", "global_batch", "micro_batch", "accum_steps",
                "world_size", "peak_lr", "diverged", "wall_s", "images_per_s"}


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_outputs_and_their_keys(tmp_path):
    summary, run_dir = run_train(tmp_path, TINY + ["logger=csv", "batch=128", "micro_batch=64"])
    assert SUMMARY_KEYS <= set(summary)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk) and on_disk["diverged"] is False
    assert 0.0 <= on_disk["test_acc"] <= 1.0 and on_disk["val_acc"] is None  # synthetic: no validation split
    assert (on_disk["global_batch"], on_disk["micro_batch"], on_disk["accum_steps"], on_disk["steps"]) == (128, 64, 2, 8)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in r for r in rows)
    assert any("lr" in r and "loss" in r for r in rows) and any("test_acc" in r for r in rows)
    assert (run_dir / "metrics.csv").read_text().startswith("step,")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "step", "epoch", "format", "identity"} <= set(ckpt) and ckpt["step"] == 8


def test_synthetic_task_is_learnt(tmp_path):
    summary, _ = run_train(tmp_path, TINY + ["batch=64", "epochs=4", "optim.lr=0.4"])
    assert summary["test_acc"] > 0.5  # chance is 0.1


def test_wandb_offline_run_lives_in_the_run_dir(tmp_path):
    _, run_dir = run_train(tmp_path, TINY + ["logger=wandb", "max_steps=2"])
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("optim", ["sgd", "lars", "lamb"])
def test_accumulation_equals_one_big_batch(tmp_path, optim):
    """Without batch statistics (ViT: LayerNorm only) 1 x 64 and 4 x 16 give the same update, up to rounding."""
    common = TINY + ["model=vit_tiny", "data.image_size=14", "model.patch_size=7", "batch=64", "max_steps=3", f"optim={optim}", "data.augment=true",
                     "data.crop_padding=2"]
    _, one = run_train(tmp_path, common + ["micro_batch=64"], "one")
    _, acc = run_train(tmp_path, common + ["micro_batch=16"], "acc")
    a, b = weights(one), weights(acc)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)


def test_same_seed_same_result_and_another_seed_differs(tmp_path):
    _, a = run_train(tmp_path, TINY + ["max_steps=3"], "a")
    _, b = run_train(tmp_path, TINY + ["max_steps=3"], "b")
    _, c = run_train(tmp_path, TINY + ["max_steps=3", "seed=1"], "c")
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_mid_warmup_continues_bit_for_bit(tmp_path):
    """Stop at step 3 (inside a 4-step warmup, mid-epoch), resume, and end with the same weights as one run."""
    common = TINY + ["batch=64", "epochs=2", "warmup.steps=4", "data.augment=true", "logger.every_steps=1"]
    _, straight = run_train(tmp_path, common, "straight")
    run_train(tmp_path, common + ["max_steps=3"], "resumed")
    summary, resumed = run_train(tmp_path, common + ["resume=auto"], "resumed")
    assert summary["steps"] == 16
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def lr_by_step(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in rows if "lr" in r}

    # the resumed run (its log holds both parts) used the uninterrupted run's LR at every step, warmup included
    assert lr_by_step(resumed) == lr_by_step(straight) and len(lr_by_step(straight)) == 16


def test_existing_run_dir_is_not_overwritten(tmp_path):
    from engine.errors import ConfigError
    _, run_dir = run_train(tmp_path, TINY + ["max_steps=1"])
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="resume=auto"):
        run_train(tmp_path, TINY + ["max_steps=1"])
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_divergence_stops_and_is_reported(tmp_path):
    summary, run_dir = run_train(tmp_path, TINY + ["optim.lr=1e30", "warmup=none", "optim.nesterov=false"])
    assert summary["diverged"] is True
    assert json.loads((run_dir / "summary.json").read_text())["diverged"] is True
    assert summary["steps"] < 4


@pytest.mark.parametrize("extra", [["precision=bf16"], ["precision=fp16"], ["channels_last=true"],
                                   ["precision=bf16", "channels_last=true", "optim=lamb"]],
                         ids=["bf16", "fp16", "channels_last", "bf16+channels_last+lamb"])
def test_precision_and_memory_format_track_fp32(tmp_path, extra):
    """Autocast (bf16; fp16 with a GradScaler) and channels_last train to nearly the fp32 weights after 3 steps."""
    common = TINY + ["batch=32", "max_steps=3", "model.width=8", "data.image_size=16", "data.channels=3"]
    if "optim=lamb" in extra:
        common.append("optim=lamb")
    _, ref = run_train(tmp_path, common, "fp32")
    summary, run_dir = run_train(tmp_path, common + extra, "other")
    assert summary["steps"] == 3 and not summary["diverged"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert bool(ckpt["scaler"]) == ("precision=fp16" in extra)  # a disabled GradScaler saves {}
    torch.manual_seed(0)
    cfg = load_cfg(common)
    init = build_model(cfg.model, (3, 16, 16), 10).state_dict()
    a, b = weights(ref), ckpt["model"]
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    moved = sum(float((a[k] - init[k]).pow(2).sum()) for k in keys) ** 0.5
    apart = sum(float((b[k].float() - a[k]).pow(2).sum()) for k in keys) ** 0.5
    assert moved > 0.01 and apart < (1e-4 if extra == ["channels_last=true"] else 0.1) * moved, (moved, apart)


def test_compile_trains(tmp_path):
    summary, _ = run_train(tmp_path, TINY + ["batch=64", "max_steps=2", "compile=true", "model.width=8"])
    assert summary["steps"] == 2 and not summary["diverged"]


def test_wandb_failing_to_start_falls_back_to_local_logs(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary, run_dir = run_train(tmp_path, TINY + ["logger=wandb", "max_steps=2"])
    assert summary["steps"] == 2 and (run_dir / "metrics.jsonl").read_text()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # the train log's stderr lines
    assert sum(w.startswith("warning: wandb could not start") for w in warnings) == 1


def test_eval_every_steps_and_kept_checkpoints(tmp_path):
    summary, run_dir = run_train(tmp_path, TINY + ["batch=32", "max_steps=7", "eval.every_steps=3",
                                                   "checkpoint.keep_steps=[2,6]"])
    evals = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "test_acc" in json.loads(x)]
    assert evals == [3, 6, 7]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-2.pt", "step-6.pt"]
    assert torch.load(run_dir / "checkpoints" / "step-2.pt", weights_only=False)["step"] == 2


def test_val_split_holds_out_training_images_and_reports_the_test_split_at_the_end(tmp_path):
    from engine.datasets import load_data
    cfg = load_cfg([*TINY, "data.val_split=128"])
    data, full = load_data(cfg.data), load_data(load_cfg(TINY).data)
    assert data.train_size == 512 - 128 and len(data.test_y) == 128
    held = {tuple(x.flatten().tolist()) for x in data.test_x}
    assert held <= {tuple(x.flatten().tolist()) for x in full.train_x}  # validation images come from training
    assert not held & {tuple(x.flatten().tolist()) for x in data.train_x}
    assert torch.equal(load_data(cfg.data).test_y, data.test_y)  # the same held-out images every time
    summary, run_dir = run_train(tmp_path, [*TINY, "data.val_split=128", "batch=64", "max_steps=3"])
    assert {"test_acc", "test_loss", "val_acc", "val_loss"} <= set(summary)
    assert (run_dir / "checkpoints" / "best.pt").exists()
    plain, plain_dir = run_train(tmp_path, [*TINY, "max_steps=3"], "plain")  # data.val_split=0: nothing selected
    assert plain["val_acc"] is None and plain["test_acc"] is not None
    assert not (plain_dir / "checkpoints" / "best.pt").exists()
    assert not any("val_acc" in r for r in map(json.loads, (plain_dir / "metrics.jsonl").read_text().splitlines()))


def test_the_test_split_is_read_once_after_the_last_step(tmp_path, monkeypatch):
    """With a validation split, evaluations during training read the held-out images (the data whose test_split is
    kept aside), and the test split is read once, after every training step."""
    from engine.data import TensorData
    events, test_batches, one_step = [], TensorData.test_batches, TensorData.one_step_micro_batches

    def reading(self, *a, **k):
        events.append("val" if self.test_split is not None else "test")
        return test_batches(self, *a, **k)

    def training(self, *a, **k):
        events.append("step")
        return one_step(self, *a, **k)

    monkeypatch.setattr(TensorData, "test_batches", reading)
    monkeypatch.setattr(TensorData, "one_step_micro_batches", training)
    summary, _ = run_train(tmp_path, [*TINY, "data.val_split=128", "batch=64", "max_steps=4", "eval.every_steps=1"])
    assert events.count("step") == 4 and events.count("val") == 4 and events[-1] == "test"
    assert events.count("test") == 1 and summary["test_acc"] is not None


def test_top5_is_reported_beside_top1_against_a_hand_count(tmp_path):
    """val_top5 and (with data.val_split) test_top5, above 5 classes: the share of images whose label is among the
    5 largest logits, counted here by hand from the saved model on the held-out split (load_data holds it out)."""
    from engine.compose import load_cfg
    from engine.datasets import load_data
    from engine.models import build_model
    run = [*TINY, "batch=64", "max_steps=2", "data.num_classes=20", "data.val_split=128"]
    summary, run_dir = run_train(tmp_path, run)
    cfg = load_cfg(run)
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.image_shape, data.num_classes)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    model.eval()
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((data.test_x.float() / 255 - mean) / std)
    hits = sum(int(y) in row.tolist() for row, y in zip(logits.topk(5, dim=1).indices, data.test_y, strict=True))
    assert summary["val_top5"] == pytest.approx(hits / len(data.test_y), abs=1e-9)
    assert summary["test_acc"] <= summary["test_top5"] and 0 <= summary["val_top5"] <= 1
    two, _ = run_train(tmp_path, [*TINY, "batch=64", "max_steps=1", "data.num_classes=5"], name="five")
    assert "test_top5" not in two  # 5 classes or fewer: top-5 is always 1


def test_eval_hflip_averages_each_images_logits_with_its_mirrors(tmp_path):
    """data.eval_hflip: val_* and test_* of the logits averaged over each image and its mirror image, against that
    average computed here by hand from the saved model on the held-out split; the plain logits give other figures."""
    from engine.compose import load_cfg
    from engine.datasets import load_data
    run = [*TINY, "batch=64", "max_steps=3", "data.val_split=128", "data.eval_hflip=true", "data.hflip=false"]
    summary, run_dir = run_train(tmp_path, run)
    cfg = load_cfg(run)
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.image_shape, data.num_classes)
    model.load_state_dict(weights(run_dir))
    model.eval()
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.test_x.float() / 255 - mean) / std
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
    for logits, same in ((plain + mirrored) / 2, True), (plain, False):
        loss = torch.nn.functional.cross_entropy(logits, data.test_y).item()
        acc = (logits.argmax(1) == data.test_y).float().mean().item()
        assert (summary["val_loss"] == pytest.approx(loss, abs=1e-5)) is same
        if same:
            assert summary["val_acc"] == pytest.approx(acc, abs=1e-9)
