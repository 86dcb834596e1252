/* gemm_template.h: the GEMMs of gemm.c, written once for an element type.
 *
 * Not a header of the API. gemm.c includes this file twice, after defining
 *   REAL      the element type (float or double)
 *   GEMM, GEMM_NAIVE, GEMM_WORKSPACE   the API names of the three functions defined here,
 *             e.g. minqkv_gemm_f32, minqkv_gemm_naive_f32, minqkv_gemm_workspace_f32
 *   SUFFIX    f32 or f64, appended to the name of every private helper defined here
 *   MR, NR    the register tile: the micro-kernel keeps an MR x NR block of C in registers
 *   KC, MC, NC  the cache blocks (see gemm.c for why these sizes)
 * and #undefs them all at its end.
 *
 * First the naive GEMM, the definition written as loops; then the fast one, which computes the
 * same sums in another order.
 */

#define NAME(x) PASTE(x, SUFFIX)

/* Naive GEMM, one batch matrix at a time: C (M, N) = op(A) (M, K) @ op(B) (K, N) [+ bias (N,)
 * on every row], or C += the same when accumulate is set.
 *
 * Loop order z, i, j, p: each element of C is one dot product, a row of op(A) with a column of
 * op(B), summed in a register and written once. The p loop walks a column of B (stride ldb) when
 * B is not transposed, which is why this is slow: every step is a new cache line. */
int GEMM_NAIVE(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
               const REAL *A, int64_t lda, int64_t batch_stride_a,
               const REAL *B, int64_t ldb, int64_t batch_stride_b,
               REAL *C, int64_t ldc, int64_t batch_stride_c, const REAL *bias, int accumulate)
{
    if (!gemm_arguments_valid(trans_a, trans_b, batch, M, N, K, A, lda, batch_stride_a,
                              B, ldb, batch_stride_b, C, ldc, batch_stride_c))
        return MINQKV_BAD_ARGUMENT;
    for (int64_t z = 0; z < batch; z++) {
        const REAL *Az = A + z * batch_stride_a, *Bz = B + z * batch_stride_b;
        REAL *Cz = C + z * batch_stride_c;
        for (int64_t i = 0; i < M; i++) {
            for (int64_t j = 0; j < N; j++) {
                REAL sum = 0;
                for (int64_t p = 0; p < K; p++) {
                    REAL a_ip = trans_a ? Az[p * lda + i] : Az[i * lda + p]; /* op(A)[i][p] */
                    REAL b_pj = trans_b ? Bz[j * ldb + p] : Bz[p * ldb + j]; /* op(B)[p][j] */
                    sum += a_ip * b_pj;
                }
                if (bias)
                    sum += bias[j];
                Cz[i * ldc + j] = accumulate ? Cz[i * ldc + j] + sum : sum;
            }
        }
    }
    return MINQKV_OK;
}

/* Pack a (kc, nc) block of op(B) into panels of NR columns:
 *   packed[panel][p][c] = op(B)[p, panel * NR + c]     (zero past column nc) */
static ALWAYS_INLINE void NAME(pack_b)(int trans, int64_t kc, int64_t nc,
                                       const REAL *B, int64_t ldb, REAL *packed)
{
    for (int64_t j0 = 0; j0 < nc; j0 += NR) {
        int64_t cols = min_i64(NR, nc - j0);
        if (trans) {
            /* op(B) = B^T: column j0 + c of op(B) is row j0 + c of B, read front to back */
            for (int64_t c = 0; c < NR; c++)
                for (int64_t p = 0; p < kc; p++)
                    packed[p * NR + c] = c < cols ? B[(j0 + c) * ldb + p] : (REAL)0;
        } else if (cols == NR) {
            /* NR contiguous values of each row of B: copies the compiler turns into vector moves */
            for (int64_t p = 0; p < kc; p++)
                for (int64_t c = 0; c < NR; c++)
                    packed[p * NR + c] = B[p * ldb + j0 + c];
        } else {
            for (int64_t p = 0; p < kc; p++)
                for (int64_t c = 0; c < NR; c++)
                    packed[p * NR + c] = c < cols ? B[p * ldb + j0 + c] : (REAL)0;
        }
        packed += NR * kc;
    }
}

/* The micro-kernel: a ROWS x COLS tile of C (ROWS <= MR, COLS <= NR) from ROWS rows of op(A), kc
 * long, and COLS columns of a packed B panel (kc rows, NR apart):
 *
 *   tile[r][c] = bias[c] + sum over p of a[r * row_step + p * col_step] * b[p * NR + c]
 *
 * (bias NULL: no bias), stored into C or, when accumulate is set, added to it.
 *
 * A is read where it lies (row_step lda and col_step 1, or 1 and lda when op(A) is A^T): the
 * micro-kernel only ever broadcasts single values of A, so it does not need them contiguous.
 *
 * Loop order p, r, c: for each p, one row of COLS values of b is loaded (two vector registers)
 * and each A value is broadcast and multiplied into row r of the tile.
 * ROWS and COLS are constants at every call (see tile below), so the compiler unrolls r and c
 * completely and keeps the whole tile in registers: the inner loop does only loads and fused
 * multiply-adds. With a variable bound the tile would live on the stack, zeroed and copied out
 * one value at a time, which costs as much as the sums themselves when kc is small (the attention
 * products have K = 32). For the same reason the tile starts from the first product rather than
 * from a zeroed array (which the compiler turns into a memset).
 * The p loop is unrolled 4 times: per step it is 12 multiply-adds, 8 loads and 4 instructions of
 * loop upkeep (counted in the compiled loop), which unrolling shares among 4 steps. On the
 * 2-core Intel Xeon VM (family 6 model 207, Emerald Rapids), one thread, the two
 * builds called in turn in one process: the weight gradients of the nanoGPT step 2-15% faster,
 * the whole step 4-5% (84.5 -> 80.0 and 73.7 -> 70.4 ms); unrolled 2 times, less; 8, the same. */
static ALWAYS_INLINE void NAME(micro_kernel)(const int ROWS, const int COLS, int64_t kc,
                                             const REAL *restrict a, int64_t row_step,
                                             int64_t col_step, const REAL *restrict b,
                                             const REAL *restrict bias, REAL *restrict C,
                                             int64_t ldc, int accumulate)
{
    REAL tile[MR][NR];
    if (bias) /* COLS values, added to every row */
        for (int r = 0; r < ROWS; r++)
#pragma omp simd
            for (int c = 0; c < COLS; c++)
                tile[r][c] = bias[c] + a[r * row_step] * b[c];
    else
        for (int r = 0; r < ROWS; r++)
#pragma omp simd
            for (int c = 0; c < COLS; c++)
                tile[r][c] = a[r * row_step] * b[c];
#pragma GCC unroll 4
    for (int64_t p = 1; p < kc; p++) {
        a += col_step;
        b += NR;
        for (int r = 0; r < ROWS; r++)
#pragma omp simd
            for (int c = 0; c < COLS; c++)
                tile[r][c] += a[r * row_step] * b[c];
    }
    if (accumulate) {
        for (int r = 0; r < ROWS; r++)
#pragma omp simd
            for (int c = 0; c < COLS; c++)
                C[r * ldc + c] += tile[r][c];
    } else {
        for (int r = 0; r < ROWS; r++)
#pragma omp simd
            for (int c = 0; c < COLS; c++)
                C[r * ldc + c] = tile[r][c];
    }
}

#if MR != 6
#error "tile_part() below has one case per row count, up to MR = 6"
#endif

/* Columns [c0, c0 + COLS) of a rows x NR tile: the switch gives the micro-kernel a constant row
 * count, one copy per count, so the ragged last rows of C cost only what they compute (and never
 * read past the end of A). */
