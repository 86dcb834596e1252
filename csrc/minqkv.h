/* minqkv.h: the whole C API of minqkv's core.
 *
 * Every kernel works on raw row-major arrays described by a pointer, sizes and strides
 * (strides count elements, not bytes). Kernels never allocate, never call Python and keep no
 * global state, so several threads may call them at once on different arrays. They check only
 * what keeps them inside their arrays: sizes and strides that agree with each other, and ids or
 * targets that index a row (a call that fails returns MINQKV_BAD_ARGUMENT without touching
 * memory). C cannot know how long a buffer really is: minqkv/kernels/ checks the arrays
 * themselves, with readable errors, before it calls here. Values (an eps, the AdamW scalars) are
 * the caller's to check.
 *
 * num_threads: how many OpenMP threads a kernel may use (1 = serial). Small problems run
 * serially whatever is asked, because starting threads would cost more than it saves.
 * Without OpenMP at build time everything is serial.
 */
#ifndef MINQKV_H
#define MINQKV_H

#include <stdint.h>

#define MINQKV_OK 0
#define MINQKV_BAD_ARGUMENT (-1)

/* ---- GEMM: C[z] = op(A[z]) @ op(B[z]) [+ bias] for z in [0, batch) ----
 *
 *   op(A[z]) : (M, K)   stored as (M, K) when trans_a == 0, as (K, M) when trans_a != 0
 *   op(B[z]) : (K, N)   stored as (K, N) when trans_b == 0, as (N, K) when trans_b != 0
 *   bias     : (N,)     added to every row of every C[z]; NULL for none
 *   C[z]     : (M, N)   overwritten when accumulate == 0; accumulate != 0 adds the result to it
 *
 * Element (r, c) of a stored matrix X[z] is X[z * batch_stride_x + r * ldx + c]: ldx is the
 * row stride (at least the stored width), batch_stride_x the distance between matrices
 * (0 is allowed for A and B: one matrix shared by the whole batch).
 *
 * workspace: scratch for the packed blocks of B (and, when threads share a long K, for the sums
 * of its slices), workspace_size floats (resp. doubles), any alignment.
 * It must hold at least minqkv_gemm_workspace_f32(...) (resp. _f64) for the same sizes and the
 * same num_threads; a smaller one is refused, since each thread packs into its own slice of it.
 * Returns MINQKV_OK or MINQKV_BAD_ARGUMENT.
 */
int64_t minqkv_gemm_workspace_f32(int64_t batch, int64_t M, int64_t N, int64_t K, int num_threads);
int64_t minqkv_gemm_workspace_f64(int64_t batch, int64_t M, int64_t N, int64_t K, int num_threads);

int minqkv_gemm_f32(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                    const float *A, int64_t lda, int64_t batch_stride_a,
                    const float *B, int64_t ldb, int64_t batch_stride_b,
                    float *C, int64_t ldc, int64_t batch_stride_c, const float *bias, int accumulate,
                    float *workspace, int64_t workspace_size, int num_threads);
int minqkv_gemm_f64(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                    const double *A, int64_t lda, int64_t batch_stride_a,
                    const double *B, int64_t ldb, int64_t batch_stride_b,
                    double *C, int64_t ldc, int64_t batch_stride_c, const double *bias, int accumulate,
                    double *workspace, int64_t workspace_size, int num_threads);

/* ---- Naive GEMM: the same product as minqkv_gemm, written as three plain loops ----
 *
 * Same arguments and result as minqkv_gemm_f32/_f64 above, without workspace or threads:
 *   C[z][i][j] (+)= sum over p of op(A[z])[i][p] * op(B[z])[p][j] (+ bias[j])   (M, N) = (M, K) @ (K, N)
 * The readable reference for the fast kernel (same numbers up to rounding, far slower).
 * Returns MINQKV_OK or MINQKV_BAD_ARGUMENT.
 */
int minqkv_gemm_naive_f32(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          const float *A, int64_t lda, int64_t batch_stride_a,
                          const float *B, int64_t ldb, int64_t batch_stride_b,
                          float *C, int64_t ldc, int64_t batch_stride_c, const float *bias,
                          int accumulate);
int minqkv_gemm_naive_f64(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          const double *A, int64_t lda, int64_t batch_stride_a,
                          const double *B, int64_t ldb, int64_t batch_stride_b,
                          double *C, int64_t ldc, int64_t batch_stride_c, const double *bias,
                          int accumulate);

