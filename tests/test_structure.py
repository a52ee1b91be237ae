"""The structure a maintainer relies on: one source for every option name, an optimizer is one YAML file, resume
refuses a different run before anything is written, ranks may change across a resume, and the loop reads the
host once per optimizer step."""
import json
import shutil

import pytest
import torch

from engine.cli import group_options
from engine.datasets import DATASETS
from engine.models import MODELS
from optim import BATCH_SCHEDULES, DECAYS, RULES, WARMUPS
from tests.helpers import ROOT, TINY, checks, python, run_train

run = python


@pytest.mark.parametrize("group,registry", [("warmup", WARMUPS), ("schedule", DECAYS), ("scaling", RULES),
                                            ("model", MODELS), ("data", DATASETS),
                                            ("batch_schedule", BATCH_SCHEDULES)])
def test_option_files_are_the_registry(group, registry):
    """An option's name lives in two places only: its YAML file and the code that implements it."""
    assert sorted(group_options(group)) == sorted(registry)



def _compares_a_name(node, names, subjects) -> bool:
    """``node`` compares a string of ``names`` with (or tests it against) an expression that mentions one of
    ``subjects`` (a rule, a batch schedule)."""
    import ast
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    literal = any(isinstance(n, ast.Constant) and n.value in names for side in sides for n in ast.walk(side))
    return literal and any(word in ast.unparse(side) for side in sides for word in subjects)


def test_rules_and_batch_schedules_are_told_apart_in_one_place():
    """No code compares a scaling rule's or a batch schedule's name, except the modules that define them and the
    one function that chooses the run's schedule class from them (engine/schedule.py's choose_schedule, which
    tests membership of optim.MEASURES_GAIN)."""
    import ast
    own = {"optim/scaling.py", "optim/batch_schedules.py"}
    found = []
    for path in [ROOT / "train.py", *ROOT.glob("engine/*.py"), *ROOT.glob("optim/*.py"), *ROOT.glob("scripts/*.py"),
                 *ROOT.glob("hydra_plugins/*/*.py")]:
        rel = str(path.relative_to(ROOT))
        if rel in own:
            continue
        tree = ast.parse(path.read_text())
        found += [f"{rel}:{n.lineno}" for n in ast.walk(tree)
                  if _compares_a_name(n, set(RULES) | set(BATCH_SCHEDULES), ("rule", "batch_schedule", "batches",
                                                                             "kind"))]
    assert not found, f"a rule or batch schedule compared by name outside its module: {found}"


@pytest.mark.parametrize("name", list(BATCH_SCHEDULES))
def test_every_registered_batch_schedule_is_handled(name):
    """A kind registered in BATCH_SCHEDULES builds from its conf/ file and says its sizes, each step's batch and
    its plan line: one that left any out (the base class's NotImplementedError) fails here, not in a run."""
    from engine.compose import load_cfg
    from engine.plan import make_plan
    cfg = load_cfg([*TINY, "batch=256", f"batch_schedule={name}"]
                   + (["batch_schedule.start=64"] if name != "constant" else [])
                   + (["batch_schedule.probe=16", "batch_schedule.multiple=64", "micro_batch=16"]
                      if name == "adaptive" else []))
    plan = make_plan(cfg, 2048)
    batches = plan.batches
    assert type(batches) is BATCH_SCHEDULES[name] and min(batches.sizes()) >= 1 and max(batches.sizes()) == 256
    assert batches.next(0, None) in batches.sizes()
    assert isinstance(batches.describe("the linear rule", 16), str)
    assert plan.describe()


@pytest.mark.parametrize("rule", list(RULES))
def test_every_registered_rule_gives_a_factor(rule):
    """A rule registered in RULES is its own LR factor: 1 at the reference batch, positive and increasing or flat
    above it."""
    from optim import lr_multiplier
    assert lr_multiplier(rule, 256, 256) == 1.0
    assert 1.0 <= lr_multiplier(rule, 512, 256) <= lr_multiplier(rule, 1024, 256)


RMSPROP = """\
# RMSprop: added by this one file, no Python edit.
_target_: torch.optim.RMSprop
lr: 0.001
weight_decay: 0.0
alpha: 0.9
"""


