"""Specification of checkpoint files: what a save writes, what a load accepts, and that a file
that is not a whole minqkv checkpoint is reported as such (and never unpickled)."""

import io
import json

import numpy as np
import pytest

from minqkv.atomic import write_atomically
from minqkv.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minqkv.data import CharTokenizer
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW

DAMAGED = "is damaged or not a minqkv checkpoint"


@pytest.fixture
def saved(tmp_path):
    """A tiny model and optimiser saved to tmp_path/run/ckpt.npz; -> (folder, model, meta)."""
    model = GPT(GPTConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=8, block_size=4))
    meta = {"model_config": model.config.to_dict(), "train_config": {}, "step": 3,
            "tokenizer": CharTokenizer("abcde").to_dict()}
    save_checkpoint(tmp_path / "run", model, AdamW(model.named_parameters()), meta)
    return tmp_path / "run", model, meta


def damage(folder, data: bytes):
    (folder / "ckpt.npz").write_bytes(data)


# ---- saving and loading -------------------------------------------------------------------------


def test_a_saved_checkpoint_loads_the_same_weights_and_meta(saved):
    folder, model, meta = saved
    loaded, tokenizer, loaded_meta = load_model(folder)
    assert loaded_meta["step"] == meta["step"] and tokenizer == CharTokenizer("abcde")
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert np.array_equal(p.data, q.data), name


def test_write_atomically_replaces_the_whole_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old and longer")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


# ---- damaged files ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped-byte", "random-bytes"])
def test_a_damaged_checkpoint_raises_checkpoint_error_naming_the_file(saved, how):
    folder = saved[0]
    good = (folder / "ckpt.npz").read_bytes()
    middle = len(good) // 2
    damage(folder, {"truncated": good[:middle],
                    "empty": b"",
                    "flipped-byte": good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:],
                    "random-bytes": np.random.default_rng(0).bytes(len(good))}[how])
    with pytest.raises(CheckpointError, match=f"checkpoint {folder / 'ckpt.npz'} {DAMAGED}"):
        load_checkpoint(folder)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_random_bytes_do_not_suggest_loading_pickles(saved):
    folder = saved[0]
    damage(folder, np.random.default_rng(1).bytes(5000))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert "pickle" not in str(info.value) and "not an .npz archive" in str(info.value)


def test_every_flipped_bit_either_changes_nothing_or_is_reported(saved):
    """A zip checks names and CRCs: no single flipped bit may load as different numbers."""
    folder = saved[0]
    good = (folder / "ckpt.npz").read_bytes()
    want_meta, want_arrays, _ = load_checkpoint(folder)
    rng = np.random.default_rng(0)
    first_header = range(100)  # the first zip entry and its .npy header
    directory = rng.integers(len(good) - 2000, len(good), size=300)  # the zip's table of contents
    anywhere = rng.integers(0, len(good), size=200)
    for position in [*first_header, *directory, *anywhere]:
        data = bytearray(good)
        data[position] ^= 1 << int(rng.integers(8))
        damage(folder, bytes(data))
        try:
            meta, arrays, _ = load_checkpoint(folder)
        except CheckpointError:
            continue
        assert meta == want_meta and arrays.keys() == want_arrays.keys(), position
        assert all(np.array_equal(arrays[k], want_arrays[k]) for k in arrays), position


class LeavesATrace:
    """Unpickling this object would create a file: proof that a load unpickled something."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_unpickles_an_object_array(saved, tmp_path):
    folder = saved[0]
    trace = tmp_path / "unpickled"
    with np.load(folder / "ckpt.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["model/trap"] = np.array([LeavesATrace(str(trace))], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    damage(folder, buffer.getvalue())
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_checkpoint(folder)
    assert not trace.exists()


def test_an_npz_without_meta_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "ckpt.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="KeyError: meta"):
        load_checkpoint(tmp_path)


def test_meta_without_the_run_configuration_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "ckpt.npz", meta=np.array(json.dumps({"step": 1})))
    with pytest.raises(CheckpointError, match="lacks model_config, train_config, tokenizer"):
        load_checkpoint(tmp_path)


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
