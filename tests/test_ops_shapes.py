"""Every op on every shape NumPy accepts, checked against torch.autograd on both backends (issue 24).

One table per family of ops lists shapes that catch the corners: a 0-size dimension in each
position, size 1, odd sizes, broadcasting from either side, 0-d tensors. Each case runs forward
and backward (the upstream gradient gives every output element its own weight) in float64, where
the two engines must agree to rounding, and in float32, within float32's tolerance. An empty
result is an empty array and the gradient of an input that fed no output is zeros, as in PyTorch.
"""

from dataclasses import dataclass

import numpy as np
import pytest

from minqkv import ops
from minqkv.tensor import Tensor

torch = pytest.importorskip("torch")
F = torch.nn.functional


@dataclass
class Case:
    name: str
    ours: object  # callable(*Tensor) -> Tensor or list of Tensors
    theirs: object  # callable(*torch.Tensor) -> torch.Tensor or list
    shapes: list  # one shape per input
    kind: str = "normal"  # normal | positive | well_conditioned (the first input; the others normal)


def case_id(case):
    return f"{case.name} {' '.join(str(s).replace(' ', '') for s in case.shapes)}"


def draw(shape, kind, rng):
    x = rng.standard_normal(shape)
    if kind == "positive":
        return np.abs(x) + 0.5
    if kind == "well_conditioned":
        return x * 0.3 + 2.0 * np.eye(shape[-1])
    return x


BINARY_SHAPES = [
    ((3, 4), (3, 4)), ((), ()), ((), (3, 4)), ((3, 4), ()), ((1,), (5,)), ((7, 5), (5,)), ((5,), (7, 5)),
    ((2, 1, 4), (1, 3, 1)), ((3, 1), (1, 3)),
    ((0,), (0,)), ((0, 4), (0, 4)), ((3, 0), (3, 0)), ((2, 0, 3), (3,)), ((0,), ()), ((), (0, 2)),
    ((0, 1), (1, 5)), ((1, 0), (3, 1)), ((5,), (0, 1)), ((1,), (0,)), ((0, 3), (1, 3)),
]
UNARY_SHAPES = [(), (1,), (7,), (3, 5), (1, 1, 1), (2, 3, 5), (0,), (0, 5), (3, 0), (2, 0, 3)]


def binary_cases():
    torch_twins = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
    return [Case(name, getattr(ops, name), twin, list(shapes), "positive" if name == "div" else "normal")
            for name, twin in torch_twins.items() for shapes in BINARY_SHAPES]


def unary_cases():
    ops_and_twins = [
        ("neg", ops.neg, torch.neg, "normal"),
        ("pow 3", lambda x: ops.pow(x, 3), lambda x: x ** 3, "normal"),
        ("pow -0.5", lambda x: ops.pow(x, -0.5), lambda x: x ** -0.5, "positive"),
        ("pow 0", lambda x: ops.pow(x, 0), lambda x: x ** 0, "normal"),
        ("exp", ops.exp, torch.exp, "normal"),
        ("log", ops.log, torch.log, "positive"),
        ("tanh", ops.tanh, torch.tanh, "normal"),
        ("sigmoid", ops.sigmoid, torch.sigmoid, "normal"),
        ("clip", lambda x: ops.clip(x, -0.5, 0.8), lambda x: torch.clamp(x, -0.5, 0.8), "normal"),
        ("gelu", ops.gelu, lambda x: F.gelu(x, approximate="tanh"), "normal"),
        ("softmax", ops.softmax, lambda x: torch.softmax(x, -1), "normal"),
        ("dropout", lambda x: ops.dropout(x, 0.3, np.random.default_rng(1)),
         lambda x: x * torch.from_numpy(dropout_keep(tuple(x.shape), x.dtype)), "normal"),
    ]
    return [Case(name, ours, theirs, [shape], kind) for name, ours, theirs, kind in ops_and_twins
            for shape in UNARY_SHAPES]


