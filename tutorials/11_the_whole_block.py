# %% [markdown]
# # Lesson 11: the rest of the block
#
# Run: `python tutorials/11_the_whole_block.py [--out FOLDER]` (times: tutorials/README.md).
# Draws `11_residual_gradients.png` (into --out); opens no other file. Worth reading beside it:
# `minqkv/nn.py` (LayerNorm, MLP), `minqkv/model.py` (Block, GPT) and `minqkv/attention.py`
# (CausalSelfAttention).
#
# Lesson 4 built one attention head by hand; lesson 7 trains a whole GPT. In between sit the
# parts of a Transformer block that are not attention: **LayerNorm**, the **residual stream**
# and the **MLP**. This lesson computes each by hand in NumPy, checks it against minqkv's
# module, shows why the residual matters for gradients, and finally rebuilds a tiny GPT's
# forward pass from its weights and gets the same logits as `model(ids)`.

# %%
import argparse
import tempfile
from pathlib import Path

import numpy as np

from minqkv import ops
from minqkv.model import GPT, GPTConfig, parameter_count
from minqkv.nn import MLP, LayerNorm
from minqkv.tensor import Tensor, no_grad

parser = argparse.ArgumentParser(description="Lesson 11: the rest of the block")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson11-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. LayerNorm
#
# LayerNorm looks at one position's vector of C channels at a time (one row) and makes it have
# mean 0 and variance 1: subtract the row's mean, divide by its standard deviation (with a small
# eps inside the square root so that a constant row does not divide by zero). Then it scales and
# shifts every channel by learned numbers, `weight` (starts at 1) and `bias` (starts at 0), so
# the model can undo the normalisation where that helps. The variance is the plain mean of
# squares (divided by C, not C - 1).
#
# Rows far from mean 0 / variance 1, on purpose: LayerNorm does not care where a row starts.

# %%
T, C = 8, 16
x = 5.0 + 3.0 * np.random.default_rng(1).standard_normal((1, T, C))  # (B, T, C)
ln = LayerNorm(C, dtype=np.float64)
ln.weight.data[:] = 1.0 + 0.1 * np.random.default_rng(2).standard_normal(C)  # as if trained a little
ln.bias.data[:] = 0.1 * np.random.default_rng(3).standard_normal(C)

mean = x.mean(axis=-1, keepdims=True)  # (B, T, 1): one mean per row
var = x.var(axis=-1, keepdims=True)  # (B, T, 1): mean of (x - mean)^2
x_hat = (x - mean) / np.sqrt(var + ln.eps)  # (B, T, C): each row mean 0, variance 1
ln_by_hand = x_hat * ln.weight.data + ln.bias.data  # per-channel scale and shift
with no_grad():
    ln_minqkv = ln(Tensor(x)).data
print(f"rows before: means {mean.min():.2f}..{mean.max():.2f}, variances {var.min():.2f}..{var.max():.2f}")
print(f"rows after normalising: largest |mean| {np.abs(x_hat.mean(-1)).max():.1e}, "
      f"variances {x_hat.var(-1).min():.6f}..{x_hat.var(-1).max():.6f}")
print(f"LayerNorm by hand vs minqkv: max difference {np.abs(ln_by_hand - ln_minqkv).max():.1e}")
assert np.allclose(x_hat.mean(axis=-1), 0.0, atol=1e-12)
assert np.allclose(x_hat.var(axis=-1), 1.0, atol=1e-5)  # 1 up to eps / var
assert np.allclose(ln_by_hand, ln_minqkv, rtol=0, atol=1e-12)

# %% [markdown]
# ## 2. The MLP
#
# Attention mixes positions; the MLP works on each position alone. minqkv's `MLP` is
# `Linear -> GELU -> Linear` (then dropout, off here): it widens the C channels to a hidden
# layer of 4 C, applies GELU, a smooth cousin of max(0, x), and projects back to C. GPT-2's
# GELU is the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
# `Linear` stores its weight as (in, out), so y = x @ W + b reads left to right.

