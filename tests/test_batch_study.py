"""The accuracy-vs-batch and steps/examples study's pieces: evaluation every fraction of an epoch (the same images at
every batch), B_simple measured at checkpoints against an exact per-example computation, the steps-to-target
interpolation and McCandlish's hyperbola fit against known curves, and summarize.py --targets end to end."""
import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import noise_scale  # scripts/noise_scale.py (scripts/ is on the path: conftest.py)
import pytest
import torch
import tradeoff  # scripts/tradeoff.py
import yaml

from engine.data import TensorData
from engine.transforms import normalize
from tests.helpers import TINY, run_train


def eval_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "test_acc" in r]  # synthetic data: evaluated on the test split


@pytest.mark.parametrize("batch", [32, 64, 128])
def test_eval_every_epochs_samples_every_batch_at_the_same_images(tmp_path, batch):
    """512 images, 2 epochs, every 0.25 epoch = every 128 images: evaluations land at images 128, 256, ..., 1024
    whatever the batch (at 32: every 4 steps; at 128: every step)."""
    _, run_dir = run_train(tmp_path, [*TINY, f"batch={batch}", "eval.every_epochs=0.25", "checkpoint.enabled=false"])
    assert [s * batch for s in eval_steps(run_dir)] == list(range(128, 1025, 128))


def test_eval_every_epochs_counts_the_epoch_a_fixed_batch_sees():
    """A fixed batch drops each pass's last partial batch: at batch 96 of 512 images an epoch is 5 steps (480
    images), so half an epoch is 240 images: crossed at steps 3 (288), 5 (480), 8 (768), 10 (960)."""
    from engine.compose import load_cfg
    from engine.plan import make_plan
    plan = make_plan(load_cfg([*TINY, "batch=96", "micro_batch=96"]), 512, 1)
    schedule, crossed = plan.schedule_class(plan), []
    while not schedule.finished:
        schedule.advance(schedule.next_step())
        assert not schedule.crossed(None)
        if schedule.crossed(0.5):
            crossed.append(schedule.step)
    assert plan.steps_per_epoch == 5 and crossed == [3, 5, 8, 10]


def test_noise_scale_at_fixed_weights_matches_the_exact_per_example_value():
    """Softmax regression: per-example gradients are (p_i - y_i) x_i^T (and p_i - y_i for the bias), so |G|^2 and
    tr(Sigma) over the whole training set are exact. noise_scale.measure's estimate from 256 micro-batches of 16 (no
    BN: examples independent) must land within 15 % of the exact B_simple."""
    g = torch.Generator().manual_seed(0)
    n, classes = 40_000, 10
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = (images.view(n, -1)[:, :classes].float().argmax(1) + torch.randint(0, 3, (n,), generator=g)) % classes
    data = TensorData(images, labels, images[:10], labels[:10], classes, (0.5,), (0.25,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes))
    torch.manual_seed(1)
    torch.nn.init.normal_(model[1].weight, std=0.3)

    x = normalize(images, data.mean, data.std).view(n, -1)
    with torch.no_grad():
        residual = torch.softmax(model(x.view(n, 1, 4, 4)), 1) - torch.nn.functional.one_hot(labels, classes)
    per_example = torch.cat([(residual[:, :, None] * x[:, None, :]).reshape(n, -1), residual], 1).double()
    mean = per_example.mean(0)
    exact = float((per_example - mean).pow(2).sum(1).mean() / mean.pow(2).sum())

    got = noise_scale.measure(model, data, SimpleNamespace(label_smoothing=0.0), micro_batch=16, micro_batches=256)
    assert abs(got["b_simple"] - exact) / exact < 0.15, (got, exact)
    assert all(v > 0 for v in got.values())


@pytest.mark.parametrize("micro_batches, per_step", [(8, 4), (12, 3), (16, 8)])
def test_one_steps_grad_sq_is_the_mean_inner_product_of_its_micro_batches(micro_batches, per_step):
    """Each group's |G|^2 is the unbiased estimate from its own micro-batches: the mean of <g_i, g_j> over its pairs
    i != j (a hand-written U-statistic), divided into the given tr(Sigma) and taken as a factor of B_simple."""
    g = torch.Generator().manual_seed(micro_batches)
    grads = [[torch.randn(5, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)]
             for _ in range(micro_batches)]
    flat = torch.stack([torch.cat(x) for x in grads])
    groups = [[sum(t) for t in zip(*grads[i:i + per_step], strict=True)] for i in range(0, micro_batches, per_step)]
    trace, b_simple_all = 7.0, 3.0
    got = noise_scale.one_step_ratios([float(v.pow(2).sum()) for v in flat], groups, trace, 16, b_simple_all)
    expected = []
    for i in range(0, micro_batches, per_step):
        block = flat[i:i + per_step]
        pairs = block @ block.T
        grad_sq = float((pairs.sum() - pairs.diagonal().sum()) / (per_step * (per_step - 1)))
        expected.append(trace / grad_sq / b_simple_all if grad_sq > 0 else math.inf)
    assert got == pytest.approx(expected, rel=1e-9)


