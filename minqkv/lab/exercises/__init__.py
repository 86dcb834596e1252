"""Exercises: a learner's mode in which a piece of minqkv is blanked out and the learner writes it.

Each exercise is one small Python file: stubs/NAME.py has the signature, the shapes and the math
in its docstrings, and `raise NotImplementedError("your code here")` where the blank is;
solutions/NAME.py is the same file filled in. The learner never edits the package: `minqkv
exercise start NAME` copies the stub into a workspace folder, `minqkv exercise check NAME`
imports the learner's copy from there and grades it (grading.py: against minqkv's own code
and against finite differences), `hint` and `solution` help when stuck (workspace.py).

EXERCISES is the catalogue, in the order of the course: the backward passes of five ops,
then the attention pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WORKSPACE = "minqkv-exercises"  # the folder, under the current one, where the learner's copies go


@dataclass(frozen=True)
class Exercise:
    name: str  # the file's name without .py, and the name the commands take
    what: str  # one line: what the learner writes
    minutes: int  # about how long a learner who has read the matching lesson takes
    hints: tuple  # from a nudge to nearly the answer


EXERCISES = {e.name: e for e in [
    Exercise("mul_backward", "the gradient of a * b, with broadcasting summed back down", 15, (
        "Without broadcasting, da = grad * b and db = grad * a: each factor's gradient is the other factor.",
        "With broadcasting, one element of a may have produced many outputs; its gradient is the sum of "
        "theirs. So sum grad * b over the axes broadcasting added (the leading ones) ...",
        "... and over the axes where a has size 1 but the output does not (keepdims=True keeps them).",
    )),
    Exercise("matmul_backward", "the gradients of a @ b for 2-D a and b", 10, (
        "Write out dL/da[m, k] = sum_n grad[m, n] * b[k, n]. Which product of two matrices is that?",
        "Let the shapes guide you: da must be (M, K), and grad is (M, N), b is (K, N).",
        "da = grad @ b.T and db = a.T @ grad.",
    )),
    Exercise("softmax_backward", "the gradient of softmax over the last axis, from its output y", 20, (
        "dy_i/dx_j = y_i (1 - y_i) when i = j, and -y_i y_j when i != j: y_i (delta_ij - y_j).",
        "dx_j = sum_i grad_i y_i (delta_ij - y_j) = y_j grad_j - y_j sum_i grad_i y_i.",
        "One line: y * (grad - (grad * y).sum(axis=-1, keepdims=True)).",
    )),
    Exercise("layer_norm_backward", "the gradients of layer norm for x, weight and bias", 40, (
        "dbias = grad summed over every axis but the last; dweight = (grad * xhat) summed the same way.",
        "Recompute mu, rstd and xhat = (x - mu) * rstd as the forward does, and let dxhat = grad * weight.",
        "Through xhat: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means over the last "
        "axis with keepdims=True. The middle term is mu's share, the last one var's.",
    )),
    Exercise("cross_entropy_backward", "the gradient of the mean cross-entropy loss, ignored positions too", 20, (
        "For one row with target t: -log p_t = logsumexp(z) - z_t. Differentiate each term by z_j.",
        "d logsumexp(z) / dz_j = p_j, and d z_t / dz_j is 1 when j = t: the row's gradient is p - onehot(t).",
        "Divide by the number of counted rows, multiply by grad, and set the ignored rows to 0.",
    )),
    Exercise("attend", "causal attention of q over k, v: scores, mask, softmax, weighted sum (GQA too)", 30, (
        "For GQA, give every query head its key head: np.repeat(k, H // Hkv, axis=1), the same for v.",
        "Query i sits at position Tk - T + i: mask key j where j > Tk - T + i with -inf before the softmax "
        "(np.arange(Tk)[None, :] > np.arange(Tk - T, Tk)[:, None] is that mask, (T, Tk)).",
        "y = softmax(scores) @ v is (B, H, T, hd); swap axes 1 and 2, then reshape to (B, T, H * hd).",
    )),
    Exercise("project_shared_kv", "project() for the tied code 'abb': q = x W_a, k = v = x W_b, in heads", 15, (
        "split_heads: reshape (B, T, n * hd) to (B, T, n, hd), then transpose to (B, n, T, hd).",
        "Compute x @ w_b once, split it with n_kv_head heads, and return that one array as both k and v.",
        "n_kv_head=None means n_kv_head = n_head; hd is w_a.shape[1] // n_head.",
    )),
    Exercise("kv_cache", "the KV cache's append into a preallocated buffer that doubles when full", 25, (
        "In _written: when buffer is None or too short for start + T positions, make a new one with "
        "np.empty((B, max(start + T, 2 * capacity), width)) and copy buffer[:, :start] into it.",
        "Then write new into buffer[:, start:start + T] and return the buffer. append calls it for the keys, "
        "and for the values unless v_new is None, then adds T to length.",
        "Never write to positions below length: the views handed out earlier would change.",
    )),
    Exercise("hard_concrete", "the hard-concrete gate z(log_alpha), sampled or deterministic, from ops", 15, (
        "Use Tensor arithmetic and ops: ops.sigmoid(t), ops.clip(t, 0.0, 1.0), t * number, t + array.",
        "The logistic noise is np.log(u) - np.log1p(-u), a plain array: add it to log_alpha, then divide by BETA.",
        "z = ops.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0).",
    )),
]}


def exercise(name: str) -> Exercise:
    """The exercise called `name`, or a ValueError that lists them."""
    if name not in EXERCISES:
        raise ValueError(f"no exercise called {name!r}; there are: {', '.join(EXERCISES)}")
    return EXERCISES[name]
