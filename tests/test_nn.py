"""nn.py: modules find their parameters, save and load them, switch modes, and differentiate."""

import numpy as np
import pytest

from minqkv import ops
from minqkv.lab.gradcheck import gradcheck
from minqkv.nn import MLP, Dropout, Embedding, LayerNorm, Linear, Module, Parameter
from minqkv.tensor import Tensor


class Stack(Module):
    """Linear -> gelu -> LayerNorm -> Linear, the shape of a Transformer sub-block."""

    def __init__(self, dtype=np.float64):
        rng = np.random.default_rng(0)
        self.inp = Linear(3, 5, dtype=dtype, rng=rng)
        self.norm = LayerNorm(5, dtype=dtype)
        self.out = Linear(5, 2, dtype=dtype, rng=rng)

    def forward(self, x):
        return self.out(self.norm(ops.gelu(self.inp(x))))


class Tied(Module):
    """An embedding table shared with the output head, as in GPT-2."""

    def __init__(self):
        self.embed = Embedding(6, 4)
        self.head = Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


# ---- shapes and dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_maps_last_axis_and_keeps_dtype(dtype):
    layer = Linear(4, 3, dtype=dtype)
    y = layer(Tensor(np.ones((2, 5, 4), dtype=dtype)))
    assert y.shape == (2, 5, 3)
    assert y.dtype == dtype
    assert layer.weight.shape == (4, 3) and layer.bias.shape == (3,)


def test_linear_defaults_to_float32():
    assert Linear(2, 2).weight.dtype == np.float32


def test_linear_without_bias_has_only_a_weight():
    assert [name for name, _ in Linear(2, 3, bias=False).named_parameters()] == ["weight"]


def test_linear_rejects_an_integer_dtype():
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        Linear(2, 3, dtype=np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_looks_up_rows_and_keeps_dtype(dtype):
    table = Embedding(7, 4, dtype=dtype)
    ids = np.array([[0, 6, 2], [1, 1, 5]])
    y = table(ids)
    assert y.shape == (2, 3, 4)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.data[0, 1], table.weight.data[6])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_keeps_shape_and_dtype_and_starts_as_plain_normalisation(dtype):
    norm = LayerNorm(6, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(dtype)
    y = norm(Tensor(x))
    assert y.shape == (2, 3, 6)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.data.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.data.std(-1), 1.0, rtol=1e-3)


def test_layer_norm_without_bias_has_only_a_weight():
    assert [name for name, _ in LayerNorm(4, bias=False).named_parameters()] == ["weight"]


def test_parameter_always_requires_grad_and_rejects_integers():
    assert Parameter(np.zeros(2)).requires_grad
    with pytest.raises(TypeError, match="Parameter: data must be float32 or float64, got int64"):
        Parameter(np.zeros(2, dtype=np.int64))


# ---- finding parameters ------------------------------------------------------------------------


def test_named_parameters_follow_attribute_order_with_dotted_names():
    names = [name for name, _ in Stack().named_parameters()]
    assert names == ["inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"]


def test_own_parameters_come_before_children():
    class Outer(Module):
        def __init__(self):
            self.inner = Linear(2, 2)
            self.scale = Parameter(np.ones(1))

    assert [name for name, _ in Outer().named_parameters()] == ["scale", "inner.weight", "inner.bias"]


def test_modules_in_a_list_are_numbered():
    class Layers(Module):
        def __init__(self):
            self.layers = [Linear(2, 2, bias=False), Linear(2, 2, bias=False)]

    assert [name for name, _ in Layers().named_parameters()] == ["layers.0.weight", "layers.1.weight"]


def test_shared_parameter_is_listed_once_under_its_first_name():
    model = Tied()
    assert [name for name, _ in model.named_parameters()] == ["embed.weight"]
    assert len(model.parameters()) == 1
    assert model.num_parameters() == 6 * 4


def test_num_parameters_counts_every_value():
    assert Stack().num_parameters() == (3 * 5 + 5) + (5 + 5) + (5 * 2 + 2)