def test_noise_scale_script_measures_every_kept_checkpoint(tmp_path):
    _, run_dir = run_train(tmp_path, [*TINY, "batch=64", "micro_batch=16", "logger=csv", "logger.every_steps=1",
                                      "checkpoint.keep_steps=[4,8]"])
    out = tmp_path / "noise.csv"
    noise_scale.main([str(run_dir), "--micro-batch", "16", "--micro-batches", "8", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["checkpoint"], int(r["step"])) for r in rows] == [("step-4.pt", 4), ("step-8.pt", 8), ("last.pt", 16)]
    rows_logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["noise_scale/b_simple"] for r in rows_logged if "noise_scale/b_simple" in r}
    # each checkpoint beside the figure logged from its weights' gradients: the next step's; none after the last
    assert [r["b_simple_online"] and float(r["b_simple_online"]) for r in rows] == [
        pytest.approx(logged[5]), pytest.approx(logged[9]), ""]
    for r in rows:  # B_simple is the ratio of the two parts, at the checkpoint and as the run logged it
        assert float(r["b_simple"]) == pytest.approx(float(r["trace"]) / float(r["grad_sq"]))
        if r["b_simple_online"] and float(r["grad_sq_online"]) > 0:
            assert float(r["b_simple_online"]) == pytest.approx(float(r["trace_online"]) / float(r["grad_sq_online"]))
    assert all(math.isfinite(float(r["b_simple"])) for r in rows)
    # one step of the run's batch (64 = 4 micro-batches of 16): 2 groups, each a fraction 0, 1/2 or 1 within 1.5x
    assert all(r["one_step_images"] == "64" and r["one_step_within_1_5x"] in {"0.0", "0.5", "1.0"}
               and float(r["one_step_low"]) <= float(r["one_step_high"]) for r in rows)
    measured = out.read_bytes()
    for args, message in [([str(tmp_path)], "no checkpoints"),  # before anything is measured or written
                          ([str(run_dir), "--out", str(out)], "exists"),
                          ([str(run_dir), str(tmp_path), "--out", str(tmp_path / "b.csv")], "no checkpoints"),
                          ([str(run_dir), "--step-images", "48", "--out", str(tmp_path / "b.csv")],
                           "--step-images 48")]:
        with pytest.raises(SystemExit) as bad:  # the same main, in-process: one line, nothing written
            noise_scale.main(args)
        assert isinstance(bad.value.code, str) and "\n" not in bad.value.code and message in bad.value.code
    assert out.read_bytes() == measured and not (tmp_path / "b.csv").exists()
    nested = tmp_path / "new" / "folder" / "noise.csv"  # a missing folder is made
    noise_scale.main([str(run_dir), "--micro-batch", "16", "--micro-batches", "4", "--out", str(nested)])
    assert nested.is_file()


@pytest.mark.parametrize("evals, target, expected", [
    ([(10, 0.5), (20, 0.7), (30, 0.9)], 0.8, 25.0),   # halfway between the evaluations around the crossing
    ([(10, 0.5), (20, 0.9)], 0.9, 20.0),              # reached exactly at an evaluation
    ([(10, 0.95)], 0.9, 10.0),                        # already there at the first evaluation
    ([(10, 0.5), (20, 0.85), (30, 0.6)], 0.8, 10 + 30 / 35 * 10),  # the first crossing, not a later one
    ([(10, 0.5), (20, 0.7)], 0.8, None),              # never
])
def test_steps_to_target(evals, target, expected):
    assert tradeoff.steps_to(evals, target) == (expected if expected is None else pytest.approx(expected))


