"""The graded checks of every exercise: the learner's code against minqkv's own, and against
float64 central differences (minqkv.lab.gradcheck), on fixed random inputs of several shapes.

A check is a function of the learner's module that raises AssertionError with a sentence when
the code is wrong. run_checks runs an exercise's checks one by one and turns whatever they
raise (an unfinished blank, a wrong shape, an error in the learner's code) into a one-line
message: the learner sees which check failed and why, never a traceback.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import numpy as np

from ... import attention, kernels, ops
from ...model import GPTConfig
from ...tensor import Tensor
from ..gradcheck import gradcheck

CLOSE = 1e-9  # float64 against minqkv's float64: only rounding may differ
GRADCHECK_TOLERANCE = 1e-6  # as minqkv's own gradcheck


@dataclass
class Outcome:
    check: str
    passed: bool
    message: str = ""


def run_checks(name: str, module) -> list:
    """Each check of exercise `name` on the learner's `module` -> [Outcome]."""
    outcomes = []
    for title, check in CHECKS[name]:
        try:
            check(module)
            outcomes.append(Outcome(title, True))
        except NotImplementedError:
            outcomes.append(Outcome(title, False, "not implemented yet: replace the "
                                    "`raise NotImplementedError(\"your code here\")` with your code"))
        except AssertionError as wrong:
            outcomes.append(Outcome(title, False, str(wrong)))
        except Exception as error:  # the learner's code failed: say what and where, briefly
            outcomes.append(Outcome(title, False, f"{type(error).__name__}: {error}{_where(error, module)}"))
    return outcomes


def _where(error: Exception, module) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == getattr(module, "__file__", None)]
    return f" (line {frames[-1].lineno} of your {frames[-1].name})" if frames else ""


# ---- comparisons -------------------------------------------------------------------------------


def _close(what: str, got, want, tolerance: float = CLOSE) -> None:
    """got equals want to `tolerance` relative to want's scale, with the same shape."""
    if isinstance(got, Tensor):
        got = got.data
    if got is None:
        raise AssertionError(f"{what} is None; expected an array of shape {np.shape(want)}")
    got = np.asarray(got, dtype=np.float64)
    if got.shape != np.shape(want):
        raise AssertionError(f"{what} has shape {got.shape}, expected {np.shape(want)}")
    error = float(np.abs(got - want).max(initial=0.0))
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    if not error <= tolerance * scale:
        raise AssertionError(f"{what} differs from minqkv's by up to {error:.3g} (allowed {tolerance * scale:.1g})")


def _described(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"{len(value)} values"
    return f"{type(value).__name__} of shape {np.shape(value)}" if hasattr(value, "shape") else type(value).__name__


def _reference_grads(op, arrays, grad) -> list:
    """The gradients minqkv's own op sends to each input, for the output gradient `grad`."""
    tensors = [Tensor(x.copy(), requires_grad=True) for x in arrays]
    op(*tensors).backward(grad)
    return [t.grad for t in tensors]


def _with_backward(forward, backward):
    """A Tensor op computing forward(*arrays), whose backward is the learner's backward(*arrays, g)."""
    def op(*tensors):
        arrays = [t.data for t in tensors]
        return Tensor.from_op(forward(*arrays), tuple(tensors), lambda g: tuple(backward(*arrays, g)), "exercise")
    return op


def _gradchecked(op, arrays, names) -> None:
    """The gradients of op (through its backward) match central differences, input by input."""
    errors = gradcheck(op, [Tensor(x.copy(), requires_grad=True) for x in arrays])
    for name, error in zip(names, errors):
        if not error < GRADCHECK_TOLERANCE:
            raise AssertionError(f"d{name} disagrees with finite differences: relative error {error:.3g} "
                                 f"(allowed {GRADCHECK_TOLERANCE:.0e})")


def _random(seed: int, *shapes) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in shapes]


