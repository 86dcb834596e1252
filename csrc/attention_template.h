/* attention_template.h: the fused attention of attention.c, written once for an element type.
 *
 * Not a header of the API. attention.c includes this file twice, after defining REAL (the
 * element type), SUFFIX (f32 or f64, appended to every name defined here), EXP (the
 * vectorisable e^t for t <= 0) and LOG; it #undefs them at its end.
 */

#define NAME(x) PASTE(x, SUFFIX)
#define REGISTER_COLS (64 / (int64_t)sizeof(REAL)) /* one 64-byte line of a register tile's row */

static ALWAYS_INLINE REAL NAME(dot)(const REAL *a, const REAL *b, int64_t n)
{
    REAL sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

/* C (rows, cols) += A (rows, depth) @ B (depth, cols), the product the tiled passes are made of.
 * Element (r, p) of A is A[r * a_row + p * a_col], so A is read as it is or transposed; B and C
 * are row-major with rows of ldb and ldc elements. rows is a multiple of REGISTER_ROWS and cols
 * of REGISTER_COLS (the callers pad with zeros). Loop order as in the GEMM's micro-kernel: a
 * REGISTER_ROWS x REGISTER_COLS block of C stays in registers over the whole depth; per step, one
 * row of B is loaded and each of the REGISTER_ROWS values of A is broadcast into it. */
static ALWAYS_INLINE void NAME(tile_product)(int64_t rows, int64_t cols, int64_t depth,
                                             const REAL *A, int64_t a_row, int64_t a_col,
                                             const REAL *restrict B, int64_t ldb, REAL *restrict C,
                                             int64_t ldc)
{
    for (int64_t r0 = 0; r0 < rows; r0 += REGISTER_ROWS) {
        for (int64_t c0 = 0; c0 < cols; c0 += REGISTER_COLS) {
            REAL tile[REGISTER_ROWS][REGISTER_COLS] = {{0}};
            for (int64_t p = 0; p < depth; p++) {
                const REAL *b = B + p * ldb + c0;
                for (int r = 0; r < REGISTER_ROWS; r++) {
                    REAL a = A[(r0 + r) * a_row + p * a_col];
#pragma omp simd
                    for (int c = 0; c < REGISTER_COLS; c++)
                        tile[r][c] += a * b[c];
                }
            }
            for (int r = 0; r < REGISTER_ROWS; r++)
                for (int c = 0; c < REGISTER_COLS; c++)
                    C[(r0 + r) * ldc + c0 + c] += tile[r][c];
        }
    }
}

/* Copy rows [0, rows) of x (rows of hd) into a tile of padded_rows x padded_hd, zeros around. */
static ALWAYS_INLINE void NAME(copy_padded)(const REAL *x, int64_t rows, int64_t hd, REAL *tile,
                                            int64_t padded_rows, int64_t padded_hd)
{
    for (int64_t r = 0; r < padded_rows; r++)
        for (int64_t d = 0; d < padded_hd; d++)
            tile[r * padded_hd + d] = r < rows && d < hd ? x[r * hd + d] : 0;
}

/* Copy rows [0, width) of x (rows of hd) transposed: tile[d][jj] = x[jj][d], KEY_TILE
 * columns, zeros past width. */
static ALWAYS_INLINE void NAME(copy_transposed)(const REAL *x, int64_t width, int64_t hd, REAL *tile)
{
    for (int64_t d = 0; d < hd; d++)
        for (int64_t jj = 0; jj < KEY_TILE; jj++)
            tile[d * KEY_TILE + jj] = jj < width ? x[jj * hd + d] : 0;
}

/* One head, rows [i0, i1) of its queries: q, y (T, hd); k, v (Tk, hd); bias (T, Tk) or NULL;
 * lse (T,). Row i sees keys 0 .. i + Tk - T. The readable forward pass (attention_tiles below is
 * the fast one), and the one heads wider than TILED_MAX_HEAD_DIM take.
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

/* The tiles one thread works on in attention_tiles, on its stack (56 KB for float, 112 for double). */
struct NAME(forward_tiles) {
    REAL key_columns[TILED_MAX_HEAD_DIM * KEY_TILE]; /* K^T of the key tile (hd, KT) */
    REAL values[KEY_TILE * TILED_MAX_HEAD_DIM];      /* V of the key tile (KT, hdp) */
    REAL queries[QUERY_TILE * TILED_MAX_HEAD_DIM];   /* Q of the query tile (QT, hdp) */
    REAL output[QUERY_TILE * TILED_MAX_HEAD_DIM];    /* sum of e^(s - m) v so far (QT, hdp) */
    REAL probs[QUERY_TILE * KEY_TILE];               /* S, then e^(s - m) (QT, KT) */
    REAL row_max[QUERY_TILE], row_sum[QUERY_TILE];   /* m and l of each query */
};

/* The online softmax step of a tile, row by row, in place: the scores S of queries i0 + r and
 * keys j0 + jj become e^(scale S + bias - m') with m' the new running maximum (0 on hidden
 * pairs and padding rows), and what the row summed so far is rescaled by e^(m - m'). */
static ALWAYS_INLINE void NAME(online_softmax_tile)(struct NAME(forward_tiles) *t, const REAL *bias,
                                                    int64_t i0, int64_t rows, int64_t padded_rows,
                                                    int64_t j0, int64_t width, int64_t T, int64_t Tk,
                                                    int64_t hdp, REAL scale)
{
    for (int64_t r = 0; r < padded_rows; r++) {
        int64_t i = i0 + r;
        int64_t visible = r < rows ? min_i64(width, i + Tk - T + 1 - j0) : 0; /* keys j0 .. j0 + visible - 1 */
        REAL *p = t->probs + r * KEY_TILE;
        if (visible > 0) {
            const REAL *bias_row = bias ? bias + i * Tk + j0 : NULL;
            REAL block_max = -INFINITY;
            for (int64_t jj = 0; jj < visible; jj++) {
                p[jj] = p[jj] * scale + (bias_row ? bias_row[jj] : 0);
                block_max = p[jj] > block_max ? p[jj] : block_max;
            }
            REAL old_max = t->row_max[r], new_max = block_max > old_max ? block_max : old_max;
            if (new_max > old_max && old_max > -INFINITY) {
                REAL shrink = EXP(old_max - new_max);
                t->row_sum[r] *= shrink;
                for (int64_t d = 0; d < hdp; d++)
                    t->output[r * hdp + d] *= shrink;
            }
            t->row_max[r] = new_max;
            REAL block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
            for (int64_t jj = 0; jj < visible; jj++) {
                p[jj] = EXP(p[jj] - new_max);
                block_sum += p[jj];
            }
            t->row_sum[r] += block_sum;
        }
        for (int64_t jj = visible < 0 ? 0 : visible; jj < KEY_TILE; jj++)
            p[jj] = 0;
    }
}

/* What attention_rows computes, as small products over tiles of QUERY_TILE queries by KEY_TILE
 * keys (heads up to TILED_MAX_HEAD_DIM wide, zero-padded to whole register tiles): per key tile
 *   S = Q K^T                 (QT, hd) @ (hd, KT) -> (QT, KT)
 *   P = e^(scale S + bias - m), the online softmax step (online_softmax_tile)
 *   O += P V                  (QT, KT) @ (KT, hd) -> (QT, hd)
 * and at the end y = O / l, lse = m + log(l). */
static HOT_KERNEL void NAME(attention_tiles)(const REAL *q, const REAL *k, const REAL *v,
                                             const REAL *bias, REAL *y, REAL *lse, int64_t i0,
                                             int64_t i1, int64_t T, int64_t Tk, int64_t hd, REAL scale)
{
    struct NAME(forward_tiles) t;
    const int64_t hdp = round_up(hd, REGISTER_COLS), rows = i1 - i0, padded_rows = round_up(rows, REGISTER_ROWS);
    NAME(copy_padded)(q + i0 * hd, rows, hd, t.queries, padded_rows, hdp);
    for (int64_t e = 0; e < padded_rows * hdp; e++)
        t.output[e] = 0;
    for (int64_t r = 0; r < padded_rows; r++) {
        t.row_max[r] = -INFINITY;
        t.row_sum[r] = 0;
    }
    int64_t last_visible = i1 - 1 + Tk - T; /* the last key the tile's last query sees */
    for (int64_t j0 = 0; j0 <= last_visible; j0 += KEY_TILE) {
        int64_t width = min_i64(KEY_TILE, last_visible + 1 - j0); /* keys [j0, j0 + width) */
        NAME(copy_transposed)(k + j0 * hd, width, hd, t.key_columns);
        NAME(copy_padded)(v + j0 * hd, width, hd, t.values, width, hdp);
        for (int64_t e = 0; e < padded_rows * KEY_TILE; e++)
            t.probs[e] = 0;
        NAME(tile_product)(padded_rows, KEY_TILE, hd, t.queries, hdp, 1, t.key_columns, KEY_TILE, t.probs, KEY_TILE);
        NAME(online_softmax_tile)(&t, bias, i0, rows, padded_rows, j0, width, T, Tk, hdp, scale);
        NAME(tile_product)(padded_rows, hdp, width, t.probs, KEY_TILE, 1, t.values, hdp, t.output, hdp);
    }
    for (int64_t r = 0; r < rows; r++) {
        REAL inverse = 1 / t.row_sum[r];
        for (int64_t d = 0; d < hd; d++)
            y[(i0 + r) * hd + d] = t.output[r * hdp + d] * inverse;
        lse[i0 + r] = t.row_max[r] + LOG(t.row_sum[r]);
    }
}

int NAME(minqkv_attention)(const REAL *q, const REAL *k, const REAL *v, const REAL *bias, REAL *y,
                           REAL *lse, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk,
                           int64_t hd, double scale, int num_threads)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd) || (B * T > 0 && !lse))
        return MINQKV_BAD_ARGUMENT;
    int64_t group = H / Hkv;
    int tiled = hd <= TILED_MAX_HEAD_DIM; /* wider heads go one row at a time */
    int64_t block = tiled ? QUERY_TILE : QUERY_BLOCK;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) \
    num_threads(attention_threads(B, H, T, Tk, hd, num_threads))
    for (int64_t z = 0; z < B * H; z++) {
        for (int64_t i0 = 0; i0 < T; i0 += block) {
            int64_t b = z / H, h = z % H, kv = b * Hkv + h / group, i1 = min_i64(i0 + block, T);
            const REAL *bias_h = bias ? bias + h * T * Tk : NULL;
            if (tiled)
                NAME(attention_tiles)(q + z * T * hd, k + kv * Tk * hd, v + kv * Tk * hd, bias_h,
                                      y + z * T * hd, lse + z * T, i0, i1, T, Tk, hd, (REAL)scale);
            else
                NAME(attention_rows)(q + z * T * hd, k + kv * Tk * hd, v + kv * Tk * hd, bias_h,
                                     y + z * T * hd, lse + z * T, i0, i1, T, Tk, hd, (REAL)scale);
        }
    }
    return MINQKV_OK;
}

