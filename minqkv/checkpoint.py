"""Checkpoints: everything needed to continue a run exactly, in one .npz file written atomically.

The file holds arrays under 'model/<name>', 'optim/<name>/m' and 'optim/<name>/v', and one
JSON document under 'meta' (configs, tokenizer, step, RNG states, optimiser scalars). It is
written with write_atomically, so an interrupted save never leaves a broken checkpoint: the
old one stays until the new one is whole. Loading reads arrays and JSON only, never pickles,
so a checkpoint cannot run code; a file that is not a whole checkpoint raises CheckpointError.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .atomic import write_atomically

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
    """Write model weights, optimiser state and meta (JSON-serialisable) to out_dir/ckpt.npz."""
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
    """-> (meta dict, model arrays {name: array}, optimiser state dict or None)."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (train with --out DIR first)")
    try:
        files = _read_arrays(path)
        meta = json.loads(str(files.pop("meta")))
        missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise KeyError(f"its meta lacks {', '.join(missing)}")
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


def _read_arrays(path: Path) -> dict:
    with open(path, "rb") as f:
        start = f.read(len(ZIP_MAGIC))
    if start != ZIP_MAGIC:  # checked first, so np.load never guesses at other formats
        raise ValueError("the file is empty" if not start else "it is not an .npz archive")
    # allow_pickle=False: only plain arrays load; a pickled object is refused, never run
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _reason(error: Exception) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(path):
    """Rebuild a trained GPT and its tokenizer from a checkpoint (for sampling and analysis)."""
    from .data import CharTokenizer
    from .model import GPT, GPTConfig

    meta, model_state, _ = load_checkpoint(path)
    try:
        model = GPT(GPTConfig.from_dict(meta["model_config"]))
        model.load_state_dict(model_state)
        tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(checkpoint_path(path), _reason(e)) from None
    return model, tokenizer, meta
