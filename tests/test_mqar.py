"""synthetic:mqar: multi-query associative recall on Zoology's protocol, its id tokenizer, its spec,
a short training run on it, and the ablation preset that sweeps it."""

import json
import re

import numpy as np
import pytest

from minqkv import data
from minqkv.checkpoint import load_model
from minqkv.data import IGNORE, CharTokenizer, IdTokenizer, load_corpus, mqar_example, tokenizer_from_dict
from minqkv.lab import ablate, ablate_tables, analysis
from minqkv.lab.cli import main
from minqkv.model import GPTConfig
from minqkv.train import TrainConfig, train


def examples(count, block_size=64, vocab=8192, pairs=4, power=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return [mqar_example(rng, block_size, vocab, pairs, power) for _ in range(count)]


# ---- the generator -------------------------------------------------------------------------------


def test_keys_come_from_the_lower_half_of_the_vocabulary_and_values_from_the_upper():
    for x, _ in examples(200, vocab=64, pairs=8):
        keys, values = x[0:16:2], x[1:16:2]
        assert ((1 <= keys) & (keys < 32)).all() and ((32 <= values) & (values < 64)).all()
        assert len(set(keys.tolist())) == 8 and len(set(values.tolist())) == 8


def test_every_key_is_queried_once_and_its_answer_is_its_pairs_value():
    for x, y in examples(200, block_size=128, pairs=8):
        value_of = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
        scored = np.flatnonzero(y != IGNORE)
        assert sorted(x[scored].tolist()) == sorted(value_of)  # each key once, as a query
        assert all(y[t] == value_of[x[t]] for t in scored)


def test_only_query_positions_after_the_pairs_are_scored_at_even_offsets():
    for x, y in examples(200, block_size=64, pairs=4):
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) == 4
        assert (scored >= 8).all() and ((scored - 8) % 2 == 0).all() and (scored < 64).all()
        assert x.shape == y.shape == (64,) and x.dtype == y.dtype == np.int64


def test_the_filler_is_drawn_from_the_whole_vocabulary():
    filler = np.concatenate([np.delete(x, np.r_[0:8, np.flatnonzero(y != IGNORE)])
                             for x, y in examples(300, vocab=64)])
    assert set(filler.tolist()) == set(range(64))


def test_gap_weights_follow_the_power_law():
    weights = data.mqar_gap_weights(100, 0.01)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2 ** 0.99)  # (g + 1)^(a - 1) with a = 0.01
    assert weights[0] / weights[9] == pytest.approx(10 ** 0.99)
    assert np.allclose(data.mqar_gap_weights(10, 1.0), 0.1)  # a = 1: uniform


