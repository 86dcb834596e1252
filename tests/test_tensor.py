"""The Tensor engine: how backward walks the graph, when no graph is kept, and the dtype rule."""

import numpy as np
import pytest

from minqkv import ops
from minqkv.nn import Parameter
from minqkv.lab.op_checks import _draw, op_cases
from minqkv.tensor import Tensor, is_grad_enabled, no_grad


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# ---- backward -----------------------------------------------------------------------------


def test_backward_on_scalar_fills_leaf_gradient():
    x = leaf([1.0, 2.0, 3.0])
    (x * x).sum().backward()  # d/dx sum(x^2) = 2x
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])


def test_backward_on_a_leaf_scalar_gives_one():
    x = leaf(5.0)
    x.backward()
    assert x.grad == 1.0


def test_tensor_used_twice_in_mul_accumulates_both_paths():
    x = leaf([3.0, -2.0])
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, -4.0])


def test_tensor_used_twice_in_add_accumulates_both_paths():
    x = leaf([3.0, -2.0])
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_tensor_reached_through_a_diamond_gets_the_sum_of_both_branches():
    x = leaf(2.0)
    a, b = x * 3.0, x.exp()
    (a * b).backward()  # d/dx 3x e^x = 3 e^x + 3x e^x
    assert x.grad == pytest.approx(3 * np.exp(2.0) * (1 + 2.0))


def test_leaf_gradient_accumulates_across_two_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * 4.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


def test_calling_backward_twice_on_one_graph_adds_the_gradient_twice():
    x = leaf([1.0, 2.0])
    y = (x * 3.0).sum()
    y.backward()
    y.backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


def test_zero_grad_clears_the_gradient():
    x = leaf([1.0])
    x.sum().backward()
    x.zero_grad()
    assert x.grad is None


def test_interior_tensors_keep_no_gradient():
    x = leaf([1.0, 2.0])
    hidden = x * 2.0
    hidden.sum().backward()
    assert hidden.grad is None
    assert x.grad is not None


def test_inputs_without_requires_grad_get_no_gradient():
    x, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    (x * c).sum().backward()
    assert c.grad is None


def test_deep_chain_of_20000_adds_backpropagates_without_recursion_error():
    x = leaf(0.0)
    y = x
    for _ in range(20000):
        y = y + 1.0
    y.backward()
    assert y.item() == 20000.0
    assert x.grad == 1.0
    del y  # freeing the chain must not recurse either


def test_backward_on_non_scalar_without_grad_asks_for_grad():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(2,\); pass grad="):
        (x * 2.0).backward()


def test_backward_on_non_scalar_with_grad_uses_it_as_the_upstream_gradient():
    x = leaf([1.0, 2.0])
    (x * 2.0).backward(grad=np.array([10.0, 100.0]))
    np.testing.assert_array_equal(x.grad, [20.0, 200.0])


def test_backward_with_a_grad_of_the_wrong_shape_raises():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected \(2,\)"):
        (x * 2.0).backward(grad=np.ones(3))


def test_backward_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        Tensor(np.array(1.0)).backward()


# ---- no_grad and detach -------------------------------------------------------------------


def test_no_grad_records_no_graph():
    x = leaf([1.0, 2.0])
    with no_grad():
        y = (x * 2.0).sum()
    assert not y.requires_grad
    assert y._parents == ()
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_nests_and_restores_the_previous_state():
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_no_grad_restores_grad_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()


def test_graph_is_recorded_again_after_no_grad():
    x = leaf([1.0])
    with no_grad():
        pass
    assert (x * 2.0).requires_grad


def test_detach_cuts_the_graph():
    x = leaf([1.0, 2.0])
    y = (x * 3.0).detach() * x  # the detached factor is a constant 3x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 6.0])


def test_detach_shares_memory_and_needs_no_gradient():
    x = leaf([1.0, 2.0])
    d = x.detach()
    assert not d.requires_grad
    assert np.shares_memory(d.data, x.data)


def test_ndarray_on_the_left_defers_to_the_tensor_operator():
    x = leaf([1.0, 2.0])
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


# ---- inputs edited after the forward ---------------------------------------------------------


def test_assigning_new_data_to_an_input_after_the_forward_makes_backward_refuse():
    w = leaf([1.0, 2.0])
    y = (w * w).sum()
    w.data = np.array([3.0, 4.0])
    with pytest.raises(RuntimeError, match="input 0 of 'mul' \\(a leaf, float64 \\(2,\\)\\) was changed in place"):
        y.backward()


def test_an_augmented_assignment_to_an_ops_output_makes_backward_refuse():
    w = leaf([1.0, 2.0])
    h = w * 2.0
    y = (h * h).sum()
    h.data += 1  # h's array is edited, and handed back to the setter, which counts it
    with pytest.raises(RuntimeError, match="of 'mul' \\(the output of 'mul'.*recompute the forward"):
        y.backward()


def test_each_assignment_to_data_counts_as_a_change():
    t = Tensor(np.zeros(2))
    t.data += 1
    t.data *= 2
    t.data = np.ones(2)
    assert t._version == 3


@pytest.mark.parametrize("write", [lambda a: a.__setitem__(0, 5.0), lambda a: np.copyto(a, 5.0),
                                   lambda a: a.__iadd__(1.0)], ids=["element", "copyto", "in-place add"])
