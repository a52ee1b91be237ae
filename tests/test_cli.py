"""train.py and scripts from the command line: bad input is one line, exit 2, no run dir; the preview script."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine import cli
from tests.helpers import ROOT, checks, python, sweep_in_process


def run(args, cwd=ROOT, timeout=120):
    return python(args, cwd, timeout)


BAD_INPUT = [
    (["optim=foo"], "choose one of adamw, lamb, lars, sgd"),
    (["data=imagenet", "data.root=/nowhere", "data.device_crop=batched"], "it needs data.decode=device"),
    (["model=resnet999"], "is not an option of 'model'"),
    (["optim.lr=abc"], "optim.lr='abc' is invalid"),
    (["optim.lrr=0.1"], "optim.lrr is not a setting of 'optim' as selected (did you mean optim.lr?)"),
    (["+optim.lrr=0.1"], "optim.lrr is not a keyword of torch.optim.SGD"),
    (["optim=sgd", "optim.eta=5"], "optim.eta is not a setting of 'optim'"),
    (["optim=sgd", "+optim.eta=5", "+optim.betas=[0.1,0.2]"], "is not a keyword of torch.optim.SGD"),
    (["optim=lars", "+optim.alphaa=0.9"], "optim.alphaa is not a keyword of optim.LARS"),
    (["+foo=1"], "foo is not a setting"),
    (["optim.lr=-1"], "optim.lr=-1 is invalid"),
    (["optim.lr=0"], "optim.lr=0 is invalid"),
    (["epochs=0"], "epochs=0 is invalid"),
    (["batch=12q"], "batch='12q' is not a valid global batch"),
    (["batch=0"], "batch=0 is not a valid global batch"),
    (["micro_batch=3x"], "micro_batch='3x' is invalid: input should be a valid integer or input should be 'auto'"),
    (["micro_batch=100"], "micro_batch must divide 256"),
    (["warmup.epochs=15"], "as long as the run or longer"),
    (["precision=fp64"], "input should be 'fp32', 'bf16', 'fp16' or 'auto'"),
    (["device=cuda"], "no CUDA GPU"),
    (["data.root=/nonexistent"], "holds no Fashion-MNIST"),
    (["resume=/nonexistent/last.pt"], "no such checkpoint"),
    (["--multirun", "batch=256,12q"], "[job: batch=12q]"),
    (["--multirun", "hparams_search=lr_optuna", "data=synthetic"], "an optuna search maximizes val_acc, and "
     "data.val_split=0 holds no images out"),
    (["optim=sgd,lars"], "optim=sgd,lars lists several values, which only a sweep runs: add -m"),
    (["optim.lr=(0.1"], "optim.lr=(0.1: Hydra's grammar reads this value only in quotes"),
    (["logger.group=ü"], "write \"logger.group='ü'\""),
    (["eval_only=true", "resume=multirun/x/0_batch=256,seed=1/checkpoints/last.pt"],  # a sweep job's path, pasted
     "write \"resume='multirun/x/0_batch=256,seed=1/checkpoints/last.pt'\""),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, args, message):
    if args == ["device=cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    run_dir = tmp_path / "run"
    r = checks([*args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    key = args[-1].lstrip("+").split("=")[0]
    assert f"is invalid: {key}=" not in lines[0]  # the value named once, not "batch=0 is invalid: batch=0 is ..."
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("args,message", [BAD_INPUT[0], BAD_INPUT[-1]], ids=["run", "sweep"])
def test_a_refusal_through_the_command_line_is_one_line_exit_2_and_no_folder(tmp_path, args, message):
    """The same checks through a real process: what train.py's __main__ and Hydra add around them."""
    run_dir = tmp_path / "run"
    r = run(["train.py", *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and not run_dir.exists()


def test_corrupt_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    r = checks([f"resume={bad}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr
    assert bad.read_bytes() == b"not a checkpoint"


def test_lr_schedule_preview_has_one_row_per_optimizer_step(tmp_path):
    out = tmp_path / "sched"
    import lr_schedule  # scripts/, in-process (conftest.py)
    lr_schedule.main(["optim=lars", "batch=4k", "epochs=20", "warmup.epochs=2", "--out", str(out)])
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    steps_per_epoch = 55_000 // 4096  # data.val_split holds 5,000 of 60,000 out
    assert len(rows) == 20 * steps_per_epoch
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    lrs = [float(r["lr"]) for r in rows]
    peak = 4.0 * 4  # lars.yaml: lr 4 at 256, sqrt rule: x sqrt(16)
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == 2 * steps_per_epoch
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["warmup.epochs=50", "--out", "{tmp}/x"], "as long as the run or longer"),
    (["optim=lars", "--out", ""], "--out '' names no file"),
    (["optim=lars", "--out", "{tmp}/x/.."], "names no file"),
    (["optim=sgd,lars", "--out", "{tmp}/x"], "optim=sgd,lars lists several values: compare settings with --vs"),
    (["optim.lrr=1", "--out", "{tmp}/x"], "optim.lrr is not a setting of 'optim'"),
])
def test_lr_schedule_rejects_bad_input_in_one_line(tmp_path, capsys, args, message):
    import lr_schedule  # scripts/ is on the path (conftest.py)
    with pytest.raises(SystemExit) as exit_:
        lr_schedule.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_multirun_grid_survives_a_diverging_job_and_summarizes(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    # an LR of 1e30 diverges at once (its two jobs), the others train
    r = run(["train.py", "--multirun", "batch=64,128", "optim.lr=0.1,1e30", "data=synthetic",
             "data.train_size=512", "data.test_size=128", "logger=wandb", "epochs=2", "warmup.steps=1",
             "optim.weight_decay=0", f"hydra.sweep.dir={sweep}", "max_steps=2"],
            timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 4
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert any(s["diverged"] for s in summaries) and any(not s["diverged"] for s in summaries)
    assert all(len(list((j / "wandb").glob("offline-run-*"))) == 1 for j in jobs)  # one wandb run per job
    import plot_curves  # scripts/, in-process (conftest.py puts them on the path)
    import summarize
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(sweep)])
    summarize.main()
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and not ln.startswith("| job")]
    assert len(table) == 4 and all("optim.lr=" in ln for ln in table)
    assert (sweep / "accuracy_vs_batch.png").stat().st_size > 10_000
    monkeypatch.setattr(sys, "argv", ["plot_curves.py", str(sweep), "--out", str(tmp_path / "curves")])
    plot_curves.main()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "final test_acc" in ln]) == 4  # synthetic: test split


