"""Checkpoints: everything needed to continue a run exactly, in one .npz file written atomically.

The file holds arrays under 'model/<name>', 'optim/<name>/m' and 'optim/<name>/v', and one
JSON document under 'meta' (configs, tokenizer, step, RNG states, optimiser scalars). It is
first written to a temporary file beside the target and then renamed over it, so an
interrupted save never leaves a broken checkpoint: the old one stays until the new is whole.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

CHECKPOINT_NAME = "ckpt.npz"


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
    _atomic_write(path, arrays)
    return path


def _atomic_write(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> tuple:
    """-> (meta dict, model arrays {name: array}, optimiser state dict or None)."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (train with --out DIR first)")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = {k: f[k] for k in f.files}
        meta = json.loads(str(files.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable minqkv checkpoint: {e}") from None
    model_state = {k[len("model/"):]: v for k, v in files.items() if k.startswith("model/")}
    optim_state = None
    if "optimizer" in meta:
        optim_state = {**meta["optimizer"], "params": {
            name: {"step": step, "m": files[f"optim/{name}/m"], "v": files[f"optim/{name}/v"]}
            for name, step in meta["optimizer_steps"].items()}}
    return meta, model_state, optim_state


def load_model(path):
    """Rebuild a trained GPT and its tokenizer from a checkpoint (for sampling and analysis)."""
    from .data import CharTokenizer
    from .model import GPT, GPTConfig

    meta, model_state, _ = load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(meta["model_config"]))
    model.load_state_dict(model_state)
    return model, CharTokenizer.from_dict(meta["tokenizer"]), meta