/* The backward pass of one key/value head of one batch row, over the G query heads of its group,
 * one (query, key) pair at a time: the readable version of attention_backward_tiles below, and
 * the one heads wider than TILED_MAX_HEAD_DIM take. For query i and visible key j, recomputed
 * from the saved lse:
 *   p = e^(s - lse_i), dp = dy_i . v_j, ds = p (dp - D_i) with D_i = dy_i . y_i
 *   dv_j += p dy_i;  dk_j += scale ds q_i;  dq_i += scale ds k_j;  dbias[h, i, j] += ds
 * This call owns dk and dv of its head, dq of its query heads, and adds into their dbias rows. */
static HOT_KERNEL void NAME(attention_backward_pairs)(const REAL *q, const REAL *k, const REAL *v,
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

/* The tiles one thread works on in attention_backward_tiles, on its stack (120 KB for float, 240
 * for double, sized for the widest head), kept together so that one declaration sizes them. */
struct NAME(backward_tiles) {
    REAL key_columns[TILED_MAX_HEAD_DIM * KEY_TILE];   /* K^T of the key block (hd, KB) */
    REAL value_columns[TILED_MAX_HEAD_DIM * KEY_TILE]; /* V^T of the key block (hd, KB) */
    REAL keys[KEY_TILE * TILED_MAX_HEAD_DIM];          /* K of the key block (KB, hdp) */
    REAL dk[KEY_TILE * TILED_MAX_HEAD_DIM];            /* its gradients (KB, hdp) */
    REAL dv[KEY_TILE * TILED_MAX_HEAD_DIM];
    REAL queries[QUERY_TILE * TILED_MAX_HEAD_DIM];     /* Q of the query block (QB, hdp) */
    REAL dy[QUERY_TILE * TILED_MAX_HEAD_DIM];          /* dY of the query block (QB, hdp) */
    REAL dq[QUERY_TILE * TILED_MAX_HEAD_DIM];          /* its dQ from this key block */
    REAL probs[QUERY_TILE * KEY_TILE];       /* S, then P (QB, KB) */
    REAL dscores[QUERY_TILE * KEY_TILE];     /* dP, then dS (QB, KB) */
    REAL row_dot[QUERY_TILE];                          /* D_i = dy_i . y_i */
};

/* From the scores S and dP = dY V^T of a (query block, key block) tile, in place:
 * P = e^(scale S + bias - lse) and dS = P (dP - D) on visible pairs, 0 elsewhere (and on the
 * padding rows); dS is also added into dbias. Rows are queries i0 + r, columns keys j0 + jj. */
static ALWAYS_INLINE void NAME(probabilities_and_dscores)(struct NAME(backward_tiles) *t,
                                                          const REAL *bias, const REAL *lse,
                                                          REAL *dbias, int64_t i0, int64_t rows,
                                                          int64_t padded_rows, int64_t j0,
                                                          int64_t width, int64_t T, int64_t Tk,
                                                          REAL scale)
{
    for (int64_t r = 0; r < padded_rows; r++) {
        int64_t i = i0 + r;
        int64_t visible = r < rows ? min_i64(width, i + Tk - T + 1 - j0) : 0; /* keys j0 .. j0 + visible - 1 */
        REAL *p = t->probs + r * KEY_TILE, *ds = t->dscores + r * KEY_TILE;
        if (visible > 0) {
            const REAL *bias_row = bias ? bias + i * Tk + j0 : NULL;
            REAL row_lse = lse[i], D = t->row_dot[r];
#pragma omp simd
            for (int64_t jj = 0; jj < visible; jj++) {
                REAL pj = EXP(p[jj] * scale + (bias_row ? bias_row[jj] : 0) - row_lse);
                p[jj] = pj;
                ds[jj] = pj * (ds[jj] - D);
            }
            if (dbias)
                for (int64_t jj = 0; jj < visible; jj++)
                    dbias[i * Tk + j0 + jj] += ds[jj];
        }
        for (int64_t jj = visible < 0 ? 0 : visible; jj < KEY_TILE; jj++)
            p[jj] = ds[jj] = 0;
    }
}

/* The same backward pass as attention_backward_pairs, as small matrix products over tiles of
 * QUERY_TILE queries by KEY_TILE keys (FlashAttention-2's loop order, Dao
 * 2023): for each key block, its dK and dV stay in a tile while the query blocks that see it
 * go by; for each such query block
 *   S = Q K^T, dP = dY V^T                      (QB, hd) @ (hd, KB) -> (QB, KB)
 *   P = e^(scale S + bias - lse), dS = P (dP - D)
 *   dV += P^T dY, dK += dS^T Q                   (KB, QB) @ (QB, hd) -> (KB, hd)
 *   dQ += dS K                                   (QB, KB) @ (KB, hd) -> (QB, hd)
 * (dK and dQ take the factor scale once, when added to the output). Each product runs on
 * register tiles (tile_product) instead of one dot product per (query, key) pair. Head widths
 * up to TILED_MAX_HEAD_DIM; tiles are zero-padded to whole register tiles. */
static HOT_KERNEL void NAME(attention_backward_tiles)(const REAL *q, const REAL *k, const REAL *v,
                                                      const REAL *bias, const REAL *y, const REAL *lse,
                                                      const REAL *dy, REAL *dq, REAL *dk, REAL *dv,
                                                      REAL *dbias, int64_t group, int64_t T,
                                                      int64_t Tk, int64_t hd, REAL scale)
{
    struct NAME(backward_tiles) t;
    const int64_t KB = KEY_TILE, hdp = round_up(hd, REGISTER_COLS); /* padded head width */
    for (int64_t g = 0; g < group; g++) {
        const REAL *qg = q + g * T * hd, *yg = y + g * T * hd, *dyg = dy + g * T * hd;
        const REAL *bias_g = bias ? bias + g * T * Tk : NULL, *lse_g = lse + g * T;
        REAL *dqg = dq + g * T * hd, *dbias_g = dbias ? dbias + g * T * Tk : NULL;
        for (int64_t j0 = 0; j0 < Tk; j0 += KB) {
            int64_t width = min_i64(KB, Tk - j0); /* keys [j0, j0 + width) */
            NAME(copy_transposed)(k + j0 * hd, width, hd, t.key_columns);
            NAME(copy_transposed)(v + j0 * hd, width, hd, t.value_columns);
            NAME(copy_padded)(k + j0 * hd, width, hd, t.keys, KB, hdp);
            for (int64_t e = 0; e < KB * hdp; e++)
                t.dk[e] = t.dv[e] = 0;
            int64_t first_query = j0 - (Tk - T) > 0 ? j0 - (Tk - T) : 0; /* the first that sees key j0 */
            for (int64_t i0 = first_query; i0 < T; i0 += QUERY_TILE) {
                int64_t rows = min_i64(QUERY_TILE, T - i0), padded_rows = round_up(rows, REGISTER_ROWS);
                NAME(copy_padded)(qg + i0 * hd, rows, hd, t.queries, padded_rows, hdp);
                NAME(copy_padded)(dyg + i0 * hd, rows, hd, t.dy, padded_rows, hdp);
                for (int64_t r = 0; r < rows; r++)
                    t.row_dot[r] = NAME(dot)(dyg + (i0 + r) * hd, yg + (i0 + r) * hd, hd);
                for (int64_t e = 0; e < padded_rows * KB; e++)
                    t.probs[e] = t.dscores[e] = 0;
                NAME(tile_product)(padded_rows, KB, hd, t.queries, hdp, 1, t.key_columns, KB, t.probs, KB);
                NAME(tile_product)(padded_rows, KB, hd, t.dy, hdp, 1, t.value_columns, KB, t.dscores, KB);
                NAME(probabilities_and_dscores)(&t, bias_g, lse_g, dbias_g, i0, rows, padded_rows, j0,
                                                width, T, Tk, scale);
                NAME(tile_product)(KB, hdp, rows, t.probs, 1, KB, t.dy, hdp, t.dv, hdp);
                NAME(tile_product)(KB, hdp, rows, t.dscores, 1, KB, t.queries, hdp, t.dk, hdp);
                for (int64_t e = 0; e < padded_rows * hdp; e++)
                    t.dq[e] = 0;
                NAME(tile_product)(padded_rows, hdp, width, t.dscores, KB, 1, t.keys, hdp, t.dq, hdp);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t d = 0; d < hd; d++)
                        dqg[(i0 + r) * hd + d] += scale * t.dq[r * hdp + d];
            }
            for (int64_t jj = 0; jj < width; jj++)
                for (int64_t d = 0; d < hd; d++) {
                    dk[(j0 + jj) * hd + d] += scale * t.dk[jj * hdp + d];
                    dv[(j0 + jj) * hd + d] += t.dv[jj * hdp + d];
                }
        }
    }
}

/* One key/value head's backward pass: as tiles of small products, or pair by pair for wide heads. */
static void NAME(attention_backward_head)(const REAL *q, const REAL *k, const REAL *v,
                                          const REAL *bias, const REAL *y, const REAL *lse,
                                          const REAL *dy, REAL *dq, REAL *dk, REAL *dv, REAL *dbias,
                                          int64_t group, int64_t T, int64_t Tk, int64_t hd, REAL scale)
{
    if (hd <= TILED_MAX_HEAD_DIM)
        NAME(attention_backward_tiles)(q, k, v, bias, y, lse, dy, dq, dk, dv, dbias, group, T, Tk, hd, scale);
    else
        NAME(attention_backward_pairs)(q, k, v, bias, y, lse, dy, dq, dk, dv, dbias, group, T, Tk, hd, scale);
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
#undef REGISTER_COLS
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG
