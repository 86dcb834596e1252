"""minqkv's GPT written again in PyTorch: the reference of the tests and the other side of the bench.

The model is one function of a GPTConfig and a dict of weights named and shaped as minqkv's
(`blocks.0.attn.w_kv` of shape (C, width): a layer computes x @ W). It reads the weights by
name and each layer's code, and derives on its own what minqkv's attention does: one weight per
letter (tied roles), identity roles ('-'), hard-concrete gates, the Cayley rotation of the keys,
the 2-D position bias, grouped key/value heads, rotary positions (as complex numbers), output
gates, keys and values up-projected from a latent, ALiBi, a sliding window and linear attention
(elu + 1 or Performer features, in the quadratic form minqkv never uses).

    weights = weights_of(model)                          # a minqkv GPT's, as PyTorch tensors
    loss(weights, model.config, ids, targets).backward()  # the loss and gradients minqkv gets

tests/test_model_torch.py checks minqkv's forward and backward end to end that way, and
bench_step.py times a training step of this model (adamw() below) next to minqkv's own: every
matrix that reads x in one GEMM (Q, K and V of 'abc' at once), PyTorch's fused
scaled_dot_product_attention, the output head tied to the token embedding.

Gates are read deterministically (minqkv's evaluation mode) and there is no dropout. PyTorch is
optional for minqkv: this module is imported only where it is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..optim import decays

ROLES = "qkv"


def weights_of(model) -> dict:
    """{name: tensor} of a minqkv GPT's parameters: copies of its values, each with a gradient; and
    a Performer layer's fixed random projection (no gradient), which the model draws at init."""
    weights = {name: torch.tensor(p.data, requires_grad=True) for name, p in model.named_parameters()}
    for i, block in enumerate(model.blocks):
        if hasattr(block.attn, "performer_projection"):
            weights[f"blocks.{i}.attn.performer_projection"] = torch.tensor(block.attn.performer_projection)
    return weights


def adamw(weights: dict, lr: float, betas: tuple, weight_decay: float) -> torch.optim.AdamW:
    """PyTorch's AdamW over the weights, decaying the ones minqkv's AdamW decays (optim.decays)."""
    decayed = [w for name, w in weights.items() if decays(name, w)]
    others = [w for name, w in weights.items() if not decays(name, w)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": others, "weight_decay": 0.0}], lr=lr, betas=betas)


def loss(weights: dict, config, ids, targets):
    """The mean cross-entropy of predicting targets (B, T) from ids (B, T), int64 tensors."""
    T = ids.shape[1]
    x = F.embedding(ids, weights["token_embedding.weight"])  # (B, T, C)
    if config.pos == "learned":
        x = x + F.embedding(torch.arange(T), weights["position_embedding.weight"])  # + (T, C)
    for i in range(config.n_layer):
        x = block(weights, f"blocks.{i}.", config, config.code_of(i), x)
    x = layer_norm(weights, "ln_f.", x)
    head = weights["token_embedding.weight" if config.tie_weights else "output_embedding.weight"]  # (V, C)
    logits = x @ head.T  # (B, T, C) @ (C, V) -> (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def block(weights: dict, prefix: str, config, code: str, x):
    """x (B, T, C) -> (B, T, C): pre-LayerNorm attention, then a tanh-GELU MLP, each added to x."""
    x = x + attention(weights, prefix + "attn.", config, code, layer_norm(weights, prefix + "ln_1.", x))
    h = layer_norm(weights, prefix + "ln_2.", x)
    h = F.gelu(linear(weights, prefix + "mlp.fc.", h), approximate="tanh")  # (B, T, 4C)
    return x + linear(weights, prefix + "mlp.proj.", h)


def layer_norm(weights: dict, prefix: str, x):
    return F.layer_norm(x, x.shape[-1:], weights[prefix + "weight"], weights[prefix + "bias"], eps=1e-5)


def linear(weights: dict, prefix: str, x):
    """x @ W + b in one fused product (F.linear takes the weight as (out, in))."""
    return F.linear(x, weights[prefix + "weight"].T, weights[prefix + "bias"])


def attention(weights: dict, prefix: str, config, code: str, x):
    """x (B, T, C) -> (B, T, C) for one layer whose Q, K and V follow `code`."""
    B, T, C = x.shape
    H, Hkv = config.n_head, config.kv_heads
    q, k, v = sources(weights, prefix, config, code, x)  # (B, T, width) each
    q = q.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, hd)
    k = k.view(B, T, Hkv, -1).transpose(1, 2)  # (B, Hkv, T, hd)
    v = v.view(B, T, Hkv, -1).transpose(1, 2)  # (B, Hkv, T, hd)
    if config.pos == "rope":
        q, k = rope(q), rope(k)
    if config.rotate:
        k = k @ cayley(weights[prefix + "rotation_param"])  # (B, Hkv, T, hd) @ (Hkv, hd, hd)
    if Hkv < H:  # query head h reads key and value head h // (H / Hkv)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, hd)
    if config.linear_features is not None:
        y = linear_attention(q, k, v, features(weights, prefix, config))  # (B, H, T, hd)
    elif config.pos2d or config.pos == "alibi" or config.window:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=score_mask(weights, prefix, config, T).to(q.dtype))
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    if config.out_gate:  # one sigmoid gate per head and token, from the layer's input
        gates = torch.sigmoid(x @ weights[prefix + "w_out_gate"])  # (B, T, C) @ (C, H) -> (B, T, H)
        y = y * gates.transpose(1, 2)[..., None]  # (B, H, T, hd) * (B, H, T, 1)
    y = y.transpose(1, 2).reshape(B, T, C)
    return y @ weights[prefix + "w_o"] if config.out_proj else y


