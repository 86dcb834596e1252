# %% [markdown]
# # Lesson 12: backward passes derived by hand
#
# Run: `python tutorials/12_backward_by_hand.py` (times: tutorials/README.md). It reads and writes
# no files and draws nothing. Open beside it: `minqkv/ops.py` (`softmax`, `layer_norm`,
# `causal_attention`, each with its backward in one comment line), `minqkv/attention.py`
# (`scores_and_weights`, `weighted_values`) and `minqkv/lab/gradcheck.py`.
#
# Lesson 1 let the engine apply the chain rule one small op at a time; lesson 2 checked each op.
# Real code fuses: minqkv's `softmax`, `layer_norm` and `causal_attention` each have one
# hand-written backward instead of a chain of tiny ones, because it is faster and needs less
# memory. Here we derive those three backwards on paper, write them in plain NumPy, and check
# each one twice: (a) against minqkv's engine doing the same computation, to 1e-10 in float64,
# and (b) against central differences, with no calculus at all.
#
# Convention, as in the engine: `g` is the gradient arriving at an op's output, dL/dy, for some
# scalar loss L further on; a backward returns dL/d(each input), the same shape as that input.

# %%
import argparse

import numpy as np

from minqkv import ops
from minqkv.attention import scores_and_weights, weighted_values
from minqkv.lab.gradcheck import gradcheck
from minqkv.tensor import Tensor

parser = argparse.ArgumentParser(description="Lesson 12: backward passes derived by hand")
parser.add_argument("--out", default=None, help="output folder (this lesson draws nothing)")
args, _ = parser.parse_known_args()

rng = np.random.default_rng(12)
AGREE = 1e-10  # hand backward vs the engine: the same math, so only rounding may differ


def largest_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def engine_grads(fn, arrays: list, g: np.ndarray) -> list:
    """dL/d(each array) by minqkv's engine, for L = sum(fn(*tensors) * g): so dL/d(output) = g."""
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    ops.sum(fn(*tensors) * g).backward()
    return [t.grad for t in tensors]


# %% [markdown]
# ## 1. Softmax
#
# One row x of n numbers: y_i = exp(x_i) / sum_k exp(x_k). Write s = sum_k exp(x_k).
#
# **Step 1: the Jacobian**, dy_i/dx_j, one entry per (output i, input j). By the quotient rule,
#
#     i == j:  dy_i/dx_i = (exp(x_i) s - exp(x_i) exp(x_i)) / s^2 = y_i - y_i y_i
#     i != j:  dy_i/dx_j = (0 * s - exp(x_i) exp(x_j)) / s^2     =     - y_i y_j
#
# Both cases in one line: dy_i/dx_j = y_i (delta_ij - y_j), or as a matrix
#
#     J = diag(y) - y y^T                   (n, n), symmetric
#
# **Step 2: the chain rule.** dL/dx_j = sum_i dL/dy_i dy_i/dx_j = sum_i g_i J_ij, i.e.
# dx = J^T g = J g (J is symmetric):
#
#     dx = diag(y) g - y (y^T g) = y * g - y * sum(g * y)
#
# **Step 3: never build J.** It is n x n per row (for attention, T x T per query); the last form
# needs one dot product per row:
#
#     dx = y * (g - sum(g * y))             (the comment above `ops.softmax`)
#
# Why the rows of J sum to zero: adding the same number to every x_i changes no y_i, so moving
# all inputs together moves nothing; the same fact makes every row of dx sum to zero.

# %%


