"""What a trained model did with its projections: rank, shared subspaces, symmetric scores.

Three questions about each layer, each answered from the weights or from held-out text:

1. How many directions does each projection use? The singular values of W (C, width), their
   effective rank (Roy & Vetterli 2007) and how many of them hold 90% of the energy.
2. Do W_q, W_k and W_v read the same directions of the input? Principal angles between the
   top-r left-singular subspaces of two projections (subspaces of the C-dim input space),
   next to the same figure for random subspaces of the same sizes, the baseline to beat.
3. How far from symmetric are the attention scores S = Q K^T / sqrt(hd)? Variants whose Q and
   K are one tensor are symmetric by construction; the others may still learn to be.
4. Does a token's query prefer the key of an equal token? The match margin: with every token's
   embedding as input, the score of the same token minus the mean score of the others, in
   logits. Recall tasks need it large; identity Q and K have it for free (README, recall).

For every model it reports the attention sink: the attention mass on position 0, which
models learn to park unneeded attention on (compare with and without output gates). For a
model with output gates it reports their mean and how many are nearly shut; for a gated model
the gates and the per-layer codes that prune() would keep. Everything returned is plain JSON
(dicts, lists, floats, strings).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..attention import ROLES, CausalSelfAttention, scores_and_weights
from ..checkpoint import load_model
from ..data import load_corpus
from ..tensor import Tensor, no_grad

RANDOM_BASELINE_DRAWS = 16  # random subspace pairs averaged for the baseline
TOP_SINGULAR_VALUES_SHOWN = 6  # in the text report
NEARLY_SHUT = 0.1  # an output gate below this counts as (nearly) shut


# ---- the math --------------------------------------------------------------------------


def effective_rank(s) -> float:
    """exp of the entropy of the normalised singular values: n for n equal ones, 1 for rank one."""
    s = np.abs(np.asarray(s, dtype=np.float64))
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    # erank = exp(H(p)), H(p) = -sum p_i log p_i, p_i = s_i / sum_j s_j   (Roy & Vetterli 2007)
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(s, fraction: float = 0.9) -> int:
    """How many of the largest singular values hold `fraction` of the energy sum(s^2)."""
    energy = np.sort(np.asarray(s, dtype=np.float64) ** 2)[::-1]
    if energy.sum() == 0:
        return 0
    cumulative = np.cumsum(energy) / energy.sum()
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def principal_cosines(A, B) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of A (n, p) and B (n, q).

    Returns min(p, q) values in [0, 1], largest first: 1 for a shared direction, 0 for orthogonal.
    """
    Qa, _ = np.linalg.qr(np.asarray(A, dtype=np.float64))  # (n, p) orthonormal basis
    Qb, _ = np.linalg.qr(np.asarray(B, dtype=np.float64))  # (n, q)
    # cos(theta_i) = sigma_i(Qa^T Qb)   (Bjorck & Golub 1973)
    return np.clip(np.linalg.svd(Qa.T @ Qb, compute_uv=False), 0.0, 1.0)


@lru_cache(maxsize=None)
def random_subspace_cosine(n: int, p: int, q: int, draws: int = RANDOM_BASELINE_DRAWS,
                           seed: int = 0) -> float:
    """Mean principal cosine of two random subspaces of dims p and q in R^n (fixed seed)."""
    rng = np.random.default_rng(seed)
    means = [principal_cosines(rng.standard_normal((n, p)), rng.standard_normal((n, q))).mean()
             for _ in range(draws)]
    return float(np.mean(means))


def score_asymmetry(scores) -> float:
    """||S - S^T||_F / (2 ||S||_F) for each (T, T) matrix of scores (..., T, T), averaged.

    0 for a symmetric S, 1 for an antisymmetric one, about 0.7 for independent random entries.
    """
    S = np.asarray(scores, dtype=np.float64)
    difference = np.linalg.norm(S - np.swapaxes(S, -1, -2), axis=(-2, -1))  # (...,)
    size = np.linalg.norm(S, axis=(-2, -1))
    return float(np.mean(difference / (2 * np.maximum(size, np.finfo(np.float64).tiny))))


def sink_mass(weights) -> float:
    """Mean attention weight on position 0 of the queries after it: weights (..., T, T) causal.

    Query 0 is left out, as it can only attend to itself."""
    return float(np.mean(np.asarray(weights, dtype=np.float64)[..., 1:, 0]))


