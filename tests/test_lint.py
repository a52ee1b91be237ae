"""The whole tree passes ruff (pyflakes: undefined names, unused imports and variables; import order)."""
import shutil
import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or f"{sys.executable} -m ruff"
    out = subprocess.run(f"{ruff} check --no-cache --output-format concise .", shell=True, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
