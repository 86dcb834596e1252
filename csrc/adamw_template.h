/* adamw_template.h: the AdamW update of adamw.c, written once for an element type.
 *
 * Not a header of the API. adamw.c includes this file twice, after defining REAL (the element
 * type), ADAMW (the API name, e.g. minqkv_adamw_f32) and SQRT (sqrt of that type); it #undefs
 * them at its end.
 */

/* The update of elements [0, n) of the arrays below (one thread's span), with the scalars already
 * rounded to REAL: c1 = 1 - beta1 and c2 = 1 - beta2, each rounded from the double. */
static HOT_KERNEL void PASTE(adamw_span, REAL)(REAL *param, const REAL *grad, REAL *m, REAL *v,
                                              int64_t n, REAL b1, REAL c1, REAL b2, REAL c2,
                                              REAL decay, REAL step, REAL bias2, REAL epsilon)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        REAL g = grad[i];
        REAL mi = b1 * m[i] + c1 * g;
        REAL vi = b2 * v[i] + c2 * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * decay - step * (mi / (SQRT(vi) / bias2 + epsilon));
    }
}

/* param, grad, m, v: (n,). With the scalars rounded once to REAL, as NumPy rounds a Python float:
 *   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
 *   p = p * decay_factor;          p = p - step_size * m / (sqrt(v) / bias2_sqrt + eps)
 * where the caller gives decay_factor = 1 - lr * weight_decay (1 for no decay),
 * step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t). */
int ADAMW(REAL *param, const REAL *grad, REAL *m, REAL *v, int64_t n, double beta1, double beta2,
          double decay_factor, double step_size, double bias2_sqrt, double eps, int num_threads)
{
    if (n < 0 || (n > 0 && (!param || !grad || !m || !v)))
        return MINQKV_BAD_ARGUMENT;
    int threads = threads_for_work((double)n, PARALLEL_MIN_ELEMENTS, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t start, end;
        thread_span(n, t, threads, &start, &end);
        PASTE(adamw_span, REAL)(param + start, grad + start, m + start, v + start, end - start,
                                (REAL)beta1, (REAL)(1.0 - beta1), (REAL)beta2, (REAL)(1.0 - beta2),
                                (REAL)decay_factor, (REAL)step_size, (REAL)bias2_sqrt, (REAL)eps);
    }
    return MINQKV_OK;
}

#undef REAL
#undef ADAMW
#undef SQRT
