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

/* C (rows, cols) = A (rows, depth) @ B (depth, cols), or C += the same when accumulate is set:
 * the product the tiled passes are made of.
 * Element (r, p) of A is A[r * a_row + p * a_col], so A is read as it is or transposed; B and C
 * are row-major with rows of ldb and ldc elements. rows is a multiple of REGISTER_ROWS and cols
 * of REGISTER_COLS (the callers pad with zeros); depth is at least 1. Loop order as in the GEMM's
 * micro-kernel: a REGISTER_ROWS x REGISTER_COLS block of C stays in registers over the whole
 * depth; per step, one row of B is loaded and each of the REGISTER_ROWS values of A is broadcast
 * into it. Storing (accumulate 0) spares the callers zeroing C first. */
static ALWAYS_INLINE void NAME(tile_product)(int accumulate, int64_t rows, int64_t cols, int64_t depth,
                                             const REAL *A, int64_t a_row, int64_t a_col,
                                             const REAL *restrict B, int64_t ldb, REAL *restrict C,
                                             int64_t ldc)
{
    for (int64_t r0 = 0; r0 < rows; r0 += REGISTER_ROWS) {
        for (int64_t c0 = 0; c0 < cols; c0 += REGISTER_COLS) {
            REAL tile[REGISTER_ROWS][REGISTER_COLS];
            for (int r = 0; r < REGISTER_ROWS; r++) { /* from the first term, not from zeros: */
                REAL a = A[(r0 + r) * a_row];       /* zeroing it became a memset on the stack */
#pragma omp simd
                for (int c = 0; c < REGISTER_COLS; c++)
                    tile[r][c] = a * B[c0 + c];
            }
            for (int64_t p = 1; p < depth; p++) {
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
                    C[(r0 + r) * ldc + c0 + c] = (accumulate ? C[(r0 + r) * ldc + c0 + c] : 0) + tile[r][c];
        }
    }
}

/* Copy rows [0, rows) of x (hd wide, row r at x + r * x_row) into a tile of padded_rows x
 * padded_hd, zeros around. The copy and the zeros are separate loops: as one loop with a
 * condition, GCC read x with masked loads, which made these copies a tenth of the backward pass
 * on an AMD Zen 3 core. */
static ALWAYS_INLINE void NAME(copy_padded)(const REAL *restrict x, int64_t x_row, int64_t rows,
                                            int64_t hd, REAL *restrict tile, int64_t padded_rows,
                                            int64_t padded_hd)
{
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t d = 0; d < hd; d++)
            tile[r * padded_hd + d] = x[r * x_row + d];
        for (int64_t d = hd; d < padded_hd; d++)
            tile[r * padded_hd + d] = 0;
    }
    for (int64_t e = rows * padded_hd; e < padded_rows * padded_hd; e++)
        tile[e] = 0;
}

/* Copy rows [0, width) of x (hd wide, row jj at x + jj * x_row) transposed: tile[d][jj] =
 * x[jj][d], KEY_TILE columns, zeros past width. Row by row: each row of x is read front to back
 * (the backward pass spent 10-15% of its time here reading down the columns of x instead). */
static ALWAYS_INLINE void NAME(copy_transposed)(const REAL *restrict x, int64_t x_row, int64_t width,
                                                int64_t hd, REAL *restrict tile)
{
    for (int64_t jj = 0; jj < width; jj++)
        for (int64_t d = 0; d < hd; d++)
            tile[d * KEY_TILE + jj] = x[jj * x_row + d];
    for (int64_t d = 0; d < hd; d++)
        for (int64_t jj = width; jj < KEY_TILE; jj++)
            tile[d * KEY_TILE + jj] = 0;
}

/* The score of query row qi against key row kj: scale qi . kj (+ the bias of key j in this row). */
static REAL NAME(naive_score)(const REAL *qi, const REAL *kj, const REAL *bias_row, int64_t j, int64_t hd,
                              REAL scale)
{
    REAL s = 0;
    for (int64_t d = 0; d < hd; d++)
        s += qi[d] * kj[d];
    return s * scale + (bias_row ? bias_row[j] : 0);
}

/* The readable reference: what the fast passes below compute, one query row at a time in plain
 * loops (contiguous arrays, one thread; see minqkv.h for the shapes). For query row i of head h,
 * which reads key/value head h / (H / Hkv) and sees keys j = first .. i + Tk - T (first = 0, or
 * with a window of W keys the W - 1 before i + Tk - T: first_visible_key):
 *   m = max_j s_j with s_j = scale q_i . k_j + bias[h][i][j]      (first pass over the keys)
 *   l = sum_j e^(s_j - m), y_i = sum_j e^(s_j - m) v_j / l         (second pass)
 *   lse_i = m + log(l)
 * Subtracting m keeps every exponent <= 0. The scores are computed twice rather than stored, so
 * nothing is written but y and lse. */
