import builtins
import io
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minqkv import data
from minqkv.data import CharTokenizer, load_corpus

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---- tokenizer ---------------------------------------------------------------------------


def test_vocabulary_is_the_sorted_unique_characters():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.chars == " dehlorw"
    assert tokenizer.vocab_size == 8


def test_encode_gives_int64_ids_in_vocabulary_order():
    ids = CharTokenizer.from_text("cab").encode("abcab")
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 1, 2, 0, 1]


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_decode_inverts_encode_for_any_text(text):
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_of_the_empty_string_is_empty():
    assert CharTokenizer.from_text("ab").encode("").shape == (0,)
    assert CharTokenizer.from_text("ab").decode([]) == ""


def test_encode_names_the_unknown_characters():
    with pytest.raises(ValueError, match="'z'.*'€'|'€'.*'z'"):
        CharTokenizer.from_text("abc").encode("abz€")


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        CharTokenizer.from_text("abc").decode([0, 3])


def test_tokenizer_survives_a_json_round_trip():
    tokenizer = CharTokenizer.from_text("To be, or not to be?\n")
    restored = CharTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored == tokenizer
    assert restored.encode("be?").tolist() == tokenizer.encode("be?").tolist()


def test_tokenizer_needs_text():
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="from_dict"):
        CharTokenizer.from_dict({"chars": 3})


# ---- text files --------------------------------------------------------------------------


