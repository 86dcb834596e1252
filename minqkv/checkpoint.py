"""Checkpoints: everything needed to continue a run exactly, in one .npz file written atomically.

The file holds arrays under 'model/<name>', 'optim/<name>/m' and 'optim/<name>/v', and one
JSON document under 'meta' (configs, tokenizer, step, RNG states, optimiser scalars). It is
written with write_atomically, so an interrupted save never leaves a broken checkpoint: the
old one stays until the new one is whole. Loading reads arrays and JSON only, never pickles,
so a checkpoint cannot run code; a file that is not a whole checkpoint raises CheckpointError.
Nor can a small crafted file make a load unpack or allocate much: names, sizes, meta and every
array's declared shape are checked against each other before any array is read or model built.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from .atomic import whole_write, write_atomically

CHECKPOINT_NAME = "ckpt.npz"
META_KEYS = ("model_config", "train_config", "tokenizer", "step")  # what every checkpoint records


class CheckpointError(ValueError):
    """The file exists but is not a whole minqkv checkpoint (truncated, damaged, or something else)."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path} is damaged or not a minqkv checkpoint ({reason})")


def checkpoint_path(out_dir) -> Path:
    path = Path(out_dir)
    return path / CHECKPOINT_NAME if path.suffix != ".npz" else path


def save_checkpoint(out_dir, model, optimizer, meta: dict) -> Path:
    """Write model weights, optimiser state and meta (JSON-serialisable) to out_dir/ckpt.npz.

    A stop signal during the save is held until the file is whole (see atomic.whole_write)."""
    with whole_write():
        return _save(out_dir, model, optimizer, meta)


def _save(out_dir, model, optimizer, meta: dict) -> Path:
    arrays = {f"model/{name}": p.data for name, p in model.named_parameters()}
    optim_state = optimizer.state_dict() if optimizer is not None else None
    if optim_state is not None:
        for name, state in optim_state["params"].items():
            arrays[f"optim/{name}/m"] = state["m"]
            arrays[f"optim/{name}/v"] = state["v"]
        meta = {**meta, "optimizer": {k: v for k, v in optim_state.items() if k != "params"},
                "optimizer_steps": {n: s["step"] for n, s in optim_state["params"].items()}}
    arrays["meta"] = np.array(json.dumps(meta))
    path = checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())
    return path


def load_checkpoint(path) -> tuple:
    """-> (meta dict, model arrays {name: array}, optimiser state dict or None).

    Checks come before the work they guard, so that a small crafted file cannot make the load
    unpack or allocate much: the member names, then each member's declared size, then meta, then
    every array's declared shape (its .npy header) against meta's model_config; only then are the
    arrays read.
    """
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (train with --out DIR first)")
    try:
        meta, files = _read_checked(path)
        optim_state = None
        if "optimizer" in meta:
            optim_state = {**meta["optimizer"], "params": {
                name: {"step": step, "m": files[f"optim/{name}/m"], "v": files[f"optim/{name}/v"]}
                for name, step in meta["optimizer_steps"].items()}}
    except Exception as e:  # zipfile and numpy fail in many ways on damaged bytes: all mean damage
        raise CheckpointError(path, _reason(e)) from None
    model_state = {k[len("model/"):]: v for k, v in files.items() if k.startswith("model/")}
    return meta, model_state, optim_state


ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every .npz (a zip archive)
MEMBER_NAME = re.compile(r"meta|model/[\w.]+|optim/[\w.]+/[mv]")  # + '.npy', as np.savez names them
# meta is JSON stored as one string of 4-byte characters: configs, RNG states and the vocabulary,
# which even with every Unicode character (each escaped as 6 or 12 ASCII characters) stays below this.
MAX_META_BYTES = 64 << 20


class _Refused(Exception):
    """A check of this module found the file unfit; the message is the reason."""


def _read_checked(path: Path) -> tuple:
    """-> (meta, {member name: array}), each check done before what it guards."""
    with open(path, "rb") as f:
        start = f.read(len(ZIP_MAGIC))
    if start != ZIP_MAGIC:  # checked first, so no reader ever guesses at other formats
        raise _Refused("the file is empty" if not start else "it is not an .npz archive")
    with zipfile.ZipFile(path) as archive:
        members = _members(archive, path.stat().st_size)
        meta = _read_meta(archive, members.pop("meta"))
        declared = {name: _declared_shape(archive, info) for name, info in members.items()}
        _check_shapes(meta, declared)
        # allow_pickle=False: only plain arrays load; a pickled object is refused, never run
        return meta, {name: _read_member(archive, info) for name, info in members.items()}


