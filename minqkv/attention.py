"""Causal self-attention in every projection variant.

A code is 3 characters for the roles (Q, K, V): equal letters share one weight matrix, '-'
means the role is the input itself (no projection). 'abc' is the usual attention, 'abb' ties
K and V, 'aaa' uses one matrix for all three, '--a' projects only the values, '---' projects
nothing. There are exactly 15 codes (see ALL_CODES).

A variant is a code (or its name) with modifiers, written as a label such as 'abb+rotate+gqa2';
modifiers.py has their table. Here each is a few lines of project() or forward(): grouped key/value
heads, a rotation of the keys, a 2-D bias on the scores, gates, no output projection, rotary
positions (rope(), Su et al. 2021), output gates (out_gates(), Qiu et al. 2025), and latent keys
and values (up_projected(): K and V from one latent c = x W_down, which is all the cache holds;
DeepSeek-V2 2024).

A gate is a hard-concrete gate (Louizos, Welling & Kingma 2018): a stretched, clipped sigmoid of
a learned log-odds log_alpha plus logistic noise in training, and without noise at evaluation,
where it is exactly 0 (the role is x) or exactly 1 (the role is x W) once log_alpha has moved
past +-2.4. The expected number of open gates is a differentiable penalty that closes unneeded
projections.

Attention is two functions: CausalSelfAttention.project(x) -> q, k, v is the variant, and
attend(q, k, v) is the attention every variant shares. Everything else calls these two, or,
to read the attention itself (analysis), scores_and_weights(q, k), the first half of attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import linear_attention, ops
# the code grammar (15 codes, their names, parsing) is the first part of a label: modifiers.py has it
from .modifiers import ALL_CODES, NAMES, canonical_code, names_of, parse_code  # noqa: F401
from .nn import Dropout, Module, Parameter
from .tensor import Tensor, no_grad

if TYPE_CHECKING:
    from .model import GPTConfig

ROLES = "qkv"

ROPE_BASE = 10000.0  # rotary wavelengths run from 2 pi tokens up to nearly 2 pi ROPE_BASE (Su et al.)

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


def weight_name(roles: str, latent: bool = False) -> str:
    """The parameter name of the weight that serves `roles`: 'w_q', 'w_kv', 'w_qkv', ...; in a
    latent layer the K and V weights are up-projections from the latent: 'w_k_up', 'w_kv_up'."""
    return "w_" + roles + ("_up" if latent and "q" not in roles else "")


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
        _check_sym_init(self)
        _check_latent_kv(self)
        _check_gate(self)
        _check_linear(self)

    def width(self, role: str) -> int:
        """Output width of a role: Q has all heads, K and V have the config's kv_heads heads."""
        return self.config.n_embd if role == "q" else self.config.kv_heads * self.config.head_dim

    @property
    def latent(self) -> bool:
        """K and V are up-projected from a latent c = x W_down (multi-head latent attention)."""
        return self.config.latent_kv is not None

    @property
    def linear(self) -> bool:
        """Linear attention (elu + 1 or Performer features) in place of softmax: a state, not a KV cache."""
        return self.config.linear_features is not None

    def feature_width(self) -> int:
        """Features per head of linear attention: the head width for elu + 1, M for Performer."""
        m = self.config.linear_features
        return self.config.head_dim if m == 0 else m

    def letters(self) -> list:
        """Distinct weight letters in order, e.g. 'abb' -> ['a', 'b']."""
        return sorted(set(self.code) - {"-"})

    def input_letters(self) -> list:
        """Letters whose weight reads the input x: all of them, but a latent layer's K and V read c."""
        return [L for L in self.letters() if not (self.latent and "q" not in self.roles_of(L))]

    def input_width(self, letter: str) -> int:
        """Rows of a letter's weight: C for one that reads x, R for an up-projection from the latent."""
        return self.config.n_embd if letter in self.input_letters() else self.config.latent_kv

    def roles_of(self, letter: str) -> str:
        return "".join(r for r, ch in zip(ROLES, self.code) if ch == letter)

    def weight_name(self, letter: str) -> str:
        return weight_name(self.roles_of(letter), self.latent)

    def gated_roles(self) -> str:
        """Roles that get a gate: projected ones whose width equals the input's (so identity is possible).

        A latent layer's K and V are not gated: mixing them with x would need x in the cache."""
        if not self.config.gate:
            return ""
        full_width = self.config.n_embd
        return "".join(r for r, ch in zip(ROLES, self.code) if ch != "-" and self.width(r) == full_width
                       and not (self.latent and r != "q"))

    def k_and_v_share_cache(self) -> bool:
        """The cache stores one tensor for K and V: a latent layer's c, or a tensor that serves as both.

        Rotary positions turn K but not V, so under them K and V are two tensors in the cache."""
        if self.latent:
            return True
        same_source = self.code[1] == self.code[2]
        return same_source and self.config.pos != "rope" and not ({"k", "v"} & set(self.gated_roles()))

    def symmetric(self) -> bool:
        """Are the scores Q K^T symmetric? Only when Q and K are the very same tensor.

        Rotary positions keep tied Q and K symmetric. With R_p the rotation at position p
        (orthogonal: R_p^T = R_-p, R_a R_b = R_a+b) and row vectors, the score of query n and key m
        is s(n, m) = (q_n R_n)(k_m R_m)^T = q_n R_n-m k_m^T: it sees only the offset n - m. With
        q = k = u, s(m, n) = u_m R_m-n u_n^T, a number, equals its transpose u_n R_m-n^T u_m^T =
        u_n R_n-m u_m^T = s(n, m). The relative rotation R_n-m is not a symmetric matrix, but it
        transposes to R_m-n, the rotation of the swapped pair; put simply, RoPE turns q_n and k_n by
        the same R_n, so they stay one tensor. A rotation of K alone (rotate), a bias on the
        scores (pos2d) or different gates on Q and K do break the symmetry.
        """
        same = self.code[0] == self.code[1] and not ({"q", "k"} & set(self.gated_roles()))
        return same and not self.config.rotate and not self.config.pos2d

    # ---- costs, computed from the code and sizes ------------------------------------------
    def matrix_sizes(self) -> int:
        """Entries of the projection matrices: each letter's weight, and a latent layer's W_down (C, R)."""
        c = self.config
        total = sum(self.input_width(L) * self.width(self.roles_of(L)[0]) for L in self.letters())
        return total + (c.n_embd * c.latent_kv if self.latent else 0)

    def params(self) -> int:
        """Learned parameters of this layer's attention (a tied weight counts once, identity is free)."""
        c, hd = self.config, self.config.head_dim
        total = self.matrix_sizes()
        total += c.n_embd * c.n_embd if c.out_proj else 0
        total += c.kv_heads * hd ** 2 if c.rotate else 0
        total += c.n_head * c.block_size ** 2 if c.pos2d else 0
        total += len(self.gated_roles())
        total += c.n_embd * c.n_head if c.out_gate else 0
        return total

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward multiply-adds x 2 for one token attending to `context` keys (default block_size).

        Each key and value is counted as computed once. Decoding a latent layer (without folding
        W_up into the query and output weights, which minqkv does not do) up-projects every cached
        latent again at each step, 2 R (width_k + width_v) more FLOPs per cached token.
        """
        c, hd = self.config, self.config.head_dim
        context = c.block_size if context is None else context
        context = min(context, c.window) if c.window else context  # a window reads at most W keys
        flops = 2 * self.matrix_sizes()
        flops += 3 * c.n_embd * len(self.gated_roles())  # g*p + (1-g)*x
        flops += 3 * (c.n_embd + self.width("k")) if c.pos == "rope" else 0  # 4 products, 2 sums a pair
        flops += 2 * c.kv_heads * hd ** 2 if c.rotate else 0
        if self.linear:
            flops += self.linear_flops_per_token()
        else:
            flops += 2 * 2 * context * c.n_embd  # scores q.k and the weighted sum of values
        flops += c.n_head * context if c.pos2d or c.pos == "alibi" else 0
        flops += 2 * c.n_embd * c.n_head + c.n_embd if c.out_gate else 0  # x W_g, then y * gate
        flops += 2 * c.n_embd * c.n_embd if c.out_proj else 0
        return flops

    def linear_flops_per_token(self) -> int:
        """Linear attention's share of one token, independent of the context: the features of q and
        k (Performer: a (hd, M) product per head and the exp; elu + 1: about one op per number),
        the state update S += phi(k) v^T, z += phi(k) per key head, and the read phi(q) S,
        phi(q) . z and the division per query head."""
        c, m, hd = self.config, self.feature_width(), self.config.head_dim
        heads = c.n_head + c.kv_heads  # the queries' and the keys' features
        features = heads * (2 * hd * m + 3 * m) if c.linear_features else heads * 2 * hd
        state_update = c.kv_heads * (2 * m * hd + m)
        read = c.n_head * (2 * m * hd + 2 * m + hd)
        return features + state_update + read

    def kv_cache_floats_per_token(self) -> int:
        """Floats cached per token per layer: K and V (a tensor serving as both once, identity
        caches x), or a latent layer's c alone; linear attention caches no token (see decode_state_floats)."""
        if self.linear:
            return 0
        if self.latent:
            return self.config.latent_kv
        k, v = self.width("k"), self.width("v")
        return k if self.k_and_v_share_cache() else k + v

    def decode_state_floats(self, context: int | None = None) -> int:
        """Floats one sequence's decoder keeps for this layer after `context` tokens (default
        block_size): the KV cache of the tokens a query can still see (all of them, or the last W of
        a window), or linear attention's state S (M x hd) and z (M) per key head, whatever the context."""
        c = self.config
        context = c.block_size if context is None else context
        if self.linear:
            m = self.feature_width()
            return c.kv_heads * (m * c.head_dim + m)
        kept = min(context, c.window) if c.window else context
        return kept * self.kv_cache_floats_per_token()