def test_text_file_splits_first_ninety_percent_for_training(text_file):
    corpus = load_corpus(str(text_file))
    assert corpus.metric == "bpc"
    assert len(corpus.train_ids) + len(corpus.val_ids) == len(TEXT)
    assert len(corpus.val_ids) == len(TEXT) // 10
    assert corpus.tokenizer.decode(corpus.val_ids) == TEXT[-len(TEXT) // 10 :]


def test_text_batch_targets_are_inputs_shifted_by_one(text_file):
    corpus = load_corpus(str(text_file))
    x, y = corpus.batch("train", 4, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == np.int64
    text = corpus.tokenizer.decode(corpus.train_ids)
    for row_x, row_y in zip(x, y):
        window = corpus.tokenizer.decode(row_x) + corpus.tokenizer.decode(row_y[-1:])
        assert window in text
        assert (row_x[1:] == row_y[:-1]).all()


def test_text_batches_are_deterministic_given_the_rng(text_file):
    corpus = load_corpus(str(text_file))
    first = corpus.batch("val", 3, 16, np.random.default_rng(7))
    second = corpus.batch("val", 3, 16, np.random.default_rng(7))
    assert all((a == b).all() for a, b in zip(first, second))


def test_eval_batches_are_the_same_every_call(text_file):
    corpus = load_corpus(str(text_file))
    once = corpus.eval_batches("val", 2, 16, n_batches=3, seed=1)
    again = corpus.eval_batches("val", 2, 16, n_batches=3, seed=1)
    assert len(once) == 3
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(once, again))


def test_block_size_too_large_for_validation_says_the_maximum(text_file):
    corpus = load_corpus(str(text_file))
    limit = len(corpus.val_ids) - 1
    corpus.batch("val", 1, limit, np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"at most {limit}"):
        corpus.batch("val", 1, limit + 1, np.random.default_rng(0))


def test_a_block_of_256_fits_a_file_of_the_minimum_length(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("ab" * (data.MIN_TEXT_CHARS // 2), encoding="utf-8")
    corpus = load_corpus(str(path))
    x, _ = corpus.batch("val", 2, 256, np.random.default_rng(0))
    assert x.shape == (2, 256)


def test_batch_rejects_unknown_split_and_bad_arguments(text_file):
    corpus = load_corpus(str(text_file))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        corpus.batch("test", 2, 8, rng)
    with pytest.raises(ValueError, match="batch_size"):
        corpus.batch("train", 0, 8, rng)
    with pytest.raises(TypeError, match="np.random.Generator"):
        corpus.batch("train", 2, 8, 0)


def test_missing_file_names_the_path_and_the_valid_specs(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt.*shakespeare.*synthetic:TASK.*recall"):
        load_corpus(str(missing))


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_corpus(str(tmp_path))


def test_a_device_is_not_a_text_file():
    with pytest.raises(ValueError, match="'/dev/null' is not a regular file"):
        load_corpus("/dev/null")


def test_a_fifo_is_refused_without_being_opened(tmp_path, monkeypatch):
    """Opening a FIFO for reading waits for a writer: it must be refused from its stat alone."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    real_open = io.open

    def open_anything_but_the_fifo(file, *args, **kwargs):
        assert os.fspath(file) != str(fifo), "the FIFO was opened"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_anything_but_the_fifo)
    monkeypatch.setattr(builtins, "open", open_anything_but_the_fifo)
    with pytest.raises(ValueError, match="pipe' is not a regular file"):
        load_corpus(str(fifo))


def test_a_file_larger_than_the_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 3000)
    path = tmp_path / "big.txt"
    path.write_text("ab" * 1501, encoding="utf-8")
    with pytest.raises(ValueError, match="big.txt' is larger than 3,000 bytes"):
        load_corpus(str(path))


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        load_corpus(str(path))


def test_non_utf8_file_says_which_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"a" * 3000 + b"\xff" + b"b" * 10)
    with pytest.raises(ValueError, match="latin1.txt.*not UTF-8.*0xff.*offset 3000"):
        load_corpus(str(path))


def test_a_text_of_one_repeated_character_is_refused(tmp_path):
    path = tmp_path / "same.txt"
    path.write_text("a" * data.MIN_TEXT_CHARS, encoding="utf-8")
    with pytest.raises(ValueError, match="single distinct character .*at least 2 different"):
        load_corpus(str(path))


def test_too_short_file_states_the_minimum(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=f"tiny.txt.*5 characters.*at least {data.MIN_TEXT_CHARS}"):
        load_corpus(str(path))


# ---- synthetic tasks ---------------------------------------------------------------------


def _answer(corpus, x_row, y_row):
    """The scored characters of one row, as a string."""
    return corpus.tokenizer.decode(y_row[y_row != data.IGNORE])


def _prompt(corpus, x_row):
    text = corpus.tokenizer.decode(x_row)
    return text.split(data.SEPARATOR)[0]


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "recall"])
def test_task_batches_have_the_block_shape_and_only_answers_scored(task):
    corpus = load_corpus(f"synthetic:{task}")
    assert corpus.metric == "accuracy"
    x, y = corpus.batch("train", 5, 24, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 24)
    assert x.dtype == y.dtype == np.int64
    separator = corpus.tokenizer.encode(data.SEPARATOR)[0]
    for row_x, row_y in zip(x, y):
        first_scored = np.flatnonzero(row_y != data.IGNORE)[0]
        assert np.flatnonzero(row_x == separator)[0] <= first_scored
        scored = row_y != data.IGNORE
        assert (row_y[scored][:-1] == row_x[1:][scored[:-1]]).all()


def test_copy_answer_repeats_the_prompt():
    corpus = load_corpus("synthetic:copy")
    x, y = corpus.batch("train", 3, 20, np.random.default_rng(1))
    for row_x, row_y in zip(x, y):
        assert _answer(corpus, row_x, row_y) == _prompt(corpus, row_x)
        assert len(_prompt(corpus, row_x)) == 10


def test_reverse_answer_is_the_prompt_backwards():
    corpus = load_corpus("synthetic:reverse")
    x, y = corpus.batch("train", 3, 20, np.random.default_rng(1))
    for row_x, row_y in zip(x, y):
        assert _answer(corpus, row_x, row_y) == _prompt(corpus, row_x)[::-1]


def test_sort_answer_is_the_prompt_in_order():
    corpus = load_corpus("synthetic:sort")
    x, y = corpus.batch("train", 3, 20, np.random.default_rng(1))
    for row_x, row_y in zip(x, y):
        assert _answer(corpus, row_x, row_y) == "".join(sorted(_prompt(corpus, row_x)))


def test_recall_scores_the_value_of_every_queried_key():
    corpus = load_corpus("synthetic:recall")
    x, y = corpus.batch("train", 3, 32, np.random.default_rng(1))
    for row_x, row_y in zip(x, y):
        pairs = _prompt(corpus, row_x)
        value_of = dict(zip(pairs[0::2], pairs[1::2]))
        assert len(value_of) == len(pairs) // 2 == 8  # distinct keys
        scored = np.flatnonzero(row_y != data.IGNORE)
        queried = [corpus.tokenizer.decode(row_x[t : t + 1]) for t in scored]
        assert sorted(queried) == sorted(value_of)
        assert _answer(corpus, row_x, row_y) == "".join(value_of[k] for k in queried)


def test_task_examples_read_as_prompt_separator_answer():
    corpus = load_corpus("synthetic:reverse")
    example = corpus.example(np.random.default_rng(0), 8)
    prompt, answer = example.split(data.SEPARATOR)
    assert len(example) == 9
    assert answer == prompt[::-1]


def test_training_examples_are_fresh_each_batch():
    corpus = load_corpus("synthetic:copy")
    rng = np.random.default_rng(0)
    first, _ = corpus.batch("train", 4, 32, rng)
    second, _ = corpus.batch("train", 4, 32, rng)
    assert not (first == second).all()


def test_validation_set_is_fixed_by_the_seed():
    x_a, y_a = load_corpus("synthetic:sort", seed=3).validation_set(16)
    x_b, y_b = load_corpus("synthetic:sort", seed=3).validation_set(16)
    x_c, _ = load_corpus("synthetic:sort", seed=4).validation_set(16)
    assert (x_a == x_b).all() and (y_a == y_b).all()
    assert not (x_a == x_c).all()


def test_task_eval_batches_walk_the_validation_set_in_order():
    corpus = load_corpus("synthetic:recall")
    batches = corpus.eval_batches("val", 4, 16, n_batches=3)
    x, y = corpus.validation_set(16, 12)
    assert (np.concatenate([b[0] for b in batches]) == x).all()
    assert (np.concatenate([b[1] for b in batches]) == y).all()


def test_block_too_small_for_a_task_states_the_minimum():
    corpus = load_corpus("synthetic:copy")
    with pytest.raises(ValueError, match=f"at least {data.MIN_TASK_BLOCK}"):
        corpus.batch("train", 2, data.MIN_TASK_BLOCK - 1, np.random.default_rng(0))


def test_unknown_task_lists_the_valid_ones():
    valid = "synthetic:copy, synthetic:reverse, synthetic:sort, synthetic:recall"
    with pytest.raises(ValueError, match=valid):
        load_corpus("synthetic:parity")
