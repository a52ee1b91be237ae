"""Every command in README.md, docs/ and recipes/README.md runs as written: train.py's overrides pass the same
preflight a run uses (ranges, batch split over the world size its torchrun/sbatch prefix implies, optimizer
keywords; data files not required), each script answers --help, and each shell script parses (bash -n). A renamed
option breaks this test, not the reader."""
import re
import runpy
import shlex
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from engine.cli import preflight
from tests.helpers import ROOT

SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").rglob("*.md"))]
PLACEHOLDER = re.compile(r"\$|<|\[overrides\]|\b(RUN_DIR|FILE|OVERRIDES|PATH|DIR|NAME)\b|\.\.\.")


def commands(text: str) -> list[str]:
    """Lines of ```bash blocks (continuations joined, comments dropped) and `inline` commands, split at &&."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "# after adding" not in line:  # an example that needs the user's own file (docs/extending.md)
                found.append(re.sub(r"\s+#.*$", "", line).strip())
    found += re.findall(r"`((?:python|torchrun|sbatch|bash) [^`]+)`", text)
    return [part.strip() for cmd in found for part in cmd.split("&&") if part.strip()]


ALL = sorted({c for src in SOURCES for c in commands(src.read_text())})
CHECKED = [c for c in ALL if not PLACEHOLDER.search(c)]


def world_size(words: list[str]) -> int:
    if words[0] == "torchrun":
        opts = dict(w.lstrip("-").split("=", 1) for w in words if w.startswith("--") and "=" in w)
        return int(opts.get("nproc_per_node", 1)) * int(opts.get("nnodes", 1))
    if words[0] == "sbatch":
        script = (ROOT / "scripts" / "slurm" / "train.sbatch").read_text()
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", script, re.M).group(1))
        return nodes * int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", script, re.M).group(1))
    return 1


def train_args(words: list[str]) -> list[str] | None:
    """The overrides of a train.py command (also under torchrun, sbatch's script, and Hydra's submitit launcher)."""
    for i, w in enumerate(words):
        if w == "train.py" or w.endswith("/train.py") or w.endswith(".sbatch"):
            return words[i + 1:]
    return None


def each_value_once(args: list[str]) -> list[list[str]]:
    """A sweep's jobs, thinned so that every value of every axis is checked once (the others at their first value):
    what a renamed or out-of-range value breaks, without the whole grid. Sweeps are found by Hydra's own parser."""
    parser = OverridesParser.create()
    axes = {}
    for i, a in enumerate(args):
        if not a.startswith("-") and (o := parser.parse_overrides([a])[0]).is_discrete_sweep():
            axes[i] = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
    first = [axes[i][0] if i in axes else a for i, a in enumerate(args)]
    jobs = [first] + [first[:i] + [v] + first[i + 1:] for i, values in axes.items() for v in values[1:]]
    return [[a for a in job if a not in ("-m", "--multirun")] for job in jobs]


@pytest.mark.parametrize("command", [c for c in CHECKED if train_args(shlex.split(c)) is not None])
def test_a_documented_training_command_passes_the_preflight(command, monkeypatch, capsys):
    words = shlex.split(command)
    for key, value in {"RANK": "0", "WORLD_SIZE": str(world_size(words)), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():  # as torchrun sets them
        monkeypatch.setenv(key, value)
    for job in each_value_once(train_args(words)):
        try:
            preflight(job, check_files=False)
        except SystemExit:
            pytest.fail(f"{command}\n{' '.join(job)}\n{capsys.readouterr().err}")


SCRIPTS = sorted({w for c in CHECKED for w in shlex.split(c) if re.fullmatch(r"scripts/\w+\.py", w)})


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_documented_script_answers_help(script, monkeypatch, capsys):
    """In this process (the imports are paid once): argparse prints the help and exits 0, before any work."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert done.value.code in (0, None) and "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("script", sorted({w for c in ALL for w in shlex.split(c) if re.fullmatch(r"scripts/\S+\.(sh|sbatch)", w)}))
def test_a_documented_shell_script_parses(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0


def test_most_documented_commands_are_checked():
    assert len(ALL) > 40 and len(CHECKED) >= 0.7 * len(ALL), [c for c in ALL if c not in CHECKED]
