/* layers_template.h: the kernels of layers.c, written once for an element type.
 *
 * Not a header of the API. layers.c includes this file twice, after defining
 *   REAL      the element type (float or double)
 *   SUFFIX    f32 or f64, appended to every name defined here (API names included)
 *   EXP       the vectorisable e^t for t <= 0 of that type (internal.h)
 *   LOG, SQRT the C library's log and sqrt of that type
 * and #undefs them all at its end.
 */

#define NAME(x) PASTE(x, SUFFIX)

/* ---- GELU ---- */

#define GELU_C ((REAL)0.7978845608028654) /* sqrt(2 / pi) */
#define GELU_A ((REAL)0.044715)

/* tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: never overflows, vectorises. */
static ALWAYS_INLINE REAL NAME(tanh)(REAL u)
{
    REAL e = EXP(-2 * (u < 0 ? -u : u));
    REAL t = (1 - e) / (1 + e);
    return u < 0 ? -t : t;
}

/* The loops of GELU over one span of elements, each its own thread's share. */
static HOT_KERNEL void NAME(gelu_span)(const REAL *x, REAL *y, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        REAL xi = x[i];
        REAL t = NAME(tanh)(GELU_C * xi * (1 + GELU_A * xi * xi));
        y[i] = (REAL)0.5 * xi * (1 + t);
    }
}

static HOT_KERNEL void NAME(gelu_backward_span)(const REAL *x, const REAL *dy, REAL *dx, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        REAL xi = x[i], x2 = xi * xi;
        REAL t = NAME(tanh)(GELU_C * xi * (1 + GELU_A * x2));
        REAL d_inner = GELU_C * (1 + 3 * GELU_A * x2);
        dx[i] = dy[i] * ((REAL)0.5 * (1 + t) + (REAL)0.5 * xi * (1 - t * t) * d_inner);
    }
}

/* x, y: (n,). y = 0.5 x (1 + tanh(c (x + a x^3))); y may be x. Threads take equal spans. */
int NAME(minqkv_gelu)(const REAL *x, REAL *y, int64_t n, int num_threads)
{
    if (n < 0 || (n > 0 && (!x || !y)))
        return MINQKV_BAD_ARGUMENT;
    int threads = layer_threads(n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t start, end;
        thread_span(n, t, threads, &start, &end);
        NAME(gelu_span)(x + start, y + start, end - start);
    }
    return MINQKV_OK;
}

/* x, dy, dx: (n,). dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)); dx may be dy. */
int NAME(minqkv_gelu_backward)(const REAL *x, const REAL *dy, REAL *dx, int64_t n, int num_threads)
{
    if (n < 0 || (n > 0 && (!x || !dy || !dx)))
        return MINQKV_BAD_ARGUMENT;
    int threads = layer_threads(n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t start, end;
        thread_span(n, t, threads, &start, &end);
        NAME(gelu_backward_span)(x + start, dy + start, dx + start, end - start);
    }
    return MINQKV_OK;
}

#undef GELU_C
#undef GELU_A

/* ---- The sum of two arrays: where the residual stream and its gradients meet ---- */

