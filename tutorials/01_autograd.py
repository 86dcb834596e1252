# %% [markdown]
# # Lesson 1: a gradient, by hand and by the engine
#
# Run: `python tutorials/01_autograd.py` (times: tutorials/README.md). To step through it cell
# by cell (`# %%` marks a cell), see tutorials/README.md.
#
# Training a network means nudging every weight a little in the direction that lowers the loss.
# That direction is the **gradient**: for each input, how fast the output changes when that
# input moves. We write it df/dw ("the derivative of f with respect to w"): if w moves by a
# tiny amount h, f moves by about df/dw * h. A network has millions of weights, so this has to
# be computed automatically: that is **autograd**, and minqkv has a small one.
#
# This lesson computes one gradient three ways: by hand with the chain rule, by minqkv's
# autograd engine, and by reading the engine's short `backward` (about 35 lines) to see there
# is no magic in it.

# %%
import argparse
import inspect

import numpy as np

from minqkv import ops
from minqkv.tensor import Tensor

parser = argparse.ArgumentParser(description="Lesson 1: a gradient by hand and by the engine")
parser.add_argument("--out", default=None, help="output folder (this lesson draws nothing)")
args, _ = parser.parse_known_args()

# %% [markdown]
# ## 1. One scalar, by hand
#
# Take f(x, w) = tanh(x * w + b) with x = 2, w = -0.5, b = 0.3. Break it into steps, each a
# single operation, and name the intermediate values:
#
#     u = x * w        # -1.0
#     z = u + b        # -0.7
#     f = tanh(z)
#
# Each step alone has an easy slope (its **local** slope). The chain rule says: to know how f
# moves with w, multiply the local slopes along the path from w to f. Walk the steps
# **backwards**, starting from df/df = 1:
#
#     df/dz = 1 - tanh(z)^2             (the slope of tanh)
#     df/du = df/dz * dz/du = df/dz * 1 (an addition passes the gradient through)
#     df/dw = df/du * du/dw = df/du * x (a product sends each input the *other* input)
#     df/dx = df/du * w,  df/db = df/dz

# %%
x, w, b = 2.0, -0.5, 0.3
u = x * w
z = u + b
f = np.tanh(z)

df_dz = 1 - np.tanh(z) ** 2
df_du = df_dz * 1.0
df_dw = df_du * x
df_dx = df_du * w
df_db = df_dz
print(f"f = {f:.6f}   df/dw = {df_dw:.6f}   df/dx = {df_dx:.6f}   df/db = {df_db:.6f}")

# %% [markdown]
# A numerical sanity check: move w by a tiny h both ways and measure the slope of f.
# (Lesson 2 turns this into a tool.)

# %%
h = 1e-6
slope = (np.tanh(x * (w + h) + b) - np.tanh(x * (w - h) + b)) / (2 * h)
print(f"finite-difference df/dw = {slope:.6f}")
assert abs(slope - df_dw) < 1e-8

# %% [markdown]
# ## 2. The same function, built from Tensors
#
# A minqkv `Tensor` wraps a NumPy array. When you compute with Tensors, every operation in
# `minqkv.ops` (the operators `*`, `+`, `@` are shortcuts to it) returns a new Tensor that
# remembers **which Tensors it was made from** and a small **closure** (a function defined
# inside the op, which keeps the op's inputs) that knows the local slopes of that one
# operation. Together these records form a **graph** of the computation. `requires_grad=True`
# marks the inputs we want gradients for; `backward()` walks the graph from the output and
# leaves each input's gradient in its `.grad`.

# %%
xt = Tensor(np.array(x), requires_grad=True)
wt = Tensor(np.array(w), requires_grad=True)
bt = Tensor(np.array(b), requires_grad=True)
ft = ops.tanh(xt * wt + bt)
ft.backward()
print("engine:  df/dw =", wt.grad, " df/dx =", xt.grad, " df/db =", bt.grad)
assert np.isclose(wt.grad, df_dw) and np.isclose(xt.grad, df_dx) and np.isclose(bt.grad, df_db)

