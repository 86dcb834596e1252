"""Linear attention: softmax's exp(q . k) replaced by a product of feature maps phi(q) . phi(k).

Then the weighted sum over earlier keys regroups (Katharopoulos et al. 2020, "Transformers are RNNs"):

    y_t = sum_{s<=t} (phi_q_t . phi_k_s) v_s / sum_{s<=t} phi_q_t . phi_k_s
        = phi_q_t S_t / (phi_q_t . z_t + eps),   S_t = sum_{s<=t} phi_k_s v_s^T,  z_t = sum_{s<=t} phi_k_s

so a decoder keeps one (m, dv) matrix and one m-vector per key/value head, however long the text.

Read top to bottom:
  feature maps      elu_features (elu(x) + 1), draw_performer_projection and performer_features
                    (FAVOR+ positive random features, Choromanski et al. 2021)
  the causal op     causal_linear_attention (chunked, one op with its backward), and beside it
                    causal_linear_attention_naive (the quadratic masked form, built from ops.py)
  decoding          LinearState and linear_attention_decode (T_new tokens given the state of the earlier ones)
  input checks      kept at the end, out of the way of the math

Shapes: B batch, H query heads, Hkv key/value heads (query head h reads key/value head h // (H // Hkv)),
T tokens, d head width of q and k, m features, dv head width of v, C tokens per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .tensor import FLOAT_DTYPES, Tensor, no_grad

DEFAULT_CHUNK = 64


# Feature maps.


def elu_features(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1: x + 1 for x > 0, exp(x) otherwise; positive, so denominators stay > 0.

    (B, H, T, d) -> (B, H, T, d) (any shape works: it is elementwise)."""
    x = _float_tensor(x, "elu_features", "x")
    negative = np.exp(np.minimum(x.data, 0))  # exp only where it is used: no overflow for large x
    out = np.where(x.data > 0, x.data + 1, negative)
    # d phi/dx = 1 for x > 0, exp(x) otherwise
    return Tensor.from_op(out, (x,), lambda g: (g * np.where(x.data > 0, 1, negative),), "elu_features")