# %%
hidden = 4 * C
mlp = MLP(C, hidden, dtype=np.float64, rng=np.random.default_rng(4))
mlp.fc.bias.data[:] = 0.1 * np.random.default_rng(5).standard_normal(hidden)  # biases start at 0: wake them
mlp.proj.bias.data[:] = 0.1 * np.random.default_rng(6).standard_normal(C)


def gelu(u):
    return 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u ** 3)))


h = x_hat @ mlp.fc.weight.data + mlp.fc.bias.data  # (B, T, C) @ (C, 4C) -> (B, T, 4C)
mlp_by_hand = gelu(h) @ mlp.proj.weight.data + mlp.proj.bias.data  # (B, T, 4C) @ (4C, C) -> (B, T, C)
with no_grad():
    mlp_minqkv = mlp(Tensor(x_hat)).data
print("MLP weights:", {name: p.shape for name, p in mlp.named_parameters()})
print(f"MLP by hand vs minqkv: max difference {np.abs(mlp_by_hand - mlp_minqkv).max():.1e}")
assert mlp.fc.weight.shape == (C, 4 * C) and mlp.proj.weight.shape == (4 * C, C)
assert mlp.num_parameters() == 2 * C * 4 * C + 4 * C + C  # two matrices and two biases
assert np.allclose(mlp_by_hand, mlp_minqkv, rtol=0, atol=1e-12)
# each position alone: shuffling the positions shuffles the outputs the same way
order = np.random.default_rng(7).permutation(T)
with no_grad():
    assert np.allclose(mlp(Tensor(x_hat[:, order])).data, mlp_minqkv[:, order], rtol=0, atol=1e-12)

# %% [markdown]
# ## 3. The block: pre-LayerNorm and the residual stream
#
# `minqkv/model.py` puts them together in `Block.forward`:
#
#     x = x + self.attn(self.ln_1(x), cache)   # (B, T, C)
#     return x + self.mlp(self.ln_2(x))
#
# Each sublayer reads a normalised **copy** of x and **adds** its result to x. x itself, the
# "residual stream", is never normalised inside a block; it is a running sum that every
# sublayer writes into. This is the *pre-LayerNorm* arrangement (GPT-2's); the original
# Transformer normalised after the addition instead.
#
# Why add instead of replace? Look at the gradient. For y = x + f(x), dy/dx = I + df/dx: the
# identity is always there, so the gradient arriving at the top reaches the bottom unchanged,
# plus corrections. For y = f(x) alone, dy/dx = df/dx, and a stack of L blocks multiplies L of
# them: with the small weights a network starts from, that product shrinks layer after layer,
# and the first layers get almost no signal to learn from.
#
# minqkv's engine shows it. We take the blocks of a 16-layer GPT, feed x through the first
# `depth` of them, once as `Block.forward` does and once with the `x +` removed, finish with the
# final LayerNorm (so both outputs have the same size) and a fixed random loss, call
# `backward()`, and measure the gradient that reaches the input.

# %%
depths = [1, 2, 4, 8, 12, 16]
deep = GPT(GPTConfig(vocab_size=11, block_size=T, n_layer=max(depths), n_head=2, n_embd=C, dtype="float64"))
x_in = np.random.default_rng(8).standard_normal((1, T, C))
direction = Tensor(np.random.default_rng(9).standard_normal((1, T, C)))


def input_gradient_norm(depth: int, residual: bool) -> float:
    x = Tensor(x_in, requires_grad=True)
    h = x
    for block in deep.blocks[:depth]:
        if residual:
            h = block(h)  # h + attn(ln_1(h)), then + mlp(ln_2(.))
        else:
            h = block.mlp(block.ln_2(block.attn(block.ln_1(h))))  # the same layers, no "h +"
    loss = ops.sum(deep.ln_f(h) * direction)  # a fixed random direction: a stand-in for the real loss
    loss.backward()
    return float(np.linalg.norm(x.grad))