def test_one_pair_is_queried_at_a_gap_drawn_from_the_power_law():
    """With one pair the gap is one draw from the weights: its histogram must match them."""
    draws = 4000
    gaps = [(np.flatnonzero(y != IGNORE)[0] - 2) // 2 for _, y in examples(draws, block_size=64, pairs=1)]
    counts = np.bincount(gaps, minlength=31)  # (64 - 2) // 2 = 31 slots
    expected = draws * data.mqar_gap_weights(31, 0.01)
    for gap in (0, 1, 2, 10):
        assert abs(counts[gap] - expected[gap]) < 5 * np.sqrt(expected[gap]), (gap, counts[gap], expected[gap])
    assert counts[:4].sum() > 0.4 * draws  # a quarter of the gaps on the first 4 slots: most queries come early


def test_power_one_places_queries_uniformly():
    gaps = [(np.flatnonzero(y != IGNORE)[0] - 2) // 2 for _, y in examples(4000, pairs=1, power=1.0)]
    assert np.mean(gaps) == pytest.approx(15, abs=0.5)  # uniform over 0..30
    assert np.mean(np.array(gaps) < 4) == pytest.approx(4 / 31, abs=0.03)


# ---- the corpus ----------------------------------------------------------------------------------


def test_the_default_spec_is_zoologys_vocabulary_with_a_pair_per_16_tokens():
    corpus = load_corpus("synthetic:mqar")
    assert corpus.tokenizer == IdTokenizer(8192) and corpus.metric == "accuracy"
    assert [corpus.pairs_at(T) for T in (64, 128, 256)] == [4, 8, 16]
    x, y = corpus.batch("train", 3, 128, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 128) and ((y != IGNORE).sum(axis=1) == 8).all()


def test_settings_in_the_spec_fix_vocabulary_pairs_and_power():
    corpus = load_corpus("synthetic:mqar:vocab=256,pairs=5,power=1")
    assert (corpus.vocab, corpus.pairs, corpus.power) == (256, 5, 1.0)
    assert corpus.tokenizer.vocab_size == 256 and corpus.pairs_at(64) == corpus.pairs_at(256) == 5
    x, y = corpus.batch("train", 4, 64, np.random.default_rng(0))
    assert x.max() < 256 and ((y != IGNORE).sum(axis=1) == 5).all()


def test_the_validation_set_is_fixed_by_the_seed():
    a, b = load_corpus("synthetic:mqar", seed=0), load_corpus("synthetic:mqar", seed=0)
    xa, ya = a.validation_set(64)
    xb, yb = b.validation_set(64)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    xc, _ = load_corpus("synthetic:mqar", seed=1).validation_set(64)
    assert not np.array_equal(xa, xc)
    batches = a.eval_batches("val", 8, 64, 2)
    assert np.array_equal(batches[1][0], xa[8:16])


def test_an_example_prints_as_token_ids():
    text = load_corpus("synthetic:mqar:vocab=64").example(np.random.default_rng(0), 32)
    ids = [int(word) for word in text.split()]
    assert len(ids) == 32 and all(0 <= i < 64 for i in ids)


@pytest.mark.parametrize("spec, message", [
    ("synthetic:mqar:", "'' is not a setting"),
    ("synthetic:mqar:vocab", "'vocab' is not a setting"),
    ("synthetic:mqar:size=8", "'size=8' is not a setting: write NAME=VALUE"),
    ("synthetic:mqar:vocab=64,,pairs=2", "'' is not a setting"),
    ("synthetic:mqar:vocab=64,vocab=128", "sets vocab more than once"),
    ("synthetic:mqar:vocab=3", r"vocab must be a whole number in \[4, 65536\], got '3'"),
    ("synthetic:mqar:vocab=100000", "vocab must be a whole number"),
    ("synthetic:mqar:vocab=1e3", "vocab must be a whole number"),
    ("synthetic:mqar:pairs=0", "pairs must be a whole number"),
    ("synthetic:mqar:pairs=-2", "pairs must be a whole number"),
    ("synthetic:mqar:power=0", r"power must be a number in \(0, 1\]"),
    ("synthetic:mqar:power=nan", "power must be a number"),
    ("synthetic:mqar:power=2", "power must be a number"),
    ("synthetic:mqar:vocab=16,pairs=8", "pairs=8 needs that many distinct keys, but vocab=16 has 7"),
    ("synthetic:mqarx", "unknown synthetic task 'mqarx'"),
])
def test_a_bad_spec_is_refused_with_the_setting_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(spec)


def test_the_unknown_task_message_lists_mqar():
    with pytest.raises(ValueError, match="synthetic:recall, synthetic:mqar"):
        load_corpus("synthetic:juggle")


def test_a_block_too_small_for_the_pairs_is_refused():
    corpus = load_corpus("synthetic:mqar:pairs=16")
    with pytest.raises(ValueError, match="16 key-value pairs and their queries need block_size of at least 64"):
        corpus.batch("train", 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 64"):
        corpus.eval_batches("val", 2, 32, 1)


def test_pairs_that_follow_the_block_size_can_outgrow_a_small_vocabulary():
    with pytest.raises(ValueError, match="more than its 7 distinct keys"):
        load_corpus("synthetic:mqar:vocab=16").batch("train", 2, 256, np.random.default_rng(0))


# ---- the id tokenizer ----------------------------------------------------------------------------


def test_ids_round_trip_through_text_and_json():
    tokenizer = IdTokenizer(8192)
    assert tokenizer.decode(np.array([12, 4097, 3])) == "12 4097 3"
    assert tokenizer.encode("12 4097 3").tolist() == [12, 4097, 3]
    assert tokenizer.decode(np.array([], dtype=np.int64)) == ""
    restored = tokenizer_from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored == tokenizer and restored != IdTokenizer(64)
    assert tokenizer != CharTokenizer("ab")


def test_a_checkpoints_tokenizer_of_either_kind_is_read_back():
    chars = CharTokenizer("abc")
    assert tokenizer_from_dict(chars.to_dict()) == chars
    assert tokenizer_from_dict(IdTokenizer(64).to_dict()) == IdTokenizer(64)
    with pytest.raises(ValueError, match="CharTokenizer.from_dict"):  # one kind each: ids are not characters
        CharTokenizer.from_dict(IdTokenizer(64).to_dict())


@pytest.mark.parametrize("call, message", [
    (lambda: IdTokenizer(1), r"vocab_size must be an integer in \[2, 65536\]"),
    (lambda: IdTokenizer(True), "vocab_size must be an integer"),
    (lambda: IdTokenizer(64).encode("1 2 x"), "token ids separated by spaces"),
    (lambda: IdTokenizer(64).encode("1 64"), r"ids must lie in \[0, 64\), got \[64\]"),
    (lambda: IdTokenizer(64).decode(np.array([-1, 3])), r"got \[-1\]"),
    (lambda: IdTokenizer(64).decode(np.zeros((2, 2), dtype=np.int64)), "1-D array of integers"),
    (lambda: IdTokenizer(64).decode(np.array([1.5])), "1-D array of integers"),
    (lambda: IdTokenizer.from_dict({"kind": "ids"}), "from_dict"),
])
def test_bad_ids_and_sizes_are_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- training on it ------------------------------------------------------------------------------


def test_a_short_run_trains_saves_loads_and_resumes_on_mqar(tmp_path):
    model = GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32)
    settings = dict(data="synthetic:mqar:vocab=64", out=str(tmp_path / "run"), batch_size=8,
                    warmup_steps=0, eval_interval=5, eval_iters=2)
    losses = []
    final = train(model, TrainConfig(steps=10, **settings), progress=False,
                  on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 10 and 0 <= final["accuracy"] <= 1 and "val_bpc" not in final
    loaded, tokenizer, _ = load_model(tmp_path / "run")
    assert tokenizer == IdTokenizer(64) and loaded.config.vocab_size == 64
    resumed = train(model, TrainConfig(steps=15, **settings), resume=True, progress=False)
    assert resumed["steps"] == 15


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    """A run folder of a few steps on synthetic:mqar:vocab=64 (block 16, one layer)."""
    out = tmp_path_factory.mktemp("mqar") / "run"
    train(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16),
          TrainConfig(data="synthetic:mqar:vocab=64", out=str(out), steps=2, batch_size=4, warmup_steps=0,
                      eval_interval=2, eval_iters=1), progress=False)
    return out


def test_resuming_on_data_of_another_id_vocabulary_is_refused_naming_both(mqar_run):
    settings = dict(data="synthetic:mqar:vocab=64", out=str(mqar_run), steps=4, batch_size=4, warmup_steps=0,
                    eval_interval=2, eval_iters=1)
    other = load_corpus("synthetic:mqar:vocab=128")  # as a Dask worker hands the data over
    with pytest.raises(ValueError, match=r"another vocabulary .*IdTokenizer\(vocab_size=128\) against "
                                         r"the checkpoint's IdTokenizer\(vocab_size=64\)"):
        train(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16), TrainConfig(**settings),
              resume=True, progress=False, corpus=other)


def test_sampling_a_checkpoint_of_ids_takes_and_prints_ids(mqar_run, capsys):
    assert main(["sample", "--out", str(mqar_run), "--prompt", "3 40 3", "--sample-tokens", "5"]) == 0
    words = capsys.readouterr().out.split()
    assert words[:3] == ["3", "40", "3"] and len(words) == 8 and all(0 <= int(w) < 64 for w in words)


@pytest.mark.parametrize("prompt, message", [
    (None, "reads token ids, not text .*give --prompt as ids in \\[0, 64\\)"),
    ("ROMEO", "--prompt: encode: text must be token ids separated by spaces"),
    ("3 64", r"--prompt: encode: ids must lie in \[0, 64\)"),
    ("   ", "--prompt holds no token ids"),
])
def test_sampling_a_checkpoint_of_ids_refuses_a_text_prompt_clearly(mqar_run, capsys, prompt, message):
    flags = [] if prompt is None else ["--prompt", prompt]
    assert main(["sample", "--out", str(mqar_run), "--sample-tokens", "2", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_heat_maps_of_a_checkpoint_of_ids_label_each_token_by_its_id(mqar_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    labels = []
    monkeypatch.setattr(Axes, "set_xticks", lambda self, ticks, shown=None, **kw: labels.append(list(shown)))
    result = analysis.analyze_checkpoint(mqar_run, n_batches=1, batch_size=1, heatmaps_dir=tmp_path)
    assert len(result["heatmaps"]) == 1
    assert len(labels[0]) == 16 and all(0 <= int(label) < 64 for label in labels[0])


# ---- the ablation preset -------------------------------------------------------------------------


def test_the_mqar_preset_runs_every_code_and_kind_at_three_block_sizes_and_each_learning_rate():
    plan = ablate.plan_sweep("mqar", None)
    spec = ablate.SWEEP_PRESETS["mqar"]
    assert plan["data"] == "synthetic:mqar" and plan["model"]["n_head"] == 1
    assert plan["grid"] == {"block_sizes": [64, 128, 256], "learning_rates": spec["learning_rates"],
                            "tokens_per_batch": 2048}
    assert len(plan["runs"]) == (15 + len(ablate.MQAR_KINDS)) * 3 * len(spec["learning_rates"])
    assert {r["label"] for r in plan["runs"]} >= {"abc+window32", "abc+linear", "abc+performer64", "abc+alibi"}
    assert len({r["variant"] for r in plan["runs"]}) == len(plan["runs"])
    abc = [r for r in plan["runs"] if r["label"] == "abc"]
    assert [(r["overrides"]["block_size"], r["train_overrides"]["lr"]) for r in abc] == [
        (T, lr) for T in (64, 128, 256) for lr in spec["learning_rates"]]
    assert abc[0]["variant"] == f"abc(T=64,lr={spec['learning_rates'][0]:g})"
    assert all(r["train_overrides"]["min_lr"] == r["train_overrides"]["lr"] / 10 for r in plan["runs"])
    assert [r["train_overrides"]["batch_size"] for r in abc[::2]] == [32, 16, 8]  # 2048 tokens a step


def test_presets_without_a_grid_plan_as_before():
    plan = ablate.plan_sweep("prune", "synthetic:copy")
    assert "grid" not in plan
    assert [r["variant"] for r in plan["runs"]][5:] == [f"abc+gate(L={L:g})" for L in (0.003, 0.01, 0.03, 0.1)]
    assert "train_overrides" not in plan["runs"][0]


def test_the_recall_table_keeps_the_best_learning_rate_per_block_size():
    plan = ablate.plan_sweep("mqar", None, "abc,abb")
    accuracy = {"abc(T=64,lr=0.001)": 0.5, "abc(T=64,lr=0.003)": 0.9, "abb(T=64,lr=0.001)": 0.4,
                "abb(T=64,lr=0.003)": 0.2}
    rows = [{"variant": r["variant"], "seeds": 1, "val_loss": 1.0, "accuracy": accuracy.get(r["variant"], 0.1)}
            for r in plan["runs"]]
    best = {(r["variant"], r["block_size"]): r for r in ablate_tables.recall_rows(rows, plan)}
    assert len(best) == 2 * 3
    assert (best["abc", 64]["accuracy"], best["abc", 64]["lr"]) == (0.9, 0.003)
    assert (best["abb", 64]["accuracy"], best["abb", 64]["lr"]) == (0.4, 0.001)
    assert best["abc", 64]["state_bytes_per_token"] == 2 * 64 * 4  # K and V, 64 floats each, float32
    assert best["abb", 256]["state_bytes_per_token"] == 64 * 4  # one tensor is both
    table = ablate_tables.format_markdown(rows, plan)
    assert "| abb | 256 | 0.400 (0.001) | 0.100 (0.001) | 0.100 (0.001) |" in table
    assert "| abc | 512 | 0.900 (0.003) |" in table
    assert table.index("| abb | 256 |") < table.index("| abc | 512 |")  # fewest state bytes first


def test_the_recall_tables_state_bytes_count_linear_attentions_state_spread_over_the_tokens():
    plan = ablate.plan_sweep("mqar", None, "abc,abc+linear,abc+window16")
    rows = [{"variant": r["variant"], "seeds": 1, "val_loss": 1.0, "accuracy": 0.5} for r in plan["runs"]]
    state = {(r["variant"], r["block_size"]): r["state_bytes_per_token"]
             for r in ablate_tables.recall_rows(rows, plan)}
    # elu + 1 features, one head of width 64: S (64 x 64) and z (64), whatever the context
    assert [state["abc+linear", T] * T for T in (64, 128, 256)] == [(64 * 64 + 64) * 4] * 3
    assert [state["abc+window16", T] * T for T in (64, 128, 256)] == [16 * 2 * 64 * 4] * 3
    assert state["abc", 256] == 2 * 64 * 4
    table = ablate_tables.format_markdown(rows, plan)
    assert "| abc+linear | 260 / 130 / 65 |" in table and "| abc+window16 | 128 / 64 / 32 |" in table
    assert table.index("| abc+window16 |") < table.index("| abc+linear |") < table.index("| abc | 512 |")


def test_a_cell_whose_runs_all_failed_says_so():
    plan = ablate.plan_sweep("mqar", None, "abc")
    rows = [{"variant": r["variant"], "seeds": 1, "val_loss": 1.0, "accuracy": 0.5}
            for r in plan["runs"] if "T=256" not in r["variant"]]
    assert "| abc | 512 | 0.500 (0.001) | 0.500 (0.001) | failed |" in ablate_tables.format_markdown(rows, plan)


def test_a_tiny_grid_sweep_on_mqar_writes_the_recall_table(tmp_path, monkeypatch):
    tiny = {**ablate.SWEEP_PRESETS["tiny"], "variants": "abc,abb", "data": "synthetic:mqar:vocab=64",
            "block_sizes": [16, 32], "learning_rates": [1e-3, 3e-3], "tokens_per_batch": 64}
    tiny["train"] = {**tiny["train"], "steps": 4, "eval_interval": 2}
    monkeypatch.setitem(ablate.SWEEP_PRESETS, "tiny-mqar", tiny)
    rows = ablate.run_sweep("tiny-mqar", None, tmp_path, jobs=2, progress=False)
    assert len(rows) == 8 and all(r["seeds"] == 1 and 0 <= r["accuracy"] <= 1 for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["block_size"]) for r in saved["best_per_block_size"]] == [
        ("abc", 16), ("abc", 32), ("abb", 16), ("abb", 32)]
    assert "| abb | 64 |" in (tmp_path / "results.md").read_text()  # one 16-wide tensor is K and V: 64 bytes