def test_fit_recovers_a_known_hyperbola_and_refuses_no_trade_off():
    batches = [256, 512, 1024, 2048, 4096]
    steps = [300 + 150_000 / b for b in batches]  # S_min 300, E_min 150k: B_crit 500
    f = tradeoff.fit(batches, steps)
    assert f == pytest.approx({"s_min": 300, "e_min": 150_000, "b_crit": 500, "worst": 0}, abs=1e-9)
    # McCandlish's form: (S/S_min - 1)(E/E_min - 1) = 1 at every point
    assert all(((s / 300 - 1) * (s * b / 150_000 - 1)) == pytest.approx(1) for b, s in zip(batches, steps, strict=True))
    assert tradeoff.fit(batches, [100 * b for b in batches]) is None  # more steps at larger batch: no trade-off
    assert tradeoff.fit(batches[:2], steps[:2]) is None


def fake_job(sweep: Path, num: int, optim: str, batch: int, seed: int, steps_to_90: float):
    """A finished constant-batch job whose test accuracy rises linearly to 0.9 at ``steps_to_90`` (evaluated every
    `steps_to_90 / 4` steps) and B_simple logged as 10 x step."""
    job = sweep / f"{num}_batch={batch},optim={optim}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim={optim}", f"batch={batch}", f"seed={seed}"]))
    rows = [{"step": s, "loss": 1.0, "noise_scale/b_simple": 10.0 * s} for s in range(1, int(steps_to_90 * 2) + 1)]
    rows += [{"step": steps_to_90 * k / 4, "val_acc": 0.5 + 0.1 * k} for k in range(1, 9)]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (job / "summary.json").write_text(json.dumps({"val_acc": 0.9 + 0.001 * seed, "global_batch": batch,
                                                  "steps": int(steps_to_90 * 2), "batch_schedule": "constant",
                                                  "noise_scale_b_simple": 1000.0 + seed, "diverged": False}))


def test_summarize_targets_fits_each_line_and_marks_the_noise_scale(tmp_path, monkeypatch, capsys):
    sweep, num = tmp_path / "sweep", 0
    truth = {"sgd": (200, 102_400), "lars": (100, 409_600)}  # B_crit 512 and 4096
    for optim, (s_min, e_min) in truth.items():
        for batch in (256, 1024, 4096, 16384):
            for seed in (0, 1):
                fake_job(sweep, num, optim, batch, seed, s_min + e_min / batch)
                num += 1
    noise_csv = tmp_path / "noise.csv"
    with noise_csv.open("w", newline="") as f:  # job folder names hold commas: the csv module quotes them
        csv.writer(f).writerows([["run", "checkpoint", "step", "b_simple"],
                                 [sweep / "0_batch=256,optim=sgd", "step-512.pt", 512, 350],
                                 [sweep / "0_batch=256,optim=sgd", "last.pt", 1200, 700]])
    rc, _, err = _summarize([sweep, "--seeds-mean", "--targets", "0.9", "--noise-scale", noise_csv], monkeypatch,
                            capsys)
    assert rc == 0, err
    md = (sweep / "summary.md").read_text()
    assert ("| optim=sgd | 0.9 | 256: 600 (2/2); 1k: 300 (2/2); 4k: 225 (2/2); 16k: 206 (2/2) | "
            "200.0 | 102,400 | 512 | 0% off |") in md
    assert "| optim=lars | 0.9 | " in md and "| 100.0 | 409,600 | 4,096 |" in md
    assert "- knee of optim=sgd: batch 16k (best 0.9005" in md  # every batch's mean is 0.9005 here
    assert "B_simple online at the end, batch 256 (median): 1,000" in md
    assert "B_simple from checkpoints at the end (median): 700" in md
    # seed 0's job at 256 reached 0.9 at step 600: between its checkpoints at 512 (350) and 1200 (700), log-linearly
    assert f"| {math.exp(math.log(350) + 88 / 688 * math.log(2)):,.0f} (n=1) |" in md
    assert (sweep / "steps_examples_tradeoff.png").stat().st_size > 10_000
    assert (sweep / "accuracy_vs_batch.png").stat().st_size > 10_000
    rc, _, err = _summarize([sweep, "--targets", "90"], monkeypatch, capsys)  # the same main, in-process
    assert rc == 2 and "between 0 and 1" in err
    for content, message in [("step,b_simple\n1,2\n", "has no run column"),
                             ("run,step,b_simple\nx,ten,5\n", "line 2: step='ten'"),
                             ("\x00\xff\xfe", "is not a CSV file")]:
        noise_csv.write_bytes(content.encode("latin-1"))
        rc, _, err = _summarize([sweep, "--noise-scale", noise_csv, "--out", tmp_path / "not_made"], monkeypatch,
                                capsys)
        assert rc == 1 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "not_made").exists()


