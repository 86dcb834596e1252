/* softmax_template.h: the softmax kernels of softmax.c, written once for an element type.
 *
 * Not a header of the API. softmax.c includes this file twice, after defining
 *   REAL     the element type (float or double)
 *   SOFTMAX, SOFTMAX_BACKWARD   the API names of the two functions defined here,
 *            e.g. minqkv_softmax_f32 and minqkv_softmax_backward_f32
 *   SUFFIX   f32 or f64, appended to the name of every private helper defined here
 *   EXP      the vectorisable e^t for t <= 0 of that type
 * and #undefs them all at its end.
 */

#define NAME(x) PASTE(x, SUFFIX)

/* One row: x, y (n,), of which the first `visible` entries take part. */
static ALWAYS_INLINE void NAME(softmax_row)(const REAL *x, REAL *y, int64_t visible, int64_t n)
{
    REAL max = -INFINITY;
    int has_nan = 0;
#pragma omp simd reduction(max : max) reduction(| : has_nan)
    for (int64_t j = 0; j < visible; j++) {
        max = x[j] > max ? x[j] : max;
        has_nan |= x[j] != x[j];
    }
    if (has_nan || max == INFINITY) { /* NumPy's formula gives NaN everywhere: so do we */
        for (int64_t j = 0; j < n; j++)
            y[j] = NAN;
        return;
    }
    if (max == -INFINITY) { /* nothing to attend to (all hidden or all -inf): zeros, not 0/0 */
        for (int64_t j = 0; j < n; j++)
            y[j] = 0;
        return;
    }
    REAL sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < visible; j++) {
        REAL e = EXP(x[j] - max);
        y[j] = e;
        sum += e;
    }
    REAL inverse = 1 / sum; /* sum >= 1: the maximum contributes e^0 */
#pragma omp simd
    for (int64_t j = 0; j < visible; j++)
        y[j] *= inverse;
    for (int64_t j = visible; j < n; j++)
        y[j] = 0;
}

/* Rows [row_begin, row_end) of a (batch * Tq, Tk) array. Causal row i of its (Tq, Tk) block
 * sees keys j <= i + (Tk - Tq): `visible` = i + Tk - Tq + 1, clamped to [0, Tk]. */
static HOT_KERNEL void NAME(softmax_rows)(const REAL *x, REAL *y, int64_t row_begin, int64_t row_end,
                                          int64_t Tq, int64_t Tk, int causal)
{
    for (int64_t row = row_begin; row < row_end; row++) {
        int64_t visible = Tk;
        if (causal) {
            visible = row % Tq + Tk - Tq + 1;
            visible = visible < 0 ? 0 : min_i64(visible, Tk);
        }
        NAME(softmax_row)(x + row * Tk, y + row * Tk, visible, Tk);
    }
}

int SOFTMAX(const REAL *x, REAL *y, int64_t batch, int64_t Tq, int64_t Tk, int causal,
            int num_threads)
{
    if (batch < 0 || Tq < 0 || Tk < 0)
        return MINQKV_BAD_ARGUMENT;
    int64_t rows = batch * Tq;
    if (rows == 0 || Tk == 0)
        return MINQKV_OK;
    if (!x || !y)
        return MINQKV_BAD_ARGUMENT;
    int threads = rows * Tk < PARALLEL_MIN_ELEMENTS || num_threads < 1 ? 1 : num_threads;
    if (threads > rows)
        threads = (int)rows;
    if (threads == 1) { /* no OpenMP at all: also safe in a fork()ed child */
        NAME(softmax_rows)(x, y, 0, rows, Tq, Tk, causal);
        return MINQKV_OK;
    }
    /* each thread takes one contiguous band of rows */
#pragma omp parallel num_threads(threads)
    {
        int64_t band = (rows + THREAD_COUNT() - 1) / THREAD_COUNT();
        int64_t begin = min_i64(rows, THREAD_INDEX() * band);
        NAME(softmax_rows)(x, y, begin, min_i64(rows, begin + band), Tq, Tk, causal);
    }
    return MINQKV_OK;
}

/* dx = y * (dy - sum(dy * y)) row by row, for rows [row_begin, row_end) of (rows, n) arrays. */
static HOT_KERNEL void NAME(softmax_backward_rows)(const REAL *y, const REAL *dy, REAL *dx,
                                                   int64_t row_begin, int64_t row_end, int64_t n)
{
    for (int64_t row = row_begin; row < row_end; row++) {
        const REAL *yr = y + row * n, *dyr = dy + row * n;
        REAL *dxr = dx + row * n;
        REAL dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < n; j++)
            dot += dyr[j] * yr[j];
#pragma omp simd
        for (int64_t j = 0; j < n; j++)
            dxr[j] = yr[j] * (dyr[j] - dot);
    }
}

int SOFTMAX_BACKWARD(const REAL *y, const REAL *dy, REAL *dx, int64_t rows, int64_t n, int num_threads)
{
    if (rows < 0 || n < 0)
        return MINQKV_BAD_ARGUMENT;
    if (rows == 0 || n == 0)
        return MINQKV_OK;
    if (!y || !dy || !dx)
        return MINQKV_BAD_ARGUMENT;
    int threads = rows * n < PARALLEL_MIN_ELEMENTS || num_threads < 1 ? 1 : num_threads;
    if (threads > rows)
        threads = (int)rows;
    if (threads == 1) {
        NAME(softmax_backward_rows)(y, dy, dx, 0, rows, n);
        return MINQKV_OK;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t band = (rows + THREAD_COUNT() - 1) / THREAD_COUNT();
        int64_t begin = min_i64(rows, THREAD_INDEX() * band);
        NAME(softmax_backward_rows)(y, dy, dx, begin, min_i64(rows, begin + band), n);
    }
    return MINQKV_OK;
}

#undef NAME
#undef REAL
#undef SOFTMAX
#undef SOFTMAX_BACKWARD
#undef SUFFIX
#undef EXP