int NAME(minqkv_attention_naive)(const REAL *q, const REAL *k, const REAL *v, const REAL *bias, REAL *y,
                                 REAL *lse, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk,
                                 int64_t hd, int64_t window, double scale)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd, window) || (B * T > 0 && !lse))
        return MINQKV_BAD_ARGUMENT;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            int64_t kv = h / (H / Hkv);
            const REAL *k_head = k + (b * Hkv + kv) * Tk * hd, *v_head = v + (b * Hkv + kv) * Tk * hd;
            for (int64_t i = 0; i < T; i++) {
                const REAL *qi = q + ((b * H + h) * T + i) * hd;
                const REAL *bias_row = bias ? bias + (h * T + i) * Tk : NULL;
                REAL *yi = y + ((b * H + h) * T + i) * hd;
                int64_t first = first_visible_key(i, T, Tk, window), last = i + Tk - T;
                REAL m = -INFINITY;
                for (int64_t j = first; j <= last; j++) {
                    REAL s = NAME(naive_score)(qi, k_head + j * hd, bias_row, j, hd, (REAL)scale);
                    m = s > m ? s : m;
                }
                REAL l = 0;
                for (int64_t d = 0; d < hd; d++)
                    yi[d] = 0;
                for (int64_t j = first; j <= last; j++) {
                    REAL p = EXP(NAME(naive_score)(qi, k_head + j * hd, bias_row, j, hd, (REAL)scale) - m);
                    l += p;
                    for (int64_t d = 0; d < hd; d++)
                        yi[d] += p * v_head[j * hd + d];
                }
                for (int64_t d = 0; d < hd; d++)
                    yi[d] /= l;
                lse[(b * H + h) * T + i] = m + LOG(l);
            }
        }
    }
    return MINQKV_OK;
}

/* One query head of one batch row in the forward pass, and the key/value head it reads: pointers
 * to their row 0 and the distance between rows in elements (row i of q is q + i * q_row). */
struct NAME(forward_arrays) {
    const REAL *q, *k, *v; /* q (T, hd); k, v (Tk, hd) */
    const REAL *bias;      /* (T, Tk) contiguous, or NULL */
    REAL *y, *lse;         /* y (T, hd); lse (T,) contiguous */
    int64_t q_row, k_row, v_row, y_row;
};

/* One head, rows [i0, i1) of its queries (see forward_arrays); row i sees keys
 * first_visible_key(i) .. i + Tk - T. The forward pass of heads wider than TILED_MAX_HEAD_DIM
 * (attention_tiles below takes the others).
 *
 * Loop order, per block of keys [j0, j1) from the first key row i0 sees: first the scores of
 * every row of the block against every key of it, as outer products: a chunk of the key block is
 * copied transposed into key_columns (head dimension by key), so that for each q[i][d] the inner
 * loop runs along contiguous keys (vector registers hold consecutive keys, no horizontal sums).
 * Then, row by row, the online softmax update and the weighted sum of the block's values into y[i]. */
