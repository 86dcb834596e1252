"""The step bench times one computation on both sides: the same GPT, weights, batch and optimiser."""

import json
from dataclasses import replace

import pytest

from minqkv.lab import bench_step, cli
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW
from minqkv.train import TrainConfig

torch = pytest.importorskip("torch")
torch_gpt = pytest.importorskip("minqkv.lab.torch_gpt")


def test_the_default_shape_is_the_default_model_at_trains_batch_size():
    default = GPTConfig()
    assert bench_step.STEP_SHAPES["default"] == (default.n_layer, default.n_head, default.n_embd,
                                                 default.block_size, TrainConfig.batch_size)


def test_both_sides_start_from_one_loss_and_take_the_same_adamw_steps():
    shape = bench_step.STEP_SHAPES["nanogpt-cpu"]
    config = replace(bench_step._config(shape, seed=0), dtype="float64")
    ids = bench_step._batch(shape, seed=0)
    model = GPT(config)
    weights = torch_gpt.weights_of(model)
    optimizers = AdamW(model.named_parameters(), **bench_step.ADAMW), torch_gpt.adamw(weights, **bench_step.ADAMW)
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        reference = torch_gpt.loss(weights, config, torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]))
        assert float(loss.data) == pytest.approx(reference.item(), rel=1e-9)
        model.zero_grad()
        loss.backward()
        optimizers[1].zero_grad()
        reference.backward()
        for optimizer in optimizers:
            optimizer.step()


KIND_COLUMNS = {"kind", "T", "threads", "minqkv_ms", "minqkv_step_mb", "full_ms", "full_step_mb", "ms_vs_full"}


def test_step_rows_carry_each_sides_flop_rate_and_the_minqkv_over_torch_ratio_in_json():
    rows = bench_step.run_step_bench(threads=(1,), shapes=("nanogpt-cpu",), rounds=1, steps_per_round=1, warmup=0)
    [row] = json.loads(json.dumps(rows))
    assert {"minqkv_gflops", "torch_gflops", "minqkv_percent_of_peak", "ratio"} <= set(row)
    assert row["ratio"] == pytest.approx(row["minqkv_ms"] / row["torch_ms"], rel=0.01)


def test_long_bench_times_every_attention_kind_beside_full_attention_at_each_length(monkeypatch):
    study = ("abc", "abc+window256", "abc+linear")
    monkeypatch.setattr(bench_step, "STUDY_MODELS", {name: bench_step.STUDY_MODELS[name] for name in study})
    result = bench_step.run_long_bench(lengths=(128, 320), rounds=1, with_torch=False, log=None)
    kinds = result["attention_kinds"]
    assert [(r["T"], r["kind"]) for r in kinds] == [(T, kind) for T in (128, 320)
                                                    for kind in bench_step.LONG_ATTENTION_KINDS]
    full = {r["T"]: r for r in result["attention"]}
    for row in json.loads(json.dumps(kinds)):
        assert KIND_COLUMNS <= set(row) and "torch_ms" not in row
        assert row["full_ms"] == full[row["T"]]["minqkv_ms"]
        assert row["ms_vs_full"] == pytest.approx(row["minqkv_ms"] / row["full_ms"], rel=0.01)
    state = {r["model"]: r["kv_cache_mb"] for r in result["study"]}
    assert list(state) == list(study)
    assert state["abc+linear"] < state["abc+window256"] < state["abc"]  # a state, the last 256 tokens, all 320
    assert "beside full causal attention" in bench_step.format_long_table(result)


def test_long_bench_names_the_pytorch_reference_of_each_attention_kind(monkeypatch):
    monkeypatch.setattr(bench_step, "STUDY_MODELS", {})
    result = bench_step.run_long_bench(lengths=(128,), rounds=1, with_torch=True, log=None,
                                       kinds=("window64", "performer64"))
    references = {r["kind"]: r["torch_reference"] for r in result["attention_kinds"]}
    assert references == {"window64": "SDPA, band mask", "performer64": "cumsum"}
    for row in result["attention_kinds"]:
        assert {"torch_ms", "torch_step_mb", "ratio"} <= set(row)
    table = bench_step.format_long_table(result)
    assert "torch reference" in table and "boolean (T, T) band mask, O(T^2)" in table
    assert "plain torch.cumsum" in table


def test_bench_budget_is_passed_to_the_long_bench(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench_step, "run_long_bench", lambda **kwargs: calls.append(kwargs) or {})
    assert cli.main(["bench", "--long", "--json", "--budget", "90"]) == 0
    assert cli.main(["bench", "--long", "--json"]) == 0
    assert [c["budget_s"] for c in calls] == [90.0, bench_step.LONG_BUDGET_S]


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "inf", "soon"])
def test_bench_refuses_a_budget_that_is_not_a_positive_number_of_seconds(budget, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--long", "--budget", budget])
    assert f"--budget {budget!r}: give the wall seconds the long bench may take" in capsys.readouterr().err