@pytest.fixture
def repo_copy(tmp_path):
    """train.py, conf/ and the preview script in a scratch folder, with conf/optim/rmsprop.yaml added."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", copy / "conf", symlinks=True)
    (copy / "conf" / "recipe").unlink(missing_ok=True)  # a link into recipes/, not needed here
    (copy / "scripts").mkdir()
    shutil.copy(ROOT / "train.py", copy)
    shutil.copy(ROOT / "scripts" / "lr_schedule.py", copy / "scripts")
    (copy / "conf" / "optim" / "rmsprop.yaml").write_text(RMSPROP)
    return copy


def test_one_yaml_file_adds_an_optimizer(repo_copy, tmp_path):
    tiny = [*TINY, "max_steps=2", "threads=1"]
    r = run(["train.py", "-m", "optim=rmsprop,sgd", *tiny, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=repo_copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RMSprop: lr 0.001 @ batch 256" in r.stdout  # ref_batch 256 and the root's linear rule by default
    summaries = sorted((json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")),
                       key=lambda s: s["optimizer"])
    assert [(s["optimizer"], s["steps"]) for s in summaries] == [("RMSprop", 2), ("SGD", 2)]

    r = run(["scripts/lr_schedule.py", "optim=rmsprop", "batch=1k", "--out", str(tmp_path / "preview")],
            cwd=repo_copy)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (tmp_path / "preview.csv").read_text().splitlines()
    assert rows[0] == "step,lr,batch" and len(rows) == 1 + 8 * (55_000 // 1024)  # 5,000 held out for val

    (repo_copy / "conf" / "optim" / "rmsprop.yaml").write_text(RMSPROP.replace("alpha:", "alphaa:"))
    r = checks(["optim=rmsprop", *tiny, f"hydra.run.dir={tmp_path / 'bad'}"], conf_dir=repo_copy / "conf")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: optim.alphaa is not a keyword of torch.optim.RMSprop: remove it or fix its spelling"
    assert not (tmp_path / "bad").exists()


REFUSED = [("batch=128", "batch was 256 in the checkpoint and is 128 now"),
           ("seed=1", "seed was 0 in the checkpoint and is 1 now"),
           ("optim=lars", "optim was torch.optim.SGD in the checkpoint and is optim.LARS now"),
           ("model=vit_tiny", "model was resnet_small in the checkpoint and is vit_tiny now"),
           ("model.width=32", "the model differs from the checkpoint's (head.2.weight: 10x64 in the checkpoint"),
           ("data.num_classes=5", "(head.2.bias: 10 in the checkpoint, 5 now)"),
           ("ema.enabled=true", "ema.enabled=true, but the checkpoint holds no EMA weights")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    r = run(["train.py", *TINY, "max_steps=2", "threads=1", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("change,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_resume_refuses_another_run_before_anything_is_written(finished_run, change, message):
    hydra_files = {p: p.read_bytes() for p in (finished_run / ".hydra").iterdir()}
    r = checks([*TINY, "max_steps=2", "threads=1", change, "resume=auto", f"hydra.run.dir={finished_run}"])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resume=") and message in lines[0], r.stderr
    assert {p: p.read_bytes() for p in (finished_run / ".hydra").iterdir()} == hydra_files


def test_resume_refuses_another_dataset_and_accepts_what_may_change():
    from engine.checkpoint import FORMAT, check_resumable
    from engine.errors import ConfigError
    from tests.helpers import load_cfg
    cfg = load_cfg([*TINY])
    ckpt = {"format": FORMAT, "identity": {"global_batch": 256, "seed": 0, "optimizer": "torch.optim.SGD",
                                           "model": "resnet_small", "dataset": "fashion_mnist"}}
    with pytest.raises(ConfigError, match="data was fashion_mnist in the checkpoint and is synthetic now"):
        check_resumable(ckpt, cfg, "last.pt")
    ckpt["identity"]["dataset"] = "synthetic"
    check_resumable(ckpt, load_cfg([*TINY, "micro_batch=64", "threads=1", "logger=csv", "max_steps=9"]), "last.pt")


def test_an_old_checkpoint_format_is_refused(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 1, "epoch": 0}, old)  # what the previous version wrote
    r = checks([*TINY, f"resume={old}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "checkpoint format 1 is not this version's (5)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_host_reads_once_per_optimizer_step(tmp_path, monkeypatch):
    """On CPU with torch's SGD and diagnostics off: loss, grad norm and finiteness come back in one read."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for steps in (3, 7):
        reads["n"] = 0
        run_train(tmp_path, [*TINY, "batch=32", f"max_steps={steps}", "diagnostics.every=0",
                             "diagnostics.noise_scale=false", "checkpoint.enabled=false"], name=f"r{steps}")
        counts[steps] = reads["n"]
    assert (counts[7] - counts[3]) == 4  # 4 more steps, 4 more reads: one per step


def test_resume_on_another_number_of_ranks_continues_the_same_run(tmp_path, caplog):
    """Data order depends on (seed, batch) only: 2 ranks for 2 steps, then 1 rank for 2 more, equals 1 rank for 4.
    The one-rank runs run in-process; the two ranks under torchrun."""
    caplog.set_level("INFO", logger="train")
    common = ["data=synthetic", "data.train_size=256", "data.test_size=64", "logger=none", "epochs=2",
              "warmup.steps=1", "model=vit_tiny", "data.image_size=14", "model.patch_size=7", "batch=64", "micro_batch=16",
              "threads=1", "optim=lars", "checkpoint.every_steps=1", "precision=fp32"]
    run_train(tmp_path, [*common, "max_steps=4"], "whole")
    part = tmp_path / "part"
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *common,
             "max_steps=2", f"hydra.run.dir={part}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(part / "checkpoints" / "last.pt", weights_only=False)["rng"]["ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])  # each rank its own stream
    run_train(tmp_path, [*common, "max_steps=4", "resume=auto"], "part")
    assert any(m.startswith("resuming from step 2 of 4") for m in caplog.messages)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=2e-6, msg=k)
