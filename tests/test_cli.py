"""Specification of the `minqkv` command, called in-process through cli.main (and once as
`python -m minqkv`)."""

import argparse
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import minqkv.atomic as atomic_module
from minqkv import __version__
from minqkv.lab import bench
from minqkv.attention import ALL_CODES
from minqkv.checkpoint import load_checkpoint
from minqkv.lab.cli import main
from minqkv.lock import folder_lock

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--steps", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
              "--batch-size", "8", "--eval-interval", "10", "--eval-iters", "2", "--lr", "0.01",
              "--min-lr", "0.001", "--warmup-steps", "2", "--quiet"]
ROW_KEYS = {"code", "names", "params_per_layer", "flops_per_token", "kv_cache_floats_per_token", "symmetric"}


@pytest.fixture
def text_file(tmp_path):
    """A small text that holds every character of the default sample prompt 'ROMEO:\\n'."""
    path = tmp_path / "play.txt"
    path.write_text("ROMEO:\nthe cat sat on the mat.\nJULIET:\nthe dog ate the log.\n" * 60)
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"minqkv {__version__}"


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0
    assert "train" in out and "variants" in out


def run_python_dash_m(*argv, **env_vars):
    """`python -m minqkv ARGV` in a fresh process (a fresh import of the package)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env_vars}
    return subprocess.run([sys.executable, "-m", "minqkv", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_python_dash_m_minqkv_runs_the_command():
    done = run_python_dash_m("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"minqkv {__version__}"


def test_a_bad_thread_count_in_the_environment_is_one_line_with_exit_code_2():
    done = run_python_dash_m("train", MINQKV_NUM_THREADS="abc")
    assert done.returncode == 2
    assert done.stderr.startswith("minqkv: error: MINQKV_NUM_THREADS='abc' is not a thread count")
    assert len(done.stderr.strip().splitlines()) == 1


# ---- variants ----------------------------------------------------------------------------------


def test_variants_json_lists_the_15_codes_with_their_costs(capsys):
    code, out, _ = run_cli(capsys, "variants", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["code"] for r in rows] == list(ALL_CODES)
    assert all(ROW_KEYS <= r.keys() for r in rows)
    by_code = {r["code"]: r for r in rows}
    assert by_code["abb"]["kv_cache_floats_per_token"] * 2 == by_code["abc"]["kv_cache_floats_per_token"]
    assert by_code["abc"]["params_per_layer"] == 4 * 128 * 128
    assert "shared-kv" in by_code["abb"]["names"]
    assert {r["code"] for r in rows if r["symmetric"]} == {"aab", "aaa", "--a", "aa-", "---"}


def test_variants_reports_codes_that_grouped_heads_rule_out(capsys):
    code, out, _ = run_cli(capsys, "variants", "--json", "--n-kv-head", "1")
    rows = {r["code"]: r for r in json.loads(out)}
    assert code == 0
    assert "cannot share one weight" in rows["aab"]["error"]
    assert rows["abc"]["kv_cache_floats_per_token"] == 2 * 128 // 4


def test_variants_preset_gpt2_small_prints_the_table_with_model_sizes(capsys):
    code, out, _ = run_cli(capsys, "variants", "--preset", "gpt2-small")
    assert code == 0
    assert "model params" in out
    assert f"{4 * 768 * 768:,}" in out  # canonical attention per layer
    for c in ALL_CODES:
        assert c in out


def test_variants_preset_json_counts_the_whole_model(capsys):
    _, out, _ = run_cli(capsys, "variants", "--preset", "gpt2-small", "--json")
    rows = {r["code"]: r for r in json.loads(out)}
    saved = rows["abc"]["model_params"] - rows["aab"]["model_params"]
    assert saved == 12 * 768 * 768  # one C x C matrix in each of 12 layers


def test_variants_with_rotary_positions_cache_shared_kv_keys_and_values_apart(capsys):
    code, out, _ = run_cli(capsys, "variants", "--json", "--modifiers", "rope")
    rows = {r["code"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["abb"]["kv_cache_floats_per_token"] == rows["abc"]["kv_cache_floats_per_token"] == 2 * 128
    assert {c for c, r in rows.items() if r["symmetric"]} == {"aab", "aaa", "--a", "aa-", "---"}


def test_variants_with_a_latent_cache_r_floats_and_say_which_codes_cannot_take_it(capsys):
    code, out, _ = run_cli(capsys, "variants", "--json", "--modifiers", "out-gate+latent-kv32")
    rows = {r["code"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["abc"]["kv_cache_floats_per_token"] == rows["abb"]["kv_cache_floats_per_token"] == 32
    assert rows["abc"]["params_per_layer"] == 128 * 128 + 128 * 32 + 2 * 32 * 128 + 128 * 128 + 128 * 4
    assert "Q shares its weight with K" in rows["aab"]["error"] and "K is the identity" in rows["a-b"]["error"]


def test_variants_modifiers_must_agree_with_n_kv_head(capsys):
    code, _, err = run_cli(capsys, "variants", "--modifiers", "mqa", "--n-kv-head", "2")
    assert code == 2 and "--modifiers mqa disagrees with --n-kv-head 2" in err
    code, _, err = run_cli(capsys, "variants", "--modifiers", "spin")
    assert code == 2 and "unknown modifier 'spin'" in err


# ---- gradcheck ---------------------------------------------------------------------------------


def test_gradcheck_json_reports_every_op_passing(capsys):
    code, out, _ = run_cli(capsys, "gradcheck", "--json")
    results = json.loads(out)
    assert code == 0
    assert len(results) > 10
    for r in results:
        assert {"name", "dtype", "shapes", "max_rel_err", "passed"} <= r.keys()
        assert r["passed"] and r["max_rel_err"] < 1e-6, r["name"]


def test_gradcheck_of_one_labelled_variant_checks_a_float64_model(capsys):
    # one case (~2 s); 'abb' alone would also run its three modifier cases, and
    # test_attention.py checks every case already
    code, out, _ = run_cli(capsys, "gradcheck", "--variant", "shared-kv+mqa", "--json")
    results = json.loads(out)
    assert code == 0
    assert [r["name"] for r in results] == ["shared-kv+mqa"]
    assert results[0]["passed"] and results[0]["dtype"] == "float64"
    assert results[0]["max_rel_err"] < 1e-6


def test_gradcheck_table_says_how_many_checks_passed(capsys):
    code, out, _ = run_cli(capsys, "gradcheck", "--variant", "none")
    assert code == 0
    assert "1/1 checks passed" in out


def test_gradcheck_of_an_unknown_variant_fails_with_exit_code_2(capsys):
    code, out, err = run_cli(capsys, "gradcheck", "--variant", "abd")
    assert code == 2
    assert "variant 'abd' is not valid" in err


# ---- train and sample --------------------------------------------------------------------------


def test_train_writes_its_files_and_prints_a_summary_and_a_sample(capsys, tmp_path, text_file):
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir),
                           "--variant", "shared-kv", "--sample-tokens", "30", *TINY_TRAIN)
    assert code == 0
    assert {"ckpt.npz", "final.json", "metrics.jsonl"} <= {p.name for p in out_dir.iterdir()}
    final = json.loads((out_dir / "final.json").read_text())
    assert final["code"] == "abb" and final["steps"] == 20
    assert "abb: val loss" in out
    sample = out.split("--- sample (30 characters, temperature 0.8) ---\n", 1)[1]
    assert sample.startswith("ROMEO:\n")
    assert len(sample) == len("ROMEO:\n") + 30 + 1  # prompt, 30 sampled characters, print's newline


def test_train_says_where_it_saved_the_run_and_how_to_sample_from_it(capsys, tmp_path, text_file):
    out_dir = str(tmp_path / "run")
    code, out, _ = run_cli(capsys, "train", "--data", text_file, "--out", out_dir, "--sample-tokens", "0",
                           *TINY_TRAIN)
    assert code == 0
    assert f"saved in {out_dir}: sample with `minqkv sample --out {out_dir}`" in out
    code, sampled, _ = run_cli(capsys, "sample", "--out", out_dir, "--prompt", "the ", "--sample-tokens", "5")
    assert code == 0 and sampled.startswith("the ")


def test_sample_and_analyze_accept_the_run_folder_as_ckpt_too(capsys, tmp_path, text_file):
    out_dir = str(tmp_path / "run")
    run_cli(capsys, "train", "--data", text_file, "--out", out_dir, "--sample-tokens", "0", *TINY_TRAIN)
    by_out = run_cli(capsys, "sample", "--out", out_dir, "--prompt", "the ", "--sample-tokens", "8")
    by_ckpt = run_cli(capsys, "sample", "--ckpt", out_dir, "--prompt", "the ", "--tokens", "8")
    assert by_out == by_ckpt and by_out[0] == 0

def test_train_with_gates_reports_the_decisions_and_the_matrices_kept(capsys, tmp_path, text_file):
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir), "--gate",
                           "--gate-penalty", "1", "--gate-lr", "0.5", "--sample-tokens", "0", *TINY_TRAIN)
    assert code == 0
    final = json.loads((out_dir / "final.json").read_text())
    assert {"gates", "pruned_codes", "projections_kept", "projections_total", "val_loss_before_pruning",
            "val_loss_after_pruning"} <= set(final)
    assert f"{final['projections_kept']} of 3 projection matrices kept" in out


def test_train_with_rotary_positions_output_gates_and_a_latent_saves_them_in_the_checkpoint(capsys, tmp_path,
                                                                                             text_file):
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir), "--pos", "rope",
                           "--out-gate", "--latent-kv", "8", "--sample-tokens", "5", *TINY_TRAIN)
    assert code == 0
    assert "abc+rope+out-gate+latent-kv8: val loss" in out
    saved = load_checkpoint(out_dir)[0]["model_config"]
    assert (saved["pos"], saved["out_gate"], saved["latent_kv"]) == ("rope", True, 8)


def test_train_with_a_label_and_a_flag_that_disagree_fails_with_exit_code_2(capsys, tmp_path, text_file):
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"),
                           "--variant", "abc+rope", "--pos", "none", *TINY_TRAIN)
    assert code == 2 and "disagrees with the flags pos='none'" in err


def test_train_with_a_latent_on_a_code_that_cannot_take_it_says_why(capsys, tmp_path, text_file):
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"),
                           "--variant", "aab+latent-kv8", *TINY_TRAIN)
    assert code == 2 and "Q shares its weight with K" in err


def test_train_on_a_text_without_the_sample_prompts_characters_succeeds(capsys, tmp_path):
    path = tmp_path / "lower.txt"
    path.write_text("the cat sat on the mat. the dog ate the log. " * 80)
    code, _, err = run_cli(capsys, "train", "--data", str(path), "--out", str(tmp_path / "run"),
                           "--sample-tokens", "10", *TINY_TRAIN)
    assert code == 0, err


def test_train_on_a_synthetic_task_prints_accuracy_and_no_sample(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--data", "synthetic:copy", "--out", str(tmp_path / "run"),
                           *TINY_TRAIN)
    assert code == 0
    assert "accuracy" in out
    assert "--- sample" not in out


def test_train_resume_continues_a_saved_run(capsys, tmp_path, text_file):
    out_dir = str(tmp_path / "run")
    args = ["train", "--data", text_file, "--out", out_dir, "--sample-tokens", "0", *TINY_TRAIN]
    assert run_cli(capsys, *args)[0] == 0
    code, _, _ = run_cli(capsys, *args, "--steps", "30", "--resume")
    assert code == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 30


def test_train_into_a_used_folder_fails_with_exit_code_2(capsys, tmp_path, text_file):
    args = ["train", "--data", text_file, "--out", str(tmp_path / "run"), "--sample-tokens", "0", *TINY_TRAIN]
    run_cli(capsys, *args)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert "already holds a checkpoint" in err


def test_sample_continues_the_prompt_from_a_checkpoint(capsys, tmp_path, text_file):
    out_dir = str(tmp_path / "run")
    run_cli(capsys, "train", "--data", text_file, "--out", out_dir, "--sample-tokens", "0", *TINY_TRAIN)
    code, out, _ = run_cli(capsys, "sample", "--out", out_dir, "--prompt", "the ", "--sample-tokens", "12",
                           "--seed", "3")
    assert code == 0
    text = out[:-1]  # print adds one newline
    assert text.startswith("the ") and len(text) == 4 + 12
    assert run_cli(capsys, "sample", "--out", out_dir, "--prompt", "the ", "--sample-tokens", "12",
                   "--seed", "3")[1] == out


def test_sample_refuses_a_prompt_that_is_not_utf8(capsys, tmp_path, text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    prompt = os.fsdecode(b"the \xff")  # how Python hands over argv bytes that are not UTF-8
    code, _, err = run_cli(capsys, "sample", "--out", out_dir, "--prompt", prompt, "--sample-tokens", "3")
    assert code == 2
    assert "--prompt is not UTF-8 text: byte 0xff at character 4 cannot be decoded" in err


def test_sample_names_the_prompt_characters_outside_the_vocabulary(capsys, tmp_path, text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    code, _, err = run_cli(capsys, "sample", "--out", out_dir, "--prompt", "the zoo?", "--sample-tokens", "3")
    assert code == 2
    assert "--prompt has characters outside the checkpoint's vocabulary of 25: '?', 'z';" in err


def test_sample_from_a_missing_checkpoint_fails_with_exit_code_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", "--out", str(tmp_path / "nothing"))
    assert code == 2
    assert "no checkpoint" in err


def test_train_with_a_bad_variant_fails_with_exit_code_2_and_says_why(capsys, tmp_path, text_file):
    code, out, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"),
                             "--variant", "abd", *TINY_TRAIN)
    assert code == 2
    assert out == ""
    assert err.startswith("minqkv train: error: variant 'abd' is not valid")
    assert not (tmp_path / "run").exists()


def test_train_with_an_impossible_grouped_variant_says_why(capsys, tmp_path, text_file):
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"),
                           "--variant", "aab", "--n-kv-head", "1", *TINY_TRAIN)
    assert code == 2
    assert "cannot share one weight" in err


@pytest.mark.parametrize("spec, message", [
    ("no-such-corpus", "neither a known corpus nor an existing file"),
    ("synthetic:juggle", "unknown synthetic task 'juggle'"),
])
def test_train_with_an_unknown_data_spec_fails_with_exit_code_2(capsys, tmp_path, spec, message):
    code, _, err = run_cli(capsys, "train", "--data", spec, "--out", str(tmp_path / "run"), *TINY_TRAIN)
    assert code == 2
    assert message in err


@pytest.mark.download
def test_train_on_shakespeare_by_default_corpus(capsys, tmp_path):
    """The one test that uses the Shakespeare corpus (downloaded once, then cached)."""
    code, out, _ = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--steps", "3",
                           "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                           "--batch-size", "4", "--eval-iters", "1", "--sample-tokens", "20", "--quiet")
    assert code == 0
    assert "val bpc" in out
    assert "--- sample (20 characters, temperature 0.8) ---\nROMEO:\n" in out


# ---- numbers every command refuses ---------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "steps must be a positive integer, got 0"),
    ("--steps", "-5", "steps must be a positive integer, got -5"),
    ("--batch-size", "0", "batch_size must be a positive integer"),
    ("--eval-interval", "0", "eval_interval must be a positive integer"),
    ("--lr", "0", "lr must be positive"),
    ("--min-lr", "-0.1", "min_lr <= lr"),
    ("--beta2", "1", r"beta2 must be in \[0, 1\)"),
    ("--dropout", "1.5", r"dropout must be in \[0, 1\)"),
    ("--prune-threshold", "2", r"prune_threshold must be in \[0, 1\]"),
    ("--n-head", "0", "positive multiple of n_head=0"),
    ("--seed", "-1", "seed must be >= 0"),
    ("--gate-lr", "inf", "gate_lr must be a finite number, got inf"),
    ("--gate-penalty", "nan", "gate_penalty must be a finite number, got nan"),
])
def test_train_refuses_a_bad_number_before_making_its_folder(capsys, tmp_path, text_file, flag, value, message):
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"),
                           *TINY_TRAIN, flag, value)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["sample", "--out", "x", "--sample-tokens", "-1"], "argument --sample-tokens/--tokens: must be an integer >= 0, got -1"),
    (["sample", "--out", "x", "--temperature", "0"], "argument --temperature: must be a finite number > 0"),
    (["sample", "--out", "x", "--temperature", "inf"], "argument --temperature: must be a finite number > 0, got inf"),
    (["sample", "--out", "x", "--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (["bench", "--threads", "1,2000"], "the most the kernels use"),
    (["sample", "--out", "x", "--top-k", "0"], "argument --top-k: must be a positive integer, got 0"),
    (["train", "--sample-tokens", "-3"], "argument --sample-tokens: must be an integer >= 0"),
    (["ablate", "--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
    (["ablate", "--jobs", "-2"], "argument --jobs: must be a positive integer, got -2"),
    (["analyze", "--out", "x", "--subspace-dim", "0"], "argument --subspace-dim: must be a positive integer"),
    (["variants", "--n-embd", "0"], "argument --n-embd: must be a positive integer, got 0"),
    (["variants", "--block-size", "-1"], "argument --block-size: must be a positive integer"),
])
def test_a_flag_outside_its_range_is_a_usage_error_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_variants_n_embd_sets_the_model_width(capsys):
    code, out, _ = run_cli(capsys, "variants", "--json", "--n-embd", "64")
    assert code == 0
    assert {r["code"]: r for r in json.loads(out)}["abc"]["params_per_layer"] == 4 * 64 * 64


def test_train_switches_reach_the_saved_model_config(capsys, tmp_path, text_file):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir), *TINY_TRAIN,
                           "--sample-tokens", "0", "--rotate", "--no-out-proj", "--no-tie", "--dtype", "float64")
    assert code == 0, err
    config = load_checkpoint(out_dir)[0]["model_config"]
    assert (config["rotate"], config["out_proj"], config["tie_weights"], config["dtype"]) == (
        True, False, False, "float64")


def test_train_variant_takes_a_label_with_modifiers(capsys, tmp_path, text_file):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir), *TINY_TRAIN,
                             "--sample-tokens", "0", "--variant", "shared-kv+rotate+mqa")
    assert code == 0, err
    config = load_checkpoint(out_dir)[0]["model_config"]
    assert (config["code"], config["rotate"], config["n_kv_head"]) == ("abb", True, 1)
    assert out.startswith("abb+rotate+mqa:")


def test_train_variant_label_that_contradicts_a_flag_is_refused(capsys, tmp_path, text_file):
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(tmp_path / "run"), *TINY_TRAIN,
                           "--variant", "abc+gqa2", "--n-kv-head", "1")
    assert code == 2
    assert "--variant abc+gqa2 disagrees with the flags n_kv_head=1" in err
    assert not (tmp_path / "run").exists()


# ---- resume ------------------------------------------------------------------------------------


def trained(capsys, tmp_path, text_file, *extra):
    out_dir = str(tmp_path / "run")
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", out_dir, "--sample-tokens", "0",
                           *TINY_TRAIN, *extra)
    assert code == 0, err
    return out_dir


def test_train_resume_with_changed_flags_fails_and_lists_them(capsys, tmp_path, text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out_dir, "--steps", "30", "--quiet",
                           "--variant", "abb", "--n-layer", "3", "--lr", "0.5", "--data", text_file + ".other")
    assert code == 2
    for difference in ("code 'abb' (saved run: 'abc')", "n_layer 3 (saved run: 1)",
                       "lr 0.5 (saved run: 0.01)", "data '" + text_file + ".other'"):
        assert difference in err
    assert load_checkpoint(out_dir)[0]["step"] == 20


def test_train_resume_with_flags_equal_to_the_saved_run_continues(capsys, tmp_path, text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out_dir, "--sample-tokens", "0",
                           "--data", text_file, "--variant", "canonical", *TINY_TRAIN, "--steps", "30")
    assert code == 0, err
    assert load_checkpoint(out_dir)[0]["step"] == 30


def test_train_resume_on_data_rewritten_with_other_characters_fails(capsys, tmp_path, text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    text = Path(text_file).read_text()
    Path(text_file).write_text(text.replace("g", "z"))
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out_dir, "--steps", "30", "--quiet")
    assert code == 2
    assert "another vocabulary" in err


def test_train_resume_of_a_finished_run_without_its_final_json_says_no_speed_was_measured(capsys, tmp_path,
                                                                                         text_file):
    out_dir = trained(capsys, tmp_path, text_file)
    (Path(out_dir) / "final.json").unlink()
    code, out, err = run_cli(capsys, "train", "--resume", "--out", out_dir, "--sample-tokens", "0", "--quiet")
    assert code == 0, err
    assert "speed not measured" in out


# ---- the run folder and the file system --------------------------------------------------------


def test_train_into_the_folder_of_a_live_run_fails_with_exit_code_2_naming_its_pid(capsys, tmp_path, text_file):
    out_dir = tmp_path / "run"
    with folder_lock(out_dir, "run folder"):  # stands for a live run
        code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(out_dir), *TINY_TRAIN)
    assert code == 2
    assert err == f"minqkv train: error: run folder {out_dir} is in use by another minqkv process " \
                  f"(pid {os.getpid()}); wait for it to finish or choose another --out\n"


def test_train_out_naming_a_file_fails_with_exit_code_2(capsys, tmp_path, text_file):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = run_cli(capsys, "train", "--data", text_file, "--out", str(notes), *TINY_TRAIN)
    assert code == 2
    assert err == f"minqkv train: error: --out {notes} is a file, not a folder: choose a folder for the run\n"


def test_a_full_disk_is_one_line_naming_the_file_with_exit_code_2_and_the_checkpoint_kept(capsys, tmp_path,
                                                                                          text_file, monkeypatch):
    out_dir = trained(capsys, tmp_path, text_file)
    before = load_checkpoint(out_dir)

    def disk_full(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write raises it: no file named

    monkeypatch.setattr(atomic_module.os, "replace", disk_full)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out_dir, "--steps", "30", "--quiet")
    monkeypatch.undo()
    assert code == 2
    assert err.startswith(f"minqkv train: error: {Path(out_dir) / 'metrics.jsonl'}: No space left on device")
    assert len(err.strip().splitlines()) == 1
    after = load_checkpoint(out_dir)
    assert after[0]["step"] == before[0]["step"] == 20


# ---- damaged checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "analyze", "train"])
@pytest.mark.parametrize("damaged", [b"", bytes(range(256)) * 8], ids=["empty", "random-bytes"])
def test_a_damaged_checkpoint_is_a_one_line_error_with_exit_code_2(capsys, tmp_path, text_file, command, damaged):
    """Every way of damaging a file is covered in test_checkpoint.py; here: each command reports it."""
    out_dir = trained(capsys, tmp_path, text_file)
    path = Path(out_dir) / "ckpt.npz"
    path.write_bytes(damaged)
    argv = ["train", "--resume", "--out", out_dir] if command == "train" else [command, "--out", out_dir]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith(f"minqkv {command}: error: checkpoint {path} is damaged or not a minqkv checkpoint (")
    assert len(err.strip().splitlines()) == 1


def test_bench_threads_must_be_a_comma_separated_list_of_counts(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--step", "--threads", "1,zero"])
    assert "--threads '1,zero'" in capsys.readouterr().err


def test_bench_threads_above_what_the_kernels_use_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--threads", "2000"])
    assert info.value.code == 2
    assert "--threads '2000': give thread counts from 1 to 1024" in capsys.readouterr().err


def test_bench_times_the_kernel_table_at_each_thread_count_given(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_matmul_cases", lambda: [("tiny", (8, 8), (8, 8), "float32", False, False)])
    monkeypatch.setattr(bench, "_softmax_rows", lambda rng, timing: [])
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: None)
    code, out, _ = run_cli(capsys, "bench", "--threads", "1,2", "--json")
    assert code == 0
    assert [row["threads"] for row in json.loads(out)] == [1, 2]


# ---- help --------------------------------------------------------------------------------------


def test_every_flag_of_every_subcommand_has_help_text():
    from minqkv.lab.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.option_strings[0]}" for name, parser in subcommands.choices.items()
               for action in parser._actions if action.option_strings and not action.help]
    assert missing == []


def test_help_shows_the_default_of_a_flag_that_has_one(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "seed of the sampling (default: 0)" in text and "(default: 0.8)" in text


def test_variants_modifiers_alone_lists_every_modifier_of_the_table(capsys):
    from minqkv.modifiers import MODIFIERS

    code, out, _ = run_cli(capsys, "variants", "--modifiers")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [row.written() for row in MODIFIERS]


def test_train_has_a_flag_for_every_field_a_modifier_sets():
    from minqkv.lab.cli import RUN_FLAGS
    from minqkv.modifiers import MODIFIERS

    assert {row.field for row in MODIFIERS} <= {field for _, field, _, _ in RUN_FLAGS}