# %% [markdown]
# The recorded graph is there to look at. Each Tensor keeps the name of the op that made it
# and its parents (the attributes start with `_` because only the engine should change them;
# reading them is fine). Walking from the output back to the leaves prints the expression
# inside out:

# %%


def show(t: Tensor, depth: int = 0) -> None:
    label = t._op or ("leaf " + str(t.data))
    print("  " * depth + label)
    for parent in t._parents:
        show(parent, depth + 1)


show(ft)

# %% [markdown]
# ## 3. A matrix expression
#
# Nothing changes when the values are arrays. Take a batch of 4 inputs with 3 features,
# a weight matrix of shape (3, 2), and the loss L = sum(tanh(X W)). By the chain rule,
#
#     dL/dW = X^T (1 - tanh(X W)^2)          (3, 4) @ (4, 2) -> (3, 2)
#
# the matrix version of "a product sends each input the other input".

# %%
rng = np.random.default_rng(0)
X = Tensor(rng.standard_normal((4, 3)))  # data: no gradient needed
W = Tensor(rng.standard_normal((3, 2)), requires_grad=True)
loss = ops.sum(ops.tanh(X @ W))  # (4, 3) @ (3, 2) -> (4, 2) -> scalar
loss.backward()
by_hand = X.data.T @ (1 - np.tanh(X.data @ W.data) ** 2)
print("engine dL/dW:\n", W.grad, "\nby hand:\n", by_hand)
assert np.allclose(W.grad, by_hand)

# %% [markdown]
# One rule matters once a value is used twice: its gradient is the **sum** over every path.
# For g(a) = a * a + a at a = 3, `a` reaches g three times. Through the product it arrives as
# the left factor and as the right one, and each of those paths gives "the other input", 3;
# the path through `+ a` gives 1. So dg/da = 3 + 3 + 1 = 7 (and indeed d(a^2 + a)/da = 2a + 1).

# %%
a = Tensor(np.array(3.0), requires_grad=True)
(a * a + a).backward()
print("d(a*a + a)/da at a=3:", a.grad)
assert a.grad == 7.0

# %% [markdown]
# ## 4. Open the engine
#
# Here is all of `Tensor.backward`. Read it with the example above in mind:
#
# 1. `_topological_order(self)` lists every node of the graph so that each node comes after
#    the nodes it was made from. Reversed, it is exactly the order we walked by hand: the
#    output first, the leaves last, and a node is reached only once all its users have sent
#    their gradient.
# 2. `grads` holds the gradient arriving at each node. When two paths meet (our `a`), the
#    second one is **added** to the first.
# 3. For an inner node, `node._backward(g)` is the closure the op left behind: it turns the
#    gradient of the op's output into one gradient per parent.
# 4. A leaf (no closure) keeps its gradient in `.grad`.

# %%
print(inspect.getsource(Tensor.backward))

# %% [markdown]
# The sort itself is a depth-first search that appends a node once all its parents are in:

# %%
import minqkv.tensor  # noqa: E402  (the module, to show one of its helpers)

print(inspect.getsource(minqkv.tensor._topological_order))

# %% [markdown]
# And here is where one closure comes from: `ops.mul`. Forward and backward sit side by side;
# `unbroadcast` only sums the gradient back down when NumPy broadcasting stretched an input.

# %%
print(inspect.getsource(ops.mul))

# %% [markdown]
# The closure returns `g * b.data` for `a` and `g * a.data` for `b`: the "other input" rule
# from section 1, exactly. Every op in `minqkv/ops.py` follows this pattern, and the whole
# Transformer in this package is trained by nothing more than this walk.
#
# **What you learned:** a gradient is the chain rule applied backwards through a recorded
# graph; minqkv records the graph as ops run and replays it in reverse in `Tensor.backward`.
# Next, lesson 2 checks that every one of those closures is right.

# %%
assert np.isclose(float(wt.grad), df_dw)  # the engine agrees with the hand-made chain rule
print("lesson 1 done")