def score_mask(weights: dict, prefix: str, config, T: int):
    """What is added to the scores (H, T, T) or (T, T): the learned 2-D bias, ALiBi's distance bias
    (slope_h times the key's distance back), and -inf on keys after the query or, with a window,
    W or more positions back."""
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T) query position - key position
    hidden = (distance < 0) | (distance >= config.window if config.window else False)
    mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(hidden, -math.inf)  # (T, T)
    if config.pos == "alibi":
        H = config.n_head
        n = 2 ** math.floor(math.log2(H))  # slopes 2^(-8h/n) and, past a power of two, every other of 2n
        slopes = [2 ** (-8 * h / n) for h in range(1, n + 1)] + [2 ** (-8 * h / (2 * n)) for h in range(1, 2 * n, 2)]
        mask = mask - torch.tensor(slopes[:H], dtype=torch.float64)[:, None, None] * distance  # (H, T, T)
    if config.pos2d:
        mask = mask + weights[prefix + "pos_bias"][:, :T, :T]
    return mask


def features(weights: dict, prefix: str, config):
    """Linear attention's feature map of q or k (B, n, T, hd) -> (B, n, T, M): elu + 1, or
    Performer's positive random features exp(x' W - |x'|^2 / 2) / sqrt(M) with x' = x / hd^(1/4)."""
    if config.linear_features == 0:
        return lambda t: F.elu(t) + 1
    W = weights[prefix + "performer_projection"]  # (hd, M), fixed

    def positive(t):
        t = t / t.shape[-1] ** 0.25
        return torch.exp(t @ W - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[1])
    return positive


def linear_attention(q, k, v, phi, eps: float = 1e-6):
    """Causal linear attention in its quadratic form: A = phi(q) phi(k)^T with the future cut,
    y = A v / (row sums of A + eps). q, k, v (B, H, T, hd) -> (B, H, T, hd)."""
    A = (phi(q) @ phi(k).transpose(-1, -2)).tril()  # (B, H, T, T)
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


def sources(weights: dict, prefix: str, config, code: str, x) -> list:
    """[q, k, v] (B, T, width) of one layer: x itself for '-', else x times the role's weight
    (one weight per letter: roles with one letter share it), mixed with x by the role's gate.

    A latent layer's K and V are c @ W_up with c = x @ W_down (B, T, R): they are never gated.
    Every matrix that reads x is applied in one product, and so is every up-projection."""
    latent = config.latent_kv is not None

    def weight_name(role):  # the weight of the role's letter: 'w_' and the roles it serves
        roles = "".join(r for r, letter in zip(ROLES, code) if letter == code[ROLES.index(role)])
        return "w_" + roles + ("_up" if latent and role != "q" else "")

    names = list(dict.fromkeys(weight_name(r) for r, letter in zip(ROLES, code) if letter != "-"))
    from_x = [n for n in names if not n.endswith("_up")] + (["w_kv_down"] if latent else [])
    made = dict(zip(from_x, matmul_each(x, [weights[prefix + n] for n in from_x])))
    from_latent = [n for n in names if n.endswith("_up")]
    if from_latent:
        made.update(zip(from_latent, matmul_each(made["w_kv_down"], [weights[prefix + n] for n in from_latent])))

    def source(role, letter):
        if letter == "-":
            return x
        out = made[weight_name(role)]
        if config.gate and out.shape[-1] == x.shape[-1] and not (latent and role != "q"):
            gate = gate_value(weights[f"{prefix}gate_{role}"])
            out = gate * out + (1 - gate) * x
        return out

    return [source(role, letter) for role, letter in zip(ROLES, code)]


def matmul_each(x, matrices: list) -> list:
    """[x @ m for m in matrices] in one GEMM: the matrices side by side, the product split again."""
    if len(matrices) <= 1:
        return [x @ m for m in matrices]
    product = x @ torch.cat(matrices, dim=1)  # (B, T, C) @ (C, sum of widths)
    return list(product.split([m.shape[1] for m in matrices], dim=-1))


def gate_value(log_alpha):
    """The deterministic hard-concrete gate: clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1),
    with the stretch (gamma, zeta) = (-0.1, 1.1)."""
    return torch.clamp(torch.sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)


def cayley(S):
    """(n, hd, hd) orthogonal matrices R = (I + A)^-1 (I - A) from A = S - S^T (skew)."""
    A = S - S.transpose(-1, -2)
    eye = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(A)
    return torch.linalg.solve(eye + A, eye - A)


def rope(t):
    """t (B, n, T, hd): each pair (2i, 2i+1) as the complex number a + ib, times e^(i p theta_i),
    theta_i = 10000^(-2i/hd), at position p."""
    T, hd = t.shape[-2:]
    theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    turn = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)  # (T, hd/2)
    z = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2).contiguous())  # (B, n, T, hd/2)
    return torch.view_as_real(z * turn.to(z.dtype)).reshape(t.shape)
