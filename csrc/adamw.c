/* adamw.c: one AdamW update (Loshchilov & Hutter, 2019) of a parameter array, in place.
 *
 * Each element reads its parameter, gradient and two moments once and writes three of them
 * back: no temporary arrays, where the NumPy formula makes about ten passes over memory.
 */
#include <math.h>

#include "minqkv.h"
#include "internal.h"

/* Below this many elements a call runs on one thread. Measured on 2 cores (one float32 update,
 * call overhead included): 16k elements take 11.3 us on one thread, 8.5-10 us on two; at 8k the
 * second thread saved 0-2 us of 8 and sometimes cost as much. A projection matrix of the
 * default model has 16k. */
#define PARALLEL_MIN_ELEMENTS (1 << 14)

#define REAL float
#define ADAMW minqkv_adamw_f32
#define SQRT sqrtf
#include "adamw_template.h"

#define REAL double
#define ADAMW minqkv_adamw_f64
#define SQRT sqrt
#include "adamw_template.h"