def dropout_keep(shape, dtype):
    """The keep-mask ops.dropout draws from default_rng(1) for p = 0.3, scaled by 1/(1-p)."""
    keep = np.asarray((np.random.default_rng(1).random(shape) >= 0.3) * (1 / 0.7))
    return keep.astype(np.float32 if dtype == torch.float32 else np.float64)


def torch_causal(x):
    Tq, Tk = x.shape[-2:]
    hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    return torch.softmax(x.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num(0.0)


CAUSAL_SHAPES = [(4, 4), (2, 3, 5), (1, 1), (0, 4), (3, 0), (2, 0, 3), (0, 3, 3)]


def causal_cases():
    return [Case("softmax causal", lambda x: ops.softmax(x, causal=True), torch_causal, [shape])
            for shape in CAUSAL_SHAPES]


# (shape, axis, keepdims); 0-d tensors take axis 0 and -1 as PyTorch does
REDUCTIONS = [
    ((3, 4), None, False), ((3, 4), 0, False), ((3, 4), -1, True), ((2, 3, 4), (0, 2), False),
    ((2, 3, 4), (0, 2), True), ((), None, False), ((), 0, False), ((), -1, True), ((), (), False),
    ((1,), 0, False), ((5,), None, True), ((2, 3, 4), -2, False), ((2, 3, 4), (-1, 0), True),
    ((0,), None, False), ((0, 4), 0, False), ((0, 4), 1, False), ((3, 0), 1, True), ((3, 0), 0, False),
    ((2, 0, 3), (0, 2), False), ((2, 0, 3), None, True),
]


def torch_reduce(name, axis, keepdims):
    def reduce(x):
        if axis is None:
            out = getattr(torch, name)(x)
            return out.reshape((1,) * x.ndim) if keepdims else out
        return getattr(torch, name)(x, dim=axis, keepdim=keepdims)
    return reduce


def reduction_cases():
    cases = []
    for name in ["sum", "mean"]:
        for shape, axis, keepdims in REDUCTIONS:
            reduced = range(len(shape)) if axis is None else [axis] if isinstance(axis, int) else axis
            if name == "mean" and any(shape[a] == 0 for a in reduced if shape):
                continue  # the mean of nothing: refused (test_mean_over_an_empty_axis_is_refused)
            cases.append(Case(f"{name} axis={axis} keepdims={keepdims}",
                              lambda x, name=name, axis=axis, keepdims=keepdims: getattr(ops, name)(x, axis, keepdims),
                              torch_reduce(name, axis, keepdims), [shape]))
    return cases


MATMUL_SHAPES = [
    ((3, 4), (4, 5)), ((1, 1), (1, 1)), ((3, 5), (5, 1)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (5, 4, 2)),
    ((8, 8), (8, 0)), ((0, 8), (8, 0)), ((8, 0), (0, 8)), ((0, 0), (0, 0)), ((0, 3), (3, 4)),
    ((2, 8, 8), (2, 8, 0)), ((2, 8, 0), (2, 0, 8)), ((0, 3, 4), (4, 2)), ((2, 0, 4), (4, 3)),
    ((0, 3, 4), (1, 4, 2)), ((2, 1, 3, 4), (0, 4, 2)), ((3, 0), (2, 0, 5)), ((2, 3, 0), (0, 4)),
]


def matmul_cases():
    cases = [Case("matmul", ops.matmul, torch.matmul, list(shapes)) for shapes in MATMUL_SHAPES]
    for x, (K, N) in [((2, 3, 4), (4, 5)), ((0, 4), (4, 5)), ((3, 4), (4, 0)), ((3, 0), (0, 5)), ((2, 0, 3), (3, 2))]:
        cases.append(Case("linear", ops.linear, lambda x, w, b: x @ w + b, [x, (K, N), (N,)]))
        cases.append(Case("linear without bias", lambda x, w: ops.linear(x, w), torch.matmul, [x, (K, N)]))
    for x, widths in [((2, 3, 4), (5, 2)), ((0, 4), (3, 2)), ((3, 0), (2, 3)), ((3, 4), (0, 2)), ((2, 0, 4), (1, 1))]:
        K = x[-1]
        cases.append(Case("matmul_each", lambda x, *w: ops.matmul_each(x, list(w)),
                          lambda x, *w: [x @ w_i for w_i in w], [x] + [(K, n) for n in widths]))
    return cases


SHAPE_CASES = [
    Case("reshape", lambda x: ops.reshape(x, (4, 6)), lambda x: x.reshape(4, 6), [(2, 3, 4)]),
    Case("reshape to 0-d", lambda x: ops.reshape(x, ()), lambda x: x.reshape(()), [(1, 1)]),
    Case("reshape empty", lambda x: ops.reshape(x, (3, 0, 2)), lambda x: x.reshape(3, 0, 2), [(0, 6)]),
    Case("reshape empty -1", lambda x: ops.reshape(x, (-1, 3)), lambda x: x.reshape(-1, 3), [(0, 6)]),
    Case("transpose", lambda x: ops.transpose(x, (2, 0, 1)), lambda x: x.permute(2, 0, 1), [(2, 0, 4)]),
    Case("transpose reversed", lambda x: ops.transpose(x), lambda x: x.permute(1, 0), [(0, 3)]),
    Case("transpose 0-d", lambda x: ops.transpose(x), lambda x: x.permute(()), [()]),
    Case("swapaxes", lambda x: ops.swapaxes(x, 0, 2), lambda x: x.transpose(0, 2), [(3, 1, 0)]),
    Case("swapaxes", lambda x: ops.swapaxes(x, 1, -1), lambda x: x.transpose(1, -1), [(2, 3, 5)]),
    Case("getitem slice", lambda x: x[1:, ::2], lambda x: x[1:, ::2], [(3, 5)]),
    Case("getitem empty slice", lambda x: x[2:2], lambda x: x[2:2], [(3, 5)]),
    Case("getitem of empty", lambda x: x[:, 1], lambda x: x[:, 1], [(0, 3)]),
    Case("getitem repeated index", lambda x: x[np.array([0, 2, 0, 0])],
         lambda x: x[torch.tensor([0, 2, 0, 0])], [(3, 4)]),
    Case("getitem no index", lambda x: x[np.array([], dtype=np.int64)],
         lambda x: x[torch.tensor([], dtype=torch.int64)], [(3, 4)]),
    Case("getitem 0-d", lambda x: x[()], lambda x: x[()], [()]),
    Case("concat", lambda a, b: ops.concat([a, b], axis=1), lambda a, b: torch.cat([a, b], dim=1), [(2, 3), (2, 2)]),
    Case("concat with empty", lambda a, b: ops.concat([a, b], axis=1), lambda a, b: torch.cat([a, b], dim=1),
         [(2, 0), (2, 2)]),
    Case("concat of empties", lambda a, b: ops.concat([a, b], axis=0), lambda a, b: torch.cat([a, b], dim=0),
         [(0, 3), (0, 3)]),
    Case("concat along rows of none", lambda a, b: ops.concat([a, b], axis=1),
         lambda a, b: torch.cat([a, b], dim=1), [(0, 3), (0, 1)]),
    Case("split sizes", lambda x: ops.split(x, [1, 3], axis=-1), lambda x: torch.split(x, [1, 3], dim=-1), [(2, 4)]),
    Case("split with empty piece", lambda x: ops.split(x, [0, 4, 0], axis=-1),
         lambda x: torch.split(x, [0, 4, 0], dim=-1), [(2, 4)]),
    Case("split of empty", lambda x: ops.split(x, [2, 1], axis=1), lambda x: torch.split(x, [2, 1], dim=1), [(0, 3)]),
    Case("split equal parts", lambda x: ops.split(x, 3, axis=0), lambda x: torch.chunk(x, 3, dim=0), [(6, 2)]),
    Case("split equal parts of empty", lambda x: ops.split(x, 2, axis=0), lambda x: torch.tensor_split(x, 2, dim=0),
         [(0, 2)]),
]

IDS = {"3x2": np.array([[0, 3], [5, 0], [1, 1]]), "none": np.zeros((0,), np.int64),
       "0x2": np.zeros((0, 2), np.int64), "0-d": np.array(4)}


def embedding_cases():
    return [Case(f"embedding ids {name}", lambda w, ids=ids: ops.embedding(w, ids),
                 lambda w, ids=ids: F.embedding(torch.from_numpy(ids), w), [(6, width)])
            for name, ids in IDS.items() for width in (4, 0)]


def cross_entropy_reference(targets, V):
    """torch's mean over counted targets, except that no counted target gives 0 (torch: nan)."""
    counted = max(int((targets != -1).sum()), 1)
    t = torch.from_numpy(targets.reshape(-1))
    return lambda z: F.cross_entropy(z.reshape(-1, V), t, ignore_index=-1, reduction="sum") / counted


def cross_entropy_cases():
    tables = [((2, 3), np.array([[1, 4, -1], [2, 0, 6]])), ((5,), np.array([0, 1, -1, 6, 6])),
              ((), np.array(3)), ((0,), np.zeros((0,), np.int64)), ((2, 0), np.zeros((2, 0), np.int64)),
              ((2,), np.array([-1, -1]))]
    return [Case("cross_entropy", lambda z, t=targets: ops.cross_entropy(z, t), cross_entropy_reference(targets, 7),
                 [lead + (7,)]) for lead, targets in tables]


def layer_norm_cases():
    cases = []
    for shape in [(2, 3, 5), (1, 1), (7,), (0, 5), (2, 0, 5), (3, 0), (0,)]:
        C = shape[-1]
        cases.append(Case("layer_norm", ops.layer_norm, lambda x, w, b, C=C: F.layer_norm(x, (C,), w, b, eps=1e-5),
                          [shape, (C,), (C,)]))
        cases.append(Case("layer_norm no bias", lambda x, w: ops.layer_norm(x, w, None),
                          lambda x, w, C=C: F.layer_norm(x, (C,), w, None, eps=1e-5), [shape, (C,)]))
    return cases


def sdpa(q, k, v, bias=None):
    """softmax(q k^T / sqrt(hd) + bias, causal) v, key/value heads shared by groups of query heads."""
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return torch_causal(scores) @ v


ATTENTION_SHAPES = [
    ((2, 2, 5, 4), (2, 2, 5, 4)), ((1, 1, 1, 1), (1, 1, 1, 1)), ((2, 4, 3, 2), (2, 2, 5, 2)),
    ((0, 2, 3, 4), (0, 2, 3, 4)), ((2, 0, 3, 4), (2, 0, 3, 4)), ((2, 2, 0, 4), (2, 2, 3, 4)),
    ((2, 2, 0, 4), (2, 2, 0, 4)), ((2, 2, 3, 0), (2, 2, 5, 0)), ((2, 4, 3, 0), (2, 2, 3, 0)),
]


def torch_fused_attention(q, k, v, bias):
    """PyTorch's own fused attention with a causal bias (what sdpa spells out), for head width 0, where
    sdpa's 1 / sqrt(hd) is 1 / 0: PyTorch returns the empty result and no gradient for the bias."""
    T, Tk = q.shape[2], k.shape[2]
    causal = torch.where(torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T), 0.0, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal + bias)