static HOT_KERNEL void NAME(add_span)(const REAL *a, const REAL *b, REAL *out, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

/* a, b, out: (n,). out = a + b; out may be a or b. Threads take equal spans. */
int NAME(minqkv_add)(const REAL *a, const REAL *b, REAL *out, int64_t n, int num_threads)
{
    if (n < 0 || (n > 0 && (!a || !b || !out)))
        return MINQKV_BAD_ARGUMENT;
    int threads = layer_threads(n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t start, end;
        thread_span(n, t, threads, &start, &end);
        NAME(add_span)(a + start, b + start, out + start, end - start);
    }
    return MINQKV_OK;
}

/* ---- Column sums: a Linear's bias gradient (and, chunk by chunk, layer norm's below) ---- */

/* out[c] = the sum over chunks k of partials[k * stride + c], c in [0, width): the chunks' column
 * sums added in chunk order (see ROW_CHUNK in layers.c). On one thread: chunks x width additions,
 * a few microseconds at the model's sizes. */
static HOT_KERNEL void NAME(add_chunks)(const REAL *partials, int64_t chunks, int64_t stride,
                                        int64_t width, REAL *out)
{
    for (int64_t c = 0; c < width; c++)
        out[c] = 0;
    for (int64_t k = 0; k < chunks; k++)
#pragma omp simd
        for (int64_t c = 0; c < width; c++)
            out[c] += partials[k * stride + c];
}

/* sums[c] = sum over rows [r0, r1) of x[r][c]: one chunk, added row by row (contiguous rows). */
static HOT_KERNEL void NAME(column_sums_chunk)(const REAL *x, int64_t r0, int64_t r1, int64_t cols,
                                               REAL *sums)
{
    for (int64_t c = 0; c < cols; c++)
        sums[c] = 0;
    for (int64_t r = r0; r < r1; r++)
#pragma omp simd
        for (int64_t c = 0; c < cols; c++)
            sums[c] += x[r * cols + c];
}

/* x: (rows, cols), contiguous; out: (cols,) = the sum of x's rows. Threads share the chunks of
 * ROW_CHUNK rows, each summed into its own slice of the workspace (cols values per chunk,
 * minqkv_row_chunks(rows) chunks), then the chunks are added in order: same bits on any thread
 * count. */
int NAME(minqkv_column_sums)(const REAL *x, int64_t rows, int64_t cols, REAL *out, REAL *workspace,
                             int num_threads)
{
    if (rows < 0 || cols < 0 || (cols > 0 && !out))
        return MINQKV_BAD_ARGUMENT;
    if (rows > 0 && cols > 0 && (!x || !workspace))
        return MINQKV_BAD_ARGUMENT;
    if (cols == 0)
        return MINQKV_OK;
    int64_t chunks = minqkv_row_chunks(rows);
    int threads = layer_threads(rows * cols, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < chunks; k++)
        NAME(column_sums_chunk)(x, k * ROW_CHUNK, min_i64(rows, (k + 1) * ROW_CHUNK), cols,
                                workspace + k * cols);
    NAME(add_chunks)(workspace, chunks, cols, cols, out);
    return MINQKV_OK;
}

/* ---- Layer norm ---- */

/* Rows r0..r1 of the layer norm below (one thread's share). */
static HOT_KERNEL void NAME(layer_norm_rows)(const REAL *x, const REAL *weight, const REAL *bias,
                                             REAL *y, REAL *mean, REAL *rstd, int64_t r0, int64_t r1,
                                             int64_t C, REAL eps)
{
    for (int64_t r = r0; r < r1; r++) {
        const REAL *xr = x + r * C;
        REAL *yr = y + r * C;
        REAL sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; c++)
            sum += xr[c];
        REAL mu = sum / (REAL)C;
        REAL squares = 0;
#pragma omp simd reduction(+ : squares)
        for (int64_t c = 0; c < C; c++)
            squares += (xr[c] - mu) * (xr[c] - mu);
        REAL s = 1 / SQRT(squares / (REAL)C + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            yr[c] = (xr[c] - mu) * s * weight[c] + (bias ? bias[c] : 0);
        mean[r] = mu;
        rstd[r] = s;
    }
}

/* x, y: (rows, C); weight, bias: (C,), bias may be NULL; mean, rstd: (rows,).
 * Per row: mean = sum(x) / C, rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),
 *          y = (x - mean) * rstd * weight + bias. Two passes over the row: the variance of the
 * centred values, not E[x^2] - mean^2, which loses every digit when |mean| >> std. */
int NAME(minqkv_layer_norm)(const REAL *x, const REAL *weight, const REAL *bias, REAL *y,
                            REAL *mean, REAL *rstd, int64_t rows, int64_t C, double eps,
                            int num_threads)
{
    if (rows < 0 || C < 1)
        return MINQKV_BAD_ARGUMENT;
    if (rows > 0 && (!x || !weight || !y || !mean || !rstd))
        return MINQKV_BAD_ARGUMENT;
    int threads = layer_threads(rows * C, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t r0, r1;
        thread_span(rows, t, threads, &r0, &r1);
        NAME(layer_norm_rows)(x, weight, bias, y, mean, rstd, r0, r1, C, (REAL)eps);
    }
    return MINQKV_OK;
}

/* Rows [r0, r1) of the layer norm backward below, one chunk of ROW_CHUNK rows: dx row by row,
 * and the chunk's own column sums of dy * xhat and dy into weight_sums and bias_sums (C each). */
static HOT_KERNEL void NAME(layer_norm_backward_chunk)(const REAL *x, const REAL *weight,
                                                       const REAL *mean, const REAL *rstd,
                                                       const REAL *dy, REAL *dx, int64_t r0,
                                                       int64_t r1, int64_t C, REAL *weight_sums,
                                                       REAL *bias_sums)
{
    for (int64_t c = 0; c < C; c++)
        weight_sums[c] = bias_sums[c] = 0;
    for (int64_t r = r0; r < r1; r++) {
        const REAL *xr = x + r * C, *dyr = dy + r * C;
        REAL *dxr = dx + r * C;
        REAL mu = mean[r], s = rstd[r];
        REAL dxhat_sum = 0, dxhat_xhat_sum = 0;
#pragma omp simd reduction(+ : dxhat_sum, dxhat_xhat_sum)
        for (int64_t c = 0; c < C; c++) {
            REAL dxhat = dyr[c] * weight[c];
            dxhat_sum += dxhat;
            dxhat_xhat_sum += dxhat * (xr[c] - mu) * s;
        }
        REAL dxhat_mean = dxhat_sum / (REAL)C, dxhat_xhat_mean = dxhat_xhat_sum / (REAL)C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            REAL xhat = (xr[c] - mu) * s;
            dxr[c] = s * (dyr[c] * weight[c] - dxhat_mean - xhat * dxhat_xhat_mean);
            weight_sums[c] += dyr[c] * xhat;
            bias_sums[c] += dyr[c];
        }
    }
}