def test_optuna_lr_search_runs_trials_reports_the_best_and_continues(tmp_path, monkeypatch):
    """The same command again continues the study in optuna.db: its trial gets a folder of its own (the plugin
    numbered each command's jobs from 0, so trial 1 landed in trial 0's folder, failed there and was stored as a
    second trial that never trained)."""
    import optuna
    sweep = tmp_path / "optuna"
    command = ["train.py", "-m", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=1", "data=synthetic",
               "data.train_size=640", "data.test_size=128", "data.val_split=128", "logger=none", "epochs=1", "warmup=none",
               f"hydra.sweep.dir={sweep}"]
    for _ in range(2):  # train.py's main in this process (a failure would raise SystemExit)
        sweep_in_process(command[2:], monkeypatch)
    results = (sweep / "optimization_results.yaml").read_text()
    assert "optim.lr" in results and "best_value" in results
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert all(s["steps"] == 2 and "error" not in s for s in summaries)
    study = optuna.load_study(study_name="lr_search", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert [t.value for t in study.trials] == [s["val_acc"] for s in summaries]  # each trial's own run
    first, second = (t.params["optim.lr"] for t in study.trials)
    assert first != second  # the sampler's seed goes on too: a continued search proposes new LRs
    import summarize  # scripts/, in-process (conftest.py)
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(sweep)])
    summarize.main()  # an LR search is plotted against the LR
    assert (sweep / "accuracy_vs_optim_lr.png").stat().st_size > 0


@pytest.mark.parametrize("overrides,expected", [
    ([["batch=256", "optim=sgd"], ["batch=4k", "optim=sgd"]], "batch"),
    ([["optim.lr=0.1", "seed=0"], ["optim.lr=0.3", "seed=1"]], "optim.lr"),
    ([["warmup=linear", "seed=0"], ["warmup=none", "seed=1"]], "warmup"),
    ([["seed=0"], ["seed=1"]], "batch"),
])
def test_summarize_plots_against_what_the_sweep_varied(overrides, expected):
    import summarize  # scripts/ is on the path (conftest.py)
    assert summarize.varied_key([{"overrides": o} for o in overrides]) == expected


@pytest.mark.parametrize("content,error", [
    (None, "no summary.json"),
    ("{broken", "summary.json unreadable (JSONDecodeError)"),
    ("[1, 2]", "summary.json is not an object"),
])
def test_summarize_reports_a_job_without_a_readable_summary(tmp_path, content, error):
    """A job whose summary.json is missing or damaged is a failed row of the table (it was a traceback)."""
    import summarize
    job = tmp_path / "0_batch=256"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- batch=256\n")
    if content is not None:
        (job / "summary.json").write_text(content)
    (row,) = summarize.load_jobs(tmp_path)
    assert row["error"] == error and summarize.ended(row) == f"failed: {error}"


