"""Batch schedules (ramp, step, adaptive) and AdaScale: each rule against a hand-written formula, and the promises
that survive a changing batch: accumulation = one big batch, bit-exact resume, 2 ranks = 1, one-line refusals."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from optim import AdaptiveBatch, RampBatch, StepBatch, adascale_gain, lr_multiplier
from tests.helpers import ROOT, TINY, build_plan_optimizer, checks, load_cfg, run_train

# 256 images, batches 32 -> 128: a ramp of 3 stages over 1 of 3 epochs; a BN-free ViT, so micro_batch cannot matter
SMALL = [*TINY, "data.train_size=256", "batch=128", "epochs=3", "warmup.steps=1", "data.augment=true",
         "data.crop_padding=2", "model=resnet_small"]
BASE = [*SMALL[:-1], "model=vit_tiny", "data.image_size=14", "model.patch_size=7"]  # 4 tokens: the property, cheaply
RAMP_KEYS = ["batch_schedule=ramp", "batch_schedule.start=32", "batch_schedule.epochs=1"]
RAMP = BASE + RAMP_KEYS
SGD_LR = load_cfg(TINY).optim.lr  # conf/optim/sgd.yaml's base LR, at batch 256
ADAPTIVE_KEYS = ["batch_schedule=adaptive", "batch_schedule.start=64", "batch_schedule.multiple=32",
                 "batch_schedule.probe=32", "batch_schedule.every=2"]


# --- the rules against hand-written formulas ------------------------------------------------------------------

def megatron_ramp(images, start, inc, target, ramp_images):
    """Megatron-LM's RampupBatchsizeNumMicroBatches: stages of equal samples, one per increment."""
    stages = (target - start) // inc
    if images >= ramp_images:
        return target
    return start + int(images / (ramp_images / stages)) * inc


@pytest.mark.parametrize("images", [0, 1, 999, 1000, 2999, 3000, 5999, 6000, 10 ** 6])
def test_ramp_is_megatrons(images):
    s = RampBatch(batch=1024, start=256, increment=256, ramp_images=6000)
    assert s.at(images) == megatron_ramp(images, 256, 256, 1024, 6000)


@pytest.mark.parametrize("images,batch,residual", [
    (0, 256, 1.0), (99, 256, 1.0), (100, 1280, 1.0), (200, 6400, 1.0),
    (300, 8192, 8192 / 32000), (400, 8192, 8192 / 160000)])
def test_step_multiplies_the_batch_and_the_cap_passes_the_rest_to_the_lr(images, batch, residual):
    s = StepBatch(batch=8192, start=256, factor=5, milestones=(100, 200, 300, 400))
    assert s.at(images) == batch
    assert math.isclose(s.lr_residual(images), residual)


@pytest.mark.parametrize("b_simple,current,expected", [
    (float("nan"), 512, 512), (10.0, 512, 256), (700.0, 512, 1024), (1023.9, 512, 1280), (5000.0, 512, 2048)])
def test_adaptive_rounds_down_to_the_multiple_and_clamps(b_simple, current, expected):
    s = AdaptiveBatch(batch=2048, start=256, k=1.5, every=5, multiple=256)  # 1.5 x 700 = 1050 -> 1024
    assert s.decide(b_simple, current) == expected


@pytest.mark.parametrize("grad_sq,trace,batch,expected", [
    (1.0, 0.0, 4096, 1.0),                 # all signal: a bigger batch buys nothing
    (0.0, 5.0, 4096, 16.0),                # all noise: the linear rule, S = 4096 / 256
    (1.0, 256.0, 1024, (1 + 1) / (1 / 4 + 1)),  # sigma^2 = tr / ref = 1, S = 4
    (2.0, 1024.0, 256, 1.0),               # S = 1
    (-1.0, 512.0, 512, 2.0),               # a negative |G|^2 estimate counts as 0: all noise
])
def test_adascale_gain_is_the_papers(grad_sq, trace, batch, expected):
    assert math.isclose(adascale_gain(grad_sq, trace, batch, 256), expected, rel_tol=1e-12)