def _backward_checks(learner_backward, forward, reference_op, names, cases, gradcheck_case) -> list:
    """Checks of a backward: against minqkv's gradients on each case, then finite differences.

    learner_backward(module) is the learner's backward as a function (*inputs, grad) -> tuple of
    one gradient per name; forward(*inputs) computes the op on arrays; reference_op is minqkv's."""
    def against_minqkv(shapes, seed):
        def check(module):
            arrays = _random(seed, *shapes)
            out = forward(*arrays)
            grad = _random(seed + 1, out.shape)[0]
            got = learner_backward(module)(*arrays, grad)
            if not isinstance(got, (tuple, list)) or len(got) != len(names):
                raise AssertionError(f"return a tuple of {len(names)} gradients "
                                     f"({', '.join('d' + n for n in names)}); got {_described(got)}")
            for name, g, want in zip(names, got, _reference_grads(reference_op, arrays, grad)):
                _close(f"d{name}", g, want)
        return check

    def against_finite_differences(module):
        backward = learner_backward(module)
        arrays = _random(99, *gradcheck_case)
        out = forward(*arrays)
        for name, g, x in zip(names, backward(*arrays, np.ones(out.shape)), arrays):
            if np.shape(g) != x.shape:
                raise AssertionError(f"d{name} has shape {np.shape(g)}, expected {x.shape}")
        _gradchecked(_with_backward(forward, backward), arrays, names)

    def shape_text(shapes):
        return " and ".join("x".join(map(str, s)) or "()" for s in shapes)

    checks = [(f"against minqkv, {shape_text(shapes)}", against_minqkv(shapes, seed))
              for seed, shapes in enumerate(cases)]
    checks.append((f"finite differences, {shape_text(gradcheck_case)}", against_finite_differences))
    return checks


# ---- the four backward passes --------------------------------------------------------------------

MUL = _backward_checks(
    lambda m: m.mul_backward, lambda a, b: a * b, ops.mul, ["a", "b"],
    cases=[((3, 5), (3, 5)), ((4, 1), (5,)), ((2, 3, 1), (1, 7)), ((6,), (2, 1, 6))],
    gradcheck_case=((3, 1), (2, 1, 4)))

MATMUL = _backward_checks(
    lambda m: m.matmul_backward, lambda a, b: a @ b, ops.matmul, ["a", "b"],
    cases=[((3, 4), (4, 5)), ((1, 7), (7, 1)), ((5, 2), (2, 6))],
    gradcheck_case=((3, 5), (5, 2)))


def _softmax(x: np.ndarray) -> np.ndarray:
    return kernels.softmax_numpy(x)


SOFTMAX = _backward_checks(
    lambda m: (lambda x, g: (m.softmax_backward(_softmax(x), g),)), _softmax, ops.softmax, ["x"],
    cases=[((5,),), ((3, 7),), ((2, 3, 4),)],
    gradcheck_case=((3, 5),))


def _layer_norm(x, weight, bias):
    return kernels.layer_norm_numpy(x, weight, bias)[0]


LAYER_NORM = _backward_checks(
    lambda m: (lambda x, w, b, g: m.layer_norm_backward(x, w, g)), _layer_norm, ops.layer_norm,
    ["x", "weight", "bias"],
    cases=[((4, 6), (6,), (6,)), ((2, 3, 5), (5,), (5,)), ((1, 7), (7,), (7,))],
    gradcheck_case=((3, 5), (5,), (5,)))


def _targets(logits_shape) -> np.ndarray:
    """Fixed targets for logits of this shape: every fourth position (from the second) ignored."""
    n, vocab = int(np.prod(logits_shape[:-1])), logits_shape[-1]
    targets = (np.arange(n) * 7 + 3) % vocab
    targets[1::4] = -1
    return targets.reshape(logits_shape[:-1])


CROSS_ENTROPY = _backward_checks(
    lambda m: (lambda logits, g: (m.cross_entropy_backward(logits, _targets(logits.shape), g),)),
    lambda logits: ops.cross_entropy(Tensor(logits), _targets(logits.shape)).data,
    lambda t: ops.cross_entropy(t, _targets(t.shape)), ["logits"],
    cases=[((4, 7),), ((2, 3, 5),), ((1, 11),)],
    gradcheck_case=((5, 6),))


# ---- attend ----------------------------------------------------------------------------------------


