/* minqkv.h: the whole C API of minqkv's core.
 *
 * Every kernel works on raw row-major arrays described by a pointer, sizes and strides
 * (strides count elements, not bytes). Kernels never allocate, never call Python and keep no
 * global state, so several threads may call them at once on different arrays. They check that
 * sizes and strides agree with each other (an inconsistent call returns MINQKV_BAD_ARGUMENT
 * without touching memory), but C cannot know how long a buffer really is: minqkv/kernels.py
 * checks the arrays themselves, with readable errors, before it calls here.
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

/* ---- GEMM: C[z] = op(A[z]) @ op(B[z]) for z in [0, batch) ----
 *
 *   op(A[z]) : (M, K)   stored as (M, K) when trans_a == 0, as (K, M) when trans_a != 0
 *   op(B[z]) : (K, N)   stored as (K, N) when trans_b == 0, as (N, K) when trans_b != 0
 *   C[z]     : (M, N)   overwritten (not accumulated into)
 *
 * Element (r, c) of a stored matrix X[z] is X[z * batch_stride_x + r * ldx + c]: ldx is the
 * row stride (at least the stored width), batch_stride_x the distance between matrices
 * (0 is allowed for A and B: one matrix shared by the whole batch).
 *
 * workspace: scratch for the packed blocks, workspace_size floats (resp. doubles), any alignment.
 * It must hold at least minqkv_gemm_workspace_f32(...) (resp. _f64) for the same sizes and the
 * same num_threads; a smaller one is refused, since each thread packs into its own slice of it.
 * Returns MINQKV_OK or MINQKV_BAD_ARGUMENT.
 */
int64_t minqkv_gemm_workspace_f32(int64_t batch, int64_t M, int64_t N, int64_t K, int num_threads);
int64_t minqkv_gemm_workspace_f64(int64_t batch, int64_t M, int64_t N, int64_t K, int num_threads);

int minqkv_gemm_f32(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                    const float *A, int64_t lda, int64_t batch_stride_a,
                    const float *B, int64_t ldb, int64_t batch_stride_b,
                    float *C, int64_t ldc, int64_t batch_stride_c,
                    float *workspace, int64_t workspace_size, int num_threads);
int minqkv_gemm_f64(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                    const double *A, int64_t lda, int64_t batch_stride_a,
                    const double *B, int64_t ldb, int64_t batch_stride_b,
                    double *C, int64_t ldc, int64_t batch_stride_c,
                    double *workspace, int64_t workspace_size, int num_threads);

/* ---- Naive GEMM: the same product as minqkv_gemm, written as three plain loops ----
 *
 * Same arguments and result as minqkv_gemm_f32/_f64 above, without workspace or threads:
 *   C[z][i][j] = sum over p of op(A[z])[i][p] * op(B[z])[p][j]     (M, N) = (M, K) @ (K, N)
 * The readable reference for the fast kernel (same numbers up to rounding, far slower).
 * Returns MINQKV_OK or MINQKV_BAD_ARGUMENT.
 */
int minqkv_gemm_naive_f32(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          const float *A, int64_t lda, int64_t batch_stride_a,
                          const float *B, int64_t ldb, int64_t batch_stride_b,
                          float *C, int64_t ldc, int64_t batch_stride_c);
int minqkv_gemm_naive_f64(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          const double *A, int64_t lda, int64_t batch_stride_a,
                          const double *B, int64_t ldb, int64_t batch_stride_b,
                          double *C, int64_t ldc, int64_t batch_stride_c);

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

#endif
