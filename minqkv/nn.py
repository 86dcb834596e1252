"""Building blocks with learnable weights: Module, Parameter, Linear, Embedding, LayerNorm, MLP.

A Module finds its parameters by looking at its own attributes: a Parameter, a Module, or a
list of Modules. Nothing needs registering.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import ops
from .op_inputs import check_dropout_p
from .tensor import FLOAT_DTYPES, Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimiser updates (requires_grad is always True)."""

    _lock_while_read = True  # read-only while a graph reads it: element writes would corrupt backward (tensor.py)

    def __init__(self, data):
        data = np.asarray(data)
        if data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Parameter: data must be float32 or float64, got {data.dtype}")
        super().__init__(data, requires_grad=True)


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class Module:
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) pairs in a fixed order; a shared Parameter appears once."""
        seen = set()
        for name, param in self._all_named_parameters(prefix):
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def _all_named_parameters(self, prefix):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child._all_named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    @contextmanager
    def evaluating(self):
        """`with model.evaluating():` runs in eval mode (no dropout), then restores the previous mode."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict:
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the parameters in place; names, shapes and dtypes must all match."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing {missing}, unexpected {unexpected}")
        for name, param in params.items():
            value = np.asarray(state[name])
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ValueError(f"load_state_dict: {name} is {value.dtype}{list(value.shape)} "
                                 f"but the model expects {param.dtype}{list(param.shape)}")
        for name, param in params.items():
            np.copyto(param.writable_data(), state[name])  # counted as a change: older graphs refuse backward


class Linear(Module):
    """y = x @ W + b with W of shape (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=np.float32, rng: np.random.Generator | None = None, std: float = 0.02):
        dtype = _check_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Parameter((rng.standard_normal((in_features, out_features)) * std).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)  # (..., in) @ (in, out) + (out,) -> (..., out)


class Embedding(Module):
    """A table of vectors (num_embeddings, embedding_dim) looked up by integer ids."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=np.float32,
                 rng: np.random.Generator | None = None, std: float = 0.02):
        dtype = _check_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Parameter((rng.standard_normal((num_embeddings, embedding_dim)) * std).astype(dtype))

    def forward(self, ids) -> Tensor:
        return ops.embedding(self.weight, ids)  # (...) -> (..., embedding_dim)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, dtype=np.float32):
        dtype = _check_dtype(dtype)
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Dropout drawing from a generator that the owner shares (so checkpoints can save its state)."""

    def __init__(self, p: float, rng: np.random.Generator):
        check_dropout_p(p, "Dropout")  # at construction, so a bad p fails before training
        self.p = p
        self.rng = rng

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.rng, self.training)


class MLP(Module):
    """The Transformer's feed-forward block: Linear -> GELU -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, dtype=np.float32,
                 rng: np.random.Generator | None = None, proj_std: float = 0.02,
                 dropout_rng: np.random.Generator | None = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.fc = Linear(dim, hidden, dtype=dtype, rng=rng)
        self.proj = Linear(hidden, dim, dtype=dtype, rng=rng, std=proj_std)
        self.dropout = Dropout(dropout, dropout_rng if dropout_rng is not None else rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(ops.gelu(self.fc(x))))  # (..., C) -> (..., hidden) -> (..., C)
