"""The docs point only inside the repository: every relative link and backticked repository path exists, and no
text refers to working files that are not part of it or to who wrote what when."""
import re

import pytest

from tests.helpers import ROOT

SKIP = {".git", "wheels", "outputs", "multirun", "__pycache__", ".pytest_cache"}
TOP = ("engine/", "optim/", "scripts/", "tests/", "conf/", "recipes/", "docs/", "hydra_plugins/", ".ci/")
# built from pieces so that this file does not match itself
WORDS = [re.compile(p, re.I) for p in (r"shared/" + "seeds", r"PAPERS" + r"\.md", r"PITFALLS" + r"\.md",
                                       r"\bissue #\d+", r"user's " + "notes", r"\bthe " + r"notes'",
                                       r"previous " + "session", r"\bthis " + "session\b")]


def files(*suffixes):
    return sorted(p for p in ROOT.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not SKIP & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("path", files(".md", ".py", ".yaml", ".sh"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_words_that_point_outside_the_repository(path):
    text = path.read_text(errors="replace")
    found = [m.group(0) for w in WORDS for m in w.finditer(text)]
    assert not found, found


def _exists(target: str, base) -> bool:
    target = target.split("#")[0].rstrip("/")
    return not target or (base / target).exists()


@pytest.mark.parametrize("path", files(".md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_repository_path_exists(path):
    text = path.read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    paths = [t for t in re.findall(r"`([^`\s]+)`", text)
             if t.startswith(TOP) and not re.search(r"[*<>{}$]|NAME|\.\.\.", t)]
    # a link resolves against its file, as markdown is read; a backticked path names a file of the repository
    missing = [t for t in links if not _exists(t, path.parent)] + [t for t in paths if not _exists(t, ROOT)]
    assert not missing, missing