def test_noise_marks_use_the_smallest_batch_that_measured_it():
    """Batch 128 in micro-batches of 128 has no accumulation, so no online estimate: the mark comes from 256."""
    import summarize
    jobs = [{"global_batch": 128, "noise_scale_b_simple": None}, {"global_batch": 256, "noise_scale_b_simple": 900.0},
            {"global_batch": 256, "noise_scale_b_simple": 1100.0}, {"global_batch": 1024, "noise_scale_b_simple": 50.0}]
    rows = [{"checkpoint": "last.pt", "b_simple": "700"}, {"checkpoint": "step-16.pt", "b_simple": "5"}]
    assert summarize.noise_marks(jobs, rows) == {"B_simple online at the end, batch 256 (median)": 1000.0,
                                                 "B_simple from checkpoints at the end (median)": 700.0}


def test_an_undefined_logged_noise_scale_is_read_as_nan_not_a_crash(tmp_path):
    """metrics.jsonl stores a non-finite value as text ("nan": the |G|^2 estimate fell to <= 0 as the LR reached 0)."""
    rows = [{"step": 10, "noise_scale/b_simple": 500.0},  # a run before |G|^2 and tr(Sigma) were logged beside it
            {"step": 20, "noise_scale/b_simple": "nan", "noise_scale/grad_sq": -0.5, "noise_scale/trace": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    online = lambda step: noise_scale.online_at_weights_of(tmp_path, step)
    assert online(9) == {"b_simple_online": 500.0, "grad_sq_online": None, "trace_online": None}
    assert math.isnan(online(19)["b_simple_online"]) and online(19)["grad_sq_online"] == -0.5
    assert set(online(10).values()) == {None}
    assert tradeoff.logged_b_simple(tmp_path, 15) == 500.0 and tradeoff.logged_b_simple(tmp_path, 20) is None


def _fake_sweep(root: Path) -> Path:
    """Two jobs as Hydra and train.py leave them: .hydra/overrides.yaml and summary.json."""
    for num, batch in ((0, 256), (1, 512)):
        job = root / f"{num}_batch={batch}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- batch={batch}\n")
        (job / "summary.json").write_text(json.dumps({"val_acc": 0.5, "steps": 2, "global_batch": batch}))
    return root


def _summarize(args, monkeypatch, capsys) -> tuple[int, str, str]:
    import summarize  # scripts/ is on the path (conftest.py)
    monkeypatch.setattr(sys, "argv", ["summarize.py", *map(str, args)])
    code = 0
    try:
        summarize.main()
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else e.code
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def _hold_lock(job: Path):
    import fcntl
    handle = open(job / ".lock", "a")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as engine/cli.py's lock_run_dir does
    return handle


@pytest.mark.parametrize("damage,code,says", [
    ("out_is_a_file", 1, "error: --out {out} is a file: give a folder"),
    ("overrides_damaged", 0, "warning: {job}/.hydra/overrides.yaml is unreadable (ParserError): job 1_batch=512 "
                             "is listed without its overrides"),
    ("overrides_not_a_list", 0, "| 1 | (defaults) |"),
    ("running", 0, "| running |"),
    ("killed", 0, "| failed: no summary.json |"),
])
def test_summarize_reads_damaged_and_running_sweeps_in_one_line(tmp_path, monkeypatch, capsys, damage, code, says):
    """--out onto a file and a damaged overrides.yaml were tracebacks; a job still running was listed as failed."""
    sweep = _fake_sweep(tmp_path / "sweep")
    job, out = sweep / "1_batch=512", tmp_path / "out"
    args = [sweep, "--out", out]
    lock = None
    if damage == "out_is_a_file":
        out.write_text("mine")
    elif damage == "overrides_damaged":
        (job / ".hydra" / "overrides.yaml").write_text("- batch: [unclosed\n  : :\n")
    elif damage == "overrides_not_a_list":
        (job / ".hydra" / "overrides.yaml").write_text("batch: 512\n")
    else:
        (job / "summary.json").unlink()
        lock = _hold_lock(job) if damage == "running" else None
    rc, stdout, stderr = _summarize(args, monkeypatch, capsys)
    if lock is not None:
        lock.close()
    assert rc == code, stderr
    assert says.format(out=out, job=job) in stdout + stderr, stdout + stderr
    if damage == "out_is_a_file":
        assert out.read_text() == "mine" and stderr.count("\n") == 1
