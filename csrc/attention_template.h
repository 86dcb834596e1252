/* attention_template.h: the fused attention of attention.c, written once for an element type.
 *
 * Not a header of the API. attention.c includes this file twice, after defining REAL (the
 * element type), SUFFIX (f32 or f64, appended to every name defined here), EXP (the
 * vectorisable e^t for t <= 0) and LOG; it #undefs them at its end.
 */

#define NAME(x) PASTE(x, SUFFIX)

static ALWAYS_INLINE REAL NAME(dot)(const REAL *a, const REAL *b, int64_t n)
{
    REAL sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

/* One head, rows [i0, i1) of its queries: q, y (T, hd); k, v (Tk, hd); bias (T, Tk) or NULL;
 * lse (T,). Row i sees keys 0 .. i + Tk - T.
 *
 * Loop order, per block of keys [j0, j1): first the scores of every row of the block against
 * every key of it, as outer products: a chunk of the key block is copied transposed into
 * key_columns (head dimension by key), so that for each q[i][d] the inner loop runs along
 * contiguous keys (vector registers hold consecutive keys, no horizontal sums). Then, row by
 * row, the online softmax update and the weighted sum of the block's values into y[i]. */
static HOT_KERNEL void NAME(attention_rows)(const REAL *q, const REAL *k, const REAL *v,
                                            const REAL *bias, REAL *y, REAL *lse, int64_t i0,
                                            int64_t i1, int64_t T, int64_t Tk, int64_t hd, REAL scale)
{
    REAL scores[QUERY_BLOCK][KEY_BLOCK];
    REAL key_columns[HEAD_CHUNK][KEY_BLOCK];
    REAL row_max[QUERY_BLOCK], row_sum[QUERY_BLOCK];
    int64_t rows = i1 - i0;
    for (int64_t r = 0; r < rows; r++) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0;
        for (int64_t d = 0; d < hd; d++)
            y[(i0 + r) * hd + d] = 0;
    }
    int64_t last_visible = i1 - 1 + Tk - T; /* the last key the block's last row sees */
    for (int64_t j0 = 0; j0 <= last_visible; j0 += KEY_BLOCK) {
        int64_t width = min_i64(KEY_BLOCK, last_visible + 1 - j0); /* keys [j0, j0 + width) */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t jj = 0; jj < width; jj++)
                scores[r][jj] = 0;
        for (int64_t d0 = 0; d0 < hd; d0 += HEAD_CHUNK) {
            int64_t chunk = min_i64(HEAD_CHUNK, hd - d0);
            for (int64_t jj = 0; jj < width; jj++)
                for (int64_t d = 0; d < chunk; d++)
                    key_columns[d][jj] = k[(j0 + jj) * hd + d0 + d];
            for (int64_t r = 0; r < rows; r++) {
                const REAL *qi = q + (i0 + r) * hd + d0;
                for (int64_t d = 0; d < chunk; d++) {
                    REAL q_id = qi[d];
#pragma omp simd
                    for (int64_t jj = 0; jj < width; jj++)
                        scores[r][jj] += q_id * key_columns[d][jj];
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            int64_t i = i0 + r, visible = min_i64(width, i + Tk - T + 1 - j0); /* keys j0 .. j0 + visible - 1 */
            if (visible <= 0)
                continue;
            REAL block_max = -INFINITY;
            for (int64_t jj = 0; jj < visible; jj++) {
                REAL s = scores[r][jj] * scale + (bias ? bias[i * Tk + j0 + jj] : 0);
                scores[r][jj] = s;
                block_max = s > block_max ? s : block_max;
            }
            REAL new_max = block_max > row_max[r] ? block_max : row_max[r];
            REAL *yi = y + i * hd;
            if (new_max > row_max[r] && row_max[r] > -INFINITY) { /* rescale what was summed so far */
                REAL shrink = EXP(row_max[r] - new_max);
                row_sum[r] *= shrink;
                for (int64_t d = 0; d < hd; d++)
                    yi[d] *= shrink;
            }
            row_max[r] = new_max;
            REAL block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
            for (int64_t jj = 0; jj < visible; jj++) { /* scores become probabilities (unnormalised) */
                REAL p = EXP(scores[r][jj] - new_max);
                scores[r][jj] = p;
                block_sum += p;
            }
            row_sum[r] += block_sum;
            for (int64_t jj = 0; jj < visible; jj++) {
                REAL p = scores[r][jj];
                const REAL *vj = v + (j0 + jj) * hd;
#pragma omp simd
                for (int64_t d = 0; d < hd; d++)
                    yi[d] += p * vj[d];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        REAL *yi = y + (i0 + r) * hd, inverse = 1 / row_sum[r];
        for (int64_t d = 0; d < hd; d++)
            yi[d] *= inverse;
        lse[i0 + r] = row_max[r] + LOG(row_sum[r]);
    }
}

int NAME(minqkv_attention)(const REAL *q, const REAL *k, const REAL *v, const REAL *bias, REAL *y,
                           REAL *lse, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk,
                           int64_t hd, double scale, int num_threads)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd) || (B * T > 0 && !lse))
        return MINQKV_BAD_ARGUMENT;
    int64_t group = H / Hkv;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) \
    num_threads(attention_threads(B, H, T, Tk, hd, num_threads))
    for (int64_t z = 0; z < B * H; z++) {
        for (int64_t i0 = 0; i0 < T; i0 += QUERY_BLOCK) {
            int64_t b = z / H, h = z % H, kv = b * Hkv + h / group;
            NAME(attention_rows)(q + z * T * hd, k + kv * Tk * hd, v + kv * Tk * hd,
                                 bias ? bias + h * T * Tk : NULL, y + z * T * hd, lse + z * T,
                                 i0, min_i64(i0 + QUERY_BLOCK, T), T, Tk, hd, (REAL)scale);
        }
    }
    return MINQKV_OK;
}

