"""Adding an option of each kind, in a scratch copy of the repository: the files it takes, counted, and a step
trained with it. docs/extending.md states these counts; a test below keeps the two equal."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

COPIED = ("train.py", "conf", "engine", "optim", "hydra_plugins")


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}: update this test's recipe"
    path.write_text(text.replace(old, new, 1))


def _yaml_like(repo, group, template, name, extra=""):
    text = (repo / "conf" / group / f"{template}.yaml").read_text()
    (repo / "conf" / group / f"{name}.yaml").write_text(re.sub(r"(?m)^name: .*$", f"name: {name}", text) + extra)


def add_optimizer(repo):
    (repo / "conf" / "optim" / "rmsprop.yaml").write_text("_target_: torch.optim.RMSprop\nlr: 0.001\nalpha: 0.9\n")
    return ["optim=rmsprop"]


def add_warmup(repo):
    _edit(repo / "optim" / "schedules.py", '    "cosine": lambda s, x: (1 - math.cos(math.pi * x)) / 2,\n',
          '    "cosine": lambda s, x: (1 - math.cos(math.pi * x)) / 2,\n    "quadratic": lambda s, x: x * x,\n')
    _yaml_like(repo, "warmup", "linear", "quadratic")
    return ["warmup=quadratic"]


def add_decay(repo):
    schedules = repo / "optim" / "schedules.py"
    _edit(schedules, 'DECAYS = ("constant", ', 'DECAYS = ("linear", "constant", ')
    _edit(schedules, '        if self.decay == "poly":\n',
          '        if self.decay == "linear":\n            return f + (1 - f) * (1 - p)\n'
          '        if self.decay == "poly":\n')
    _yaml_like(repo, "schedule", "cosine", "linear")
    return ["schedule=linear"]


def add_model(repo):
    (repo / "my_models.py").write_text(
        "from torch import nn\n\n\nclass MLP(nn.Sequential):\n"
        "    def __init__(self, in_channels, image_size, num_classes, hidden):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden), nn.ReLU(),\n"
        "                         nn.Linear(hidden, num_classes))\n")
    (repo / "conf" / "model" / "mlp.yaml").write_text("_target_: my_models.MLP\nhidden: 32\n")
    return ["model=mlp"]


def add_dataset(repo):
    _edit(repo / "engine" / "datasets.py", "DATASETS = {\n",
          'DATASETS = {\n    "noise": Dataset(lambda c: make_synthetic(c.train_size, c.test_size, c.image_size, '
          'c.channels, c.num_classes, seed=7), lambda c: c.train_size, lambda c: None,\n'
          '        lambda c: ((c.channels, c.image_size, c.image_size), c.num_classes)),\n')
    _yaml_like(repo, "data", "synthetic", "noise")
    return ["data=noise", "data.train_size=512", "data.test_size=128"]


def add_decay_with_a_setting(repo):
    """A decay with a setting of its own: its type and range in engine/config.py, a field of LRSchedule of the same
    name (plan.py passes it on by that name)."""
    schedules = repo / "optim" / "schedules.py"
    _edit(schedules, 'DECAYS = (', 'DECAYS = ("exponential", ')
    _edit(schedules, "    max_momentum: float = 0.95\n", "    max_momentum: float = 0.95\n    rate: float = 1.0\n")
    _edit(schedules, '        if self.decay == "poly":\n',
          '        if self.decay == "exponential":\n            return math.exp(-self.rate * p)\n'
          '        if self.decay == "poly":\n')
    _edit(repo / "engine" / "config.py", "    max_momentum: Optional[UnitOpen] = None\n",
          "    max_momentum: Optional[UnitOpen] = None\n    rate: Optional[PosFloat] = None\n")
    (repo / "conf" / "schedule" / "exponential.yaml").write_text("name: exponential\nrate: 3.0\n")
    return ["schedule=exponential"]


def add_batch_schedule(repo):
    _edit(repo / "optim" / "batch_schedules.py", "# the config name of each kind",
          "@dataclass(frozen=True)\nclass TwoPhaseBatch(BatchSchedule):\n    switch_images: int = 0\n\n"
          "    @classmethod\n    def from_config(cls, group, batch, total_images, train_size):\n"
          "        return cls(batch=batch, start=group.start, switch_images=int(group.epochs * train_size))\n\n"
          "    def sizes(self):\n        return sorted({self.first, self.batch})\n\n"
          "    def at(self, images):\n        return self.first if images < self.switch_images else self.batch\n\n"
          "    def describe(self, lr_follows, probe_images):\n"
          "        return f'two phases: {self.first} then {self.batch}'\n\n\n"
          "# the config name of each kind")
    _edit(repo / "optim" / "batch_schedules.py", 'BATCH_SCHEDULES = {"constant": ConstantBatch, ',
          'BATCH_SCHEDULES = {"twophase": TwoPhaseBatch, "constant": ConstantBatch, ')
    (repo / "conf" / "batch_schedule" / "twophase.yaml").write_text("name: twophase\nstart: 32\nepochs: 0.5\n")
    return ["batch_schedule=twophase"]


def add_logger(repo):
    (repo / "my_sink.py").write_text("from engine.sinks import Sink\n\n\nclass Lines(Sink):\n"
                                     "    def log(self, step, row):\n"
                                     "        with open(self.run_dir / 'lines.txt', 'a') as f:\n"
                                     "            f.write(f'{step}\\n')\n")
    (repo / "conf" / "logger" / "lines.yaml").write_text("every_steps: 1\nsinks:\n  lines:\n"
                                                         "    _target_: my_sink.Lines\n")
    return ["logger=lines"]


# kind -> (how to add one, the files it takes): docs/extending.md's table states the same numbers
KINDS = {"optimizer": (add_optimizer, 1), "warmup": (add_warmup, 2), "decay": (add_decay, 2),
         "decay with a new setting": (add_decay_with_a_setting, 3), "model": (add_model, 2),
         "dataset": (add_dataset, 2), "batch schedule": (add_batch_schedule, 2), "logger": (add_logger, 2)}


def snapshot(repo):
    return {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """Every kind added to one scratch copy; the files each one touched; one training step with each."""
    repo = tmp_path_factory.mktemp("extended") / "repo"
    repo.mkdir()
    for name in COPIED:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, repo / name)
    touched, runs = {}, {}
    for kind, (add, _) in KINDS.items():
        before = snapshot(repo)
        runs[kind] = add(repo)
        after = snapshot(repo)
        touched[kind] = sorted(str(p) for p in after if before.get(p) != after[p])
    script = ("import json, sys\nfrom pathlib import Path\nimport train\nfrom engine.compose import TINY, compose_cfg\n"
              "for i, overrides in enumerate(json.loads(sys.argv[1])):\n"
              "    run_dir = Path(sys.argv[2]) / str(i)\n    run_dir.mkdir(parents=True)\n"
              "    keys = {o.split('=')[0] for o in overrides}\n"
              "    base = [o for o in TINY if o.split('=')[0] not in keys]\n"
              "    s = train.train(compose_cfg([*base, 'batch=64', 'max_steps=3', *overrides]), run_dir)\n"
              "    print(json.dumps([overrides, s['steps'], s['diverged']]))\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(list(runs.values())), str(repo.parent / "runs")],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    return touched, out, repo


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_option_of_each_kind_takes_the_files_the_docs_say_and_trains(extended, kind):
    touched, out, repo = extended
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(touched[kind]) == KINDS[kind][1], touched[kind]
    trained = [line for line in out.stdout.splitlines() if line.startswith("[[")]
    assert len(trained) == len(KINDS) and all(", 3, false]" in line for line in trained), out.stdout[-2000:]


def test_the_docs_state_the_counts_this_test_measures():
    text = (ROOT / "docs" / "extending.md").read_text()
    for kind, (_, files) in KINDS.items():
        row = re.search(rf"^\| an? {kind} \| \*\*(\d+)\*\*", text, re.M)
        assert row and int(row.group(1)) == files, kind
