"""A small GPT that reads characters: GPTConfig -> GPT -> Block -> CausalSelfAttention.

Pre-LayerNorm decoder: token + position embeddings, n_layer blocks of
(LayerNorm -> attention -> +residual -> LayerNorm -> MLP -> +residual), a final LayerNorm and
an output head that reuses the token embedding (weight tying, optional). Every block may use
its own attention variant (a pruned gated model does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import ops
from .attention import AttentionShape, CausalSelfAttention, KVCache, canonical_code, parse_variant
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
    variant: str = "abc"  # a code or name for every layer ...
    layer_variants: list | None = None  # ... or one code per layer (overrides variant)
    rotate: bool = False
    pos2d: bool = False
    gate: bool = False
    out_proj: bool = True
    tie_weights: bool = True
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        self.variant = parse_variant(self.variant)
        if self.layer_variants is not None:
            self.layer_variants = [parse_variant(v) for v in self.layer_variants]
            if len(self.layer_variants) != self.n_layer:
                raise ValueError(f"layer_variants has {len(self.layer_variants)} codes "
                                 f"but n_layer={self.n_layer}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("vocab_size", "block_size", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for layer in range(self.n_layer):
            self.attention_shape(layer)  # fails early, with the reason, on an impossible variant

    def code_of(self, layer: int) -> str:
        return self.layer_variants[layer] if self.layer_variants is not None else self.variant

    def attention_shape(self, layer: int) -> AttentionShape:
        return AttentionShape(code=self.code_of(layer), n_embd=self.n_embd, n_head=self.n_head,
                              n_kv_head=self.n_kv_head, rotate=self.rotate, pos2d=self.pos2d,
                              gate=self.gate, out_proj=self.out_proj, block_size=self.block_size)

    def describe(self) -> str:
        """The variant with its modifiers, e.g. 'abb+rotate+gqa2'."""
        codes = sorted(set(self.code_of(i) for i in range(self.n_layer)))
        name = "/".join(codes) if self.layer_variants is not None else self.variant
        kv = self.n_kv_head if self.n_kv_head is not None else self.n_head
        mods = [m for m in ("rotate", "pos2d", "gate") if getattr(self, m)]
        if kv != self.n_head:
            mods.append("mqa" if kv == 1 else f"gqa{kv}")
        if not self.out_proj:
            mods.append("no-out-proj")
        return "+".join([name] + mods)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def overrides_from_label(label: str) -> dict:
        """The inverse of describe(): 'shared-kv+rotate+gqa2' -> {variant: 'abb', rotate: True, n_kv_head: 2}."""
        name, *mods = label.strip().split("+")
        overrides: dict = {"variant": parse_variant(name)}
        for mod in mods:
            if mod in ("rotate", "pos2d", "gate"):
                overrides[mod] = True
            elif mod == "mqa":
                overrides["n_kv_head"] = 1
            elif mod.startswith("gqa") and mod[3:].isdigit() and int(mod[3:]) > 0:
                overrides["n_kv_head"] = int(mod[3:])
            elif mod == "no-out-proj":
                overrides["out_proj"] = False
            else:
                raise ValueError(f"unknown modifier {mod!r} in {label!r}: use rotate, pos2d, gate, "
                                 "mqa, gqaN (N key/value heads) or no-out-proj, e.g. 'abb+rotate+gqa2'")
        return overrides

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**d)


class Block(Module):
    def __init__(self, config: GPTConfig, layer: int, dtype, rng, dropout_rng):
        C = config.n_embd
        self.ln_1 = LayerNorm(C, dtype=dtype)
        self.attn = CausalSelfAttention(config.attention_shape(layer), config.dropout, dtype,
                                        rng, dropout_rng, n_layer=config.n_layer)
        self.ln_2 = LayerNorm(C, dtype=dtype)
        self.mlp = MLP(C, 4 * C, config.dropout, dtype, rng,
                       proj_std=0.02 / math.sqrt(2 * config.n_layer), dropout_rng=dropout_rng)

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
        self.token_embedding = Embedding(config.vocab_size, config.n_embd, dtype, rng)
        self.position_embedding = Embedding(config.block_size, config.n_embd, dtype, rng)
        self.drop = Dropout(config.dropout, self.dropout_rng)
        self.blocks = [Block(config, i, dtype, rng, self.dropout_rng) for i in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd, dtype=dtype)
        if not config.tie_weights:
            self.output_embedding = Embedding(config.vocab_size, config.n_embd, dtype, rng)  # (V, C)

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None, caches: list | None = None):
        """ids (B, T) ints -> logits (B, T, V), and the mean cross-entropy if targets are given.

        With caches (one KVCache per block), ids are only the new tokens after the cached ones.
        """
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, T), got {ids.shape}")
        B, T = ids.shape
        past = caches[0].length if caches else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size="
                             f"{self.config.block_size}")
        positions = np.arange(past, past + T)
        x = self.drop(self.token_embedding(ids) + self.position_embedding(positions))  # (B, T, C) + (T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        x = self.ln_f(x)
        head = self.token_embedding.weight if self.config.tie_weights else self.output_embedding.weight  # (V, C)
        logits = x @ ops.swapaxes(head, 0, 1)  # (B, T, C) @ (C, V) -> (B, T, V)
        loss = ops.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def flops_per_token(self) -> int:
        """Forward FLOPs per token at full context: attention layers, MLPs and the output head."""
        c = self.config
        attention = sum(block.attn.shape.flops_per_token() for block in self.blocks)
        return attention + c.n_layer * 2 * (2 * c.n_embd * 4 * c.n_embd) + 2 * c.n_embd * c.vocab_size

    def gates(self) -> dict:
        """{(layer, role): gate value in (0, 1)} for a gated model."""
        return {(i, role): float(block.attn.gate(role).data[0])
                for i, block in enumerate(self.blocks) for role in block.attn.shape.gated_roles()}

    def gate_penalty(self) -> Tensor | None:
        """Sum of all gates: weighted into the loss, it pushes unneeded projections to the identity."""
        gates = [b.attn.gate(r) for b in self.blocks for r in b.attn.shape.gated_roles()]
        return ops.sum(ops.concat(gates)) if gates else None

    def new_caches(self) -> list:
        return [KVCache() for _ in self.blocks]

    def generate(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """Continue ids (B, T) by sampling, one token at a time through the KV cache."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        rng = rng if rng is not None else np.random.default_rng()
        ids = np.asarray(ids, dtype=np.int64)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                return self._sample(ids, max_new_tokens, temperature, top_k, rng)
        finally:
            self.train(was_training)

    def _sample(self, ids, max_new_tokens, temperature, top_k, rng):
        window = self.config.block_size
        caches, pending = None, ids
        for _ in range(max_new_tokens):
            if caches is None:  # first fill: as much of the prompt as fits
                caches, pending = self.new_caches(), ids[:, -window:]
            elif caches[0].length + pending.shape[1] > window:
                # the window is full: refill the cache from the most recent half window
                caches, pending = self.new_caches(), ids[:, -max(1, window // 2):]
            logits, _ = self.forward(pending, caches=caches)
            next_id = _sample_logits(logits.data[:, -1, :], temperature, top_k, rng)  # (B, 1)
            ids = np.concatenate([ids, next_id], axis=1)
            pending = next_id
        return ids

    def prune(self, threshold: float = 0.5) -> "GPT":
        """A static model from a gated one: gate < threshold -> identity, else the folded projection.

        A kept role becomes x (g W + (1 - g) I), exactly what the gated model computed; a dropped
        role becomes x. Each layer gets its own code; roles that shared a weight stay tied only if
        their gates were equal.
        """
        if not self.config.gate:
            raise ValueError("prune() needs a model trained with gate=True")
        codes, weights = [], []
        for block in self.blocks:
            code, w = _pruned_layer(block.attn, threshold)
            codes.append(code)
            weights.append(w)
        config = replace(self.config, gate=False, layer_variants=codes)
        pruned = GPT(config)
        own = dict(self.named_parameters())
        for name, param in pruned.named_parameters():
            layer_weight = _layer_weight(name, weights)
            np.copyto(param.data, layer_weight if layer_weight is not None else own[name].data)
        pruned.dropout_rng.bit_generator.state = self.dropout_rng.bit_generator.state
        return pruned


def _sample_logits(logits: np.ndarray, temperature: float, top_k, rng) -> np.ndarray:
    """logits (B, V) -> one sampled id per row (B, 1)."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([[rng.choice(len(row), p=row)] for row in p], dtype=np.int64)


def _pruned_layer(attn: CausalSelfAttention, threshold: float) -> tuple:
    """(new code, {role-group weight name: matrix}) for one gated attention layer."""
    s = attn.shape
    eye = np.eye(s.n_embd)
    matrices, labels = {}, []
    for role, letter in zip("qkv", s.code):
        if letter == "-":
            labels.append("-")
            continue
        w = getattr(attn, s.weight_name(letter)).data
        if role in s.gated_roles():
            g = float(attn.gate(role).data[0])
            if g < threshold:
                labels.append("-")
                continue
            w = (g * w + (1 - g) * eye).astype(w.dtype)  # fold: g xW + (1-g) x = x (gW + (1-g)I)
            label = (letter, g)
        else:
            label = (letter, None)
        labels.append(label)
        matrices.setdefault(label, w)
    letters = {label: "abc"[i] for i, label in enumerate(dict.fromkeys(l for l in labels if l != "-"))}
    code = canonical_code("".join("-" if l == "-" else letters[l] for l in labels))
    roles_for = {}
    for role, label in zip("qkv", labels):
        if label != "-":
            roles_for.setdefault(label, "")
            roles_for[label] += role
    return code, {"w_" + roles: matrices[label] for label, roles in roles_for.items()}


def _layer_weight(name: str, weights: list):
    """The pruned projection for a parameter name like 'blocks.2.attn.w_kv', else None."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn" and parts[3] in weights[int(parts[1])]:
        return weights[int(parts[1])][parts[3]]
    return None
