"""The catalogue of gradient checks over every op in ops.py and linear_attention.py (what `minqkv gradcheck` runs).

Each case names an op, a function of float64 Tensors, and how to draw its inputs. Inputs
avoid the points where an op has no derivative (log at 0, clip at its bounds, singular matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import linear_attention, ops
from .gradcheck import CheckResult, check
from ..tensor import Tensor


@dataclass
class OpCase:
    name: str
    fn: object  # callable(*Tensors) -> Tensor
    shapes: list  # one shape per input
    kind: str = "normal"  # how to draw inputs: normal | positive | away_from_zero | well_conditioned


def _draw(shape, kind: str, rng) -> np.ndarray:
    x = rng.standard_normal(shape)
    if kind == "positive":
        return np.abs(x) + 0.5
    if kind == "away_from_zero":
        return np.sign(x) * (np.abs(x) + 0.2)
    if kind == "well_conditioned" and shape[-1] == shape[-2]:
        return x * 0.3 + 2.0 * np.eye(shape[-1])  # far from singular
    return x


def _split_used_twice(x: Tensor) -> Tensor:
    # x (3, 4) -> [a * b | 3 a] + x: piece a reaches the output twice, x once more directly
    a, b = ops.split(x, 2, axis=1)
    return ops.concat([a * b, a * 3.0], axis=1) + x


def _head_view(x: Tensor, start: int, n: int, hd: int) -> Tensor:
    """Columns [start, start + n * hd) of x (B, T, width) as n heads (B, n, T, hd): a view with
    rows `width` apart, as a layer hands them to the fused attention."""
    B, T, _ = x.shape
    return ops.transpose(x[:, :, start:start + n * hd].reshape(B, T, n, hd), (0, 2, 1, 3))


def _attention_of_one_projection(x: Tensor) -> Tensor:
    # x (2, 3, 25): q, k, v of 2 heads of 4 each, and one column nobody reads
    return ops.causal_attention(_head_view(x, 0, 2, 4), _head_view(x, 8, 2, 4), _head_view(x, 16, 2, 4))


def _attention_of_new_tokens(x: Tensor, cached: Tensor, bias: Tensor) -> Tensor:
    # x (2, 3, 9): 4 query heads of 2; cached (2, 5, 10): 2 key and 2 value heads of 2, 2 spare columns
    return ops.causal_attention(_head_view(x, 0, 4, 2), _head_view(cached, 1, 2, 2), _head_view(cached, 5, 2, 2), bias)


def _linear_attention_of_elu_features(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # as a layer runs it: features of q (2, 4, 7, 3) and k (2, 2, 7, 3), chunks of 3 (7 tokens: 3 + 3 + 1)
    phi = linear_attention.elu_features
    return linear_attention.causal_linear_attention(phi(q), phi(k), v, chunk=3)


# Performer's fixed random features: 5 directions of width 3, so two orthogonal blocks (3 + 2)
_PERFORMER_PROJECTION = linear_attention.draw_performer_projection(3, 5, np.random.default_rng(0))

_IDS = np.array([[0, 3, 3], [5, 1, 0]])  # repeated ids: gradients must accumulate
_TARGETS = np.array([[1, 4, -1, 0], [2, -1, 6, 6]])  # -1 is ignored


def op_cases() -> list:
    C = OpCase
    return [
        C("add", ops.add, [(3, 4), (3, 4)]),
        C("add (broadcast)", ops.add, [(2, 3, 4), (4,)]),
        C("add (broadcast 1-dims)", ops.add, [(2, 1, 4), (1, 3, 1)]),
        C("sub (broadcast)", ops.sub, [(3, 4), (3, 1)]),
        C("mul", ops.mul, [(5,), (5,)]),
        C("mul (broadcast)", ops.mul, [(2, 3, 4), (3, 1)]),
        C("div (broadcast)", ops.div, [(3, 4), (4,)], "away_from_zero"),
        C("neg", ops.neg, [(2, 3)]),
        C("pow 3", lambda x: ops.pow(x, 3), [(2, 3)]),
        C("pow -0.5", lambda x: ops.pow(x, -0.5), [(4,)], "positive"),
        C("matmul 2-D", ops.matmul, [(3, 4), (4, 5)]),
        C("matmul (B,T,C)@(C,N)", ops.matmul, [(2, 3, 4), (4, 5)]),
        C("matmul batched", ops.matmul, [(2, 3, 4, 5), (2, 3, 5, 2)]),
        C("matmul batch broadcast", ops.matmul, [(2, 1, 3, 4), (5, 4, 2)]),
        C("matmul 1x1", ops.matmul, [(1, 1), (1, 1)]),
        C("matmul K=0 (a product of zeros)", ops.matmul, [(3, 0), (0, 4)]),
        C("matmul batched N=0", ops.matmul, [(2, 3, 4), (2, 4, 0)]),
        C("linear (B,T,K)@(K,N)+b", ops.linear, [(2, 3, 4), (4, 5), (5,)]),
        C("linear without bias", ops.linear, [(3, 4), (4, 2)]),
        C("matmul_each", lambda x, a, b, c: ops.concat(
            [p * float(i + 1) for i, p in enumerate(ops.matmul_each(x, [a, b, c]))], axis=-1),
          [(2, 3, 4), (4, 5), (4, 2), (4, 5)]),
        C("matmul_each one weight", lambda x, w: ops.matmul_each(x, [w])[0], [(3, 4), (4, 2)]),
        C("matmul_each with a piece unused", lambda x, a, b, c: ops.concat(
            [p * float(i + 1) for i, p in enumerate(ops.matmul_each(x, [a, b, c])) if i != 1], axis=-1),
          [(2, 3, 4), (4, 2), (4, 3), (4, 2)]),
        C("matmul_each with x also used elsewhere", lambda x, a, b: ops.concat(
            ops.matmul_each(x, [a, b]), axis=-1) * ops.concat([x, x], axis=-1), [(3, 4), (4, 4), (4, 4)]),
        C("sum all", lambda x: ops.sum(x), [(3, 4)]),
        C("sum axis", lambda x: ops.sum(x, axis=1), [(2, 3, 4)]),
        C("sum axes keepdims", lambda x: ops.sum(x, axis=(0, 2), keepdims=True), [(2, 3, 4)]),
        C("mean axis -1", lambda x: ops.mean(x, axis=-1), [(2, 3, 4)]),
        C("mean all", lambda x: ops.mean(x), [(5,)]),
        C("sum of a 0-d tensor over axis 0", lambda x: ops.sum(x, axis=0), [()]),
        C("sum over an empty axis", lambda x: ops.sum(x, axis=1), [(3, 0)]),
        C("reshape", lambda x: ops.reshape(x, (4, 6)), [(2, 3, 4)]),
        C("transpose", lambda x: ops.transpose(x, (2, 0, 1)), [(2, 3, 4)]),
        C("swapaxes", lambda x: ops.swapaxes(x, 1, 2), [(2, 3, 4)]),
        C("getitem slice", lambda x: x[1:, ::2], [(3, 5)]),
        C("getitem repeated index", lambda x: x[np.array([0, 2, 0, 0])], [(3, 4)]),
        C("embedding (gather)", lambda w: ops.embedding(w, _IDS), [(6, 4)]),
        C("concat", lambda a, b: ops.concat([a, b], axis=1), [(2, 3), (2, 2)]),
        C("split sizes", lambda x: ops.concat(
            [p * float(i + 1) for i, p in enumerate(ops.split(x, [1, 3], axis=-1))], axis=-1), [(2, 4)]),
        C("split equal parts", lambda x: ops.split(x, 3, axis=0)[2], [(6, 2)]),
        C("split with a piece used twice and x elsewhere", _split_used_twice, [(3, 4)]),
        C("exp", ops.exp, [(3, 4)]),
        C("log", ops.log, [(3, 4)], "positive"),
        C("tanh", ops.tanh, [(3, 4)]),
        C("sigmoid", ops.sigmoid, [(3, 4)]),
        C("clip", lambda x: ops.clip(x, -0.5, 0.8), [(4, 5)]),
        C("gelu", ops.gelu, [(3, 4)]),
        C("softmax", ops.softmax, [(3, 5)]),
        C("softmax 4-D", ops.softmax, [(2, 2, 3, 3)]),
        C("softmax 0-d", ops.softmax, [()]),
        C("softmax causal", lambda x: ops.softmax(x, causal=True), [(2, 4, 4)]),
        C("softmax causal Tq<Tk", lambda x: ops.softmax(x, causal=True), [(2, 2, 5)]),
        C("causal_attention", ops.causal_attention, [(2, 2, 3, 4), (2, 2, 3, 4), (2, 2, 3, 4)]),
        C("causal_attention gqa, bias, Tq<Tk", ops.causal_attention,
          [(2, 4, 3, 2), (2, 2, 5, 2), (2, 2, 5, 2), (4, 3, 5)]),
        C("causal_attention on the heads of one projection", _attention_of_one_projection, [(2, 3, 25)]),
        C("causal_attention on views, gqa, bias, Tq<Tk", _attention_of_new_tokens,
          [(2, 3, 9), (2, 5, 10), (4, 3, 5)]),
        C("causal_attention window 2", lambda q, k, v: ops.causal_attention(q, k, v, window=2),
          [(2, 2, 5, 3), (2, 2, 5, 3), (2, 2, 5, 3)]),
        C("causal_attention window 1 (each query sees itself)", lambda q, k, v: ops.causal_attention(
            q, k, v, window=1), [(1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 3)]),
        C("causal_attention window 3, gqa, bias, Tq<Tk", lambda q, k, v, b: ops.causal_attention(
            q, k, v, b, window=3), [(2, 4, 3, 2), (2, 2, 6, 2), (2, 2, 6, 2), (4, 3, 6)]),
        C("elu_features", linear_attention.elu_features, [(2, 3, 4)], "away_from_zero"),  # off 0: phi'' jumps there
        C("performer_features", lambda x: linear_attention.performer_features(  # the projection in x's dtype
            x, _PERFORMER_PROJECTION.astype(x.data.dtype)), [(2, 2, 4, 3)]),
        C("causal_linear_attention", linear_attention.causal_linear_attention,
          [(2, 2, 5, 3), (2, 2, 5, 3), (2, 2, 5, 4)], "positive"),  # positive features: denominators > 0
        C("causal_linear_attention gqa, chunks of 3 over 7 tokens", lambda q, k, v:
          linear_attention.causal_linear_attention(q, k, v, chunk=3),
          [(2, 4, 7, 3), (2, 2, 7, 3), (2, 2, 7, 2)], "positive"),
        C("causal_linear_attention of elu features, gqa, chunks of 3", _linear_attention_of_elu_features,
          [(2, 4, 7, 3), (2, 2, 7, 3), (2, 2, 7, 2)], "away_from_zero"),
        C("cross_entropy", lambda z: ops.cross_entropy(z, _TARGETS[:, :3].clip(0)), [(2, 3, 7)]),
        C("cross_entropy ignore_index", lambda z: ops.cross_entropy(z, _TARGETS), [(2, 4, 7)]),
        C("layer_norm", ops.layer_norm, [(2, 3, 5), (5,), (5,)]),
        C("layer_norm no bias", lambda x, w: ops.layer_norm(x, w, None), [(4, 6), (6,)]),
        C("dropout", lambda x: ops.dropout(x, 0.3, np.random.default_rng(1)), [(4, 5)]),
        C("solve", ops.solve, [(3, 3), (3, 2)], "well_conditioned"),
        C("solve batched", ops.solve, [(2, 4, 4), (2, 4, 3)], "well_conditioned"),
    ]


def differentiable_ops() -> set:
    """Names of the public functions in ops.py that carry a gradient: what a catalogue must cover."""
    not_differentiable = {"unbroadcast"}
    return {name for name, value in vars(ops).items() if callable(value) and not name.startswith("_")
            and getattr(value, "__module__", None) == ops.__name__} - not_differentiable


def run_op_checks(seed: int = 0) -> list:
    """Check every case in float64; returns a list of CheckResult."""
    rng = np.random.default_rng(seed)
    results: list[CheckResult] = []
    for case in op_cases():
        inputs = [Tensor(_draw(shape, case.kind, rng), requires_grad=True) for shape in case.shapes]
        results.append(check(case.name, case.fn, inputs))
    return results