static HOT_KERNEL void NAME(attention_rows)(const struct NAME(forward_arrays) *a, int64_t i0,
                                            int64_t i1, int64_t T, int64_t Tk, int64_t hd,
                                            int64_t window, REAL scale)
{
    REAL scores[QUERY_BLOCK][KEY_BLOCK];
    REAL key_columns[HEAD_CHUNK][KEY_BLOCK];
    REAL row_max[QUERY_BLOCK], row_sum[QUERY_BLOCK];
    int64_t rows = i1 - i0;
    for (int64_t r = 0; r < rows; r++) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0;
        for (int64_t d = 0; d < hd; d++)
            a->y[(i0 + r) * a->y_row + d] = 0;
    }
    int64_t last_visible = i1 - 1 + Tk - T; /* the last key the block's last row sees */
    for (int64_t j0 = first_visible_key(i0, T, Tk, window); j0 <= last_visible; j0 += KEY_BLOCK) {
        int64_t width = min_i64(KEY_BLOCK, last_visible + 1 - j0); /* keys [j0, j0 + width) */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t jj = 0; jj < width; jj++)
                scores[r][jj] = 0;
        for (int64_t d0 = 0; d0 < hd; d0 += HEAD_CHUNK) {
            int64_t chunk = min_i64(HEAD_CHUNK, hd - d0);
            for (int64_t jj = 0; jj < width; jj++)
                for (int64_t d = 0; d < chunk; d++)
                    key_columns[d][jj] = a->k[(j0 + jj) * a->k_row + d0 + d];
            for (int64_t r = 0; r < rows; r++) {
                const REAL *qi = a->q + (i0 + r) * a->q_row + d0;
                for (int64_t d = 0; d < chunk; d++) {
                    REAL q_id = qi[d];
#pragma omp simd
                    for (int64_t jj = 0; jj < width; jj++)
                        scores[r][jj] += q_id * key_columns[d][jj];
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            int64_t i = i0 + r, begin, end; /* the row sees keys j0 + begin .. j0 + end - 1 */
            visible_in_block(i, j0, width, T, Tk, window, &begin, &end);
            if (begin >= end)
                continue;
            for (int64_t jj = begin; jj < end; jj++)
                scores[r][jj] = scores[r][jj] * scale + (a->bias ? a->bias[i * Tk + j0 + jj] : 0);
            REAL block_max = -INFINITY;
#pragma omp simd reduction(max : block_max) /* as online_softmax_tile's below */
            for (int64_t jj = begin; jj < end; jj++)
                block_max = scores[r][jj] > block_max ? scores[r][jj] : block_max;
            REAL new_max = block_max > row_max[r] ? block_max : row_max[r];
            REAL *yi = a->y + i * a->y_row;
            if (new_max > row_max[r] && row_max[r] > -INFINITY) { /* rescale what was summed so far */
                REAL shrink = EXP(row_max[r] - new_max);
                row_sum[r] *= shrink;
                for (int64_t d = 0; d < hd; d++)
                    yi[d] *= shrink;
            }
            row_max[r] = new_max;
            REAL block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
            for (int64_t jj = begin; jj < end; jj++) { /* scores become probabilities (unnormalised) */
                REAL p = EXP(scores[r][jj] - new_max);
                scores[r][jj] = p;
                block_sum += p;
            }
            row_sum[r] += block_sum;
            for (int64_t jj = begin; jj < end; jj++) {
                REAL p = scores[r][jj];
                const REAL *vj = a->v + (j0 + jj) * a->v_row;
#pragma omp simd
                for (int64_t d = 0; d < hd; d++)
                    yi[d] += p * vj[d];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        REAL *yi = a->y + (i0 + r) * a->y_row, inverse = 1 / row_sum[r];
        for (int64_t d = 0; d < hd; d++)
            yi[d] *= inverse;
        a->lse[i0 + r] = row_max[r] + LOG(row_sum[r]);
    }
}

/* The tiles one thread works on in attention_tiles, on its stack (58 KB for float, 116 for double).
 * The scores are kept transposed, keys by queries: each query is a column, so the softmax's
 * maxima and sums over keys are sums down the columns, one vector of queries at a time. */
struct NAME(forward_tiles) {
    REAL queries[TILED_MAX_HEAD_DIM * QUERY_TILE];  /* Q^T of the query tile (hd, QT) */
    REAL keys[KEY_TILE * TILED_MAX_HEAD_DIM];       /* K of a key tile (KT, hd), when not read in place */
    REAL values[KEY_TILE * TILED_MAX_HEAD_DIM];     /* V of a key tile (KT, hdp), when not read in place */
    REAL scores[KEY_TILE * QUERY_TILE];             /* S^T, then e^(s - m) (KT, QT) */
    REAL output[QUERY_TILE * TILED_MAX_HEAD_DIM];   /* sum of e^(s - m) v so far (QT, hdp) */
    REAL query_max[QUERY_TILE], query_sum[QUERY_TILE]; /* m and l of each query */
    REAL tile_max[QUERY_TILE]; /* each query's maximum in one key tile, then what its exponents subtract */
    REAL shrink[QUERY_TILE];   /* e^(m - m'), the rescaling of what each query summed before the tile */
};

/* The online softmax step of a tile, column by column (query r is column r of S^T), in place:
 * the scores of keys j0 + jj and queries i0 + r become e^(scale s + bias - m') with m' the
 * query's new running maximum (0 on hidden pairs: before the window, after the causal edge, on
 * padding columns), and what each query summed so far is rescaled by e^(m - m'). */
static ALWAYS_INLINE void NAME(online_softmax_columns)(struct NAME(forward_tiles) *t, const REAL *bias,
                                                       int64_t i0, int64_t rows, int64_t j0,
                                                       int64_t width, int64_t T, int64_t Tk,
                                                       int64_t window, int64_t hdp, REAL scale)
{
    for (int64_t r = 0; r < QUERY_TILE; r++)
        t->tile_max[r] = -INFINITY;
    for (int64_t jj = 0; jj < width; jj++) {
        /* key j is seen by queries i with j <= i + Tk - T (and, with a window, i + Tk - T < j +
         * W): the columns [lo, hi) of this row */
        int64_t j = j0 + jj, lo = j - (Tk - T) - i0, hi = window ? lo + window : rows;
        lo = lo > 0 ? lo : 0;
        hi = min_i64(hi, rows);
        REAL *s = t->scores + jj * QUERY_TILE;
#pragma omp simd
        for (int64_t r = 0; r < QUERY_TILE; r++)
            s[r] = r >= lo && r < hi ? s[r] * scale : -INFINITY;
        if (bias) /* a column of the (T, Tk) bias: values Tk apart */
            for (int64_t r = lo; r < hi; r++)
                s[r] += bias[(i0 + r) * Tk + j];
#pragma omp simd
        for (int64_t r = 0; r < QUERY_TILE; r++)
            t->tile_max[r] = s[r] > t->tile_max[r] ? s[r] : t->tile_max[r];
    }
#pragma omp simd
    for (int64_t r = 0; r < QUERY_TILE; r++) {
        REAL old_max = t->query_max[r], new_max = t->tile_max[r] > old_max ? t->tile_max[r] : old_max;
        /* a query that has seen no key yet keeps m = -inf: subtract 0 instead (e^-inf = 0) */
        t->shrink[r] = old_max == new_max ? 1 : EXP(old_max - new_max);
        t->query_max[r] = new_max;
        t->tile_max[r] = new_max == -INFINITY ? 0 : new_max; /* what the exponents subtract */
        t->query_sum[r] *= t->shrink[r];
    }
    for (int64_t r = 0; r < rows; r++) {
        REAL shrink = t->shrink[r];
#pragma omp simd
        for (int64_t d = 0; d < hdp; d++)
            t->output[r * hdp + d] *= shrink;
    }
    for (int64_t jj = 0; jj < width; jj++) {
        REAL *s = t->scores + jj * QUERY_TILE;
#pragma omp simd
        for (int64_t r = 0; r < QUERY_TILE; r++) {
            s[r] = EXP(s[r] - t->tile_max[r]);
            t->query_sum[r] += s[r];
        }
    }
}

/* The fast forward pass: what minqkv_attention_naive computes, as small products over tiles of
 * QUERY_TILE queries by KEY_TILE keys (heads up to TILED_MAX_HEAD_DIM wide), with the online
 * softmax of attention.c: per key tile
 *   S^T = K Q^T               (KT, hd) @ (hd, QT) -> (KT, QT)
 *   P^T = e^(scale S^T + bias - m), the online softmax step (online_softmax_columns)
 *   O += P V                  (QT, KT) @ (KT, hd) -> (QT, hd)
 * and at the end y = O / l, lse = m + log(l). Q^T is copied once per query tile; K and V are
 * read where they lie (a key tile's rows, each one broadcast value at a time in the first
 * product, whole rows in the second), copied only for a ragged last tile of K or a head width
 * that is not a whole number of register columns. The key tiles start at the first key the
 * tile's first query sees (key 0 without a window), so no tile lies outside every window. */
static HOT_KERNEL void NAME(attention_tiles)(const struct NAME(forward_arrays) *arrays, int64_t i0,
                                             int64_t i1, int64_t T, int64_t Tk, int64_t hd,
                                             int64_t window, REAL scale)
{
    /* a local copy, which GCC keeps in registers; read through the pointer it runs ~8% slower */
    const struct NAME(forward_arrays) local = *arrays, *a = &local;
    struct NAME(forward_tiles) t;
    const int64_t hdp = round_up(hd, REGISTER_COLS), rows = i1 - i0, padded_rows = round_up(rows, REGISTER_ROWS);
    for (int64_t d = 0; d < hd; d++)
        for (int64_t r = 0; r < QUERY_TILE; r++)
            t.queries[d * QUERY_TILE + r] = r < rows ? a->q[(i0 + r) * a->q_row + d] : 0;
    for (int64_t e = 0; e < padded_rows * hdp; e++)
        t.output[e] = 0;
    for (int64_t r = 0; r < QUERY_TILE; r++) {
        t.query_max[r] = -INFINITY;
        t.query_sum[r] = 0;
    }
    int64_t last_visible = i1 - 1 + Tk - T; /* the last key the tile's last query sees */
    for (int64_t j0 = first_visible_key(i0, T, Tk, window); j0 <= last_visible; j0 += KEY_TILE) {
        int64_t width = min_i64(KEY_TILE, last_visible + 1 - j0); /* keys [j0, j0 + width) */
        int64_t key_rows = round_up(width, REGISTER_ROWS); /* the product's rows past width are unused */
        const REAL *keys = a->k + j0 * a->k_row, *values = a->v + j0 * a->v_row;
        int64_t keys_row = a->k_row, values_row = a->v_row;
        if (j0 + key_rows > Tk) { /* K has no rows there to read */
            NAME(copy_padded)(keys, a->k_row, width, hd, t.keys, key_rows, hd);
            keys = t.keys, keys_row = hd;
        }
        if (hdp != hd) { /* the second product reads whole register columns of V */
            NAME(copy_padded)(values, a->v_row, width, hd, t.values, width, hdp);
            values = t.values, values_row = hdp;
        }
        NAME(tile_product)(0, key_rows, QUERY_TILE, hd, keys, keys_row, 1, t.queries, QUERY_TILE, t.scores, QUERY_TILE);
        NAME(online_softmax_columns)(&t, a->bias, i0, rows, j0, width, T, Tk, window, hdp, scale);
        NAME(tile_product)(1, padded_rows, hdp, width, t.scores, 1, QUERY_TILE, values, values_row, t.output, hdp);
    }
    for (int64_t r = 0; r < rows; r++) {
        REAL inverse = 1 / t.query_sum[r];
        for (int64_t d = 0; d < hd; d++)
            a->y[(i0 + r) * a->y_row + d] = t.output[r * hdp + d] * inverse;
        a->lse[i0 + r] = t.query_max[r] + LOG(t.query_sum[r]);
    }
}

int NAME(minqkv_attention)(const REAL *q, minqkv_heads_layout q_layout, const REAL *k,
                           minqkv_heads_layout k_layout, const REAL *v, minqkv_heads_layout v_layout,
                           const REAL *bias, REAL *y, minqkv_heads_layout y_layout, REAL *lse,
                           int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk, int64_t hd,
                           int64_t window, double scale, int num_threads)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd, window) || (B * T > 0 && !lse))
        return MINQKV_BAD_ARGUMENT;
    if (!layout_valid(q_layout, B, H, T, hd, 0) || !layout_valid(k_layout, B, Hkv, Tk, hd, 0)
        || !layout_valid(v_layout, B, Hkv, Tk, hd, 0) || !layout_valid(y_layout, B, H, T, hd, 1))
        return MINQKV_BAD_ARGUMENT;
    int64_t group = H / Hkv;
    int tiled = hd <= TILED_MAX_HEAD_DIM; /* wider heads go one row at a time */
    int64_t block = tiled ? QUERY_TILE : QUERY_BLOCK;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) \
    num_threads(attention_threads(B, H, T, Tk, hd, window, num_threads))
    for (int64_t z = 0; z < B * H; z++) {
        for (int64_t i0 = 0; i0 < T; i0 += block) {
            int64_t b = z / H, h = z % H, kv = h / group, i1 = min_i64(i0 + block, T);
            struct NAME(forward_arrays) a = {
                .q = q + heads_offset(q_layout, b, h), .q_row = q_layout.row,
                .k = k + heads_offset(k_layout, b, kv), .k_row = k_layout.row,
                .v = v + heads_offset(v_layout, b, kv), .v_row = v_layout.row,
                .bias = bias ? bias + h * T * Tk : NULL,
                .y = y + heads_offset(y_layout, b, h), .y_row = y_layout.row,
                .lse = lse + z * T,
            };
            if (tiled)
                NAME(attention_tiles)(&a, i0, i1, T, Tk, hd, window, (REAL)scale);
            else
                NAME(attention_rows)(&a, i0, i1, T, Tk, hd, window, (REAL)scale);
        }
    }
    return MINQKV_OK;
}

