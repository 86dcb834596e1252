import math

import numpy as np
import pytest

from minqkv.nn import Parameter
from minqkv.optim import AdamW, clip_grad_norm, cosine_lr, decays


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("block.attn.w_q", Parameter(rng.standard_normal((4, 3)).astype(dtype))),
        ("block.ln.bias", Parameter(rng.standard_normal(3).astype(dtype))),
        ("token_embedding.weight", Parameter(rng.standard_normal((5, 3)).astype(dtype))),
    ]


def set_grads(named, rng):
    for _, p in named:
        p.grad = rng.standard_normal(p.data.shape).astype(p.data.dtype)


# ---- AdamW -------------------------------------------------------------------------------


def test_one_step_matches_the_adamw_formula():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.95), 1e-8, 0.1
    named = make_params()
    set_grads(named, np.random.default_rng(1))
    before = {n: p.data.copy() for n, p in named}
    AdamW(named, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd).step()
    for name, p in named:
        g, w = p.grad, before[name]
        if decays(name, p):
            w = w * (1 - lr * wd)
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g**2 / (1 - b2)
        np.testing.assert_allclose(p.data, w - lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-12)


def test_bias_correction_over_several_steps_matches_the_formula():
    lr, (b1, b2), eps, wd = 0.05, (0.8, 0.9), 1e-6, 0.2
    named = make_params()
    weights = {n: p.data.copy() for n, p in named}
    moments = {n: (np.zeros_like(p.data), np.zeros_like(p.data)) for n, p in named}
    optimiser = AdamW(named, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    rng = np.random.default_rng(4)
    for t in range(1, 6):
        set_grads(named, rng)
        optimiser.step()
        for name, p in named:
            m, v = moments[name]
            m, v = b1 * m + (1 - b1) * p.grad, b2 * v + (1 - b2) * p.grad**2
            moments[name] = m, v
            w = weights[name] * (1 - lr * wd) if decays(name, p) else weights[name]
            weights[name] = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    for name, p in named:
        np.testing.assert_allclose(p.data, weights[name], rtol=1e-12)


def test_several_steps_match_torch_adamw_in_float64():
    torch = pytest.importorskip("torch")
    named = make_params()
    reference = [torch.tensor(p.data.copy(), requires_grad=True) for _, p in named]
    ours = AdamW(named, lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    decayed = [t for (n, p), t in zip(named, reference) if decays(n, p)]
    kept = [t for (n, p), t in zip(named, reference) if not decays(n, p)]
    theirs = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.3}, {"params": kept, "weight_decay": 0.0}],
        lr=0.02, betas=(0.8, 0.9), eps=1e-6,
    )
    rng = np.random.default_rng(2)
    for _ in range(5):
        set_grads(named, rng)
        for (_, p), t in zip(named, reference):
            t.grad = torch.tensor(p.grad.copy())
        ours.step()
        theirs.step()
    for (_, p), t in zip(named, reference):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_weight_decay_skips_vectors_and_embeddings():
    named = dict(make_params())
    assert decays("block.attn.w_q", named["block.attn.w_q"])
    assert not decays("block.ln.bias", named["block.ln.bias"])
    assert not decays("token_embedding.weight", named["token_embedding.weight"])
    assert AdamW.decays("block.attn.w_q", named["block.attn.w_q"])


def test_zero_gradient_only_shrinks_decayed_parameters():
    named = make_params()
    for _, p in named:
        p.grad = np.zeros_like(p.data)
    before = {n: p.data.copy() for n, p in named}
    AdamW(named, lr=0.1, weight_decay=0.5).step()
    for name, p in named:
        expected = before[name] * (1 - 0.1 * 0.5) if decays(name, p) else before[name]
        np.testing.assert_array_equal(p.data, expected)


def test_float32_parameters_stay_float32():
    named = make_params(np.float32)
    set_grads(named, np.random.default_rng(0))
    optimiser = AdamW(named)
    optimiser.step(lr=np.float64(0.01))
    for name, p in named:
        assert p.data.dtype == np.float32
        assert optimiser.state[name]["m"].dtype == optimiser.state[name]["v"].dtype == np.float32


