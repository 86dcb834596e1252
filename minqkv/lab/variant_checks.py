"""Gradient checks of a whole tiny GPT in each attention variant (`minqkv gradcheck --variant`).

Every parameter of the model is checked against central differences in float64: the
projections however they are tied, the rotation, the 2-D position bias, the gates, rotary
positions, the output gates, the latent keys and values, ALiBi, the sliding window and linear and
Performer attention. A gated model
is checked on both paths of its hard-concrete gates: sampled (training, with one fixed noise
draw replayed at every evaluation of the loss) and deterministic (evaluation).
"""

from __future__ import annotations

import numpy as np

from ..attention import ALL_CODES, parse_code
from .gradcheck import CheckResult, check
from ..model import GPT, GPTConfig

# labels beyond the 15 plain codes (GPTConfig.overrides_from_label reads them)
MODIFIER_LABELS = ["aaa+rotate", "aab+rotate", "aaa+pos2d", "aab+pos2d", "abc+gate", "aaa+gate",
                   "abb+gqa2", "abc+gqa2", "abc+mqa", "abb+mqa", "abb+rotate+mqa", "abc+no-out-proj"]
# the modifiers of today's models, alone and with codes, grouped heads, gates and each other
MODIFIER_LABELS += ["abc+rope", "aab+rope", "abb+rope", "-ab+rope", "-aa+rope", "abb+rope+gqa2",
                    "aaa+rotate+rope", "aab+gate+rope", "abc+no-pos",
                    "abc+out-gate", "aab+out-gate", "abb+out-gate+mqa", "abc+gate+out-gate",
                    "abc+latent-kv4", "abb+latent-kv4", "-ab+latent-kv6", "abc+latent-kv4+gqa2",
                    "abb+rope+latent-kv4+mqa", "abc+gate+latent-kv4", "abc+rope+out-gate+latent-kv6"]
# the baselines: a sliding window, ALiBi, linear and Performer attention, alone and with the others
MODIFIER_LABELS += ["abc+window2", "aab+window1", "abb+window3+gqa2", "abc+alibi", "aaa+rotate+alibi",
                    "abc+pos2d+alibi+window2", "abc+linear", "aab+linear", "abb+linear+mqa", "--a+linear",
                    "abc+rope+gate+linear", "abc+performer6", "abb+out-gate+performer4+gqa2"]
MODIFIER_CASES = [(label, GPTConfig.overrides_from_label(label)) for label in MODIFIER_LABELS]
MODIFIER_CASES.append(("abc+per-layer", dict(layer_codes=["abb", "-a-"])))
# the gates' deterministic path: the model in evaluation mode (the labels above run in training)
MODIFIER_CASES += [("abc+gate (evaluation)", dict(code="abc", gate=True, training=False)),
                   ("aaa+gate (evaluation)", dict(code="aaa", gate=True, training=False))]

TINY = dict(vocab_size=5, block_size=4, n_layer=2, n_head=4, n_embd=8, dtype="float64")


def variant_cases(selection: str = "all") -> list:
    """[(label, overrides)] for 'all', for one code or name (with its modifier cases), or one label."""
    plain = [(code, dict(code=code)) for code in ALL_CODES]
    if selection == "all":
        return plain + MODIFIER_CASES
    if "+" in selection:  # one variant with modifiers, such as 'aaa+rotate'
        return [(selection, GPTConfig.overrides_from_label(selection))]
    code = parse_code(selection)
    return [(code, dict(code=code))] + [c for c in MODIFIER_CASES if c[1].get("code") == code]


def tiny_model(overrides: dict, seed: int = 0) -> GPT:
    """A GPT of TINY's sizes (2 layers, 8 wide, float64) unless overrides say otherwise, whose parameters
    are all moved off their initial values (zeros and ones at init would hide mistakes: a zero
    rotation generator is a special point)."""
    overrides = {key: value for key, value in overrides.items() if key != "training"}
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("gate_"):
            p.data[:] = rng.uniform(-2.0, 2.0, p.shape)  # log-odds where gates are neither shut nor open
        else:
            p.data += 0.3 * rng.standard_normal(p.shape)
    return model


def check_variant(label: str, overrides: dict, seed: int = 0) -> CheckResult:
    model = tiny_model(overrides, seed)
    model.train(overrides.get("training", True))
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(0, TINY["vocab_size"], (2, TINY["block_size"]))
    targets = rng.integers(0, TINY["vocab_size"], (2, TINY["block_size"]))
    noise_state = model.gate_rng.bit_generator.state

    def loss(*_params):
        model.gate_rng.bit_generator.state = noise_state  # the same gate noise at every evaluation
        _, value = model(ids, targets)
        penalty = model.gate_penalty()
        return value + 0.1 * penalty if penalty is not None else value

    return check(label, loss, model.parameters())


def run_variant_checks(selection: str = "all", seed: int = 0) -> list:
    return [check_variant(label, overrides, seed) for label, overrides in variant_cases(selection)]
