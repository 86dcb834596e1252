"""gradcheck.py: the finite-difference referee must catch wrong backwards and refuse bad inputs."""

import json
import runpy
import sys

import numpy as np
import pytest

from minqkv import ops
from minqkv.lab import cli
from minqkv.lab.gradcheck import CheckResult, check, format_table, gradcheck
from minqkv.tensor import Tensor


def leaf(*shape, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


def square_with_wrong_backward(x):
    """x^2 whose backward claims d/dx = x (the true derivative is 2x)."""
    return Tensor.from_op(x.data ** 2, (x,), lambda g: (g * x.data,), "broken_square")


def test_gradcheck_passes_a_correct_op():
    assert gradcheck(ops.tanh, [leaf(3, 4)])[0] < 1e-8


def test_gradcheck_reports_one_error_per_input():
    assert len(gradcheck(ops.mul, [leaf(3), leaf(3, seed=1)])) == 2


def test_gradcheck_detects_a_wrong_backward():
    error = gradcheck(square_with_wrong_backward, [leaf(5)])[0]
    assert error == pytest.approx(0.5, rel=1e-6)  # |x - 2x| / |2x|


def test_check_marks_a_wrong_backward_as_failed():
    result = check("broken square", square_with_wrong_backward, [leaf(5)])
    assert not result.passed


def test_gradcheck_detects_a_backward_that_forgets_an_input():
    def mul_forgetting_b(a, b):
        return Tensor.from_op(a.data * b.data, (a, b), lambda g: (g * b.data, None), "mul")

    errors = gradcheck(mul_forgetting_b, [leaf(3), leaf(3, seed=1)])
    assert errors[0] < 1e-8
    assert errors[1] == pytest.approx(1.0)


def test_gradcheck_rejects_float32_inputs():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match=r"inputs\[0\] is float32; finite differences need float64"):
        gradcheck(ops.exp, [x])


def test_gradcheck_rejects_inputs_without_requires_grad():
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a Tensor with requires_grad=True"):
        gradcheck(ops.mul, [leaf(3), Tensor(np.ones(3))])


def test_gradcheck_rejects_plain_arrays():
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a Tensor"):
        gradcheck(ops.exp, [np.ones(3)])


def test_gradcheck_rejects_inputs_with_nan():
    x = Tensor(np.array([1.0, np.nan]), requires_grad=True)
    with pytest.raises(ValueError, match=r"inputs\[0\] contains NaN or Inf"):
        gradcheck(ops.exp, [x])


def test_gradcheck_leaves_input_values_unchanged():
    x = leaf(4, 3)
    before = x.data.copy()
    gradcheck(ops.exp, [x])
    np.testing.assert_array_equal(x.data, before)


def test_gradcheck_ignores_a_stale_gradient_on_the_input():
    x = leaf(3)
    x.grad = np.full(3, 100.0)  # a stale gradient must not leak into the check
    assert gradcheck(ops.exp, [x])[0] < 1e-8


def test_gradcheck_passes_a_correct_op_on_a_transposed_input():
    x = Tensor(np.random.default_rng(0).standard_normal((4, 3)).T, requires_grad=True)
    assert gradcheck(ops.exp, [x])[0] < 1e-8


def counted_exp(calls: list):
    """ops.exp that appends to `calls` each time it runs."""
    def exp(x):
        calls.append(1)
        return ops.exp(x)
    return exp


def test_max_elements_checks_only_that_many_elements_per_input():
    calls = []
    error = gradcheck(counted_exp(calls), [leaf(10, 10)], max_elements=7)[0]
    assert len(calls) == 1 + 2 * 7  # one backward pass, then two evaluations per checked element
    assert error < 1e-8


def test_max_elements_larger_than_the_input_checks_every_element():
    calls = []
    gradcheck(counted_exp(calls), [leaf(3)], max_elements=100)
    assert len(calls) == 1 + 2 * 3


def test_max_elements_still_catches_a_wrong_backward():
    assert gradcheck(square_with_wrong_backward, [leaf(50)], max_elements=5)[0] > 0.1


def test_check_result_as_dict_is_json_ready():
    result = check("mul", ops.mul, [leaf(2, 3), leaf(3, seed=1)])
    record = result.as_dict()
    assert {"name", "dtype", "shapes", "max_rel_err", "passed"} <= set(record)
    assert record["name"] == "mul"
    assert record["dtype"] == "float64"
    assert record["shapes"] == [[2, 3], [3]]
    assert record["max_rel_err"] == result.max_rel_err == max(result.per_input)
    assert record["passed"] is True
    assert json.loads(json.dumps(record)) == record


def test_check_result_with_nan_error_does_not_pass():
    assert not CheckResult("nan", "float64", [(1,)], max_rel_err=float("nan")).passed


def test_format_table_marks_failures_and_counts_passes():
    results = [check("exp", ops.exp, [leaf(3)]),
               check("broken square", square_with_wrong_backward, [leaf(3)])]
    table = format_table(results)
    assert "FAIL" in table.splitlines()[3]
    assert table.endswith("1/2 checks passed")


# ---- the `minqkv gradcheck` command fails loudly on a wrong gradient -----------------------


def tanh_with_doubled_backward(x):
    """tanh whose backward is twice the true derivative 1 - tanh^2."""
    out = np.tanh(x.data)
    return Tensor.from_op(out, (x,), lambda g: (2 * g * (1 - out * out),), "tanh")


real_gelu = ops.gelu


def gelu_with_halved_backward(x):
    """The real gelu forward, exactly (y/2 + y/2), but only one half carries a gradient."""
    y = real_gelu(x)
    return 0.5 * y + 0.5 * y.detach()


def failing_rows(table: str) -> list:
    return [line.split()[0] for line in table.splitlines() if line.rstrip().endswith("FAIL")]


def test_gradcheck_command_exits_1_and_names_the_op_with_a_wrong_backward(monkeypatch, capsys):
    monkeypatch.setattr(ops, "tanh", tanh_with_doubled_backward)
    assert cli.main(["gradcheck"]) == 1
    table = capsys.readouterr().out
    assert failing_rows(table) == ["tanh"]
    assert "checks passed" in table.splitlines()[-1]


def test_gradcheck_command_json_marks_only_the_wrong_op_as_failed(monkeypatch, capsys):
    monkeypatch.setattr(ops, "tanh", tanh_with_doubled_backward)
    assert cli.main(["gradcheck", "--json"]) == 1
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records if not r["passed"]] == ["tanh"]


def test_python_dash_m_minqkv_gradcheck_exits_with_status_1_on_a_wrong_backward(monkeypatch, capsys):
    monkeypatch.setattr(ops, "tanh", tanh_with_doubled_backward)
    monkeypatch.setattr(sys, "argv", ["minqkv", "gradcheck"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("minqkv", run_name="__main__")
    assert exit_info.value.code == 1
    assert failing_rows(capsys.readouterr().out) == ["tanh"]


def test_gradcheck_command_passes_with_the_real_ops(capsys):
    assert cli.main(["gradcheck"]) == 0
    assert failing_rows(capsys.readouterr().out) == []


def test_variant_gradcheck_command_exits_1_and_names_the_broken_variant(monkeypatch, capsys):
    monkeypatch.setattr(ops, "gelu", gelu_with_halved_backward)
    assert cli.main(["gradcheck", "--variant", "abc+no-out-proj"]) == 1
    assert failing_rows(capsys.readouterr().out) == ["abc+no-out-proj"]
