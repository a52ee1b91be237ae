"""`pip install .`: the wheel declares what the code imports, with ranges that hold requirements.txt's exact lock (so
`pip install -c requirements.txt .` resolves to the tested versions), and installs the repository's folders."""
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

from tests.helpers import ROOT

RUNTIME = {"torch", "torchvision", "hydra-core", "omegaconf", "pydantic", "wandb", "matplotlib", "tqdm", "timm",
           "safetensors", "tensorboard", "submitit", "wids"}


def locked() -> dict[str, str]:
    pins = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    return {Requirement(p).name.lower(): str(next(iter(Requirement(p).specifier)).version) for p in pins if p}


def test_the_wheel_lists_the_dependencies_and_holds_the_lock(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "train.py"):
        shutil.copy(ROOT / name, source)
    for folder in ("engine", "optim", "hydra_plugins"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl")))
    names = wheel.namelist()
    metadata = Parser().parsestr(wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    declared = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    runtime = {r.name.lower(): r for r in declared if r.marker is None}
    assert set(runtime) == RUNTIME
    assert {"slurm", "optuna", "ray", "dev"} <= set(metadata.get_all("Provides-Extra"))
    pins = locked()
    for req in declared:  # the lock satisfies every declared range: -c requirements.txt resolves
        assert req.specifier.contains(pins[req.name.lower()]), (str(req), pins[req.name.lower()])
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "engine", "optim", "hydra_plugins", "train.py"}
