"""CI refuses to run without the C core or PyTorch; a user's machine skips instead."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import missing_requirements


def test_ci_without_the_c_core_is_an_error():
    missing = missing_requirements(in_ci=True, have_c=False, have_torch=True)
    assert len(missing) == 1 and "C core" in missing[0]


def test_ci_without_torch_is_an_error():
    missing = missing_requirements(in_ci=True, have_c=True, have_torch=False)
    assert len(missing) == 1 and "PyTorch" in missing[0]


def test_outside_ci_nothing_is_required():
    assert missing_requirements(in_ci=False, have_c=False, have_torch=False) == []


def test_pytest_exits_nonzero_in_ci_when_torch_is_hidden(tmp_path):
    # a meta-path finder installed by sitecustomize makes `import torch` fail, as on a machine without it
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _HideTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _HideTorch())\n")
    tests = Path(__file__).parent
    env = dict(os.environ, CI="true", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(tests / "test_requirements.py::test_outside_ci_nothing_is_required")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "PyTorch is not installed" in result.stdout + result.stderr
