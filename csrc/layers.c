/* layers.c: the elementwise and row-wise layers of the GPT around its GEMMs, forward and backward:
 *   GELU (tanh approximation, as GPT-2), the sum of two arrays (the residual stream), the column
 *   sums of a Linear's bias gradient, layer norm over the last axis, cross-entropy of integer
 *   targets under a softmax of the logits (loss and gradient from one pass over a row), and the
 *   backward pass of an embedding (the gradient's rows summed by id).
 *
 * Each one is a plain loop over elements or rows, so it is its own readable reference (and
 * minqkv/kernels/layers.py holds the NumPy twin of each). What makes them faster than the NumPy
 * formulas is only that every value is read and written once, with no temporary arrays, and
 * that large calls share their rows (or elements) between OpenMP threads.
 */
#include <math.h>

#include "minqkv.h"
#include "internal.h"

/* Below this many elements (~0.1 ms of work on one core) a call runs on one thread. */
#define PARALLEL_MIN_ELEMENTS (1 << 16)

/* How many threads a call over `elements` values may start. */
static int layer_threads(int64_t elements, int num_threads)
{
    return threads_for_work((double)elements, PARALLEL_MIN_ELEMENTS, num_threads);
}

/* Column sums over many rows (layer norm's dweight and dbias, a Linear's bias gradient) add the
 * rows in fixed chunks of ROW_CHUNK, each chunk into its own slice of a workspace, then the
 * chunks' sums in order. Threads share the chunks, so every thread is busy even when there are
 * few columns (a split by columns gave layer norm's 128 only 4 threads' worth of work), and the
 * result does not depend on how many threads there were. */
#define ROW_CHUNK 64

int64_t minqkv_row_chunks(int64_t rows)
{
    return rows <= 0 ? 0 : (rows + ROW_CHUNK - 1) / ROW_CHUNK;
}

/* layers_template.h is compiled twice below, once per element type; it #undefs its macros. */

#define REAL float
#define SUFFIX f32
#define EXP exp_f32
#define LOG logf
#define SQRT sqrtf
#include "layers_template.h"

#define REAL double
#define SUFFIX f64
#define EXP exp_f64
#define LOG log
#define SQRT sqrt
#include "layers_template.h"