/* One query head of one batch row in the backward pass, and the key/value head it reads, as in
 * forward_arrays: pointers to row 0, distances between rows in elements. */
struct NAME(backward_arrays) {
    const REAL *q, *y, *dy, *k, *v; /* q, y, dy (T, hd); k, v (Tk, hd) */
    const REAL *bias, *lse;         /* bias (T, Tk) contiguous, or NULL; lse (T,) */
    REAL *dq, *dk, *dv;             /* as q, k, v */
    REAL *dbias;                    /* (T, Tk) contiguous, or NULL; added into */
    int64_t q_row, y_row, dy_row, k_row, v_row, dq_row, dk_row, dv_row;
    int first_of_group;             /* the first query head that reads k and v (see the passes) */
};

/* The backward pass of one query head, one (query, key) pair at a time, in plain loops: the
 * readable version of attention_backward_tiles below, and the one heads wider than
 * TILED_MAX_HEAD_DIM take. For query i and visible key j, recomputed from the saved lse:
 *   p = e^(s - lse_i), dp = dy_i . v_j, ds = p (dp - D_i) with D_i = dy_i . y_i
 *   dv_j += p dy_i;  dk_j += scale ds q_i;  dq_i += scale ds k_j;  dbias[i, j] += ds
 * It adds into dq, dk and dv: the caller zeroes them first. */
