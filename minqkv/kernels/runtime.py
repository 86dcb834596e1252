"""What every kernel family shares: the backend switch, the thread count, the C library with
pointers into arrays, and the checks at the kernel boundary.

The checks here are the ones C relies on to stay inside its arrays: arrays (not lists) of float32
or float64, dtypes that agree (nothing is cast silently) and shapes that fit together. They raise
a TypeError or ValueError naming the kernel and the argument, and both twins of a kernel call
the same ones, so errors read the same on either backend. Checks of values (an eps, an index
inside its table) belong to the callers, ops.py first: the kernels trust them, and the C core
refuses an index outside its array by itself.
"""

import functools
import os
import sys
import warnings

import numpy as np


BACKENDS = ("c", "numpy")
MAX_ELEMENTS = np.iinfo(np.int64).max // 16  # so that byte offsets in C cannot overflow
MAX_NUM_THREADS = 1024  # larger requests are capped: far beyond any useful count, and a C int

BUILD_HINT = "build it with `pip install -e .` in the minqkv checkout (this needs a C compiler)"


# ---- backend and threads ---------------------------------------------------------------


def _check_backend_name(name, source="backend"):
    if name not in BACKENDS:
        raise ValueError(f"{source} {name!r} is not a minqkv backend: use one of "
                         + ", ".join(repr(b) for b in BACKENDS))


def _initial_backend():
    name = os.environ.get("MINQKV_BACKEND", "c").strip().lower() or "c"
    _check_backend_name(name, "MINQKV_BACKEND")
    if name == "c" and not HAVE_C:
        message = (f"minqkv: the C core (minqkv._ccore) is not built ({_IMPORT_ERROR}); "
                   f"running on the slow NumPy twins instead. To get it, {BUILD_HINT}. "
                   "Set MINQKV_BACKEND=numpy to choose NumPy and silence this.")
        print(message, file=sys.stderr)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return "numpy"
    return name


def _initial_num_threads():
    """MINQKV_NUM_THREADS, checked when minqkv is imported, or every core this process may use."""
    text = os.environ.get("MINQKV_NUM_THREADS", "").strip()
    if text:
        # isascii: str.isdigit also accepts digits like '²' that int() refuses
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ValueError(f"MINQKV_NUM_THREADS={text!r} is not a thread count: use a whole number "
                             f">= 1, e.g. MINQKV_NUM_THREADS=4 (counts above {MAX_NUM_THREADS} are capped)")
        return min(int(text), MAX_NUM_THREADS)
    return min(_available_cores(), MAX_NUM_THREADS)


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- OpenMP's wait policy --------------------------------------------------------------------

# libgomp's default wait policy lets idle threads spin for milliseconds before they sleep, so a
# kernel called right after another finds its threads awake. Measured on 2 cores, 2 threads:
# sleeping at once (PASSIVE) makes every kernel call wake its threads, which kept small GEMMs on
# one thread, and shorter spins (3,000 or 10,000) let the threads fall asleep between calls made
# back to back from Python, erratically (the (768,128)@(128,128) GEMM at 0.18-0.33x OpenBLAS in
# some runs, 1.02-1.05x in others). The price of spinning is paid on a busy machine: a thread spins
# through its time slice waiting for one that is not running. A training step of the nanoGPT shape
# beside two busy processes took 844 ms with the default and 62-133 ms with PASSIVE.
#
# So when minqkv is imported and its threads would not each find an idle core (1-minute load
# average + threads > cores), it sets OMP_WAIT_POLICY=PASSIVE for libgomp, unless the user set
# OMP_WAIT_POLICY or GOMP_SPINCOUNT. It must be set before libgomp starts, that is before the C core
# is imported below. MINQKV_WAIT_POLICY=auto (the default), spin (leave libgomp's default) or passive
# overrides the guess. Measured with a training step of the nanoGPT shape (median of 10-30 steps,
# ms, libgomp's default spin -> PASSIVE): 2-core AMD EPYC VM, 2 threads, beside two busy
# processes (`yes > /dev/null` x2): 1569 -> 76 (one thread: 248); the same VM beside other work
# (load 1.9): 294 -> 67. On an idle machine PASSIVE costs: the 16-core Intel Xeon host, 2 threads
# 48.8 -> 47.7, 16 threads 19.9 -> 25.1. Hence PASSIVE only when the machine is busy.
WAIT_POLICY_CHOICES = ("auto", "spin", "passive")


def choose_wait_policy(load_1min, cores, threads, environ):
    """'PASSIVE' when minqkv should set OMP_WAIT_POLICY=PASSIVE, else None (leave libgomp alone).

    load_1min: the 1-minute load average (None where unknown); cores: the cores this process may
    use; threads: the kernels' thread count; environ: the environment (a mapping)."""
    choice = environ.get("MINQKV_WAIT_POLICY", "auto").strip().lower() or "auto"
    if choice not in WAIT_POLICY_CHOICES:
        raise ValueError(f"MINQKV_WAIT_POLICY={choice!r} is not a wait policy: use one of "
                         + ", ".join(WAIT_POLICY_CHOICES))
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or choice == "spin":
        return None  # the user chose
    if choice == "passive":
        return "PASSIVE"
    busy = load_1min is not None and threads > 1 and load_1min + threads > cores + 0.5
    return "PASSIVE" if busy else None


def _load_1min():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on a Unix
        return None


