"""Specification of the exercises: every stub fails its checks as 'not implemented', every
solution passes them, typical mistakes fail them, and the `minqkv exercise` commands behave."""

import argparse
import ast
import re
from pathlib import Path

import pytest

from minqkv.lab.cli import build_parser, main
from minqkv.lab.exercises import EXERCISES
from minqkv.lab.exercises.workspace import check, solution_path, stub_path

NAMES = list(EXERCISES)
REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mistaken(tmp_path, name, old, new) -> Path:
    """The solution of `name` with one mistake: `old` replaced by `new`."""
    text = solution_path(name).read_text()
    assert old in text, f"{old!r} is not in the solution of {name}"
    path = tmp_path / f"{name}.py"
    path.write_text(text.replace(old, new))
    return path


def failures(outcomes) -> list:
    return [o for o in outcomes if not o.passed]


# ---- stubs and solutions ---------------------------------------------------------------------------


def test_there_are_at_least_eight_exercises_each_with_minutes_and_hints():
    assert len(EXERCISES) >= 8
    assert all(e.minutes > 0 and len(e.hints) >= 2 and e.what for e in EXERCISES.values())


@pytest.mark.parametrize("name", NAMES)
def test_the_untouched_stub_fails_every_check_as_not_implemented(name):
    outcomes = check(name, stub_path(name))
    assert len(outcomes) >= 3
    assert all(not o.passed and o.message.startswith("not implemented yet") for o in outcomes)


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes_every_check(name):
    outcomes = check(name, solution_path(name))
    assert failures(outcomes) == []


@pytest.mark.parametrize("name", NAMES)
def test_stub_and_solution_define_the_same_functions_with_the_same_signatures(name):
    def signatures(path):
        tree = ast.parse(path.read_text())
        return {node.name: ast.dump(node.args) for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef)}

    assert signatures(stub_path(name)) == signatures(solution_path(name))
    assert 'raise NotImplementedError("your code here")' in stub_path(name).read_text()
    assert "NotImplementedError" not in solution_path(name).read_text()


# ---- typical mistakes fail -------------------------------------------------------------------------


def test_mul_backward_without_summing_the_broadcast_axes_fails_on_shape(tmp_path):
    path = mistaken(tmp_path, "mul_backward", "da = sum_to_shape(grad * b, np.shape(a))", "da = grad * b")
    wrong = failures(check("mul_backward", path))
    assert wrong and all("da has shape" in o.message for o in wrong)
    assert check("mul_backward", path)[0].passed  # same shapes: nothing to sum, still right


def test_matmul_backward_off_by_a_factor_fails_against_minqkv_and_finite_differences(tmp_path):
    path = mistaken(tmp_path, "matmul_backward", "da = grad @ b.T", "da = 2 * grad @ b.T")
    outcomes = check("matmul_backward", path)
    assert all(not o.passed for o in outcomes)
    assert "da differs from minqkv's" in outcomes[0].message
    assert "da disagrees with finite differences" in outcomes[-1].message


def test_matmul_backward_with_a_transposed_gradient_fails_on_shape(tmp_path):
    path = mistaken(tmp_path, "matmul_backward", "db = a.T @ grad", "db = grad.T @ a")
    assert any("db has shape (5, 4), expected (4, 5)" in o.message for o in check("matmul_backward", path))


def test_softmax_backward_without_the_normalisation_term_fails(tmp_path):
    path = mistaken(tmp_path, "softmax_backward", "return y * (grad - (grad * y).sum(axis=-1, keepdims=True))",
                    "return y * grad")
    assert all(not o.passed for o in check("softmax_backward", path))


def test_layer_norm_backward_without_the_variance_term_fails(tmp_path):
    path = mistaken(tmp_path, "layer_norm_backward", " - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))", ")")
    outcomes = check("layer_norm_backward", path)
    assert all(not o.passed for o in outcomes)
    assert "dx" in outcomes[0].message


def test_cross_entropy_backward_that_forgets_the_ignored_positions_fails(tmp_path):
    path = mistaken(tmp_path, "cross_entropy_backward", "    p[~counted] = 0.0\n", "")
    passed = {o.check: o.passed for o in check("cross_entropy_backward", path)}
    assert passed["against minqkv, 1x11"]  # one position, counted: nothing to forget
    assert not passed["against minqkv, 4x7"] and not passed["finite differences, 5x6"]


def test_cross_entropy_backward_that_forgets_the_mean_fails(tmp_path):
    path = mistaken(tmp_path, "cross_entropy_backward", "grad * p / max(counted.sum(), 1)", "grad * p")
    assert "dlogits differs from minqkv's" in check("cross_entropy_backward", path)[0].message


def test_attend_with_the_mask_of_a_cacheless_layer_fails_only_after_cached_tokens(tmp_path):
    path = mistaken(tmp_path, "attend", "np.arange(Tk - T, Tk)[:, None]", "np.arange(T)[:, None]")
    passed = {o.check: o.passed for o in check("attend", path)}
    assert passed["2 heads, T = Tk = 5, hd = 3"]
    assert not passed["one new query after 5 cached tokens"]


def test_attend_without_the_causal_mask_fails(tmp_path):
    path = mistaken(tmp_path, "attend", "scores = np.where(future, -np.inf, scores)", "")
    assert not check("attend", path)[0].passed


def test_project_shared_kv_with_two_copies_of_k_fails_the_tying_check_only(tmp_path):
    path = mistaken(tmp_path, "project_shared_kv", "return q, k, k", "return q, k, k.copy()")
    wrong = failures(check("project_shared_kv", path))
    assert [o.check for o in wrong] == ["k and v are one array, computed once"]


