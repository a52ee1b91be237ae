"""EMA of the weights (torch's swa_utils) and best.pt: the average against a hand-written EMA, exactness across
accumulation and resume, and the record (val_acc_ema, best.pt at the best evaluation)."""
import json
from types import SimpleNamespace

import torch

from engine.ema import make_ema, update_ema
from tests.helpers import TINY, checks, run_train, train_command


def test_ema_is_torchvisions_average_with_its_batch_adjustment_and_warmup_reset():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = SimpleNamespace(ema=SimpleNamespace(enabled=True, decay=0.999, every_steps=2), epochs=10)
    plan = SimpleNamespace(global_batch=256, warmup_steps=2)
    ema = make_ema(model, cfg, plan)
    alpha = min(1.0, (1 - 0.999) * 256 * 2 / 10)  # torchvision: adjust = batch * ema_steps / epochs
    assert abs(ema.decay - (1 - alpha)) < 1e-12
    expected = None
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        update_ema(ema, model, step, cfg, plan)
        if step % 2 == 0:
            w = model.weight.detach().clone()
            expected = w if step <= plan.warmup_steps or expected is None else (1 - alpha) * expected + alpha * w
    torch.testing.assert_close(ema.module.weight, expected, rtol=1e-6, atol=1e-7)


EMA_RUN = [*TINY, "batch=64", "ema.enabled=true", "ema.every_steps=1", "ema.decay=0.99", "logger.every_steps=1"]


def test_ema_with_accumulation_equals_one_big_batch(tmp_path):
    """Without batch statistics (ViT: LayerNorm only), as tests/test_train.py does for the weights."""
    common = [*EMA_RUN, "model=vit_tiny", "data.image_size=14", "model.patch_size=7", "max_steps=3", "data.augment=true"]
    _, one = run_train(tmp_path, [*common, "micro_batch=64"], "one")
    _, acc = run_train(tmp_path, [*common, "micro_batch=16"], "acc")
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=False)["ema"]
    b = torch.load(acc / "checkpoints" / "last.pt", weights_only=False)["ema"]
    assert int(a["n_averaged"]) == int(b["n_averaged"]) == 2  # reset at each warmup step (2), then averaged
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)


def test_ema_resumes_bit_for_bit_and_is_recorded(tmp_path):
    """With a validation split: val_acc_ema at each evaluation, test_acc_ema at the end, best.pt at the best val_acc."""
    run = [*EMA_RUN, "data.val_split=128", "eval.every_steps=2"]
    whole, whole_dir = run_train(tmp_path, [*run, "max_steps=6"], "whole")
    run_train(tmp_path, [*run, "max_steps=3"], "part")
    resumed, part_dir = run_train(tmp_path, [*run, "max_steps=6", "resume=auto"], "part")
    a = torch.load(whole_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(part_dir / "checkpoints" / "last.pt", weights_only=False)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert whole["val_acc_ema"] == resumed["val_acc_ema"] is not None
    assert whole["test_acc_ema"] == resumed["test_acc_ema"] is not None
    rows = [json.loads(x) for x in (whole_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_acc" in r]
    assert all("val_acc_ema" in r for r in evals)
    best = torch.load(whole_dir / "checkpoints" / "best.pt", weights_only=False)
    best_eval = max(evals, key=lambda r: r["val_acc"])
    assert best["step"] == best_eval["step"] and best["best_val_acc"] == best_eval["val_acc"]


def test_eval_only_evaluates_a_checkpoint_with_its_own_settings(tmp_path, monkeypatch, capsys):
    summary, run_dir = run_train(tmp_path, [*EMA_RUN, "max_steps=4", "model.width=8"], "trained")
    out = tmp_path / "eval"
    # the command line's model and batch are ignored: the checkpoint's own settings rebuild the model
    r = train_command([*TINY, "eval_only=true", "batch=128", f"resume={run_dir / 'checkpoints' / 'last.pt'}",
                       f"hydra.run.dir={out}"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    evaluated = json.loads((out / "summary.json").read_text())
    assert evaluated["test_acc"] == summary["test_acc"] and evaluated["test_acc_ema"] == summary["test_acc_ema"]
    assert evaluated["steps"] == 4 and not (out / "checkpoints").exists()
    r = checks([*TINY, "eval_only=true", f"hydra.run.dir={tmp_path / 'none'}"])
    assert r.returncode == 2 and r.stderr.strip() == ("error: eval_only=true needs resume=PATH, the checkpoint to "
                                                      "evaluate (got resume=None)")
