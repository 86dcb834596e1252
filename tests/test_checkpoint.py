"""Specification of checkpoint files: what a save writes, what a load accepts, and that a file
that is not a whole minqkv checkpoint is reported as such (and never unpickled)."""

import errno
import io
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

import minqkv.atomic as atomic_module
import minqkv.checkpoint as checkpoint_module
from minqkv.atomic import json_text, write_atomically
from minqkv.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minqkv.data import CharTokenizer, IdTokenizer
from minqkv.model import GPT, GPTConfig, parameter_count
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


def test_a_checkpoint_of_token_ids_loads_with_its_id_tokenizer(tmp_path):
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=8, block_size=4))
    meta = {"model_config": model.config.to_dict(), "train_config": {}, "step": 1,
            "tokenizer": IdTokenizer(64).to_dict()}  # what a synthetic:mqar run saves
    save_checkpoint(tmp_path / "run", model, None, meta)
    loaded, tokenizer, _ = load_model(tmp_path / "run")
    assert tokenizer == IdTokenizer(64) and loaded.config.vocab_size == 64
    assert np.array_equal(loaded.token_embedding.weight.data, model.token_embedding.weight.data)


def test_write_atomically_replaces_the_whole_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old and longer")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_a_write_into_a_read_only_folder_names_the_file_and_leaves_it_alone(tmp_path, monkeypatch):
    path = tmp_path / "file.txt"
    path.write_text("old")

    def read_only(dir, prefix, suffix):  # what mkstemp raises there (root ignores chmod, so it is faked)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix + "x1y2" + suffix))

    monkeypatch.setattr(atomic_module.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match=f"Read-only file system: '{path}'") as info:
        write_atomically(path, "new")
    assert info.value.errno == errno.EROFS
    assert path.read_text() == "old"


def test_json_text_writes_numbers_that_are_not_finite_as_null():
    record = {"loss": float("nan"), "rates": [float("inf"), -float("inf"), 0.5], "step": 3}
    assert json_text(record) == '{"loss": null, "rates": [null, null, 0.5], "step": 3}'


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
    with pytest.raises(CheckpointError, match="it holds no 'meta'"):
        load_checkpoint(tmp_path)


def test_meta_without_the_run_configuration_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "ckpt.npz", meta=np.array(json.dumps({"step": 1})))
    with pytest.raises(CheckpointError, match="lacks model_config, train_config, tokenizer"):
        load_checkpoint(tmp_path)


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


# ---- crafted files: refused before they can make a load unpack or allocate much --------------------


def members_of(folder) -> dict:
    """{member name: bytes} of a checkpoint (each member is a whole .npy file)."""
    with zipfile.ZipFile(folder / "ckpt.npz") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_members(folder, members: dict) -> None:
    with zipfile.ZipFile(folder / "ckpt.npz", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def with_model_config(folder, meta, **changes):
    """Rewrite the checkpoint's meta with model_config fields changed; the arrays stay."""
    members = members_of(folder)
    meta = {**meta, "model_config": {**meta["model_config"], **changes}}
    write_members(folder, {**members, "meta.npy": npy(np.array(json.dumps(meta)))})


def peak_bytes_of(call) -> int:
    """The most memory Python and NumPy held at once during call() (tracemalloc)."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_small_file_declaring_a_huge_width_is_refused_before_a_model_is_built(saved):
    folder, _, meta = saved
    with_model_config(folder, meta, n_embd=2 ** 20)  # 10^12 floats per weight matrix

    def load():
        with pytest.raises(CheckpointError, match="describes a model of .* parameters, but its arrays hold"):
            load_model(folder)

    assert peak_bytes_of(load) < 10 * 2 ** 20


def test_a_config_with_more_layers_than_the_file_holds_is_refused(saved):
    folder, _, meta = saved
    with_model_config(folder, meta, n_layer=10 ** 9)
    with pytest.raises(CheckpointError, match="n_layer=1000000000, but the number of layers it holds weights for is 1"):
        load_checkpoint(folder)


def test_a_member_that_unpacks_to_more_than_the_whole_file_is_refused_unread(saved):
    folder = saved[0]
    with zipfile.ZipFile(folder / "ckpt.npz", "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("model/zeros.npy", "w") as f:  # 64 MiB of zeros, deflated to about 64 KiB
            f.write(npy(np.zeros(0, np.float32)))  # a header of an empty array, then the zeros
            for _ in range(64):
                f.write(bytes(2 ** 20))

    def load():
        with pytest.raises(CheckpointError, match="'model/zeros.npy' unpacks to .* bytes, more than the whole file"):
            load_checkpoint(folder)

    assert peak_bytes_of(load) < 8 * 2 ** 20


def test_a_member_with_an_unexpected_name_is_refused(saved):
    folder = saved[0]
    write_members(folder, {**members_of(folder), "junk.npy": npy(np.zeros(3))})
    with pytest.raises(CheckpointError, match="unexpected members \\['junk.npy'\\]"):
        load_checkpoint(folder)


def test_an_array_header_declaring_more_than_its_bytes_is_refused_before_allocating(saved):
    folder = saved[0]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 9,)})
    members = members_of(folder)
    write_members(folder, {**members, "model/token_embedding.weight.npy": header.getvalue() + bytes(40)})

    def load():
        declared = r"declares float32\[1000000000\] \(4,000,000,000 bytes\) but holds 40 bytes"
        with pytest.raises(CheckpointError, match=declared):
            load_checkpoint(folder)

    assert peak_bytes_of(load) < 8 * 2 ** 20


def test_a_meta_larger_than_any_checkpoint_needs_is_refused(saved, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_META_BYTES", 100)
    with pytest.raises(CheckpointError, match="its meta is .* bytes, more than the 100"):
        load_checkpoint(saved[0])


def test_the_parameter_count_of_a_config_is_that_of_its_model():
    config = GPTConfig(vocab_size=7, n_layer=2, n_head=2, n_embd=8, block_size=4, layer_codes=["abc", "-ab"],
                       rotate=True, pos2d=True, out_gate=True, tie_weights=False)
    assert parameter_count(config) == GPT(config).num_parameters()
