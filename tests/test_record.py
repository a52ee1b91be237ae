"""A run's record: one wandb run across resumes (read back from the .wandb files), .hydra/ kept as first written,
metrics.jsonl holding every step once, metrics.csv holding every row, resumable sweeps, finished runs untouched."""
import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from engine.datasets import train_size_of
from engine.metrics import ProgressBar
from engine.plan import make_plan
from engine.sweep import record_job_failure
from tests.helpers import ENV, ROOT, TINY, checks, load_cfg, python, run_train, train_command
from tests.wandb_records import runs as wandb_runs

RUN = [*TINY, "threads=1", "batch=32", "epochs=1", "logger.every_steps=1", "checkpoint.every_steps=2"]


def train(args, timeout=300):
    return python([ROOT / "train.py", *args], timeout=timeout)


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_csv_logger_keeps_every_row(tmp_path, monkeypatch, capsys):
    r = train_command([*RUN, "logger=csv", "max_steps=9", f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    jsonl = rows(tmp_path)
    table = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(table) == len(jsonl) > 9  # train rows every step, plus the evaluation row
    for a, b in zip(jsonl, table, strict=True):
        assert all(str(v) == b[k] for k, v in a.items())


def test_resume_is_one_record(tmp_path):
    """SIGTERM mid-run, then resume=auto: the same wandb run id, marked preempting and non-zero exit when
    stopped; .hydra/ as first written and .hydra/resume-1/ beside it; every step once in metrics.jsonl."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, "logger=wandb", "epochs=4",
                             f"hydra.run.dir={run_dir}"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + 15 and "checkpoint saved" in out
    first_record = (run_dir / ".hydra" / "config.yaml").read_bytes()
    stopped_at = json.loads((run_dir / "summary.json").read_text())["steps"]
    with open(run_dir / "metrics.jsonl", "a") as f:  # as if a kill -9 had logged steps past the checkpoint
        f.write(json.dumps({"step": stopped_at + 1, "loss": 123.0}) + "\n")

    r = train([*RUN, "logger=wandb", "epochs=4", "seed=0", "resume=auto", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from step {stopped_at} of 64" in r.stdout
    assert "changed since that checkpoint" not in r.stdout  # the same settings: nothing to report
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == first_record
    assert "resume=auto" in (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    train_steps = [x["step"] for x in rows(run_dir) if "loss" in x]
    assert train_steps == list(range(1, 65)) and 123.0 not in [x.get("loss") for x in rows(run_dir)]

    first, second = wandb_runs(run_dir)
    assert first["run_id"] == second["run_id"]
    assert first["preempting"] and first["exit_code"] != 0 and second["exit_code"] == 0
    assert max(first["history_steps"]) <= stopped_at < min(second["history_steps"])


def test_resume_of_a_finished_run_changes_nothing(tmp_path, monkeypatch, capsys):
    r = train_command([*RUN, "max_steps=3", f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert r.returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    r = checks([*RUN, "max_steps=3", "resume=auto", f"hydra.run.dir={tmp_path}"])  # said before Hydra starts
    assert r.returncode == 0 and "is finished (step 3 of 3); nothing to do" in r.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before
    r = train_command([*RUN, "max_steps=5", "resume=auto", f"hydra.run.dir={tmp_path}"], monkeypatch,
                      capsys)  # a longer max_steps continues
    assert r.returncode == 0 and "resuming from step 3 of 5" in r.stdout


def test_an_interrupted_sweep_resumes_in_place(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, "batch=32,64", "max_steps=4", f"hydra.sweep.dir={sweep}"]
    r = train_command(args, monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    interrupted = sweep / jobs[1]  # as if the sweep had been killed during job 1, before its first checkpoint
    for f in ("summary.json", "checkpoints/last.pt"):
        (interrupted / f).unlink()
    r = train_command([*args, "resume=auto"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == jobs  # same folders, no new ones
    assert "is finished (step 4 of 4)" in r.stdout  # job 0 skipped
    assert json.loads((interrupted / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("a,b", [
    ("seed=0", "seed=1"),
    ("logger.group=a/b", "logger.group=a_b"),
    ("logger.group=a/b", "logger.group=a%2Fb"),
    ("logger.group=a b", "logger.group=a_b"),
    ("logger.run_name=" + "x" * 300 + "1", "logger.run_name=" + "x" * 300 + "2"),
])
def test_different_jobs_get_different_folder_names(a, b):
    """Hydra's override_dirname with conf/config.yaml's settings, then safe_name: a one-to-one map."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from engine.resolvers import safe_name
    settings = load_cfg_hydra().hydra.job.config.override_dirname
    names = [safe_name(get_overrides_dirname(OverridesParser.create().parse_overrides([o]), settings.exclude_keys,
                                             settings.item_sep, settings.kv_sep)) for o in (a, b)]
    assert names[0] != names[1] and all("/" not in n and len(n) <= 200 for n in names), names


def load_cfg_hydra():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", return_hydra_config=True)


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=submitit_slurm"]])
def test_a_sweep_launched_again_into_its_folder_is_refused_before_any_job(tmp_path, launcher):
    """Without resume=auto, for every launcher: one line, exit 2, and the finished jobs' records untouched (each job
    used to refuse inside itself and write the refusal into the finished job's summary.json). An optuna search
    is the exception: its trials each get a new folder (test_cli.py's optuna test)."""
    sweep = tmp_path / "sweep"
    job = sweep / "0_batch=32"
    job.mkdir(parents=True)
    finished = json.dumps({"steps": 2, "val_acc": 0.5, "diverged": False})
    (job / "summary.json").write_text(finished)
    (sweep / "optuna.db").write_text("")
    r = train(["-m", *launcher, *RUN, "batch=32,64", "max_steps=2", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: hydra.sweep.dir={sweep} already holds the runs of a sweep ({job / 'summary.json'}): pass resume=auto "
        f"to continue its jobs, or choose another hydra.sweep.dir"], r.stderr[-2000:]
    assert (job / "summary.json").read_text() == finished
    assert sorted(p.name for p in sweep.iterdir()) == ["0_batch=32", "optuna.db"]


def test_sweep_job_folders_are_safe_for_any_value(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    r = train_command(["-m", *RUN, "max_steps=1", "model.init_skip=[a/b],[c]", f"hydra.sweep.dir={sweep}"],
                      monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([p for p in sweep.iterdir() if (p / "summary.json").exists()]) == 2


@pytest.mark.slow  # covered by test_an_interrupted_sweep_resumes_in_place (the resume) and test_slurm.py's submitit
def test_a_sweep_through_submitit_runs_and_resumes(tmp_path):  # launcher tests (its job pickling, real processes)
    """The launcher README's Slurm command uses (hydra-submitit-launcher), with submitit's local executor: the same
    launcher code and job pickling as on a cluster, jobs as separate processes."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *RUN, "batch=32,64",
            "max_steps=2", f"hydra.sweep.dir={sweep}"]
    r = train(args)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    assert [json.loads((j / "summary.json").read_text())["global_batch"] for j in jobs] == [32, 64]
    for f in ("summary.json", "checkpoints/last.pt"):  # job 1 interrupted before its first checkpoint
        (jobs[1] / f).unlink()
    finished = (jobs[0] / "summary.json").read_bytes()
    r = train([*args, "resume=auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()) == jobs
    assert (jobs[0] / "summary.json").read_bytes() == finished  # the finished job is left alone
    assert json.loads((jobs[1] / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("overrides, expected", [
    # Goyal et al.: the LR where the warmup starts, its peak, and the decay's end
    (["recipe=goyal2017_resnet50_8k"], ["lr 0.1 @ batch 256 x 32 (linear rule) = peak 3.2",
                                        "LR 0.1 at step 0 -> peak 3.2 at step 780 (linear warmup)",
                                        "-> 0.0032 at step 14039 (step decay)"]),
    # adam_sde rescales betas and eps, not only the LR
    (["optim=adamw", "scaling=adam_sde", "batch=2k"], ["betas (0.9, 0.999) -> (0.2, 0.992), eps 1e-08 -> 3.54e-09"]),
    # 32k on Fashion-MNIST drops 45 % of each epoch
    (["batch=32k"], ["22,232 of 55,000 images (40%) are left out", "0.60 passes' worth", "1 step/epoch"]),
    # a recipe whose lr is already the global LR
    (["recipe=mlperf_lars_resnet50_16k"], ["LARS: global LR 25 (no scaling)"]),
    # the first step is never at LR 0
    (["warmup=cosine"], ["LR 3.233e-05 at step 0 -> peak 0.6 at step 214 (cosine warmup)"]),
    # a changing batch: nothing is dropped (the stream runs on across epochs), and its longer lines wrap
    (["batch=8k", "batch_schedule=ramp", "batch_schedule.start=1k"], ["in exactly 62 steps"]),
    (["batch_schedule=step", "batch_schedule.start=64", "schedule=step"], ["batch steps (Smith et al.): 64 x"]),
    (["batch=4k", "batch_schedule=adaptive", "scaling=adascale"], ["adaptive batch: clamp("]),
    # what did not happen is not said: AdaScale at a constant batch, a budget max_steps cuts short
    (["batch=1k", "scaling=adascale", "micro_batch=128"], ["global batch 1,024 = micro 128", "follows AdaScale's gain"]),
    (["batch=8k", "batch_schedule=ramp", "batch_schedule.start=1k", "max_steps=3"],
     ["max_steps stops this run after 3 steps, before the budget"]),
    (["batch=8k", "batch_schedule=adaptive", "batch_schedule.start=1k", "max_steps=3"],
     ["max_steps stops this run after 3 steps, before it may"]),
])
def test_the_plan_tells_the_whole_arithmetic(overrides, expected):
    cfg = load_cfg(overrides)
    text = make_plan(cfg, train_size_of(cfg.data)).describe()
    for piece in expected:
        assert piece in text, text
    assert "lr 25 @" not in text and not re.search(r"(?<![\d,])1 steps", text)
    assert ("the batch changes" in text) == (cfg.batch_schedule.name != "constant")
    assert "in exactly" not in text or not cfg.max_steps
    assert "left out" not in text or cfg.batch_schedule.name == "constant"
    assert max(len(line) for line in text.splitlines()) <= 120  # a few short lines, not one long one


def test_progress_estimates_the_run_and_says_eta(caplog):
    caplog.set_level("INFO", logger="train")
    progress = ProgressBar(total=100, initial=40, every=50)
    for step in range(41, 51):  # the first step took 8 s (set-up), every later one 2 s
        done = step - 40
        progress.update(step, "loss 1", images_per_s=500.0, train_time=8 + 2 * (done - 1))
    out = caplog.messages
    assert out[0] == ("estimate: 2m00s of training for 60 steps at 2 s/step (timed over steps 42-44; "
                      "evaluation not included)")  # not the first step's 8 s
    assert out[1] == "step 50/100 loss 1, 500 images/s, ETA 1m40s"


def test_train_log_holds_the_runs_lines(tmp_path):
    """Hydra's train.log has every line the console showed (it was 0 bytes); a one-step run says 'step'."""
    r = train([*RUN, "max_steps=1", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0 and "(1 step," in r.stdout, r.stdout[-2000:]
    log = (tmp_path / "train.log").read_text()
    for line in r.stdout.splitlines():
        assert line in log
    assert "plan: global batch 32" in log and "final test accuracy" in log


def test_wandb_groups_a_sweep_and_names_every_run(tmp_path):
    """Read back as `wandb sync` would: a sweep is one group named by its folder, each job is named by its own
    (unique) folder, numbers are numbers (batch 32, not '32' or '1k'); a single run is named by its overrides."""
    sweep = tmp_path / "sweep"
    r = train(["-m", *RUN, "max_steps=1", "logger=wandb", "batch=32,64", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    found = [wandb_runs(job)[0] for job in jobs]
    assert [f["group"] for f in found] == [sweep.name] * 2
    assert [f["name"] for f in found] == [job.name for job in jobs] and len({f["name"] for f in found}) == 2
    assert sorted(f["config"]["batch"] for f in found) == [32, 64]

    single = tmp_path / "lars_run"
    r = train([*RUN, "max_steps=1", "logger=wandb", "optim=lars", f"hydra.run.dir={single}"])
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = wandb_runs(single)
    assert "optim=lars" in run["name"] and run["name"].endswith("(lars_run)") and run["group"] == ""
    assert run["config"]["optim"]["lr"] == 4.0 and isinstance(run["config"]["seed"], int)


def test_resume_without_a_checkpoint_never_rewrites_a_finished_record(tmp_path, monkeypatch, capsys):
    """checkpoint.enabled=false: resume=auto on a run that ended on its own changes nothing (it used to train again
    from step 0 over the finished record); one killed before it ended starts again, its metrics.jsonl once."""
    run_dir = tmp_path / "run"
    args = [*RUN, "checkpoint.enabled=false", "max_steps=4", f"hydra.run.dir={run_dir}"]
    assert train_command(args, monkeypatch, capsys).returncode == 0
    before = {f: (run_dir / f).read_bytes() for f in ("summary.json", "metrics.jsonl", "train.log")}
    r = checks([*args, "resume=auto"])  # said before Hydra starts
    assert r.returncode == 0 and "ended at step 4 and has no checkpoint to continue from; nothing to do" in r.stdout
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert not (run_dir / ".hydra" / "resume-1").exists()

    (run_dir / "summary.json").unlink()  # as if killed before the end: no summary, no checkpoint
    r = train_command([*args, "resume=auto"], monkeypatch, capsys)
    assert r.returncode == 0 and "it starts again from step 0" in r.stdout, r.stdout[-2000:]
    assert [x["step"] for x in rows(run_dir) if "loss" in x] == [1, 2, 3, 4]


def test_a_resume_says_what_it_changed(tmp_path, caplog):
    """Accepted changes (max_steps, micro_batch, an LR raised by hand) are on the record: one line at resume."""
    caplog.set_level("INFO", logger="train")
    run_train(tmp_path, [*RUN, "max_steps=2"])
    run_train(tmp_path, [*RUN, "max_steps=4", "micro_batch=16", "optim.lr=0.9", "resume=auto"])
    assert any(m.endswith("changed since that checkpoint: max_steps 2 -> 4, micro_batch None -> 16, optim.lr 0.6 "
                          "-> 0.9") for m in caplog.messages), caplog.messages


def test_tensorboard_and_a_resumed_tensorboard_run_hold_every_step_once(tmp_path, monkeypatch, capsys):
    """Read back by tensorboard's own reader: a run stopped at step 6 with its checkpoint at 4, resumed to 8, holds
    each step once, and the resumed writer asked for the purge of steps >= 5 (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    tb = [*RUN, "logger=[tensorboard,csv]", "checkpoint.keep_steps=[4]"]
    run_dir = tmp_path / "run"
    assert train_command([*tb, "max_steps=6", f"hydra.run.dir={run_dir}"], monkeypatch, capsys).returncode == 0
    r = train_command([*tb, "max_steps=8", f"resume={run_dir}/checkpoints/step-4.pt", f"hydra.run.dir={run_dir}"],
                      monkeypatch, capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    assert [e.step for e in reader.Scalars("loss")] == list(range(1, 9))
    assert [e.value for e in reader.Scalars("loss")] == pytest.approx([x["loss"] for x in rows(run_dir) if "loss" in x])
    first, resumed = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    starts = [e.step for e in EventFileLoader(str(resumed)).Load() if e.HasField("session_log")]
    assert starts == [5]


SINK = '''
import json
from engine.sinks import Sink

class JsonSink(Sink):
    def __init__(self, run_dir, *, prefix, **common):
        super().__init__(run_dir, **common)
        self.out = open(run_dir / "mine.jsonl", "a")
        self.prefix = prefix

    def log(self, step, row):
        self.out.write(json.dumps({"step": step, **{self.prefix + k: v for k, v in row.items()}}) + "\\n")

    def finish(self, exit_code):
        self.out.close()
'''


def test_one_yaml_file_and_its_class_add_a_logger(tmp_path):
    """A user's own sink: its class in a module and one YAML under conf/logger/, combined with csv by list."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "outputs", "multirun", "wheels", "__pycache__"))
    (repo / "my_sink.py").write_text(SINK)
    (repo / "conf" / "logger" / "mine.yaml").write_text("every_steps: 1\nsinks:\n  mine:\n"
                                                        "    _target_: my_sink.JsonSink\n    prefix: my/\n")
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", *RUN, "logger=[csv,mine]", "max_steps=3",
                        f"hydra.run.dir={run_dir}"], cwd=repo, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = [json.loads(x) for x in (run_dir / "mine.jsonl").read_text().splitlines()]
    assert [x["step"] for x in mine if "my/loss" in x] == [1, 2, 3]
    assert [x["my/loss"] for x in mine if "my/loss" in x] == [x["loss"] for x in rows(run_dir) if "loss" in x]
    assert (run_dir / "metrics.csv").exists()
    (repo / "conf" / "logger" / "mine.yaml").write_text("every_steps: 1\nsinks:\n  mine:\n    _target_: my_sink.Nope\n")
    r = subprocess.run([sys.executable, "train.py", *RUN, "logger=mine", f"hydra.run.dir={tmp_path / 'bad'}"],
                       cwd=repo, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    assert r.stderr.strip() == ("error: logger.sinks.mine._target_='my_sink.Nope' is not a class that can be imported "
                                "(module 'my_sink' has no attribute 'Nope'): check the module path")


@pytest.mark.parametrize("holds, refused, written", [
    ({"summary.json": '{"val_acc": 0.9, "diverged": false}'}, True, False),   # a finished job's record
    ({"metrics.jsonl": '{"step": 1}\n'}, True, False),                         # an unfinished one's
    ({}, True, True),                                                          # the job's own, new folder
    ({"summary.json": '{"steps": 3, "diverged": false}'}, False, True),        # a failure of the job that trained
])
def test_a_refused_job_never_writes_into_another_runs_record(tmp_path, holds, refused, written):
    for name, text in holds.items():
        (tmp_path / name).write_text(text)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    record_job_failure(tmp_path, "refused: batch was 256 in the checkpoint and is 32 now", refused=refused)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert (after != before) == written
    if written:
        assert json.loads(after["summary.json"])["error"].startswith("refused")