def test_lr_follows_the_current_batch_under_ramp_and_not_under_step():
    from engine.plan import make_plan
    ramp = make_plan(load_cfg(RAMP + ["warmup=none", "schedule=constant"]), 512)
    rows = ramp.preview()
    assert sorted({b for _, b in rows}) == [32, 64, 96, 128]
    for lr, batch in rows:
        assert math.isclose(lr, SGD_LR * lr_multiplier("linear", batch, 256))  # optim.lr at 256, linear rule
    step = make_plan(load_cfg([*TINY, "batch=256", "epochs=6", "batch_schedule=step", "batch_schedule.start=64",
                               "batch_schedule.factor=2", "batch_schedule.milestones=[0.3,0.6]", "warmup=none",
                               "schedule=constant"]), 512)
    rows = step.preview()
    assert [b for _, b in rows][0] == 64 and rows[-1][1] == 256
    assert {lr for lr, _ in rows} == {SGD_LR * 64 / 256}  # the LR of the start batch, never rescaled
    seen = sum(b for _, b in rows)  # the budget of the constant run at 256; the last step is a whole batch
    assert step.total_images == 6 * 2 * 256 and seen - rows[-1][1] < step.total_images <= seen


@pytest.mark.parametrize("overrides,expected", [
    # a ramp is known ahead: the steps that start in the current epoch (512 images), handed to the loader at once;
    # Megatron's stages of 512/3 images: 32 below 170.7 images, 64 below 341.3, then 96 (the last straddles epochs)
    (["batch=128", "batch_schedule=ramp", "batch_schedule.start=32", "batch_schedule.epochs=1"],
     [(0, 0, 32), (1, 32, 32), (2, 64, 32), (3, 96, 32), (4, 128, 32), (5, 160, 32), (6, 192, 64), (7, 256, 64),
      (8, 320, 64), (9, 384, 96), (10, 480, 96)]),
    # adaptive and AdaScale decide from this step's gradients: one step at a time
    (["batch=128", "batch_schedule=adaptive", "batch_schedule.start=32", "batch_schedule.multiple=32",
      "batch_schedule.probe=16", "micro_batch=16"], [(0, 0, 32)]),
    (["batch=128", "scaling=adascale", "scaling.ref_batch=32", "micro_batch=32"], [(0, 0, 128)]),
])
def test_steps_known_ahead(overrides, expected):
    from engine.datasets import train_size_of
    from engine.plan import make_plan
    cfg = load_cfg([*TINY, *overrides])
    plan = make_plan(cfg, train_size_of(cfg.data))
    assert [(s.index, s.images, s.batch) for s in plan.schedule_class(plan).steps_ahead(512)] == expected


def test_batch_sizes_of_a_schedule_take_the_k_suffix():
    cfg = load_cfg([*TINY, "batch=8k", "batch_schedule=ramp", "batch_schedule.start=1k", "batch_schedule.increment=512"])
    assert (cfg.batch_schedule.start, cfg.batch_schedule.increment) == (1024, 512)


