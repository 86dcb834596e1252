"""The same tiny GPT, written independently in PyTorch (minqkv/lab/torch_gpt.py), gives the same
loss and gradients.

The PyTorch model reads only the weights (by name) and each layer's code: it re-derives tying,
identity roles, the Cayley rotation, the 2-D position bias, grouped heads, gates, rotary
positions (as complex numbers), output gates, latent keys and values, ALiBi, the sliding window
and linear attention (in its quadratic form) on its own, so agreement
to float64 rounding checks minqkv's forward and backward end to end.
"""

import numpy as np
import pytest

from minqkv.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
torch_gpt = pytest.importorskip("minqkv.lab.torch_gpt")

TINY = dict(vocab_size=7, block_size=6, n_layer=2, n_head=4, n_embd=8, dtype="float64")


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
    dict(code="abc", window=2), dict(code="abb", window=3, n_kv_head=2), dict(code="abc", pos="alibi"),
    dict(code="aab", pos="alibi", pos2d=True, window=4), dict(code="abc", linear_features=0),
    dict(code="abb", linear_features=0, n_kv_head=2, rotate=True), dict(code="abc", linear_features=6),
    dict(code="-ab", linear_features=4, pos="rope", n_head=2),
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

    P = torch_gpt.weights_of(model)
    reference = torch_gpt.loss(P, config, torch.tensor(ids), torch.tensor(targets))
    reference.backward()

    assert float(loss.data) == pytest.approx(reference.item(), rel=1e-12)
    for name, p in model.named_parameters():
        expected = P[name].grad.numpy()
        scale = np.abs(expected).max()
        assert scale > 0, f"{name} gets no gradient in the reference"
        assert np.abs(p.grad - expected).max() <= 1e-10 * scale, name
