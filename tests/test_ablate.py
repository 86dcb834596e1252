"""The ablation bench: sweeps run end to end, resume, refuse mixed folders, and record failures."""

import csv
import json

import pytest

from minqkv.lab import ablate, ablate_plots, ablate_run, ablate_tables
from minqkv.lab.cli import main

VARIANTS = "abc,abb,abc+gate"


def strict_json(path) -> dict:
    """The file parsed as standard JSON: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def sweep(out, variants=VARIANTS, jobs=1, seeds=None, data="synthetic:copy"):
    return ablate.run_sweep("tiny", data, out, variants, seeds=seeds, jobs=jobs, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep(out)


def test_a_tiny_sweep_writes_three_tables_with_every_column_filled(finished):
    out, rows = finished
    assert [r["variant"] for r in rows] == ["abc", "abb", "abc+gate"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    needed = ["variant", "code", "attention_params", "params", "flops_per_token", "val_loss",
              "accuracy", "delta_vs_canonical", "delta_pct", "tokens_per_s", "decode_ms_per_token",
              "kv_cache_bytes_per_token", "peak_rss_mb"]
    for row in table:
        assert all(row[key] != "" for key in needed), row
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert (out / "results.md").read_text().startswith("| variant | code |")


def test_shared_kv_row_caches_half_of_canonical(finished):
    _, rows = finished
    by_name = {r["variant"]: r for r in rows}
    assert by_name["abb"]["kv_cache_bytes_per_token"] * 2 == by_name["abc"]["kv_cache_bytes_per_token"]
    assert by_name["abb"]["attention_params"] < by_name["abc"]["attention_params"]


def test_the_gated_row_reports_the_pruned_model(finished):
    out, rows = finished
    gated = next(r for r in rows if r["variant"] == "abc+gate")
    result = json.loads((out / "runs" / "abc+gate-seed0" / "result.json").read_text())
    assert gated["code"] == ",".join(result["pruned_codes"])
    assert result["val_loss"] == result["val_loss_after_pruning"]


def test_measured_caches_of_rotary_shared_kv_and_of_a_latent_follow_the_cost_table(tmp_path):
    rows = {r["variant"]: r for r in sweep(tmp_path, "abc,abb,abb+rope,abc+latent-kv8")}
    floats = ablate.SWEEP_PRESETS["tiny"]["model"]["n_embd"]  # one layer, float32: 4 bytes a float
    assert rows["abb"]["kv_cache_bytes_per_token"] == 4 * floats
    assert rows["abb+rope"]["kv_cache_bytes_per_token"] == rows["abc"]["kv_cache_bytes_per_token"] == 4 * 2 * floats
    assert rows["abc+latent-kv8"]["kv_cache_bytes_per_token"] == 4 * 8


def test_two_jobs_give_the_same_numbers_as_one(finished, tmp_path):
    _, serial = finished
    parallel = sweep(tmp_path / "parallel", jobs=2)
    for a, b in zip(serial, parallel):
        assert (a["variant"], a["val_loss"], a["accuracy"]) == (b["variant"], b["val_loss"], b["accuracy"])


def test_rerunning_skips_finished_runs_and_redoes_missing_ones(tmp_path):
    out = tmp_path / "sweep"
    first = sweep(out, variants="abc,abb")
    kept = out / "runs" / "abc-seed0" / "result.json"
    kept_time = kept.stat().st_mtime_ns
    (out / "runs" / "abb-seed0" / "result.json").unlink()
    again = sweep(out, variants="abc,abb")
    assert kept.stat().st_mtime_ns == kept_time
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in first]


def test_an_output_folder_holding_another_sweep_is_refused_before_training(tmp_path):
    out = tmp_path / "sweep"
    sweep(out, variants="abc")
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep(out, variants="abb")
    assert not (out / "runs" / "abb-seed0").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(variants="abd"), "variant 'abd' is not valid"),
    (dict(variants="abc+spin"), "unknown modifier 'spin'"),
    (dict(variants="aaa+mqa"), "cannot share one weight"),
    (dict(data="synthetic:juggle"), "unknown synthetic task"),
])
def test_bad_arguments_fail_before_any_training(tmp_path, kwargs, message):
    out = tmp_path / "sweep"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sweep(out, **kwargs)
    assert not (out / "runs").exists()


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ablate.plan_sweep("huge", "synthetic:copy")


def test_a_failing_run_is_recorded_and_does_not_raise(tmp_path):
    plan = ablate.plan_sweep("tiny", "synthetic:copy", "abc")
    job = {**plan["runs"][0], "seed": 0, "run_dir": str(tmp_path / "run"), "data": "no-such-file.txt",
           "model": plan["model"], "train": plan["train"]}
    result = ablate_run.run_one(job)
    assert result["status"] == "failed" and "no-such-file.txt" in result["error"]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["status"] == "failed"
    row = ablate_tables.aggregate([saved], plan)[0]
    assert row["failed"] == 1 and "val_loss" not in row


def test_a_run_whose_sweep_was_killed_stops_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    """A worker whose parent (the sweep) is gone stops instead of training on as an orphan."""
    plan = ablate.plan_sweep("tiny", "synthetic:copy", "abc")
    job = {**plan["runs"][0], "seed": 0, "run_dir": str(tmp_path / "run"), "data": "synthetic:copy",
           "model": plan["model"], "train": plan["train"]}
    parents = iter([100] + [100] * 5 + [1] * 100)  # the sweep's pid at the start, then init's
    monkeypatch.setattr(ablate_run.os, "getppid", lambda: next(parents))
    with pytest.raises(SystemExit, match="the sweep that started this run is gone"):
        ablate_run.run_one(job)
    assert (tmp_path / "run" / "ckpt.npz").exists() and not (tmp_path / "run" / "result.json").exists()


def test_seeds_that_pruned_differently_stay_in_one_markdown_cell():
    plan = ablate.plan_sweep("tiny", "synthetic:copy", "abc")
    row = {"variant": "abc+gate(L=0.03)", "code": "a-b,--a | abc,--a", "val_loss": 1.0, "seeds": 1}
    line = ablate_tables.format_markdown([row], plan).splitlines()[2]
    assert "a-b,--a \\| abc,--a" in line
    header = ablate_tables.format_markdown([row], plan).splitlines()[0]
    assert line.replace("\\|", "").count("|") == header.count("|")


def test_steps_replaces_the_presets_training_steps_and_nothing_else():
    plan = ablate.plan_sweep("mqar", None, "abc", steps=1500)
    preset = ablate.SWEEP_PRESETS["mqar"]["train"]
    assert plan["train"] == {**preset, "steps": 1500} and preset["steps"] == ablate.MQAR_STEPS
    assert ablate.plan_sweep("mqar", None, "abc")["train"] == preset


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match="--steps must be a positive integer"):
        ablate.plan_sweep("tiny", "synthetic:copy", "abc", steps=steps)


def test_a_folder_refuses_a_sweep_with_other_steps(tmp_path):
    out = tmp_path / "sweep"
    ablate.run_sweep("tiny", "synthetic:copy", out, "abc", progress=False)
    with pytest.raises(ValueError, match="holds a different sweep"):
        ablate.run_sweep("tiny", "synthetic:copy", out, "abc", progress=False, steps=3)


def test_a_preset_brings_its_own_data_unless_data_is_given():
    assert ablate.plan_sweep("recall", None)["data"] == "synthetic:recall"
    assert ablate.plan_sweep("recall", "synthetic:copy")["data"] == "synthetic:copy"
    assert ablate.plan_sweep("quick", None)["data"] == "shakespeare"


def test_the_recall_preset_sets_learned_projections_against_identity_and_wide_init():
    plan = ablate.plan_sweep("recall", None)
    variants = [r["variant"] for r in plan["runs"]]
    assert {"abc", "---", "aab", "aab+wide-init", "abc+wide-init"} <= set(variants)
    assert plan["seeds"] == 2 and plan["model"]["n_layer"] == 2


def test_the_command_prints_the_table(tmp_path, capsys):
    code = main(["ablate", "--preset", "tiny", "--data", "synthetic:copy", "--out", str(tmp_path / "s"),
                 "--variants", "abc,--a", "--quiet", "--no-plots"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| abc | abc |" in printed and "| --a | --a |" in printed


# ---- convergence, and the sweep of the gate penalty ------------------------------------------------


def test_every_row_reports_the_steps_to_reach_canonical_final_loss_times_1_05(finished):
    out, rows = finished
    canonical = next(r for r in rows if r["variant"] == "abc")
    curve = json.loads((out / "runs" / "abc-seed0" / "result.json").read_text())["eval_curve"]
    first = next(step for step, loss in curve if loss <= 1.05 * canonical["val_loss"])
    assert canonical["steps_to_target"] == first
    assert "steps to canonical's final loss x 1.05" in (out / "results.md").read_text()


def test_steps_to_reach_is_the_first_evaluated_step_at_or_below_the_target_mean_over_seeds():
    runs = [{"eval_curve": [[100, 3.0], [200, 2.0], [300, 1.0]]}, {"eval_curve": [[100, 1.5], [200, 1.0]]}]
    assert ablate_tables.steps_to_reach(runs, 2.0) == 150.0


def test_a_run_that_never_reaches_the_target_shows_a_dash():
    assert ablate_tables.steps_to_reach([{"eval_curve": [[100, 3.0], [200, 2.5]]}], 2.0) is None
    assert ablate_tables._cell({"steps_to_target": None}, "steps_to_target", "{:,.0f}") == "-"


def test_the_prune_preset_runs_each_gated_variant_once_per_penalty_next_to_static_variants():
    plan = ablate.plan_sweep("prune", "synthetic:copy")
    variants = [r["variant"] for r in plan["runs"]]
    assert variants[:5] == ["abc", "aab", "abb", "aaa", "--a"]
    gated = [r for r in plan["runs"] if r["overrides"].get("gate")]
    assert len(gated) >= 4
    assert sorted(r["train_overrides"]["gate_penalty"] for r in gated) == ablate.SWEEP_PRESETS["prune"]["gate_penalties"]
    assert gated[0]["variant"] == "abc+gate(L=0.003)"
    assert plan["model"] == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
    assert {k: plan["train"][k] for k in ("steps", "batch_size", "lr", "min_lr", "warmup_steps")} == dict(
        steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100)


def test_a_penalty_sweep_trains_each_penalty_and_plots_quality_against_matrices_kept(tmp_path, monkeypatch):
    tiny = {**ablate.SWEEP_PRESETS["tiny"], "variants": "abc,aab,abc+gate", "gate_penalties": [0.0, 10.0]}
    tiny["train"] = {**tiny["train"], "steps": 20, "warmup_steps": 0, "gate_lr": 2.0}
    monkeypatch.setitem(ablate.SWEEP_PRESETS, "tiny-prune", tiny)
    rows = ablate.run_sweep("tiny-prune", "synthetic:copy", tmp_path, progress=False)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["abc"]["projections"] == "3/3" and by_name["aab"]["projections"] == "2/3"
    assert by_name["abc+gate(L=10)"]["projections_kept"] < by_name["abc+gate(L=0)"]["projections_kept"]
    paths = ablate_plots.write_plots(tmp_path, rows)
    assert tmp_path / "pruning.png" in paths and (tmp_path / "pruning.png").stat().st_size > 0


def test_a_sweep_over_block_sizes_plots_recall_against_memory_one_cell_per_run(tmp_path):
    recall = [{"variant": v, "block_size": T, "state_bytes_per_token": b, "accuracy": a, "lr": 1e-3,
               "learning_rates_tried": 2}
              for v, b in (("abc", 512.0), ("abc+window32", 64.0)) for T, a in ((64, 0.9), (128, 0.1))]
    recall[-1].pop("accuracy")  # a failed run: its cell says so
    paths = ablate_plots.write_plots(tmp_path, [], recall)
    assert paths == [tmp_path / "recall.png"] and paths[0].stat().st_size > 0
    assert not (tmp_path / "final.png").exists()  # a bar per run would be unreadable at 114 runs


# ---- one folder per variant ------------------------------------------------------------------


def test_the_study_at_two_heads_plans_canonical_and_its_gqa2_twin_once():
    plan = ablate.plan_sweep("tiny", "synthetic:copy")  # n_head=2: gqa2 groups nothing
    variants = [r["variant"] for r in plan["runs"]]
    assert len(variants) == len(set(variants))
    assert next(r["label"] for r in plan["runs"] if r["variant"] == "abc") == "canonical"
    assert ("'canonical+gqa2' is the same variant as 'canonical' (abc) at n_head=2: it runs once"
            in plan["notes"])


def test_a_label_listed_twice_trains_one_run_and_reports_one_seed(tmp_path):
    rows = sweep(tmp_path, variants="abc,abc", jobs=2)
    assert [(r["variant"], r["seeds"]) for r in rows] == [("abc", 1)]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["abc-seed0"]


def test_a_second_label_for_a_finished_variant_leaves_its_result_untouched(tmp_path):
    sweep(tmp_path, variants="abc")
    result = tmp_path / "runs" / "abc-seed0" / "result.json"
    before = result.read_bytes()
    rows = sweep(tmp_path, variants="abc,canonical")
    assert result.read_bytes() == before
    assert [(r["label"], r["seeds"]) for r in rows] == [("abc", 1)]


def test_the_table_notes_which_labels_ran_as_one():
    plan = ablate.plan_sweep("tiny", "synthetic:copy", "shared-kv,abb")
    assert "Note: 'abb' is the same variant as 'shared-kv' (abb): it runs once." in ablate_tables.format_markdown([], plan)


# ---- results are standard JSON and never lost ------------------------------------------------------


def test_results_json_holds_null_for_a_figure_no_run_measured(tmp_path):
    plan = ablate.plan_sweep("tiny", "synthetic:copy", "abc")
    ablate_tables.write_results(tmp_path, [{"variant": "abc", "tokens_per_s": float("nan"), "seeds": 1}], plan)
    assert strict_json(tmp_path / "results.json")["rows"][0]["tokens_per_s"] is None


def test_a_finished_run_whose_result_was_lost_keeps_its_measured_speed(tmp_path):
    sweep(tmp_path, variants="abc")
    result = tmp_path / "runs" / "abc-seed0" / "result.json"
    measured = strict_json(result)["tokens_per_s"]
    result.unlink()
    sweep(tmp_path, variants="abc")
    assert strict_json(result)["tokens_per_s"] == measured
    assert strict_json(tmp_path / "results.json")["rows"][0]["tokens_per_s"] == measured


def test_a_run_stopped_after_its_last_checkpoint_writes_standard_json(tmp_path):
    sweep(tmp_path, variants="abc")
    run_dir = tmp_path / "runs" / "abc-seed0"
    for name in ("result.json", "final.json"):  # as if killed right after the last checkpoint
        (run_dir / name).unlink()
    rows = sweep(tmp_path, variants="abc")
    assert strict_json(run_dir / "result.json")["status"] == "ok"
    assert strict_json(tmp_path / "results.json")["rows"] == rows


def test_a_run_recorded_as_failed_trains_again_when_the_sweep_is_rerun(tmp_path):
    sweep(tmp_path, variants="abc")
    result = tmp_path / "runs" / "abc-seed0" / "result.json"
    result.write_text(json.dumps({"status": "failed", "error": "OSError: No space left on device",
                                  "label": "abc", "variant": "abc", "seed": 0}))
    [row] = sweep(tmp_path, variants="abc")
    assert (row["seeds"], row["failed"]) == (1, 0)
    assert strict_json(result)["status"] == "ok"


# ---- the baselines: attention kinds against projection codes --------------------------------------


def test_the_baselines_preset_sets_attention_kinds_against_projection_codes_at_nanogpts_shape():
    plan = ablate.plan_sweep("baselines", None)
    assert [r["variant"] for r in plan["runs"]] == ["abc", "abb", "-ab", "aaa+rotate", "---", "abc+window16",
                                                    "abc+window32", "abc+linear", "abc+performer64", "abc+alibi"]
    assert plan["data"] == "shakespeare" and plan["seeds"] == 2 and plan["extrapolation"] == [2, 4]
    assert plan["model"] == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
    assert plan["train"]["batch_size"] == 12
    overrides = {r["variant"]: r["overrides"] for r in plan["runs"]}
    assert overrides["abc+window16"]["window"] == 16 and overrides["abc+alibi"]["pos"] == "alibi"
    assert (overrides["abc+linear"]["linear_features"], overrides["abc+performer64"]["linear_features"]) == (0, 64)


def test_the_baselines_state_bytes_count_every_kind_of_attention_by_its_decoder_state():
    plan = ablate.plan_sweep("baselines", None)
    state = {r["variant"]: ablate_tables.decode_state_bytes_per_token(r, plan) for r in plan["runs"]}
    per_layer = 4 * 4  # 4 layers of float32
    assert state["abc"] == per_layer * 2 * 128 and state["abb"] == state["abc"] / 2 == state["---"]
    assert state["abc+window16"] == state["abc"] / 4  # 16 of the 64 tokens' keys and values
    assert state["abc+linear"] * 64 == per_layer * 4 * (32 * 32 + 32)  # S and z per head, spread over T = 64
    assert state["abc+performer64"] * 64 == per_layer * 4 * (64 * 32 + 64)


def test_presets_without_extrapolation_keep_their_columns(finished):
    out, rows = finished
    assert not any(key.startswith("val_loss_") and key.endswith("x") for row in rows for key in row)
    header = (out / "results.md").read_text().splitlines()[0]
    assert "KV bytes/token" in header and "val loss at" not in header and "state bytes" not in header


@pytest.fixture(scope="module")
def tiny_baselines(tmp_path_factory):
    """The baselines machinery at the tiny preset's sizes: learned positions and ALiBi, a few steps."""
    out = tmp_path_factory.mktemp("baselines")
    tiny = {**ablate.SWEEP_PRESETS["tiny"], "variants": "abc,abc+alibi", "extrapolation": [2, 4]}
    tiny["train"] = {**tiny["train"], "steps": 4, "eval_interval": 2}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ablate.SWEEP_PRESETS, "tiny-baselines", tiny)
        rows = ablate.run_sweep("tiny-baselines", "synthetic:copy", out, progress=False)
    return out, rows