def test_a_parameter_read_by_a_graph_is_read_only_until_backward(write):
    w = Parameter(np.array([1.0, 2.0]))
    y = (w * w).sum()
    with pytest.raises(ValueError, match="read-only"):
        write(w.data)
    y.backward()
    write(w.data)
    np.testing.assert_array_equal(w.grad, [2.0, 4.0])


def test_writable_data_opens_a_parameter_and_counts_a_change_so_backward_refuses():
    w = Parameter(np.array([1.0, 2.0]))
    y = (w * w).sum()
    w.writable_data()[0] = 5.0
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


def test_a_backward_that_refuses_still_unlocks_the_parameters():
    w, x = Parameter(np.array([1.0, 2.0])), Parameter(np.array([5.0]))
    z = (x * x).sum() + (w * w).sum()
    w.data = np.array([1.0, 1.0])
    with pytest.raises(RuntimeError):
        z.backward()
    assert x.data.flags.writeable


def test_plain_tensors_are_never_locked_so_finite_differences_beside_a_graph_work():
    x, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    (x * c).sum()  # a graph that is never walked
    x.data[0] += 1e-5
    c.data[0] = 0.0
    assert x.data.flags.writeable and c.data.flags.writeable


def test_an_array_that_was_read_only_already_stays_read_only_after_backward():
    w = Parameter(np.broadcast_to(np.array([1.0]), (3,)))
    (w * w).sum().backward()
    assert not w.data.flags.writeable


# ---- dtype rule -----------------------------------------------------------------------------


def test_int_tensor_with_requires_grad_raises():
    with pytest.raises(TypeError, match="requires_grad=True needs float32 or float64 data, got int64"):
        Tensor(np.array([1, 2], dtype=np.int64), requires_grad=True)


@pytest.mark.parametrize("case", op_cases(), ids=lambda case: case.name)
def test_every_op_keeps_float32_in_forward_and_backward(case):
    rng = np.random.default_rng(0)
    inputs = [Tensor(_draw(shape, case.kind, rng).astype(np.float32), requires_grad=True)
              for shape in case.shapes]
    out = case.fn(*inputs)
    assert out.dtype == np.float32
    out.backward(grad=np.ones(out.shape, dtype=np.float32))
    assert [x.grad.dtype for x in inputs] == [np.float32] * len(inputs)


SCALAR_OPERAND_OPS = {
    "x + 2": lambda x: x + 2,
    "2 + x": lambda x: 2 + x,
    "x - 1.5": lambda x: x - 1.5,
    "1.5 - x": lambda x: 1.5 - x,
    "x * 3": lambda x: x * 3,
    "0.5 * x": lambda x: 0.5 * x,
    "x / 2.0": lambda x: x / 2.0,
    "2.0 / x": lambda x: 2.0 / x,
    "x ** 2": lambda x: x ** 2,
    "x ** 0.5": lambda x: x ** 0.5,
    "x + numpy float64 scalar": lambda x: x + np.float64(1.0),
    "x * int array": lambda x: x * np.array([1, 2, 3]),
    "mean": lambda x: ops.mean(x),
    "gelu": ops.gelu,
}


@pytest.mark.parametrize("fn", SCALAR_OPERAND_OPS.values(), ids=SCALAR_OPERAND_OPS.keys())
def test_python_scalar_operands_keep_float32(fn):
    x = Tensor(np.array([2.0, 3.0, 4.0], dtype=np.float32), requires_grad=True)
    out = fn(x)
    assert out.dtype == np.float32
    ops.sum(out).backward()
    assert x.grad.dtype == np.float32


ZERO_D_OPS = {name: SCALAR_OPERAND_OPS[name] for name in
              ["x + 2", "1.5 - x", "0.5 * x", "2.0 / x", "x ** 0.5", "mean", "gelu"]}


@pytest.mark.parametrize("fn", ZERO_D_OPS.values(), ids=ZERO_D_OPS.keys())
def test_python_scalar_operands_keep_float32_on_0d_tensors(fn):
    # NumPy 1 promoted float32 0-d arrays to float64 when mixed with a Python float
    x = Tensor(np.float32(2.0), requires_grad=True)
    out = fn(x)
    assert out.dtype == np.float32
    out.backward()
    assert x.grad.dtype == np.float32


MIXING_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "matmul": lambda a, b: ops.reshape(a, (3, 1)) @ ops.reshape(b, (1, 3)),
    "concat": lambda a, b: ops.concat([a, b]),
    "solve": lambda a, b: ops.solve(ops.reshape(a, (1, 3))[:, :1], ops.reshape(b, (1, 3))),
}


@pytest.mark.parametrize("name", MIXING_OPS)
def test_mixing_float32_and_float64_raises_type_error_naming_the_op(name):
    a = Tensor(np.ones(3, dtype=np.float32))
    b = Tensor(np.ones(3, dtype=np.float64))
    with pytest.raises(TypeError, match=rf"^{name}: "):
        MIXING_OPS[name](a, b)


def test_float64_array_operand_with_float32_tensor_raises_type_error():
    with pytest.raises(TypeError, match="mul: b is a float64 array but the tensor is float32"):
        Tensor(np.ones(3, dtype=np.float32)) * np.ones(3)


def test_layer_norm_with_float64_weight_on_float32_input_raises_type_error():
    x = Tensor(np.ones((2, 3), dtype=np.float32))
    weight = Tensor(np.ones(3, dtype=np.float64))
    with pytest.raises(TypeError, match="layer_norm"):
        ops.layer_norm(x, weight, None)
