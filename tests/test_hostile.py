"""Hostile input, class by class: every value that cannot work is one `error:` line and exit 2 before any run dir
exists; faults on disk keep what exists and leave no debris; diverged runs exit 1."""
import errno
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import preflight
from engine.errors import RunError
from tests.helpers import ROOT, TINY, checks, python, run_train

REFUSED = [  # (overrides, what the one line must say)
    (["warmup.start_factor=-1"], "warmup.start_factor=-1 is invalid: input should be greater than or equal to 0"),
    (["warmup=constant", "warmup.factor=-0.5"], "warmup.factor=-0.5 is invalid"),
    (["schedule.min_factor=2"], "schedule.min_factor=2 is invalid: input should be less than or equal to 1"),
    (["schedule=poly", "schedule.power=-1"], "schedule.power=-1 is invalid"),
    (["schedule=step", "schedule.milestone_epochs=[20]"], "must lie inside the run"),
    (["schedule=step", "schedule.milestones=[0.5,1.5]"], "schedule.milestones.1=1.5 is invalid"),
    (["schedule=step", "schedule.milestones=[0.6,0.3]"], "must be increasing"),
    (["schedule=onecycle", "schedule.pct_start=0"], "schedule.pct_start=0 is invalid"),
    (["schedule=onecycle", "schedule.pct_start=1.5"], "schedule.pct_start=1.5 is invalid"),
    (["schedule=onecycle", "schedule.pct_start=0.1", "data.train_size=8192", "batch=4k", "epochs=1.4"],
     "schedule=onecycle: pct_start=0.1 of 3 steps"),
    (["schedule=onecycle", "schedule.div_factor=0"], "schedule.div_factor=0 is invalid"),
    (["warmup=exponential", "warmup.ratio=0"], "warmup.ratio=0 is invalid"),
    (["model=vit_tiny", "model.dropout=1.5"], "model.dropout=1.5 is invalid"),
    (["model.width=0"], "model.width=0 is invalid"),
    (["data.crop_padding=-1"], "data.crop_padding=-1 is invalid"),
    (["optim=lamb", "optim.trust_bounds=[2,1]"], "LAMB: trust_bounds must be [lo, hi] with 0 <= lo <= hi"),
    (["data.num_classes=0"], "data.num_classes=0 is invalid"),
    (["seed=99999999999999999999"], "seed=99999999999999999999 is invalid"),
    (["seed=-1"], "seed=-1 is invalid"),
    (["threads=4096"], "threads=4096 is more than the"),
    (["label_smoothing=1"], "label_smoothing=1 is invalid"),
    (["optim=lars", "optim.momentum=1.5"], "optim.momentum=1.5 is invalid: momentum must lie in [0, 1)"),
    (["optim.momentum=1.5"], "optim.momentum=1.5 is invalid"),  # torch's SGD itself takes it
    (["batch=64", "batch_schedule=ramp", "batch_schedule.start=32", "batch_schedule.epochs=0"],
     "batch_schedule.epochs=0 is invalid"),
    (["batch=64", "batch_schedule=step", "batch_schedule.start=32", "batch_schedule.milestones=[]"],
     "batch_schedule.milestones=[] is invalid"),
    (["optim=adamw", "optim.betas=[0.9,1.5]"], "AdamW rejects its settings: Invalid beta parameter at index 1"),
    (["logger.every_steps=0"], "logger.every_steps=0 is invalid"),
    (["data.val_split=512"], "data.val_split=512 must be below the training set's 512 images"),
    (["data.val_split=-1"], "data.val_split=-1 is invalid"),
    # ranges of every optimizer keyword we own, and horizons no run can have
    (["epochs=1e308"], "epochs=1e+308 is"),
    (["epochs=1e15", "batch_schedule=ramp", "batch_schedule.start=32", "batch=64"], "use at most"),
    (["optim=lars", "optim.eps=inf"], "LARS: eps must be finite and >= 0, got inf"),
    (["optim=lars", "optim.eta=inf"], "LARS: eta (trust coefficient) must be finite and > 0, got inf"),
    (["optim=lars", "optim.weight_decay=inf"], "weight_decay"),
    (["optim=lamb", "optim.betas=[0.9,0.99,0.999]"], "LAMB: betas must be two values in [0, 1)"),
    (["optim=lamb", "optim.eps=inf"], "LAMB: eps must be finite and >= 0, got inf"),
    # typed and ranged the same strict way, in the run's config or an optimizer's keywords (fourth pass; the first
    # five are issue 41's, the last four beyond it)
    (["optim.nesterov=maybe"], "optim.nesterov=maybe is invalid: SGD's nesterov takes true or false"),
    (["optim=lars", "optim.trust_clip=maybe"], "optim.trust_clip=maybe is invalid: LARS's trust_clip takes true"),
    (["schedule=step", "schedule.milestones=[]"], "schedule.milestones=[] is invalid"),
    (["optim=adamw", "optim.eps=0"], "optim.eps=0 is invalid: AdamW divides by sqrt(v) + eps"),
    (["optim=lamb", "optim.eps=0"], "optim.eps=0 is invalid: LAMB divides by sqrt(v) + eps"),
    (["optim.momentum=abc"], "optim.momentum=abc is invalid: SGD's momentum takes a number"),
    (["optim=adamw", "optim.betas=[0.9,x]"], "AdamW's betas takes a list of numbers"),
    (["optim=adamw", "+optim.amsgrad=2"], "optim.amsgrad=2 is invalid: AdamW's amsgrad takes true or false"),
    (["schedule=step", "schedule.milestone_epochs=[]"], "schedule.milestone_epochs=[] is invalid"),
    (["deterministic=yes"], "deterministic='yes' is invalid: input should be a valid boolean"),  # as optim's bools
    (["data.augment=1"], "data.augment=1 is invalid: input should be a valid boolean"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_values_that_cannot_work_are_one_line(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        preflight([*TINY, *overrides, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]
    assert not run_dir.exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from engine import checkpoint
    summary, run_dir = run_train(tmp_path, [*TINY, "max_steps=2"])
    last = run_dir / "checkpoints" / "last.pt"
    good = last.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(RunError, match="the disk is full; the previous last.pt, if any, is intact"):
        run_train(tmp_path, [*TINY, "max_steps=4", "resume=auto"])
    assert last.read_bytes() == good
    assert not list(last.parent.glob(".*tmp*"))  # the partial file is gone


def test_stale_temporaries_are_cleaned_at_start(tmp_path):
    summary, run_dir = run_train(tmp_path, [*TINY, "max_steps=2"])
    stale = run_dir / "checkpoints" / ".last.pt.tmp-424242"
    stale.write_bytes(b"x" * 1000)  # what a kill -9 during a save leaves
    with pytest.raises(SystemExit):
        preflight([*TINY, "max_steps=2", "resume=auto", f"hydra.run.dir={run_dir}"])  # finished: exits 0
    assert not stale.exists()


def test_a_full_disk_at_start_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """The lock file's few bytes are written and synced in preflight: on a full disk that is one line (Hydra's
    own OSError traceback writing .hydra/ came before), and the folder this attempt made is removed."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as exit_:
        preflight([*TINY, f"hydra.run.dir={tmp_path / 'new' / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "cannot write there (the disk is full)" in err and "\n" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("key,mode", [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m"])])
def test_a_read_only_run_or_sweep_dir_is_one_line(tmp_path, key, mode):
    """Root writes anywhere, so as root (how CI runs) the run starts with every capability dropped (setpriv): uid 0
    is then held to the folder's mode like any user. A sweep dir there was Hydra's PermissionError traceback."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    r = subprocess.run([*unprivileged, sys.executable, str(ROOT / "train.py"), *mode, *TINY, f"{key}={ro / 'run'}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {key}={ro / 'run'}") and "is not writable" in r.stderr
    assert not (ro / "run").exists()


def test_a_folder_whose_lock_is_held_is_refused_by_the_lock(tmp_path):
    """Another train.py holds the folder's lock (here, this test does): the lock's own refusal, nothing written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = python([ROOT / "train.py", *TINY, f"hydra.run.dir={run_dir}"], timeout=120)
    assert r.returncode == 2 and r.stderr == (f"error: hydra.run.dir={run_dir} is in use by another running "
                                              f"train.py; wait for it, or choose another folder\n")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "threads=1", "data.train_size=1024", "epochs=2",
           f"hydra.run.dir={tmp_path}"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # started together: whichever takes the folder first runs, the other is refused
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    (rc_ok, _), (rc_refused, err) = results
    assert (rc_ok, rc_refused) == (0, 2) and len(err.strip().splitlines()) == 1
    assert "in use by another running train.py" in err or "already holds a run" in err
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's rows, not two interleaved


def test_a_diverged_single_run_exits_1_after_its_summary(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "optim.lr=1e30", "warmup=none",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "DIVERGED" in r.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True


def test_checkpointing_off_and_sigterm_says_so(tmp_path):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "threads=1", "data.train_size=4096",
                             "epochs=5", "batch=32", "checkpoint.enabled=false", "logger.every_steps=1",
                             f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "checkpoint saved" not in out and "nothing is saved to resume from" in out
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def _fashion_copy(tmp_path):
    import shutil
    root = tmp_path / "fm"
    shutil.copytree("/usr/share/datasets/fashion-mnist", root)
    return root


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(f.read_bytes()[:1000]), "cannot be read (EOFError"),
    (lambda f: f.write_bytes(b"not gzip at all"), "cannot be read (BadGzipFile"),
])
def test_corrupt_fashion_mnist_is_one_line_naming_the_file(tmp_path, capsys, damage, message):
    root = _fashion_copy(tmp_path)
    bad = root / "train-images-idx3-ubyte.gz"
    damage(bad)
    with pytest.raises(SystemExit):
        preflight([f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad} {message}") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_missing_cifar_is_one_line_before_any_run_dir(tmp_path, capsys, monkeypatch):
    """No data.root and no download (offline): refused in preflight, as a missing Fashion-MNIST is (the run dir
    used to be created first, and the download tried in training)."""
    import torchvision

    from engine import datasets_disk

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(datasets_disk, "DOWNLOAD_CACHE", tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as exit_:
        preflight(["data=cifar10", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: cifar10 not found: set data.root") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_test_images_of_another_size_are_refused(tmp_path):
    import gzip
    import struct

    from engine.errors import ConfigError
    from engine.fashion_mnist import load_fashion_mnist
    root = _fashion_copy(tmp_path)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:  # 10,000 images of 32x32 instead of 28x28
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 10_000, 32, 32) + bytes(10_000 * 32 * 32))
    with pytest.raises(ConfigError, match="must have one image size"):
        load_fashion_mnist(str(root))


def test_a_vit_patch_that_does_not_divide_the_image_is_one_line(tmp_path):
    """engine/models.py raised a ConfigError it never imported: a NameError traceback, after the run dir existed.
    The preflight builds the model on the meta device: one line, no run dir."""
    r = checks([*TINY, "model=vit_tiny", "model.patch_size=5", "max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["error: model.patch_size=5 does not divide the image size 28"]
    assert not (tmp_path / "run").exists()


def test_another_runs_checkpoint_is_refused_into_a_folder_holding_a_run(tmp_path):
    """resume=B's checkpoint with hydra.run.dir=A (a run of its own) replaced A's last.pt and summary.json and cut
    its metrics.jsonl back to B's step. Refused before anything is written; an empty folder may take the fork."""
    run = [*TINY, "batch=64", "checkpoint.every_steps=1"]
    _, a = run_train(tmp_path, [*run, "max_steps=4"], "A")
    _, b = run_train(tmp_path, [*run, "max_steps=2"], "B")
    records = [a / "summary.json", a / "metrics.jsonl", a / "checkpoints" / "last.pt"]
    before = [p.read_bytes() for p in records]
    r = checks([*run, "max_steps=3", f"resume={b}/checkpoints/last.pt", f"hydra.run.dir={a}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "continues another run" in r.stderr and str(a) in r.stderr
    assert [p.read_bytes() for p in records] == before
    summary, _ = run_train(tmp_path, [*run, "max_steps=3", f"resume={b}/checkpoints/last.pt"], "fork")
    assert summary["steps"] == 3


def test_eval_only_into_an_unfinished_run_is_refused(tmp_path):
    """An unfinished run has metrics.jsonl but no summary.json: eval_only wrote its summary.json there."""
    run_dir = tmp_path / "run"
    _, other = run_train(tmp_path, [*TINY, "max_steps=2"], "other")
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    r = checks([*TINY, "eval_only=true", f"resume={other}/checkpoints/last.pt", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and "already holds a run (metrics.jsonl)" in r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_a_torn_last_line_of_metrics_jsonl_does_not_block_a_resume(tmp_path, caplog):
    """A kill or a full disk mid-write leaves half a line: resume=auto drops it (one warning) and goes on; a damaged
    line before the last is one error naming the file and the line."""
    run = [*TINY, "batch=64", "checkpoint.every_steps=1", "logger.every_steps=1"]
    _, run_dir = run_train(tmp_path, [*run, "max_steps=2"])
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 2.')
    run_train(tmp_path, [*run, "max_steps=4", "resume=auto"])
    assert any("its last line was cut off mid-write" in m for m in caplog.messages)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(RunError, match=rf"^{re.escape(str(metrics))}: line 2 is not JSON; repair or delete"):
        run_train(tmp_path, [*run, "max_steps=6", "resume=auto"])


def test_with_a_validation_split_the_progress_line_says_val(tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    run_train(tmp_path, [*TINY, "batch=64", "data.val_split=128", "max_steps=2"])
    lines = [m for m in caplog.messages if m.startswith("epoch ")]
    assert lines and all(" val acc " in m and " test acc " not in m for m in lines)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    summary, _ = run_train(tmp_path_factory.mktemp("whole"), [*TINY, "batch=64", "data.val_split=128", "max_steps=2"])
    return summary


@pytest.mark.parametrize("signame, evaluation", [("SIGTERM", 1), ("SIGTERM", 2), ("SIGHUP", 2), ("SIGUSR2", 1)],
                         ids=["SIGTERM-last step's validation", "SIGTERM-test split", "SIGHUP-test split",
                              "SIGUSR2-last step's validation"])
def test_a_signal_during_the_final_evaluation_stops_it_and_a_resume_finishes_it(tmp_path, monkeypatch, uninterrupted,
                                                                               signame, evaluation):
    """A SIGTERM during a long final evaluation (7.5 min for a ViT on 20,000 images) was held for the whole of it,
    and Slurm kills a job 30 s after its SIGTERM. The evaluation now stops at its next batch: the last step's
    checkpoint and a summary saying so are written, exit 128+N, and resume=auto evaluates again to the numbers the
    uninterrupted run has."""
    import signal

    from engine.data import TensorData
    test_batches, calls = TensorData.test_batches, [0]

    def signalled(self, *a, **k):
        calls[0] += 1
        if calls[0] == evaluation:
            os.kill(os.getpid(), getattr(signal, signame))
        yield from test_batches(self, *a, **k)

    monkeypatch.setattr(TensorData, "test_batches", signalled)
    run = [*TINY, "batch=64", "data.val_split=128", "max_steps=2"]
    with pytest.raises(SystemExit) as exit_:
        run_train(tmp_path, run)
    assert exit_.value.code == 128 + getattr(signal, signame)
    stopped = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stopped["stopped_by"] == signame and stopped.get("test_acc") is None
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(TensorData, "test_batches", test_batches)
    again, _ = run_train(tmp_path, [*run, "resume=auto"])
    assert {k: again[k] for k in ("steps", "val_acc", "test_acc")} == {
        k: uninterrupted[k] for k in ("steps", "val_acc", "test_acc")}


@pytest.mark.parametrize("damage", ["deleted", "stopped", "torn"])
def test_a_finished_run_without_its_result_is_evaluated_again_on_resume(tmp_path, damage):
    """Killed after its last checkpoint but before summary.json was written (or stopped at the last step, or the
    file left torn): resume=auto said "finished, nothing to do" and the result was lost for good. The resume now
    evaluates the last checkpoint again and writes the same numbers."""
    run = [*TINY, "batch=64", "data.val_split=128", "max_steps=2"]
    first, run_dir = run_train(tmp_path, run)
    path = run_dir / "summary.json"
    if damage == "deleted":
        path.unlink()
    elif damage == "stopped":
        path.write_text(json.dumps({**first, "stopped_by": "SIGTERM", "test_acc": None}))
    else:
        path.write_text(path.read_text()[:20])
    assert checks([*run, "resume=auto", f"hydra.run.dir={run_dir}"]).returncode == 0
    again, _ = run_train(tmp_path, [*run, "resume=auto"])
    assert {k: again[k] for k in ("steps", "val_acc", "test_acc")} == {k: first[k] for k in ("steps", "val_acc",
                                                                                          "test_acc")}
    assert json.loads(path.read_text())["test_acc"] == first["test_acc"]


@pytest.mark.parametrize("record", ["metrics.jsonl", "summary.json", "checkpoints/last.pt"])
def test_a_record_path_that_is_a_folder_is_one_line(tmp_path, record):
    """metrics.jsonl replaced by a folder (any of a run's record files) gave an IsADirectoryError traceback."""
    run_dir = tmp_path / "run"
    (run_dir / record).mkdir(parents=True)
    for resume in ("resume=auto", "resume=null"):
        r = checks([*TINY, resume, f"hydra.run.dir={run_dir}"])
        assert r.returncode == 2 and r.stderr == f"error: {run_dir / record} is not a file: the run's record is " \
            f"written there; move it away, or choose another hydra.run.dir\n", r.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while torch was still loading printed a KeyboardInterrupt traceback."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted (SIGINT) outside the training steps: what the run dir holds is kept; resume=auto continues "
        "from its last checkpoint, if it has one"], err


def _handed_on(args) -> list[str]:
    r = checks(args)
    assert r.returncode == 0, r.stderr
    return r.args


@pytest.mark.parametrize("given,folder", [
    ("hydra.run.dir={tmp}/x/run_${{now:%Y}}", "{tmp}/x/run_{year}"),
    ("hydra.run.dir='{tmp}/q dir/run'", "{tmp}/q dir/run"),
    ("hydra.run.dir='{tmp}/ü/run'", "{tmp}/ü/run"),
    ("hydra.run.dir='{tmp}/a=1,b=2/run'", "{tmp}/a=1,b=2/run"),
    ("hydra.run.dir={tmp}/plain/run", "{tmp}/plain/run"),
    ("hydra.run.dir={tmp}/${{hydra.job.name}}/run", "{tmp}/train/run"),  # Hydra's own keys
    ("hydra.run.dir={tmp}/${{oc.env:LB_TEST_FOLDER}}/run", "{tmp}/from_env/run"),  # OmegaConf's resolvers
])
def test_the_preflight_locks_the_folder_hydra_will_use_and_hands_it_on(tmp_path, monkeypatch, given, folder):
    """The preflight read hydra.run.dir as a raw string: ${now:...} locked a literal 'run_${now:%Y}' folder, and a
    quoted path made a folder named with its quotes. It now resolves the folder once, locks it, and hands Hydra the
    resolved path, quoted so that Hydra's grammar reads it back unchanged."""
    import datetime

    from hydra.core.override_parser.overrides_parser import OverridesParser
    monkeypatch.setenv("LB_TEST_FOLDER", "from_env")
    expected = folder.format(tmp=tmp_path, year=datetime.datetime.now().year)
    argv = _handed_on([*TINY, given.format(tmp=tmp_path)])
    run_dirs = [a for a in argv if a.startswith("hydra.run.dir=")]
    assert len(run_dirs) == 1 and OverridesParser.create().parse_overrides(run_dirs)[0].value() == expected
    assert (Path(expected) / ".lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(expected).relative_to(tmp_path).parts[0]]


def test_hydra_s_own_options_pass_the_preflight(tmp_path):
    """-cn config and --config-dir D optim=mine run under Hydra, and were refused by the preflight."""
    mine = tmp_path / "conf" / "optim"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text((ROOT / "conf" / "optim" / "sgd.yaml").read_text().replace("momentum: 0.9",
                                                                                                "momentum: 0.8"))
    _handed_on(["-cn", "config", *TINY, f"hydra.run.dir={tmp_path / 'a'}"])
    argv = _handed_on(["--config-dir", tmp_path / "conf", "optim=mine", *TINY, f"hydra.run.dir={tmp_path / 'b'}"])
    assert "optim=mine" in argv and str(tmp_path / "conf") in argv
    r = checks(["--config-dir", tmp_path / "conf", "optim=yours", *TINY, f"hydra.run.dir={tmp_path / 'c'}"])
    assert r.returncode == 2 and "choose one of adamw, lamb, lars, mine, sgd" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["resume=auto"], "resume=auto without hydra.run.dir: the folder is a new one, named by the time, so this starts "
                      "from step 0 (to continue a run, give its hydra.run.dir)"),
    (["-m", "seed=0,1", "resume=auto"], "resume=auto without hydra.sweep.dir: the folder is a new one"),
])
def test_resume_auto_without_a_folder_says_it_starts_anew(tmp_path, monkeypatch, args, message):
    """Without hydra.run.dir the folder is named by the time: resume=auto silently started a new run there. SPEC's
    resume=auto is "this run dir's last.pt if present", so it runs, and says so first."""
    monkeypatch.chdir(tmp_path)
    r = checks([*args[:-1], *TINY, args[-1]])  # Hydra's parser takes -m before the overrides
    assert r.returncode == 0 and message in r.stdout and not r.stderr, r.stdout + r.stderr


def test_with_hydra_job_chdir_relative_paths_mean_the_launch_folder(tmp_path, monkeypatch):
    """With hydra.job.chdir=true the job runs inside its folder: a relative resume= was checked from the launch
    folder by the preflight, then read from the run dir by the job. It is now made absolute before Hydra starts."""
    _, first = run_train(tmp_path, [*TINY, "max_steps=2", "checkpoint.every_steps=1"], "first")
    monkeypatch.chdir(tmp_path)
    argv = _handed_on([*TINY, "max_steps=3", "hydra.job.chdir=true", "resume=first/checkpoints/last.pt",
                       f"hydra.run.dir={tmp_path / 'fork'}"])
    assert f"resume={first / 'checkpoints' / 'last.pt'}" in argv


def _idx_set(root: Path, train: int, test: int) -> Path:
    """A Fashion-MNIST folder in the IDX format (magic 0x0803/0x0801, big-endian sizes, then the bytes)."""
    import struct
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("t10k", test)):
        for kind, shape, high in (("images-idx3", (n, 28, 28), 256), ("labels-idx1", (n,), 10)):
            values = torch.randint(0, high, shape, generator=g, dtype=torch.uint8)
            header = bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
            (root / f"{split}-{kind}-ubyte").write_bytes(header + values.numpy().tobytes())
    return root


@pytest.mark.parametrize("overrides,message", [
    ([], "data.val_split=5000 must be below the training set's 100 images (a smaller count, or 0 to evaluate"),
    (["data.val_split=0", "batch=256"], "batch=256 is larger than the training set (100 images)"),
    (["data.val_split=20", "batch=32", "epochs=1", "warmup.epochs=1"], "is as long as the run or longer"),
    (["data.val_split=100"], "data.val_split=100 must be below the training set's 100 images"),
])
def test_a_small_idx_set_is_planned_for_its_own_size(tmp_path, overrides, message):
    """The preflight planned a data.root IDX set of 100 images as 60,000: refused only after the run dir existed."""
    root = _idx_set(tmp_path / "fm", train=100, test=50)
    r = checks([f"data.root={root}", "logger=none", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# --- fourth pass: a run's work is never lost or overwritten ---------------------------------------------------------

def test_a_diverging_run_keeps_its_last_finite_checkpoint(tmp_path):
    """LR 1e4: BatchNorm's running variance overflows in a forward pass before the loss does; nothing non-finite is
    saved, so last.pt and best.pt hold the last finite state, which a resume with a smaller LR starts from."""
    summary, run_dir = run_train(tmp_path, ["data=synthetic", "batch=64", "threads=1", "logger=none",
                                            "data.train_size=640", "data.test_size=128", "data.val_split=128",
                                            "max_steps=30", "optim.lr=1e4", "checkpoint.every_steps=1",
                                            "eval.every_steps=1"])
    assert summary["diverged"]
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=False)
        assert ckpt["step"] < summary["steps"]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
    resumed, _ = run_train(tmp_path, ["data=synthetic", "batch=64", "threads=1", "logger=none",
                                      "data.train_size=640", "data.test_size=128", "data.val_split=128",
                                      "max_steps=30", "optim.lr=0.01",
                                      "checkpoint.every_steps=1", f"resume={run_dir / 'checkpoints' / 'last.pt'}"],
                           name="retry")
    assert not resumed["diverged"] and resumed["steps"] == 30


def _unfinished_run(run_dir: Path) -> None:
    """Two steps with a checkpoint after each, its summary.json removed: a run killed before its end."""
    run_train(run_dir.parent, [*SMALL, "max_steps=2", "checkpoint.every_steps=1"], name=run_dir.name)
    (run_dir / "summary.json").unlink()


SMALL = ["data=synthetic", "precision=fp32", "batch=64", "threads=1", "logger=none", "data.train_size=512", "data.test_size=128"]
UNREADABLE = [  # (how checkpoints/ is damaged, what the one line says); the first three are issue 41's
    ("last.pt a link to itself", "which is not a file"),
    ("checkpoints a dangling link", "which is not a folder"),
    ("checkpoints a plain file", "checkpoints is not a folder"),
    ("last.pt a dangling link", "which is not a file"),
    ("checkpoints a link to a file", "which is not a folder"),
    ("checkpoints a link to itself", "which is not a folder"),
    ("last.pt empty", "not a readable checkpoint"),
]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unfinished") / "run"
    _unfinished_run(run_dir)
    return run_dir


@pytest.mark.parametrize("damage, said", UNREADABLE, ids=[d for d, _ in UNREADABLE])
def test_resume_auto_refuses_a_run_whose_checkpoint_cannot_be_read(tmp_path, unfinished, damage, said):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir, symlinks=True)
    ckpts, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.pt"
    if damage.startswith("last.pt"):
        last.unlink()
        {"last.pt a link to itself": lambda: last.symlink_to(last), "last.pt a dangling link":
         lambda: last.symlink_to(tmp_path / "gone.pt"), "last.pt empty": lambda: last.write_bytes(b"")}[damage]()
    else:
        shutil.rmtree(ckpts)
        (tmp_path / "a_file").write_text("x")
        {"checkpoints a dangling link": lambda: ckpts.symlink_to(tmp_path / "purged"),
         "checkpoints a plain file": lambda: ckpts.write_text("x"),
         "checkpoints a link to a file": lambda: ckpts.symlink_to(tmp_path / "a_file"),
         "checkpoints a link to itself": lambda: ckpts.symlink_to(ckpts)}[damage]()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    r = checks([*SMALL, "max_steps=2", "resume=auto", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # left as it was


def test_a_new_run_refuses_a_folder_holding_a_file_named_checkpoints(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    r = checks([*SMALL, "max_steps=2", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "checkpoints is not a folder" in r.stderr, r.stderr


DATA_CHANGES = [  # a resume of an unfinished run that would train or evaluate other images; the first two: issue 41
    (["data.val_split=128"], "data.val_split was 0 in the checkpoint and is 128 now"),
    (["data.train_size=1024"], "data.train_size was 512 in the checkpoint and is 1024 now"),
    (["data.test_size=256"], "data.test_size was 128 in the checkpoint and is 256 now"),
    (["data.image_size=32"], "data.image_size was"),
    (["data.channels=3"], "data.channels was"),
]


@pytest.mark.parametrize("change, said", DATA_CHANGES, ids=[c[0] for c, _ in DATA_CHANGES])
def test_a_resume_on_other_images_is_refused(tmp_path, unfinished, change, said):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir)
    r = checks([*SMALL, "max_steps=4", "resume=auto", *change, f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and said in r.stderr, r.stderr


EVAL_OTHER = [  # eval_only of a resnet_small checkpoint with settings it would not use; the first: issue 41's
    (["model=vit_tiny"], "model.name=resnet_small in"),
    (["model.width=32"], "model.width="),
    (["data.test_size=64"], "data.test_size=128 in"),
    (["data.num_classes=5"], "data.num_classes=10 in"),
]


@pytest.mark.parametrize("change, said", EVAL_OTHER, ids=[c[0] for c, _ in EVAL_OTHER])
def test_eval_only_refuses_model_or_data_settings_it_would_not_use(tmp_path, unfinished, change, said):
    r = checks([*SMALL, "eval_only=true", f"resume={unfinished}/checkpoints/last.pt", *change,
                f"hydra.run.dir={tmp_path / 'eval'}"])
    assert r.returncode == 2 and said in r.stderr and "would be recorded but not used" in r.stderr, r.stderr
    same = checks([*SMALL, "eval_only=true", f"resume={unfinished}/checkpoints/last.pt", "model=resnet_small",
                   f"hydra.run.dir={tmp_path / 'eval2'}"])
    assert same.returncode == 0, same.stderr  # the checkpoint's own settings


@pytest.mark.parametrize("extra", [[], ["resume=auto"], ["seed=0,1"]])
def test_a_sweep_into_a_single_runs_folder_is_refused(tmp_path, unfinished, extra):
    """Issue 41's case (hydra.sweep.dir=RUN) and two more: resumed, and a grid."""
    r = checks(["-m", *SMALL, "max_steps=2", *extra, f"hydra.sweep.dir={unfinished}"])
    assert r.returncode == 2 and "holds a single run (checkpoints/last.pt)" in r.stderr, r.stderr


@pytest.mark.parametrize("signame", ["SIGHUP", "SIGUSR2"])  # SIGTERM, SIGINT: test_cluster_env.py, test_resume.py
def test_a_signal_between_steps_saves_and_exits_128_plus_n(tmp_path, monkeypatch, signame):
    """SIGHUP (a closed terminal or ssh) killed the run and lost its work since the last checkpoint; now it is
    handled as SIGTERM is: a checkpoint at the step, the summary, exit 128+N."""
    import signal

    from engine import loop
    train_step, calls = loop.train_step, [0]

    def signalled(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), getattr(signal, signame))
        return train_step(*a, **k)
    monkeypatch.setattr(loop, "train_step", signalled)
    with pytest.raises(SystemExit) as exit_:
        run_train(tmp_path, [*SMALL, "max_steps=6"])
    assert exit_.value.code == 128 + getattr(signal, signame)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert summary["stopped_by"] == signame and summary["steps"] == ckpt["step"] == 2  # the step it came in


def test_the_time_limit_warning_before_the_first_step_stops_after_it(tmp_path, monkeypatch):
    """SIGUSR2 during start-up (train.py keeps it): the run saves after its first step and exits as warned."""
    import train
    monkeypatch.setattr(train, "EARLY_WARNING", ["SIGUSR2"])
    with pytest.raises(SystemExit) as exit_:
        run_train(tmp_path, [*SMALL, "max_steps=6"])
    assert exit_.value.code == 140
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by"] == "SIGUSR2"
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize("signame, code, said", [
    ("SIGHUP", 129, "interrupted (SIGHUP) outside the training steps"),
    ("SIGUSR2", 140, "SIGUSR2: checkpoint saved at step 1, exiting"),
])
def test_a_signal_during_the_imports(tmp_path, signame, code, said):
    """SIGHUP and SIGUSR2 while torch loads killed the process with no line (exit -1, -12)."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, "max_steps=4",
                             f"hydra.run.dir={tmp_path / 'run'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code and said in out + err, out[-2000:] + err[-2000:]


@pytest.mark.parametrize("argument", ["", " "])
def test_an_empty_argument_is_named_as_empty(tmp_path, argument):
    """python train.py $S "" (an unset "$EXTRA") was told it "holds '=' or ','"."""
    r = checks([*SMALL, argument, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and r.stderr.startswith("error: an argument is empty"), r.stderr


RECORD_PATHS = [  # (what the run dir holds, the logger, what the one line says); the first four are issue 41's
    (lambda d: (d / "train.log").symlink_to("/dev/full"), "none", "train.log is a link to /dev/full, which is not a"),
    (lambda d: (d / "tensorboard").write_text("x"), "tensorboard", "tensorboard is not a folder"),
    (lambda d: (d / "metrics.csv").mkdir(), "csv", "metrics.csv is not a file"),
    (lambda d: (d / "checkpoints").write_text("x"), "none", "checkpoints is not a folder"),
    (lambda d: (d / "wandb").write_text("x"), "wandb", "wandb is not a folder"),
    (lambda d: (d / "metrics.csv").symlink_to(d / "gone.csv"), "csv", "metrics.csv is a link to"),
    (lambda d: (d / ".hydra").write_text("x"), "none", ".hydra is not a folder"),
    (lambda d: (d / "train.log").mkdir(), "none", "train.log is not a file"),
]


@pytest.mark.parametrize("damage, logger, said", RECORD_PATHS, ids=[s for _, _, s in RECORD_PATHS])
def test_a_record_path_that_is_not_what_the_run_writes_is_refused(tmp_path, damage, logger, said):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    damage(run_dir)
    r = checks([*SMALL, f"logger={logger}", "max_steps=2", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("resume", ["resume=null", "resume=auto"])
def test_a_run_dir_that_links_nowhere_says_so(tmp_path, resume):
    """hydra.run.dir a dangling link was told "cannot write there (File exists)"."""
    (tmp_path / "run").symlink_to(tmp_path / "purged")
    r = checks([*SMALL, "max_steps=2", resume, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "which does not exist (a purged scratch folder?)" in r.stderr, r.stderr


def test_a_csv_sink_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    from engine.sinks import CsvSink
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        CsvSink(tmp_path, config={}, name="", group=None, resume_step=None, run_id=None)
    assert not list(tmp_path.glob(".metrics.csv.tmp"))


ENVIRONMENTS = [  # (stray variables, extra overrides, what the one line says); the first three are issue 41's
    ({"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}, [], "but MASTER_ADDR and MASTER_PORT are not"),
    ({"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}, ["optim.lr=-1"], "but MASTER_ADDR and MASTER_PORT are not"),
    ({"WANDB_MODE": "bogus"}, ["logger=wandb"], "WANDB_MODE=bogus (from the environment) is not a mode of wandb"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, [], "RANK=abc is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, [], "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, [], "but MASTER_PORT is not"),
]


@pytest.mark.parametrize("env, extra, said", ENVIRONMENTS, ids=[s for _, _, s in ENVIRONMENTS])
def test_stray_environment_variables_are_one_line_naming_them(tmp_path, monkeypatch, env, extra, said):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    r = checks([*SMALL, "max_steps=2", *extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "1"}, {"WANDB_MODE": "bogus"}])
def test_harmless_variables_are_left_alone(tmp_path, monkeypatch, env):
    """A one-rank torchrun's variables, and a bad WANDB_MODE where wandb is not used (logger=none)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert checks([*SMALL, "max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]).returncode == 0


def test_a_rank_whose_peers_never_come_gives_up_with_one_line(tmp_path):
    """WORLD_SIZE=2 RANK=0 with no second rank waited forever with no word: it says once that it waits, and gives up
    at the rendezvous timeout (shortened here) with one error line."""
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    code = ("import datetime, torch\nfrom engine import distributed as d\n"
            "d.RENDEZVOUS_TIMEOUT, d.WAIT_NOTICE_S = datetime.timedelta(seconds=1.5), 0.3\n"
            "from engine.errors import ConfigError\ntry:\n    d.init(torch.device('cpu'))\n"
            "except ConfigError as e:\n    print(f'error: {e}')\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "rank 0: waiting at 127.0.0.1:" in r.stderr and r.stderr.count("waiting") == 1, r.stderr
    assert r.stdout.startswith("error: rank 0 of 2 gave up waiting") and len(r.stdout.splitlines()) == 1, r.stdout


@pytest.mark.parametrize("how", ["deleted", "moved away", "replaced by another file"])
def test_a_metrics_file_removed_during_the_run_is_noticed_and_started_again(tmp_path, monkeypatch, caplog, how):
    """metrics.jsonl deleted during a run: the run wrote on to the unlinked file, and its rows vanished without a
    word. Now one warning at the next write, and a new metrics.jsonl from that step."""
    from engine import loop
    train_step, calls = loop.train_step, [0]
    path = tmp_path / "run" / "metrics.jsonl"

    def removing(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            {"deleted": path.unlink, "moved away": lambda: path.rename(tmp_path / "old.jsonl"),
             "replaced by another file": lambda: (path.unlink(), path.write_text(""))}[how]()
        return train_step(*a, **k)
    monkeypatch.setattr(loop, "train_step", removing)
    caplog.set_level("WARNING", logger="train")
    run_train(tmp_path, [*SMALL, "max_steps=5", "logger.every_steps=1"])
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps[0] == 3 and steps[-1] == 5, steps
    assert sum("was deleted or moved during the run" in m for m in caplog.messages) == 1, caplog.messages
