"""ops.py: every backward matches finite differences; forwards match the formulas; errors explain."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from minqkv import kernels, ops
from minqkv.lab.gradcheck import check
from minqkv.lab.op_checks import _draw, differentiable_ops, op_cases
from minqkv.tensor import Tensor


def leaf(array):
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def softmax_by_ratios(x):
    """softmax(x)_i = 1 / sum_j exp(x_j - x_i): no max shift, unlike the kernels, so a test
    comparing with it does not compare the NumPy twin with itself."""
    return 1 / np.exp(x[..., None, :] - x[..., :, None]).sum(axis=-1)


# ---- gradients: finite differences over the whole catalogue ---------------------------------
# (the `backend` fixture, from conftest.py, runs a test once with the C core and once with NumPy)


@pytest.mark.parametrize("case", op_cases(), ids=lambda case: case.name)
def test_op_gradient_matches_finite_differences(case, backend):
    rng = np.random.default_rng(0)
    inputs = [Tensor(_draw(shape, case.kind, rng), requires_grad=True) for shape in case.shapes]
    result = check(case.name, case.fn, inputs)
    assert result.max_rel_err < 1e-6, result.per_input


def test_every_differentiable_op_has_a_gradient_check_case():
    checked = {case.name.split()[0] for case in op_cases()}
    assert differentiable_ops() - checked == set()


def test_the_list_of_differentiable_ops_is_not_empty_nor_holds_helpers():
    assert {"add", "matmul", "matmul_each", "split", "cross_entropy", "solve"} <= differentiable_ops()
    assert not {"unbroadcast", "Tensor", "float_tensor", "check_split"} & differentiable_ops()


# ---- forward values against plain NumPy formulas --------------------------------------------


def test_add_broadcasts_like_numpy():
    a, b = normal(2, 1, 4), normal(3, 1, seed=1)
    np.testing.assert_array_equal(ops.add(Tensor(a), Tensor(b)).data, a + b)


# (expected products come from einsum: the NumPy twin of the matmul kernel is np.matmul itself)


def test_matmul_matches_einsum_with_batch_broadcasting(backend):
    a, b = normal(2, 1, 3, 4), normal(5, 4, 2, seed=1)
    expected = np.einsum("...mk,...kn->...mn", a, b)
    np.testing.assert_allclose(ops.matmul(Tensor(a), Tensor(b)).data, expected, rtol=1e-12, atol=1e-12)


def test_matmul_of_3d_by_weight_matches_einsum(backend):
    a, w = normal(2, 3, 4), normal(4, 5, seed=1)
    expected = np.einsum("btk,kn->btn", a, w)
    np.testing.assert_allclose(ops.matmul(Tensor(a), Tensor(w)).data, expected, rtol=1e-12, atol=1e-12)


def test_matmul_of_transposed_views_matches_einsum(backend):
    a, b = normal(4, 3), normal(5, 4, seed=1)
    out = ops.matmul(ops.transpose(Tensor(a)), ops.transpose(Tensor(b)))
    np.testing.assert_allclose(out.data, np.einsum("km,nk->mn", a, b), rtol=1e-12, atol=1e-12)


def test_linear_matches_einsum_plus_bias_and_its_bias_gradient_sums_rows(backend):
    x, w, b = normal(2, 3, 4), normal(4, 5, seed=1), leaf(normal(5, seed=2))
    out = ops.linear(Tensor(x), Tensor(w), b)
    np.testing.assert_allclose(out.data, np.einsum("btk,kn->btn", x, w) + b.data, rtol=1e-12, atol=1e-12)
    g = normal(2, 3, 5, seed=3)
    out.backward(grad=g)
    np.testing.assert_allclose(b.grad, np.einsum("btn->n", g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias, message", [
    (np.zeros(5), "bias must be a Tensor or None, got ndarray"),
    (Tensor(np.zeros(4)), r"bias must have shape \(5,\) and w's dtype float64, got \(4,\) float64"),
    (Tensor(np.zeros(5, np.float32)), r"bias must have shape \(5,\) and w's dtype float64, got \(5,\) float32"),
])
def test_linear_refuses_a_bias_that_does_not_fit_w(bias, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ops.linear(Tensor(np.ones((2, 4))), Tensor(np.ones((4, 5))), bias)


def test_matmul_float32_matches_einsum_and_stays_float32(backend):
    a, b = normal(3, 8).astype(np.float32), normal(8, 2, seed=1).astype(np.float32)
    out = ops.matmul(Tensor(a), Tensor(b))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.data, np.einsum("mk,kn->mn", a, b), rtol=1e-5, atol=1e-6)


def test_softmax_matches_formula(backend):
    x = normal(3, 5)
    np.testing.assert_allclose(ops.softmax(Tensor(x)).data, softmax_by_ratios(x), rtol=1e-12)


def test_softmax_float32_stays_float32(backend):
    assert ops.softmax(Tensor(normal(2, 3).astype(np.float32))).dtype == np.float32


def test_gelu_matches_tanh_formula():
    x = normal(10)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ops.gelu(Tensor(x)).data, expected, rtol=1e-12)


def test_sigmoid_matches_formula_and_does_not_overflow():
    x = np.array([-1000.0, -2.0, 0.0, 3.0, 1000.0])
    with np.errstate(over="raise"):
        out = ops.sigmoid(Tensor(x)).data
    np.testing.assert_allclose(out, [0.0, 1 / (1 + np.exp(2.0)), 0.5, 1 / (1 + np.exp(-3.0)), 1.0],
                               rtol=1e-12)


def test_layer_norm_matches_formula():
    x, w, b = normal(2, 3, 6), normal(6, seed=1), normal(6, seed=2)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * w + b
    np.testing.assert_allclose(ops.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data, expected,
                               rtol=1e-12)


def test_cross_entropy_is_mean_negative_log_likelihood_of_counted_targets():
    logits = normal(2, 3, 4)
    targets = np.array([[1, -1, 3], [0, 2, -1]])
    counted = [(logits[i, t], targets[i, t]) for i in range(2) for t in range(3) if targets[i, t] >= 0]
    # -log p(target) = log sum_j exp(z_j - z_target), one position at a time
    nll = [math.log(math.fsum(math.exp(z_j - z[target]) for z_j in z)) for z, target in counted]
    loss = ops.cross_entropy(Tensor(logits), targets)
    assert loss.item() == pytest.approx(math.fsum(nll) / len(nll), rel=1e-12)


# ---- broadcasting gradients -----------------------------------------------------------------


BROADCAST_CASES = {
    "add": (ops.add, [(2, 1, 4), (3, 1)]),
    "sub": (ops.sub, [(4,), (2, 3, 4)]),
    "mul": (ops.mul, [(2, 3, 1), (1, 5)]),
    "div": (ops.div, [(1, 3), (2, 1)]),
    "matmul batch broadcast": (ops.matmul, [(2, 1, 3, 4), (5, 4, 2)]),
    "solve broadcast A": (lambda a, b: ops.solve(a + 5 * np.eye(3), b), [(3, 3), (2, 3, 2)]),
}


@pytest.mark.parametrize("name", BROADCAST_CASES)
def test_broadcast_gradients_have_the_input_shapes(name):
    fn, shapes = BROADCAST_CASES[name]
    inputs = [leaf(normal(*shape, seed=i) + 3.0) for i, shape in enumerate(shapes)]  # away from 0
    ops.sum(fn(*inputs)).backward()
    assert [x.grad.shape for x in inputs] == shapes


@settings(max_examples=50, deadline=None)
@given(mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=3))
def test_mul_gradients_of_any_broadcastable_shapes_have_the_input_shapes(shapes):
    a, b = leaf(normal(*shapes.input_shapes[0])), leaf(normal(*shapes.input_shapes[1], seed=1))
    out = ops.mul(a, b)
    assert out.shape == shapes.result_shape
    out.backward(grad=np.ones(out.shape))
    assert (a.grad.shape, b.grad.shape) == shapes.input_shapes
    # sum(a * b) is linear in each factor, so it equals <a, dL/da> and <b, dL/db>
    assert np.sum(a.data * a.grad) == pytest.approx(out.data.sum(), rel=1e-10, abs=1e-10)
    assert np.sum(b.data * b.grad) == pytest.approx(out.data.sum(), rel=1e-10, abs=1e-10)


# ---- errors that explain themselves ---------------------------------------------------------


def test_matmul_inner_dimension_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\).*inner dimensions 3 and 4 must match"):
        ops.matmul(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5))))


def test_matmul_of_a_vector_asks_for_2d():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*reshape vectors to \(1, K\)"):
        ops.matmul(Tensor(np.ones(3)), Tensor(np.ones((3, 2))))


def test_add_of_non_broadcastable_shapes_explains_broadcasting():
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) do not broadcast"):
        ops.add(Tensor(np.ones((2, 3))), Tensor(np.ones(4)))


def test_cross_entropy_target_out_of_range_is_reported():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\).*found 4"):
        ops.cross_entropy(Tensor(np.zeros((2, 4))), np.array([1, 4]))


def test_cross_entropy_negative_target_other_than_ignore_index_is_reported():
    with pytest.raises(ValueError, match="found -2"):
        ops.cross_entropy(Tensor(np.zeros((2, 4))), np.array([-2, 0]))


def test_cross_entropy_targets_of_wrong_shape_are_reported():
    with pytest.raises(ValueError, match=r"targets have shape \(3,\).*need targets of shape \(2,\)"):
        ops.cross_entropy(Tensor(np.zeros((2, 4))), np.array([0, 1, 2]))


def test_cross_entropy_float_targets_are_rejected():
    with pytest.raises(TypeError, match="targets must be integers, got float64"):
        ops.cross_entropy(Tensor(np.zeros((2, 4))), np.array([0.0, 1.0]))


def test_embedding_ids_out_of_range_are_reported():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\), got values from 0 to 5"):
        ops.embedding(Tensor(np.zeros((5, 2))), np.array([0, 5]))


def test_embedding_negative_ids_are_reported():
    with pytest.raises(ValueError, match=r"got values from -1 to 2"):
        ops.embedding(Tensor(np.zeros((5, 2))), np.array([-1, 2]))


def test_embedding_float_ids_are_rejected():
    with pytest.raises(TypeError, match="ids must be integers, got float64"):
        ops.embedding(Tensor(np.zeros((5, 2))), np.array([0.0, 1.0]))


def test_reshape_to_wrong_size_names_both_sizes():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) \(6 elements\) into \(4, 2\)"):
        ops.reshape(Tensor(np.ones((2, 3))), 4, 2)


def test_transpose_with_repeated_axis_is_reported():
    with pytest.raises(ValueError, match=r"axes \(0, 0\) are not a permutation of 2 axes"):
        ops.transpose(Tensor(np.ones((2, 3))), 0, 0)


def test_transpose_with_too_few_axes_is_reported():
    with pytest.raises(ValueError, match="not a permutation of 3 axes"):
        ops.transpose(Tensor(np.ones((2, 3, 4))), 1, 0)


def test_transpose_with_out_of_range_axis_is_reported():
    with pytest.raises(ValueError, match="not a permutation of 2 axes"):
        ops.transpose(Tensor(np.ones((2, 3))), 0, 3)


def weighted_split_loss(pieces, used):
    """sum over the used pieces of piece * (1 + its position), a loss whose gradient tells the pieces apart."""
    total = None
    for i in used:
        term = ops.sum(pieces[i] * (np.arange(pieces[i].size).reshape(pieces[i].shape) + 1.0))
        total = term if total is None else total + term
    return total


@pytest.mark.parametrize("used", [(0, 1, 2), (2, 0), (1,)])
def test_split_sends_each_piece_its_gradient_and_zeros_to_unused_pieces(used):
    x = leaf(normal(2, 7))
    pieces = ops.split(x, [3, 0, 4], axis=1)
    pieces = [pieces[0], pieces[2], pieces[1]]  # widths 3, 4, 0
    weighted_split_loss(pieces, used).backward()
    expected = np.zeros((2, 7))
    for i, (start, width) in enumerate([(0, 3), (3, 4), (3, 0)]):
        if i in used:
            expected[:, start:start + width] = np.arange(2 * width).reshape(2, width) + 1.0
    np.testing.assert_array_equal(x.grad, expected)


def test_split_adds_its_gradient_to_the_other_uses_of_its_input():
    x = leaf(normal(3, 4))
    a, b = ops.split(x, 2, axis=1)
    (ops.sum(x * 10.0) + ops.sum(a) + ops.sum(b * 2.0)).backward()
    np.testing.assert_array_equal(x.grad, np.concatenate([np.full((3, 2), 11.0), np.full((3, 2), 12.0)], axis=1))


def test_split_gradient_is_fresh_in_every_backward_walk_even_after_an_interrupted_one():
    x = leaf(normal(2, 4))
    a, b = ops.split(x, 2, axis=1)
    loss = ops.sum(a) + ops.sum(b * 3.0)
    loss.backward()
    loss.backward()  # the same graph walked twice: twice the gradient
    np.testing.assert_array_equal(x.grad, [[2, 2, 6, 6], [2, 2, 6, 6]])
    x.zero_grad()
    a._backward(np.ones((2, 2)))  # what a walk stopped right after this piece leaves behind
    ops.sum(b * 5.0).backward()  # only b: a must get nothing from this walk
    np.testing.assert_array_equal(x.grad, [[0, 0, 5, 5], [0, 0, 5, 5]])


def test_matmul_each_gives_each_product_and_the_gradients_of_one_product_each_way(backend):
    x, w1, w2 = leaf(normal(2, 3, 4)), leaf(normal(4, 2, seed=1)), leaf(normal(4, 5, seed=2))
    y1, y2 = ops.matmul_each(x, [w1, w2])
    np.testing.assert_allclose(y1.data, x.data @ w1.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y2.data, x.data @ w2.data, rtol=1e-12, atol=1e-12)
    g1, g2 = normal(2, 3, 2, seed=3), normal(2, 3, 5, seed=4)
    (ops.sum(y1 * g1) + ops.sum(y2 * g2)).backward()
    np.testing.assert_allclose(x.grad, g1 @ w1.data.T + g2 @ w2.data.T, rtol=1e-12, atol=1e-12)  # g W^T
    np.testing.assert_allclose(w1.grad, np.einsum("btk,btn->kn", x.data, g1), rtol=1e-12, atol=1e-12)  # x^T g_1
    np.testing.assert_allclose(w2.grad, np.einsum("btk,btn->kn", x.data, g2), rtol=1e-12, atol=1e-12)


def test_matmul_each_sends_no_gradient_to_constant_weights_and_zeros_to_an_unused_product():
    x, w1, w2 = leaf(normal(3, 4)), Tensor(normal(4, 2, seed=1)), leaf(normal(4, 2, seed=2))
    y1, _ = ops.matmul_each(x, [w1, w2])
    ops.sum(y1).backward()
    assert w1.grad is None
    np.testing.assert_array_equal(w2.grad, np.zeros((4, 2)))
    np.testing.assert_allclose(x.grad, np.tile(w1.data.sum(axis=1), (3, 1)), rtol=1e-12)


def test_split_into_unequal_parts_is_reported():
    with pytest.raises(ValueError, match="cannot cut length 5 into 2 equal parts"):
        ops.split(Tensor(np.ones(5)), 2)


def test_split_sizes_that_do_not_add_up_are_reported():
    with pytest.raises(ValueError, match=r"sizes \[1, 2\] add to 3, not 4"):
        ops.split(Tensor(np.ones(4)), [1, 2])


def test_split_with_negative_size_is_reported():
    with pytest.raises(ValueError, match="split"):
        ops.split(Tensor(np.ones(4)), [5, -1])


def test_solve_with_non_square_matrix_is_reported():
    with pytest.raises(ValueError, match=r"A must be square \(\.\.\., n, n\), got \(2, 3\)"):
        ops.solve(Tensor(np.ones((2, 3))), Tensor(np.ones((2, 1))))


def test_solve_with_vector_right_hand_side_is_reported():
    with pytest.raises(ValueError, match=r"B must have shape \(\.\.\., 2, k\), got \(2,\)"):
        ops.solve(Tensor(np.eye(2)), Tensor(np.ones(2)))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_out_of_range_is_reported(p):
    with pytest.raises(ValueError, match=rf"p must be in \[0, 1\), got {p}"):
        ops.dropout(Tensor(np.ones(3)), p, np.random.default_rng(0))


def test_mean_over_empty_axis_is_reported():
    with pytest.raises(ValueError, match=r"cannot average over an empty axis \(shape \(3, 0\)\)"):
        ops.mean(Tensor(np.ones((3, 0))), axis=1)


def test_sum_over_out_of_range_axis_is_reported():
    with pytest.raises(ValueError, match="axis 2 is out of range for a tensor with 2 dimensions"):
        ops.sum(Tensor(np.ones((2, 3))), axis=2)


@pytest.mark.parametrize("name", ["sum", "mean"])
@pytest.mark.parametrize("axis", [0, -1, None])
def test_reducing_a_0d_tensor_over_axis_0_or_minus_1_returns_it_as_torch_does(name, axis, backend):
    torch = pytest.importorskip("torch")
    x = leaf(2.5)
    out = getattr(ops, name)(x, axis=axis, keepdims=True)
    expected = getattr(torch, name)(torch.tensor(2.5, dtype=torch.float64), **({} if axis is None else {"dim": axis}))
    assert out.shape == tuple(expected.shape) == ()
    assert out.item() == expected.item()
    out.backward()
    assert x.grad.shape == () and x.grad == 1.0


@pytest.mark.parametrize("name", ["sum", "mean"])
@pytest.mark.parametrize("axis", [1, -2])
def test_reducing_a_0d_tensor_over_another_axis_names_the_axis_and_ndim(name, axis):
    with pytest.raises(ValueError, match=f"{name}: axis {axis} is out of range for a tensor with 0 dimensions"):
        getattr(ops, name)(leaf(2.5), axis=axis)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "matmul", "linear", "solve"])
def test_an_op_of_two_plain_numbers_asks_for_a_tensor(name, backend):
    with pytest.raises(TypeError, match=f"{name if name != 'linear' else 'matmul'}: at least one operand "
                                        "must be a Tensor, got int and float"):
        getattr(ops, name)(1, 2.0)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
def test_a_number_and_a_tensor_take_the_tensors_dtype_as_in_torch(name, backend):
    torch = pytest.importorskip("torch")
    for dtype, torch_dtype in [(np.float32, torch.float32), (np.float64, torch.float64)]:
        x = np.array([1.5, -2.0, 4.0], dtype)
        for ours, theirs in [(getattr(ops, name)(Tensor(x), 3), getattr(torch, name)(torch.from_numpy(x), 3)),
                             (getattr(ops, name)(3, Tensor(x)), getattr(torch, name)(3, torch.from_numpy(x)))]:
            assert ours.dtype == dtype
            np.testing.assert_allclose(ours.data, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("op", [lambda x: ops.reshape(x, (1,)), ops.transpose, lambda x: ops.swapaxes(x, 0, 0),
                                lambda x: ops.getitem(x, ()), lambda x: ops.split(x, 1),
                                lambda x: ops.concat([x]), lambda x: ops.dropout(x, 0.5, np.random.default_rng(0))])
def test_a_shape_op_on_a_plain_number_asks_for_a_tensor(op):
    with pytest.raises(TypeError, match="must be a Tensor, got float"):
        op(2.0)


def test_summing_over_no_axes_is_refused_as_numpy_and_torch_disagree():
    with pytest.raises(ValueError, match=r"sum: axis=\(\) reduces no axis in NumPy but every axis in PyTorch"):
        ops.sum(leaf(np.ones((2, 3))), axis=())


@pytest.mark.parametrize("op, message", [
    (lambda x: ops.swapaxes(x, 0, 5), "swapaxes: axis2 5 is out of range for a tensor with 2 dimensions"),
    (lambda x: ops.split(x, 1, axis=-3), "split: axis -3 is out of range for a tensor with 2 dimensions"),
    (lambda x: ops.concat([x, x], axis=2), "concat: axis 2 is out of range for a tensor with 2 dimensions"),
    (lambda x: ops.split(x[0, 0], 1, axis=0), "split: axis 0 is out of range for a tensor with 0 dimensions"),
    (lambda x: ops.concat([x[0, 0], x[0, 0]]), "concat: 0-d tensors have no axis to join along"),
])
def test_an_axis_out_of_range_names_the_axis_and_ndim(op, message):
    with pytest.raises(ValueError, match=message):
        op(leaf(np.ones((2, 3))))


def test_attention_with_heads_of_width_0_is_empty_with_zero_gradients():
    q = Tensor(np.ones((1, 2, 3, 0)), requires_grad=True)
    bias = Tensor(np.ones((2, 3, 3)), requires_grad=True)
    y = ops.causal_attention(q, q, q, bias)
    assert y.shape == (1, 2, 3, 0)
    ops.sum(y).backward()
    assert q.grad.shape == (1, 2, 3, 0) and np.array_equal(bias.grad, np.zeros((2, 3, 3)))


def test_attention_with_heads_of_width_0_that_do_not_fit_is_refused():
    q, k = Tensor(np.ones((1, 2, 3, 0))), Tensor(np.ones((1, 2, 2, 0)))  # 2 keys for 3 queries
    with pytest.raises(ValueError, match="causal attention needs Tk >= T"):
        ops.causal_attention(q, k, k)


def test_pow_with_tensor_exponent_is_rejected():
    with pytest.raises(TypeError, match="exponent must be a Python number"):
        ops.pow(Tensor(np.ones(2)), Tensor(np.ones(2)))


def test_unary_op_on_int_tensor_is_rejected():
    with pytest.raises(TypeError, match="exp: x must be float32 or float64, got int64"):
        ops.exp(Tensor(np.array([1, 2])))


def test_layer_norm_with_wrong_weight_shape_is_reported():
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(3,\) but x \(2, 4\) needs \(4,\)"):
        ops.layer_norm(Tensor(np.ones((2, 4))), Tensor(np.ones(3)), None)


def test_layer_norm_with_a_bias_of_another_dtype_is_reported(backend):
    with pytest.raises(TypeError, match="layer_norm: x is float64 but bias is float32"):
        ops.layer_norm(Tensor(np.ones((2, 4))), Tensor(np.ones(4)), Tensor(np.ones(4, np.float32)))


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_layer_norm_with_negative_eps_is_reported(eps):
    with pytest.raises(ValueError, match="layer_norm: eps must be >= 0"):
        ops.layer_norm(Tensor(np.ones((2, 4))), Tensor(np.ones(4)), None, eps=eps)


def test_matmul_each_with_a_weight_that_does_not_fit_x_is_reported():
    with pytest.raises(ValueError, match=r"matmul_each: weights\[1\] has shape \(3, 2\) but x \(2, 4\) needs"):
        ops.matmul_each(Tensor(np.ones((2, 4))), [Tensor(np.ones((4, 2))), Tensor(np.ones((3, 2)))])


def test_matmul_each_with_a_weight_of_another_dtype_is_reported():
    with pytest.raises(TypeError, match="matmul_each: weights\\[1\\] is float32 but x is float64"):
        ops.matmul_each(Tensor(np.ones((2, 4))), [Tensor(np.ones((4, 2))), Tensor(np.ones((4, 2), np.float32))])


# ---- edge cases that must stay finite -------------------------------------------------------


def test_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient():
    logits = leaf(normal(2, 3, 5))
    loss = ops.cross_entropy(logits, np.full((2, 3), -1))
    loss.backward()
    assert loss.item() == 0.0
    np.testing.assert_array_equal(logits.grad, np.zeros((2, 3, 5)))


def test_cross_entropy_respects_a_custom_ignore_index():
    logits = normal(2, 5)
    loss = ops.cross_entropy(Tensor(logits), np.array([3, 99]), ignore_index=99)
    only_first = ops.cross_entropy(Tensor(logits[:1]), np.array([3]))
    assert loss.item() == pytest.approx(only_first.item(), rel=1e-12)


def test_softmax_of_a_fully_masked_row_is_zeros_not_nan(backend):
    x = np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf]])
    out = ops.softmax(Tensor(x)).data
    np.testing.assert_array_equal(out[1], [0.0, 0.0, 0.0])
    assert np.all(np.isfinite(out))


def test_softmax_gradient_through_a_fully_masked_row_is_zero(backend):
    x = leaf([[0.5, -1.0, 2.0], [-np.inf, -np.inf, -np.inf]])
    ops.softmax(x).backward(grad=normal(2, 3, seed=1))
    assert np.all(np.isfinite(x.grad))
    np.testing.assert_array_equal(x.grad[1], [0.0, 0.0, 0.0])


def test_causal_softmax_with_fewer_queries_than_keys_lets_the_last_query_see_every_key(backend):
    x = normal(2, 5)  # Tq=2 new queries after 3 cached keys
    out = ops.softmax(Tensor(x), causal=True).data
    np.testing.assert_allclose(out[0, :4], softmax_by_ratios(x[0, :4]), rtol=1e-12)  # sees keys 0..3
    np.testing.assert_allclose(out[1], softmax_by_ratios(x[1]), rtol=1e-12)  # sees every key
    assert out[0, 4] == 0.0


def test_causal_softmax_of_a_square_block_is_lower_triangular(backend):
    out = ops.softmax(Tensor(normal(2, 4, 4)), causal=True).data
    np.testing.assert_array_equal(out * np.triu(np.ones((4, 4)), k=1), 0.0)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_logits_of_1e4(dtype):
    logits = Tensor(np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=dtype), requires_grad=True)
    loss = ops.cross_entropy(logits, np.array([0, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(np.log(2) / 2, rel=1e-6)
    assert np.all(np.isfinite(logits.grad))


def test_pow_with_exponent_zero_has_zero_gradient_at_zero():
    x = leaf([0.0, 2.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        ops.pow(x, 0).backward(grad=np.ones(2))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_is_deterministic_given_the_generator_seed():
    x = Tensor(np.ones((4, 5)))
    first = ops.dropout(x, 0.5, np.random.default_rng(7)).data
    second = ops.dropout(x, 0.5, np.random.default_rng(7)).data
    np.testing.assert_array_equal(first, second)


def test_dropout_scales_kept_elements_by_one_over_one_minus_p():
    x = normal(100)
    out = ops.dropout(Tensor(x), 0.25, np.random.default_rng(0)).data
    kept = out != 0
    assert 0 < kept.sum() < 100
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-14)


def test_dropout_drops_about_p_of_the_elements():
    out = ops.dropout(Tensor(np.ones(20000)), 0.3, np.random.default_rng(0)).data
    assert np.mean(out == 0) == pytest.approx(0.3, abs=0.02)


def test_dropout_gradient_uses_the_same_mask_and_scale():
    x = leaf(normal(50))
    out = ops.dropout(x, 0.4, np.random.default_rng(0))
    out.backward(grad=np.ones(50))
    np.testing.assert_allclose(x.grad, out.data / x.data, rtol=1e-12)


def test_dropout_is_the_identity_in_eval():
    x = Tensor(normal(4, 5))
    assert ops.dropout(x, 0.5, np.random.default_rng(0), training=False) is x


def test_dropout_with_p_zero_is_the_identity():
    x = Tensor(normal(4, 5))
    assert ops.dropout(x, 0.0, np.random.default_rng(0)) is x


# ---- gradient details the catalogue does not spell out --------------------------------------


def test_embedding_gradient_sums_rows_for_repeated_ids():
    weight = leaf(np.zeros((4, 2)))
    ops.embedding(weight, np.array([[1, 1], [3, 1]])).backward(grad=np.ones((2, 2, 2)))
    np.testing.assert_array_equal(weight.grad, [[0, 0], [3, 3], [0, 0], [1, 1]])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(0, 40), st.integers(1, 5), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_embedding_gradient_is_what_add_at_gives(n, positions, width, dtype, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rng.integers(1, n + 1), positions)  # often a few ids, repeated, in any order
    rows = rng.standard_normal((positions, width)).astype(dtype)
    expected = np.zeros((n, width))
    np.add.at(expected, ids, rows.astype(np.float64))  # exact enough to judge either order of the sums
    got = kernels.embedding_backward(ids, rows, n)
    assert got.dtype == np.dtype(dtype)
    rounding = (1e-6 if dtype == np.float32 else 1e-14) * max(1, positions)  # grows with the terms summed
    np.testing.assert_allclose(got, expected, rtol=0, atol=rounding)


def test_matmul_sends_no_gradient_to_a_constant_operand(backend):
    a, b = leaf(normal(2, 3)), Tensor(normal(3, 4, seed=1))
    ops.matmul(a, b).backward(grad=np.ones((2, 4)))
    assert b.grad is None
    # d sum(a @ b) / d a[m, k] = sum_n b[k, n], the same for every row m
    np.testing.assert_allclose(a.grad, np.tile(b.data.sum(axis=1), (2, 1)), rtol=1e-12, atol=1e-12)
