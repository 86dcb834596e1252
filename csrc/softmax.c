/* softmax.c: row-wise softmax over the last axis (optionally causal) and its backward pass.
 *
 * Forward, for each row x of length Tk with `visible` leading entries the row may attend to:
 *   m = max(x[:visible]);  e = exp(x[:visible] - m);  y[:visible] = e / sum(e);  y[visible:] = 0
 * Subtracting the row maximum first makes every exponent <= 0, so exp never overflows and the
 * largest term is exactly 1: the stable form of softmax, equal to the naive one in exact math.
 *
 * exp is computed here rather than by the C library so that the loops vectorise: it is a few
 * multiply-adds and integer operations with no branches (see exp_f32 below).
 */
#include <math.h>

#include "minqkv.h"
#include "internal.h"

/* Below this many elements (~0.3 ms of work on one core) a call runs on one thread. */
#define PARALLEL_MIN_ELEMENTS (1 << 19)

/* e^t for t <= 0, float. Write t = n ln2 + r with n an integer and |r| <= ln2/2; then
 * e^t = 2^n e^r. 2^n is built directly in the exponent bits, e^r is a degree-7 Taylor
 * polynomial (truncation error below 1e-8 on that interval). Inputs below -87 return 0
 * (the true value is under 2e-38, far below what a softmax row can show next to its maximum
 * of 1). NaN inputs never get here: softmax_row deals with NaN rows first. */
static ALWAYS_INLINE float exp_f32(float t)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float clamped = t < -87.0f ? -87.0f : t;
    float shifted = clamped * 1.44269504f + magic; /* n + magic; n = round(t / ln2) */
    float n = shifted - magic;
    float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 split in two parts */
    float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t shifted_bits, n_int, scale_bits;
    int32_t magic_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    n_int = shifted_bits - magic_bits;             /* n, read off the low mantissa bits */
    scale_bits = (int32_t)((uint32_t)(n_int + 127) << 23); /* the float 2^n */
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return t < -87.0f ? 0.0f : p * scale;
}

/* e^t for t <= 0, double: the same scheme, degree-13 polynomial, flush below -708. */
static ALWAYS_INLINE double exp_f64(double t)
{
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double clamped = t < -708.0 ? -708.0 : t;
    double shifted = clamped * 1.4426950408889634 + magic;
    double n = shifted - magic;
    double r = (clamped - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0; /* 1/13! */
    const double inverse_factorials[13] = {
        1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
        1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0, 1.0};
    for (int k = 0; k < 13; k++)
        p = p * r + inverse_factorials[k];
    int64_t shifted_bits, magic_bits, scale_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    scale_bits = (int64_t)((uint64_t)(shifted_bits - magic_bits + 1023) << 52);
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return t < -708.0 ? 0.0 : p * scale;
}

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
