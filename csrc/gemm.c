/* gemm.c: batched, strided matrix multiply C = op(A) @ op(B) in float32 and float64.
 *
 * How it is fast, in four ideas (after Goto & van de Geijn, "Anatomy of high-performance
 * matrix multiplication", and the BLIS papers):
 *   1. Register tile: the micro-kernel computes an MR x NR block of C held entirely in vector
 *      registers, so each loaded value of A is used NR times and each value of B MR times.
 *   2. Packing: the block of B the micro-kernel reads is first copied into small contiguous
 *      panels in exactly the order it reads them; transposes and strides of B are dealt with
 *      there, once. A is read in place: the micro-kernel only broadcasts single values of it.
 *   3. Cache blocking: K is cut into KC slices and M into MC slices so that one A block
 *      (MC x KC) stays in the L2 cache and one packed B panel (KC x NR) in L1.
 *   4. Threads: the batch, or else the rows (or columns) of C, are shared out between
 *      OpenMP threads; each thread packs into its own slice of the caller's workspace.
 * The loops themselves are in gemm_template.h, written once and compiled for float and double.
 */
#include "minqkv.h"
#include "internal.h"

/* Below this many flops (about 10 microseconds of work on one core) a GEMM runs on one thread.
 * Starting a parallel region costs 1-2 microseconds when libgomp's threads are still spinning
 * from the last one and a few more when they have gone to sleep (libgomp's default wait policy,
 * which minqkv leaves alone). Measured on a 2-core AMD EPYC VM, one thread -> two, including
 * minqkv.kernels.matmul's own overhead of ~5 us: (64,64)@(64,64), 0.5 Mflop: 11 -> 9 us;
 * (96,96)@(96,96), 1.8 Mflop: 24 -> 16 us; (128,128)@(128,128), 4 Mflop: 50 -> 29 us, and the
 * same gain after a 5 ms pause. So two threads pay from about 1 Mflop up. */
#define PARALLEL_MIN_FLOPS (1 << 20)

struct gemm_plan {
    int threads;        /* OpenMP threads to start */
    int64_t pieces;     /* each matrix of the batch is cut into this many pieces */
    int split_rows;     /* pieces are bands of rows of C (else bands of columns) */
    int64_t piece_size; /* rows (or columns) per piece, a multiple of MR (or NR) */
    int64_t k_pieces;   /* 1, or the KC slices of K, each computed apart (see K_SPLIT_BELOW) */
};

/* A matrix with many rows is cut into up to BANDS_PER_THREAD bands of rows per thread, each at
 * least MIN_BAND_ROWS tall, and the threads take them as they free up: when another process takes
 * a core for a while, the other thread computes more bands instead of the call waiting for one
 * slow half. Every band packs its own copy of B, hence the minimum height. Measured on 2 threads
 * with a busy process beside them, (4096,128) @ (128,384) and @ (128,512): 7.0 -> 5.9 ms and
 * 7.1 -> 5.4 ms; with nothing beside them the same times within 1.6%. */
#define BANDS_PER_THREAD 4
#define MIN_BAND_ROWS 480

/* Cutting C into bands costs each thread a pass over the whole of the other operand along K (a
 * band of rows packs all of B; a band of columns reads all of A), for 2 x (the band's length)
 * flops per value passed over. A weight gradient X^T dY is the case where that ratio is low: C is
 * small, (C_in, C_out), and K = batch x tokens is long. Then, when 2 x the side cut into bands
 * over the thread count falls below K_SPLIT_BELOW flops per value, K is cut as well: each of its
 * KC slices is computed apart, the first into C, the others into their own (M, N) slice of the
 * workspace, and the slices are then added into C in order. Each value of C is then summed in
 * exactly the order of one thread (C, then slice 0's register tile, then slice 1's, ...): the
 * same bits on any thread count. The slices' sums take (slices - 1) x M x N elements of
 * workspace, at most K_SPLIT_MAX_PARTIALS (16 MB of floats); a product that would need more is
 * not split along K. The threshold was picked, not tuned: it cuts
 * the model's 384-wide weight gradients from 8 threads up and leaves 2-thread plans alone. On the
 * 16-core Intel host, 16 threads, (128,4096)^T @ (4096,384): 671 -> 346 us; (512,4096)^T @
 * (4096,128): 755 -> 488 us (PyTorch: 263 and 365). */
#define K_SPLIT_BELOW 128
#define K_SPLIT_MAX_PARTIALS ((int64_t)1 << 22)

/* Decide how to share the work between threads. Whole matrices of the batch are the natural
 * unit; when they do not divide evenly between the threads (a single matrix, say) each one is
 * also cut into bands along its longer side: as many as there are threads, or more when it is
 * tall (see BANDS_PER_THREAD); a single matrix with a short side and a long K is cut along K too
 * (see K_SPLIT_BELOW). */
