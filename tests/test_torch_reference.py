"""Every op in ops.py against torch.autograd: same inputs, same upstream gradient, float64.

Forward values and every input gradient must agree to about 1e-10 of their scale: the two
engines do the same arithmetic, so anything looser would hide a wrong formula.
"""

from dataclasses import dataclass

import numpy as np
import pytest

from minqkv import ops
from minqkv.lab.op_checks import _draw, differentiable_ops
from minqkv.tensor import Tensor

torch = pytest.importorskip("torch")
F = torch.nn.functional


@dataclass
class Case:
    name: str
    ours: object  # callable(*Tensor) -> Tensor
    theirs: object  # callable(*torch.Tensor) -> torch.Tensor
    inputs: list  # float64 arrays


def drawn(kind):
    """A function of (*shape, seed) drawing inputs of this kind as the gradient-check catalogue does."""
    return lambda *shape, seed=0: _draw(shape, kind, np.random.default_rng(seed))


normal, positive, away_from_zero, well_conditioned = map(
    drawn, ["normal", "positive", "away_from_zero", "well_conditioned"])


IDS = np.array([[0, 3, 3], [5, 1, 0]])
TARGETS = np.array([[1, 4, -1, 0], [2, -1, 6, 6]])  # -1 is ignored
MASK = np.random.default_rng(3).random((3, 4)) < 0.3
DROPOUT_P = 0.3


def dropout_mask(shape, seed=1):
    """The keep-mask ops.dropout draws from default_rng(seed), scaled by 1/(1-p)."""
    return (np.random.default_rng(seed).random(shape) >= DROPOUT_P) / (1 - DROPOUT_P)


def torch_causal(x):
    """Softmax where query i sees key j only when j <= i + (Tk - Tq), the mask built here."""
    Tq, Tk = x.shape[-2:]
    hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    return torch.softmax(x.masked_fill(hidden, float("-inf")), dim=-1)


def weighted_pieces(pieces):
    return [p * float(i + 1) for i, p in enumerate(pieces)]


KERNEL_CASES = [
    Case("matmul 2-D", ops.matmul, torch.matmul, [normal(3, 4), normal(4, 5, seed=1)]),
    Case("matmul (B,T,C)@(C,N)", ops.matmul, torch.matmul, [normal(2, 3, 4), normal(4, 5, seed=1)]),
    Case("matmul batched", ops.matmul, torch.matmul, [normal(2, 3, 4, 5), normal(2, 3, 5, 2, seed=1)]),
    Case("matmul batch broadcast", ops.matmul, torch.matmul,
         [normal(2, 1, 3, 4), normal(5, 4, 2, seed=1)]),
    Case("linear (B,T,K)@(K,N)+b", ops.linear, lambda x, w, b: x @ w + b,
         [normal(2, 3, 4), normal(4, 5, seed=1), normal(5, seed=2)]),
    Case("matmul 2-D @ batched", ops.matmul, torch.matmul, [normal(3, 4), normal(2, 4, 5, seed=1)]),
    Case("softmax", ops.softmax, lambda x: torch.softmax(x, -1), [normal(3, 5)]),
    Case("softmax 4-D", ops.softmax, lambda x: torch.softmax(x, -1), [normal(2, 2, 3, 3)]),
    Case("softmax causal", lambda x: ops.softmax(x, causal=True), torch_causal, [normal(2, 4, 4)]),
    Case("softmax causal Tq<Tk", lambda x: ops.softmax(x, causal=True), torch_causal, [normal(2, 2, 5)]),
]