with_residual = [input_gradient_norm(d, True) for d in depths]
without_residual = [input_gradient_norm(d, False) for d in depths]
print("depth  |dL/dx| with x + f(x)   |dL/dx| with f(x) only")
for d, a, b in zip(depths, with_residual, without_residual):
    print(f"{d:5}  {a:20.3g}   {b:22.3g}")
assert max(with_residual) / min(with_residual) < 1.5  # flat: the identity path carries it
assert without_residual[-1] < 1e-12 * with_residual[-1]  # vanished
assert all(b < a for a, b in zip(without_residual, without_residual[1:]))  # shrinking with every block

# %% [markdown]
# The gradient without the residual shrinks roughly tenfold with every block; after 16 blocks
# it is gone. With the residual it does not move: at initialisation the sublayers are small
# (their output projections start at std 0.02 / sqrt(2 n_layer), `residual_init_std`), so each
# block starts close to the identity, and training grows the corrections it needs.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
ax.semilogy(depths, with_residual, "o-", label="x + f(x)  (Block.forward)")
ax.semilogy(depths, without_residual, "s-", label="f(x) only  (no residual)")
ax.set(xlabel="blocks between the input and the loss", ylabel="|dL/dx| at the input",
       title="the residual stream keeps the gradient alive")
ax.legend()
fig.savefig(out / "11_residual_gradients.png", dpi=100)
plt.close(fig)
print("wrote", out / "11_residual_gradients.png")

# %% [markdown]
# ## 4. The whole GPT, by hand
#
# `GPT.forward` in `minqkv/model.py` is four steps:
#
# 1. **embed**: x = token_embedding[ids] + position_embedding[0..T-1]  (B, T, C)
# 2. **blocks**: x = block(x), n_layer times
# 3. **final LayerNorm**: x = ln_f(x)
# 4. **tied head**: logits = x @ token_embedding^T  (B, T, C) @ (C, V) -> (B, T, V): the same
#    table that turned ids into vectors scores every vector against every token
#
# A tiny float64 GPT, its weights jittered away from the initial values (zero biases and unit
# LayerNorms would hide mistakes), and then every step in NumPy from the weights alone: the
# LayerNorm of section 1, the attention of lesson 4 with H heads, the MLP of section 2.

# %%
V, T, C, H, L = 13, 8, 16, 2, 2
hd = C // H
config = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, dtype="float64")
model = GPT(config)
jitter = np.random.default_rng(10)
for name, param in model.named_parameters():
    param.data[:] = param.data + 0.2 * jitter.standard_normal(param.shape)
print("block 0's parameters:", {name: p.shape for name, p in model.named_parameters() if ".0." in name})
ids = np.random.default_rng(11).integers(0, V, (1, T))  # (B, T)


def layer_norm(x, ln):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data


def attention(x, attn):  # the 'abc' code: x (T, C) -> (T, C)
    q, k, v = x @ attn.w_q.data, x @ attn.w_k.data, x @ attn.w_v.data  # (T, C) each
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    heads = []
    for head in range(H):
        cols = slice(head * hd, (head + 1) * hd)
        S = np.where(future, -np.inf, q[:, cols] @ k[:, cols].T / np.sqrt(hd))  # (T, T)
        A = np.exp(S - S.max(axis=1, keepdims=True))
        heads.append(A / A.sum(axis=1, keepdims=True) @ v[:, cols])  # (T, hd)
    return np.concatenate(heads, axis=1) @ attn.w_o.data  # (T, C) @ (C, C)


def mlp_forward(x, mlp):
    return gelu(x @ mlp.fc.weight.data + mlp.fc.bias.data) @ mlp.proj.weight.data + mlp.proj.bias.data