/* ---- Softmax over the last axis ----
 *
 *   x, y : (batch, Tq, Tk), contiguous; y = softmax(x) row by row (x and y may be the same array)
 *
 * causal != 0: query row i (0 <= i < Tq) sees key j only if j <= i + (Tk - Tq), so the last
 * query row sees every key (KV-cache decoding has Tq < Tk). Hidden entries give 0.
 * A row with no visible finite-or-+inf entry (all hidden, or all -inf) gives all zeros.
 * A row with a visible NaN, or a visible +inf, gives all NaN (as NumPy's formula does).
 * Non-causal calls may pass any (batch, Tq) split of the rows, e.g. Tq = 1.
 */
int minqkv_softmax_f32(const float *x, float *y, int64_t batch, int64_t Tq, int64_t Tk,
                       int causal, int num_threads);
int minqkv_softmax_f64(const double *x, double *y, int64_t batch, int64_t Tq, int64_t Tk,
                       int causal, int num_threads);

/* ---- Softmax backward ----
 *
 *   y, dy, dx : (rows, n), contiguous; y is the softmax output, dy the gradient of the loss wrt y
 *   dx = y * (dy - sum(dy * y, over the row))   (dx may be the same array as dy)
 */
int minqkv_softmax_backward_f32(const float *y, const float *dy, float *dx, int64_t rows, int64_t n,
                                int num_threads);
int minqkv_softmax_backward_f64(const double *y, const double *dy, double *dx, int64_t rows, int64_t n,
                                int num_threads);


/* ---- GELU, tanh approximation (as GPT-2) ----
 *
 *   x, y, dy, dx : (n,), contiguous
 *   forward:  y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                (y may be x)
 *   backward: dx = dy * d/dx of the same                                         (dx may be dy)
 */
int minqkv_gelu_f32(const float *x, float *y, int64_t n, int num_threads);
int minqkv_gelu_f64(const double *x, double *y, int64_t n, int num_threads);
int minqkv_gelu_backward_f32(const float *x, const float *dy, float *dx, int64_t n, int num_threads);
int minqkv_gelu_backward_f64(const double *x, const double *dy, double *dx, int64_t n, int num_threads);

/* ---- The sum of two arrays: out = a + b ----
 *
 *   a, b, out : (n,), contiguous; out may be a or b
 * Threaded: the residual stream (x + attention(x)) and the gradients that meet in the backward
 * pass are a memory pass each, which NumPy makes on one core.
 */
int minqkv_add_f32(const float *a, const float *b, float *out, int64_t n, int num_threads);
int minqkv_add_f64(const double *a, const double *b, double *out, int64_t n, int num_threads);

/* ---- Layer norm over the last axis ----
 *
 *   x, y, dy, dx     : (rows, C), contiguous, C >= 1
 *   weight, bias     : (C,); bias may be NULL (no shift); eps >= 0 (the caller checks)
 *   mean, rstd       : (rows,), written by the forward pass for the backward pass
 *   dweight, dbias   : (C,), overwritten; dbias may be NULL
 *   workspace        : backward only: 2 * C * minqkv_row_chunks(rows) values (the column sums of
 *                      each chunk of rows, added in order: the same bits on any thread count)
 *   forward:  mean = mean(x), rstd = 1 / sqrt(mean((x - mean)^2) + eps), xhat = (x - mean) * rstd,
 *             y = xhat * weight + bias                                      (row by row)
 *   backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * weight;
 *             dweight = sum over rows of dy * xhat, dbias = sum over rows of dy
 */
int minqkv_layer_norm_f32(const float *x, const float *weight, const float *bias, float *y,
                          float *mean, float *rstd, int64_t rows, int64_t C, double eps, int num_threads);
int minqkv_layer_norm_f64(const double *x, const double *weight, const double *bias, double *y,
                          double *mean, double *rstd, int64_t rows, int64_t C, double eps, int num_threads);
int minqkv_layer_norm_backward_f32(const float *x, const float *weight, const float *mean,
                                   const float *rstd, const float *dy, float *dx, float *dweight,
                                   float *dbias, float *workspace, int64_t rows, int64_t C,
                                   int num_threads);
int minqkv_layer_norm_backward_f64(const double *x, const double *weight, const double *mean,
                                   const double *rstd, const double *dy, double *dx, double *dweight,
                                   double *dbias, double *workspace, int64_t rows, int64_t C,
                                   int num_threads);

/* ---- Column sums: out = the sum of x's rows (a Linear's bias gradient) ----
 *
 *   x : (rows, cols), contiguous;  out : (cols,), overwritten (zeros when rows == 0)
 *   workspace : cols * minqkv_row_chunks(rows) values
 * Rows are added in chunks of a fixed size, then the chunks in order: threads share the chunks,
 * and the result has the same bits on any thread count.
 */
