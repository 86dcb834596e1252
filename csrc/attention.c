/* attention.c: fused causal attention, forward and backward, without the (T, Tk) score matrices.
 *
 * The unfused way (minqkv/attention.py's attend, the reference) computes all scores of a head,
 * a softmax over them, then their weighted sum of values: memory grows with T * Tk. Here each
 * query row streams over its visible keys in blocks of KEY_BLOCK, keeping only a running maximum
 * m, a running sum l of exponentials and the running weighted sum of values (in the output row
 * itself): when a block raises the maximum from m to m', what was summed so far is rescaled by
 * e^(m - m'), the "online softmax" of Milakov & Gimelshein (2018), as used by FlashAttention
 * (Dao et al., 2022). The forward pass saves one number per query, lse = m + log(l), and the
 * backward pass recomputes each probability from it: p = e^(s - lse).
 *
 * A sliding window of W keys (Longformer, Beltagy et al. 2020; Mistral) lets each query see only
 * the last W keys up to its own position. The passes then start a tile of queries at the first
 * key its first query sees, and end a block of keys' queries at the last one that sees it:
 * blocks outside every window of a tile are never read, so the cost grows as T * W, not T^2.
 * Inside a block the window's edges are masked as the causal edge is (e^-inf = 0).
 *
 * attention_template.h holds, in the order to read them:
 *   - minqkv_attention_naive, the readable reference: one query row at a time, in plain loops,
 *     on contiguous arrays, one thread. Tests check the fast kernel against it.
 *   - the fast passes (attention_tiles, attention_backward_tiles): the work cut into tiles of
 *     QUERY_TILE queries by KEY_TILE keys, each tile computed as a few small matrix products
 *     (forward: the scores transposed, K Q^T, then P V; backward: Q K^T, dY V^T, P^T dY,
 *     dS^T Q, dS K) whose inner loops keep REGISTER_ROWS x 64 bytes of the result in vector
 *     registers, as the GEMM's micro-kernel does.
 *   - the passes for heads wider than TILED_MAX_HEAD_DIM, for which the tiles (on the stack)
 *     are too small: attention_rows (blocks of queries against blocks of keys, no tiles) and
 *     attention_backward_pairs (one (query, key) pair at a time, itself plain loops).
 *
 * The arrays of (batch row, head, position) rows come with their strides (minqkv_heads_layout),
 * so q, k and v are read inside the projection that made them and y, dq, dk, dv written where
 * the next step reads them: no copies to and from a (B, H, T, hd) order around the kernels.
 */
#include <math.h>

#include "minqkv.h"
#include "internal.h"

#define QUERY_BLOCK 16 /* attention_rows: queries that share each block of keys read into cache */
#define KEY_BLOCK 64
#define HEAD_CHUNK 64 /* the head dimension is read in chunks of this many (any hd works) */
#define QUERY_TILE 32 /* the tiled passes */
#define KEY_TILE 64
#define REGISTER_ROWS 4
#define TILED_MAX_HEAD_DIM 64

/* Below this many multiply-adds (~0.2 ms of work on one core) a call runs on one thread. */
#define PARALLEL_MIN_WORK (1 << 21)

static int attention_arguments_valid(const void *q, const void *k, const void *v, const void *y,
                                     int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk,
                                     int64_t hd, int64_t window)
{
    if (B < 0 || H < 1 || Hkv < 1 || H % Hkv != 0 || T < 0 || Tk < T || hd < 1 || window < 0)
        return 0;
    return B * T == 0 || (q && k && v && y);
}

/* 1 if a layout of a (B, heads, rows, hd) array is one the kernels can use: no negative stride
 * and, for an array they write, no two rows that overlap. The second is checked dimension by
 * dimension from the smallest stride up: each stride must clear what the smaller ones span.
 * A dimension of size 1 has no stride that matters, and an empty array none at all. */
static int layout_valid(minqkv_heads_layout layout, int64_t B, int64_t heads, int64_t rows,
                        int64_t hd, int written)
{
    int64_t stride[3] = {layout.row, layout.head, layout.batch}, count[3] = {rows, heads, B};
    if (B * heads * rows == 0)
        return 1; /* nothing is read or written */
    for (int a = 0; a < 3; a++)
        if (count[a] > 1 && stride[a] < 0)
            return 0;
    if (!written)
        return 1;
    for (int a = 1; a < 3; a++) /* sort the three dimensions by stride */
        for (int b = a; b > 0 && stride[b] < stride[b - 1]; b--) {
            int64_t s = stride[b], c = count[b];
            stride[b] = stride[b - 1], count[b] = count[b - 1];
            stride[b - 1] = s, count[b - 1] = c;
        }
    int64_t span = hd; /* elements from the start of a row to the end of the last one so far */
    for (int a = 0; a < 3; a++) {
        if (count[a] <= 1)
            continue;
        if (stride[a] < span || stride[a] > (INT64_MAX - span) / (count[a] - 1))
            return 0;
        span += stride[a] * (count[a] - 1);
    }
    return 1;
}

/* Where the rows of head h of batch row b start in an array of this layout. */
static inline int64_t heads_offset(minqkv_heads_layout layout, int64_t b, int64_t h)
{
    return b * layout.batch + h * layout.head;
}

/* The first key query row i sees: with a window of W keys, the W - 1 before its own position
 * i + Tk - T and that one; with window 0 (or one reaching past key 0), key 0. */
static inline int64_t first_visible_key(int64_t i, int64_t T, int64_t Tk, int64_t window)
{
    int64_t first = i + Tk - T - window + 1;
    return window == 0 || first < 0 ? 0 : first;
}

/* The keys of the block [j0, j0 + width) that query row i sees, as offsets into the block:
 * [*begin, *end), empty when *begin >= *end. */
static inline void visible_in_block(int64_t i, int64_t j0, int64_t width, int64_t T, int64_t Tk,
                                    int64_t window, int64_t *begin, int64_t *end)
{
    int64_t first = first_visible_key(i, T, Tk, window) - j0, last = i + Tk - T - j0;
    *begin = first > 0 ? first : 0;
    *end = min_i64(width, last + 1);
}

static int attention_threads(int64_t B, int64_t H, int64_t T, int64_t Tk, int64_t hd, int64_t window,
                             int num_threads)
{
    int64_t keys_per_query = window > 0 && window < Tk ? window : Tk; /* at most; causal rows see fewer */
    double work = (double)B * (double)H * (double)T * (double)keys_per_query * (double)hd;
    return threads_for_work(work, PARALLEL_MIN_WORK, num_threads);
}

#define REAL float
#define SUFFIX f32
#define EXP exp_f32
#define LOG logf
#include "attention_template.h"

#define REAL double
#define SUFFIX f64
#define EXP exp_f64
#define LOG log
#include "attention_template.h"