def _check_code_fits_heads(s: AttentionSpec) -> None:
    """With fewer key/value heads than query heads, K and V are narrower than x and than Q."""
    H, Hkv = s.config.n_head, s.config.kv_heads
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


def _check_sym_init(s: AttentionSpec) -> None:
    """sym-init copies W_q into W_k at the start: both must exist, apart and of one width."""
    q, k = s.code[:2]
    if not s.config.sym_init:
        return
    if "-" in (q, k) or q == k or s.latent:
        raise ValueError(f"sym-init starts W_k as a copy of W_q, but code {s.code!r} has no separate "
                         "learned W_q and W_k reading x (it needs a code such as abc or abb, without latent-kv)")
    if s.width("q") != s.width("k"):
        raise ValueError(f"sym-init needs K as wide as Q; with n_kv_head={s.config.kv_heads} < "
                         f"n_head={s.config.n_head} K is {s.width('k')} wide, Q {s.width('q')}")


def _check_latent_kv(s: AttentionSpec) -> None:
    """A latent layer replaces the K and V projections by up-projections from c = x W_down: it
    needs K and V learned, and Q (which reads x) untied from them. One letter for K and V (abb)
    is one up-projection that serves both."""
    if not s.latent:
        return
    q, k, v = s.code
    for role, ch in (("K", k), ("V", v)):
        if ch == "-":
            raise ValueError(f"code {s.code!r} with latent_kv={s.config.latent_kv}: {role} is the identity, "
                             "but a latent layer up-projects K and V from c = x W_down; use a code whose "
                             "K and V are learned, such as 'abc', 'abb' or '-ab'")
        if ch == q:
            raise ValueError(f"code {s.code!r} with latent_kv={s.config.latent_kv}: Q shares its weight with "
                             f"{role}, but a latent layer replaces the K and V projections by up-projections "
                             "from c = x W_down while Q reads x; untie Q, e.g. 'abc' or 'abb'")