def test_kv_cache_that_concatenates_fails_only_the_growth_check(tmp_path):
    path = mistaken(tmp_path, "kv_cache", "capacity = max(end, 2 * (", "capacity = max(end, 0 * (")
    wrong = failures(check("kv_cache", path))
    assert [o.check for o in wrong] == ["100 one-token appends replace the buffer O(log n) times"]
    assert "replaced 100 times" in wrong[0].message


def test_hard_concrete_without_the_clip_fails_exactly_open_or_shut(tmp_path):
    path = mistaken(tmp_path, "hard_concrete", "return ops.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)",
                    "return s * (ZETA - GAMMA) + GAMMA")
    passed = {o.check: o.passed for o in check("hard_concrete", path)}
    assert not passed["exactly 0 and exactly 1 beyond the stretch"]
    assert passed["finite differences, no noise"]  # inside the stretch the clip changes nothing


def test_hard_concrete_on_plain_arrays_is_told_to_return_a_tensor(tmp_path):
    path = mistaken(tmp_path, "hard_concrete", "return ops.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)",
                    "return ops.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0).data")
    assert "return a minqkv Tensor" in check("hard_concrete", path)[0].message


def test_an_error_in_the_learners_code_is_one_line_naming_where_it_happened(tmp_path):
    path = mistaken(tmp_path, "matmul_backward", "da = grad @ b.T", "da = grad @ undefined_name")
    message = check("matmul_backward", path)[0].message
    assert message.startswith("NameError:") and "of your matmul_backward" in message and "\n" not in message


def test_a_file_that_does_not_import_is_one_failed_check(tmp_path):
    path = tmp_path / "attend.py"
    path.write_text("def attend(q, k, v:\n")
    (outcome,) = check("attend", path)
    assert not outcome.passed and outcome.message.startswith("SyntaxError")


# ---- the command ------------------------------------------------------------------------------------


def test_list_names_every_exercise_with_its_minutes(capsys):
    code, out, _ = run_cli(capsys, "exercise", "list")
    assert code == 0
    for e in EXERCISES.values():
        assert re.search(rf"^{e.name}\s+{e.minutes} min", out, re.M)


def test_start_copies_the_stub_into_the_workspace(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "exercise", "start", "attend", "--dir", str(tmp_path / "ws"))
    assert code == 0 and "check attend" in out
    assert (tmp_path / "ws" / "attend.py").read_text() == stub_path("attend").read_text()


def test_start_refuses_to_overwrite_the_learners_work_unless_forced(tmp_path, capsys):
    work = tmp_path / "attend.py"
    work.write_text("# my work\n")
    code, _, err = run_cli(capsys, "exercise", "start", "attend", "--dir", str(tmp_path))
    assert code == 2 and "--force" in err and work.read_text() == "# my work\n"
    assert run_cli(capsys, "exercise", "start", "attend", "--dir", str(tmp_path), "--force")[0] == 0
    assert work.read_text() == stub_path("attend").read_text()


def test_check_of_a_fresh_stub_exits_1_and_says_not_implemented(tmp_path, capsys):
    run_cli(capsys, "exercise", "start", "softmax_backward", "--dir", str(tmp_path))
    code, out, _ = run_cli(capsys, "exercise", "check", "softmax_backward", "--dir", str(tmp_path))
    assert code == 1 and "not implemented yet" in out and "0/4 checks passed" in out and "Traceback" not in out
    assert "minqkv exercise hint softmax_backward" in out


def test_check_of_the_written_solution_exits_0(tmp_path, capsys):
    run_cli(capsys, "exercise", "start", "kv_cache", "--dir", str(tmp_path))
    assert run_cli(capsys, "exercise", "solution", "kv_cache", "--write", "--dir", str(tmp_path))[0] == 2
    assert run_cli(capsys, "exercise", "solution", "kv_cache", "--write", "--dir", str(tmp_path), "--force")[0] == 0
    code, out, _ = run_cli(capsys, "exercise", "check", "kv_cache", "--dir", str(tmp_path))
    assert code == 0 and "4/4 checks passed" in out and "FAIL" not in out


def test_check_grades_any_file_given_with_file(capsys):
    code, _, _ = run_cli(capsys, "exercise", "check", "hard_concrete", "--file", str(solution_path("hard_concrete")))
    assert code == 0


def test_check_without_a_started_exercise_says_to_start_it(tmp_path, capsys):
    code, _, err = run_cli(capsys, "exercise", "check", "attend", "--dir", str(tmp_path))
    assert code == 2 and "minqkv exercise start attend" in err


def test_hint_prints_the_numbered_hints(capsys):
    code, out, _ = run_cli(capsys, "exercise", "hint", "mul_backward")
    assert code == 0 and out.startswith("1. ") and "\n2. " in out


def test_solution_prints_the_solution_file(capsys):
    code, out, _ = run_cli(capsys, "exercise", "solution", "matmul_backward")
    assert code == 0 and out == solution_path("matmul_backward").read_text()


def test_an_unknown_exercise_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit) as info:
        main(["exercise", "check", "flash_attention"])
    assert info.value.code == 2 and "mul_backward" in capsys.readouterr().err


def test_every_flag_of_every_exercise_action_has_help_text():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = next(a for a in commands.choices["exercise"]._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, parser in actions.choices.items()
               for action in parser._actions if action.dest != "help" and not action.help]
    assert missing == []


def test_stubs_and_solutions_ship_in_the_wheel():
    text = (REPO / "pyproject.toml").read_text()
    assert '"minqkv.lab.exercises.stubs"' in text and '"minqkv.lab.exercises.solutions"' in text