def test_parameters_without_grad_are_skipped():
    named = make_params()
    set_grads(named, np.random.default_rng(0))
    named[1][1].grad = None
    frozen = named[1][1].data.copy()
    optimiser = AdamW(named)
    optimiser.step()
    np.testing.assert_array_equal(named[1][1].data, frozen)
    assert "block.ln.bias" not in optimiser.state


def test_step_lr_overrides_for_one_step_only():
    a, b = make_params(), make_params()
    set_grads(a, np.random.default_rng(0))
    set_grads(b, np.random.default_rng(0))
    slow = AdamW(a, lr=0.5)
    slow.step(lr=0.01)
    AdamW(b, lr=0.01).step()
    for (_, p), (_, q) in zip(a, b):
        np.testing.assert_array_equal(p.data, q.data)
    assert slow.lr == 0.5


def test_zero_grad_sets_grads_to_none():
    named = make_params()
    set_grads(named, np.random.default_rng(0))
    AdamW(named).zero_grad()
    assert all(p.grad is None for _, p in named)


def test_state_dict_round_trip_continues_bit_identically():
    rng = np.random.default_rng(3)
    shapes = [p.data.shape for _, p in make_params()]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]

    def run(optimiser, named, steps):
        for step_grads in steps:
            for (_, p), g in zip(named, step_grads):
                p.grad = g.copy()
            optimiser.step(lr=cosine_lr(optimiser.step_count, 0.01, 0.001, 2, 6))

    straight = make_params(np.float32)
    run(AdamW(straight), straight, grads)

    first = make_params(np.float32)
    optimiser = AdamW(first)
    run(optimiser, first, grads[:3])
    saved_weights = [p.data.copy() for _, p in first]
    saved_state = optimiser.state_dict()
    run(optimiser, first, grads[3:4])  # must not leak into saved_state

    resumed = make_params(np.float32)
    for (_, p), w in zip(resumed, saved_weights):
        p.data = w
    optimiser = AdamW(resumed, lr=123.0)
    optimiser.load_state_dict(saved_state)
    run(optimiser, resumed, grads[3:])
    assert optimiser.lr == AdamW(make_params()).lr
    for (_, p), (_, q) in zip(straight, resumed):
        np.testing.assert_array_equal(p.data, q.data)


