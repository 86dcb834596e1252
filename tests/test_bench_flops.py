"""The step bench's FLOP rate and the long bench's wall budget: figures derived from counts, no timing."""

import io

import pytest

from minqkv.lab import bench_step


def test_a_steps_flops_are_three_forwards_of_every_token_counted_by_hand():
    L, H, C, T, B = bench_step.STEP_SHAPES["nanogpt-cpu"]
    V, hidden = bench_step.VOCAB_SIZE, 4 * C
    attention = 2 * 3 * C * C + 2 * 2 * T * C + 2 * C * C  # q,k,v; scores and weighted sum; out proj
    mlp = 2 * 2 * C * hidden
    forward_per_token = L * (attention + mlp) + 2 * C * V
    assert bench_step.step_gflop((L, H, C, T, B)) == pytest.approx(3 * forward_per_token * T * B / 1e9)


def test_flop_rates_are_the_steps_flops_over_its_time_and_a_share_of_the_better_gemm():
    row = {"minqkv_ms": 100.0, "torch_ms": 50.0, "minqkv_gemm_gflops": 80.0, "numpy_gemm_gflops": 160.0}
    bench_step._add_flop_rates([row], gflop=4.0, sides=("minqkv", "torch"))
    assert row["minqkv_gflops"] == 40.0 and row["torch_gflops"] == 80.0
    assert row["gemm_peak_gflops"] == 160.0 and row["minqkv_percent_of_peak"] == 25.0


def test_the_step_table_shows_the_flop_rate_beside_the_peak():
    row = {"shape": "nanogpt-cpu", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
           "threads": 1, "minqkv_ms": 100.0, "minqkv_tokens_per_s": 7680, "minqkv_speedup": 1.0,
           "minqkv_peak_mb": 80.0, "minqkv_gemm_gflops": 90.0, "numpy_gemm_gflops": 100.0}
    bench_step._add_flop_rates([row], gflop=4.0, sides=("minqkv",))
    table = bench_step.format_step_table([row])
    assert "GFLOP/s" in table.splitlines()[0] and "% of peak" in table.splitlines()[0]
    assert "40.0" in table and "40%" in table


def test_a_row_guessed_to_overrun_the_budget_is_skipped_and_said():
    log = io.StringIO()
    budget = bench_step._Budget(100.0, log)
    budget.last["attention"] = (1024, 10.0)
    assert budget.fits("attention", 2048, "attention T=2048")  # about 40 s: fits
    assert not budget.fits("attention", 4096, "attention T=4096")  # about 160 s: does not
    assert budget.skipped == [line for line in log.getvalue().splitlines()]
    assert "attention T=4096: skipped, about 160 s" in budget.skipped[0]


def test_a_kind_linear_in_t_is_guessed_to_grow_as_t():
    budget = bench_step._Budget(50.0, None)
    budget.last[("attention", "linear")] = (1024, 10.0)
    assert budget.fits(("attention", "linear"), 4096, "attention linear T=4096", power=1)  # about 40 s
    assert not budget.fits(("attention", "linear"), 4096, "attention linear T=4096")  # as T^2: about 160 s


def test_a_kind_not_seen_yet_is_guessed_from_its_family():
    budget = bench_step._Budget(30.0, None)
    budget.last[("study", 8)] = (8192, 40.0)
    assert not budget.fits(("study", 1), 8192, "study abc threads=1")


def test_the_long_bench_on_no_budget_runs_nothing_and_lists_what_it_skipped():
    log = io.StringIO()
    result = bench_step.run_long_bench(lengths=(65,), with_torch=False, budget_s=0, log=log)
    assert result["attention"] == result["step"] == result["study"] == []
    assert result["attention_kinds"] == []
    assert len(result["skipped"]) == 2 + len(bench_step.LONG_ATTENTION_KINDS) + len(bench_step.STUDY_MODELS)
    assert log.getvalue().count("skipped") == len(result["skipped"])
    assert "rows skipped to stay within the 0 s budget" in bench_step.format_long_table(result)
