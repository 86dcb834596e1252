"""A small GPT that reads characters: GPTConfig -> GPT -> Block -> CausalSelfAttention.

Pre-LayerNorm decoder: token + position embeddings (or rotary positions inside attention, or
none at all), n_layer blocks of
(LayerNorm -> attention -> +residual -> LayerNorm -> MLP -> +residual), a final LayerNorm and
an output head that reuses the token embedding (weight tying, optional). Every block may use
its own code (a pruned gated model does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import modifiers, ops
from .attention import ROLES, AttentionSpec, CausalSelfAttention, KVCache, probability_open, weight_name
from .data import IGNORE
from .nn import MLP, Dropout, Embedding, LayerNorm, Module
from .tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (no grouping); 1: multi-query attention
    n_embd: int = 128
    dropout: float = 0.0
    code: str = "abc"  # every layer's code, or its name ('shared-kv') ...
    layer_codes: list | None = None  # ... or one code per layer (overrides code)
    rotate: bool = False
    pos2d: bool = False
    gate: bool = False
    wide_init: bool = False  # Q/K/V weights at init: std 1/sqrt(n_embd) instead of GPT-2's 0.02
    sym_init: bool = False  # W_k starts as a copy of W_q (scores start symmetric); they train apart
    out_proj: bool = True
    pos: str = "learned"  # 'learned' absolute positions (a table), 'rope' (rotary), 'alibi' or 'none'
    out_gate: bool = False  # a sigmoid gate per head on the attention output (Qiu et al. 2025)
    latent_kv: int | None = None  # R: K and V up-projected from a latent of width R, which is all the cache holds
    window: int | None = None  # W: each query sees only its last W keys (sliding-window attention)
    linear_features: int | None = None  # None: softmax attention; 0: linear attention, elu + 1; M: Performer, M features
    tie_weights: bool = True
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        self.code = modifiers.parse_code(self.code)
        if self.layer_codes is not None:
            self.layer_codes = [modifiers.parse_code(code) for code in self.layer_codes]
            if len(self.layer_codes) != self.n_layer:
                raise ValueError(f"layer_codes has {len(self.layer_codes)} codes "
                                 f"but n_layer={self.n_layer}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("vocab_size", "block_size", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd <= 0 or self.n_head <= 0 or self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a positive multiple of n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                             "(each group of query heads shares one key/value head)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {', '.join(map(repr, POSITIONS))}, got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"pos='rope' turns pairs of dimensions in each head, so the head width "
                             f"n_embd / n_head = {self.head_dim} must be even")
        _check_whole_number("latent_kv", self.latent_kv, 1, "the width R of the latent")
        _check_whole_number("window", self.window, 1, "the keys W each query sees, itself included")
        _check_whole_number("linear_features", self.linear_features, 0,
                            "0 for linear attention with elu + 1 features, M for M random features")
        if self.latent_kv is not None and self.latent_kv > self.n_embd:
            raise ValueError(f"latent_kv={self.latent_kv} is wider than n_embd={self.n_embd}: the latent "
                             "c = x W_down stands in for x, from which K and V are computed, and its rank "
                             "is at most n_embd, so a wider one adds weights and cached floats, not "
                             "information; use latent_kv <= n_embd")
        for layer in range(self.n_layer):
            self.attention_spec(layer)  # fails early, with the reason, on a code the heads cannot take

    @property
    def head_dim(self) -> int:
        """Width of one head, hd = C / n_head."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None (no grouping)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP's hidden layer: 4 C, as in GPT-2."""
        return 4 * self.n_embd

    @property
    def residual_init_std(self) -> float:
        """GPT-2's scaled init of the projections that write into the residual stream."""
        return 0.02 / math.sqrt(2 * self.n_layer)

    def code_of(self, layer: int) -> str:
        return self.layer_codes[layer] if self.layer_codes is not None else self.code

    def attention_spec(self, layer: int) -> AttentionSpec:
        return AttentionSpec(self.code_of(layer), self)

    def variant_label(self) -> str:
        """The variant: the code (or the distinct per-layer codes joined by '/') and its modifiers,
        e.g. 'abb+rotate+gqa2' (modifiers.py has the table)."""
        return modifiers.label(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def overrides_from_label(label: str) -> dict:
        """The inverse of variant_label(): 'shared-kv+rotate+gqa2' -> {code: 'abb', rotate: True,
        n_kv_head: 2}; 'abc+rope+out-gate+latent-kv32' -> {code: 'abc', pos: 'rope', out_gate: True,
        latent_kv: 32}. Each setting once: 'abc+rope+no-pos' is refused (see modifiers.py)."""
        return modifiers.parse(label)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """The config saved by to_dict(); the keys 'variant' and 'layer_variants' are read as
        'code' and 'layer_codes' (KEY_ALIASES), and a missing field takes its default."""
        return cls(**{KEY_ALIASES.get(key, key): value for key, value in d.items()})


KEY_ALIASES = {"variant": "code", "layer_variants": "layer_codes"}  # saved configs may use these names
POSITIONS = ("learned", "rope", "alibi", "none")
# positions no table holds: a model with them reads sequences longer than block_size (unless pos2d)
TABLE_FREE_POSITIONS = ("rope", "alibi", "none")


def _check_whole_number(name: str, value, least: int, meaning: str) -> None:
    """None (not set) or a whole number >= least; a bool is not a number here."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise ValueError(f"{name} must be a whole number >= {least} ({meaning}), got {value!r}")


def non_attention_params(n_embd: int, n_layer: int, block_size: int, vocab_size: int,
                         mlp_hidden: int, pos: str = "learned") -> int:
    """Embeddings (tied output head), MLPs with biases, and LayerNorms: the part no code touches
    (only the positions: a learned table has block_size x n_embd entries, rotary ones none)."""
    embeddings = vocab_size * n_embd + (block_size * n_embd if pos == "learned" else 0)
    mlp = 2 * n_embd * mlp_hidden + mlp_hidden + n_embd
    layer_norms = 2 * 2 * n_embd
    return embeddings + n_layer * (mlp + layer_norms) + 2 * n_embd


def parameter_count(config: GPTConfig) -> int:
    """The parameters GPT(config) has, counted from the sizes alone (nothing is allocated)."""
    attention = sum(config.attention_spec(layer).params() for layer in range(config.n_layer))
    rest = non_attention_params(config.n_embd, config.n_layer, config.block_size, config.vocab_size,
                                config.mlp_hidden, config.pos)
    output_head = 0 if config.tie_weights else config.vocab_size * config.n_embd
    return attention + rest + output_head


class Block(Module):
    def __init__(self, config: GPTConfig, layer: int, dtype, rng, dropout_rng, gate_rng):
        C = config.n_embd
        self.ln_1 = LayerNorm(C, dtype=dtype)
        self.attn = CausalSelfAttention(config.attention_spec(layer), dtype, rng, dropout_rng, gate_rng)
        self.ln_2 = LayerNorm(C, dtype=dtype)
        self.mlp = MLP(C, config.mlp_hidden, config.dropout, dtype, rng,
                       proj_std=config.residual_init_std, dropout_rng=dropout_rng)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class GPT(Module):
    def __init__(self, config: GPTConfig):
        self.config = config
        dtype = np.dtype(config.dtype)
        rng = np.random.default_rng(config.seed)
        # dropout draws from its own generator, saved with checkpoints so resumes are exact
        self.dropout_rng = np.random.default_rng(config.seed + 1)
        self.gate_rng = np.random.default_rng(config.seed + 2)  # the gates' noise, saved likewise
        self.token_embedding = Embedding(config.vocab_size, config.n_embd, dtype, rng)
        if config.pos == "learned":  # rotary positions live in the attention; 'none' has none
            self.position_embedding = Embedding(config.block_size, config.n_embd, dtype, rng)
        self.drop = Dropout(config.dropout, self.dropout_rng)
        self.blocks = [Block(config, i, dtype, rng, self.dropout_rng, self.gate_rng)
                       for i in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd, dtype=dtype)
        if not config.tie_weights:
            self.output_embedding = Embedding(config.vocab_size, config.n_embd, dtype, rng)  # (V, C)

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None, caches: list | None = None):
        """ids (B, T) ints -> logits (B, T, V), and the mean cross-entropy if targets are given.

        With caches (one KVCache per block), ids are only the new tokens after the cached ones.
        """
        x = self.features(ids, caches)  # (B, T, C)
        logits = self.head(x)  # (B, T, V)
        loss = ops.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def features(self, ids: np.ndarray, caches: list | None = None) -> Tensor:
        """ids (B, T) -> the final layer norm's output (B, T, C), what the output head reads."""
        x = self.embed(ids, caches[0].length if caches else 0)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        return self.ln_f(x)

    def head(self, x: Tensor) -> Tensor:
        """x (..., C) -> logits (..., V) over the vocabulary."""
        head = self.token_embedding.weight if self.config.tie_weights else self.output_embedding.weight  # (V, C)
        return x @ ops.swapaxes(head, 0, 1)  # (..., C) @ (C, V) -> (..., V)

    def scored_logits(self, ids: np.ndarray, targets: np.ndarray) -> tuple:
        """ids, targets (B, T) -> logits (N, V) of the N positions whose target is not ignored
        (negative), and those targets (N,).

        Only those rows go through the output head: a task scores its answers alone (MQAR one
        token in 16), and the head of a large vocabulary (8192) is most of a step's work. When every
        position counts (text), this is forward's computation, row for row.
        """
        targets = np.asarray(targets)
        scored = targets != IGNORE  # (B, T)
        if scored.all():
            logits, _ = self.forward(ids)  # (B, T, V)
            return ops.reshape(logits, targets.size, logits.shape[-1]), targets.reshape(-1)
        rows = np.nonzero(scored)  # integer indices: each row once, in order
        x = ops.getitem(self.features(ids), rows)  # (N, C)
        return self.head(x), targets[rows]  # (N, V), (N,)

    def loss(self, ids: np.ndarray, targets: np.ndarray) -> Tensor:
        """The mean cross-entropy over the scored positions, the same value as forward's; the
        output head runs only on those positions (see scored_logits)."""
        logits, scored_targets = self.scored_logits(ids, targets)
        return ops.cross_entropy(logits, scored_targets)

    def embed(self, ids: np.ndarray, past: int = 0) -> Tensor:
        """ids (B, T) ints at positions past .. past + T - 1 -> x (B, T, C), the first block's input."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, T), got {ids.shape}")
        T = ids.shape[1]
        # a position table (or pos2d's bias) has block_size rows; other positions extend past it
        if past + T > self.config.block_size and (self.config.pos == "learned" or self.config.pos2d):
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size="
                             f"{self.config.block_size}")
        x = self.token_embedding(ids)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.position_embedding(np.arange(past, past + T))  # (B, T, C) + (T, C)
        return self.drop(x)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token at full context: attention layers, MLPs and the output head."""
        c = self.config
        attention = sum(block.attn.spec.flops_per_token() for block in self.blocks)
        return attention + c.n_layer * 2 * (2 * c.n_embd * c.mlp_hidden) + 2 * c.n_embd * c.vocab_size

    def gates(self) -> dict:
        """{(layer, role): deterministic gate in [0, 1]} for a gated model (0: shut, 1: open)."""
        return {(i, role): block.attn.gate_value(role)
                for i, block in enumerate(self.blocks) for role in block.attn.spec.gated_roles()}

    def gate_penalty(self) -> Tensor | None:
        """Expected number of open gates, sum of P(z > 0): weighted into the loss, it shuts unneeded
        projections (the role becomes x)."""
        opens = [probability_open(getattr(b.attn, f"gate_{r}")) for b in self.blocks
                 for r in b.attn.spec.gated_roles()]
        return ops.sum(ops.concat(opens)) if opens else None

    def projections_kept(self) -> int:
        """Q/K/V weight matrices the layers apply (a tied matrix once): a pruned model's budget."""
        return sum(len(set(self.config.code_of(i)) - {"-"}) for i in range(self.config.n_layer))

    def new_caches(self) -> list:
        return [KVCache(self.config.window) for _ in self.blocks]

    def generate(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """Continue ids (B, T) by sampling, each token conditioned on the last block_size tokens.

        temperature: any positive finite number (a tiny one samples the most likely token);
        top_k: keep only the k most likely tokens (None: all).
        """
        _check_sampling(ids, max_new_tokens, temperature, top_k)
        rng = rng if rng is not None else np.random.default_rng()
        ids = np.asarray(ids, dtype=np.int64)
        with no_grad(), self.evaluating():
            caches = self.new_caches()
            for _ in range(max_new_tokens):
                if ids.shape[1] <= self.config.block_size:  # it fits: feed only what the caches have not seen
                    logits, _ = self.forward(ids[:, caches[0].length:], caches=caches)
                else:
                    # nanoGPT's crop: every position shifts as the window slides, so the cached keys and
                    # values no longer apply; recompute the last block_size tokens in full
                    logits, _ = self.forward(ids[:, -self.config.block_size:])
                next_id = _sample_logits(logits.data[:, -1, :], temperature, top_k, rng)  # (B, 1)
                ids = np.concatenate([ids, next_id], axis=1)
        return ids

    def prune(self, threshold: float = 0.0) -> "GPT":
        """A static model from a gated one, read from the deterministic gates z.

        z <= threshold (by default z == 0): the role becomes x; z == 1: the plain weight W;
        in between: x (z W + (1 - z) I), the folded projection. With the default threshold the
        pruned model computes what the gated one did at evaluation. Each layer gets its own code;
        roles that shared a weight stay tied only if their gates were equal.
        """
        if not self.config.gate:
            raise ValueError("prune() needs a model trained with gate=True")
        codes, weights = [], []
        for block in self.blocks:
            code, w = _pruned_layer(block.attn, threshold)
            codes.append(code)
            weights.append(w)
        pruned = GPT(replace(self.config, gate=False, layer_codes=codes))
        own = dict(self.named_parameters())
        for name, param in pruned.named_parameters():
            layer_weight = _layer_weight(name, weights)
            np.copyto(param.writable_data(), layer_weight if layer_weight is not None else own[name].data)
        pruned.dropout_rng.bit_generator.state = self.dropout_rng.bit_generator.state
        pruned.gate_rng.bit_generator.state = self.gate_rng.bit_generator.state
        return pruned


def _check_sampling(ids, max_new_tokens, temperature, top_k) -> None:
    shape = np.shape(ids)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"ids must have shape (B, T) with at least one row and one token to continue, "
                         f"got {shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not 0 < temperature < math.inf:  # also refuses nan
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))):
        raise TypeError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")