int64_t minqkv_row_chunks(int64_t rows);
int minqkv_column_sums_f32(const float *x, int64_t rows, int64_t cols, float *out, float *workspace,
                           int num_threads);
int minqkv_column_sums_f64(const double *x, int64_t rows, int64_t cols, double *out,
                           double *workspace, int num_threads);

/* ---- Cross-entropy of integer targets under softmax(logits), loss and gradient in one pass ----
 *
 *   logits, dlogits : (rows, V), contiguous, V >= 1
 *   targets, losses : (rows,); a target is in [0, V) or equals ignore_index (else the call is refused)
 *   losses[r]  = logsumexp(logits[r]) - logits[r][targets[r]]      (0 for an ignored row)
 *   dlogits[r] = (softmax(logits[r]) - onehot(targets[r])) * scale (0 for an ignored row);
 *   dlogits may be NULL when no gradient is wanted.
 */
int minqkv_cross_entropy_f32(const float *logits, const int64_t *targets, int64_t ignore_index,
                             float *losses, float *dlogits, double scale, int64_t rows, int64_t V,
                             int num_threads);
int minqkv_cross_entropy_f64(const double *logits, const int64_t *targets, int64_t ignore_index,
                             double *losses, double *dlogits, double scale, int64_t rows, int64_t V,
                             int num_threads);

/* ---- Embedding backward: the gradient of a table's rows picked by id ----
 *
 *   ids  : (P,), each in [0, n) (else the call is refused)
 *   rows : (P, C), contiguous, C >= 1: the gradient of each picked row
 *   out  : (n, C), contiguous, overwritten: out[i] = sum of rows[p] over p with ids[p] == i,
 *          added in the order of p; on one thread (it only streams rows through memory)
 */
int minqkv_embedding_backward_f32(const int64_t *ids, const float *rows, float *out, int64_t P,
                                  int64_t C, int64_t n);
int minqkv_embedding_backward_f64(const int64_t *ids, const double *rows, double *out, int64_t P,
                                  int64_t C, int64_t n);

/* ---- AdamW update, in place ----
 *
 *   param, grad, m, v : (n,), contiguous; param, m and v are updated in place
 *   m = beta1 m + (1 - beta1) grad;  v = beta2 v + (1 - beta2) grad^2
 *   param = param * decay_factor - step_size * m / (sqrt(v) / bias2_sqrt + eps)
 * with decay_factor = 1 - lr * weight_decay (1: no decay), step_size = lr / (1 - beta1^t) and
 * bias2_sqrt = sqrt(1 - beta2^t) at the parameter's t-th update (> 0 for beta2 < 1: the caller
 * checks its betas). Scalars are rounded once to the element type.
 */
int minqkv_adamw_f32(float *param, const float *grad, float *m, float *v, int64_t n, double beta1,
                     double beta2, double decay_factor, double step_size, double bias2_sqrt,
                     double eps, int num_threads);
int minqkv_adamw_f64(double *param, const double *grad, double *m, double *v, int64_t n, double beta1,
                     double beta2, double decay_factor, double step_size, double bias2_sqrt,
                     double eps, int num_threads);