def draw_performer_projection(d: int, m: int, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """W (d, m): m random feature directions for performer_features, drawn as FAVOR+ does.

    The directions come in blocks of d that are exactly orthogonal (a Haar-random orthogonal matrix
    each: the QR factor of a Gaussian matrix, signs fixed by R's diagonal), and each direction gets
    the length of an independent Gaussian vector of d entries (a chi distribution with d degrees of
    freedom). So each column alone is a standard Gaussian vector, which keeps the softmax-kernel
    estimate unbiased, while orthogonality within a block lowers its variance (the paper's Theorem 2).
    """
    _check_projection_sizes(d, m, rng, dtype)
    blocks = []
    for _ in range(-(-m // d)):  # ceil(m / d) blocks of d orthogonal directions
        q, r = np.linalg.qr(rng.standard_normal((d, d)))  # q's columns are orthonormal
        blocks.append(q * np.where(np.diag(r) < 0, -1.0, 1.0))  # sign fix: Haar-uniform, not QR-biased
    directions = np.concatenate(blocks, axis=1)[:, :m]  # (d, m), unit columns
    lengths = np.sqrt(rng.chisquare(d, size=m))  # (m,): the norms of m Gaussian vectors in R^d
    return (directions * lengths).astype(dtype)


def performer_features(x: Tensor, projection: np.ndarray) -> Tensor:
    """Positive random features phi(x) = exp(x' W - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4).

    x (B, H, T, d), projection W (d, m) from draw_performer_projection -> (B, H, T, m).
    E_W[phi(q) . phi(k)] = exp(q' . k') = exp(q . k / sqrt(d)): softmax attention's weight, estimated.

    Overflow. The exponent is x' w - |x'|^2 / 2 = |w|^2 / 2 - |x' - w|^2 / 2 <= |w|^2 / 2 for each
    column w of W: it is bounded by the projection alone, whatever x is. A column's |w|^2 is a
    chi-squared draw with d degrees of freedom (about d +- sqrt(2 d)), so for the head widths used
    here (d <= 64: |w|^2 / 2 around 32, far below exp's limit of 88 in float32 and 709 in float64)
    phi cannot overflow; a projection whose bound passes the dtype's limit is refused (ValueError).
    No data-dependent shift (such as subtracting each row's maximum) is applied: it would make
    phi(q) . phi(k) estimate a rescaled kernel and, for keys, change the weights between tokens.
    Large |x| makes phi small instead (underflow to 0 in the worst case), and the attention's eps
    keeps that finite: 0 features give a 0 output and 0 gradients, never NaN.
    """
    x, projection = _check_performer_inputs(x, projection)
    d, m = projection.shape
    scale = d ** -0.25
    xs = x.data * scale  # x' (B, H, T, d)
    exponent = xs @ projection - 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)  # (B, H, T, m)
    out = np.exp(exponent) / m ** 0.5  # (B, H, T, m); a Python float keeps float32 float32

    def backward(g):  # de = g phi;  dx = scale (de W^T - x' sum_j de_j)
        de = g * out  # (B, H, T, m)
        return (scale * (de @ projection.T - xs * de.sum(axis=-1, keepdims=True)),)

    return Tensor.from_op(out, (x,), backward, "performer_features")


# The causal op: chunked. Within a chunk of C tokens the masked quadratic form, across chunks the
# running state (S, z) of every earlier chunk.


def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float = 1e-6,
                            chunk: int = DEFAULT_CHUNK) -> Tensor:
    """y_t = phi_q_t S_t / (phi_q_t . z_t + eps), with S_t, z_t the sums of phi_k_s v_s^T, phi_k_s over s <= t.

    phi_q (B, H, T, m), phi_k (B, Hkv, T, m), v (B, Hkv, T, dv) -> y (B, H, T, dv). The features
    should be positive (elu_features, performer_features) so that the denominator is.

    Cost per query head, chunks of C tokens: forward time O(T C (m + dv) + T m dv) (the within-chunk
    products and the state's reads and updates), about twice that for the backward pass; working
    memory O(C^2 + m dv) per head besides the inputs, y and the gradients, never the O(T m dv) that
    keeping S_t for every t would take, nor a (T, T) matrix. Saved for backward: y and one number per
    query (its denominator); the backward pass rebuilds the running state chunk by chunk.
    With C = T this is the quadratic form; with C = 1, the recurrence.
    """
    B, H, Hkv, T, m, dv = _check_attention_inputs(phi_q, phi_k, v, eps, chunk, "causal_linear_attention")
    G, eps = H // Hkv, float(eps)  # a Python float: a NumPy float64 would turn float32 arrays into float64
    q5 = phi_q.data.reshape(B, Hkv, G, T, m)  # query heads grouped under their key/value head
    k, vv = phi_k.data, v.data  # (B, Hkv, T, m), (B, Hkv, T, dv)
    S0, z0 = np.zeros((B, Hkv, m, dv), v.dtype), np.zeros((B, Hkv, m), v.dtype)
    y5, den, _, _ = _scan(q5, k, vv, S0, z0, eps, chunk)  # (B, Hkv, G, T, dv), (B, Hkv, G, T)

    def backward(g):
        # y = num / (den + eps): dnum = g r, dden = -(g . y) r with r = 1 / (den + eps);
        # num_t = sum_{s<=t} a_ts v_s, den_t = sum_{s<=t} a_ts with a_ts = q_t . k_s
        r = 1.0 / (den + eps)  # (B, Hkv, G, T)
        g5 = g.reshape(y5.shape)  # (B, Hkv, G, T, dv)
        dnum = g5 * r[..., None]
        dden = -np.sum(g5 * y5, axis=-1) * r
        dq = _query_gradient(q5, k, vv, dnum, dden, chunk)
        dk, dv_ = _key_value_gradients(q5, k, vv, dnum, dden, chunk)
        return dq.reshape(phi_q.shape), dk, dv_

    return Tensor.from_op(y5.reshape(B, H, T, dv), (phi_q, phi_k, v), backward, "causal_linear_attention")


def _chunks(T: int, chunk: int):
    return [slice(start, min(start + chunk, T)) for start in range(0, T, chunk)]


def _scan(q5, k, v, S, z, eps, chunk):
    """The forward pass from the state (S, z) of earlier tokens; returns y, the denominators and the new state.

    q5 (B, Hkv, G, T, m), k (B, Hkv, T, m), v (B, Hkv, T, dv), S (B, Hkv, m, dv), z (B, Hkv, m)."""
    y = np.empty(q5.shape[:-1] + v.shape[-1:], v.dtype)  # (B, Hkv, G, T, dv)
    den = np.empty(q5.shape[:-1], v.dtype)  # (B, Hkv, G, T): phi_q_t . z_t, eps not added
    S, z = S.copy(), z.copy()
    for c in _chunks(q5.shape[3], chunk):
        qc, kc, vc = q5[..., c, :], k[:, :, None, c], v[:, :, None, c]  # (B,Hkv,G,C,m), (B,Hkv,1,C,m), (B,Hkv,1,C,dv)
        a = np.tril(qc @ kc.swapaxes(-1, -2))  # (B, Hkv, G, C, C): a_ts = q_t . k_s for s <= t in the chunk
        num = qc @ S[:, :, None] + a @ vc  # earlier chunks through the state, this one directly: (B,Hkv,G,C,dv)
        den[..., c] = (qc @ z[:, :, None, :, None])[..., 0] + a.sum(axis=-1)  # (B, Hkv, G, C)
        y[..., c, :] = num / (den[..., c, None] + eps)
        S += kc[:, :, 0].swapaxes(-1, -2) @ vc[:, :, 0]  # + sum_s k_s v_s^T: (B, Hkv, m, dv)
        z += kc[:, :, 0].sum(axis=-2)  # + sum_s k_s: (B, Hkv, m)
    return y, den, S, z


def _pair_gradient(dnum_c, dden_c, vc):
    """dL/da_ts = dnum_t . v_s + dden_t for s <= t in a chunk: (B, Hkv, G, C, C)."""
    return np.tril(dnum_c @ vc.swapaxes(-1, -2) + dden_c[..., None])


def _query_gradient(q5, k, v, dnum, dden, chunk):
    """dq_t = S_t dnum_t + dden_t z_t: a forward pass over the chunks, rebuilding the running state."""
    B, Hkv, _, T, m = q5.shape
    dq = np.empty_like(q5)  # (B, Hkv, G, T, m)
    S, z = np.zeros((B, Hkv, m, v.shape[-1]), v.dtype), np.zeros((B, Hkv, m), v.dtype)
    for c in _chunks(T, chunk):
        kc, vc = k[:, :, None, c], v[:, :, None, c]  # (B, Hkv, 1, C, m), (B, Hkv, 1, C, dv)
        b = _pair_gradient(dnum[..., c, :], dden[..., c], vc)  # (B, Hkv, G, C, C)
        dq[..., c, :] = (dnum[..., c, :] @ S[:, :, None].swapaxes(-1, -2)  # earlier chunks' S_t dnum_t
                         + dden[..., c, None] * z[:, :, None, None, :]  # earlier chunks' dden_t z_t
                         + b @ kc)  # this chunk's pairs
        S += kc[:, :, 0].swapaxes(-1, -2) @ vc[:, :, 0]
        z += kc[:, :, 0].sum(axis=-2)
    return dq


def _key_value_gradients(q5, k, v, dnum, dden, chunk):
    """dk_s = R_s v_s + u_s and dv_s = R_s^T k_s, with the suffix sums over later queries of the
    group R_s = sum_{t>=s} q_t dnum_t^T (m, dv) and u_s = sum_{t>=s} dden_t q_t (m): a backward pass."""
    B, Hkv, _, T, m = q5.shape
    dk, dv = np.empty_like(k), np.empty_like(v)  # (B, Hkv, T, m), (B, Hkv, T, dv)
    R, u = np.zeros((B, Hkv, m, v.shape[-1]), v.dtype), np.zeros((B, Hkv, m), v.dtype)
    for c in reversed(_chunks(T, chunk)):
        qc, kc, vc = q5[..., c, :], k[:, :, None, c], v[:, :, None, c]
        dnum_c, dden_c = dnum[..., c, :], dden[..., c]  # (B, Hkv, G, C, dv), (B, Hkv, G, C)
        a = np.tril(qc @ kc.swapaxes(-1, -2))  # (B, Hkv, G, C, C)
        b = _pair_gradient(dnum_c, dden_c, vc)
        # this chunk's pairs (summed over the query heads of the group), then the later chunks' R and u
        dk[:, :, c] = (b.swapaxes(-1, -2) @ qc).sum(axis=2) + vc[:, :, 0] @ R.swapaxes(-1, -2) + u[:, :, None]
        dv[:, :, c] = (a.swapaxes(-1, -2) @ dnum_c).sum(axis=2) + kc[:, :, 0] @ R
        R += (qc.swapaxes(-1, -2) @ dnum_c).sum(axis=2)  # + sum_t q_t dnum_t^T
        u += (qc * dden_c[..., None]).sum(axis=(2, 3))  # + sum_t dden_t q_t
    return dk, dv


def causal_linear_attention_naive(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """The reference: the (T, T) matrix of phi_q_t . phi_k_s, masked to s <= t, built from ops.py
    (so the engine differentiates it, independently of the op's hand-written backward). O(T^2) memory."""
    B, H, Hkv, T, m, dv = _check_attention_inputs(phi_q, phi_k, v, eps, 1, "causal_linear_attention_naive")
    heads = np.arange(H) // (H // Hkv)  # query head h reads key/value head h // (H // Hkv)
    k, vv = phi_k[:, heads], v[:, heads]  # (B, H, T, m), (B, H, T, dv)
    weights = ops.matmul(phi_q, ops.swapaxes(k, -1, -2)) * np.tril(np.ones((T, T), phi_q.dtype))  # (B, H, T, T)
    return ops.matmul(weights, vv) / (ops.sum(weights, axis=-1, keepdims=True) + eps)  # (B, H, T, dv)


# Decoding: a state of constant size, S (m, dv) and z (m) per key/value head.


@dataclass(frozen=True)
class LinearState:
    """What linear attention keeps of the tokens seen so far: S = sum phi_k v^T, z = sum phi_k."""

    S: np.ndarray  # (B, Hkv, m, dv)
    z: np.ndarray  # (B, Hkv, m)
    length: int = 0  # tokens summed into S and z

    @classmethod
    def empty(cls, B: int, Hkv: int, m: int, dv: int, dtype=np.float64) -> "LinearState":
        if np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"LinearState.empty: dtype must be float32 or float64, got {np.dtype(dtype)}")
        return cls(np.zeros((B, Hkv, m, dv), dtype), np.zeros((B, Hkv, m), dtype), 0)

    @property
    def nbytes(self) -> int:
        """Bytes held, the same after 1 token or 10,000."""
        return self.S.nbytes + self.z.nbytes


def linear_attention_decode(phi_q, phi_k, v, state: LinearState, eps: float = 1e-6,
                            chunk: int = DEFAULT_CHUNK) -> tuple:
    """y for T_new >= 1 new tokens given the state of the earlier ones, and the state after them.

    phi_q (B, H, T_new, m), phi_k (B, Hkv, T_new, m), v (B, Hkv, T_new, dv): Tensors or arrays;
    y (B, H, T_new, dv) comes back as the same kind as phi_q, without a graph (decoding needs no
    gradient). The state given is not changed. Cost per token: O(m dv) per head, whatever came before.
    """
    given_tensors = isinstance(phi_q, Tensor)
    with no_grad():
        phi_q, phi_k, v = (x if isinstance(x, Tensor) else Tensor(x) for x in (phi_q, phi_k, v))
        B, H, Hkv, T, m, dv = _check_attention_inputs(phi_q, phi_k, v, eps, chunk, "linear_attention_decode")
        _check_state(state, (B, Hkv, m, dv), v.dtype, T)
        eps = float(eps)
        q5 = phi_q.data.reshape(B, Hkv, H // Hkv, T, m)
        y5, _, S, z = _scan(q5, phi_k.data, v.data, state.S, state.z, eps, chunk)
    y = y5.reshape(B, H, T, dv)
    return (Tensor(y) if given_tensors else y), LinearState(S, z, state.length + T)


# Input checks: errors that name the function and the argument.


def _float_tensor(x, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {x.dtype}")
    return x


def _is_count(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))


def _check_projection_sizes(d, m, rng, dtype) -> None:
    for name, n in (("d", d), ("m", m)):
        if not _is_count(n) or n < 1:
            raise ValueError(f"draw_performer_projection: {name} must be a whole number >= 1, got {n!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"draw_performer_projection: rng must be a numpy.random.Generator "
                        f"(np.random.default_rng(seed)), got {type(rng).__name__}")
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"draw_performer_projection: dtype must be float32 or float64, got {np.dtype(dtype)}")


def _check_performer_inputs(x, projection) -> tuple:
    x = _float_tensor(x, "performer_features", "x")
    if not isinstance(projection, np.ndarray):
        raise TypeError(f"performer_features: projection must be a NumPy array (d, m), "
                        f"got {type(projection).__name__}")
    if x.ndim < 1 or projection.ndim != 2 or projection.shape[0] != x.shape[-1] or projection.shape[1] < 1:
        raise ValueError(f"performer_features: projection has shape {projection.shape} but x {x.shape} "
                         f"needs ({x.shape[-1] if x.ndim else 'd'}, m) with m >= 1")
    if projection.dtype != x.dtype:
        raise TypeError(f"performer_features: projection is {projection.dtype} but x is {x.dtype}; "
                        "draw it in x's dtype (draw_performer_projection(..., dtype=))")
    if not np.all(np.isfinite(projection)):
        raise ValueError("performer_features: projection contains NaN or Inf")
    bound = 0.5 * float(np.max(np.sum(projection.astype(np.float64) ** 2, axis=0)))  # max exponent, any x
    if bound >= np.log(np.finfo(x.dtype).max):
        raise ValueError(f"performer_features: projection has a column with |w|^2 / 2 = {bound:.1f}, so exp "
                         f"could overflow {x.dtype} (limit {np.log(np.finfo(x.dtype).max):.0f}); use float64 "
                         "or a smaller head width")
    return x, projection


def _check_attention_inputs(phi_q, phi_k, v, eps, chunk, op: str) -> tuple:
    """(B, H, Hkv, T, m, dv) of matching Tensors, or an error naming the argument."""
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        _float_tensor(x, op, name)
        if x.ndim != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, heads, T, width), got shape {x.shape}")
        if x.dtype != phi_q.dtype:
            raise TypeError(f"{op}: {name} is {x.dtype} but phi_q is {phi_q.dtype}; dtypes never change silently")
    (B, H, T, m), (Bk, Hkv, Tk, mk), (Bv, Hv, Tv, dv) = phi_q.shape, phi_k.shape, v.shape
    if (Bk, Tk, mk) != (B, T, m):
        raise ValueError(f"{op}: phi_k has shape {phi_k.shape} but phi_q {phi_q.shape} needs "
                         f"({B}, Hkv, {T}, {m}): the same batch, tokens and features")
    if (Bv, Hv, Tv) != (B, Hkv, T):
        raise ValueError(f"{op}: v has shape {v.shape} but phi_k {phi_k.shape} needs ({B}, {Hkv}, {T}, dv)")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{op}: phi_q has {H} heads and phi_k {Hkv}; grouped-query attention needs the "
                         "key/value heads to divide the query heads (H % Hkv == 0, Hkv >= 1)")
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating)) or not 0 < eps < np.inf:
        raise ValueError(f"{op}: eps must be a number > 0 (it keeps the denominator from 0), got {eps!r}")
    if not _is_count(chunk) or chunk < 1:
        raise ValueError(f"{op}: chunk must be a whole number >= 1 (tokens per chunk), got {chunk!r}")
    return B, H, Hkv, T, m, dv


def _check_state(state, shape: tuple, dtype, T: int) -> None:
    B, Hkv, m, dv = shape
    if not isinstance(state, LinearState):
        raise TypeError(f"linear_attention_decode: state must be a LinearState (LinearState.empty(B, Hkv, m, dv, "
                        f"dtype) to start), got {type(state).__name__}")
    if state.S.shape != shape or state.z.shape != (B, Hkv, m):
        raise ValueError(f"linear_attention_decode: state holds S {state.S.shape} and z {state.z.shape} but the "
                         f"inputs need S {shape} and z {(B, Hkv, m)}")
    if state.S.dtype != dtype or state.z.dtype != dtype:
        raise TypeError(f"linear_attention_decode: state is {state.S.dtype} but v is {dtype}")
    if T < 1:
        raise ValueError("linear_attention_decode: phi_q has no new tokens; decoding takes T_new >= 1")