def _attend_case(B, H, Hkv, T, Tk, hd, seed):
    def check(module):
        q, k, v = _random(seed, (B, H, T, hd), (B, Hkv, Tk, hd), (B, Hkv, Tk, hd))
        want = attention.attend(Tensor(q), Tensor(k), Tensor(v)).data
        got = module.attend(q, k, v)
        if np.shape(got) == (B, H, T, hd) and (B, H, T, hd) != want.shape:
            raise AssertionError(f"y has shape {(B, H, T, hd)}: merge the heads into (B, T, H * hd) = {want.shape}")
        _close("y", got, want)
    return check


ATTEND = [
    ("one head, T = Tk = 4", _attend_case(1, 1, 1, 4, 4, 3, 0)),
    ("2 heads, T = Tk = 5, hd = 3", _attend_case(2, 2, 2, 5, 5, 3, 1)),
    ("one new query after 5 cached tokens", _attend_case(1, 3, 3, 1, 6, 4, 2)),
    ("3 queries after 4 cached tokens, 4 query heads over 2 key heads (GQA)", _attend_case(2, 4, 2, 3, 7, 2, 3)),
    ("3 query heads over one key head (MQA)", _attend_case(1, 3, 1, 4, 4, 5, 4)),
]


# ---- project for the tied code 'abb' ---------------------------------------------------------------


def _project_case(B, T, C, H, Hkv, seed):
    def check(module):
        config = GPTConfig(n_embd=C, n_head=H, n_kv_head=Hkv, n_layer=1, code="abb", dtype="float64")
        layer = attention.CausalSelfAttention(config.attention_spec(0), dtype=np.float64)
        x, w_a, w_b = _random(seed, (B, T, C), layer.weight("a").shape, layer.weight("b").shape)
        layer.weight("a").data[...] = w_a
        layer.weight("b").data[...] = w_b
        want = [t.data for t in layer.project(Tensor(x))]
        got = module.project_shared_kv(x, w_a, w_b, H, Hkv)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise AssertionError("return the three arrays q, k, v")
        for role, g, w in zip("qkv", got, want):
            _close(role, g, w)
    return check


def _k_is_v(module):
    x, w_a, w_b = _random(7, (1, 3, 8), (8, 8), (8, 8))
    _, k, v = module.project_shared_kv(x, w_a, w_b, 2)
    if not np.shares_memory(k, v):
        raise AssertionError("k and v are two arrays; 'abb' ties them: compute x @ w_b once and return it as both")


PROJECT = [
    ("B=2, T=5, C=12, 3 heads", _project_case(2, 5, 12, 3, None, 0)),
    ("B=1, T=1, C=10, 2 heads of width 5", _project_case(1, 1, 10, 2, None, 1)),
    ("B=2, T=3, C=12, 4 query heads, 2 key/value heads (W_b is 12x6)", _project_case(2, 3, 12, 4, 2, 2)),
    ("k and v are one array, computed once", _k_is_v),
]


# ---- the KV cache's append ------------------------------------------------------------------------------


def _appends(sizes, seed, width_k=6, width_v=4, B=2):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((B, n, width_k)), rng.standard_normal((B, n, width_v))) for n in sizes]


def _same_as_minqkv(module):
    learner, reference = module.KVCache(), attention.KVCache()
    for step, (k, v) in enumerate(_appends([3, 1, 1, 2, 1], 0)):
        got, want = learner.append(k, v), reference.append(k, v)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError("append returns the pair (k_source, v_source)")
        _close(f"k_source after append {step + 1}", got[0], want[0])
        _close(f"v_source after append {step + 1}", got[1], want[1])
        if learner.length != reference.length:
            raise AssertionError(f"length is {learner.length} after append {step + 1}, expected {reference.length}")


def _earlier_views_kept(module):
    cache = module.KVCache()
    views, steps = [], _appends([2] + [1] * 9, 1)
    for k, v in steps:
        views.append(cache.append(k, v))
    all_k = np.concatenate([k for k, _ in steps], axis=1)
    for n, (k_view, _) in enumerate(views):
        _close(f"the keys handed out by append {n + 1} (read after the last append)", k_view,
               all_k[:, :k_view.shape[1]])


