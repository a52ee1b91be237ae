"""engine/records.py, the one reader of a run's record files, and every script on damaged or partial records: a torn
last line of metrics.jsonl is skipped with one warning; anything else unreadable is one `error:` line naming the
file (and line); a figure with nothing to draw is an error, not a blank PNG."""
import json
import sys
from pathlib import Path

import pytest

from engine.records import RecordError, read_metrics, read_overrides, read_summary

ROWS = [{"step": 1, "loss": 2.3, "lr": 0.1, "batch": 256, "epoch": 0.5, "noise_scale/b_simple": 100.0},
        {"step": 2, "loss": 2.0, "lr": 0.1, "batch": 256, "epoch": 1.0, "noise_scale/b_simple": 120.0},
        {"step": 2, "val_acc": 0.6, "val_loss": 1.2, "epoch": 1.0}]


def fake_sweep(root: Path, seeds=(0, 1)) -> Path:
    """Jobs as Hydra and train.py leave them: .hydra/overrides.yaml, metrics.jsonl and summary.json."""
    for num, seed in enumerate(seeds):
        job = root / f"{num}_seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        (job / "summary.json").write_text(json.dumps({"val_acc": 0.6, "steps": 2, "global_batch": 256,
                                                      "micro_batch": 128}))
    return root


def run_script(name: str, args, monkeypatch, capsys) -> tuple[int, str, str]:
    """A script's main() in this process: its exit code, stdout and stderr (an error line is SystemExit's text)."""
    import importlib
    module = importlib.import_module(name)  # scripts/ is on the path (conftest.py)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    code = 0
    try:
        module.main()
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else e.code or 0
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def torn(job):
    path = job / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "lo')


def blank(job):
    path = job / "metrics.jsonl"
    path.write_text(path.read_text().replace("\n", "\n\n", 1))


def not_an_object(job):
    path = job / "metrics.jsonl"
    path.write_text("[1, 2]\n" + path.read_text())


def damaged_middle(job):
    path = job / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")


def summary_nan(job):
    (job / "summary.json").write_text('{"val_acc": NaN, "steps": 2, "global_batch": 256}')


def summary_empty(job):
    (job / "summary.json").write_text("{}")


def summary_torn(job):
    (job / "summary.json").write_text('{"val_acc": 0.6, "ste')


def overrides_damaged(job):
    (job / ".hydra" / "overrides.yaml").write_text("- seed: [unclosed\n  : :\n")


def overrides_not_a_list(job):
    (job / ".hydra" / "overrides.yaml").write_text("seed: 0\n")


def metrics_gone(job):
    (job / "metrics.jsonl").unlink()


# (script, its arguments after the sweep or run dir, damage to job 0 (all jobs: "*"), exit code, what it says).
# Issue 41's cases first; the last five are beyond it.
CASES = [
    ("summarize", ["--targets", "0.5"], torn, 0, "its last line was cut off mid-write"),
    ("summarize", ["--targets", "0.5"], blank, 0, "Steps to a target test accuracy"),
    ("summarize", ["--targets", "0.5"], not_an_object, 1, "metrics.jsonl: line 1 is not a JSON object"),
    ("plot_curves", [], torn, 0, "its last line was cut off mid-write"),
    ("plot_curves", [], not_an_object, 1, "metrics.jsonl: line 1 is not a JSON object"),
    ("plot_noise_scale", [], torn, 0, "its last line was cut off mid-write"),
    ("plot_noise_scale", [], not_an_object, 1, "metrics.jsonl: line 1 is not a JSON object"),
    ("summarize", ["--seeds-mean"], summary_nan, 0, "0.6000"),
    ("summarize", [], summary_empty, 0, "failed: summary.json holds no result"),
    ("plot_noise_scale", [], summary_torn, 0, "B_simple last 120"),
    ("plot_curves", [], overrides_damaged, 1, ".hydra/overrides.yaml: line 2 is unreadable (ParserError)"),
    ("plot_curves", ["--metric", "val_top5"], None, 1, "no run logged --metric val_top5"),
    ("summarize", ["--x", "optim.lr"], None, 1, "--x optim.lr: no job sets it"),
    ("plot_curves", [], "*", 1, "has a metrics.jsonl"),
    ("summarize", ["--targets", "0.5"], damaged_middle, 1, "metrics.jsonl: line 2 is not JSON"),
    ("plot_curves", [], overrides_not_a_list, 1, "is not a list of overrides"),
    ("plot_curves", [], blank, 0, "final val_acc 0.6000"),
    ("plot_noise_scale", [], damaged_middle, 1, "metrics.jsonl: line 2 is not JSON"),
    ("summarize", [], summary_torn, 0, "failed: summary.json unreadable (JSONDecodeError)"),
]


@pytest.mark.parametrize("script, extra, damage, code, said", CASES,
                         ids=[f"{c[0]}-{getattr(c[2], '__name__', c[2])}-{' '.join(c[1])}" for c in CASES])
def test_every_script_reads_damaged_records_in_one_line(tmp_path, monkeypatch, capsys, script, extra, damage, code,
                                                        said):
    sweep = fake_sweep(tmp_path / "sweep")
    jobs = sorted(p for p in sweep.iterdir())
    if damage == "*":
        for job in jobs:
            metrics_gone(job)
    elif damage is not None:
        damage(jobs[0])
    out = tmp_path / "out"
    target = [jobs[0]] if script == "plot_noise_scale" else [sweep]
    args = [*target, *extra, "--out", out / "figure" if script != "summarize" else out]
    rc, stdout, stderr = run_script(script, args, monkeypatch, capsys)
    assert rc == code and said in stdout + stderr, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    if code:
        assert stderr.strip().startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert not list(out.glob("*.png")) if out.exists() else True  # no blank figure


def test_the_reader_skips_a_torn_last_line_once_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    warnings = []
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"st')
    assert read_metrics(path, warn=warnings.append) == [{"step": 1}, {"step": 2}] and len(warnings) == 1
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(RecordError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_a_summary_reads_nan_as_none_and_a_torn_one_as_empty(tmp_path):
    (tmp_path / "summary.json").write_text('{"val_acc": NaN, "steps": 3}')
    assert read_summary(tmp_path) == {"val_acc": None, "steps": 3}
    (tmp_path / "summary.json").write_text('{"val_acc": 0.5, "st')
    assert read_summary(tmp_path) == {}
    assert read_overrides(tmp_path) == []  # no .hydra: nothing recorded


def test_noise_scale_on_a_garbage_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """It was a traceback telling the user to change resume=."""
    run_dir = fake_sweep(tmp_path / "sweep", seeds=(0,)) / "0_seed=0"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    rc, _, stderr = run_script("noise_scale", [run_dir], monkeypatch, capsys)
    assert rc == 1 and stderr.startswith(f"error: {run_dir / 'checkpoints' / 'last.pt'}: not a readable checkpoint")
    assert "resume=" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