def softmax_forward(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis. Subtracting the row maximum changes nothing (see above) and avoids overflow."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """d softmax: y * (g - sum(g*y)), row by row; needs only the output y."""
    return y * (g - (g * y).sum(axis=-1, keepdims=True))


x = rng.standard_normal((3, 5))  # 3 rows of 5
g = rng.standard_normal((3, 5))
y = softmax_forward(x)
dx = softmax_backward(y, g)

jacobian = np.diag(y[0]) - np.outer(y[0], y[0])  # (5, 5), row 0 only
print("row 0: J^T g =", np.round(jacobian.T @ g[0], 6))
print("row 0: y * (g - sum(g*y)) =", np.round(dx[0], 6))
assert largest_gap(jacobian.T @ g[0], dx[0]) < AGREE  # step 3 is step 2, without the matrix
assert np.allclose(jacobian, jacobian.T) and np.abs(jacobian.sum(axis=1)).max() < AGREE
assert np.abs(dx.sum(axis=-1)).max() < AGREE  # a shift of a whole row changes nothing

# %% [markdown]
# **(a) Against the engine.** `ops.softmax` on a Tensor, then `backward()` with the same g.

# %%
(engine_dx,) = engine_grads(ops.softmax, [x], g)
print(f"softmax: hand vs engine, largest gap {largest_gap(dx, engine_dx):.1e}")
assert largest_gap(dx, engine_dx) < AGREE

# %% [markdown]
# **(b) Against central differences.** `gradcheck` (lesson 2) checks an op's backward closure.
# So we make our two NumPy functions an op, exactly as `minqkv/ops.py` does:
# `Tensor.from_op(output, parents, backward, name)`, where `backward` maps g to one gradient per
# parent. gradcheck then compares *our* backward with (L(x + eps) - L(x - eps)) / 2 eps.

# %%


def hand_softmax(x: Tensor) -> Tensor:
    y = softmax_forward(x.data)
    return Tensor.from_op(y, (x,), lambda g: (softmax_backward(y, g),), "hand_softmax")


(softmax_error,) = gradcheck(hand_softmax, [Tensor(x.copy(), requires_grad=True)])
print(f"softmax: hand vs central differences, relative error {softmax_error:.1e}")
assert softmax_error < 1e-8

# %% [markdown]
# ## 2. Layer norm
#
# One row x of C numbers, a weight w and a bias b of C numbers each:
#
#     mu = mean(x)    var = mean((x - mu)^2)    rstd = 1 / sqrt(var + eps)
#     xhat = (x - mu) * rstd                    y = xhat * w + b
#
# **The easy two.** y = xhat * w + b is elementwise, and w, b are shared by every row, so their
# gradients add up over the rows (lesson 1: a value used many times gets the sum):
#
#     dbias = sum over rows of g        dweight = sum over rows of g * xhat
#
# and the gradient reaching xhat is dxhat = g * w.
#
# **The hard one, dx.** Every xhat_i depends on every x_j, through mu and rstd. Take them in turn:
#
#     dmu/dx_j   = 1/C
#     dvar/dx_j  = (2/C) (x_j - mu)            (the mu terms cancel: sum_k (x_k - mu) = 0)
#     drstd/dx_j = -1/2 (var + eps)^(-3/2) dvar/dx_j = -rstd^3 (x_j - mu) / C = -rstd^2 xhat_j / C
#
# then the product rule on xhat_i = (x_i - mu) rstd:
#
#     dxhat_i/dx_j = rstd (delta_ij - 1/C) + (x_i - mu) drstd/dx_j
#                  = rstd (delta_ij - 1/C - xhat_i xhat_j / C)
#
# and the chain rule, dx_j = sum_i dxhat_i dxhat_i/dx_j, gives **three terms**:
#
#     dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
#
# Read them: the gradient as if mu and rstd were constants, minus its mean (moving all x together
# moves no xhat), minus its component along xhat (scaling x - mu moves no xhat either).

# %%


def layer_norm_forward(x, w, b, eps=1e-5):
    """(y, xhat, rstd) over the last axis; xhat and rstd are what the backward needs."""
    mu = x.mean(axis=-1, keepdims=True)  # (N, 1)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat = (x - mu) * rstd  # (N, C)
    return xhat * w + b, xhat, rstd


def layer_norm_backward(g, xhat, rstd, w):
    """(dx, dweight, dbias): dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * w."""
    dxhat = g * w  # (N, C)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, (g * xhat).sum(axis=0), g.sum(axis=0)


x = rng.standard_normal((4, 6)) * 2 + 1  # 4 rows of C = 6, not already normalised
w, b = rng.standard_normal(6), rng.standard_normal(6)
g = rng.standard_normal((4, 6))
y, xhat, rstd = layer_norm_forward(x, w, b)
dx, dweight, dbias = layer_norm_backward(g, xhat, rstd, w)
print("row sums of dx (shift invariance):", np.round(dx.sum(axis=-1), 14))
along_x = (dx * (x - x.mean(axis=-1, keepdims=True))).sum(axis=-1)  # dx . (x - mu), row by row
print("row sums of dx * (x - mu) (scale invariance):", np.round(along_x, 6))
assert np.abs(dx.sum(axis=-1)).max() < AGREE  # the second term at work
assert np.abs(along_x).max() < 1e-3  # the third term at work, up to eps (next paragraph)

# %% [markdown]
# The second print is not zero: eps makes layer norm only *almost* blind to the scale of x - mu.
# (Set eps = 0 and it would vanish too.) Now the two checks, as for softmax.

# %%
engine = engine_grads(ops.layer_norm, [x, w, b], g)
gaps = [largest_gap(hand, e) for hand, e in zip((dx, dweight, dbias), engine)]
print("layer norm: hand vs engine, largest gaps (dx, dweight, dbias):", ", ".join(f"{e:.1e}" for e in gaps))
assert max(gaps) < AGREE


def hand_layer_norm(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    y, xhat, rstd = layer_norm_forward(x.data, w.data, b.data)
    return Tensor.from_op(y, (x, w, b), lambda g: layer_norm_backward(g, xhat, rstd, w.data), "hand_layer_norm")


layer_norm_errors = gradcheck(hand_layer_norm, [Tensor(a.copy(), requires_grad=True) for a in (x, w, b)])
print("layer norm: hand vs central differences (x, w, b):", ", ".join(f"{e:.1e}" for e in layer_norm_errors))
assert max(layer_norm_errors) < 1e-8

# %% [markdown]
# ## 3. Causal attention, one head
#
# Queries, keys, values q, k, v of shape (T, d). The forward, in three steps:
#
#     S = q k^T / sqrt(d), and -inf where key j > query i   (T, T): the causal mask
#     P = softmax(S)                                         (T, T), row by row; 0 where masked
#     y = P v                                                (T, d)
#
# Backward is the same three steps, last one first. For a product C = A B the rule (lesson 1's
# matrix case) is dA = dC B^T, dB = A^T dC, so:
#
#     y = P v:         dP = g v^T               (T, d) @ (d, T) -> (T, T)
#                      dv = P^T g               (T, T) @ (T, d) -> (T, d)
#     P = softmax(S):  dS = P * (dP - rowsum(dP * P))      section 1, each row of S is one softmax
#     S = q k^T / sqrt(d):
#                      dq = dS k / sqrt(d)      (T, T) @ (T, d) -> (T, d)
#                      dk = dS^T q / sqrt(d)    (T, T) @ (T, d) -> (T, d)
#
# The mask needs no backward of its own: a masked score is a constant (-inf), and its P is 0, so
# the softmax backward gives it dS = 0 and nothing flows into q or k from a future key.

# %%


def attention_forward(q, k, v):
    """(y, P) for one causal head: q, k, v (T, d) -> y (T, d), P (T, T)."""
    T, d = q.shape
    S = q @ k.T / np.sqrt(d)  # (T, d) @ (d, T) -> (T, T)
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)  # key j > query i: never seen
    P = softmax_forward(S)  # (T, T), exactly 0 above the diagonal
    return P @ v, P  # (T, T) @ (T, d) -> (T, d)


def attention_backward(g, q, k, v, P):
    """(dq, dk, dv) of one causal head, g = dL/dy (T, d)."""
    d = q.shape[1]
    dv = P.T @ g  # (T, T) @ (T, d) -> (T, d)
    dP = g @ v.T  # (T, d) @ (d, T) -> (T, T)
    dS = softmax_backward(P, dP)  # (T, T), 0 where masked
    dq = dS @ k / np.sqrt(d)  # (T, T) @ (T, d) -> (T, d)
    dk = dS.T @ q / np.sqrt(d)  # (T, T) @ (T, d) -> (T, d)
    return dq, dk, dv


T, d = 5, 4
q, k, v = (rng.standard_normal((T, d)) for _ in range(3))
g = rng.standard_normal((T, d))
y, P = attention_forward(q, k, v)
dq, dk, dv = attention_backward(g, q, k, v, P)
dS = softmax_backward(P, g @ v.T)
print("dS (zero above the diagonal: the mask):\n", np.round(dS, 3))
assert np.all(np.triu(P, 1) == 0) and np.all(np.triu(dS, 1) == 0)
assert np.abs(dq[0]).max() < AGREE  # explained next

# %% [markdown]
# The first row of dS, and so dq[0], is exactly zero. Query 0 sees one key, its own: its weights
# are [1, 0, 0, ...] whatever its score, so moving q_0 changes nothing (in the formula:
# dS[0, 0] = 1 * (dP[0, 0] - dP[0, 0] * 1) = 0). Its output y_0 = v_0 still depends on v.

# %% [markdown]
# **(a) Against the engine, twice.** minqkv computes attention two ways (lesson 4): step by step,
# `scores_and_weights` then `weighted_values`, where the engine chains the backwards of matmul,
# the causal `softmax` and the reshapes; and fused, `ops.causal_attention`, one op whose
# backward is the five lines above, with one saving: its comment in `minqkv/ops.py` reads
# `ds = p (g v^T - rowsum(g * y))`. That is our dS, because rowsum(dP * P) = sum_j (g v^T)_ij P_ij
# = sum_c g_ic (P v)_ic = rowsum(g * y): d numbers per row multiplied instead of T. Both want heads:
# (B, H, T, d) = (1, 1, T, d) here.

# %%
assert largest_gap((g @ v.T * P).sum(axis=-1), (g * y).sum(axis=-1)) < AGREE


def stepwise(q, k, v):  # (1, 1, T, d) each -> (1, T, d)
    _, weights = scores_and_weights(q, k)
    return weighted_values(weights, v)


def heads(a):  # (T, d) -> (1, 1, T, d)
    return a.reshape(1, 1, T, d)


for name, fn, g_shaped in (("step by step", stepwise, g.reshape(1, T, d)),
                           ("fused causal_attention", ops.causal_attention, heads(g))):
    engine = engine_grads(fn, [heads(q), heads(k), heads(v)], g_shaped)
    gaps = [largest_gap(hand, e.reshape(T, d)) for hand, e in zip((dq, dk, dv), engine)]
    print(f"attention, {name}: hand vs engine, largest gaps (dq, dk, dv):", ", ".join(f"{e:.1e}" for e in gaps))
    assert max(gaps) < AGREE

# %% [markdown]
# **(b) Against central differences**, our three tensors' gradients at once:

# %%


def hand_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    y, P = attention_forward(q.data, k.data, v.data)
    return Tensor.from_op(y, (q, k, v), lambda g: attention_backward(g, q.data, k.data, v.data, P), "hand_attention")


attention_errors = gradcheck(hand_attention, [Tensor(a.copy(), requires_grad=True) for a in (q, k, v)])
print("attention: hand vs central differences (q, k, v):", ", ".join(f"{e:.1e}" for e in attention_errors))
assert max(attention_errors) < 1e-8

# %% [markdown]
# **What you learned:** a fused backward is the chain rule done once on paper. Softmax's
# Jacobian diag(y) - y y^T collapses to y * (g - sum(g*y)); layer norm's dx is three terms (the
# plain gradient, minus its mean, minus its part along xhat), and its weight and bias gradients
# are sums over rows; attention's backward is two matrix-product rules around one softmax
# backward, with the causal mask taken care of by the zeros of P. Each hand-written NumPy
# backward equals minqkv's engine to 1e-10 and central differences to 1e-8 in float64.

# %%
assert softmax_error < 1e-8 and max(layer_norm_errors) < 1e-8 and max(attention_errors) < 1e-8
print("lesson 12 done")