CASES = [
    Case("add (broadcast)", ops.add, torch.add, [normal(2, 3, 4), normal(3, 1, seed=1)]),
    Case("sub (broadcast)", ops.sub, torch.sub, [normal(3, 4), normal(4, seed=1)]),
    Case("mul (broadcast)", ops.mul, torch.mul, [normal(2, 1, 4), normal(3, 1, seed=1)]),
    Case("div (broadcast)", ops.div, torch.div, [normal(3, 4), away_from_zero(4, seed=1)]),
    Case("neg", ops.neg, torch.neg, [normal(2, 3)]),
    Case("pow 3", lambda x: ops.pow(x, 3), lambda x: x ** 3, [normal(2, 3)]),
    Case("pow -0.5", lambda x: ops.pow(x, -0.5), lambda x: x ** -0.5, [positive(4)]),
    Case("pow 2.5", lambda x: x ** 2.5, lambda x: x ** 2.5, [positive(4)]),
    Case("exp", ops.exp, torch.exp, [normal(3, 4)]),
    Case("log", ops.log, torch.log, [positive(3, 4)]),
    Case("tanh", ops.tanh, torch.tanh, [normal(3, 4) * 3]),
    Case("sigmoid", ops.sigmoid, torch.sigmoid, [normal(3, 4) * 5]),
    Case("clip", lambda x: ops.clip(x, -0.5, 0.8), lambda x: torch.clamp(x, -0.5, 0.8), [normal(4, 5)]),
    Case("gelu", ops.gelu, lambda x: F.gelu(x, approximate="tanh"), [normal(3, 4) * 3]),
    Case("sum all", lambda x: ops.sum(x), torch.sum, [normal(3, 4)]),
    Case("sum axis", lambda x: ops.sum(x, axis=1), lambda x: x.sum(1), [normal(2, 3, 4)]),
    Case("sum axes keepdims", lambda x: ops.sum(x, axis=(0, 2), keepdims=True),
         lambda x: x.sum((0, 2), keepdim=True), [normal(2, 3, 4)]),
    Case("mean axis -1", lambda x: ops.mean(x, axis=-1), lambda x: x.mean(-1), [normal(2, 3, 4)]),
    Case("mean all", lambda x: ops.mean(x), torch.mean, [normal(5)]),
    Case("reshape", lambda x: ops.reshape(x, (4, 6)), lambda x: x.reshape(4, 6), [normal(2, 3, 4)]),
    Case("transpose", lambda x: ops.transpose(x, (2, 0, 1)), lambda x: x.permute(2, 0, 1),
         [normal(2, 3, 4)]),
    Case("transpose reversed", lambda x: ops.transpose(x), lambda x: x.permute(2, 1, 0),
         [normal(2, 3, 4)]),
    Case("swapaxes", lambda x: ops.swapaxes(x, 1, 2), lambda x: x.transpose(1, 2), [normal(2, 3, 4)]),
    Case("getitem slice", lambda x: x[1:, ::2], lambda x: x[1:, ::2], [normal(3, 5)]),
    Case("getitem repeated index", lambda x: x[np.array([0, 2, 0, 0])],
         lambda x: x[torch.tensor([0, 2, 0, 0])], [normal(3, 4)]),
    Case("getitem boolean mask", lambda x: x[MASK], lambda x: x[torch.from_numpy(MASK)], [normal(3, 4)]),
    Case("embedding", lambda w: ops.embedding(w, IDS), lambda w: F.embedding(torch.from_numpy(IDS), w),
         [normal(6, 4)]),
    Case("concat", lambda a, b: ops.concat([a, b], axis=1), lambda a, b: torch.cat([a, b], dim=1),
         [normal(2, 3), normal(2, 2, seed=1)]),
    Case("split sizes", lambda x: ops.concat(weighted_pieces(ops.split(x, [1, 3], axis=-1)), axis=-1),
         lambda x: torch.cat(weighted_pieces(torch.split(x, [1, 3], dim=-1)), dim=-1), [normal(2, 4)]),
    Case("matmul_each", lambda x, a, b: ops.concat(weighted_pieces(ops.matmul_each(x, [a, b])), axis=-1),
         lambda x, a, b: torch.cat(weighted_pieces([x @ a, x @ b]), dim=-1),
         [normal(2, 3, 4), normal(4, 5, seed=1), normal(4, 2, seed=2)]),
    Case("split equal parts", lambda x: ops.split(x, 3, axis=0)[2],
         lambda x: torch.chunk(x, 3, dim=0)[2], [normal(6, 2)]),
    Case("causal_attention", lambda q, k, v: ops.causal_attention(q, k, v),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         [normal(2, 2, 5, 4), normal(2, 2, 5, 4, seed=1), normal(2, 2, 5, 4, seed=2)]),
    Case("cross_entropy", lambda z: ops.cross_entropy(z, TARGETS.clip(0)),
         lambda z: F.cross_entropy(z.reshape(-1, 7), torch.from_numpy(TARGETS.clip(0)).reshape(-1)),
         [normal(2, 4, 7)]),
    Case("cross_entropy ignore_index", lambda z: ops.cross_entropy(z, TARGETS),
         lambda z: F.cross_entropy(z.reshape(-1, 7), torch.from_numpy(TARGETS).reshape(-1),
                                   ignore_index=-1),
         [normal(2, 4, 7)]),
    Case("layer_norm", ops.layer_norm, lambda x, w, b: F.layer_norm(x, (5,), w, b, eps=1e-5),
         [normal(2, 3, 5), normal(5, seed=1), normal(5, seed=2)]),
    Case("layer_norm no bias", lambda x, w: ops.layer_norm(x, w, None),
         lambda x, w: F.layer_norm(x, (6,), w, None, eps=1e-5), [normal(4, 6), normal(6, seed=1)]),
    Case("dropout", lambda x: ops.dropout(x, DROPOUT_P, np.random.default_rng(1)),
         lambda x: x * torch.from_numpy(dropout_mask((4, 5))), [normal(4, 5)]),
    Case("solve", ops.solve, torch.linalg.solve, [well_conditioned(3, 3), normal(3, 2, seed=1)]),
    Case("solve batched", ops.solve, torch.linalg.solve,
         [well_conditioned(2, 4, 4), normal(2, 4, 3, seed=1)]),
    Case("solve broadcast A", ops.solve, torch.linalg.solve,
         [well_conditioned(3, 3), normal(2, 3, 2, seed=1)]),
]


def assert_close(ours, theirs, what):
    scale = np.abs(theirs).max() if theirs.size else 0.0
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10 * scale, err_msg=what)


def compare_with_torch(case):
    ours_in = [Tensor(x.copy(), requires_grad=True) for x in case.inputs]
    theirs_in = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in case.inputs]
    ours_out = case.ours(*ours_in)
    theirs_out = case.theirs(*theirs_in)
    assert ours_out.dtype == np.float64
    assert ours_out.shape == tuple(theirs_out.shape)
    assert_close(ours_out.data, theirs_out.detach().numpy(), "forward")

    upstream = normal(*ours_out.shape, seed=99)  # every output element gets its own weight
    ops.sum(ours_out * upstream).backward()
    (theirs_out * torch.from_numpy(upstream)).sum().backward()
    for i, (ours_x, theirs_x) in enumerate(zip(ours_in, theirs_in)):
        assert_close(ours_x.grad, theirs_x.grad.numpy(), f"gradient of input {i}")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_op_matches_torch_forward_and_gradients(case):
    compare_with_torch(case)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: case.name)
def test_kernel_op_matches_torch_forward_and_gradients(case, backend):
    compare_with_torch(case)


def test_every_op_has_a_torch_reference():
    referenced = {case.name.split()[0] for case in CASES + KERNEL_CASES}
    assert differentiable_ops() - referenced == set()