static struct gemm_plan make_gemm_plan(int64_t batch, int64_t M, int64_t N, int64_t K,
                                       int num_threads, int64_t mr, int64_t nr, int64_t kc)
{
    struct gemm_plan plan = {1, 1, 1, M, 1};
    double flops = 2.0 * (double)batch * (double)M * (double)N * (double)K;
    int64_t threads = num_threads < 1 ? 1 : num_threads;
#ifndef _OPENMP
    threads = 1;
#endif
    if (flops < PARALLEL_MIN_FLOPS || batch == 0)
        return plan;
    if (batch % threads != 0 && batch < 8 * threads) {
        int64_t k_slices = (K + kc - 1) / kc, side = M >= N ? M : N, bands = threads;
        if (batch == 1 && k_slices >= 2 && 2 * side < K_SPLIT_BELOW * threads
            && (k_slices - 1) * (double)M * (double)N <= (double)K_SPLIT_MAX_PARTIALS) {
            plan.k_pieces = k_slices;
            bands = (threads + k_slices - 1) / k_slices; /* as many as it takes for every thread */
        }
        if (M >= N && M >= 2 * mr) {
            plan.pieces = min_i64(bands, M / mr);
            if (M / MIN_BAND_ROWS > plan.pieces) /* tall: more bands, handed out as threads free up */
                plan.pieces = min_i64(BANDS_PER_THREAD * bands, M / MIN_BAND_ROWS);
            plan.piece_size = round_up((M + plan.pieces - 1) / plan.pieces, mr);
        } else if (N >= 2 * nr) {
            plan.split_rows = 0;
            plan.pieces = min_i64(bands, N / nr);
            plan.piece_size = round_up((N + plan.pieces - 1) / plan.pieces, nr);
        }
    }
    plan.threads = (int)min_i64(threads, batch * plan.pieces * plan.k_pieces);
    return plan;
}

/* Sizes and strides that contradict each other (a negative size, a row stride shorter than a
 * row, matrices of the batch that overlap in C) are refused. Whether the buffers really are that
 * long C cannot know: a pointer carries no length, so minqkv/kernels/ checks the arrays. */
static int gemm_arguments_valid(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N,
                                int64_t K, const void *A, int64_t lda, int64_t batch_stride_a,
                                const void *B, int64_t ldb, int64_t batch_stride_b,
                                const void *C, int64_t ldc, int64_t batch_stride_c)
{
    if (batch < 0 || M < 0 || N < 0 || K < 0)
        return 0;
    if (batch == 0 || M == 0 || N == 0)
        return 1;
    if (!C || ldc < N || batch_stride_c < 0 || (batch > 1 && batch_stride_c < M * ldc))
        return 0;
    if (K == 0)
        return 1;
    if (!A || !B || batch_stride_a < 0 || batch_stride_b < 0)
        return 0;
    if (lda < (trans_a ? M : K) || ldb < (trans_b ? K : N))
        return 0;
    return 1;
}

/* gemm_template.h is compiled twice below. GEMM, GEMM_NAIVE and GEMM_WORKSPACE are the names
 * it gives its three API functions (declared in minqkv.h); SUFFIX ends its private helpers.
 * The template #undefs all of these at its end, ready for the next dtype. */

/* float32: a 6 x 32 tile is 12 AVX-512 registers (of 32). An Intel core issues two 16-wide
 * fused multiply-adds per cycle, each ready 4 cycles later, so it needs 8 independent sums in
 * flight: the 6 x 16 tile before this one (6 registers) kept it at 55-75% of its peak. Measured on
 * the 16-core Intel Xeon host (a C program timing minqkv_gemm_f32 alone, best of many calls),
 * GFLOPS at 1 thread: (768,128)@(128,384) 96 -> 162, 512^3 109 -> 107 (OpenBLAS 149); at 16
 * threads: 512^3 705 -> 890, (4096,128)@(128,512) 963 -> 1046 (OpenBLAS 908-1061). On the 2-core
 * AMD EPYC (Zen 4 runs AVX-512 at half width) both tiles give 100-107, its peak. On a CPU with
 * AVX2 alone the tile would take 24 registers of 16 and spill, so there it is computed as two
 * 6 x 16 tiles (tile_width in gemm_template.h).
 * KC x NR x 4 bytes = 16 KiB of packed B per panel (L1), MC x KC x 4 = 60 KiB of A (L2).
 * KC was 256 (a 32 KiB panel) until the weight gradients X^T dY were measured on an Intel core
 * (48 KiB of L1): there each step of p reads MR values from a new row of A, lda apart, so a tile
 * passes over KC rows of A besides the panel, and with lda = 512 floats (2 KiB) those rows share
 * two of the 64 sets of L1. Halving KC halves both. On the 2-core Intel Xeon VM (Emerald
 * Rapids), one thread, both builds called in turn in one process, two rounds, GFLOPS before ->
 * after: (4096,512)^T @ (4096,128) 66-70 -> 78-82 (PyTorch 70-73), (4096,128)^T @ (4096,512)
 * 73-76 -> 78-79, (768,512)^T @ (768,128) 88 -> 93, (4096,128)^T @ (4096,384) +3-4%; the others
 * within -5%..+1%, but (4096,128) @ (128,384), 81-86 -> 94-98 (K = 128 there: the same blocks
 * either way). */
#define REAL float
#define GEMM minqkv_gemm_f32
#define GEMM_NAIVE minqkv_gemm_naive_f32
#define GEMM_WORKSPACE minqkv_gemm_workspace_f32
#define SUFFIX f32
#define MR 6
#define NR 32
#define KC 128
#define MC 120
#define NC 2048
#include "gemm_template.h"

/* float64: the same tile in bytes, 6 x 16 doubles. */
#define REAL double
#define GEMM minqkv_gemm_f64
#define GEMM_NAIVE minqkv_gemm_naive_f64
#define GEMM_WORKSPACE minqkv_gemm_workspace_f64
#define SUFFIX f64
#define MR 6
#define NR 16
#define KC 256
#define MC 120
#define NC 1024
#include "gemm_template.h"