def attention_cases():
    cases = [Case("causal_attention", ops.causal_attention, sdpa, [q, kv, kv]) for q, kv in ATTENTION_SHAPES]
    cases.append(Case("causal_attention bias", ops.causal_attention, sdpa,
                      [(2, 4, 3, 2), (2, 2, 5, 2), (2, 2, 5, 2), (4, 3, 5)]))
    cases.append(Case("causal_attention bias", ops.causal_attention, sdpa,
                      [(2, 4, 0, 2), (2, 2, 5, 2), (2, 2, 5, 2), (4, 0, 5)]))
    cases.append(Case("causal_attention bias", ops.causal_attention, torch_fused_attention,
                      [(2, 2, 3, 0), (2, 2, 5, 0), (2, 2, 5, 0), (2, 3, 5)]))
    return cases


SOLVE_SHAPES = [((3, 3), (3, 2)), ((2, 4, 4), (2, 4, 3)), ((3, 3), (2, 3, 2)), ((1, 1), (1, 1)),
                ((3, 3), (3, 0)), ((0, 3, 3), (0, 3, 2)), ((0, 0), (0, 2))]


def solve_cases():
    return [Case("solve", ops.solve, torch.linalg.solve, [a, b], "well_conditioned") for a, b in SOLVE_SHAPES]


