"""Builds minqkv with its C core: cffi compiles csrc/*.c into the extension minqkv._ccore.

All metadata lives in pyproject.toml; this file only hooks the cffi builder in, so that
`pip install .` and `pip install -e .` compile the extension (see minqkv/_build.py for the
compiler flags and the MINQKV_NATIVE / MINQKV_OPENMP build options).
"""

from setuptools import setup

setup(cffi_modules=["minqkv/_build.py:ffibuilder"])