def _sample_logits(logits: np.ndarray, temperature: float, top_k, rng) -> np.ndarray:
    """logits (B, V) -> one sampled id per row (B, 1)."""
    if not np.isfinite(logits).all():
        raise RuntimeError("the model's logits are not all finite (NaN or inf): its weights hold "
                           "NaN or inf, e.g. from a run that diverged; nothing can be sampled")
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)  # <= 0, the most likely token at 0
    with np.errstate(over="ignore"):
        # a tiny temperature sends every other token to -inf: exp gives 0 there, and the most
        # likely token (or the tied ones) is drawn for sure, which is greedy decoding
        z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)  # (B, V) float64, max 1 (the most likely token's z is 0); the -inf of top-k become 0
    p /= p.sum(axis=-1, keepdims=True)  # softmax: z already had its row maximum subtracted
    return np.array([[rng.choice(len(row), p=row)] for row in p], dtype=np.int64)


def _pruned_layer(attn: CausalSelfAttention, threshold: float) -> tuple:
    """(new code, {weight name: matrix}) for one gated attention layer.

    Each role reads a source: None (identity), or (letter, gate) - a weight and the gate folded
    into it. Roles with equal sources keep one weight; the new code names the sources in order.
    """
    spec = attn.spec
    sources = []
    for role, letter in zip(ROLES, spec.code):
        gate = attn.gate_value(role) if role in spec.gated_roles() else None
        dropped = letter == "-" or (gate is not None and gate <= threshold)
        plain = gate is None or gate == 1.0  # an open gate leaves the weight as it is
        sources.append(None if dropped else (letter, None if plain else gate))
    distinct = list(dict.fromkeys(src for src in sources if src is not None))
    code = "".join("-" if src is None else "abc"[distinct.index(src)] for src in sources)
    weights = {}
    for src in distinct:
        roles = "".join(role for role, s in zip(ROLES, sources) if s == src)
        w = attn.weight(src[0]).data
        folded = w if src[1] is None else attn.folded_weight(roles[0]).astype(w.dtype)
        weights[weight_name(roles, spec.latent)] = folded
    return code, weights


def _layer_weight(name: str, weights: list):
    """The pruned projection for a parameter name like 'blocks.2.attn.w_kv', else None."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn" and parts[3] in weights[int(parts[1])]:
        return weights[int(parts[1])][parts[3]]
    return None