def uniform_sink_mass(T: int) -> float:
    """sink_mass of attention spread evenly over the visible keys: mean of 1 / (t + 1), t = 1 .. T-1."""
    return float(np.mean(1.0 / np.arange(2, T + 1))) if T > 1 else 0.0


# ---- one layer -------------------------------------------------------------------------


def role_weight(attn: CausalSelfAttention, role: str):
    """The learned weight (C, width) that produces role 'q', 'k' or 'v' from x; None for an identity
    role. A latent layer's K and V: the product W_down W_up, through the latent."""
    letter = attn.spec.code[ROLES.index(role)]
    if letter == "-":
        return None
    if letter in attn.spec.input_letters():
        return attn.weight(letter).data
    return attn.w_kv_down.data @ attn.weight(letter).data  # (C, R) @ (R, width)


def projection_matrices(attn: CausalSelfAttention) -> dict:
    """{name: matrix}: each weight once ('w_kv' serves K and V; a latent layer's W_down (C, R) and
    up-projections (R, width)), and for every gated role, and a latent layer's K and V, the
    (C, width) matrix it effectively applies to x (named 'effective_q', 'effective_kv', ...)."""
    spec = attn.spec
    matrices = {spec.weight_name(letter): attn.weight(letter).data for letter in spec.letters()}
    if spec.latent:
        matrices["w_kv_down"] = attn.w_kv_down.data
        for letter in dict.fromkeys(spec.code[1:]):
            roles = spec.roles_of(letter)
            matrices[f"effective_{roles}"] = role_weight(attn, roles[0])
    for role in spec.gated_roles():
        matrices[f"effective_{role}"] = attn.folded_weight(role)
    return matrices


def describe_matrix(w) -> dict:
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    return {"shape": list(w.shape), "singular_values": s.tolist(),
            "effective_rank": effective_rank(s), "rank90": energy_rank(s, 0.9)}


def role_overlaps(attn: CausalSelfAttention, subspace_dim: int | None = None) -> list:
    """Subspace overlap of every pair of projected roles, from their raw weights.

    The subspace of a role is spanned by the top-r left-singular vectors of its W (C, width):
    the input directions that the projection reads. r is subspace_dim, or else the smaller of
    the two effective ranks, rounded. Roles that share one weight are 'tied' (their overlap
    comes out 1); identity roles read the whole input space and are left out.
    """
    code = attn.spec.code
    overlaps = []
    for a, b in (("q", "k"), ("q", "v"), ("k", "v")):
        wa, wb = role_weight(attn, a), role_weight(attn, b)
        if wa is None or wb is None:
            continue
        letter = code[ROLES.index(a)]
        tied = letter == code[ROLES.index(b)]
        Ua, sa, _ = np.linalg.svd(wa.astype(np.float64), full_matrices=False)  # Ua (C, min(C, width))
        Ub, sb, _ = np.linalg.svd(wb.astype(np.float64), full_matrices=False)
        r = subspace_dim if subspace_dim is not None else round(min(effective_rank(sa), effective_rank(sb)))
        r = max(1, min(r, Ua.shape[1], Ub.shape[1]))
        cosines = principal_cosines(Ua[:, :r], Ub[:, :r])
        flat_cos = None
        if wa.shape == wb.shape:
            cos = wa.ravel() @ wb.ravel() / (np.linalg.norm(wa) * np.linalg.norm(wb))
            flat_cos = float(np.clip(cos, -1.0, 1.0))  # a cosine; rounding may step just past 1
        overlaps.append({"a": a, "b": b, "tied": tied, "weight": attn.spec.weight_name(letter) if tied else None,
                         "dim": r, "mean_cos": float(cosines.mean()),
                         "random_baseline_mean_cos": random_subspace_cosine(wa.shape[0], r, r),
                         "flat_cos": flat_cos})
    return overlaps


# ---- the whole model -------------------------------------------------------------------


