"""One AdamW update of a parameter array in place, as a NumPy reference beside its binding to the
C core (csrc/adamw.c, csrc/adamw_template.h). optim.AdamW computes the scalars and checks them."""

import numpy as np

from . import runtime
from .runtime import check_float_array, check_same_dtype, check_same_shape, pointer


def _check_adamw(param, grad, m, v):
    for name, array in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        check_float_array("adamw_update", name, array)
        check_same_dtype("adamw_update", "param", param, name, array)
        check_same_shape("adamw_update", "param", param, name, array)
        if name != "grad" and not array.flags.writeable:
            raise ValueError(f"adamw_update: {name} is updated in place but is read-only")


def adamw_update_numpy(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps):
    """One AdamW update of param, m and v in place (see minqkv_adamw in csrc/minqkv.h):
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p = p decay - step m / (sqrt(v) / bias2 + eps),
    with decay_factor = 1 - lr * weight_decay, step_size = lr / (1 - b1^t) and
    bias2_sqrt = sqrt(1 - b2^t) > 0 at the parameter's t-th update."""
    _check_adamw(param, grad, m, v)
    m *= beta1  # Python floats keep float32 arrays float32 (NumPy 2 promotion rules)
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * grad * grad
    if decay_factor != 1.0:
        param *= decay_factor
    param -= step_size * (m / (np.sqrt(v) / bias2_sqrt + eps))


def adamw_update_c(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps):
    """One AdamW update in place on the C core; same contract as adamw_update_numpy. Arrays that
    are not C-contiguous cannot be updated in place by C: they go to the NumPy twin."""
    runtime.require_c("adamw_update")
    _check_adamw(param, grad, m, v)
    if not all(a.flags.c_contiguous and a.flags.aligned for a in (param, m, v)):
        return adamw_update_numpy(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps)
    grad = runtime.contiguous(grad)
    status = runtime.c_function("adamw", param.dtype)(
        pointer(param), pointer(grad), pointer(m), pointer(v), param.size, float(beta1), float(beta2),
        float(decay_factor), float(step_size), float(bias2_sqrt), float(eps), runtime.get_num_threads())
    runtime.check_status("adamw_update", status)
