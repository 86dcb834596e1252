"""The step bench times one computation on both sides: the same GPT, weights, batch and optimiser."""

from dataclasses import replace

import pytest

from minqkv.lab import bench_step
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW
from minqkv.train import TrainConfig

torch = pytest.importorskip("torch")
torch_gpt = pytest.importorskip("minqkv.lab.torch_gpt")


def test_the_default_shape_is_the_default_model_at_trains_batch_size():
    default = GPTConfig()
    assert bench_step.STEP_SHAPES["default"] == (default.n_layer, default.n_head, default.n_embd,
                                                 default.block_size, TrainConfig.batch_size)


def test_both_sides_start_from_one_loss_and_take_the_same_adamw_steps():
    shape = bench_step.STEP_SHAPES["nanogpt-cpu"]
    config = replace(bench_step._config(shape, seed=0), dtype="float64")
    ids = bench_step._batch(shape, seed=0)
    model = GPT(config)
    weights = torch_gpt.weights_of(model)
    optimizers = AdamW(model.named_parameters(), **bench_step.ADAMW), torch_gpt.adamw(weights, **bench_step.ADAMW)
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        reference = torch_gpt.loss(weights, config, torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]))
        assert float(loss.data) == pytest.approx(reference.item(), rel=1e-9)
        model.zero_grad()
        loss.backward()
        optimizers[1].zero_grad()
        reference.backward()
        for optimizer in optimizers:
            optimizer.step()