def test_load_state_dict_rejects_unknown_or_misshapen_state():
    named = make_params()
    set_grads(named, np.random.default_rng(0))
    optimiser = AdamW(named)
    optimiser.step()
    saved = optimiser.state_dict()
    saved["params"]["nowhere"] = saved["params"].pop("block.attn.w_q")
    with pytest.raises(ValueError, match="'nowhere'"):
        AdamW(make_params()).load_state_dict(saved)
    saved = optimiser.state_dict()
    saved["params"]["block.ln.bias"]["m"] = np.zeros(7)
    with pytest.raises(ValueError, match="'block.ln.bias' m"):
        AdamW(make_params()).load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"lr": math.inf}, "lr must be a finite number, got inf"),
        ({"eps": math.inf}, "eps must be a finite number, got inf"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number, got inf"),
        ({"betas": (1.0, 0.9)}, r"beta1 must be in \[0, 1\), got 1.0"),
        ({"betas": (0.9, -0.1)}, r"beta2 must be in \[0, 1\), got -0.1"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW(make_params(), **kwargs)


@pytest.mark.parametrize("lr, message", [(-1.0, "lr must be >= 0, got -1.0"), (math.nan, "lr must be a finite number")])
def test_a_bad_lr_for_one_step_is_refused(lr, message):
    named = make_params()
    set_grads(named, np.random.default_rng(1))
    with pytest.raises(ValueError, match=message):
        AdamW(named).step(lr=lr)


def test_duplicate_names_and_shared_parameters_are_refused():
    named = make_params()
    with pytest.raises(ValueError, match="named 'block.attn.w_q'"):
        AdamW([named[0], named[0]])
    with pytest.raises(ValueError, match="passed twice"):
        AdamW([named[0], ("tied", named[0][1])])


def test_grad_of_another_dtype_is_an_error_not_an_upcast():
    named = make_params(np.float32)
    named[0][1].grad = np.zeros(named[0][1].data.shape, dtype=np.float64)
    with pytest.raises(ValueError, match="'block.attn.w_q'.*float64"):
        AdamW(named[:1]).step()


# ---- cosine schedule ---------------------------------------------------------------------


def test_cosine_schedule_endpoints():
    assert 0 < cosine_lr(0, 1.0, 0.1, 10, 100) <= 0.1
    assert cosine_lr(10, 1.0, 0.1, 10, 100) == 1.0
    assert cosine_lr(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(1000, 1.0, 0.1, 10, 100) == 0.1
    assert cosine_lr(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)


def test_cosine_schedule_rises_then_falls():
    lrs = [cosine_lr(s, 3e-3, 3e-4, 20, 200) for s in range(250)]
    warmup, decay = np.diff(lrs[:21]), np.diff(lrs[20:])
    assert (warmup > 0).all()
    assert (decay <= 0).all()
    assert max(lrs) == 3e-3


def test_cosine_schedule_without_warmup_starts_at_max():
    assert cosine_lr(0, 1.0, 0.0, 0, 10) == 1.0


def test_cosine_schedule_refuses_bad_arguments():
    with pytest.raises(ValueError, match="min_lr <= max_lr"):
        cosine_lr(0, 0.1, 1.0, 0, 10)
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        cosine_lr(0, 1.0, 0.1, 20, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine_lr(-1, 1.0, 0.1, 0, 10)


# ---- gradient clipping -------------------------------------------------------------------


def test_clip_returns_the_global_norm_and_scales_to_max_norm():
    params = [Parameter(np.zeros(2, np.float32)), Parameter(np.zeros((1, 1), np.float32))]
    params[0].grad = np.array([3.0, 0.0], np.float32)
    params[1].grad = np.array([[4.0]], np.float32)
    assert clip_grad_norm(params, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(params[0].grad, [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(params[1].grad, [[0.8]], rtol=1e-6)
    assert params[0].grad.dtype == np.float32


def test_clip_leaves_small_gradients_alone_and_skips_none():
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(2))]
    params[0].grad = np.array([0.3, 0.4])
    assert clip_grad_norm(params, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(params[0].grad, [0.3, 0.4])


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_returns_a_non_finite_norm_without_touching_grads(bad):
    params = [Parameter(np.zeros(2))]
    params[0].grad = np.array([bad, 1.0])
    norm = clip_grad_norm(params, 1.0)
    assert not math.isfinite(norm)
    assert params[0].grad[1] == 1.0


def test_clip_needs_a_positive_max_norm():
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm([], 0.0)


def test_a_parameter_with_an_lr_scale_moves_that_many_times_further():
    plain, scaled = Parameter(np.zeros(3)), Parameter(np.zeros(3))
    opt = AdamW([("plain", plain), ("gate", scaled)], lr=0.01, weight_decay=0.0, lr_scale={"gate": 5.0})
    plain.grad, scaled.grad = np.ones(3), np.ones(3)
    opt.step()
    np.testing.assert_allclose(scaled.data, 5.0 * plain.data, rtol=1e-12)
    assert plain.data[0] == pytest.approx(-0.01)


def test_lr_scale_of_an_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="not parameters"):
        AdamW([("w", Parameter(np.zeros(2)))], lr_scale={"gate_q": 2.0})


def test_an_infinite_lr_scale_is_refused():
    """gate_lr / lr can overflow to inf even when both are finite."""
    with pytest.raises(ValueError, match="lr_scale factor must be > 0 and finite"):
        AdamW([("gate_q", Parameter(np.zeros(1)))], lr=1e-300, lr_scale={"gate_q": 1e308 / 1e-300})