def attention_maps(model, ids) -> list:
    """One (scores, weights, out_gates) triple per layer for ids (B, T), dropout off.

    Block by block, each layer's own project() gives q and k of its input, and
    scores_and_weights() their scores (B, H, T, T), before the causal mask and the softmax, and
    weights after; out_gates (B, T, H) are the output gates, None without them. The block itself
    then runs as in the model's forward (the fused kernel) and gives the next layer its input.
    """
    maps = []
    with no_grad(), model.evaluating():
        x = model.embed(ids)  # (B, T, C)
        for block in model.blocks:
            attn, attn_input = block.attn, block.ln_1(x)  # (B, T, C)
            q, k, _ = attn.project(attn_input)  # (B, H, T, hd), (B, Hkv, T, hd)
            scores, weights = scores_and_weights(q, k, attn.score_bias(0, x.shape[1]))  # (B, H, T, T) each
            gates = attn.out_gates(attn_input).data if attn.spec.config.out_gate else None  # (B, T, H)
            maps.append((scores.data, weights.data, gates))
            x = block(x)
    return maps


def attention_weights(model, ids) -> list:
    """Softmax attention weights with the causal mask, one (B, H, T, T) array per layer."""
    return [weights for _, weights, _ in attention_maps(model, ids)]


def match_margins(model) -> list:
    """Per layer, the match margin of each head: mean over tokens of S[i, i] - mean_j!=i S[i, j],
    S = Q K^T / sqrt(hd) with the token embeddings (after the layer's LayerNorm) as the input.

    Every token sits at position 0 (rotary positions turn nothing there), so only content counts.
    Layer 0 sees exactly these inputs; deeper layers see them plus what earlier layers added.
    """
    margins = []
    with no_grad(), model.evaluating():
        tokens = Tensor(model.token_embedding.weight.data[:, None])  # (V, 1, C): V sequences of one token
        for block in model.blocks:
            q, k, _ = block.attn.project(block.ln_1(tokens))  # (V, H, 1, hd), (V, Hkv, 1, hd)
            q, k = q.data[:, :, 0].swapaxes(0, 1), k.data[:, :, 0].swapaxes(0, 1)  # (H, V, hd), (Hkv, V, hd)
            k = np.repeat(k, q.shape[0] // k.shape[0], axis=0)  # a key head per query head (GQA)
            scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (H, V, V)
            V = scores.shape[-1]
            same = np.trace(scores, axis1=1, axis2=2) / V
            others = (scores.sum(axis=(1, 2)) - same * V) / (V * (V - 1))
            margins.append([float(m) for m in same - others])
    return margins


def analyze_model(model, batches, subspace_dim: int | None = None,
                  prune_threshold: float = 0.0) -> dict:
    """Rank, subspace overlap and score symmetry of every layer; batches: [(x, y), ...] ids (B, T)."""
    if not batches:
        raise ValueError("analyze_model needs at least one (x, y) batch of token ids to measure "
                         "score symmetry, e.g. corpus.eval_batches('val', 8, block_size, 2)")
    asymmetry, sink, gates = ([[] for _ in model.blocks] for _ in range(3))
    for x, _ in batches:
        for layer, (scores, weights, out_gates) in enumerate(attention_maps(model, x)):
            asymmetry[layer].append(score_asymmetry(scores))  # scores (B, H, T, T)
            sink[layer].append(sink_mass(weights))
            gates[layer].append(out_gates)  # (B, T, H) or None
    T = batches[0][0].shape[1]
    layers = [_analyze_layer(i, block.attn, float(np.mean(asymmetry[i])), subspace_dim)
              for i, block in enumerate(model.blocks)]
    for layer, report in enumerate(layers):
        report.update(sink_mass=float(np.mean(sink[layer])), uniform_sink_mass=uniform_sink_mass(T))
        if model.config.out_gate:
            report["out_gates"] = describe_out_gates(np.stack(gates[layer]))
    for layer, margin in zip(layers, match_margins(model)):
        layer["match_margin"] = margin
    result = {"variant": model.config.variant_label(), "n_layer": len(layers), "n_embd": model.config.n_embd,
              "n_head": model.config.n_head, "layers": layers}
    if model.config.gate:
        result["prune_threshold"] = prune_threshold
        result["pruned_codes"] = model.prune(prune_threshold).config.layer_codes
    return result


def describe_out_gates(gates) -> dict:
    """Mean output gate and the fraction nearly shut (below NEARLY_SHUT), overall and per head; gates (..., H)."""
    g = np.asarray(gates, dtype=np.float64)
    per_head = g.reshape(-1, g.shape[-1])  # (tokens, H)
    return {"mean": float(g.mean()), "shut_fraction": float((g < NEARLY_SHUT).mean()),
            "mean_per_head": per_head.mean(0).tolist(),
            "shut_fraction_per_head": (per_head < NEARLY_SHUT).mean(0).tolist()}


def _analyze_layer(layer: int, attn: CausalSelfAttention, asymmetry: float, subspace_dim) -> dict:
    spec = attn.spec
    report = {
        "layer": layer,
        "code": spec.code,
        "identity_roles": "".join(r for r, ch in zip(ROLES, spec.code) if ch == "-"),
        "projections": {name: describe_matrix(w) for name, w in projection_matrices(attn).items()},
        "overlaps": role_overlaps(attn, subspace_dim),
        "asymmetry": asymmetry,
        "symmetric_by_construction": spec.symmetric(),
    }
    if spec.gated_roles():
        report["gates"] = {role: attn.gate_value(role) for role in spec.gated_roles()}
    return report


# ---- from a checkpoint -----------------------------------------------------------------


def analyze_checkpoint(ckpt_dir, data: str | None = None, n_batches: int = 2, batch_size: int = 8,
                       heatmaps_dir=None, subspace_dim: int | None = None) -> dict:
    """analyze_model on a saved model, scored on fixed validation batches of its own data
    (or of `data`); heatmaps_dir also saves attention heat maps of the first sequence."""
    model, tokenizer, meta = load_model(ckpt_dir)
    train_config = meta.get("train_config", {})
    spec = data if data is not None else train_config.get("data")
    if spec is None:
        raise ValueError(f"the checkpoint in {ckpt_dir} does not record its data: pass data=SPEC "
                         "(--data), e.g. 'shakespeare' or a text file")
    corpus = load_corpus(spec, seed=train_config.get("seed", 0))
    batches = corpus.eval_batches("val", batch_size, model.config.block_size, n_batches,
                                  seed=train_config.get("seed", 0))
    if corpus.tokenizer != tokenizer:
        batches = [(_retokenize(x, corpus.tokenizer, tokenizer, spec), y) for x, y in batches]
    result = analyze_model(model, batches, subspace_dim=subspace_dim)
    result.update(checkpoint=str(ckpt_dir), data=str(spec), step=meta.get("step"))
    if heatmaps_dir is not None:
        paths = save_heatmaps(model, batches[0][0][:1], heatmaps_dir, tokenizer)  # first sequence (1, T)
        result["heatmaps"] = [str(p) for p in paths]
    return result


def _retokenize(ids, source, target, spec) -> np.ndarray:
    """ids (B, T) of one tokenizer -> the same text in another's ids (another corpus, same characters)."""
    try:
        return np.stack([target.encode(source.decode(row)) for row in ids])
    except ValueError as e:
        raise ValueError(f"data {spec!r} cannot be read by this checkpoint's tokenizer: {e}") from None


# ---- the text report -------------------------------------------------------------------


def format_report(result: dict) -> str:
    """A few readable lines per layer from analyze_model / analyze_checkpoint output."""
    lines = [f"variant {result['variant']}: {result['n_layer']} layers, "
             f"C={result['n_embd']}, {result['n_head']} heads"]
    if result.get("checkpoint"):
        lines.append(f"checkpoint {result['checkpoint']} (step {result.get('step')}), "
                     f"scores on {result['data']}")
    for layer in result["layers"]:
        lines.append("")
        lines.extend(_layer_lines(layer))
    if "pruned_codes" in result:
        lines.append("")
        lines.append(f"after prune({result['prune_threshold']}): " + " ".join(result["pruned_codes"]))
    if result.get("heatmaps"):
        lines.append(f"heat maps: {', '.join(result['heatmaps'])}")
    return "\n".join(lines)


def _layer_lines(layer: dict) -> list:
    symmetric = ("symmetric by construction" if layer["symmetric_by_construction"]
                 else "not symmetric by construction")
    lines = [f"layer {layer['layer']}  {layer['code']}  score asymmetry {layer['asymmetry']:.3f} "
             f"({symmetric}; 0 = symmetric)"]
    if "sink_mass" in layer:
        lines.append(f"  attention sink: mass on position 0 {layer['sink_mass']:.3f} "
                     f"(attention spread evenly: {layer['uniform_sink_mass']:.3f})")
    if "out_gates" in layer:
        g = layer["out_gates"]
        lines.append(f"  output gates: mean {g['mean']:.3f}, below {NEARLY_SHUT}: {100 * g['shut_fraction']:.1f}%  "
                     "(per head: " + " ".join(f"{m:.2f}" for m in g["mean_per_head"]) + ")")
    for name, p in layer["projections"].items():
        top = " ".join(f"{s:.3g}" for s in p["singular_values"][:TOP_SINGULAR_VALUES_SHOWN])
        more = " ..." if len(p["singular_values"]) > TOP_SINGULAR_VALUES_SHOWN else ""
        size = "x".join(map(str, p["shape"]))
        lines.append(f"  {name:<12} {size:<8} effective rank {p['effective_rank']:6.2f}"
                     f"  rank90 {p['rank90']:3d}  singular values {top}{more}")
    for role in layer["identity_roles"]:
        lines.append(f"  {role.upper()} = x (identity): no projection, reads the whole input space")
    for o in layer["overlaps"]:
        pair = f"{o['a'].upper()}-{o['b'].upper()}"
        if o["tied"]:
            lines.append(f"  overlap {pair}  tied: one weight {o['weight']}, mean cos {o['mean_cos']:.3f} "
                         "(1 by construction)")
            continue
        flat = f"  flattened cos {o['flat_cos']:+.3f}" if o["flat_cos"] is not None else ""
        lines.append(f"  overlap {pair}  r={o['dim']:<3} mean cos {o['mean_cos']:.3f}"
                     f"  (random subspaces {o['random_baseline_mean_cos']:.3f}){flat}")
    if "match_margin" in layer:
        lines.append("  match margin (same token over others, logits) per head: "
                     + " ".join(f"{m:+.2f}" for m in layer["match_margin"]))
    if "gates" in layer:
        lines.append("  gates " + "  ".join(f"{role.upper()} {g:.3f}" for role, g in layer["gates"].items()))
    return lines


# ---- heat maps -------------------------------------------------------------------------


VISIBLE = {" ": "·", "\n": "¶", "\t": "→"}  # characters drawn as ticks


def save_heatmaps(model, x, out_dir, tokenizer=None) -> list:
    """One PNG per layer of the attention weights of one sequence x (T,) or (1, T), heads side by side.

    With a tokenizer, short sequences (T <= 48) get their tokens as tick labels: a character each,
    or a token id (IdTokenizer).
    """
    try:
        from matplotlib.figure import Figure  # the object API: no GUI backend, no global state
    except ImportError:
        raise ImportError("heat maps need matplotlib: pip install 'minqkv[plot]' "
                          "(or pip install matplotlib)") from None
    ids = np.asarray(x).reshape(1, -1)  # (1, T)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = ids.shape[1]
    # one label per token, each decoded alone: a character, or an id such as '4097'
    tokens = [tokenizer.decode(ids[0, t:t + 1]) for t in range(T)] if tokenizer is not None and T <= 48 else None
    side = max(2.6, 0.12 * T) if tokens is not None else 2.6  # inches: room for one tick per token
    paths = []
    for layer, weights in enumerate(attention_weights(model, ids)):  # weights (1, H, T, T)
        H = weights.shape[1]
        fig = Figure(figsize=(side * H + 1.0, side + 0.9), layout="constrained")
        axes = fig.subplots(1, H, squeeze=False)[0]
        for h, ax in enumerate(axes):
            image = ax.imshow(weights[0, h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xlabel("key position", fontsize=8)
            if tokens is not None:
                shown = [VISIBLE.get(token, token) for token in tokens]  # a space or newline tick would be blank
                ax.set_xticks(range(T), shown, fontsize=7, fontfamily="monospace")
                ax.set_yticks(range(T), shown, fontsize=7, fontfamily="monospace")
        axes[0].set_ylabel("query position", fontsize=8)
        fig.colorbar(image, ax=list(axes), shrink=0.8)
        fig.suptitle(f"layer {layer} ({model.blocks[layer].attn.spec.code}): attention weights", fontsize=10)
        path = out_dir / f"attention_layer{layer}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