def _members(archive: zipfile.ZipFile, file_bytes: int) -> dict:
    """{name without .npy: ZipInfo}, refusing unknown names and sizes no checkpoint has."""
    infos = archive.infolist()
    names = [info.filename.removesuffix(".npy") for info in infos]
    if "meta" not in names:
        raise _Refused("it holds no 'meta', the run's configs and step")
    unexpected = [info.filename for info, name in zip(infos, names) if not MEMBER_NAME.fullmatch(name)]
    if unexpected or len(set(names)) != len(names):
        raise _Refused(f"unexpected members {unexpected[:5] or 'repeated names'}: a checkpoint holds "
                       "'meta', 'model/NAME', 'optim/NAME/m' and 'optim/NAME/v' once each")
    for info in infos:
        # save_checkpoint stores members uncompressed, so none unpacks to more than the whole file
        if info.file_size > file_bytes:
            raise _Refused(f"member {info.filename!r} unpacks to {info.file_size:,} bytes, more than "
                           f"the whole file ({file_bytes:,} bytes)")
    return dict(zip(names, infos))


def _read_meta(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict:
    if info.file_size > MAX_META_BYTES:
        raise _Refused(f"its meta is {info.file_size:,} bytes, more than the {MAX_META_BYTES:,} any "
                       "checkpoint's meta needs")
    shape, dtype = _declared_shape(archive, info)
    if shape != () or dtype.kind != "U":
        raise _Refused(f"its meta is a {dtype} array of shape {shape}, not one string")
    meta = json.loads(str(_read_member(archive, info)))
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise _Refused(f"its meta lacks {', '.join(missing)}")
    return meta


def _declared_shape(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple:
    """(shape, dtype) from a member's .npy header alone, checked against the member's size."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise _Refused(f"member {info.filename!r} is .npy format {version}, which np.savez never writes")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        header_bytes = f.tell()
    if dtype.hasobject:
        raise _Refused(f"member {info.filename!r} holds Python objects, which only unpickling could "
                       "load (allow_pickle is off: a checkpoint holds numbers)")
    data_bytes = math.prod(shape) * dtype.itemsize
    if header_bytes + data_bytes != info.file_size:
        raise _Refused(f"member {info.filename!r} declares {dtype}{list(shape)} ({data_bytes:,} bytes) "
                       f"but holds {info.file_size - header_bytes:,} bytes")
    return shape, dtype


def _check_shapes(meta: dict, declared: dict) -> None:
    """The arrays ({name: (shape, dtype)}) must be the model that meta's model_config describes.

    GPT(config) allocates what the config says, so a small file with a huge n_embd is refused
    here, before any model is built (each weight's own shape is checked when it is loaded).
    """
    from .model import GPTConfig, parameter_count

    config = meta["model_config"]
    weights = {name[len("model/"):]: d for name, d in declared.items() if name.startswith("model/")}
    layers = {name.split(".")[1] for name in weights if name.startswith("blocks.")}
    n_layer = config.get("n_layer") if isinstance(config, dict) else None
    if n_layer != len(layers):  # checked first: the config's own checks take a moment per layer
        raise _Refused(f"its model_config says n_layer={n_layer!r}, but the number of layers it "
                       f"holds weights for is {len(layers)}")
    expected = parameter_count(GPTConfig.from_dict(config))
    held = sum(math.prod(shape) for shape, _ in weights.values())
    if held != expected:
        raise _Refused(f"its model_config describes a model of {expected:,} parameters, but its "
                       f"arrays hold {held:,}")
    for name, (shape, dtype) in declared.items():
        weight = name[len("optim/"):-len("/m")] if name.startswith("optim/") else None
        if weight is not None and weights.get(weight) != (shape, dtype):
            raise _Refused(f"optimiser state {name!r} is {dtype}{list(shape)}, but the weight "
                           f"model/{weight} is not")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
        if f.read(1):  # also reads to the end, where zipfile compares the checksum
            raise _Refused(f"member {info.filename!r} has bytes after its array")
    return array


def _reason(error: Exception) -> str:
    if isinstance(error, _Refused):
        return str(error)
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(path):
    """Rebuild a trained GPT and its tokenizer from a checkpoint (for sampling and analysis)."""
    from .data import tokenizer_from_dict
    from .model import GPT, GPTConfig

    meta, model_state, _ = load_checkpoint(path)
    try:
        model = GPT(GPTConfig.from_dict(meta["model_config"]))
        model.load_state_dict(model_state)
        tokenizer = tokenizer_from_dict(meta["tokenizer"])  # characters, or token ids (synthetic:mqar)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(checkpoint_path(path), _reason(e)) from None
    return model, tokenizer, meta