/* ---- Fused causal attention (flash-attention style: no (T, Tk) score matrix is stored) ----
 *
 *   q, y, dy, dq : (B, H, T, hd)      k, v, dk, dv : (B, Hkv, Tk, hd), Tk >= T, H a multiple of Hkv
 *   bias, dbias  : (H, T, Tk) or NULL (no additive bias; dbias NULL: its gradient is not wanted)
 *   lse          : (B, H, T), written by the forward pass for the backward pass
 * bias, dbias and lse are contiguous. The eight others each come with a minqkv_heads_layout:
 * element (b, h, t, d) sits at b * batch + h * head + t * row + d (in elements; the head
 * dimension d is contiguous). So q, k and v can be read where the projection left them, in the
 * (B, T, H * hd) memory of x W or of one (B, T, 3C) product split three ways, and y, dq, dk, dv
 * written where the next layer reads them. For example, with the H heads of q taking columns
 * [0, C) of a (B, T, 3C) product:
 *   contiguous (B, H, T, hd)        batch = H * T * hd,  head = T * hd,  row = hd
 *   q in the (B, T, 3C) product     batch = T * 3C,      head = hd,      row = 3C
 *   y as (B, T, C) with C = H * hd  batch = T * C,       head = hd,      row = C
 * Strides are never negative, and the rows of an array written here (y, dq, dk, dv) must not
 * overlap each other, nor any array read here: the kernels check the first two and trust the last.
 * Query head h reads key/value head h / (H / Hkv) (grouped-query attention).
 * Query row i sits at position Tk - T + i and sees keys j <= i + (Tk - T); with window W >= 1 only
 * the last W of them, i + (Tk - T) - W < j (a causal sliding window; window 0: every earlier key).
 * Key blocks outside every window are skipped, so the cost grows as T * W rather than T * Tk.
 *   forward:  s_ij = scale q_i . k_j + bias[h][i][j]; lse_i = log(sum_j e^(s_ij));
 *             y_i = sum_j e^(s_ij - lse_i) v_j                          (over visible j)
 *   backward: with p_ij = e^(s_ij - lse_i), dp_ij = dy_i . v_j, ds_ij = p_ij (dp_ij - dy_i . y_i):
 *             dq_i = scale sum_j ds_ij k_j; dk_j = scale sum_i ds_ij q_i; dv_j = sum_i p_ij dy_i;
 *             dbias[h][i][j] = sum over the batch of ds_ij          (dq, dk, dv, dbias overwritten)
 * Threads share (batch row, head) pairs; the forward pass also blocks of queries.
 * Returns MINQKV_OK or MINQKV_BAD_ARGUMENT (a size, layout or window out of range).
 */
typedef struct {
    int64_t batch, head, row;
} minqkv_heads_layout;

int minqkv_attention_f32(const float *q, minqkv_heads_layout q_layout, const float *k,
                         minqkv_heads_layout k_layout, const float *v, minqkv_heads_layout v_layout,
                         const float *bias, float *y, minqkv_heads_layout y_layout, float *lse,
                         int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk, int64_t hd,
                         int64_t window, double scale, int num_threads);
int minqkv_attention_f64(const double *q, minqkv_heads_layout q_layout, const double *k,
                         minqkv_heads_layout k_layout, const double *v, minqkv_heads_layout v_layout,
                         const double *bias, double *y, minqkv_heads_layout y_layout, double *lse,
                         int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk, int64_t hd,
                         int64_t window, double scale, int num_threads);
int minqkv_attention_backward_f32(const float *q, minqkv_heads_layout q_layout, const float *k,
                                  minqkv_heads_layout k_layout, const float *v,
                                  minqkv_heads_layout v_layout, const float *bias, const float *y,
                                  minqkv_heads_layout y_layout, const float *lse, const float *dy,
                                  minqkv_heads_layout dy_layout, float *dq,
                                  minqkv_heads_layout dq_layout, float *dk,
                                  minqkv_heads_layout dk_layout, float *dv,
                                  minqkv_heads_layout dv_layout, float *dbias, int64_t B, int64_t H,
                                  int64_t Hkv, int64_t T, int64_t Tk, int64_t hd, int64_t window,
                                  double scale, int num_threads);
int minqkv_attention_backward_f64(const double *q, minqkv_heads_layout q_layout, const double *k,
                                  minqkv_heads_layout k_layout, const double *v,
                                  minqkv_heads_layout v_layout, const double *bias, const double *y,
                                  minqkv_heads_layout y_layout, const double *lse, const double *dy,
                                  minqkv_heads_layout dy_layout, double *dq,
                                  minqkv_heads_layout dq_layout, double *dk,
                                  minqkv_heads_layout dk_layout, double *dv,
                                  minqkv_heads_layout dv_layout, double *dbias, int64_t B, int64_t H,
                                  int64_t Hkv, int64_t T, int64_t Tk, int64_t hd, int64_t window,
                                  double scale, int num_threads);

/* ---- Naive causal attention: the same forward pass, written as plain loops ----
 *
 * The readable reference for minqkv_attention (same numbers up to rounding, far slower, one
 * thread), in the simplest layout: every array contiguous,
 *   q, y : (B, H, T, hd)   k, v : (B, Hkv, Tk, hd)   bias : (H, T, Tk) or NULL   lse : (B, H, T)
 * with the same meaning as above. Returns MINQKV_OK or MINQKV_BAD_ARGUMENT.
 */
int minqkv_attention_naive_f32(const float *q, const float *k, const float *v, const float *bias,
                               float *y, float *lse, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                               int64_t Tk, int64_t hd, int64_t window, double scale);
int minqkv_attention_naive_f64(const double *q, const double *k, const double *v, const double *bias,
                               double *y, double *lse, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                               int64_t Tk, int64_t hd, int64_t window, double scale);

#endif