@pytest.mark.parametrize("line", [
    "-m recipe=fmnist_accuracy_vs_batch optim=sgd,lars batch=128,8k seed=0,1",
    "-m optim=sgd scaling.ref_batch=512,1024 ema.enabled=true,false +x=1",
    "-m model=timm,resnet_small logger=[csv,tensorboard] warmup.epochs=null model.init_skip=[a] optim.lr='0.1',0.2",
    "-m batch_schedule=ramp,constant model.name=resnet18,resnet50",
    "-m logger=wandb logger.mode=offline,disabled optim.ref_batch=512 seed=3",
    "-m seed=1,2 data.no_such_key=1",
], ids=["recipe grid", "values, adds", "groups, lists, quotes", "group and value", "interpolated", "unknown key"])
def test_a_sweeps_jobs_compose_as_hydra_composes_each(line):
    """engine.cli.job_composer shares one composition among jobs that differ in plain values: each job's config
    equals Hydra's compose() of that job alone."""
    import shlex

    from hydra import compose, initialize_config_dir

    from engine.compose import CONF_DIR
    cmd = cli.read_command(shlex.split(line), CONF_DIR)
    jobs = cli._jobs(cmd.overrides)
    compose_job = cli.job_composer(cmd)
    def resolved(cfg):
        return cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        for job in jobs:
            try:
                hydras = resolved(compose("config", overrides=job))
            except Exception as e:  # the same error, from a composition in full
                with pytest.raises(type(e), match=re.escape(str(e))):
                    compose_job(job)
                continue
            assert resolved(compose_job(job)) == hydras, job


def test_resume_auto_finds_each_jobs_run_by_its_settings(tmp_path, monkeypatch, capsys):
    """seed=0,1 and then seed=1,2 resume=auto: seed=1 is found in its own folder, finished, and not run again, and
    only seed=2 trains; then max_steps raised continues every job in its folder. summarize lists each seed once."""
    from engine import records
    sweep = tmp_path / "sweep"
    tiny = ["data=synthetic", "data.train_size=256", "data.test_size=64", "logger=none", "batch=64", "threads=1",
            "warmup=none", f"hydra.sweep.dir={sweep}"]
    sweep_in_process([*tiny, "seed=0,1", "max_steps=1"], monkeypatch)

    def folders() -> dict[str, Path]:  # each job's folder, by its seed
        return {o: p for p in sweep.iterdir() if p.is_dir() for o in records.read_overrides(p) if o.startswith("seed=")}
    first = folders()
    seed1 = (first["seed=1"] / "metrics.jsonl").read_text()
    sweep_in_process([*tiny, "seed=1,2", "max_steps=1", "resume=auto"], monkeypatch)
    assert f"{first['seed=1']} is finished" in capsys.readouterr().out
    second = folders()
    assert sorted(second) == ["seed=0", "seed=1", "seed=2"] and second["seed=1"] == first["seed=1"]
    assert (first["seed=1"] / "metrics.jsonl").read_text() == seed1  # not run again
    sweep_in_process([*tiny, "seed=0,1,2", "max_steps=2", "resume=auto"], monkeypatch)
    assert folders() == second  # each continued in its own folder
    for folder in second.values():
        steps = [r["step"] for r in records.read_metrics(folder / "metrics.jsonl") if "loss" in r]
        assert records.read_summary(folder)["steps"] == 2 and steps == [1, 2], (folder, steps)
    import summarize
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(sweep)])
    summarize.main()
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "seed=" in ln]
    assert sorted(ln.split("|")[2].strip() for ln in rows) == ["seed=0", "seed=1", "seed=2"], rows


@pytest.mark.parametrize("grid", [["seed=0,0"], ["seed=1", "max_steps=10,20"], ["micro_batch=32,64"]])
def test_two_jobs_that_are_one_run_are_refused(tmp_path, grid):
    r = checks(["-m", "data=synthetic", "logger=none", *grid, f"hydra.sweep.dir={tmp_path / 's'}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "error: jobs 0 and 1 of this sweep are one run" in r.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize("size", [257, pytest.param(10_000, marks=pytest.mark.slow)])
def test_every_job_is_checked_before_any_starts(tmp_path, size):
    """The last of SIZE jobs is bad: refused in one line naming it, before any folder (a 256-job cap let it start)."""
    seeds = ",".join(map(str, range(size - 1)))
    r = checks(["-m", "data=synthetic", "logger=none", f"seed={seeds},-1", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "seed=-1 is invalid" in r.stderr and r.stderr.endswith(" seed=-1]\n") and not (tmp_path / "s").exists()


def test_a_forked_child_does_not_keep_the_run_folder_locked(tmp_path):
    """DataLoader workers are forked children: they shared the lock's open file, so a run killed with SIGKILL held
    its folder until its orphaned workers exited, and resume=auto straight after was refused as "in use"."""
    import fcntl
    code = ("import os, sys, time\nfrom pathlib import Path\nfrom engine.cli import lock_run_dir\n"
            "lock_run_dir(Path(sys.argv[1]))\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n"
            "os._exit(0)\n")  # the parent dies at once, as after SIGKILL; its child lives on
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, timeout=60)
    assert r.returncode == 0
    with open(tmp_path / "run" / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while a child holds it