def test_preview_writes_step_lr_batch(tmp_path, capsys):
    import lr_schedule  # scripts/, in-process (conftest.py)
    out = tmp_path / "ramp"
    lr_schedule.main([*RAMP, f"--out={out}"])
    lines = (tmp_path / "ramp.csv").read_text().splitlines()
    assert lines[0] == "step,lr,batch"
    batches = [int(line.split(",")[2]) for line in lines[1:]]
    assert batches[0] == 32 and batches[-1] == 128 and batches == sorted(batches)
    assert (tmp_path / "ramp.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        lr_schedule.main([*TINY, "batch=256", "batch_schedule=adaptive", "batch_schedule.start=64",
                          "batch_schedule.multiple=64", "batch_schedule.probe=16", f"--out={out}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "cannot be previewed" in err


# --- what must survive a changing batch ---------------------------------------------------------------------------

def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_a_ramp_run_records_its_batches_and_images(tmp_path):
    summary, run_dir = run_train(tmp_path, RAMP + ["logger=csv", "logger.every_steps=1"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "batch" in r]
    assert [r["batch"] for r in train][:3] == [32, 32, 32] and train[-1]["batch"] == 128
    assert summary["images"] == sum(r["batch"] for r in train) >= 3 * 2 * 128 > summary["images"] - 128
    assert summary["steps"] == len(train) and summary["batch_schedule"] == "ramp"


@pytest.mark.parametrize("extra", [RAMP_KEYS, ADAPTIVE_KEYS], ids=["ramp", "adaptive"])
def test_accumulation_equals_one_big_batch_at_every_batch(tmp_path, extra):
    """micro_batch 16 vs 32: the same images, the same updates (adaptive: the probe is 32 images either way).
    AdaScale's gain is measured on one micro-batch, so it depends on micro_batch by design (resume keeps it)."""
    two_epochs = [x for x in BASE if not x.startswith("epochs=")] + ["epochs=2"]  # the ramp's epoch, then the top
    a, dir_a = run_train(tmp_path, two_epochs + extra + ["micro_batch=16"], "a")
    b, dir_b = run_train(tmp_path, two_epochs + extra + ["micro_batch=32"], "b")
    assert a["images"] == b["images"] and a["steps"] == b["steps"]
    wa, wb = weights(dir_a), weights(dir_b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("extra", [
    RAMP_KEYS,
    ["batch_schedule=step", "batch_schedule.start=64", "batch_schedule.factor=2", "batch_schedule.milestones=[0.25,0.5]"],
    ADAPTIVE_KEYS + ["micro_batch=16"],
    RAMP_KEYS + ["scaling=adascale", "scaling.ref_batch=32", "micro_batch=16"],
], ids=["ramp", "step", "adaptive", "ramp+adascale"])
def test_resume_mid_schedule_is_bit_exact(tmp_path, extra):
    run = SMALL + extra
    straight, straight_dir = run_train(tmp_path, run, "straight")
    stop_at = max(straight["steps"] // 2, 1)
    run_train(tmp_path, run + [f"max_steps={stop_at}"], "resumed")
    resumed, resumed_dir = run_train(tmp_path, run + ["resume=auto"], "resumed")
    assert resumed["steps"] == straight["steps"] and resumed["images"] == straight["images"]
    ws, wr = weights(straight_dir), weights(resumed_dir)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_adascale_at_the_reference_batch_is_the_reference_run(tmp_path):
    summary, run_dir = run_train(tmp_path, [*TINY, "batch=256", "epochs=4", "scaling=adascale", "warmup.steps=1",
                                            "micro_batch=32", "logger=csv", "logger.every_steps=1"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "adascale_gain" in x]
    gains = [r["adascale_gain"] for r in rows]
    # batch 256 = ref_batch 256: S = 1, the gain is 1 and the run is the reference run, step for step
    assert gains and all(g == 1.0 for g in gains)
    assert summary["steps"] == 4 * 2 and math.isclose(summary["adascale_tau"], 8.0)


def test_adascale_gain_shortens_a_large_batch_run(tmp_path):
    summary, run_dir = run_train(tmp_path, [*TINY, "batch=256", "epochs=2", "scaling=adascale", "scaling.ref_batch=32",
                                            "micro_batch=32", "warmup=none", "schedule=constant", "logger=csv",
                                            "logger.every_steps=1"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "adascale_gain" in x]
    gains = [r["adascale_gain"] for r in rows]
    assert all(1.0 <= g <= 8.0 for g in gains) and max(gains) > 1.0
    assert math.isclose(rows[-1]["adascale_tau"], sum(gains)) and sum(gains) >= 2 * 512 // 32 - 1e-9
    assert sum(gains[:-1]) < 2 * 512 // 32  # it stopped as soon as tau reached the reference length
    for r, g in zip(rows, gains, strict=True):  # lr = gain x the reference schedule (constant optim.lr at batch 32)
        assert math.isclose(r["lr"], SGD_LR * g, rel_tol=1e-9)


def test_two_ranks_ramp_in_lock_step(tmp_path):
    common = [x for x in RAMP if not x.startswith("threads")] + ["threads=1", "micro_batch=16", "max_steps=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_train(tmp_path, common, "one")  # in-process: the reference needs no launcher
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *common, f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=2e-6, msg=k)


# --- bad input: one line, before any run dir ------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["batch_schedule=ramp", "batch_schedule.start=512"], "batch_schedule.start=512 must lie in 1..batch (256)"),
    (["batch_schedule=ramp", "batch_schedule.start=64", "batch_schedule.increment=50"],
     "batch_schedule.increment=50 must be >= 1 and divide batch - start"),
    (["batch_schedule=step", "batch_schedule.start=64", "batch_schedule.factor=1"], "batch_schedule.factor=1"),
    (["batch_schedule=ramp", "batch_schedule.start=64", "micro_batch=48"], "does not split into micro_batch=48"),
    (["scaling=adascale", "optim=adamw"], "scaling=adascale is defined for momentum SGD"),
    (["scaling=adascale", "micro_batch=256"], "every per-rank batch needs 2 or more micro-batches"),
    (["batch_schedule=adaptive", "batch_schedule.start=64", "batch_schedule.multiple=64", "batch_schedule.probe=64"],
     "batch_schedule.probe=64 must be a multiple of micro_batch"),
    (["batch_schedule=adaptive", "batch_schedule.start=64", "batch_schedule.multiple=48"],
     "batch_schedule.multiple=48 must divide"),
    (["batch_schedule=step", "batch_schedule.start=64", "scaling=adascale"], "use one of them"),
    (["batch=128", "scaling=adascale", "micro_batch=32"], "scaling=adascale at batch 128, below scaling.ref_batch=256"),
    (["batch_schedule=ramp", "batch_schedule.start=64", "scaling=adascale", "micro_batch=32"],
     "scaling=adascale at batch 64, below scaling.ref_batch=256"),
])
def test_bad_batch_schedules_are_one_line(tmp_path, overrides, message):
    r = checks([*TINY, "batch=256", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_adaptive_resume_refuses_another_micro_batch(tmp_path):
    adaptive = [*TINY, "batch=256", "batch_schedule=adaptive", "batch_schedule.start=64", "batch_schedule.multiple=64",
                "batch_schedule.probe=32"]
    run_train(tmp_path, adaptive + ["micro_batch=16", "max_steps=2"])
    r = checks([*adaptive, "micro_batch=32", "resume=auto", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "micro_batch was 16 in the checkpoint and is 32 now" in r.stderr
    r = checks([*adaptive, "micro_batch=16", "batch_schedule.k=2", "resume=auto", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "batch_schedule was" in r.stderr, r.stderr


def test_adaptive_batch_follows_the_logged_noise_scale_and_plots(tmp_path, monkeypatch):
    """Every `every` steps the next batch is clamp(k x B_simple, start, batch) rounded down to `multiple`, from the
    B_simple logged at that step; the plot script draws the realised batch and LR from metrics.jsonl."""
    keys = [x for x in ADAPTIVE_KEYS if not x.startswith(("batch_schedule.start", "batch_schedule.probe"))] + [
        "batch_schedule.start=32", "batch_schedule.probe=16", "batch_schedule.k=4"]
    summary, run_dir = run_train(tmp_path, SMALL + keys + ["micro_batch=16", "logger=csv", "logger.every_steps=1",
                                                         "optim.lr=0.2", "model.blocks=[1,1,1]"])  # B_simple 20..60
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "batch" in r]
    assert train[0]["batch"] == train[1]["batch"] == 32  # before the first decision: start
    for before, after in itertools.pairwise(train):
        if before["step"] % 2 == 0:  # a decision after this step
            expected = min(max(int(4 * before["noise_scale/b_simple"] // 32) * 32, 32), 128)
            assert after["batch"] == expected, (before, after)
        else:
            assert after["batch"] == before["batch"]
    assert len({r["batch"] for r in train}) >= 3  # it did adapt (B_simple here is about 20..60)
    out = tmp_path / "adaptive"
    import plot_noise_scale  # scripts/, in-process (conftest.py)
    monkeypatch.setattr(sys, "argv", ["plot_noise_scale.py", str(run_dir), "--out", str(out)])
    plot_noise_scale.main()
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_format_2_checkpoint_is_a_constant_batch_run():
    """Checkpoints written before batch schedules (format 2) resume as constant-batch runs, and only as those."""
    from engine.checkpoint import check_resumable, migrate
    from engine.errors import ConfigError
    old = {"format": 2, "identity": {"global_batch": 256, "seed": 0, "optimizer": "torch.optim.SGD",
                                     "model": "resnet_small", "dataset": "synthetic"}}
    check_resumable(migrate(dict(old, identity=dict(old["identity"]))), load_cfg([*TINY]), "last.pt")
    with pytest.raises(ConfigError, match="batch_schedule was {'name': 'constant'} in the checkpoint"):
        check_resumable(migrate(dict(old, identity=dict(old["identity"]))), load_cfg(RAMP_KEYS[:2] + [*TINY]),
                        "last.pt")


# --- micro_batch=auto (the OOM search runs on CUDA; its logic is tested here with an injected OOM) -------------------

def test_micro_batch_auto_halves_on_out_of_memory_to_a_divisor():
    from engine.micro_batch import largest_fitting_micro_batch
    tried = []

    def fits(size):
        tried.append(size)
        if size > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    said = []
    assert largest_fitting_micro_batch(fits, 384, said.append) == 24
    assert tried == [384, 192, 96, 48, 24] and len(said) == 4 and all(384 % s == 0 for s in tried)
    assert largest_fitting_micro_batch(lambda s: None, 96, said.append) == 96  # fits at once: the whole per-rank batch


def test_micro_batch_auto_gives_up_with_one_line_at_one_image():
    from engine.errors import RunError
    from engine.micro_batch import largest_fitting_micro_batch

    def never(size):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    with pytest.raises(RunError, match="one image per micro-batch does not fit"):
        largest_fitting_micro_batch(never, 12, lambda *_: None)


@pytest.mark.parametrize("optim", ["sgd", "lars", "lamb"])
def test_a_trial_training_step_leaves_no_trace(optim):
    """The whole step is tried (the optimizer's state is most of LAMB's memory), then undone: weights, BatchNorm
    statistics, optimizer state (here after one real step) and generators as they were."""
    import copy

    from engine.micro_batch import try_training_step
    from engine.models import build_model
    from engine.plan import make_plan
    from tests.helpers import load_cfg
    cfg = load_cfg([*TINY, f"optim={optim}"])
    model = build_model(cfg.model, (1, 28, 28), 10)
    optimizer = build_plan_optimizer(make_plan(cfg, 512, 1), model)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    try_training_step(model, optimizer, (1, 28, 28), 10, torch.device("cpu"), "fp32", 8, channels_last=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert state["param_groups"] == after["param_groups"] and state["state"].keys() == after["state"].keys()
    for i in state["state"]:
        for k, v in state["state"][i].items():
            assert torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("error, caught", [
    (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (lambda: RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (lambda: ValueError("not memory"), False),
])
def test_both_kinds_of_allocation_failure_count_as_out_of_memory(error, caught):
    from engine.micro_batch import largest_fitting_micro_batch

    def fits(size):
        if size > 16:
            raise error()
    if caught:
        assert largest_fitting_micro_batch(fits, 64, lambda *_: None) == 16
    else:
        with pytest.raises(type(error())):
            largest_fitting_micro_batch(fits, 64, lambda *_: None)


def test_every_rank_takes_the_size_all_of_them_fit():
    """Rank 1 (simulated) fits only 8: the all-reduce of each try makes rank 0, which fits 32, go on down with it."""
    from engine.micro_batch import largest_fitting_micro_batch
    other_rank_fits = lambda size: size <= 8
    tried = []

    def agree(fitted):
        tried.append(tried_size[0])
        return fitted and other_rank_fits(tried_size[0])
    tried_size = [0]

    def fits(size):
        tried_size[0] = size
        if size > 32:
            raise torch.cuda.OutOfMemoryError("injected")
    assert largest_fitting_micro_batch(fits, 64, lambda *_: None, agree=agree) == 8
    assert tried == [64, 32, 16, 8]  # one agreement per size tried


@pytest.mark.parametrize("total, free, reserved, peak, fits", [
    (80, 40, 30, 60, True),      # 60 of 80 GiB at the peak, 10 held by another process: 70 <= 72
    (80, 40, 30, 63, False),     # 73 > 72: less than 10 % would be left
    (80, 80, 0, 72, True),
])
def test_the_chosen_micro_batch_leaves_a_tenth_of_the_gpu_free(monkeypatch, total, free, reserved, peak, fits):
    from engine.micro_batch import check_headroom
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free * gib, total * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peak * gib)
    if fits:
        check_headroom("cuda")
    else:
        with pytest.raises(torch.cuda.OutOfMemoryError, match="leaving less than 10% free"):
            check_headroom("cuda")


def test_micro_batch_auto_on_cpu_is_the_null_rule(tmp_path):
    summary, _ = run_train(tmp_path, [*TINY, "batch=128", "micro_batch=auto", "max_steps=1"])
    assert summary["micro_batch"] == 128 and summary["accum_steps"] == 1


AUTO_RULES = [  # (overrides, out of memory above, micro_batch, accum_steps): the search keeps the plan's rules
    (["scaling=adascale"], None, 256, 2),            # AdaScale's gain needs 2+ micro-batches: at most half the batch
    (["scaling=adascale"], 64, 64, 8),
    ([], None, 512, 1),                               # no such rule: the whole per-rank batch when it fits
    (["batch_schedule=adaptive", "batch_schedule.start=256", "batch_schedule.probe=96"], None, 32, 16),  # divides probe
]


@pytest.mark.parametrize("overrides, oom_above, micro, accum", AUTO_RULES)
def test_micro_batch_auto_keeps_the_plans_rules(monkeypatch, overrides, oom_above, micro, accum):
    """scaling=adascale micro_batch=auto searched from the whole per-rank batch: it fitted, accum was 1, no noise
    was measured and the gain stayed 1.0 without a word. The search now starts at the plan's largest allowed size,
    and the plan it returns is made again by make_plan, through the same checks."""
    from types import SimpleNamespace

    from engine import micro_batch
    from engine.distributed import DistContext
    from engine.plan import make_plan
    cfg = load_cfg(["data=synthetic", "data.train_size=2048", "logger=none", "batch=512", "micro_batch=auto",
                    "warmup=none", "epochs=2", *overrides])
    plan = make_plan(cfg, 2048, 1)

    def trial(model, optimizer, image_shape, num_classes, device, precision, size, channels_last):
        if oom_above and size > oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    monkeypatch.setattr(micro_batch, "try_training_step", trial)
    monkeypatch.setattr(micro_batch, "check_headroom", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    chosen = micro_batch.choose_micro_batch(plan, None, None, SimpleNamespace(image_shape=(1, 28, 28), num_classes=10),
                                            cfg, torch.device("cpu"), DistContext())
    assert (chosen.micro_batch, chosen.accum_steps) == (micro, accum)