def _check_gate(s: AttentionSpec) -> None:
    """A gate mixes a projection with the identity, z (x W) + (1 - z) x: it needs a role that is
    projected and as wide as x (see gated_roles)."""
    if not s.config.gate or s.gated_roles():
        return
    reasons = []
    for role, ch in zip(ROLES, s.code):
        if ch == "-":
            reasons.append(f"{role.upper()} is the identity")
        elif s.latent and role != "q":
            reasons.append(f"{role.upper()} is up-projected from the latent (latent_kv={s.config.latent_kv})")
        else:
            reasons.append(f"{role.upper()} is {s.width(role)} wide (n_kv_head={s.config.kv_heads}), "
                           f"x {s.config.n_embd}")
    raise ValueError(f"code {s.code!r} has nothing to gate: {', '.join(reasons)}; a gate mixes a projection "
                     "with the identity, z (x W) + (1 - z) x, so it needs a learned Q, K or V as wide as x")


def _check_linear(s: AttentionSpec) -> None:
    """Linear attention has no score matrix: nothing to add a bias to (pos2d, alibi) or to cut to a
    window, and its decoder keeps a state, not the keys a latent would stand in for."""
    c = s.config
    if c.window is not None and c.linear_features is not None:
        raise ValueError(f"window={c.window} cuts the softmax scores to the last W keys, but linear_features="
                         f"{c.linear_features} replaces the softmax by linear attention, which has no scores: "
                         "give one of them")
    if not s.linear:
        return
    for on, name, what in ((c.pos2d, "pos2d", "a 2-D bias on the scores"),
                           (c.pos == "alibi", "pos='alibi'", "a distance bias on the scores"),
                           (s.latent, f"latent_kv={c.latent_kv}", "a latent in the KV cache")):
        if on:
            raise ValueError(f"linear_features={c.linear_features} (linear attention) cannot go with {name}: "
                             f"it needs {what}, and linear attention has no score matrix and no KV cache")


