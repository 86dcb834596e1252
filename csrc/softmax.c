/* softmax.c: row-wise softmax over the last axis (optionally causal) and its backward pass.
 *
 * Forward, for each row x of length Tk with `visible` leading entries the row may attend to:
 *   m = max(x[:visible]);  e = exp(x[:visible] - m);  y[:visible] = e / sum(e);  y[visible:] = 0
 * Subtracting the row maximum first makes every exponent <= 0, so exp never overflows and the
 * largest term is exactly 1: the stable form of softmax, equal to the naive one in exact math.
 *
 * exp is computed here rather than by the C library so that the loops vectorise: it is a few
 * multiply-adds and integer operations with no branches (exp_f32 and exp_f64, in internal.h).
 */
#include <math.h>

#include "minqkv.h"
#include "internal.h"

/* Below this many elements (~0.3 ms of work on one core) a call runs on one thread. */
#define PARALLEL_MIN_ELEMENTS (1 << 19)

/* softmax_template.h is compiled twice below. SOFTMAX and SOFTMAX_BACKWARD are the names it
 * gives its two API functions (declared in minqkv.h); SUFFIX ends its private helpers. The
 * template #undefs all of these at its end, ready for the next dtype. */

#define REAL float
#define SOFTMAX minqkv_softmax_f32
#define SOFTMAX_BACKWARD minqkv_softmax_backward_f32
#define SUFFIX f32
#define EXP exp_f32
#include "softmax_template.h"

#define REAL double
#define SOFTMAX minqkv_softmax_f64
#define SOFTMAX_BACKWARD minqkv_softmax_backward_f64
#define SUFFIX f64
#define EXP exp_f64
#include "softmax_template.h"
