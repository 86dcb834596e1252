"""Labels: a variant's code and its modifiers, read and written from one table.

A label names a variant: a code (or its name) and its modifiers, each after a '+'. In
'abb+rotate+gqa2' the code is abb (K and V share a weight), 'rotate' turns each key head by a
learned rotation and 'gqa2' groups the query heads around 2 key/value heads. The code comes
first: three characters for the roles (Q, K, V), where equal letters share one weight and '-' is
the identity (attention.py says what each does). Every modifier sets
one field of GPTConfig: 'rotate' sets rotate=True, 'rope' sets pos='rope', 'gqa2' sets
n_kv_head=2. MODIFIERS below is the one place they are written down; everything else is read
from it:

- label(config): a config's label, modifiers in table order (a run's folder is named by it),
- parse(label): the GPTConfig fields a label sets (GPTConfig.overrides_from_label),
- the error for a modifier that is not in the table,
- flag_rows(): (flag, field, type, help) for the command line's flags,
- listing(): the table as text, for `minqkv variants --modifiers`.

A label gives each setting once. Two modifiers of one field ('rope+no-pos', 'mqa+gqa2', 'gqa2+gqa4')
are refused, and so is one modifier written twice ('rotate+rotate'): a label is a folder name and
a record, so there is one way to write each variant. Numbers are whole, above 0, in ASCII digits.
Whether a modifier suits a code and the sizes ('---+gate' has nothing to gate) is for GPTConfig to
say: a label alone does not know them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# ---- the code: three characters for (Q, K, V), or a name ----------------------------------------

# "no-X" and "identity-X" mean that role X is the identity (X = x)
NAMES = {
    "canonical": "abc",
    "shared-qk": "aab",  # the study's "no key": the Query used as Key
    "shared-kv": "abb",
    "shared-qv": "aba",
    "single": "aaa",
    "shared-qkv": "aaa",
    "no-query": "-ab",
    "identity-query": "-ab",
    "no-key": "a-b",
    "identity-key": "a-b",
    "no-value": "ab-",
    "identity-value": "ab-",
    "value-only": "--a",
    "none": "---",
}


def canonical_code(code: str) -> str:
    """Rename letters in order of first appearance: 'bab' -> 'aba', 'cc-' -> 'aa-'."""
    names: dict[str, str] = {}
    out = []
    for ch in code:
        if ch == "-":
            out.append("-")
        else:
            names.setdefault(ch, "abc"[len(names)])
            out.append(names[ch])
    return "".join(out)


ALL_CODES = tuple(sorted({canonical_code("".join(c)) for c in itertools.product("abc-", repeat=3)},
                         key=lambda c: (c.count("-"), c)))


def parse_code(spec: str) -> str:
    """A code ('abb', 'bcc') or a name ('shared-kv') -> the canonical 3-character code."""
    if not isinstance(spec, str):
        raise TypeError(f"a code must be a string such as 'abb' or 'shared-kv', got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in NAMES:
        return NAMES[key]
    if len(key) == 3 and set(key) <= set("abc-"):
        return canonical_code(key)
    names = ", ".join(f"{name}={code}" for name, code in NAMES.items())
    raise ValueError(f"variant {spec!r} is not valid: its code must be three of a, b, c or '-' for "
                     f"(Q, K, V), e.g. 'abb'; the 15 codes are {', '.join(ALL_CODES)}; names: {names}")


def names_of(code: str) -> list:
    return [name for name, c in NAMES.items() if c == code]


# ---- the modifiers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """The value of a modifier written as a number after its token: 'gqa2' sets 2. letter stands
    for the number in help texts ('gqaN'); example is a number to show."""

    letter: str
    example: int


@dataclass(frozen=True)
class Modifier:
    token: str  # as written after a '+': 'rotate'; a Number modifier's token is followed by its number
    field: str  # the GPTConfig field it sets
    value: object  # what it sets the field to: a fixed value (True for a switch), or a Number
    help: str  # one line: what it does
    conflicts: tuple = ()  # modifiers of other fields it cannot go with (two of one field never can)

    def written(self) -> str:
        """How it is written in a label, a Number as its letter: 'rotate', 'gqaN'."""
        return self.token + (self.value.letter if isinstance(self.value, Number) else "")


# in the order they follow the code in a label: never reorder, labels are folder names
MODIFIERS = (
    Modifier("rotate", "rotate", True, "a learned orthogonal rotation of K per head (K <- K R)"),
    Modifier("pos2d", "pos2d", True, "a learned 2-D positional bias added to the attention scores"),
    Modifier("gate", "gate", True, "hard-concrete gates mix each projection with the identity; "
                                   "pruned after training"),
    Modifier("wide-init", "wide_init", True, "Q/K/V weights start with std 1/sqrt(n_embd), not 0.02"),
    Modifier("sym-init", "sym_init", True, "W_k starts as a copy of W_q (codes with separate learned "
                                           "W_q and W_k reading x)", conflicts=("latent-kv",)),
    Modifier("rope", "pos", "rope", "rotary positions, turned inside attention (no position table)"),
    Modifier("no-pos", "pos", "none", "no positions at all (no position table)"),
    Modifier("alibi", "pos", "alibi", "ALiBi (Press et al. 2022): each head's scores fall linearly with the "
                                      "key's distance, at a fixed slope per head (no position table)"),
    Modifier("out-gate", "out_gate", True, "a sigmoid gate per head on the attention output (Qiu et al. 2025)"),
    Modifier("latent-kv", "latent_kv", Number("R", 32), "K and V up-projected from one latent R wide "
                                                        "(R <= n_embd), which the KV cache holds instead "
                                                        "(multi-head latent attention)"),
    Modifier("mqa", "n_kv_head", 1, "one key/value head for all query heads (multi-query attention)"),
    Modifier("gqa", "n_kv_head", Number("N", 2), "N key/value heads, each shared by a group of query "
                                                 "heads (grouped-query attention)"),
    Modifier("no-out-proj", "out_proj", False, "no output projection"),
    Modifier("window", "window", Number("W", 16), "causal sliding window: each query sees its last W keys, "
                                                  "itself included (Longformer, Mistral); cost linear in T",
             conflicts=("linear", "performer")),
    Modifier("linear", "linear_features", 0, "causal linear attention with features elu(x) + 1 in place of "
                                             "softmax, decoded from a state of constant size (Katharopoulos "
                                             "et al. 2020)", conflicts=("pos2d", "alibi", "latent-kv")),
    Modifier("performer", "linear_features", Number("M", 64), "linear attention with M positive random "
                                                              "features estimating softmax (Performer, "
                                                              "FAVOR+; Choromanski et al. 2021)",
             conflicts=("pos2d", "alibi", "latent-kv")),
)


# ---- a config -> its label ----------------------------------------------------------------------


def label(config) -> str:
    """'abb+rotate+gqa2': the code (or a per-layer model's distinct codes joined by '/') and the
    modifier of every field that is not at its default."""
    if config.layer_codes is not None:
        name = "/".join(sorted(set(config.layer_codes)))
    else:
        name = config.code
    written = (_written(row, _setting(config, row.field)) for row in MODIFIERS)
    return "+".join([name] + [text for text in written if text is not None])


def _setting(config, field: str):
    value = getattr(config, field)
    if field == "n_kv_head" and config.kv_heads == config.n_head:
        return None  # a key/value head per query head is no grouping: as if not given
    return value


def _written(row: Modifier, value) -> str | None:
    """The row's text for this value of its field, or None when another row (or none) writes it."""
    if not isinstance(row.value, Number):
        return row.token if value == row.value else None
    fixed = [other.value for other in MODIFIERS if other.field == row.field and other is not row]
    return None if value is None or value in fixed else f"{row.token}{value}"  # 1 head: 'mqa', not 'gqa1'


# ---- a label -> the settings it gives -----------------------------------------------------------


def parse(text: str) -> dict:
    """'shared-kv+rotate+gqa2' -> {'code': 'abb', 'rotate': True, 'n_kv_head': 2}."""
    name, *written = text.strip().split("+")
    settings = {"code": parse_code(name)}
    given = {}  # field -> (written text, row) of the modifier that set it
    for part in written:
        row, value = _read(part, text)
        if row.field in given:
            first = given[row.field][0]
            if first == part:
                raise ValueError(f"{text!r} gives {part!r} twice: give each modifier once")
            raise ValueError(f"{text!r} sets {row.field} twice, by {first!r} and {part!r}: give one of them")
        for other_part, other in given.values():
            if other.token in row.conflicts or row.token in other.conflicts:
                raise ValueError(f"{text!r} combines {other_part!r} and {part!r}, which cannot go together: "
                                 f"{other.written()}: {other.help}; {row.written()}: {row.help}")
        given[row.field] = (part, row)
        settings[row.field] = value
    return settings


def _read(part: str, text: str) -> tuple:
    """One modifier as written ('gqa2') -> (its row, the value it sets)."""
    for row in MODIFIERS:
        if not isinstance(row.value, Number) and part == row.token:
            return row, row.value
    for row in MODIFIERS:
        if isinstance(row.value, Number) and part.startswith(row.token):
            digits = part[len(row.token):]
            # str.isdigit() would also take other scripts' digits ('gqa٢'): only 0-9 make a number here
            if digits and all(ch in "0123456789" for ch in digits) and int(digits) > 0:
                return row, int(digits)
            letter = row.value.letter
            raise ValueError(f"unknown modifier {part!r} in {text!r}: {row.written()} takes {letter} as a "
                             f"whole number above 0 in ASCII digits 0-9, e.g. "
                             f"'{row.token}{row.value.example}'")
    names = ", ".join(row.written() for row in MODIFIERS[:-1]) + " or " + MODIFIERS[-1].written()
    raise ValueError(f"unknown modifier {part!r} in {text!r}: a modifier is one of {names}, "
                     "e.g. 'abb+rotate+gqa2'")


# ---- the table for the command line -------------------------------------------------------------


def flag_rows():
    """(flag, field, type, help) for every field a modifier sets, in table order.

    A field set by one switch gets that switch as its flag (--rotate; --no-out-proj sets out_proj
    to False); any other field gets a flag named after it that takes a value (--pos rope,
    --n-kv-head 2, --latent-kv 32), and its help lists the values.
    """
    for field in dict.fromkeys(row.field for row in MODIFIERS):
        rows = [row for row in MODIFIERS if row.field == field]
        if len(rows) == 1 and isinstance(rows[0].value, bool):
            yield "--" + rows[0].token, field, bool, rows[0].help
            continue
        kind = int if any(isinstance(row.value, Number) for row in rows) else type(rows[0].value)
        values = (row.value.letter if isinstance(row.value, Number) else str(row.value) for row in rows)
        yield "--" + field.replace("_", "-"), field, kind, " | ".join(
            f"{value}: {row.help}" for value, row in zip(values, rows))


def listing() -> str:
    """The modifiers one a line, as written in a label, with what each does."""
    width = max(len(row.written()) for row in MODIFIERS)
    lines = []
    for row in MODIFIERS:
        conflicts = f" (not with {', '.join(row.conflicts)})" if row.conflicts else ""
        lines.append(f"{row.written().ljust(width)}  {row.help}{conflicts}")
    return "\n".join(lines)