/* x, dy, dx: (rows, C); weight: (C,); mean, rstd: (rows,) from the forward pass;
 * dweight, dbias: (C,), overwritten (dbias may be NULL). With xhat = (x - mean) * rstd:
 *   dxhat = dy * weight
 *   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))      (per row)
 *   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
 * One pass over x and dy: threads share the chunks of ROW_CHUNK rows, each chunk writes dx and
 * its own sums into the workspace (2 C values per chunk, minqkv_row_chunks(rows) chunks), then
 * the chunks' sums are added in order (add_chunks), so dweight is the same on any thread count. */
int NAME(minqkv_layer_norm_backward)(const REAL *x, const REAL *weight, const REAL *mean,
                                     const REAL *rstd, const REAL *dy, REAL *dx, REAL *dweight,
                                     REAL *dbias, REAL *workspace, int64_t rows, int64_t C,
                                     int num_threads)
{
    if (rows < 0 || C < 1 || !weight || !dweight)
        return MINQKV_BAD_ARGUMENT;
    if (rows > 0 && (!x || !mean || !rstd || !dy || !dx || !workspace))
        return MINQKV_BAD_ARGUMENT;
    int64_t chunks = minqkv_row_chunks(rows);
    int threads = layer_threads(rows * C, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < chunks; k++)
        NAME(layer_norm_backward_chunk)(x, weight, mean, rstd, dy, dx, k * ROW_CHUNK,
                                        min_i64(rows, (k + 1) * ROW_CHUNK), C,
                                        workspace + k * 2 * C, workspace + k * 2 * C + C);
    NAME(add_chunks)(workspace, chunks, 2 * C, C, dweight);
    if (dbias)
        NAME(add_chunks)(workspace + C, chunks, 2 * C, C, dbias);
    return MINQKV_OK;
}

/* ---- Cross-entropy with its softmax ---- */

