# %% [markdown]
# # Lesson 2: gradient checking, and catching a broken backward
#
# Run: `python tutorials/02_gradcheck.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `02_gradcheck_eps.png`.
#
# Lesson 1 trusted each op's backward closure. A closure is hand-written math, and a wrong
# sign or a missing factor would not crash anything: training would only get worse, silently.
# So every op and every attention variant in minqkv is **checked** against an estimate of the
# gradient that needs no calculus at all: nudge one input, watch the output.

# %%
import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

import minqkv.lab.cli
from minqkv import ops
from minqkv.lab.gradcheck import gradcheck
from minqkv.tensor import Tensor

parser = argparse.ArgumentParser(description="Lesson 2: gradient checking")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson02-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Central differences
#
# For a function L of one number x, the slope is approximately
#
#     forward difference:  (L(x + eps) - L(x)) / eps             error ~ eps
#     central difference:  (L(x + eps) - L(x - eps)) / (2 eps)   error ~ eps^2
#
# The central one is far more accurate (its first error terms cancel by symmetry). But eps
# cannot be made arbitrarily small: L(x + eps) and L(x - eps) become nearly equal numbers, and
# subtracting them loses the digits that floating point keeps. The best eps balances the two
# errors. Let us measure it on L(x) = tanh(x)^3 at x = 0.7, whose slope we know exactly.

# %%


def L(x):
    return np.tanh(x) ** 3


x0 = 0.7
exact = 3 * np.tanh(x0) ** 2 * (1 - np.tanh(x0) ** 2)
epsilons = np.logspace(-12, -1, 45)
errors = {}
for dtype in (np.float32, np.float64):
    errs = []
    for eps in epsilons:
        xp, xm = dtype(x0 + eps), dtype(x0 - eps)  # the inputs, rounded to the dtype
        central = (L(xp) - L(xm)) / dtype(2 * eps)
        errs.append(abs(float(central) - exact) / abs(exact))
    errors[np.dtype(dtype).name] = np.array(errs)
    best = np.nanargmin(errs)
    at_default = np.argmin(np.abs(np.log(epsilons / 1e-5)))  # the eps nearest gradcheck's default, 1e-5
    print(f"{np.dtype(dtype).name}: best relative error {errs[best]:.1e} at eps = {epsilons[best]:.0e};"
          f"  {errs[at_default]:.1e} at eps = {epsilons[at_default]:.0e}")

# %% [markdown]
# The picture (`02_gradcheck_eps.png`) is a V: on the right the approximation error shrinks
# like eps^2; on the left rounding error grows like 1/eps. As printed above, float64's best is a
# few 1e-13 (eps near 1e-6), and at gradcheck's default, eps = 1e-5, about 1e-10; float32's best
# is a few 1e-6, only near eps = 3e-4, and at eps = 1e-5 it is already about 1e-3.
# That is why **gradient checks run in float64**, even though training uses float32: in float32
# a correct gradient and a slightly wrong one look the same.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for name, errs in errors.items():
    ax.loglog(epsilons, errs, marker=".", label=name)
ax.set(xlabel="eps", ylabel="relative error of the central difference",
       title="too small an eps loses digits; too large, accuracy")
ax.legend()
fig.savefig(out / "02_gradcheck_eps.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "02_gradcheck_eps.png")

# %% [markdown]
# ## 2. The relative error, and `minqkv.lab.gradcheck`
#
# For a tensor input, we do the same for each element in turn. To check a function with a
# non-scalar output, `gradcheck` first reduces it to one number, L = sum(out * R) with a fixed
# random R, so that every output element matters. It then compares the engine's dL/dx with the
# central differences and reports one number per input:
#
#     max |analytic - numeric|  /  max(|analytic|, |numeric|)
#
# an error **relative to the size of that gradient**, so it means the same thing whether the
# gradient is 1e-3 or 1e3. Below 1e-6 passes. Here we do it once by hand and once with the
# package, on softmax followed by a product:

# %%
rng = np.random.default_rng(0)
A = Tensor(rng.standard_normal((3, 5)), requires_grad=True)
B = Tensor(rng.standard_normal((5, 2)), requires_grad=True)


def fn(a, b):
    return ops.softmax(a) @ b  # (3, 5) @ (5, 2) -> (3, 2)


R = np.random.default_rng(0).standard_normal((3, 2))  # what gradcheck draws with seed 0
A.grad = None
ops.sum(fn(A, B) * R).backward()
numeric = np.zeros_like(A.data)
eps = 1e-5
for i in np.ndindex(A.shape):
    keep = A.data[i]
    A.data[i] = keep + eps
    plus = float((fn(A, B).data * R).sum())
    A.data[i] = keep - eps
    minus = float((fn(A, B).data * R).sum())
    A.data[i] = keep
    numeric[i] = (plus - minus) / (2 * eps)
by_hand = np.abs(A.grad - numeric).max() / max(np.abs(A.grad).max(), np.abs(numeric).max())
package = gradcheck(fn, [A, B])
print(f"by hand, input A: {by_hand:.2e};  gradcheck: A {package[0]:.2e}, B {package[1]:.2e}")
assert by_hand < 1e-8 and max(package) < 1e-6

# %% [markdown]
# ## 3. Break a backward on purpose
#
# `minqkv gradcheck` (the command) runs this check on every op in `minqkv/ops.py`. Let us plant
# a classic mistake: tanh's derivative is 1 - tanh^2, and we "forget" the square. The forward
# is untouched, so every output of the program stays correct; only learning would suffer.
#
# We swap the broken op into the module (the checks look up `ops.tanh` when they run),
# run the command through its Python entry point `minqkv.lab.cli.main`, and put the original back
# in a `finally` so the rest of the program is never affected.

# %%


def broken_tanh(x):
    out = np.tanh(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * (1 - out),), "tanh")  # wrong: 1 - tanh, not 1 - tanh^2


def run_gradcheck_command() -> tuple:
    """Run `minqkv gradcheck`, return (exit code, the table's failing lines)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = minqkv.lab.cli.main(["gradcheck"])
    lines = text.getvalue().splitlines()
    return code, [line for line in lines if "FAIL" in line] + lines[-1:]


original_tanh = ops.tanh
ops.tanh = broken_tanh
try:
    broken_code, broken_lines = run_gradcheck_command()
finally:
    ops.tanh = original_tanh
fixed_code, fixed_lines = run_gradcheck_command()

print("with the broken tanh, exit code", broken_code)
print("\n".join(broken_lines))
print("after restoring it, exit code", fixed_code, "-", fixed_lines[-1])

# %% [markdown]
# The check names the op, and its relative error is not a rounding-sized 1e-10 but order one:
# an unmistakable signal. The command's exit code (1 for a failure) is what CI looks at.
# `minqkv gradcheck --variant all` does the same for a whole tiny GPT in every attention
# variant, every parameter at once.
#
# **What you learned:** central differences in float64 estimate a gradient to about 1e-10 or
# better (1e-11 on the softmax product above), float32 ones only to about 1e-5 at best;
# comparing them with the engine, relative to the gradient's size, catches any wrong backward.

# %%
assert errors["float64"].min() < 1e-11 < 1e-7 < np.nanmin(errors["float32"])  # float64 wins by far
assert broken_code == 1 and any(line.startswith("tanh") for line in broken_lines)
assert fixed_code == 0
assert np.nanmin(errors["float64"]) < 1e-9 < np.nanmin(errors["float32"])
assert (out / "02_gradcheck_eps.png").exists()
print("lesson 2 done")