static HOT_KERNEL void NAME(attention_backward_pairs)(const struct NAME(backward_arrays) *a,
                                                      int64_t T, int64_t Tk, int64_t hd,
                                                      int64_t window, REAL scale)
{
    for (int64_t i = 0; i < T; i++) {
        const REAL *qi = a->q + i * a->q_row, *dyi = a->dy + i * a->dy_row;
        REAL *dqi = a->dq + i * a->dq_row;
        REAL D = NAME(dot)(dyi, a->y + i * a->y_row, hd), row_lse = a->lse[i];
        for (int64_t j = first_visible_key(i, T, Tk, window); j <= i + Tk - T; j++) {
            const REAL *kj = a->k + j * a->k_row, *vj = a->v + j * a->v_row;
            REAL s = NAME(dot)(qi, kj, hd) * scale + (a->bias ? a->bias[i * Tk + j] : 0);
            REAL p = EXP(s - row_lse);
            REAL ds = p * (NAME(dot)(dyi, vj, hd) - D);
            REAL *dkj = a->dk + j * a->dk_row, *dvj = a->dv + j * a->dv_row;
#pragma omp simd
            for (int64_t d = 0; d < hd; d++) {
                dvj[d] += p * dyi[d];
                dkj[d] += scale * ds * qi[d];
                dqi[d] += scale * ds * kj[d];
            }
            if (a->dbias)
                a->dbias[i * Tk + j] += ds;
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
 * P = e^(scale S + bias - lse) and dS = P (dP - D) on visible pairs, 0 elsewhere (before the
 * window, after the causal edge, on the padding rows); dS is also added into dbias. Rows are
 * queries i0 + r, columns keys j0 + jj. */
static ALWAYS_INLINE void NAME(probabilities_and_dscores)(struct NAME(backward_tiles) *t,
                                                          const REAL *bias, const REAL *lse,
                                                          REAL *dbias, int64_t i0, int64_t rows,
                                                          int64_t padded_rows, int64_t j0,
                                                          int64_t width, int64_t T, int64_t Tk,
                                                          int64_t window, REAL scale)
{
    for (int64_t r = 0; r < padded_rows; r++) {
        int64_t i = i0 + r, begin = 0, end = 0; /* the row sees keys j0 + begin .. j0 + end - 1 */
        if (r < rows)
            visible_in_block(i, j0, width, T, Tk, window, &begin, &end);
        REAL *p = t->probs + r * KEY_TILE, *ds = t->dscores + r * KEY_TILE;
        if (begin < end) {
            const REAL *bias_row = bias ? bias + i * Tk + j0 : NULL;
            REAL row_lse = lse[i], D = t->row_dot[r];
#pragma omp simd
            for (int64_t jj = begin; jj < end; jj++) {
                REAL pj = EXP(p[jj] * scale + (bias_row ? bias_row[jj] : 0) - row_lse);
                p[jj] = pj;
                ds[jj] = pj * (ds[jj] - D);
            }
            if (dbias)
                for (int64_t jj = begin; jj < end; jj++)
                    dbias[i * Tk + j0 + jj] += ds[jj];
        }
        for (int64_t jj = 0; jj < KEY_TILE; jj++)
            if (jj < begin || jj >= end)
                p[jj] = ds[jj] = 0;
    }
}

/* Set rows [0, rows) of x (hd wide, row r at x + r * x_row) to zero. */
static void NAME(zero_rows)(REAL *x, int64_t x_row, int64_t rows, int64_t hd)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < hd; d++)
            x[r * x_row + d] = 0;
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
 * up to TILED_MAX_HEAD_DIM; tiles are zero-padded to whole register tiles.
 * The key blocks start at the first key any query sees (key 0 but under a window with Tk > T);
 * the keys before it get zero gradients. A key block's queries run from the first that sees its
 * first key to the last that sees its last key (all of them but under a window).
 * No zeroing beforehand: the first key block a query sees stores its dQ (the later blocks add);
 * the first query head of a group stores dK and dV (the others add). A pass less over memory:
 * dq, dk and dv of one head are rows far apart when stored token by token. */
static HOT_KERNEL void NAME(attention_backward_tiles)(const struct NAME(backward_arrays) *a,
                                                      int64_t T, int64_t Tk, int64_t hd,
                                                      int64_t window, REAL scale)
{
    struct NAME(backward_tiles) t;
    const int64_t KB = KEY_TILE, hdp = round_up(hd, REGISTER_COLS); /* padded head width */
    int64_t first_seen = first_visible_key(0, T, Tk, window);
    if (a->first_of_group) {
        NAME(zero_rows)(a->dk, a->dk_row, first_seen, hd);
        NAME(zero_rows)(a->dv, a->dv_row, first_seen, hd);
    }
    for (int64_t j0 = first_seen; j0 < Tk; j0 += KB) {
        int64_t width = min_i64(KB, Tk - j0); /* keys [j0, j0 + width) */
        /* K and V (V into dv, free until it is zeroed) first as they are, whole rows read at a
         * time, then transposed from there: from the tiles, not from rows 3C apart in memory */
        NAME(copy_padded)(a->k + j0 * a->k_row, a->k_row, width, hd, t.keys, KB, hdp);
        NAME(copy_padded)(a->v + j0 * a->v_row, a->v_row, width, hd, t.dv, KB, hdp);
        NAME(copy_transposed)(t.keys, hdp, width, hd, t.key_columns);
        NAME(copy_transposed)(t.dv, hdp, width, hd, t.value_columns);
        for (int64_t e = 0; e < KB * hdp; e++)
            t.dk[e] = t.dv[e] = 0;
        int64_t first_query = j0 - (Tk - T) > 0 ? j0 - (Tk - T) : 0; /* the first that sees key j0 */
        int64_t last_query = window ? min_i64(T - 1, j0 + width - 2 + window - (Tk - T)) : T - 1;
        for (int64_t i0 = first_query; i0 <= last_query; i0 += QUERY_TILE) {
            int64_t rows = min_i64(QUERY_TILE, last_query + 1 - i0), padded_rows = round_up(rows, REGISTER_ROWS);
            NAME(copy_padded)(a->q + i0 * a->q_row, a->q_row, rows, hd, t.queries, padded_rows, hdp);
            NAME(copy_padded)(a->dy + i0 * a->dy_row, a->dy_row, rows, hd, t.dy, padded_rows, hdp);
            for (int64_t r = 0; r < rows; r++)
                t.row_dot[r] = NAME(dot)(a->dy + (i0 + r) * a->dy_row, a->y + (i0 + r) * a->y_row, hd);
            /* the keys of the block this query tile sees: those up to its last query's causal
             * edge; the products leave out the rest, all zeros of P and dS (about a quarter of
             * the work at T = 64, where one key block spans both query tiles) */
            int64_t seen = min_i64(width, i0 + rows + Tk - T - j0);
            int64_t seen_columns = round_up(seen, REGISTER_COLS), seen_rows = round_up(seen, REGISTER_ROWS);
            NAME(tile_product)(0, padded_rows, seen_columns, hd, t.queries, hdp, 1, t.key_columns, KB, t.probs, KB);
            NAME(tile_product)(0, padded_rows, seen_columns, hd, t.dy, hdp, 1, t.value_columns, KB, t.dscores, KB);
            NAME(probabilities_and_dscores)(&t, a->bias, a->lse, a->dbias, i0, rows, padded_rows, j0,
                                            width, T, Tk, window, scale);
            NAME(tile_product)(1, seen_rows, hdp, rows, t.probs, 1, KB, t.dy, hdp, t.dv, hdp);
            NAME(tile_product)(1, seen_rows, hdp, rows, t.dscores, 1, KB, t.queries, hdp, t.dk, hdp);
            NAME(tile_product)(0, padded_rows, hdp, seen, t.dscores, KB, 1, t.keys, hdp, t.dq, hdp);
            for (int64_t r = 0; r < rows; r++) {
                REAL *dqi = a->dq + (i0 + r) * a->dq_row;
                int first_block = first_visible_key(i0 + r, T, Tk, window) >= j0; /* of this query's */
                for (int64_t d = 0; d < hd; d++)
                    dqi[d] = (first_block ? 0 : dqi[d]) + scale * t.dq[r * hdp + d];
            }
        }
        for (int64_t jj = 0; jj < width; jj++) {
            REAL *dkj = a->dk + (j0 + jj) * a->dk_row, *dvj = a->dv + (j0 + jj) * a->dv_row;
            for (int64_t d = 0; d < hd; d++) {
                dkj[d] = (a->first_of_group ? 0 : dkj[d]) + scale * t.dk[jj * hdp + d];
                dvj[d] = (a->first_of_group ? 0 : dvj[d]) + t.dv[jj * hdp + d];
            }
        }
    }
}

int NAME(minqkv_attention_backward)(const REAL *q, minqkv_heads_layout q_layout, const REAL *k,
                                    minqkv_heads_layout k_layout, const REAL *v,
                                    minqkv_heads_layout v_layout, const REAL *bias, const REAL *y,
                                    minqkv_heads_layout y_layout, const REAL *lse, const REAL *dy,
                                    minqkv_heads_layout dy_layout, REAL *dq,
                                    minqkv_heads_layout dq_layout, REAL *dk,
                                    minqkv_heads_layout dk_layout, REAL *dv,
                                    minqkv_heads_layout dv_layout, REAL *dbias, int64_t B, int64_t H,
                                    int64_t Hkv, int64_t T, int64_t Tk, int64_t hd, int64_t window,
                                    double scale, int num_threads)
{
    if (!attention_arguments_valid(q, k, v, y, B, H, Hkv, T, Tk, hd, window))
        return MINQKV_BAD_ARGUMENT;
    if (B * T > 0 && (!lse || !dy || !dq || !dk || !dv || (dbias && !bias)))
        return MINQKV_BAD_ARGUMENT;
    if (!layout_valid(q_layout, B, H, T, hd, 0) || !layout_valid(y_layout, B, H, T, hd, 0)
        || !layout_valid(dy_layout, B, H, T, hd, 0) || !layout_valid(k_layout, B, Hkv, Tk, hd, 0)
        || !layout_valid(v_layout, B, Hkv, Tk, hd, 0) || !layout_valid(dq_layout, B, H, T, hd, 1)
        || !layout_valid(dk_layout, B, Hkv, Tk, hd, 1) || !layout_valid(dv_layout, B, Hkv, Tk, hd, 1))
        return MINQKV_BAD_ARGUMENT;
    int64_t group = H / Hkv;
    int threads = attention_threads(B, H, T, Tk, hd, window, num_threads);
    /* A unit of work owns the gradients it writes: dk and dv of a key/value head, dq of the group
     * of query heads that read it and, with dbias, their dbias rows, which it zeroes itself (in its
     * thread) where it adds into them. Every batch row adds into the same dbias[h], so with dbias
     * a unit is one key/value head for all batch rows; without it, one (key/value head, batch row)
     * pair, ordered so that threads running side by side take different batch rows, far apart in
     * memory (neighbouring heads of one token may share a cache line). */
    int tiled = hd <= TILED_MAX_HEAD_DIM;
    int64_t units = dbias ? Hkv : Hkv * B;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < units; unit++) {
        int64_t kv = dbias ? unit : unit / B, b0 = dbias ? 0 : unit % B, b1 = dbias ? B : b0 + 1;
        if (dbias)
            NAME(zero_rows)(dbias + kv * group * T * Tk, Tk, group * T, Tk);
        for (int64_t b = b0; b < b1; b++) {
            REAL *dk_head = dk + heads_offset(dk_layout, b, kv), *dv_head = dv + heads_offset(dv_layout, b, kv);
            if (!tiled) { /* the pair-by-pair pass adds into them */
                NAME(zero_rows)(dk_head, dk_layout.row, Tk, hd);
                NAME(zero_rows)(dv_head, dv_layout.row, Tk, hd);
                for (int64_t h = kv * group; h < (kv + 1) * group; h++)
                    NAME(zero_rows)(dq + heads_offset(dq_layout, b, h), dq_layout.row, T, hd);
            }
            for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
                struct NAME(backward_arrays) a = {
                    .q = q + heads_offset(q_layout, b, h), .q_row = q_layout.row,
                    .y = y + heads_offset(y_layout, b, h), .y_row = y_layout.row,
                    .dy = dy + heads_offset(dy_layout, b, h), .dy_row = dy_layout.row,
                    .k = k + heads_offset(k_layout, b, kv), .k_row = k_layout.row,
                    .v = v + heads_offset(v_layout, b, kv), .v_row = v_layout.row,
                    .bias = bias ? bias + h * T * Tk : NULL,
                    .lse = lse + (b * H + h) * T,
                    .dq = dq + heads_offset(dq_layout, b, h), .dq_row = dq_layout.row,
                    .dk = dk_head, .dk_row = dk_layout.row,
                    .dv = dv_head, .dv_row = dv_layout.row,
                    .dbias = dbias ? dbias + h * T * Tk : NULL,
                    .first_of_group = h == kv * group,
                };
                if (tiled)
                    NAME(attention_backward_tiles)(&a, T, Tk, hd, window, (REAL)scale);
                else
                    NAME(attention_backward_pairs)(&a, T, Tk, hd, window, (REAL)scale);
            }
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