/* The backward pass of one key/value head of one batch row, over the G query heads of its group.
 * For query i and visible key j, recomputed from the saved lse:
 *   p = e^(s - lse_i), dp = dy_i . v_j, ds = p (dp - D_i) with D_i = dy_i . y_i
 *   dv_j += p dy_i;  dk_j += scale ds q_i;  dq_i += scale ds k_j;  dbias[h, i, j] += ds
 * This call owns dk and dv of its head, dq of its query heads, and adds into their dbias rows. */
static HOT_KERNEL void NAME(attention_backward_head)(const REAL *q, const REAL *k, const REAL *v,
                                          const REAL *bias, const REAL *y, const REAL *lse,
                                          const REAL *dy, REAL *dq, REAL *dk, REAL *dv,
                                          REAL *dbias, int64_t group, int64_t T, int64_t Tk,
                                          int64_t hd, REAL scale)
{
    for (int64_t g = 0; g < group; g++) {
        const REAL *qg = q + g * T * hd, *yg = y + g * T * hd, *dyg = dy + g * T * hd;
        const REAL *bias_g = bias ? bias + g * T * Tk : NULL;
        REAL *dqg = dq + g * T * hd, *dbias_g = dbias ? dbias + g * T * Tk : NULL;
        for (int64_t i = 0; i < T; i++) {
            const REAL *qi = qg + i * hd, *dyi = dyg + i * hd;
            REAL *dqi = dqg + i * hd;
            REAL D = NAME(dot)(dyi, yg + i * hd, hd), row_lse = lse[g * T + i];
            for (int64_t j = 0; j <= i + Tk - T; j++) {
                const REAL *kj = k + j * hd, *vj = v + j * hd;
                REAL s = NAME(dot)(qi, kj, hd) * scale + (bias_g ? bias_g[i * Tk + j] : 0);
                REAL p = EXP(s - row_lse);
                REAL ds = p * (NAME(dot)(dyi, vj, hd) - D);
                REAL *dkj = dk + j * hd, *dvj = dv + j * hd;
#pragma omp simd
                for (int64_t d = 0; d < hd; d++) {
                    dvj[d] += p * dyi[d];
                    dkj[d] += scale * ds * qi[d];
                    dqi[d] += scale * ds * kj[d];
                }
                if (dbias_g)
                    dbias_g[i * Tk + j] += ds;
            }
        }
    }
}

int NAME(minqkv_attention_backward)(const REAL *q, const REAL *k, const REAL *v, const REAL *bias,
                                    const REAL *y, const REAL *lse, const REAL *dy, REAL *dq,
                                    REAL *dk, REAL *dv, REAL *dbias, int64_t B, int64_t H,
                                    int64_t Hkv, int64_t T, int64_t Tk, int64_t hd, double scale,
                                    int num_threads)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd))
        return MINQKV_BAD_ARGUMENT;
    if (B * T > 0 && (!lse || !dy || !dq || !dk || !dv || (dbias && !bias)))
        return MINQKV_BAD_ARGUMENT;
    int64_t group = H / Hkv;
    for (int64_t e = 0; e < B * H * T * hd; e++)
        dq[e] = 0;
    for (int64_t e = 0; e < B * Hkv * Tk * hd; e++) {
        dk[e] = 0;
        dv[e] = 0;
    }
    if (dbias)
        for (int64_t e = 0; e < H * T * Tk; e++)
            dbias[e] = 0;
    int threads = attention_threads(B, H, T, Tk, hd, num_threads);
    /* with dbias, every batch row adds into the same dbias[h]: a thread takes one key/value head
     * for all batch rows; without it, any (batch row, head) pair */
    int64_t units = dbias ? Hkv : B * Hkv;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < units; unit++) {
        int64_t b0 = dbias ? 0 : unit / Hkv, b1 = dbias ? B : b0 + 1, kv = unit % Hkv;
        for (int64_t b = b0; b < b1; b++) {
            int64_t z = b * H + kv * group, zkv = b * Hkv + kv; /* first query head of the group */
            NAME(attention_backward_head)(q + z * T * hd, k + zkv * Tk * hd, v + zkv * Tk * hd,
                                          bias ? bias + kv * group * T * Tk : NULL, y + z * T * hd,
                                          lse + z * T, dy + z * T * hd, dq + z * T * hd,
                                          dk + zkv * Tk * hd, dv + zkv * Tk * hd,
                                          dbias ? dbias + kv * group * T * Tk : NULL, group, T, Tk,
                                          hd, (REAL)scale);
        }
    }
    return MINQKV_OK;
}

#undef NAME
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG
