/* internal.h: helpers shared by the kernel files; not part of the API (that is minqkv.h). */
#ifndef MINQKV_INTERNAL_H
#define MINQKV_INTERNAL_H

#include <stdint.h>
#include <string.h> /* also defines __GLIBC__ where glibc is the C library */

#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX() omp_get_thread_num()
#define THREAD_COUNT() omp_get_num_threads()
#else
#define THREAD_INDEX() 0
#define THREAD_COUNT() 1
#endif

/* Hot kernels are compiled several times, once per instruction set (AVX-512, AVX2+FMA and
 * plain x86-64), and the dynamic loader picks the best one for the CPU at load time. So one
 * binary runs on any x86-64 and is still fast on a recent one. Everywhere else (aarch64,
 * clang, non-glibc, or a -march=native build) the compiler's own target flags decide. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) \
    && !defined(MINQKV_NATIVE)
#if __GNUC__ >= 12
#define HOT_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CLONE_AVX512 "x86-64-v4"
#define CLONE_AVX2 "x86-64-v3"
#elif __GNUC__ >= 6
#define HOT_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#define CLONE_AVX512 "avx512f"
#define CLONE_AVX2 "avx2"
#endif
#endif
#ifndef HOT_KERNEL
#define HOT_KERNEL
#endif

/* Floats in one vector register of the code that runs: 16 in the AVX-512 clone, 8 in the AVX2
 * one, 4 otherwise (SSE2, or a CPU that is not x86). The clones are one source compiled three
 * times, so a kernel whose register tile must fit the register file asks this at run time; the
 * test is the one the loader used to pick the clone. */
static inline int vector_floats(void)
{
#if defined(CLONE_AVX512)
    if (__builtin_cpu_supports(CLONE_AVX512))
        return 16;
    return __builtin_cpu_supports(CLONE_AVX2) ? 8 : 4;
#elif defined(__AVX512F__)
    return 16;
#elif defined(__AVX2__)
    return 8;
#else
    return 4;
#endif
}

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* Token pasting through one extra level so that macro arguments are expanded first. */
#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Threads for a call of `work` units: all num_threads when the work pays for starting them
 * (work >= min_work), else one; always one in a build without OpenMP. */
static inline int threads_for_work(double work, double min_work, int num_threads)
{
#ifdef _OPENMP
    return work >= min_work && num_threads > 1 ? num_threads : 1;
#else
    (void)work, (void)min_work, (void)num_threads;
    return 1;
#endif
}
static inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

/* Thread t's share [*start, *end) of n items cut into `threads` equal spans (the last may be short).
 *
 * The kernels hand each share to a HOT_KERNEL function of its own instead of looping inside the
 * `omp parallel` region: GCC moves a region's body into a new function that does not inherit
 * target_clones, so a loop written there would only ever be compiled for baseline x86-64. */
static inline void thread_span(int64_t n, int t, int threads, int64_t *start, int64_t *end)
{
    int64_t span = (n + threads - 1) / threads;
    *start = min_i64(n, t * span);
    *end = min_i64(n, *start + span);
}

/* Vectorisable exponentials for the kernels (softmax, GELU's tanh, cross-entropy). */

/* e^t for t <= 0, float. Write t = n ln2 + r with n an integer and |r| <= ln2/2; then
 * e^t = 2^n e^r. 2^n is built directly in the exponent bits, e^r is a degree-7 Taylor
 * polynomial (truncation error below 1e-8 on that interval). Inputs below -87 return 0
 * (the true value is under 2e-38, far below what a softmax row can show next to its maximum
 * of 1). NaN inputs never get here: softmax_row deals with NaN rows first. */
static ALWAYS_INLINE float exp_f32(float t)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float clamped = t < -87.0f ? -87.0f : t;
    float shifted = clamped * 1.44269504f + magic; /* n + magic; n = round(t / ln2) */
    float n = shifted - magic;
    float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 split in two parts */
    float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t shifted_bits, n_int, scale_bits;
    int32_t magic_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    n_int = shifted_bits - magic_bits;             /* n, read off the low mantissa bits */
    scale_bits = (int32_t)((uint32_t)(n_int + 127) << 23); /* the float 2^n */
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return t < -87.0f ? 0.0f : p * scale;
}

/* e^t for t <= 0, double: the same scheme, degree-13 polynomial, flush below -708. */
static ALWAYS_INLINE double exp_f64(double t)
{
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double clamped = t < -708.0 ? -708.0 : t;
    double shifted = clamped * 1.4426950408889634 + magic;
    double n = shifted - magic;
    double r = (clamped - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0; /* 1/13! */
    const double inverse_factorials[13] = {
        1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
        1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0, 1.0};
    for (int k = 0; k < 13; k++)
        p = p * r + inverse_factorials[k];
    int64_t shifted_bits, magic_bits, scale_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    scale_bits = (int64_t)((uint64_t)(shifted_bits - magic_bits + 1023) << 52);
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return t < -708.0 ? 0.0 : p * scale;
}

#endif