CASES = (binary_cases() + unary_cases() + causal_cases() + reduction_cases() + matmul_cases() + SHAPE_CASES
         + embedding_cases() + cross_entropy_cases() + layer_norm_cases() + attention_cases() + solve_cases())

TOLERANCE = {np.float64: 1e-10, np.float32: 2e-5}


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_close(ours, theirs, dtype, what):
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape}, torch {theirs.shape}"
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}, expected {dtype}"
    scale = max(np.abs(theirs).max(), 1.0) if theirs.size else 1.0
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale, err_msg=what)


def compare_with_torch(case, dtype):
    rng = np.random.default_rng(0)
    arrays = []
    for i, shape in enumerate(case.shapes):
        kind = case.kind if i == 0 or case.kind != "well_conditioned" else "normal"
        arrays.append(draw(shape, kind, rng).astype(dtype))
    ours_in = [Tensor(x.copy(), requires_grad=True) for x in arrays]
    theirs_in = [torch.tensor(x, requires_grad=True) for x in arrays]
    ours_out, theirs_out = as_list(case.ours(*ours_in)), as_list(case.theirs(*theirs_in))
    assert len(ours_out) == len(theirs_out)
    for i, (o, t) in enumerate(zip(ours_out, theirs_out)):
        assert_close(o.data, t.detach().numpy(), dtype, f"output {i}")

    weights = [rng.standard_normal(o.shape).astype(dtype) for o in ours_out]  # each element its own weight
    ours_loss = ops.sum(ops.concat([ops.reshape(o * w, (-1,)) for o, w in zip(ours_out, weights)]))
    theirs_loss = sum((t * torch.from_numpy(w)).sum() for t, w in zip(theirs_out, weights))
    ours_loss.backward()
    if theirs_loss.requires_grad:
        theirs_loss.backward()
    for i, (o, t) in enumerate(zip(ours_in, theirs_in)):
        expected = t.grad.numpy() if t.grad is not None else np.zeros_like(arrays[i])
        assert_close(o.grad, expected, dtype, f"gradient of input {i}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_op_matches_torch_on_every_shape(case, dtype, backend):
    compare_with_torch(case, dtype)


def test_the_shape_tables_cover_every_differentiable_op():
    from minqkv.lab.op_checks import differentiable_ops
    assert differentiable_ops() - {case.name.split()[0] for case in CASES} == set()


def test_the_shape_tables_put_a_zero_size_dimension_in_every_op():
    with_zero = {case.name.split()[0] for case in CASES if any(0 in shape for shape in case.shapes)}
    assert {"add", "sub", "mul", "div", "matmul", "linear", "matmul_each", "sum", "softmax", "layer_norm",
            "causal_attention", "cross_entropy", "embedding", "concat", "split", "solve"} <= with_zero