static ALWAYS_INLINE void NAME(tile_part)(const int COLS, int64_t c0, int64_t rows, int64_t kc,
                                          const REAL *a, int64_t row_step, int64_t col_step,
                                          const REAL *b, const REAL *bias, REAL *C, int64_t ldc,
                                          int accumulate)
{
    b += c0, C += c0, bias = bias ? bias + c0 : NULL;
    switch (rows) {
    case 6: NAME(micro_kernel)(6, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    case 5: NAME(micro_kernel)(5, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    case 4: NAME(micro_kernel)(4, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    case 3: NAME(micro_kernel)(3, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    case 2: NAME(micro_kernel)(2, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    default: NAME(micro_kernel)(1, COLS, kc, a, row_step, col_step, b, bias, C, ldc, accumulate); break;
    }
}

/* The register tile's width: two vector registers of REAL. MR x NR is sized for AVX-512, where
 * 6 x 32 floats are 12 of its 32 registers. AVX2 has 16 registers of half the width, where the
 * same tile would take 24 and spill; so there (and with SSE2's 16 quarter-width registers) each
 * NR-wide panel is computed as 2 (or 4) narrower tiles, one after the other, each of 12
 * registers. On a 2-core AMD EPYC VM (Zen 3, AVX2), one thread, GFLOPS at the model's shapes:
 * 40-45 with the 6 x 32 tile, PyTorch 79-94 in the same run. */
static inline int NAME(tile_width)(void)
{
    return (int)min_i64(NR, 2 * vector_floats() * (int64_t)sizeof(float) / (int64_t)sizeof(REAL));
}

/* A rows x cols tile of C (rows <= MR, cols <= NR), width columns (NR, NR / 2 or NR / 4) at a
 * time; bias: its cols values, or NULL. A tile narrower than NR is computed into a scratch tile
 * (packed B is zero-padded) and only its first cols columns are copied into C. */
static ALWAYS_INLINE void NAME(tile)(int width, int64_t rows, int64_t cols, int64_t kc,
                                     const REAL *a, int64_t row_step, int64_t col_step,
                                     const REAL *b, const REAL *bias, REAL *C, int64_t ldc,
                                     int accumulate)
{
    REAL scratch[MR * NR], padded_bias[NR];
    int narrow = cols < NR;
    REAL *out = narrow ? scratch : C;
    int64_t ld_out = narrow ? NR : ldc;
    int add_to_out = accumulate && !narrow;
    if (bias && narrow) { /* the micro-kernel reads NR values of bias: never past its end */
        for (int64_t c = 0; c < NR; c++)
            padded_bias[c] = c < cols ? bias[c] : (REAL)0;
        bias = padded_bias;
    }
    for (int64_t c0 = 0; c0 < cols; c0 += width) {
        if (width == NR)
            NAME(tile_part)(NR, c0, rows, kc, a, row_step, col_step, b, bias, out, ld_out, add_to_out);
        else if (width == NR / 2)
            NAME(tile_part)(NR / 2, c0, rows, kc, a, row_step, col_step, b, bias, out, ld_out, add_to_out);
        else
            NAME(tile_part)(NR / 4, c0, rows, kc, a, row_step, col_step, b, bias, out, ld_out, add_to_out);
    }
    if (narrow)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++)
                C[r * ldc + c] = accumulate ? C[r * ldc + c] + scratch[r * NR + c]
                                            : scratch[r * NR + c];
}

/* One C block (M, N) = op(A) (M, K) @ op(B) (K, N), on one thread.
 *
 * Loop order, outermost first (the Goto / BLIS scheme):
 *   jc: NC columns of C at a time
 *     pc: KC of the K dimension at a time; pack op(B)[pc:pc+KC, jc:jc+NC] (stays in L2/L3)
 *       ic: MC rows at a time: op(A)[ic:ic+MC, pc:pc+KC] (stays in L2)
 *         jr: one NR-wide panel of packed B (kc x NR, stays in L1)
 *           ir: MR rows of op(A), streamed from L2 into the micro-kernel
 * The first pc block writes C (plus the bias, when there is one), the later ones add to it; with
 * accumulate set, every block adds to C.
 *
 * Unlike BLIS, A is not packed: the micro-kernel broadcasts one value of A at a time, which it
 * reads in place as cheaply as from a packed panel, and packing costs a copy of every value of
 * A, used only 2N times. One thread, measured against packing A: (64,128,128)@(64,128,32) 66 ->
 * 94 GFLOPS, (48,64,64)@(48,64,32) 65 -> 90, the large products no slower (OpenBLAS 96-110 on
 * the same run). */
static HOT_KERNEL void NAME(gemm_block)(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                                        const REAL *A, int64_t lda, const REAL *B, int64_t ldb,
                                        REAL *C, int64_t ldc, const REAL *bias, int accumulate,
                                        REAL *packed_b)
{
    int64_t row_step = trans_a ? 1 : lda, col_step = trans_a ? lda : 1; /* op(A)[i][p] */
    int width = NAME(tile_width)();
    for (int64_t jc = 0; jc < N; jc += NC) {
        int64_t nc = min_i64(NC, N - jc);
        for (int64_t pc = 0; pc < K; pc += KC) {
            int64_t kc = min_i64(KC, K - pc);
            const REAL *B_block = trans_b ? B + jc * ldb + pc : B + pc * ldb + jc;
            NAME(pack_b)(trans_b, kc, nc, B_block, ldb, packed_b);
            for (int64_t ic = 0; ic < M; ic += MC) {
                int64_t mc = min_i64(MC, M - ic);
                const REAL *A_block = trans_a ? A + pc * lda + ic : A + ic * lda + pc;
                for (int64_t jr = 0; jr < nc; jr += NR)
                    for (int64_t ir = 0; ir < mc; ir += MR)
                        NAME(tile)(width, min_i64(MR, mc - ir), min_i64(NR, nc - jr), kc,
                                   A_block + ir * row_step, row_step, col_step, packed_b + jr * kc,
                                   pc == 0 && bias ? bias + jc + jr : NULL,
                                   C + (ic + ir) * ldc + jc + jr, ldc, accumulate || pc > 0);
            }
        }
    }
}

/* Workspace of one thread, in elements, for a product with N columns and K terms: the packed
 * B block (as gemm_block lays it out), rounded up to whole 64-byte lines. A needs none. */
static int64_t NAME(workspace_per_thread)(int64_t N, int64_t K)
{
    int64_t packed = min_i64(K, KC) * round_up(min_i64(N, NC), NR);
    return round_up(packed, 64 / (int64_t)sizeof(REAL));
}

/* Elements of the workspace after the threads' packing slices, for the slices of K computed
 * apart (plan.k_pieces - 1 of them, each an (M, N) matrix; none without a split of K). */
static int64_t NAME(partials_size)(struct gemm_plan plan, int64_t M, int64_t N)
{
    return (plan.k_pieces - 1) * M * N;
}

int64_t GEMM_WORKSPACE(int64_t batch, int64_t M, int64_t N, int64_t K, int num_threads)
{
    if (batch < 0 || M < 0 || N < 0 || K < 0)
        return 0;
    struct gemm_plan plan = make_gemm_plan(batch, M, N, K, num_threads, MR, NR, KC);
    return plan.threads * NAME(workspace_per_thread)(N, K) + NAME(partials_size)(plan, M, N)
           + 64 / (int64_t)sizeof(REAL);
}

/* One unit of the plan: piece (unit / k_pieces % pieces) of matrix (unit / k_pieces / pieces) of
 * the batch, over slice (unit % k_pieces) of K. Slice 0 goes into C as the whole sum would (bias,
 * accumulate); slice s > 0, one KC block, is stored into partials[s - 1] (M, N), for
 * add_partials to add into C in order. */
static void NAME(gemm_unit)(int64_t unit, struct gemm_plan plan, int trans_a, int trans_b,
                            int64_t M, int64_t N, int64_t K,
                            const REAL *A, int64_t lda, int64_t batch_stride_a,
                            const REAL *B, int64_t ldb, int64_t batch_stride_b,
                            REAL *C, int64_t ldc, int64_t batch_stride_c, const REAL *bias,
                            int accumulate, REAL *partials, REAL *workspace)
{
    int64_t slice = unit % plan.k_pieces, piece = unit / plan.k_pieces % plan.pieces;
    int64_t z = unit / plan.k_pieces / plan.pieces;
    int64_t m0 = 0, m1 = M, n0 = 0, n1 = N, p0 = 0, p1 = K;
    if (plan.split_rows) {
        m0 = min_i64(M, piece * plan.piece_size);
        m1 = min_i64(M, m0 + plan.piece_size);
    } else {
        n0 = min_i64(N, piece * plan.piece_size);
        n1 = min_i64(N, n0 + plan.piece_size);
    }
    if (plan.k_pieces > 1) {
        p0 = slice * KC;
        p1 = min_i64(K, p0 + KC);
    }
    if (m0 == m1 || n0 == n1)
        return;
    const REAL *A_piece = A + z * batch_stride_a + (trans_a ? m0 + p0 * lda : m0 * lda + p0);
    const REAL *B_piece = B + z * batch_stride_b + (trans_b ? n0 * ldb + p0 : p0 * ldb + n0);
    if (slice == 0)
        NAME(gemm_block)(trans_a, trans_b, m1 - m0, n1 - n0, p1 - p0, A_piece, lda, B_piece, ldb,
                         C + z * batch_stride_c + m0 * ldc + n0, ldc, bias ? bias + n0 : NULL,
                         accumulate, workspace);
    else
        NAME(gemm_block)(trans_a, trans_b, m1 - m0, n1 - n0, p1 - p0, A_piece, lda, B_piece, ldb,
                         partials + (slice - 1) * M * N + m0 * N + n0, N, NULL, 0, workspace);
}

/* Rows [i0, i1) of C += partials[0], then += partials[1], ...: the order one thread adds the
 * KC slices of K in, so the bits do not depend on how the slices were shared out. */
static HOT_KERNEL void NAME(add_partials)(int64_t slices, int64_t i0, int64_t i1, int64_t N,
                               const REAL *partials, int64_t M, REAL *C, int64_t ldc)
{
    for (int64_t i = i0; i < i1; i++)
        for (int64_t s = 0; s < slices; s++) {
            const REAL *row = partials + s * M * N + i * N;
#pragma omp simd
            for (int64_t j = 0; j < N; j++)
                C[i * ldc + j] += row[j];
        }
}

int GEMM(int trans_a, int trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
         const REAL *A, int64_t lda, int64_t batch_stride_a,
         const REAL *B, int64_t ldb, int64_t batch_stride_b,
         REAL *C, int64_t ldc, int64_t batch_stride_c, const REAL *bias, int accumulate,
         REAL *workspace, int64_t workspace_size, int num_threads)
{
    if (!gemm_arguments_valid(trans_a, trans_b, batch, M, N, K, A, lda, batch_stride_a,
                              B, ldb, batch_stride_b, C, ldc, batch_stride_c))
        return MINQKV_BAD_ARGUMENT;
    if (batch == 0 || M == 0 || N == 0)
        return MINQKV_OK;
    /* each thread packs into its own slice: a workspace sized for fewer threads would overlap */
    if (K > 0 && (!workspace || workspace_size < GEMM_WORKSPACE(batch, M, N, K, num_threads)))
        return MINQKV_BAD_ARGUMENT;
    if (K == 0) { /* an empty sum: C is the bias (or zero), or C += the bias */
        for (int64_t z = 0; z < batch; z++)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    REAL *c = C + z * batch_stride_c + i * ldc + j;
                    *c = (accumulate ? *c : (REAL)0) + (bias ? bias[j] : (REAL)0);
                }
        return MINQKV_OK;
    }

    /* each thread gets its own 64-byte aligned slice of the workspace; the slices of K computed
     * apart (if any) come after them */
    REAL *aligned = (REAL *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    struct gemm_plan plan = make_gemm_plan(batch, M, N, K, num_threads, MR, NR, KC);
    int64_t per_thread = NAME(workspace_per_thread)(N, K), slices = plan.k_pieces - 1;
    REAL *partials = aligned + plan.threads * per_thread;
    int64_t units = batch * plan.pieces * plan.k_pieces;
    if (plan.threads == 1) { /* no OpenMP at all: also safe in a fork()ed child */
        for (int64_t unit = 0; unit < units; unit++)
            NAME(gemm_unit)(unit, plan, trans_a, trans_b, M, N, K, A, lda, batch_stride_a, B, ldb,
                            batch_stride_b, C, ldc, batch_stride_c, bias, accumulate, partials, aligned);
        NAME(add_partials)(slices, 0, M, N, partials, M, C, ldc);
        return MINQKV_OK;
    }
#pragma omp parallel num_threads(plan.threads)
    {
#pragma omp for schedule(dynamic, 1) /* see BANDS_PER_THREAD */
        for (int64_t unit = 0; unit < units; unit++)
            NAME(gemm_unit)(unit, plan, trans_a, trans_b, M, N, K, A, lda, batch_stride_a, B, ldb,
                            batch_stride_b, C, ldc, batch_stride_c, bias, accumulate, partials,
                            aligned + THREAD_INDEX() * per_thread);
        if (slices > 0) { /* after the loop's barrier: every slice is in */
            int64_t i0, i1;
            thread_span(M, THREAD_INDEX(), THREAD_COUNT(), &i0, &i1);
            NAME(add_partials)(slices, i0, i1, N, partials, M, C, ldc);
        }
    }
    return MINQKV_OK;
}

#undef NAME
#undef REAL
#undef GEMM
#undef GEMM_NAIVE
#undef GEMM_WORKSPACE
#undef SUFFIX
#undef MR
#undef NR
#undef KC
#undef MC
#undef NC
