"""The learner's side of the exercises: copy a stub into a workspace, grade the learner's copy,
show hints and solutions. The package's own files are only ever read."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import textwrap
from pathlib import Path

from . import DEFAULT_WORKSPACE, EXERCISES, exercise
from .grading import Outcome, run_checks
HERE = Path(__file__).resolve().parent


def stub_path(name: str) -> Path:
    return HERE / "stubs" / f"{exercise(name).name}.py"


def solution_path(name: str) -> Path:
    return HERE / "solutions" / f"{exercise(name).name}.py"


def learner_path(name: str, workspace=DEFAULT_WORKSPACE) -> Path:
    return Path(workspace) / f"{exercise(name).name}.py"


def listing() -> str:
    """One line per exercise: name, minutes, what."""
    width = max(len(name) for name in EXERCISES)
    return "\n".join(f"{e.name.ljust(width)}  {e.minutes:3d} min  {e.what}" for e in EXERCISES.values())


def start(name: str, workspace=DEFAULT_WORKSPACE, force: bool = False) -> Path:
    """Copy the stub of `name` into the workspace; refuse to overwrite the learner's work unless force."""
    return _copy(stub_path(name), learner_path(name, workspace), force)


def write_solution(name: str, workspace=DEFAULT_WORKSPACE, force: bool = False) -> Path:
    """Copy the solution of `name` into the workspace (over the learner's file only with force)."""
    return _copy(solution_path(name), learner_path(name, workspace), force)


def _copy(source: Path, target: Path, force: bool) -> Path:
    if target.exists() and not force:
        raise ValueError(f"{target} exists; it may hold your work. Pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def check(name: str, path) -> list:
    """Grade the file at `path` as exercise `name` -> [Outcome]; a file that does not import is one failure."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: run `minqkv exercise start {name}` first")
    try:
        module = load(path, name)
    except Exception as error:  # a syntax error, a bad import: the learner's to fix, said in one line
        line = f" (line {error.lineno})" if isinstance(error, SyntaxError) and error.lineno else ""
        return [Outcome(f"import {path.name}", False, f"{type(error).__name__}: {error}{line}")]
    return run_checks(exercise(name).name, module)


def load(path: Path, name: str):
    """Import the learner's file as a fresh module (a new import each time, so edits count)."""
    module_name = f"minqkv_exercise_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and the like look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    return module


def report(name: str, path, outcomes: list) -> str:
    """The grade as text: one line per check, then the count and what to do next."""
    lines = [f"{name}: {path}"]
    for o in outcomes:
        lines.append(f"  {'pass' if o.passed else 'FAIL'}  {o.check}" + ("" if o.passed else f"\n        {o.message}"))
    passed = sum(o.passed for o in outcomes)
    lines.append(f"{passed}/{len(outcomes)} checks passed")
    if passed < len(outcomes):
        lines.append(f"stuck? `minqkv exercise hint {name}`")
    return "\n".join(lines)


def hints(name: str) -> str:
    return "\n".join(textwrap.fill(f"{i}. {hint}", 100, subsequent_indent="   ")
                     for i, hint in enumerate(exercise(name).hints, 1))
