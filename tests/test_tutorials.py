"""Every lesson runs to the end with its default settings, and every lesson that draws writes its PNG.

Lessons are tutorials/NN_name.py; each takes --out FOLDER for what it writes. A lesson draws
when it uses matplotlib; then at least one PNG must appear under its --out folder.
"""

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_the_lessons_are_numbered_one_after_another_from_01():
    assert len(TUTORIALS) >= 10
    assert [path.name[:2] for path in TUTORIALS] == [f"{n:02d}" for n in range(1, len(TUTORIALS) + 1)]


def test_the_course_readme_lists_every_lesson():
    readme = (TUTORIALS[0].parent / "README.md").read_text()
    assert [path.name for path in TUTORIALS if f"({path.name})" not in readme] == []


def draws(path: Path) -> bool:
    return "matplotlib" in path.read_text()


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_and_writes_its_pictures(path, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(path), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if draws(path):
        assert list(out.rglob("*.png")), f"{path.name} draws but wrote no PNG into --out {out}"
    readme = (TUTORIALS[0].parent / "README.md").read_text()
    unlisted = [png.name for png in out.rglob("*.png") if f"`{png.name}`" not in readme and
                f"`{png.relative_to(out)}`" not in readme]
    assert unlisted == [], f"tutorials/README.md's list of pictures lacks {unlisted}"
