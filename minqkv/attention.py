"""Causal self-attention in every projection variant.

A variant is a 3-character code for the roles (Q, K, V): equal letters share one weight
matrix, '-' means the role is the input itself (no projection). 'abc' is the usual
attention, 'abb' ties K and V, 'aaa' uses one matrix for all three, '--a' projects only
the values, '---' projects nothing. There are exactly 15 codes (see ALL_CODES).

Modifiers: n_kv_head (grouped-query attention; 1 = multi-query), rotate (a learned
orthogonal rotation R per head, K <- K R), pos2d (a learned bias added to the scores for
every (query position, key position)), gate (learned mixing of each projection with the
identity, for pruning), out_proj (the output projection on or off).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import ops
from .nn import Dropout, Module, Parameter
from .tensor import Tensor

ROLES = "qkv"

ALIASES = {
    "canonical": "abc",
    "shared-qk": "aab",
    "no-key": "aab",
    "shared-kv": "abb",
    "shared-qv": "aba",
    "single": "aaa",
    "shared-qkv": "aaa",
    "no-query": "-ab",
    "no-value": "ab-",
    "value-only": "--a",
    "none": "---",
}


def canonical_code(code: str) -> str:
    """Rename letters in order of first appearance: 'bab' -> 'aba', 'cc-' -> 'aa-'."""
    names: dict[str, str] = {}
    out = []
    for ch in code:
        if ch == "-":
            out.append("-")
        else:
            names.setdefault(ch, "abc"[len(names)])
            out.append(names[ch])
    return "".join(out)


ALL_CODES = tuple(sorted({canonical_code("".join(c)) for c in itertools.product("abc-", repeat=3)},
                         key=lambda c: (c.count("-"), c)))


def parse_variant(spec: str) -> str:
    """A code ('abb') or a name ('shared-kv') -> the canonical 3-character code."""
    if not isinstance(spec, str):
        raise TypeError(f"variant must be a string such as 'abb' or 'shared-kv', got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    if len(key) == 3 and set(key) <= set("abc-"):
        return canonical_code(key)
    names = ", ".join(f"{name}={code}" for name, code in ALIASES.items())
    raise ValueError(f"variant {spec!r} is not valid: use three of a, b, c or '-' for (Q, K, V), "
                     f"e.g. 'abb'; the 15 codes are {', '.join(ALL_CODES)}; names: {names}")


def names_of(code: str) -> list:
    return [name for name, c in ALIASES.items() if c == code]


@dataclass(frozen=True)
class AttentionShape:
    """Everything that fixes the size and cost of one attention layer."""

    code: str = "abc"
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head
    rotate: bool = False
    pos2d: bool = False
    gate: bool = False
    out_proj: bool = True
    block_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "code", parse_variant(self.code))
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        _validate_shape(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def width(self, role: str) -> int:
        """Output width of a role: Q has all heads, K and V have n_kv_head heads."""
        return self.n_embd if role == "q" else self.n_kv_head * self.head_dim

    def letters(self) -> list:
        """Distinct weight letters in order, e.g. 'abb' -> ['a', 'b']."""
        return sorted(set(self.code) - {"-"})

    def roles_of(self, letter: str) -> str:
        return "".join(r for r, ch in zip(ROLES, self.code) if ch == letter)

    def weight_name(self, letter: str) -> str:
        return "w_" + self.roles_of(letter)  # 'w_q', 'w_kv', 'w_qkv', ...

    def gated_roles(self) -> str:
        """Roles that get a gate: projected ones whose width equals the input's (so identity is possible)."""
        if not self.gate:
            return ""
        return "".join(r for r, ch in zip(ROLES, self.code) if ch != "-" and self.width(r) == self.n_embd)

    def k_and_v_share_cache(self) -> bool:
        """K and V are the same tensor before rotation, so a KV cache stores it once."""
        same_source = self.code[1] == self.code[2]
        return same_source and not ({"k", "v"} & set(self.gated_roles()))

    def symmetric(self) -> bool:
        """Are the scores Q K^T symmetric? Only when Q and K are the very same tensor."""
        same = self.code[0] == self.code[1] and not ({"q", "k"} & set(self.gated_roles()))
        return same and not self.rotate and not self.pos2d

    # ---- counts, computed from the code and sizes -----------------------------------------
    def params(self) -> int:
        """Learned parameters of this layer's attention (a tied weight counts once, identity is free)."""
        total = sum(self.n_embd * self.width(self.roles_of(L)[0]) for L in self.letters())
        total += self.n_embd * self.n_embd if self.out_proj else 0
        total += self.n_kv_head * self.head_dim ** 2 if self.rotate else 0
        total += self.n_head * self.block_size ** 2 if self.pos2d else 0
        total += len(self.gated_roles())
        return total

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward multiply-adds x 2 for one token attending to `context` keys (default block_size)."""
        context = self.block_size if context is None else context
        flops = sum(2 * self.n_embd * self.width(self.roles_of(L)[0]) for L in self.letters())
        flops += 3 * self.n_embd * len(self.gated_roles())  # g*p + (1-g)*x
        flops += 2 * self.n_kv_head * self.head_dim ** 2 if self.rotate else 0
        flops += 2 * 2 * context * self.n_embd  # scores q.k and the weighted sum of values
        flops += self.n_head * context if self.pos2d else 0
        flops += 2 * self.n_embd * self.n_embd if self.out_proj else 0
        return flops

    def kv_cache_floats_per_token(self) -> int:
        """Floats cached per token per layer: K and V sources, a shared one once, identity caches x."""
        k, v = self.width("k"), self.width("v")
        return k if self.k_and_v_share_cache() else k + v


def _validate_shape(s: AttentionShape) -> None:
    if s.n_embd <= 0 or s.n_head <= 0 or s.n_embd % s.n_head:
        raise ValueError(f"n_embd={s.n_embd} must be a positive multiple of n_head={s.n_head}")
    if s.n_kv_head <= 0 or s.n_head % s.n_kv_head:
        raise ValueError(f"n_kv_head={s.n_kv_head} must divide n_head={s.n_head} "
                         "(each group of query heads shares one key/value head)")
    if s.block_size <= 0:
        raise ValueError(f"block_size must be positive, got {s.block_size}")
    if s.n_kv_head == s.n_head:
        return
    q, k, v = s.code
    for role, ch in (("K", k), ("V", v)):
        if ch == "-":
            raise ValueError(f"variant {s.code!r} with n_kv_head={s.n_kv_head} < n_head={s.n_head}: "
                             f"identity {role} has n_head={s.n_head} heads of input, but "
                             f"{role} must have n_kv_head={s.n_kv_head} heads; project {role} "
                             "or use n_kv_head=n_head")
        if q != "-" and ch == q:
            raise ValueError(f"variant {s.code!r} with n_kv_head={s.n_kv_head} < n_head={s.n_head}: "
                             f"Q is {s.n_embd} wide but {role} is {s.width('k')} wide, so they "
                             "cannot share one weight; untie them or use n_kv_head=n_head")


class KVCache:
    """Per-layer cache of the key and value sources of past tokens, for incremental decoding.

    Sources are cached before the rotation (applied on the fly), so a tensor that serves as
    both K and V is stored once.
    """

    def __init__(self):
        self.k_source = None  # (B, T_past, width_k) ndarray
        self.v_source = None  # (B, T_past, width_v) ndarray, or None when shared with k_source
        self.length = 0

    def append(self, k_new: np.ndarray, v_new: np.ndarray | None) -> tuple:
        self.k_source = k_new if self.k_source is None else np.concatenate([self.k_source, k_new], 1)
        if v_new is not None:
            self.v_source = v_new if self.v_source is None else np.concatenate([self.v_source, v_new], 1)
        self.length = self.k_source.shape[1]
        return self.k_source, self.v_source

    def floats_per_token(self) -> int:
        """Floats actually stored per token (per batch row), measured from the arrays."""
        if self.k_source is None:
            return 0
        per_token = self.k_source.shape[2]
        return per_token + (self.v_source.shape[2] if self.v_source is not None else 0)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention whose Q, K, V projections follow a variant code."""

    def __init__(self, shape: AttentionShape, dropout: float = 0.0, dtype=np.float32,
                 rng: np.random.Generator | None = None, dropout_rng: np.random.Generator | None = None,
                 n_layer: int = 1):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.shape = shape
        C = shape.n_embd
        for letter in shape.letters():
            width = shape.width(shape.roles_of(letter)[0])
            w = rng.standard_normal((C, width)) * 0.02  # (C, width)
            setattr(self, shape.weight_name(letter), Parameter(w.astype(dtype)))
        for role in shape.gated_roles():
            # logit 0 -> gate 0.5: undecided, so training (and the penalty) can move it either way
            setattr(self, f"gate_{role}", Parameter(np.zeros(1, dtype=dtype)))
        if shape.rotate:
            # R = Cayley(S - S^T) is the identity at S = 0
            self.rotation_param = Parameter(np.zeros((shape.n_kv_head, shape.head_dim, shape.head_dim), dtype))
        if shape.pos2d:
            self.pos_bias = Parameter(np.zeros((shape.n_head, shape.block_size, shape.block_size), dtype))
        if shape.out_proj:
            # GPT-2's scaled init of residual projections
            w_o = rng.standard_normal((C, C)) * (0.02 / math.sqrt(2 * n_layer))
            self.w_o = Parameter(w_o.astype(dtype))
        drop_rng = dropout_rng if dropout_rng is not None else rng
        self.attn_dropout = Dropout(dropout, drop_rng)
        self.resid_dropout = Dropout(dropout, drop_rng)

    # ---- the pieces ---------------------------------------------------------------------
    def role(self, role: str, x: Tensor, projected: dict) -> Tensor:
        """The Q, K or V input of attention for role in 'qkv' (B, T, C) -> (B, T, width)."""
        letter = self.shape.code[ROLES.index(role)]
        if letter == "-":
            return x
        if letter not in projected:  # a shared weight is applied once
            projected[letter] = x @ getattr(self, self.shape.weight_name(letter))
        out = projected[letter]
        if role in self.shape.gated_roles():
            g = self.gate(role)
            out = g * out + (1.0 - g) * x  # out = g (x W) + (1 - g) x
        return out

    def gate(self, role: str) -> Tensor:
        return ops.sigmoid(getattr(self, f"gate_{role}"))

    def rotation(self) -> Tensor:
        """(n_kv_head, hd, hd) orthogonal matrices: R = (I + A)^-1 (I - A), A = S - S^T skew."""
        S = self.rotation_param
        A = S - ops.swapaxes(S, -1, -2)
        eye = np.broadcast_to(np.eye(self.shape.head_dim, dtype=S.dtype), S.shape)
        return ops.solve(A + eye, eye - A)

    def split_heads(self, t: Tensor, n: int) -> Tensor:
        B, T, _ = t.shape
        return ops.transpose(t.reshape(B, T, n, self.shape.head_dim), (0, 2, 1, 3))  # (B, n, T, hd)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x holds only the new tokens."""
        s = self.shape
        B, T, C = x.shape
        H, Hkv, hd = s.n_head, s.n_kv_head, s.head_dim
        past = cache.length if cache is not None else 0
        if past + T > s.block_size and s.pos2d:
            raise ValueError(f"pos2d attention covers {s.block_size} positions; got {past + T}")

        projected: dict = {}
        q = self.role("q", x, projected)  # (B, T, C)
        k = self.role("k", x, projected)  # (B, T, Hkv*hd)
        v = self.role("v", x, projected)  # (B, T, Hkv*hd)
        if cache is not None:
            k, v = self._extend_cache(cache, k, v)  # now (B, past + T, width)
        Tk = k.shape[1]

        q = self.split_heads(q, H).reshape(B, Hkv, H // Hkv, T, hd)  # (B, Hkv, G, T, hd)
        k = self.split_heads(k, Hkv)  # (B, Hkv, Tk, hd)
        v = self.split_heads(v, Hkv)  # (B, Hkv, Tk, hd)
        if s.rotate:
            k = k @ self.rotation().reshape(1, Hkv, hd, hd)  # (B, Hkv, Tk, hd) @ (1, Hkv, hd, hd)
        k = k.reshape(B, Hkv, 1, Tk, hd)  # every query head of a group meets the same key head
        v = v.reshape(B, Hkv, 1, Tk, hd)

        scores = (q @ ops.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))  # (B, Hkv, G, T, Tk)
        if s.pos2d:
            bias = self.pos_bias[:, past:past + T, :Tk]  # (H, T, Tk)
            scores = scores + bias.reshape(Hkv, H // Hkv, T, Tk)
        weights = self.attn_dropout(ops.softmax(scores, causal=True))  # key j <= query i + past
        y = weights @ v  # (B, Hkv, G, T, hd)
        y = ops.transpose(y.reshape(B, H, T, hd), (0, 2, 1, 3)).reshape(B, T, C)  # (B, T, C)
        if s.out_proj:
            y = y @ self.w_o
        return self.resid_dropout(y)

    def _extend_cache(self, cache: KVCache, k: Tensor, v: Tensor) -> tuple:
        shared = self.shape.k_and_v_share_cache()
        k_all, v_all = cache.append(k.data, None if shared else v.data)
        k_all = Tensor(k_all)
        return k_all, (k_all if shared else Tensor(v_all))

    def attention_scores(self, x: Tensor) -> np.ndarray:
        """Pre-mask, pre-softmax scores (B, H, T, T) for analysis (no graph)."""
        s = self.shape
        B, T, _ = x.shape
        projected: dict = {}
        q = self.split_heads(self.role("q", x, projected), s.n_head)
        k = self.split_heads(self.role("k", x, projected), s.n_kv_head)
        if s.rotate:
            k = k @ self.rotation().reshape(1, s.n_kv_head, s.head_dim, s.head_dim)
        k = np.repeat(k.data, s.n_head // s.n_kv_head, axis=1)  # (B, H, T, hd)
        scores = q.data @ np.swapaxes(k, -1, -2) / math.sqrt(s.head_dim)
        if s.pos2d:
            scores = scores + self.pos_bias.data[:, :T, :T]
        return scores
