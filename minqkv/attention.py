"""Causal self-attention in every projection variant.

A code is 3 characters for the roles (Q, K, V): equal letters share one weight matrix, '-'
means the role is the input itself (no projection). 'abc' is the usual attention, 'abb' ties
K and V, 'aaa' uses one matrix for all three, '--a' projects only the values, '---' projects
nothing. There are exactly 15 codes (see ALL_CODES).

A variant is a code (or its name) with modifiers, written as a label such as 'abb+rotate+gqa2':
n_kv_head (grouped-query attention; 1 = multi-query), rotate (a learned orthogonal rotation R
per head, K <- K R), pos2d (a learned bias added to the scores for every (query position, key
position)), gate (learned mixing of each projection with the identity, for pruning), out_proj
(the output projection on or off).

A gate is a hard-concrete gate (Louizos, Welling & Kingma 2018): a stretched, clipped sigmoid of
a learned log-odds log_alpha plus logistic noise in training, and without noise at evaluation,
where it is exactly 0 (the role is x) or exactly 1 (the role is x W) once log_alpha has moved
past +-2.4. The expected number of open gates is a differentiable penalty that closes unneeded
projections.

Attention is two functions: CausalSelfAttention.project(x) -> q, k, v is the variant, and
attend(q, k, v) is the attention every variant shares. Everything else calls these two.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import ops
from .nn import Dropout, Module, Parameter
from .tensor import Tensor, no_grad

if TYPE_CHECKING:
    from .model import GPTConfig

ROLES = "qkv"

# "no-X" and "identity-X" mean that role X is the identity (X = x)
NAMES = {
    "canonical": "abc",
    "shared-qk": "aab",  # the study's "no key": the Query used as Key
    "shared-kv": "abb",
    "shared-qv": "aba",
    "single": "aaa",
    "shared-qkv": "aaa",
    "no-query": "-ab",
    "identity-query": "-ab",
    "no-key": "a-b",
    "identity-key": "a-b",
    "no-value": "ab-",
    "identity-value": "ab-",
    "value-only": "--a",
    "none": "---",
}


# hard-concrete constants of Louizos et al. (2018): temperature, and the stretch to (GAMMA, ZETA)
GATE_BETA, GATE_GAMMA, GATE_ZETA = 2 / 3, -0.1, 1.1
# gates start open (deterministic z = 1, open in 9 of 10 noisy draws): a gated model first learns
# as the plain one, and the penalty closes what it does not need
GATE_INIT_LOG_ALPHA = 3.0


def hard_concrete(log_alpha: Tensor, noise: np.ndarray | None = None) -> Tensor:
    """Gate z in [0, 1]: sampled with uniform noise u in (0, 1), deterministic when noise is None.

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)   sampled, or s = sigmoid(log_alpha)
    z = clip(s (zeta - gamma) + gamma, 0, 1)                 exactly 0 or 1 beyond the stretch
    """
    if noise is None:
        s = ops.sigmoid(log_alpha)
    else:
        logistic = np.log(noise) - np.log1p(-noise)  # a logistic sample from a uniform one
        s = ops.sigmoid((log_alpha + logistic.astype(log_alpha.dtype)) * (1.0 / GATE_BETA))
    return ops.clip(s * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA, 0.0, 1.0)


def probability_open(log_alpha: Tensor) -> Tensor:
    """P(z > 0) = sigmoid(log_alpha - beta log(-gamma / zeta)): the expected L0 of one gate."""
    return ops.sigmoid(log_alpha - GATE_BETA * math.log(-GATE_GAMMA / GATE_ZETA))


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


def parse_code(spec: str) -> str:
    """A code ('abb', 'bcc') or a name ('shared-kv') -> the canonical 3-character code."""
    if not isinstance(spec, str):
        raise TypeError(f"a code must be a string such as 'abb' or 'shared-kv', got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in NAMES:
        return NAMES[key]
    if len(key) == 3 and set(key) <= set("abc-"):
        return canonical_code(key)
    names = ", ".join(f"{name}={code}" for name, code in NAMES.items())
    raise ValueError(f"variant {spec!r} is not valid: its code must be three of a, b, c or '-' for "
                     f"(Q, K, V), e.g. 'abb'; the 15 codes are {', '.join(ALL_CODES)}; names: {names}")


def names_of(code: str) -> list:
    return [name for name, c in NAMES.items() if c == code]


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: its code, read with the sizes and modifiers of the model's config.

    The config (a GPTConfig) is the one place sizes live; this adds only the layer's code and
    what follows from the two: widths, tied weights, gates, and the layer's costs.
    """

    code: str
    config: GPTConfig

    def __post_init__(self):
        _check_code_fits_heads(self)

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    @property
    def n_kv_head(self) -> int:
        return self.config.n_head if self.config.n_kv_head is None else self.config.n_kv_head

    def width(self, role: str) -> int:
        """Output width of a role: Q has all heads, K and V have n_kv_head heads."""
        return self.config.n_embd if role == "q" else self.n_kv_head * self.head_dim

    def letters(self) -> list:
        """Distinct weight letters in order, e.g. 'abb' -> ['a', 'b']."""
        return sorted(set(self.code) - {"-"})

    def roles_of(self, letter: str) -> str:
        return "".join(r for r, ch in zip(ROLES, self.code) if ch == letter)

    def weight_name(self, letter: str) -> str:
        return "w_" + self.roles_of(letter)  # 'w_q', 'w_kv', 'w_qkv', ...

    def gated_roles(self) -> str:
        """Roles that get a gate: projected ones whose width equals the input's (so identity is possible)."""
        if not self.config.gate:
            return ""
        full_width = self.config.n_embd
        return "".join(r for r, ch in zip(ROLES, self.code) if ch != "-" and self.width(r) == full_width)

    def k_and_v_share_cache(self) -> bool:
        """K and V are the same tensor before rotation, so a KV cache stores it once."""
        same_source = self.code[1] == self.code[2]
        return same_source and not ({"k", "v"} & set(self.gated_roles()))

    def symmetric(self) -> bool:
        """Are the scores Q K^T symmetric? Only when Q and K are the very same tensor."""
        same = self.code[0] == self.code[1] and not ({"q", "k"} & set(self.gated_roles()))
        return same and not self.config.rotate and not self.config.pos2d

    # ---- costs, computed from the code and sizes ------------------------------------------
    def params(self) -> int:
        """Learned parameters of this layer's attention (a tied weight counts once, identity is free)."""
        c, hd = self.config, self.head_dim
        total = sum(c.n_embd * self.width(self.roles_of(L)[0]) for L in self.letters())
        total += c.n_embd * c.n_embd if c.out_proj else 0
        total += self.n_kv_head * hd ** 2 if c.rotate else 0
        total += c.n_head * c.block_size ** 2 if c.pos2d else 0
        total += len(self.gated_roles())
        return total

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward multiply-adds x 2 for one token attending to `context` keys (default block_size)."""
        c, hd = self.config, self.head_dim
        context = c.block_size if context is None else context
        flops = sum(2 * c.n_embd * self.width(self.roles_of(L)[0]) for L in self.letters())
        flops += 3 * c.n_embd * len(self.gated_roles())  # g*p + (1-g)*x
        flops += 2 * self.n_kv_head * hd ** 2 if c.rotate else 0
        flops += 2 * 2 * context * c.n_embd  # scores q.k and the weighted sum of values
        flops += c.n_head * context if c.pos2d else 0
        flops += 2 * c.n_embd * c.n_embd if c.out_proj else 0
        return flops

    def kv_cache_floats_per_token(self) -> int:
        """Floats cached per token per layer: K and V sources, a shared one once, identity caches x."""
        k, v = self.width("k"), self.width("v")
        return k if self.k_and_v_share_cache() else k + v


def _check_code_fits_heads(s: AttentionSpec) -> None:
    """With fewer key/value heads than query heads, K and V are narrower than x and than Q."""
    H, Hkv = s.config.n_head, s.n_kv_head
    if Hkv == H:
        return
    q, k, v = s.code
    for role, ch in (("K", k), ("V", v)):
        if ch == "-":
            raise ValueError(f"code {s.code!r} with n_kv_head={Hkv} < n_head={H}: identity {role} has "
                             f"n_head={H} heads of input, but {role} must have n_kv_head={Hkv} heads; "
                             f"project {role} or use n_kv_head=n_head")
        if q != "-" and ch == q:
            raise ValueError(f"code {s.code!r} with n_kv_head={Hkv} < n_head={H}: Q is {s.width('q')} "
                             f"wide but {role} is {s.width('k')} wide, so they cannot share one weight; "
                             "untie them or use n_kv_head=n_head")


# ---- the attention every variant shares ---------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout=None,
           maps: bool = True) -> tuple:
    """Causal attention of q (B, H, T, hd) over k, v (B, Hkv, Tk, hd) -> y (B, T, H*hd), scores, weights.

    Query i sits at position Tk - T + i: it sees keys 0 .. Tk - T + i. bias (H, T, Tk) is added
    to the scores; dropout, a callable, acts on the weights. scores (before the mask) and
    weights (after the softmax, before dropout) are (B, H, T, Tk), for analysis.

    maps=False says the scores and weights are not wanted: then, unless dropout is active, one
    fused kernel (ops.causal_attention) computes y without ever storing a (T, Tk) matrix, and
    scores and weights are None. The steps below are its reference.
    """
    B, H, T, hd = q.shape
    dropout_active = dropout is not None and getattr(dropout, "p", 1) > 0 and getattr(dropout, "training", True)
    if not maps and not dropout_active:
        y = ops.causal_attention(q, k, v, bias)  # (B, H, T, hd)
        return ops.transpose(y, (0, 2, 1, 3)).reshape(B, T, H * hd), None, None
    Hkv, Tk = k.shape[1], k.shape[2]
    q = q.reshape(B, Hkv, H // Hkv, T, hd)  # (B, Hkv, G, T, hd): a group of G query heads per key head
    k = k.reshape(B, Hkv, 1, Tk, hd)  # (B, Hkv, 1, Tk, hd): broadcast over the G heads of its group
    v = v.reshape(B, Hkv, 1, Tk, hd)  # (B, Hkv, 1, Tk, hd)
    scores = (q @ ops.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))  # (B, Hkv, G, T, Tk)
    if bias is not None:
        scores = scores + bias.reshape(Hkv, H // Hkv, T, Tk)  # (H, T, Tk) -> (Hkv, G, T, Tk)
    weights = ops.softmax(scores, causal=True)  # (B, Hkv, G, T, Tk), zero where key j > Tk - T + i
    y = (dropout(weights) if dropout is not None else weights) @ v  # (B, Hkv, G, T, hd)
    y = ops.transpose(y.reshape(B, H, T, hd), (0, 2, 1, 3)).reshape(B, T, H * hd)  # (B, T, H*hd)
    return y, scores.reshape(B, H, T, Tk), weights.reshape(B, H, T, Tk)


# ---- the KV cache -------------------------------------------------------------------------------


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


# ---- the layer ----------------------------------------------------------------------------------


class CausalSelfAttention(Module):
    """Multi-head causal self-attention whose Q, K, V projections follow the layer's code."""

    def __init__(self, spec: AttentionSpec, dtype=None, rng: np.random.Generator | None = None,
                 dropout_rng: np.random.Generator | None = None, gate_rng: np.random.Generator | None = None):
        dtype = np.dtype(spec.config.dtype if dtype is None else dtype)  # default: the config's
        rng = rng if rng is not None else np.random.default_rng(0)
        self.spec = spec
        c = spec.config
        for letter in spec.letters():
            width = spec.width(spec.roles_of(letter)[0])
            w = rng.standard_normal((c.n_embd, width)) * 0.02  # (C, width)
            setattr(self, spec.weight_name(letter), Parameter(w.astype(dtype)))
        for role in spec.gated_roles():
            setattr(self, f"gate_{role}", Parameter(np.full(1, GATE_INIT_LOG_ALPHA, dtype=dtype)))  # log_alpha
        # the gates' noise, drawn once per gate per training forward, from the model's saved generator
        self.gate_rng = gate_rng if gate_rng is not None else np.random.default_rng(0)
        if c.rotate:
            # R = Cayley(S - S^T) is the identity at S = 0
            self.rotation_param = Parameter(np.zeros((spec.n_kv_head, spec.head_dim, spec.head_dim), dtype))
        if c.pos2d:
            self.pos_bias = Parameter(np.zeros((c.n_head, c.block_size, c.block_size), dtype))
        if c.out_proj:
            # GPT-2's scaled init of residual projections
            w_o = rng.standard_normal((c.n_embd, c.n_embd)) * (0.02 / math.sqrt(2 * c.n_layer))
            self.w_o = Parameter(w_o.astype(dtype))
        drop_rng = dropout_rng if dropout_rng is not None else rng
        self.attn_dropout = Dropout(c.dropout, drop_rng)
        self.resid_dropout = Dropout(c.dropout, drop_rng)

    # ---- the variant: x -> q, k, v ----------------------------------------------------------
    def project(self, x: Tensor, cache: KVCache | None = None) -> tuple:
        """x (B, T, C) -> q (B, H, T, hd), k and v (B, Hkv, Tk, hd).

        Roles with one letter share one weight, applied once; '-' passes x through; a gate mixes
        x W with x; the rotation turns each key head. With a cache, x holds only the new tokens and k, v also cover the cached ones (Tk = past + T).
        """
        s = self.spec
        proj = dict(zip(s.letters(), ops.matmul_each(x, [self.weight(L) for L in s.letters()])))  # one GEMM
        q, k, v = (x if letter == "-" else self.gated(role, proj[letter], x)
                   for role, letter in zip(ROLES, s.code))
        if cache is not None:
            k, v = self._extend_cache(cache, k, v)  # (B, past + T, width)
        q = self.split_heads(q, s.config.n_head)  # (B, H, T, hd)
        k = self.split_heads(k, s.n_kv_head)  # (B, Hkv, Tk, hd)
        v = self.split_heads(v, s.n_kv_head)  # (B, Hkv, Tk, hd)
        if s.config.rotate:
            Hkv, hd = s.n_kv_head, s.head_dim
            k = k @ self.rotation().reshape(1, Hkv, hd, hd)  # K R: (B, Hkv, Tk, hd) @ (1, Hkv, hd, hd)
        return q, k, v

    def weight(self, letter: str) -> Parameter:
        """The weight (C, width) of one letter of the code, shared by every role with that letter."""
        return getattr(self, self.spec.weight_name(letter))

    def gated(self, role: str, projected: Tensor, x: Tensor) -> Tensor:
        """z (x W) + (1 - z) x for a gated role, (x W) unchanged for the others.

        z is sampled in training (fresh noise each forward) and deterministic at evaluation.
        """
        if role not in self.spec.gated_roles():
            return projected
        noise = self.gate_rng.uniform(np.finfo(np.float32).eps, 1.0, size=1) if self.training else None
        z = self.gate(role, noise)
        return z * projected + (1.0 - z) * x

    def gate(self, role: str, noise: np.ndarray | None = None) -> Tensor:
        """The hard-concrete gate (1,) of a role: deterministic without noise."""
        return hard_concrete(getattr(self, f"gate_{role}"), noise)

    def gate_value(self, role: str) -> float:
        """The deterministic gate of a role as a number, for reading (no graph)."""
        with no_grad():
            return float(self.gate(role).data[0])

    def folded_weight(self, role: str) -> np.ndarray:
        """The one matrix a gated role applies: g (x W) + (1 - g) x = x (g W + (1 - g) I), float64."""
        g = self.gate_value(role)
        w = self.weight(self.spec.code[ROLES.index(role)]).data
        return g * w + (1 - g) * np.eye(self.spec.config.n_embd)

    def rotation(self) -> Tensor:
        """(n_kv_head, hd, hd) orthogonal matrices: R = (I + A)^-1 (I - A), A = S - S^T skew."""
        S = self.rotation_param
        A = S - ops.swapaxes(S, -1, -2)
        eye = np.broadcast_to(np.eye(self.spec.head_dim, dtype=S.dtype), S.shape)
        return ops.solve(A + eye, eye - A)

    def split_heads(self, t: Tensor, n: int) -> Tensor:
        B, T, _ = t.shape
        return ops.transpose(t.reshape(B, T, n, self.spec.head_dim), (0, 2, 1, 3))  # (B, n, T, hd)

    def _extend_cache(self, cache: KVCache, k: Tensor, v: Tensor) -> tuple:
        shared = self.spec.k_and_v_share_cache()
        k_all, v_all = cache.append(k.data, None if shared else v.data)
        k_all = Tensor(k_all)
        return k_all, (k_all if shared else Tensor(v_all))

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: KVCache | None = None, maps: list | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x holds only the new tokens.

        maps, if a list, receives this layer's (scores, weights) arrays (B, H, T, Tk) for analysis.
        """
        c = self.spec.config
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if past + T > c.block_size and c.pos2d:
            raise ValueError(f"pos2d attention covers {c.block_size} positions; got {past + T}")
        q, k, v = self.project(x, cache)
        bias = self.pos_bias[:, past:past + T, :past + T] if c.pos2d else None  # (H, T, Tk)
        # without maps (and without active dropout) attend runs the fused kernel: no (T, Tk) matrix
        y, scores, weights = attend(q, k, v, bias, self.attn_dropout, maps=maps is not None)  # (B, T, C)
        if maps is not None:
            maps.append((scores.data, weights.data))
        if c.out_proj:
            y = y @ self.w_o
        return self.resid_dropout(y)