# ---- the attention every variant shares ---------------------------------------------------------


def scores_and_weights(q: Tensor, k: Tensor, bias: Tensor | None = None, window: int | None = None) -> tuple:
    """Scores and weights of queries q (B, H, T, hd) over keys k (B, Hkv, Tk, hd), each (B, H, T, Tk).

    scores = q k^T / sqrt(hd) + bias (H, T, Tk), before the causal mask; weights = their causal
    softmax. Query i sits at position Tk - T + i: it sees keys 0 .. Tk - T + i, or with a window
    only the last W of them (the others' scores are -inf). A group of H / Hkv query heads reads
    one key head (GQA).
    """
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q = q.reshape(B, Hkv, H // Hkv, T, hd)  # (B, Hkv, G, T, hd): a group of G query heads per key head
    k = k.reshape(B, Hkv, 1, Tk, hd)  # (B, Hkv, 1, Tk, hd): broadcast over the G heads of its group
    scores = (q @ ops.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))  # (B, Hkv, G, T, Tk)
    if bias is not None:
        scores = scores + bias.reshape(Hkv, H // Hkv, T, Tk)  # (H, T, Tk) -> (Hkv, G, T, Tk)
    if window:
        scores = scores + window_mask(T, Tk, window, q.dtype)  # (T, Tk): -inf before each query's window
    weights = ops.softmax(scores, causal=True)  # (B, Hkv, G, T, Tk), zero where key j > Tk - T + i
    return scores.reshape(B, H, T, Tk), weights.reshape(B, H, T, Tk)


def window_mask(T: int, Tk: int, window: int, dtype) -> np.ndarray:
    """(T, Tk): 0 where query i (at position Tk - T + i) sees key j within its last `window` keys,
    -inf for keys before them. Keys after the query are left to the causal mask."""
    distance = np.arange(T)[:, None] + (Tk - T) - np.arange(Tk)[None, :]  # query position - key position
    return np.where(distance >= window, -np.inf, 0.0).astype(dtype)


def weighted_values(weights: Tensor, v: Tensor) -> Tensor:
    """weights (B, H, T, Tk) of values v (B, Hkv, Tk, hd) -> y (B, T, H*hd), the heads side by side."""
    B, H, T, Tk = weights.shape
    Hkv, hd = v.shape[1], v.shape[3]
    y = weights.reshape(B, Hkv, H // Hkv, T, Tk) @ v.reshape(B, Hkv, 1, Tk, hd)  # (B, Hkv, G, T, hd)
    return ops.transpose(y.reshape(B, H, T, hd), (0, 2, 1, 3)).reshape(B, T, H * hd)  # (B, T, H*hd)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout=None,
           window: int | None = None) -> Tensor:
    """Causal attention of q (B, H, T, hd) over k, v (B, Hkv, Tk, hd) -> y (B, T, H*hd).

    y = weighted_values(dropout(weights), v), with the weights of scores_and_weights(q, k, bias,
    window): those two functions are the math, step by step. Whenever it can, attend computes the
    same y with one fused kernel (ops.causal_attention, flash-style) that never stores a (T, Tk)
    matrix, and with a window skips the keys outside it (cost linear in T). It cannot while
    dropout (a callable acting on the weights) is active, in training with p > 0: the kernel never
    holds the weights to drop, so attend then takes the step-by-step path, which stores the
    (B, H, T, Tk) weights, O(T^2) memory per head.
    """
    dropout_active = dropout is not None and getattr(dropout, "p", 1) > 0 and getattr(dropout, "training", True)
    if dropout_active:
        _, weights = scores_and_weights(q, k, bias, window)  # (B, H, T, Tk)
        return weighted_values(dropout(weights), v)
    B, H, T, hd = q.shape
    y = ops.causal_attention(q, k, v, bias, window=window)  # (B, H, T, hd), stored as (B, T, H, hd)
    return ops.transpose(y, (0, 2, 1, 3)).reshape(B, T, H * hd)  # views, no copy


def linear_attend(q: Tensor, k: Tensor, v: Tensor, feature_map, cache: KVCache | None = None) -> Tensor:
    """Causal linear attention of q (B, H, T, hd) over k, v (B, Hkv, T, hd) -> y (B, T, H*hd).

    The softmax of q.k is replaced by phi(q).phi(k) with positive features phi (feature_map,
    (..., hd) -> (..., M)): y_t = phi(q_t) S_t / phi(q_t) . z_t with S_t the sum of phi(k_s) v_s^T
    and z_t the sum of phi(k_s) over s <= t (linear_attention.py). Decoding keeps S and z in the
    cache, a state of the same size after any number of tokens, and adds the new tokens to it.
    """
    B, H, T, hd = q.shape
    phi_q, phi_k = feature_map(q), feature_map(k)  # (B, H, T, M), (B, Hkv, T, M)
    if cache is None:
        y = linear_attention.causal_linear_attention(phi_q, phi_k, v)  # (B, H, T, hd)
    else:
        if cache.linear_state is None:
            cache.linear_state = linear_attention.LinearState.empty(B, k.shape[1], phi_k.shape[3], hd, q.dtype)
        y_new, cache.linear_state = linear_attention.linear_attention_decode(phi_q, phi_k, v, cache.linear_state)
        y = y_new if isinstance(y_new, Tensor) else Tensor(y_new)
        cache.length += T
    return ops.transpose(y, (0, 2, 1, 3)).reshape(B, T, H * hd)  # (B, T, H*hd)


def alibi_slopes(n_head: int) -> np.ndarray:
    """ALiBi's fixed slope per head (Press et al. 2022), (n_head,): 2^(-8 h / n) for h = 1..n when n
    is a power of two; otherwise the n' = 2^floor(log2 n) slopes of that rule, then every other
    slope of the rule for 2 n' heads, as the paper does."""
    p = 2 ** int(math.floor(math.log2(n_head)))
    base = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    between = [2.0 ** (-4.0 * (2 * h + 1) / p) for h in range(n_head - p)]  # 2^(-8 (2h+1) / 2p)
    return np.array(base + between)


def alibi_bias(n_head: int, past: int, T: int, dtype) -> np.ndarray:
    """ALiBi's bias (H, T, Tk) on the scores of T queries after `past` tokens over Tk = past + T keys:
    -slope_h (query position - key position); keys after the query are the causal mask's."""
    distance = np.arange(past, past + T)[:, None] - np.arange(past + T)[None, :]  # (T, Tk)
    return (-alibi_slopes(n_head)[:, None, None] * distance).astype(dtype)  # (H, T, Tk)


# ---- rotary positions ----------------------------------------------------------------------------


def rope(t: Tensor, positions: np.ndarray, head_dim: int) -> Tensor:
    """Rotary positions (Su et al. 2021): t (B, T, n*hd) with each head's dimensions (2i, 2i+1)
    turned as one pair, by the angle p * ROPE_BASE^(-2i/hd) at position p = positions[t].

    As a complex number a + ib, a pair is multiplied by e^(i p theta_i). Made of existing ops,
    so its gradient (the opposite turn) comes for free.
    """
    B, T, width = t.shape
    theta = ROPE_BASE ** (-np.arange(0, head_dim, 2) / head_dim)  # (hd/2,) one frequency per pair
    angles = np.outer(positions, theta)[:, None, :, None]  # (T, 1, hd/2, 1): the same for every head
    cos, sin = np.cos(angles).astype(t.dtype), np.sin(angles).astype(t.dtype)
    pairs = t.reshape(B, T, width // head_dim, head_dim // 2, 2)  # (B, T, n, hd/2, 2)
    a, b = ops.split(pairs, 2, axis=-1)  # (B, T, n, hd/2, 1) each
    turned = ops.concat([a * cos - b * sin, a * sin + b * cos], axis=-1)  # (B, T, n, hd/2, 2)
    return turned.reshape(B, T, width)


# ---- the KV cache -------------------------------------------------------------------------------


class KVCache:
    """Per-layer cache of the key and value sources of past tokens, for incremental decoding.

    Sources are cached before the learned rotation (applied on the fly), so a tensor that serves
    as both K and V is stored once. Rotary positions are applied before caching (as usual: a
    key's turn depends on its own position only), so under them K and V are two tensors. A latent
    layer caches its latent c and up-projects (and turns) every key and value at each step.
    """

    def __init__(self, window: int | None = None):
        self._k = None  # (B, capacity, width_k) ndarray; a latent layer's c (B, capacity, R)
        self._v = None  # (B, capacity, width_v) ndarray, or None when shared with the keys
        self.linear_state = None  # a linear attention layer's state S, z (linear_attention.LinearState)
        self.length = 0  # past tokens: their positions are 0 .. length - 1
        self.window = window  # a sliding window's W: only the last W - 1 past tokens are ever read again
        self.start = 0  # position of the oldest token kept (a window forgets the ones before)

    @property
    def k_source(self) -> np.ndarray | None:
        """(B, T_kept, width_k): a view of the cached keys (or latents) of positions start .. length - 1."""
        return None if self._k is None else self._k[:, :self.length - self.start]

    @property
    def v_source(self) -> np.ndarray | None:
        """(B, T_kept, width_v): a view of the cached values, or None when shared with the keys."""
        return None if self._v is None else self._v[:, :self.length - self.start]

    def append(self, k_new: np.ndarray, v_new: np.ndarray | None) -> tuple:
        """Write the new tokens' sources after the past ones; return (k_source, v_source), views.

        With a window, first forget all but the last W - 1 past tokens: the first new query sees
        those and itself, the later ones less. The cache then never holds more than W - 1 + T_new
        tokens, however long the sequence. (Forgetting moves the kept tokens to the buffer's front,
        so the views handed out by earlier calls change: use them before the next append.)"""
        if self.window is not None:
            self._forget_all_but(self.window - 1)
        kept = self.length - self.start
        self._k = _written(self._k, k_new, kept)
        if v_new is not None:
            self._v = _written(self._v, v_new, kept)
        self.length += k_new.shape[1]
        return self.k_source, self.v_source

    def _forget_all_but(self, n: int) -> None:
        drop = self.length - self.start - n
        if drop <= 0:
            return
        for buffer in (self._k, self._v):
            if buffer is not None:
                buffer[:, :n] = buffer[:, drop:drop + n]  # NumPy copies overlapping ranges correctly
        self.start += drop

    def floats_per_token(self) -> int:
        """Floats actually stored per token (per batch row), measured from the arrays."""
        if self.k_source is None:
            return 0
        per_token = self.k_source.shape[2]
        return per_token + (self.v_source.shape[2] if self.v_source is not None else 0)

    def state_floats(self) -> int:
        """Floats per batch row a decoder holds now, measured from the arrays: the cached tokens'
        sources, or a linear attention layer's state."""
        if self.linear_state is not None:
            state = self.linear_state
            return (state.S[0].size + state.z[0].size) if hasattr(state.S, "size") else 0
        return (self.length - self.start) * self.floats_per_token()


def _written(buffer: np.ndarray | None, new: np.ndarray, start: int) -> np.ndarray:
    """buffer (B, capacity, width) with new (B, T, width) written at positions start..start+T.

    A buffer too short for them is replaced by one of twice its capacity (or just enough, if
    more), so decoding n tokens copies the past O(log n) times instead of once per token, as a
    concatenation would. Positions below start are never written again, so the views handed
    out earlier keep their values. The price: up to twice the memory the tokens need."""
    end = start + new.shape[1]
    if buffer is None or end > buffer.shape[1]:
        capacity = max(end, 2 * (0 if buffer is None else buffer.shape[1]))
        grown = np.empty((new.shape[0], capacity, new.shape[2]), new.dtype)
        if buffer is not None:
            grown[:, :start] = buffer[:, :start]
        buffer = grown
    buffer[:, start:end] = new
    return buffer


# ---- the layer ----------------------------------------------------------------------------------


class CausalSelfAttention(Module):
    """Multi-head causal self-attention whose Q, K, V projections follow the layer's code."""

    def __init__(self, spec: AttentionSpec, dtype=None, rng: np.random.Generator | None = None,
                 dropout_rng: np.random.Generator | None = None, gate_rng: np.random.Generator | None = None):
        dtype = np.dtype(spec.config.dtype if dtype is None else dtype)  # default: the config's
        rng = rng if rng is not None else np.random.default_rng(0)
        self.spec = spec
        self.dtype = dtype
        c = spec.config
        init_std = 1 / math.sqrt(c.n_embd) if c.wide_init else 0.02  # see the README's recall section
        for letter in spec.letters():
            rows, width = spec.input_width(letter), spec.width(spec.roles_of(letter)[0])
            # an up-projection from the latent gets std 1/sqrt(R): c W_up then starts as large as x W
            std = init_std if letter in spec.input_letters() else 1 / math.sqrt(rows)
            w = rng.standard_normal((rows, width)) * std  # (C or R, width)
            setattr(self, spec.weight_name(letter), Parameter(w.astype(dtype)))
        if spec.latent:
            w_down = rng.standard_normal((c.n_embd, c.latent_kv)) * 0.02  # (C, R)
            self.w_kv_down = Parameter(w_down.astype(dtype))
        if c.sym_init:  # scores x W_q W_k^T y^T start symmetric and positive semi-definite
            self.weight(spec.code[1]).data[...] = self.weight(spec.code[0]).data
        for role in spec.gated_roles():
            setattr(self, f"gate_{role}", Parameter(np.full(1, GATE_INIT_LOG_ALPHA, dtype=dtype)))  # log_alpha
        # the gates' noise, drawn once per gate per training forward, from the model's saved generator
        self.gate_rng = gate_rng if gate_rng is not None else np.random.default_rng(0)
        if c.rotate:
            # R = Cayley(S - S^T) is the identity at S = 0
            self.rotation_param = Parameter(np.zeros((c.kv_heads, c.head_dim, c.head_dim), dtype))
        if c.pos2d:
            self.pos_bias = Parameter(np.zeros((c.n_head, c.block_size, c.block_size), dtype))
        if c.linear_features:  # Performer's random features: drawn once, fixed (not learned)
            self.performer_projection = linear_attention.draw_performer_projection(
                c.head_dim, c.linear_features, rng, dtype)  # (hd, M)
        if c.out_gate:
            # zero: every head's gate starts at sigmoid(0) = 1/2 whatever the input, the point
            # where a sigmoid learns fastest in either direction (an open start would need a bias)
            self.w_out_gate = Parameter(np.zeros((c.n_embd, c.n_head), dtype))  # (C, H)
        if c.out_proj:
            w_o = rng.standard_normal((c.n_embd, c.n_embd)) * c.residual_init_std
            self.w_o = Parameter(w_o.astype(dtype))
        drop_rng = dropout_rng if dropout_rng is not None else rng
        self.attn_dropout = Dropout(c.dropout, drop_rng)
        self.resid_dropout = Dropout(c.dropout, drop_rng)

    # ---- the variant: x -> q, k, v ----------------------------------------------------------
    def project(self, x: Tensor, cache: KVCache | None = None) -> tuple:
        """x (B, T, C) -> q (B, H, T, hd), k and v (B, Hkv, Tk, hd).

        Roles with one letter share one weight, applied once; '-' passes x through; a gate mixes
        x W with x; rotary positions turn q and k; the rotation turns each key head. With a cache,
        x holds only the new tokens and k, v also cover the cached ones (Tk = past + T).
        """
        s, c = self.spec, self.spec.config
        past = cache.length if cache is not None else 0
        q, k, v = self.sources(x)  # (B, T, width); a latent layer's k and v: its latent c (B, T, R)
        q = self.positioned(q, past)
        if s.latent:
            latent = self._extend_cache(cache, k, v)[0] if cache is not None else k  # (B, past + T, R)
            k, v = self.up_projected(latent)  # (B, Tk, width): every key again, from the cached latents
            k = self.positioned(k, cache.start if cache is not None else 0)
        else:
            k = self.positioned(k, past)  # turned before caching, as each key's turn is its own
            if cache is not None and not s.linear:  # linear attention keeps a state instead (linear_attend)
                k, v = self._extend_cache(cache, k, v)  # (B, past + T, width)
        q = self.split_heads(q, c.n_head)  # (B, H, T, hd)
        k = self.split_heads(k, c.kv_heads)  # (B, Hkv, Tk, hd)
        v = self.split_heads(v, c.kv_heads)  # (B, Hkv, Tk, hd)
        if c.rotate:
            Hkv, hd = c.kv_heads, c.head_dim
            k = k @ self.rotation().reshape(1, Hkv, hd, hd)  # K R: (B, Hkv, Tk, hd) @ (1, Hkv, hd, hd)
        return q, k, v

    def sources(self, x: Tensor) -> list:
        """x (B, T, C) -> [q, k, v] before heads: x itself ('-'), its projection (gated or not),
        or, for K and V of a latent layer, the latent c = x W_down (B, T, R)."""
        s = self.spec
        weights = [self.weight(L) for L in s.input_letters()] + ([self.w_kv_down] if s.latent else [])
        products = ops.matmul_each(x, weights)  # one GEMM for every matrix that reads x
        proj = dict(zip(s.input_letters(), products))

        def source(role: str, letter: str) -> Tensor:
            if letter == "-":
                return x
            if letter in proj:
                return self.gated(role, proj[letter], x)
            return products[-1]  # the latent c, from which this layer's K and V are up-projected

        return [source(role, letter) for role, letter in zip(ROLES, s.code)]

    def up_projected(self, c: Tensor) -> tuple:
        """A latent layer's c (B, Tk, R) -> k (B, Tk, width_k), v (B, Tk, width_v); one letter, one product."""
        letters = list(dict.fromkeys(self.spec.code[1:]))  # K's and V's letters, once each
        up = dict(zip(letters, ops.matmul_each(c, [self.weight(L) for L in letters])))
        return up[self.spec.code[1]], up[self.spec.code[2]]

    def positioned(self, t: Tensor, start: int) -> Tensor:
        """t (B, T, width) at positions start, start + 1, ...: turned by rotary positions, else as it is."""
        if self.spec.config.pos != "rope":
            return t
        return rope(t, np.arange(start, start + t.shape[1]), self.spec.config.head_dim)

    def weight(self, letter: str) -> Parameter:
        """The weight (C, width) of one letter of the code, shared by every role with that letter
        ((R, width) for a latent layer's K and V)."""
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

    def out_gates(self, x: Tensor) -> Tensor:
        """Output gates sigmoid(x W_g) (B, T, H) of the layer's input x (B, T, C): one number per head and token.

        Qiu et al. (2025) find an elementwise gate (W_g of C x C, one number per channel) best;
        this is their head-wise gate (C x H): one number scales a head's whole output, so the
        analysis can read which heads a token shuts, at n_head / n_embd of the parameters.
        """
        return ops.sigmoid(x @ self.w_out_gate)  # (B, T, C) @ (C, H) -> (B, T, H)

    def rotation(self) -> Tensor:
        """(kv_heads, hd, hd) orthogonal matrices: R = (I + A)^-1 (I - A), A = S - S^T skew."""
        S = self.rotation_param
        A = S - ops.swapaxes(S, -1, -2)
        eye = np.broadcast_to(np.eye(self.spec.config.head_dim, dtype=S.dtype), S.shape)
        return ops.solve(A + eye, eye - A)

    def split_heads(self, t: Tensor, n: int) -> Tensor:
        B, T, _ = t.shape
        return ops.transpose(t.reshape(B, T, n, self.spec.config.head_dim), (0, 2, 1, 3))  # (B, n, T, hd)

    def _extend_cache(self, cache: KVCache, k: Tensor, v: Tensor) -> tuple:
        shared = self.spec.k_and_v_share_cache()
        k_all, v_all = cache.append(k.data, None if shared else v.data)
        k_all = Tensor(k_all)
        return k_all, (k_all if shared else Tensor(v_all))

    def score_bias(self, past: int, T: int, first_key: int = 0) -> Tensor | None:
        """The bias (H, T, Tk) on the scores of T queries after `past` tokens over the keys at
        positions first_key .. past + T - 1: pos2d's learned one, ALiBi's fixed one, their sum, or None."""
        c = self.spec.config
        bias = None
        if c.pos2d:
            if past + T > c.block_size:
                raise ValueError(f"pos2d attention covers {c.block_size} positions; got {past + T}")
            bias = self.pos_bias[:, past:past + T, first_key:past + T]
        if c.pos == "alibi":
            distances = Tensor(alibi_bias(c.n_head, past, T, self.dtype)[:, :, first_key:])  # fixed: no gradient
            bias = distances if bias is None else bias + distances
        return bias

    def feature_map(self, t: Tensor) -> Tensor:
        """Linear attention's features of q or k (B, heads, T, hd) -> (B, heads, T, M)."""
        if self.spec.config.linear_features == 0:
            return linear_attention.elu_features(t)
        return linear_attention.performer_features(t, self.performer_projection)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x holds only the new tokens.

        attend runs the fused kernel, with no (T, Tk) matrix, unless dropout is active (see attend).
        """
        c = self.spec.config
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        q, k, v = self.project(x, cache)
        first_key = cache.start if cache is not None else 0  # a window's cache forgets older keys
        bias = self.score_bias(past, T, first_key)  # (H, T, Tk) or None
        if self.spec.linear:  # no weights to drop: attention dropout does not apply
            y = linear_attend(q, k, v, self.feature_map, cache)  # (B, T, C)
        else:
            y = attend(q, k, v, bias, self.attn_dropout, c.window)  # (B, T, C)
        if c.out_gate:
            B, H, hd = x.shape[0], c.n_head, c.head_dim
            gates = self.out_gates(x)  # (B, T, H)
            y = (y.reshape(B, T, H, hd) * gates.reshape(B, T, H, 1)).reshape(B, T, H * hd)
        if c.out_proj:
            y = y @ self.w_o
        return self.resid_dropout(y)
