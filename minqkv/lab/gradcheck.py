"""Finite-difference gradient checks: is every backward exactly the derivative of its forward?

gradcheck(fn, inputs) reduces fn's output to a scalar L = sum(out * R) with a fixed random R
(so every output element matters), computes dL/dinput by backward(), and compares it with
central differences (L(x + eps) - L(x - eps)) / 2 eps, one input element at a time, in float64.

The error reported per input is  max |analytic - numeric| / max(|analytic|, |numeric|)
where both maxima run over the elements of that input: an error relative to the scale of
that gradient, which stays meaningful when single elements are near zero. When the whole
gradient is below 1e-12 (an input that does not matter) the absolute difference is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..tensor import Tensor, no_grad

DEFAULT_TOLERANCE = 1e-6


@dataclass
class CheckResult:
    name: str
    dtype: str
    shapes: list
    max_rel_err: float
    per_input: list = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel_err) and self.max_rel_err < self.tolerance)

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shapes": [list(s) for s in self.shapes],
                "max_rel_err": self.max_rel_err, "per_input": self.per_input,
                "tolerance": self.tolerance, "passed": self.passed}


def gradcheck(fn, inputs, eps: float = 1e-5, seed: int = 0, max_elements: int | None = None) -> list:
    """Max relative error between backward() and central differences, one figure per input.

    fn:           callable taking the inputs (Tensors) and returning a Tensor of any shape;
                  it must be deterministic (reseed any randomness inside it)
    inputs:       float64 Tensors with requires_grad=True (model parameters work too)
    max_elements: check at most this many randomly chosen elements per input (None: all)
    """
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor) or not x.requires_grad:
            raise TypeError(f"gradcheck: inputs[{i}] must be a Tensor with requires_grad=True")
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck: inputs[{i}] is {x.dtype}; finite differences need float64")
        if not np.all(np.isfinite(x.data)):
            raise ValueError(f"gradcheck: inputs[{i}] contains NaN or Inf")
    rng = np.random.default_rng(seed)
    out = fn(*inputs)
    weights = rng.standard_normal(out.shape)  # the fixed random projection R

    def scalar_loss() -> float:
        with no_grad():
            return float((fn(*inputs).data * weights).sum())

    for x in inputs:
        x.grad = None
    ops.sum(out * weights).backward()
    return [_compare(x, scalar_loss, eps, rng, max_elements) for x in inputs]


def _compare(x: Tensor, scalar_loss, eps: float, rng, max_elements) -> float:
    analytic = x.grad if x.grad is not None else np.zeros_like(x.data)
    if not x.data.flags.c_contiguous:
        x.data = np.ascontiguousarray(x.data)  # same values; now reshape gives a view
    flat = x.data.reshape(-1)  # a view: perturbing it perturbs x
    chosen = np.arange(flat.size)
    if max_elements is not None and flat.size > max_elements:
        chosen = rng.choice(flat.size, size=max_elements, replace=False)
    numeric = np.empty(len(chosen))
    for n, i in enumerate(chosen):
        original = flat[i]
        flat[i] = original + eps
        plus = scalar_loss()
        flat[i] = original - eps
        minus = scalar_loss()
        flat[i] = original
        numeric[n] = (plus - minus) / (2 * eps)
    analytic = analytic.reshape(-1)[chosen]
    if len(chosen) == 0:
        return 0.0
    scale = max(np.abs(analytic).max(), np.abs(numeric).max())
    diff = np.abs(analytic - numeric).max()
    return float(diff / scale) if scale > 1e-12 else float(diff)


def check(name: str, fn, inputs, **kwargs) -> CheckResult:
    """Run gradcheck and package the result for tables and JSON."""
    per_input = gradcheck(fn, inputs, **kwargs)
    return CheckResult(name=name, dtype=str(inputs[0].dtype), shapes=[x.shape for x in inputs],
                       max_rel_err=max(per_input, default=0.0), per_input=per_input)


def format_table(results) -> str:
    rows = [("check", "shapes", "max rel err", "result")]
    for r in results:
        shapes = " ".join("x".join(map(str, s)) or "()" for s in r.shapes)
        if len(r.shapes) > 4:  # a whole model: summarise
            shapes = f"{len(r.shapes)} tensors, {sum(int(np.prod(s)) for s in r.shapes)} values"
        rows.append((r.name, shapes, f"{r.max_rel_err:.2e}", "pass" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.passed for r in results)
    lines.append(f"\n{len(results) - failed}/{len(results)} checks passed")
    return "\n".join(lines)