def wait_policy_for_children():
    """Environment entries that give a child process this process's wait policy (a benchmark's
    workers, started while the parent's own load is on the machine, would otherwise guess anew)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {key: os.environ[key] for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if key in os.environ}
    return {"MINQKV_WAIT_POLICY": "spin"}


WAIT_POLICY_SET = choose_wait_policy(_load_1min(), _available_cores(), _initial_num_threads(), os.environ)
if WAIT_POLICY_SET:
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY_SET

# ---- the C core, backend and threads ----------------------------------------------------------

try:
    from .._ccore import ffi, lib

    HAVE_C = True
    _IMPORT_ERROR = None
except ImportError as _error:
    ffi = lib = None
    HAVE_C = False
    _IMPORT_ERROR = _error


_backend = _initial_backend()
_num_threads = _initial_num_threads()


def set_backend(name):
    """Run every kernel (matmul, softmax, GELU, layer norm, cross-entropy, the embedding's backward,
    AdamW, attention, and their backward passes) on 'c', the C core, or on 'numpy', the NumPy
    twins. The first value comes from $MINQKV_BACKEND (default 'c')."""
    global _backend
    _check_backend_name(name)
    if name == "c" and not HAVE_C:
        raise RuntimeError(f"backend 'c' is not available: the extension minqkv._ccore could not be "
                           f"imported ({_IMPORT_ERROR}). To get it, {BUILD_HINT}.")
    _backend = name


def get_backend():
    """The backend in use: 'c' or 'numpy'."""
    return _backend


def set_num_threads(n):
    """How many threads each C kernel may use (small problems use one whatever this says);
    counts above MAX_NUM_THREADS are capped."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads: n must be a whole number >= 1, got {n!r}")
    _num_threads = int(min(n, MAX_NUM_THREADS))


def get_num_threads():
    """The number of threads the C kernels may use."""
    return _num_threads


def _one_thread_after_fork():
    # OpenMP's threads do not exist in a fork()ed child and waiting for them would hang it,
    # so a child runs the kernels on its own thread (start workers with 'spawn' for threads).
    global _num_threads
    _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


# ---- memory kept for reuse ----------------------------------------------------------------

# glibc gives large freed blocks back to the system: those above its mmap threshold (128 KiB at
# first, raised only as far as the largest block freed so far) and whatever sits free at the top
# of the heap beyond its trim threshold. A training step frees and allocates the same large
# arrays every time, so it page-faulted on them again: 14,000-17,700 faults per step of the
# default model, 7-18% of the step (2 cores). Raising both thresholds keeps freed memory in the
# process for the next step; the peak is unchanged, memory is only kept.
# MINQKV_KEEP_MEMORY=0 leaves glibc's defaults.
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 256 << 20


def _keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse; True if it was told (glibc only)."""
    if os.environ.get("MINQKV_KEEP_MEMORY", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


KEEPS_FREED_MEMORY = _keep_freed_memory()


# ---- the C library ------------------------------------------------------------------------


def require_c(op, twin=None):
    """Refuse to run the C binding `op` when the C core is not built, naming its NumPy twin."""
    if not HAVE_C:
        raise RuntimeError(f"{op}_c: the C core is not available (minqkv._ccore could not be imported: "
                           f"{_IMPORT_ERROR}). To get it, {BUILD_HINT}; or use {twin or op + '_numpy'}.")


@functools.cache
def c_function(name, dtype):
    """The C function minqkv_<name>_f32 or minqkv_<name>_f64 for a checked float dtype."""
    return getattr(lib, f"minqkv_{name}_{'f32' if dtype.char == 'f' else 'f64'}")


_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int64): "int64_t"}


def pointer(x):
    """A C pointer to the first element of the array x (NULL for None), valid while x lives.

    cffi takes a contiguous array's memory as it is (from_buffer); a view with gaps, such as the
    heads of a projection the attention kernels read in place, is passed by its address."""
    if x is None:
        return ffi.NULL
    if x.flags.c_contiguous:
        return ffi.from_buffer(_C_TYPES[x.dtype] + "[]", x)
    return ffi.cast(_C_TYPES[x.dtype] + " *", x.ctypes.data)


def contiguous(x):
    """x itself if C can read it as is (C-contiguous, aligned), else an aligned C-order copy."""
    if x.flags.c_contiguous and x.flags.aligned:
        return x
    return np.array(x, order="C", copy=True)


def check_status(op, status):
    """Turn a C status into an error: C refuses only what would take it outside its arrays."""
    if status != lib.MINQKV_OK:
        raise RuntimeError(f"{op}: the C core refused its arguments (status {status}): an id or target "
                           "outside its table (the kernels leave that check to their callers, such as "
                           "ops.py), or else a bug in minqkv.kernels")


# ---- checks at the kernel boundary ----------------------------------------------------------

# the dtypes the C core is compiled for (each kernel template once per dtype, csrc/*_template.h)
KERNEL_DTYPES = _FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def check_float_array(op, name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray of float32 or float64, "
                        f"got {type(x).__name__}")
    if x.dtype is not _FLOAT32 and x.dtype is not _FLOAT64 and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype} but float32 or float64 was expected; "
                        f"minqkv never casts silently, convert it first, e.g. {name}.astype(np.float32)")


def check_same_dtype(op, name_a, a, name_b, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {name_a} is {a.dtype} but {name_b} is {b.dtype}; both must have "
                        f"the same dtype (minqkv never casts silently), convert one with .astype()")


def check_same_shape(op, name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{op}: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
                         "they must be the same")