/* logits, dlogits: (rows, V); targets, losses: (rows,).
 * For a row whose target t is not ignore_index (it must lie in [0, V)):
 *   losses[r] = logsumexp(logits[r]) - logits[r][t]          (= -log softmax(logits[r])[t])
 *   dlogits[r] = (softmax(logits[r]) - onehot(t)) * scale
 * and for an ignored row losses[r] = 0, dlogits[r] = 0. dlogits may be NULL (no gradient
 * wanted). A target outside [0, V) that is not ignore_index is refused before anything runs.
 * cross_entropy_rows computes rows [r0, r1), one thread's share, once the targets are checked. */
static HOT_KERNEL void NAME(cross_entropy_rows)(const REAL *logits, const int64_t *targets,
                                                int64_t ignore_index, REAL *losses, REAL *dlogits,
                                                REAL scale, int64_t r0, int64_t r1, int64_t V)
{
    for (int64_t r = r0; r < r1; r++) {
        const REAL *z = logits + r * V;
        REAL *dz = dlogits ? dlogits + r * V : NULL;
        int64_t t = targets[r];
        if (t == ignore_index) {
            losses[r] = 0;
            if (dz)
                for (int64_t j = 0; j < V; j++)
                    dz[j] = 0;
            continue;
        }
        REAL max = z[0];
#pragma omp simd reduction(max : max)
        for (int64_t j = 1; j < V; j++)
            max = z[j] > max ? z[j] : max;
        REAL sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < V; j++)
            sum += EXP(z[j] - max);
        losses[r] = LOG(sum) - (z[t] - max);
        if (dz) {
            REAL inverse_sum = 1 / sum;
#pragma omp simd
            for (int64_t j = 0; j < V; j++)
                dz[j] = EXP(z[j] - max) * inverse_sum * scale;
            dz[t] -= scale;
        }
    }
}

int NAME(minqkv_cross_entropy)(const REAL *logits, const int64_t *targets, int64_t ignore_index,
                               REAL *losses, REAL *dlogits, double scale, int64_t rows,
                               int64_t V, int num_threads)
{
    if (rows < 0 || V < 1 || (rows > 0 && (!logits || !targets || !losses)))
        return MINQKV_BAD_ARGUMENT;
    for (int64_t r = 0; r < rows; r++)
        if (targets[r] != ignore_index && (targets[r] < 0 || targets[r] >= V))
            return MINQKV_BAD_ARGUMENT;
    int threads = layer_threads(rows * V, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t r0, r1;
        thread_span(rows, t, threads, &r0, &r1);
        NAME(cross_entropy_rows)(logits, targets, ignore_index, losses, dlogits, (REAL)scale, r0, r1, V);
    }
    return MINQKV_OK;
}

/* ---- Embedding backward: a gradient's rows summed by id ---- */

/* out zeroed, then each position's row added to its id's row, in position order. */
static HOT_KERNEL void NAME(embedding_backward_rows)(const int64_t *ids, const REAL *rows, REAL *out,
                                                     int64_t P, int64_t C, int64_t n)
{
    for (int64_t i = 0; i < n * C; i++)
        out[i] = 0;
    for (int64_t p = 0; p < P; p++) {
        REAL *sum = out + ids[p] * C;
        const REAL *row = rows + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            sum[c] += row[c];
    }
}

/* ids: (P,), each in [0, n) (else the call is refused); rows: (P, C); out: (n, C), overwritten:
 *   out[i] = sum of rows[p] over the positions p with ids[p] == i, added in the order of p.
 * One thread: the loop only streams rows through memory, and a second thread taking half of each
 * row's columns was measured slower (768 x 128 rows: 27 us on one thread, 42 on two). */
int NAME(minqkv_embedding_backward)(const int64_t *ids, const REAL *rows, REAL *out, int64_t P,
                                    int64_t C, int64_t n)
{
    if (P < 0 || C < 1 || n < 0 || (n > 0 && !out) || (P > 0 && (!ids || !rows)))
        return MINQKV_BAD_ARGUMENT;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= n)
            return MINQKV_BAD_ARGUMENT;
    NAME(embedding_backward_rows)(ids, rows, out, P, C, n);
    return MINQKV_OK;
}

#undef NAME
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG
#undef SQRT