def test_a_model_without_a_position_table_is_scored_at_two_and_four_times_its_block(tiny_baselines):
    out, rows = tiny_baselines
    by_name = {r["variant"]: r for r in rows}
    assert all(r["seeds"] == 1 for r in rows)
    assert by_name["abc"]["val_loss_2x"] is None and by_name["abc"]["val_loss_4x"] is None
    alibi = strict_json(out / "runs" / "abc+alibi-seed0" / "result.json")
    assert alibi["val_loss_2x"] > 0 and alibi["val_loss_4x"] > 0
    assert by_name["abc+alibi"]["val_loss_4x"] == alibi["val_loss_4x"]
    assert strict_json(out / "runs" / "abc-seed0" / "result.json")["val_loss_2x"] is None


def test_the_baselines_table_shows_extrapolation_and_state_bytes(tiny_baselines):
    out, rows = tiny_baselines
    lines = (out / "results.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[header.index("val loss"):][:3] == ["val loss", "val loss at 2T", "val loss at 4T"]
    assert "state bytes/token" in header and "KV bytes/token" not in header and "FLOPs/token" in header
    abc = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert abc[header.index("val loss at 2T")] == "" and abc[header.index("state bytes/token")] == "128"
    with open(out / "results.csv") as f:
        table = {row["variant"]: row for row in csv.DictReader(f)}
    assert table["abc"]["val_loss_2x"] == "" and float(table["abc+alibi"]["val_loss_2x"]) > 0
    assert float(table["abc"]["kv_cache_bytes_per_token"]) == 128  # the measured cache stays in the CSV
