"""Lesson 1: a gradient is a number you can check.

Run: python tutorials/01_autograd.py

minqkv's engine records every op on Tensors; backward() walks that record in reverse.
Here we differentiate a tiny function by hand, by the engine, and by finite differences,
and see all three agree.
"""

import numpy as np

from minqkv import ops
from minqkv.gradcheck import gradcheck
from minqkv.tensor import Tensor

# f(x, w) = sum(tanh(x @ w)),  x: (2, 3), w: (3, 1)
rng = np.random.default_rng(0)
x = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
w = Tensor(rng.standard_normal((3, 1)), requires_grad=True)

f = ops.sum(ops.tanh(x @ w))
f.backward()
print("f =", f.item())

# By hand: df/dw = x^T (1 - tanh(x w)^2)
by_hand = x.data.T @ (1 - np.tanh(x.data @ w.data) ** 2)
print("engine  df/dw:", w.grad.ravel())
print("by hand df/dw:", by_hand.ravel())
assert np.allclose(w.grad, by_hand)

# By finite differences, for every input at once: the check minqkv runs on every op.
errors = gradcheck(lambda x, w: ops.sum(ops.tanh(x @ w)), [x, w])
print("max relative error per input (float64 central differences):", errors)
assert max(errors) < 1e-6

# A tensor used twice gets the sum of both paths' gradients.
a = Tensor(np.array(3.0), requires_grad=True)
(a * a + a).backward()
print("d(a^2 + a)/da at a=3:", a.grad, "(expected 7)")
assert a.grad == 7.0
