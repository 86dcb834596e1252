"""The variant table: what each of the 15 codes costs at given sizes, with no training at all.

Figures come from AttentionSpec (attention.py): one layer's code read with a GPTConfig's sizes
(by default GPTConfig's own). MODEL_PRESETS give the shapes of well-known models so that
published claims can be checked, e.g. what dropping W_k saves in a 125M-parameter GPT-2.
"""

from __future__ import annotations

from ..model import GPTConfig, non_attention_params
from ..modifiers import ALL_CODES, names_of

# n_embd, n_head, n_layer, block_size (context), vocab_size, MLP hidden width
MODEL_PRESETS = {
    # minqkv's own model: GPTConfig's defaults, with its MLP of 4 x n_embd
    "char": dict(n_embd=GPTConfig.n_embd, n_head=GPTConfig.n_head, n_layer=GPTConfig.n_layer,
                 block_size=GPTConfig.block_size, vocab_size=GPTConfig.vocab_size,
                 mlp_hidden=GPTConfig().mlp_hidden),
    "gpt2-small": dict(n_embd=768, n_head=12, n_layer=12, block_size=1024, vocab_size=50257, mlp_hidden=3072),
    "gpt2-medium": dict(n_embd=1024, n_head=16, n_layer=24, block_size=1024, vocab_size=50257, mlp_hidden=4096),
    "bert-base": dict(n_embd=768, n_head=12, n_layer=12, block_size=512, vocab_size=30522, mlp_hidden=3072),
}


def variant_rows(n_embd: int = GPTConfig.n_embd, n_head: int = GPTConfig.n_head,
                 n_kv_head: int | None = GPTConfig.n_kv_head, block_size: int = GPTConfig.block_size,
                 n_layer: int = 1, vocab_size: int = 0, mlp_hidden: int = 0, codes=ALL_CODES,
                 **modifiers) -> list:
    """One dict per code: per-layer parameters, FLOPs and KV-cache floats, symmetry, and the
    change against canonical 'abc' with the same modifiers (GPTConfig fields such as pos='rope',
    out_gate=True, latent_kv=64). Codes that cannot take the sizes or modifiers are reported as
    errors, with the reason. With vocab_size, each row also counts a whole model of n_layer
    layers (vocab_size=0: attention only)."""
    rows, base = [], None
    for code in ["abc"] + [c for c in codes if c != "abc"]:
        try:
            spec = GPTConfig(code=code, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                             block_size=block_size, n_layer=1, **modifiers).attention_spec(0)
        except ValueError as e:
            rows.append({"code": code, "names": names_of(code), "error": str(e)})
            continue
        row = {
            "code": code,
            "names": names_of(code),
            "params_per_layer": spec.params(),
            "flops_per_token": spec.flops_per_token(),
            "kv_cache_floats_per_token": spec.kv_cache_floats_per_token(),
            "symmetric": spec.symmetric(),
        }
        if vocab_size:
            rest = non_attention_params(n_embd, n_layer, block_size, vocab_size, mlp_hidden, spec.config.pos)
            row["model_params"] = rest + n_layer * spec.params()
        base = base or row
        row["params_vs_canonical"] = row["params_per_layer"] / base["params_per_layer"] - 1
        if "model_params" in row:
            row["model_params_vs_canonical"] = row["model_params"] / base["model_params"] - 1
        rows.append(row)
    order = {code: i for i, code in enumerate(codes)}
    return sorted((r for r in rows if r["code"] in order), key=lambda r: order[r["code"]])


def preset_rows(name: str, n_kv_head: int | None = GPTConfig.n_kv_head, **modifiers) -> list:
    """variant_rows at the sizes of one of MODEL_PRESETS, the whole model counted."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}")
    return variant_rows(n_kv_head=n_kv_head, **MODEL_PRESETS[name], **modifiers)


def format_rows(rows: list) -> str:
    with_model = any("model_params" in r for r in rows)
    header = ["code", "names", "attn params/layer", "vs abc", "FLOPs/token/layer", "KV floats/token/layer",
              "symmetric"] + (["model params", "vs abc"] if with_model else [])
    table = [header]
    for r in rows:
        if "error" in r:
            table.append([r["code"], ", ".join(r["names"]), "not possible: " + r["error"]])
            continue
        line = [r["code"], ", ".join(r["names"]), f"{r['params_per_layer']:,}",
                f"{100 * r['params_vs_canonical']:+.1f}%", f"{r['flops_per_token']:,}",
                f"{r['kv_cache_floats_per_token']:,}", "yes" if r["symmetric"] else "no"]
        if with_model:
            line += [f"{r['model_params']:,}", f"{100 * r['model_params_vs_canonical']:+.1f}%"]
        table.append(line)
    widths = [max(len(row[i]) for row in table if i < len(row) and len(row) == len(header))
              for i in range(len(header))]
    lines = []
    for row in table:
        if len(row) != len(header):
            lines.append("  ".join(row))
            continue
        lines.append("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
