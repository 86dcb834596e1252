"""Optimisation: AdamW, the cosine learning-rate schedule, and gradient clipping.

A parameter is a Tensor (a Parameter) whose `.data` is a float32 or float64 array, updated in
place (through writable_data(): a graph recorded before the step then refuses backward), and
whose `.grad` is an array of the same shape and dtype, or None when it got no gradient this step.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels


def decays(name: str, param) -> bool:
    """Whether AdamW applies weight decay to this parameter.

    Decayed: matrices (ndim 2), i.e. the weights of Linear layers and attention projections.
    Not decayed: biases, LayerNorm gains and gates (ndim 1), embeddings (any name containing 'emb'),
    and the per-head tables of attention (ndim 3: rotation generators, 2-D position biases):
    pulling them towards zero only fights what they are for.
    """
    return np.ndim(param.data) == 2 and "emb" not in name.lower()


# What each of AdamW's numbers must be: (test, the rule in words)
HYPERPARAMETER_RULES = {
    "lr": (lambda x: x >= 0, ">= 0"),
    "beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "eps": (lambda x: x > 0, "> 0"),
    "weight_decay": (lambda x: x >= 0, ">= 0"),
}


def check_hyperparameters(**numbers) -> None:
    """Check AdamW's numbers given by name (lr, beta1, beta2, eps, weight_decay), each once, here:
    AdamW calls this, and so does TrainConfig for the ones it sets. Errors name the field."""
    for name, value in numbers.items():
        if not math.isfinite(value):  # first, as inf passes '>= 0'
            raise ValueError(f"{name} must be a finite number, got {value}")
        test, rule = HYPERPARAMETER_RULES[name]
        if not test(value):
            raise ValueError(f"{name} must be {rule}, got {value}")


def _check_betas(betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"AdamW: betas must be two numbers (beta1, beta2), got {betas}")
    check_hyperparameters(beta1=betas[0], beta2=betas[1])


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as in torch.optim.AdamW.

    For each parameter p with gradient g, at its t-th update:
        p <- p - lr * weight_decay * p                   (only where decays(name, p))
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    m and v have the parameter's dtype, so float32 stays float32.
    A parameter whose grad is None is left alone and its t does not advance.
    lr_scale {name: factor} gives some parameters their own learning rate, lr * factor
    (gated models: the gates), following the same schedule.
    """

    decays = staticmethod(decays)

    def __init__(self, named_params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 lr_scale: dict | None = None):
        _check_betas(betas)
        check_hyperparameters(lr=lr, eps=eps, weight_decay=weight_decay)
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.params = {}  # name -> param, in the order given
        for name, param in named_params:
            self._add(name, param)
        self.lr_scale = dict(lr_scale or {})
        unknown = sorted(set(self.lr_scale) - set(self.params))
        if unknown:
            raise ValueError(f"AdamW: lr_scale names {unknown}, which are not parameters of this optimiser")
        if not all(factor > 0 and math.isfinite(factor) for factor in self.lr_scale.values()):
            raise ValueError(f"AdamW: every lr_scale factor must be > 0 and finite, got {self.lr_scale}")
        self.step_count = 0  # calls to step()
        self.state = {}  # name -> {"step": int, "m": array, "v": array}, created at the first grad

    def _add(self, name, param) -> None:
        if name in self.params:
            raise ValueError(f"AdamW: two parameters are named {name!r}; names must be unique")
        for other_name, other in self.params.items():
            if other is param:
                raise ValueError(
                    f"AdamW: one parameter is passed twice, as {other_name!r} and {name!r}; "
                    f"pass a shared parameter once"
                )
        if np.asarray(param.data).dtype not in (np.float32, np.float64):
            raise TypeError(f"AdamW: parameter {name!r} must hold float32 or float64 data")
        self.params[name] = param

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    def step(self, lr=None) -> None:
        """Update every parameter that has a grad; `lr` overrides self.lr for this step only."""
        lr = self.lr if lr is None else float(lr)
        check_hyperparameters(lr=lr)
        for name, param in self.params.items():
            if param.grad is not None:
                self._update(name, param, lr * self.lr_scale[name] if name in self.lr_scale else lr)
        self.step_count += 1

    def _update(self, name, param, lr) -> None:
        grad = param.grad
        if grad.shape != param.data.shape or grad.dtype != param.data.dtype:
            raise ValueError(
                f"AdamW: parameter {name!r} has data {param.data.shape} {param.data.dtype} "
                f"but grad {grad.shape} {grad.dtype}; they must match"
            )
        state = self.state.get(name)
        if state is None:
            zeros = np.zeros_like(param.data)
            state = self.state[name] = {"step": 0, "m": zeros, "v": zeros.copy()}
        beta1, beta2 = self.betas
        state["step"] += 1
        t = state["step"]
        decay_factor = 1.0 - lr * self.weight_decay if self.weight_decay and decays(name, param) else 1.0
        # in place, in one pass over memory (the C core) or as NumPy's in-place formula (its twin)
        kernels.adamw_update(param.writable_data(), grad, state["m"], state["v"], beta1, beta2, decay_factor,
                             step_size=lr / (1.0 - beta1**t), bias2_sqrt=math.sqrt(1.0 - beta2**t),
                             eps=self.eps)

    def state_dict(self) -> dict:
        """Copies of all optimiser state: enough to continue bit-identically after a restart."""
        return {
            "step_count": self.step_count,
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "params": {
                name: {"step": s["step"], "m": s["m"].copy(), "v": s["v"].copy()}
                for name, s in self.state.items()
            },
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore what state_dict() returned, hyperparameters included."""
        _check_betas(d["betas"])
        check_hyperparameters(lr=d["lr"], eps=d["eps"], weight_decay=d["weight_decay"])
        state = {}
        for name, saved in d["params"].items():
            if name not in self.params:
                raise ValueError(
                    f"AdamW.load_state_dict: the state holds {name!r}, "
                    f"a parameter this optimiser does not have"
                )
            data = self.params[name].data
            for key in ("m", "v"):
                if saved[key].shape != data.shape or saved[key].dtype != data.dtype:
                    raise ValueError(
                        f"AdamW.load_state_dict: {name!r} {key} is {saved[key].shape} "
                        f"{saved[key].dtype}, the parameter is {data.shape} {data.dtype}"
                    )
            state[name] = {
                "step": int(saved["step"]), "m": saved["m"].copy(), "v": saved["v"].copy()
            }
        self.state = state
        self.step_count = int(d["step_count"])
        self.lr, self.eps = float(d["lr"]), float(d["eps"])
        self.weight_decay = float(d["weight_decay"])
        self.betas = (float(d["betas"][0]), float(d["betas"][1]))


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int,
              total_steps: int) -> float:
    """Linear warmup to max_lr, cosine decay to min_lr at total_steps, then min_lr.

    Warmup starts at max_lr / (warmup_steps + 1), small but not zero, so step 0 still learns.
    """
    if step < 0:
        raise ValueError(f"cosine_lr: step must be >= 0, got {step}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(
            f"cosine_lr: need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}"
        )
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"cosine_lr: need 0 <= warmup_steps <= total_steps, "
            f"got {warmup_steps} and {total_steps}"
        )
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all grads together so their global L2 norm is at most max_norm.

    Returns the norm before clipping. A non-finite norm (inf or nan) is returned untouched,
    grads unchanged, so the caller can decide to skip the step.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    # Summed in float64 so a float32 model does not round the norm away.
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / total
        for g in grads:
            g *= scale
    return total
