"""The same tiny GPT, written independently in PyTorch, gives the same loss and gradients.

The PyTorch model below reads only the weights (by name) and each layer's code: it re-derives
tying, identity roles, the Cayley rotation, the 2-D position bias, grouped heads, gates, rotary
positions (as complex numbers), output gates and latent keys and values on its own, so agreement
to float64 rounding checks minqkv's forward and backward end to end.
"""

import math

import numpy as np
import pytest

from minqkv.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional

TINY = dict(vocab_size=7, block_size=6, n_layer=2, n_head=4, n_embd=8, dtype="float64")


def torch_rope(t):
    """t (B, n, T, hd): each pair (2i, 2i+1) as the complex number a + ib, times e^(i p theta_i),
    theta_i = 10000^(-2i/hd), at position p."""
    T, hd = t.shape[-2:]
    theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)
    z = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * turn).reshape(t.shape)


def torch_attention(P: dict, prefix: str, config: GPTConfig, code: str, x):
    """x (B, T, C) -> (B, T, C) for one layer whose projections follow `code`."""
    B, T, C = x.shape
    H = config.n_head
    Hkv = config.n_kv_head or H
    hd = C // H

    def source(role):
        letter = code["qkv".index(role)]
        if letter == "-":
            return x
        roles = "".join(r for r, ch in zip("qkv", code) if ch == letter)
        if config.latent_kv and role != "q":  # up-projected from the latent x W_down, never gated
            return x @ P[f"{prefix}w_kv_down"] @ P[f"{prefix}w_{roles}_up"]
        out = x @ P[f"{prefix}w_{roles}"]
        if config.gate and out.shape[-1] == C:
            # the deterministic hard-concrete gate: clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)
            g = torch.clamp(torch.sigmoid(P[f"{prefix}gate_{role}"]) * 1.2 - 0.1, 0, 1)
            out = g * out + (1 - g) * x
        return out

    q = source("q").view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = source("k").view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    v = source("v").view(B, T, Hkv, hd).transpose(1, 2)
    if config.pos == "rope":
        q, k = torch_rope(q), torch_rope(k)
    if config.rotate:
        S = P[f"{prefix}rotation_param"]  # (Hkv, hd, hd)
        A = S - S.transpose(-1, -2)
        eye = torch.eye(hd, dtype=x.dtype).expand_as(A)
        R = torch.linalg.solve(eye + A, eye - A)  # Cayley: (I + A)^-1 (I - A)
        k = k @ R
    k = k.repeat_interleave(H // Hkv, dim=1)  # query head h reads key head h // (H / Hkv)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    if config.pos2d:
        scores = scores + P[f"{prefix}pos_bias"][:, :T, :T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    y = weights @ v  # (B, H, T, hd)
    if config.out_gate:
        y = y * torch.sigmoid(x @ P[f"{prefix}w_out_gate"]).transpose(1, 2)[..., None]  # (B, H, T, 1)
    y = y.transpose(1, 2).reshape(B, T, C)
    return y @ P[f"{prefix}w_o"] if config.out_proj else y


def torch_loss(P: dict, config: GPTConfig, ids, targets):
    T = ids.shape[1]
    C = config.n_embd
    x = P["token_embedding.weight"][ids]
    if config.pos == "learned":
        x = x + P["position_embedding.weight"][:T]
    for i in range(config.n_layer):
        pre = f"blocks.{i}."
        h = F.layer_norm(x, (C,), P[pre + "ln_1.weight"], P[pre + "ln_1.bias"], eps=1e-5)
        x = x + torch_attention(P, pre + "attn.", config, config.code_of(i), h)
        h = F.layer_norm(x, (C,), P[pre + "ln_2.weight"], P[pre + "ln_2.bias"], eps=1e-5)
        h = F.gelu(h @ P[pre + "mlp.fc.weight"] + P[pre + "mlp.fc.bias"], approximate="tanh")
        x = x + h @ P[pre + "mlp.proj.weight"] + P[pre + "mlp.proj.bias"]
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], eps=1e-5)
    head = P["token_embedding.weight"] if config.tie_weights else P["output_embedding.weight"]
    logits = x @ head.T  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("overrides", [
    dict(code="abc"), dict(code="abb"), dict(code="aab"), dict(code="aaa", rotate=True),
    dict(code="--a"), dict(code="---"), dict(code="abc", n_kv_head=1),
    dict(code="aab", pos2d=True), dict(code="abb", n_kv_head=2, rotate=True),
    dict(code="abc", gate=True), dict(code="-ab", out_proj=False, tie_weights=False),
    dict(layer_codes=["aba", "a--"]),
    dict(code="abc", pos="rope", n_head=2), dict(code="aab", pos="rope", n_head=2),
    dict(code="abb", pos="rope", n_kv_head=1, rotate=True, n_head=2), dict(code="abc", pos="none"),
    dict(code="abc", out_gate=True), dict(code="abb", out_gate=True, n_kv_head=2),
    dict(code="abc", latent_kv=4), dict(code="abb", latent_kv=4, pos="rope", n_head=2),
    dict(code="-ab", latent_kv=6, n_kv_head=2), dict(code="abc", latent_kv=6, gate=True, out_gate=True),
], ids=lambda o: GPTConfig(**{**TINY, **o}).variant_label() + ("+untied" if o.get("tie_weights") is False else "")
   + (f"+{o['n_head']}heads" if "n_head" in o else ""))
def test_loss_and_every_gradient_match_pytorch(overrides):
    config = GPTConfig(**{**TINY, **overrides})
    model = GPT(config)
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():  # off the initial values: identity rotation, zero bias
        p.data += 0.3 * rng.standard_normal(p.shape)
        if ".gate_" in name:
            p.data[:] = rng.uniform(-2, 2, p.shape)  # undecided gates: not clipped, so they get a gradient
    ids = rng.integers(0, config.vocab_size, (3, config.block_size))
    targets = rng.integers(0, config.vocab_size, (3, config.block_size))

    model.eval()  # gates: their deterministic path (the sampled one is gradient-checked)
    _, loss = model(ids, targets)
    model.zero_grad()
    loss.backward()

    P = {name: torch.tensor(p.data, requires_grad=True) for name, p in model.named_parameters()}
    reference = torch_loss(P, config, torch.tensor(ids), torch.tensor(targets))
    reference.backward()

    assert float(loss.data) == pytest.approx(reference.item(), rel=1e-12)
    for name, p in model.named_parameters():
        expected = P[name].grad.numpy()
        scale = np.abs(expected).max()
        assert scale > 0, f"{name} gets no gradient in the reference"
        assert np.abs(p.grad - expected).max() <= 1e-10 * scale, name