tokens = model.token_embedding.weight.data  # (V, C)
x = tokens[ids[0]] + model.position_embedding.weight.data[:T]  # (T, C)
for block in model.blocks:
    x = x + attention(layer_norm(x, block.ln_1), block.attn)  # pre-LayerNorm, then the residual
    x = x + mlp_forward(layer_norm(x, block.ln_2), block.mlp)
x = layer_norm(x, model.ln_f)
logits_by_hand = x @ tokens.T  # (T, C) @ (C, V) -> (T, V)

with no_grad():
    logits_model, _ = model(ids)  # (1, T, V)
difference = np.abs(logits_by_hand - logits_model.data[0]).max()
print(f"GPT logits by hand vs model(ids): max difference {difference:.1e} "
      f"(largest |logit| {np.abs(logits_by_hand).max():.1f})")
assert logits_model.shape == (1, T, V)
assert np.allclose(logits_by_hand, logits_model.data[0], rtol=0, atol=1e-6)

# %% [markdown]
# The same, now from the modules rather than from raw arrays: `model.embed`, then the two
# residual additions of each block, `ln_f` and the tied head. This is `GPT.forward` written
# out, so it matches to the last bit.

# %%
with no_grad():
    h = model.embed(ids)  # (1, T, C)
    for block in model.blocks:
        h = h + block.attn(block.ln_1(h))
        h = h + block.mlp(block.ln_2(h))
    logits_modules = model.ln_f(h) @ ops.swapaxes(model.token_embedding.weight, 0, 1)  # (1, T, V)
assert np.array_equal(logits_modules.data, logits_model.data)
print("GPT logits from its modules == model(ids), bit for bit")

# %% [markdown]
# ## 5. Counting the parameters
#
# Everything above is weights we have already named, so the count follows from the shapes:
# the two embedding tables; per block two LayerNorms (weight and bias, C each), attention's
# four C x C matrices (`abc`: W_q, W_k, W_v, W_o) and the MLP; the final LayerNorm. The head
# adds nothing: it is the token table again (weight tying).

# %%
embeddings = V * C + T * C  # token table + position table (block_size = T here)
layer_norm_params = 2 * C
attention_params = 4 * C * C
mlp_params = C * 4 * C + 4 * C + 4 * C * C + C
per_block = 2 * layer_norm_params + attention_params + mlp_params
by_hand = embeddings + L * per_block + layer_norm_params
print(f"by hand: {embeddings} embeddings + {L} x {per_block} per block + {layer_norm_params} final "
      f"LayerNorm = {by_hand}; model.num_parameters() = {model.num_parameters()}")
print(f"per block: attention {attention_params}, MLP {mlp_params}: the MLP holds two thirds")
assert by_hand == model.num_parameters() == parameter_count(config)
assert mlp_params == 2 * attention_params + 5 * C  # 8 C^2 + biases against 4 C^2

# %% [markdown]
# **What you learned:** LayerNorm gives each row mean 0 and variance 1, then scales and shifts
# it; the MLP is Linear -> GELU -> Linear through a hidden width of 4 C, each position alone;
# a block adds both sublayers into the residual stream (x + attn(ln_1(x)), then
# x + mlp(ln_2(x))), and that identity path is what keeps gradients alive through depth; a GPT
# is embeddings, blocks, a final LayerNorm and a tied head, all of which NumPy reproduces from
# the weights, and whose parameters you can count from the shapes.

# %%
assert np.allclose(x_hat.mean(-1), 0.0, atol=1e-12) and np.allclose(x_hat.var(-1), 1.0, atol=1e-5)
assert without_residual[-1] < 1e-12 * with_residual[-1]
assert np.allclose(logits_by_hand, logits_model.data[0], rtol=0, atol=1e-6)
assert by_hand == model.num_parameters()
assert (out / "11_residual_gradients.png").exists()
print("lesson 11 done")
