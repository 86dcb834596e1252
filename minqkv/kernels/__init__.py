"""minqkv's kernels: the array computations under the ops, each written twice with the same
signature and meaning, once in a few lines of NumPy (the reference) and once in C (csrc/, through
cffi, the fast one). One module per family, each NumPy reference beside its C binding:

  gemm.py             matmul (and matmul_naive_c, the C core's three plain loops)
  row_softmax.py      softmax, softmax_backward (over the last axis, optionally causal)
  layers.py           gelu, gelu_backward, add, layer_norm, layer_norm_backward, column_sums,
                      cross_entropy, embedding_backward
  fused_attention.py  attention, attention_backward (and attention_naive_c, the C core's
                      row-by-row reference)
  adamw.py            adamw_update (in place)
  runtime.py          the backend and thread switches, the C library, pointers into arrays, and
                      the checks at the kernel boundary

The twins are named <kernel>_numpy and <kernel>_c (matmul_numpy, matmul_c). KERNELS, below, is
the registry backend -> name -> function, and `matmul`, `softmax`, ... call the one the backend
names:

  set_backend("numpy")   # or "c"; the first value comes from $MINQKV_BACKEND (default "c")

If the extension minqkv._ccore was not built (no C compiler at install time), everything runs on
the NumPy twins and a warning says so once.

The kernels take NumPy arrays and check what C relies on (float32 or float64 arrays of one dtype,
shapes that fit together), with a TypeError or ValueError naming the argument; they trust their
callers with values (ops.py checks an eps, the ids of an embedding, the targets of a loss). Arrays
C cannot take as they are (strided, misaligned) are copied, and results are new arrays allocated
here, by NumPy: C-contiguous, except that attention reads strided heads where they lie and stores
its outputs token by token (see fused_attention.py).

Threads: the C kernels use MINQKV_NUM_THREADS threads (default: every core this process may use,
at most MAX_NUM_THREADS); change it with set_num_threads(n). Each call reads the count once, so
Python threads may run kernels while another one changes it. The OpenMP thread pool does not
survive fork(), so a fork()ed child runs the kernels on one thread; workers that should use
threads are started with multiprocessing's 'spawn' method, and processes that run side by side
are best given MINQKV_NUM_THREADS=1 each.
"""

import functools

from . import runtime
from .adamw import adamw_update_c, adamw_update_numpy
from .fused_attention import (attention_backward_c, attention_backward_numpy, attention_c, attention_naive_c,
                              attention_numpy)
from .gemm import matmul_c, matmul_naive_c, matmul_numpy
from .layers import (add_c, add_numpy, column_sums_c, column_sums_numpy, cross_entropy_c, cross_entropy_numpy,
                     embedding_backward_c, embedding_backward_numpy, gelu_backward_c, gelu_backward_numpy, gelu_c,
                     gelu_numpy, layer_norm_backward_c, layer_norm_backward_numpy, layer_norm_c, layer_norm_numpy)
from .row_softmax import softmax_backward_c, softmax_backward_numpy, softmax_c, softmax_numpy
from .runtime import (BACKENDS, HAVE_C, KEEPS_FREED_MEMORY, MAX_NUM_THREADS, MMAP_THRESHOLD_BYTES,
                      TRIM_THRESHOLD_BYTES, get_backend, get_num_threads, set_backend, set_num_threads)

# The registry: backend -> kernel name -> function; both twins of a kernel take the same arguments.
KERNELS = {
    "numpy": {
        "matmul": matmul_numpy,
        "softmax": softmax_numpy,
        "softmax_backward": softmax_backward_numpy,
        "gelu": gelu_numpy,
        "gelu_backward": gelu_backward_numpy,
        "add": add_numpy,
        "layer_norm": layer_norm_numpy,
        "layer_norm_backward": layer_norm_backward_numpy,
        "column_sums": column_sums_numpy,
        "cross_entropy": cross_entropy_numpy,
        "embedding_backward": embedding_backward_numpy,
        "adamw_update": adamw_update_numpy,
        "attention": attention_numpy,
        "attention_backward": attention_backward_numpy,
    },
    "c": {
        "matmul": matmul_c,
        "softmax": softmax_c,
        "softmax_backward": softmax_backward_c,
        "gelu": gelu_c,
        "gelu_backward": gelu_backward_c,
        "add": add_c,
        "layer_norm": layer_norm_c,
        "layer_norm_backward": layer_norm_backward_c,
        "column_sums": column_sums_c,
        "cross_entropy": cross_entropy_c,
        "embedding_backward": embedding_backward_c,
        "adamw_update": adamw_update_c,
        "attention": attention_c,
        "attention_backward": attention_backward_c,
    },
}


def _on_the_backend(name):
    """The kernel `name` as the backend in use runs it: a function that looks the backend up at
    each call, so set_backend takes effect at once. Its help is the NumPy reference's."""
    reference = KERNELS["numpy"][name]

    @functools.wraps(reference)
    def kernel(*args, **kwargs):
        return KERNELS[runtime.get_backend()][name](*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__module__ = __name__
    return kernel


matmul = _on_the_backend("matmul")
softmax = _on_the_backend("softmax")
softmax_backward = _on_the_backend("softmax_backward")
gelu = _on_the_backend("gelu")
gelu_backward = _on_the_backend("gelu_backward")
add = _on_the_backend("add")
layer_norm = _on_the_backend("layer_norm")
layer_norm_backward = _on_the_backend("layer_norm_backward")
column_sums = _on_the_backend("column_sums")
cross_entropy = _on_the_backend("cross_entropy")
embedding_backward = _on_the_backend("embedding_backward")
adamw_update = _on_the_backend("adamw_update")
attention = _on_the_backend("attention")
attention_backward = _on_the_backend("attention_backward")
