"""The cffi builder of minqkv's C core: compiles csrc/*.c into the extension minqkv._ccore.

setup.py names `ffibuilder` in `cffi_modules`, so `pip install .` and `pip install -e .` build
it. After editing csrc/, rebuild in place with `pip install -e .` again (or, quicker,
`python setup.py build_ext --inplace`).

The C declarations given to cffi are read from csrc/minqkv.h, so that header stays the one
contract between C and Python.

The default build is portable: plain -O3 for the CPU family, with the hot kernels compiled
several times inside the binary (AVX-512, AVX2+FMA, baseline x86-64) and the best version picked
when the module loads (see csrc/internal.h). Build-time environment variables:

  MINQKV_NATIVE=1   also pass -march=native: fastest here, but the result may crash with
                    "illegal instruction" on an older CPU, so never for wheels you share.
  MINQKV_OPENMP=0   build without OpenMP: every kernel runs on one thread.
  MINQKV_SANITIZE=1 a debugging build with AddressSanitizer and UndefinedBehaviorSanitizer
                    (-O1 -g): an out-of-bounds access, a use after free or undefined behaviour
                    in the C core stops the process with a report. Python itself is not built
                    with ASan, so the runtime must be loaded first and CPython's deliberate
                    leaks ignored:
                      LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
                      ASAN_OPTIONS=detect_leaks=0 python -m pytest -q tests/test_kernels.py
                    (.ci/run does this on a copy of the checkout).

With OpenMP, kernels use MINQKV_NUM_THREADS threads at run time (default: every core this
process may use). OpenMP's thread pool does not survive fork(): code that runs kernels in
several processes must start them with multiprocessing's 'spawn' method, as minqkv does.
"""

import hashlib
import os
import re
import sys
import tempfile

import setuptools  # noqa: F401  (provides distutils on Python 3.12+)
from cffi import FFI

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
CSRC = os.path.join(ROOT, "csrc")


def _path(*parts):
    """A path under the project root, relative when we run from there (setuptools prefers it)."""
    full = os.path.join(ROOT, *parts)
    return os.path.relpath(full) if os.path.abspath(os.getcwd()) == ROOT else full


def cdef_from_header(header_text):
    """The header's declarations in the form cffi.cdef accepts: comments and preprocessor lines
    dropped, each `#define NAME value` turned into `#define NAME ...` (the compiler fills it in)."""
    text = re.sub(r"/\*.*?\*/", "", header_text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        define = re.match(r"#\s*define\s+(MINQKV_\w+)\s+\S", stripped)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not stripped.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


def _compiler_accepts(flags, link_flags=()):
    """True if the C compiler setuptools will use compiles and links a small OpenMP-using file
    with these flags (so a compiler without OpenMP, e.g. Apple's clang, still builds)."""
    from distutils.ccompiler import new_compiler
    from distutils.errors import CCompilerError, DistutilsError
    from distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("int probe(float *x, int n) {\n#pragma omp parallel for simd\n"
                    "  for (int i = 0; i < n; i++) x[i] *= 2;\n  return 0;\n}\n")
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=list(flags))
            compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"),
                                        extra_postargs=list(link_flags))
        except (CCompilerError, DistutilsError, OSError):
            return False
    return True


def build_flags():
    """(compile args, link args, macros) for this compiler and the MINQKV_* variables."""
    if sys.platform == "win32":
        return ["/O2", "/std:c11"], [], []
    # -fno-math-errno: no kernel reads errno, and without it GCC keeps every sqrt a scalar call
    # (it might have to set errno), which left the AdamW loop unvectorised (3.4 ns per element)
    # -fno-trapping-math: no kernel reads the floating-point exception flags either, and with them
    # kept GCC will not turn a conditional (exp's clamp, tanh's sign, the causal mask) into a
    # blend, so every loop with one stayed scalar: GELU, softmax and the online softmax of
    # attention among them. GELU forward + backward were 20% of the default model's training step
    # on a 2-core AMD EPYC (Zen 3) VM, about 10 ns per element
    compile_args = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math"]
    link_args, macros = [], []
    if os.environ.get("MINQKV_OPENMP", "1") != "0" and _compiler_accepts(["-fopenmp"], ["-fopenmp"]):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    elif _compiler_accepts(["-fopenmp-simd"]):
        compile_args.append("-fopenmp-simd")  # still vectorise the loops marked `omp simd`
    if os.environ.get("MINQKV_NATIVE") == "1":
        compile_args.append("-march=native")
        macros.append(("MINQKV_NATIVE", "1"))
    if os.environ.get("MINQKV_SANITIZE") == "1":
        # -O1 keeps the reports' line numbers honest; any undefined behaviour aborts at once
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        compile_args = [arg for arg in compile_args if arg != "-O3"]
        compile_args += ["-O1", "-g", "-fno-omit-frame-pointer"] + sanitize
        link_args += sanitize
    return compile_args, link_args, macros


def csrc_sha256(csrc_dir=CSRC):
    """sha256 over the names and bytes of every file in csrc/: what the extension was built from."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc_dir)):
        if name.endswith((".c", ".h")):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(csrc_dir, name), "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()


with open(os.path.join(CSRC, "minqkv.h")) as _header:
    _cdef = cdef_from_header(_header.read())

_compile_args, _link_args, _macros = build_flags()

ffibuilder = FFI()
ffibuilder.cdef(_cdef)
# The sources' hash travels inside the binary, so an installed minqkv (which ships no csrc/) can
# tell whether another machine runs the same C core (Dask workers are checked with it).
ffibuilder.cdef("const char *minqkv_csrc_sha256(void);")
ffibuilder.set_source(
    "minqkv._ccore",
    # the flags are written into the generated source so that changing them forces a rebuild
    f'#include "minqkv.h"\n/* compiled with {" ".join(_compile_args)} {_macros} */\n'
    f'static const char *minqkv_csrc_sha256(void) {{ return "{csrc_sha256()}"; }}\n',
    sources=[_path("csrc", name) for name in sorted(os.listdir(CSRC)) if name.endswith(".c")],
    depends=[_path("csrc", name) for name in sorted(os.listdir(CSRC)) if name.endswith(".h")],
    include_dirs=[_path("csrc")],
    define_macros=_macros,
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)
