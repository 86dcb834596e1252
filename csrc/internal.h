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
#elif __GNUC__ >= 6
#define HOT_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef HOT_KERNEL
#define HOT_KERNEL
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* Token pasting through one extra level so that macro arguments are expanded first. */
#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

#endif