def _shared_kv_cached_once(module):
    cache = module.KVCache()
    steps = _appends([2, 1, 3], 2)
    for k, _ in steps:
        k_all, v_all = cache.append(k, None)
    if v_all is not None or cache.v_source is not None:
        raise AssertionError("append(k, None) (K and V tied) must cache no values: v_source should be None")
    _close("k_source", k_all, np.concatenate([k for k, _ in steps], axis=1))


def _grows_by_doubling(module):
    cache, capacities = module.KVCache(), []
    for k, v in _appends([1] * 100, 3, width_k=2, width_v=2, B=1):
        cache.append(k, v)
        capacities.append(cache.capacity)
    grown = sum(1 for before, after in zip([0] + capacities, capacities) if after != before)
    if grown > 8:
        raise AssertionError(f"the buffer was replaced {grown} times in 100 one-token appends (each time copying "
                             f"the past): grow it to twice its capacity when full, which replaces it 8 times")
    if min(capacities[i] - (i + 1) for i in range(100)) < 0:
        raise AssertionError("capacity fell below length: the buffer must hold every cached token")


KV_CACHE = [
    ("appends of 3, 1, 1, 2, 1 tokens: same keys and values as minqkv's KVCache", _same_as_minqkv),
    ("views handed out earlier keep their values", _earlier_views_kept),
    ("append(k, None) caches the tied K and V once", _shared_kv_cached_once),
    ("100 one-token appends replace the buffer O(log n) times", _grows_by_doubling),
]


# ---- the hard-concrete gate ----------------------------------------------------------------------------

GATE_LOG_ALPHAS = np.array([-5.0, -2.5, -1.0, 0.0, 0.7, 2.0, 2.5, 5.0])


def _gate_values(noise):
    def check(module):
        got = module.hard_concrete(Tensor(GATE_LOG_ALPHAS.copy()), None if noise is None else noise.copy())
        if not isinstance(got, Tensor):
            raise AssertionError(f"return a minqkv Tensor (build z with ops.sigmoid and ops.clip), "
                                 f"not {type(got).__name__}")
        _close("z", got, attention.hard_concrete(Tensor(GATE_LOG_ALPHAS.copy()), noise).data)
    return check


def _exactly_open_or_shut(module):
    z = module.hard_concrete(Tensor(np.array([-4.0, 4.0]))).data
    if not (z[0] == 0.0 and z[1] == 1.0):
        raise AssertionError(f"log_alpha -4 and 4 should give z exactly 0 and 1, got {z[0]:.6g} and {z[1]:.6g}: "
                             f"stretch s to (GAMMA, ZETA), then clip to [0, 1]")


def _gate_gradcheck(noise):
    def check(module):
        log_alpha = np.array([-1.0, 0.3, 0.8])  # inside the stretch, where z is smooth
        _gradchecked(lambda la: module.hard_concrete(la, noise), [log_alpha], ["log_alpha"])
    return check


GATE_NOISE = np.random.default_rng(5).uniform(0.01, 0.99, len(GATE_LOG_ALPHAS))

HARD_CONCRETE = [
    ("deterministic z (no noise) of 8 log_alphas from -5 to 5", _gate_values(None)),
    ("sampled z with fixed noise", _gate_values(GATE_NOISE)),
    ("exactly 0 and exactly 1 beyond the stretch", _exactly_open_or_shut),
    ("finite differences, no noise", _gate_gradcheck(None)),
    ("finite differences, with noise", _gate_gradcheck(np.array([0.4, 0.5, 0.6]))),
]

CHECKS = {
    "mul_backward": MUL,
    "matmul_backward": MATMUL,
    "softmax_backward": SOFTMAX,
    "layer_norm_backward": LAYER_NORM,
    "cross_entropy_backward": CROSS_ENTROPY,
    "attend": ATTEND,
    "project_shared_kv": PROJECT,
    "kv_cache": KV_CACHE,
    "hard_concrete": HARD_CONCRETE,
}