def test_zero_grad_clears_every_parameter():
    model = Stack()
    ops.sum(model(Tensor(np.ones((1, 3))))).backward()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---- state_dict ----------------------------------------------------------------------------------


def test_state_dict_round_trip_restores_every_parameter():
    source, target = Stack(), Stack()
    for p in source.parameters():
        p.data += np.random.default_rng(1).standard_normal(p.shape)
    target.load_state_dict(source.state_dict())
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_state_dict_holds_copies_not_views():
    model = Stack()
    state = model.state_dict()
    state["inp.bias"] += 1.0
    np.testing.assert_array_equal(model.inp.bias.data, 0.0)


def test_load_state_dict_writes_in_place_so_optimisers_keep_their_references():
    model = Stack()
    weight = model.inp.weight
    before = weight.data
    model.load_state_dict({name: np.zeros_like(v) for name, v in model.state_dict().items()})
    assert model.inp.weight is weight and weight.data is before
    np.testing.assert_array_equal(before, 0.0)


def test_load_state_dict_names_a_missing_key():
    state = Stack().state_dict()
    del state["norm.bias"]
    with pytest.raises(KeyError, match=r"missing \['norm.bias'\]"):
        Stack().load_state_dict(state)


def test_load_state_dict_names_an_unexpected_key():
    state = Stack().state_dict()
    state["extra.weight"] = np.zeros(2)
    with pytest.raises(KeyError, match=r"unexpected \['extra.weight'\]"):
        Stack().load_state_dict(state)


def test_load_state_dict_names_a_key_with_the_wrong_shape():
    state = Stack().state_dict()
    state["out.weight"] = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"out.weight is float64\[2, 5\] but the model expects "
                                         r"float64\[5, 2\]"):
        Stack().load_state_dict(state)


def test_load_state_dict_names_a_key_with_the_wrong_dtype():
    state = Stack().state_dict()
    state["inp.bias"] = state["inp.bias"].astype(np.float32)
    with pytest.raises(ValueError, match=r"inp.bias is float32\[5\] but the model expects float64\[5\]"):
        Stack().load_state_dict(state)


def test_failed_load_state_dict_changes_nothing():
    model = Stack()
    state = {name: np.ones_like(v) for name, v in model.state_dict().items()}
    state["out.bias"] = np.ones(3)
    with pytest.raises(ValueError):
        model.load_state_dict(state)
    np.testing.assert_array_equal(model.inp.bias.data, 0.0)


# ---- train / eval ----------------------------------------------------------------------------------


def test_eval_and_train_reach_every_child():
    model = MLP(4, 8, dropout=0.5, dtype=np.float64)
    model.eval()
    assert [m.training for m in model.modules()] == [False] * 4
    model.train()
    assert [m.training for m in model.modules()] == [True] * 4


def test_eval_reaches_modules_inside_lists():
    class Layers(Module):
        def __init__(self):
            self.layers = [Linear(2, 2), Linear(2, 2)]

    model = Layers().eval()
    assert not any(layer.training for layer in model.layers)


def test_dropout_module_is_the_identity_in_eval_mode():
    x = Tensor(np.ones((3, 4)))
    layer = Dropout(0.5, np.random.default_rng(0)).eval()
    np.testing.assert_array_equal(layer(x).data, x.data)


def test_dropout_module_drops_in_train_mode():
    out = Dropout(0.5, np.random.default_rng(0))(Tensor(np.ones(100))).data
    assert set(np.unique(out)) == {0.0, 2.0}


def test_dropout_module_rejects_p_of_one():
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1"):
        Dropout(1, np.random.default_rng(0))


# ---- gradients through a stack -------------------------------------------------------------------


def test_linear_gelu_layernorm_linear_stack_passes_gradcheck_over_all_parameters():
    model = Stack()
    rng = np.random.default_rng(2)
    for p in model.parameters():  # away from the initial zeros and ones so every path matters
        p.data += rng.standard_normal(p.shape) * 0.5
    x = Tensor(rng.standard_normal((2, 4, 3)), requires_grad=True)
    errors = gradcheck(lambda *_: model(x), [x] + model.parameters())
    assert max(errors) < 1e-6, errors
