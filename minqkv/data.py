"""Data: characters in, integer ids out, cut into (B, T) batches for next-character training.

Three kinds of corpus share one interface (`Corpus.batch`, `Corpus.eval_batches`):

- a UTF-8 text file of your own (`--data notes.txt`): a regular file of at most MAX_TEXT_BYTES,
- `shakespeare`: the plays as plain "SPEAKER:\\nverse\\n\\n" text (shakespeare.py fetches and
  converts them),
- `synthetic:TASK`: copy, reverse, sort and multi-query associative recall, generated in code.
  Only the answer characters are scored; every other target is -1 (ignored).
- `synthetic:mqar`: multi-query associative recall on the protocol of Zoology (Arora et al. 2023),
  whose vocabulary (8192 by default) no character set carries: its examples are token ids
  (IdTokenizer), and only the value after each query is scored.

For text, targets are the inputs shifted by one character and the metric is bits per character
('bpc'); for tasks it is the fraction of answer characters predicted right ('accuracy').
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shakespeare import shakespeare_text

IGNORE = -1  # target id of a position that the loss and the metric skip

VALIDATION_FRACTION = 0.1  # the last 10% of a text is the validation split
LARGEST_TEXT_BLOCK = 256
# The validation split (10%) must hold one block of 256 characters plus its next-character target.
MIN_TEXT_CHARS = 10 * (LARGEST_TEXT_BLOCK + 1)  # 2570
# The most a text file may hold. Encoding keeps each character as an int64 id (8 bytes) beside a
# 4-byte code point and the text itself, so 256 MiB of text already needs about 4 GiB of memory;
# and it is some 50 times Shakespeare's plays, more than a char model on a CPU trains through.
MAX_TEXT_BYTES = 256 << 20


# ---- tokenizer ---------------------------------------------------------------------------


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters of a text."""

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError("CharTokenizer: chars must be a non-empty string")
        if "".join(sorted(set(chars))) != chars:
            raise ValueError("CharTokenizer: chars must be sorted and hold each character once")
        self.chars = chars
        # Code points in sorted order, so a character's id is found by binary search.
        self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)  # (V,)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.from_text: text must be a non-empty string")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str of length N -> int64 ids of shape (N,)."""
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # (N,)
        ids = np.searchsorted(self._code_points, code_points)  # (N,) position if it were there
        found = self._code_points[np.minimum(ids, self.vocab_size - 1)] == code_points
        if not found.all():
            unknown = sorted(set(code_points[~found].tolist()))
            shown = ", ".join(repr(chr(c)) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(
                f"encode: text has characters outside the vocabulary of {self.vocab_size}: "
                f"{shown}{more}"
            )
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        """ids of shape (N,) -> str of length N."""
        ids = np.asarray(ids)
        if ids.ndim == 1 and ids.size == 0:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"decode: ids must be a 1-D array of integers, got shape {ids.shape} {ids.dtype}"
            )
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            shown = sorted(set(ids[bad].tolist()))[:10]
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {shown}")
        return self._code_points[ids].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        """A JSON-serialisable description, stored inside checkpoints."""
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        is_char_dict = isinstance(d, dict) and d.get("kind") == "char"
        if not (is_char_dict and isinstance(d.get("chars"), str)):
            raise ValueError(
                "CharTokenizer.from_dict: d must look like {'kind': 'char', 'chars': '...'}"
            )
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


MAX_ID_VOCAB = 1 << 16  # an embedding of 65,536 rows of 64 floats is 16 MiB; far beyond any corpus here


class IdTokenizer:
    """Tokens that are integers already, 0 .. vocab_size - 1 (synthetic:mqar); as text, the ids
    are written out with spaces between them: '12 4097 3'."""

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
                or not 2 <= vocab_size <= MAX_ID_VOCAB:
            raise ValueError(f"IdTokenizer: vocab_size must be an integer in [2, {MAX_ID_VOCAB}], "
                             f"got {vocab_size!r}")
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> np.ndarray:
        """'12 4097 3' -> int64 ids of shape (3,)."""
        try:
            ids = np.array([int(word) for word in text.split()], dtype=np.int64)  # (N,)
        except ValueError:
            raise ValueError(f"encode: text must be token ids separated by spaces, e.g. '12 4097 3', "
                             f"got {text[:40]!r}") from None
        self._check_range(ids, "encode")
        return ids

    def decode(self, ids) -> str:
        """ids of shape (N,) -> '12 4097 3'."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"decode: ids must be a 1-D array of integers, got shape {ids.shape} {ids.dtype}"
            )
        self._check_range(ids, "decode")
        return " ".join(str(i) for i in ids.tolist())

    def _check_range(self, ids: np.ndarray, caller: str) -> None:
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            shown = sorted(set(ids[bad].tolist()))[:10]
            raise ValueError(f"{caller}: ids must lie in [0, {self.vocab_size}), got {shown}")

    def to_dict(self) -> dict:
        return {"kind": "ids", "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> "IdTokenizer":
        if not (isinstance(d, dict) and d.get("kind") == "ids" and isinstance(d.get("vocab_size"), int)):
            raise ValueError(
                "IdTokenizer.from_dict: d must look like {'kind': 'ids', 'vocab_size': 8192}"
            )
        return cls(d["vocab_size"])

    def __eq__(self, other) -> bool:
        return isinstance(other, IdTokenizer) and other.vocab_size == self.vocab_size

    def __repr__(self) -> str:
        return f"IdTokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict):
    """A checkpoint's tokenizer, whichever kind it saved ('char' or 'ids')."""
    if isinstance(d, dict) and d.get("kind") == "ids":
        return IdTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)


# ---- corpora -----------------------------------------------------------------------------


def _check_batch_args(split: str, batch_size: int, block_size: int, rng=None) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a np.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )


@dataclass
class Corpus:
    """What the trainer needs: a name, a tokenizer, a metric, and batches of (x, y)."""

    name: str
    tokenizer: CharTokenizer
    metric: str  # 'bpc' (text) or 'accuracy' (tasks)

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        """-> x, y: int64 arrays of shape (batch_size, block_size); y == -1 where ignored."""
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int, block_size: int, n_batches: int,
                     seed: int = 0):
        """The same n_batches batches every call, so every variant is scored on identical data."""
        rng = np.random.default_rng(seed)
        return [self.batch(split, batch_size, block_size, rng) for _ in range(n_batches)]


@dataclass
class TextCorpus(Corpus):
    """A text cut once into train (first 90%) and validation (last 10%) ids."""

    train_ids: np.ndarray = field(default=None, repr=False)  # (N_train,) int64
    val_ids: np.ndarray = field(default=None, repr=False)  # (N_val,) int64

    def batch(self, split, batch_size, block_size, rng):
        _check_batch_args(split, batch_size, block_size, rng)
        ids = self.train_ids if split == "train" else self.val_ids
        if block_size + 1 > len(ids):
            raise ValueError(
                f"block_size {block_size} is too large for the {split!r} split of {self.name!r} "
                f"({len(ids)} characters): it must be at most {len(ids) - 1}"
            )
        starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,)
        offsets = starts[:, None] + np.arange(block_size)  # (B, T)
        return ids[offsets], ids[offsets + 1]  # y is x shifted one character on


def text_corpus(name: str, text: str) -> TextCorpus:
    """A text as a corpus: its characters are the vocabulary, the last 10% is held out for validation."""
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size < 2:  # the next character is always known: the loss falls to 0
        raise ValueError(f"data {name!r} holds a single distinct character ({tokenizer.chars!r}); "
                         f"a language model needs a text with at least 2 different characters")
    ids = tokenizer.encode(text)  # (N,)
    split_at = len(ids) - int(len(ids) * VALIDATION_FRACTION)
    return TextCorpus(name, tokenizer, "bpc", train_ids=ids[:split_at], val_ids=ids[split_at:])


def read_text_file(path) -> str:
    """The file's text, or an error that says what is wrong with it.

    Only a regular file is opened (a FIFO would block, /dev/zero never end), and at most
    MAX_TEXT_BYTES of it are read.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {str(path)!r} does not exist") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"data path {str(path)!r} is a directory; pass a UTF-8 text file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"data path {str(path)!r} is not a regular file (a device, pipe or socket); "
                         "pass a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES + 1)  # one byte more tells a file that is too large
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"data file {str(path)!r} is larger than {MAX_TEXT_BYTES:,} bytes "
                         f"({MAX_TEXT_BYTES >> 20} MiB), the most minqkv reads (training needs some 16 bytes "
                         "of memory per character): train on a part of it")
    if not raw:
        raise ValueError(f"data file {str(path)!r} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text: byte 0x{raw[err.start]:02x} "
            f"at byte offset {err.start} cannot be decoded"
        ) from None
    if len(text) < MIN_TEXT_CHARS:
        raise ValueError(
            f"data file {str(path)!r} has {len(text)} characters; at least {MIN_TEXT_CHARS} are "
            f"needed so that its last 10% (validation) holds a block of {LARGEST_TEXT_BLOCK} "
            f"characters plus one target"
        )
    return text


# ---- synthetic tasks ---------------------------------------------------------------------
# Each example is one string: prompt, SEPARATOR, answer, then PAD up to block_size + 1.
# Lengths grow with the block size so every example fills most of its row.

SEPARATOR = ">"
PAD = "."
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
TASK_TOKENIZER = CharTokenizer.from_text(PAD + SEPARATOR + DIGITS + LETTERS)
MIN_TASK_BLOCK = 8  # 4 symbols to copy, reverse or sort; 2 key-value pairs to recall
VALIDATION_EXAMPLES = 512


def _random_letters(rng: np.random.Generator, n: int) -> str:
    return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=n))


def _copy(rng, block_size):
    """'qwhdk' > 'qwhdk': repeat the prompt."""
    prompt = _random_letters(rng, block_size // 2)
    return prompt, prompt, [True] * len(prompt)


def _reverse(rng, block_size):
    """'qwhdk' > 'kdhwq': the prompt backwards."""
    prompt = _random_letters(rng, block_size // 2)
    return prompt, prompt[::-1], [True] * len(prompt)


def _sort(rng, block_size):
    """'qwhdk' > 'dhkqw': the prompt's letters in alphabetical order."""
    prompt = _random_letters(rng, block_size // 2)
    return prompt, "".join(sorted(prompt)), [True] * len(prompt)


def _recall(rng, block_size):
    """'a3f7k1' > 'f7a3k1': key-value pairs, then each key again; only its value is scored.

    Multi-query associative recall (Zoology, Arora et al. 2023): keys are distinct letters,
    values digits, and every key is queried once in a random order.
    """
    n_pairs = min(len(LETTERS), block_size // 4)
    keys = [LETTERS[i] for i in rng.choice(len(LETTERS), size=n_pairs, replace=False)]
    values = [DIGITS[i] for i in rng.integers(0, len(DIGITS), size=n_pairs)]
    value_of = dict(zip(keys, values))
    queries = [keys[i] for i in rng.permutation(n_pairs)]
    prompt = "".join(k + v for k, v in zip(keys, values))
    answer = "".join(q + value_of[q] for q in queries)
    return prompt, answer, [False, True] * n_pairs


TASKS = {"copy": _copy, "reverse": _reverse, "sort": _sort, "recall": _recall}


@dataclass
class TaskCorpus(Corpus):
    """Fresh random examples for training; a fixed validation set drawn from `seed`."""

    task: str = "copy"
    seed: int = 0

    def __post_init__(self):
        self._validation = {}  # block_size -> (x, y), each (VALIDATION_EXAMPLES, T)

    def _layout(self, rng, block_size):
        """One example -> its row of T + 1 characters and which of them are scored."""
        prompt, answer, scored = TASKS[self.task](rng, block_size)
        text = (prompt + SEPARATOR + answer).ljust(block_size + 1, PAD)
        is_target = [False] * (len(prompt) + 1) + scored
        return text, is_target + [False] * (len(text) - len(is_target))

    def example(self, rng: np.random.Generator, block_size: int) -> str:
        """One example as a string (prompt, separator, answer, padding), to read or print."""
        return self._layout(rng, block_size)[0]

    def _row(self, rng, block_size):
        """One example -> x, y of shape (T,): y holds the answer ids where scored, else -1."""
        text, is_target = self._layout(rng, block_size)
        ids = self.tokenizer.encode(text)  # (T + 1,)
        targets = np.where(is_target, ids, IGNORE)
        return ids[:-1], targets[1:]

    def _rows(self, rng, block_size, count):
        rows = [self._row(rng, block_size) for _ in range(count)]
        return np.stack([x for x, _ in rows]), np.stack([y for _, y in rows])  # (count, T) each

    def _check_block(self, block_size):
        if block_size < MIN_TASK_BLOCK:
            raise ValueError(
                f"block_size {block_size} is too small for {self.name!r}: "
                f"an example needs block_size of at least {MIN_TASK_BLOCK}"
            )

    def validation_set(self, block_size: int, count: int = VALIDATION_EXAMPLES):
        """The first `count` validation examples for this block size: x, y of shape (count, T)."""
        self._check_block(block_size)
        cached = self._validation.get(block_size)
        if cached is None or len(cached[0]) < count:
            rng = np.random.default_rng([self.seed, block_size])
            cached = self._rows(rng, block_size, max(count, VALIDATION_EXAMPLES))
            self._validation[block_size] = cached
        return cached[0][:count], cached[1][:count]

    def batch(self, split, batch_size, block_size, rng):
        _check_batch_args(split, batch_size, block_size, rng)
        self._check_block(block_size)
        if split == "train":
            return self._rows(rng, block_size, batch_size)
        x, y = self.validation_set(block_size)
        picks = rng.integers(0, len(x), size=batch_size)  # (B,)
        return x[picks], y[picks]

    def eval_batches(self, split, batch_size, block_size, n_batches, seed=0):
        """Validation: the fixed set walked in order (seed unused). Train: drawn from seed."""
        if split != "val":
            return super().eval_batches(split, batch_size, block_size, n_batches, seed)
        _check_batch_args(split, batch_size, block_size)
        x, y = self.validation_set(block_size, batch_size * n_batches)
        return [
            (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
            for i in range(n_batches)
        ]


# ---- multi-query associative recall on Zoology's protocol --------------------------------
# One example of T tokens (Arora et al. 2023, section 3; N = 2 pairs, T = 16):
#
#   x:  k1 v1 k2 v2 | k2  .  .  .  .  .  k1  .  .  .  .  .      keys in [1, V/2), values in [V/2, V)
#   y:   -  -  -  - | v2  -  -  -  -  -  v1  -  -  -  -  -      '-' = IGNORE: only answers are scored
#
# N distinct keys, each with a distinct value, then every key once more as a query at an even
# offset 2g after the pairs. The gap g is drawn without replacement with weight g^(a - 1)
# (a = power, 0.01: nearly 1/g, so most queries come soon after the pairs; a = 1: uniform).
# Every other position ('.') is a token drawn uniformly from the whole vocabulary. The value is
# never shown after its query: the model must predict it at the query.

MQAR_PAIRS_PER_TOKEN = 16  # default pairs = T // 16: Zoology's points (T, N) = (64, 4), (128, 8), (256, 16)
MQAR_DEFAULTS = {"vocab": 8192, "pairs": None, "power": 0.01}  # Zoology's vocabulary and power law


def mqar_gap_weights(slots: int, power: float) -> np.ndarray:
    """Probability of each gap g = 0 .. slots - 1 between the pairs and a query: (g + 1)^(power - 1), normalised."""
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (power - 1)  # (slots,)
    return weights / weights.sum()


def mqar_example(rng: np.random.Generator, block_size: int, vocab: int, pairs: int,
                 power: float) -> tuple:
    """One MQAR example -> x, y of shape (T,): tokens, and the values at the queries (else -1)."""
    half = vocab // 2
    keys = rng.choice(np.arange(1, half), size=pairs, replace=False)  # (N,) distinct
    values = rng.choice(np.arange(half, vocab), size=pairs, replace=False)  # (N,) distinct
    x = rng.integers(0, vocab, size=block_size)  # (T,) the filler, overwritten where pairs and queries go
    x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2] = keys, values
    slots = (block_size - 2 * pairs) // 2  # a query sits on an even offset after the pairs
    gaps = rng.choice(slots, size=pairs, replace=False, p=mqar_gap_weights(slots, power))  # (N,)
    queries = 2 * pairs + 2 * gaps  # (N,) positions of key i's query
    x[queries] = keys
    y = np.full(block_size, IGNORE, dtype=np.int64)  # (T,)
    y[queries] = values  # the next token after a query is its key's value
    return x.astype(np.int64), y


@dataclass
class MQARCorpus(TaskCorpus):
    """synthetic:mqar: fresh examples for training, a fixed validation set drawn from `seed`.

    pairs=None takes block_size // 16 pairs, so the same spec follows the block size.
    """

    vocab: int = 8192
    pairs: int | None = None
    power: float = 0.01

    def pairs_at(self, block_size: int) -> int:
        return self.pairs if self.pairs is not None else max(1, block_size // MQAR_PAIRS_PER_TOKEN)

    def _check_block(self, block_size):
        pairs = self.pairs_at(block_size)
        if 4 * pairs > block_size:  # N pairs take 2N tokens, and N queries need N even slots after them
            raise ValueError(
                f"block_size {block_size} is too small for {self.name!r}: {pairs} key-value pairs "
                f"and their queries need block_size of at least {4 * pairs}"
            )
        if pairs > self.vocab // 2 - 1:  # keys come from [1, vocab / 2)
            raise ValueError(
                f"{self.name!r} has {pairs} pairs at block_size {block_size}, more than its "
                f"{self.vocab // 2 - 1} distinct keys (vocab={self.vocab}): raise vocab or lower pairs"
            )

    def _row(self, rng, block_size):
        return mqar_example(rng, block_size, self.vocab, self.pairs_at(block_size), self.power)

    def example(self, rng: np.random.Generator, block_size: int) -> str:
        """One example's input tokens as text ('12 4097 ...'), to read or print."""
        self._check_block(block_size)
        return self.tokenizer.decode(self._row(rng, block_size)[0])


def _mqar_corpus(spec: str, seed: int) -> MQARCorpus:
    """'synthetic:mqar' or 'synthetic:mqar:vocab=8192,pairs=16,power=0.01' (any of the three)."""
    settings = dict(MQAR_DEFAULTS)
    given = spec[len("synthetic:mqar:"):].split(",") if spec.startswith("synthetic:mqar:") else []
    seen = set()
    for item in given:
        name, equals, value = item.partition("=")
        if not equals or name not in MQAR_DEFAULTS or not value:
            raise ValueError(f"data spec {spec!r}: {item!r} is not a setting: write NAME=VALUE "
                             f"separated by commas, NAME one of {', '.join(MQAR_DEFAULTS)}, "
                             f"e.g. 'synthetic:mqar:vocab=8192,pairs=16'")
        if name in seen:
            raise ValueError(f"data spec {spec!r} sets {name} more than once")
        seen.add(name)
        settings[name] = _mqar_setting(spec, name, value)
    vocab, pairs = settings["vocab"], settings["pairs"]
    if pairs is not None and pairs > vocab // 2 - 1:
        raise ValueError(f"data spec {spec!r}: pairs={pairs} needs that many distinct keys, but "
                         f"vocab={vocab} has {vocab // 2 - 1} (keys come from [1, vocab / 2))")
    return MQARCorpus(spec, IdTokenizer(vocab), "accuracy", task="mqar", seed=seed, **settings)


def _mqar_setting(spec: str, name: str, value: str):
    """One NAME=VALUE of an mqar spec, parsed and range-checked."""
    if name == "power":
        try:
            power = float(value)
        except ValueError:
            power = math.nan
        if not 0 < power <= 1:
            raise ValueError(f"data spec {spec!r}: power must be a number in (0, 1] (the gap weight "
                             f"is g^(power - 1); 1 places queries uniformly), got {value!r}")
        return power
    lowest, highest = (4, MAX_ID_VOCAB) if name == "vocab" else (1, MAX_ID_VOCAB // 2 - 1)
    if not value.isdigit() or not lowest <= int(value) <= highest:
        raise ValueError(f"data spec {spec!r}: {name} must be a whole number in "
                         f"[{lowest}, {highest}], got {value!r}")
    return int(value)


def _task_corpus(spec: str, seed: int) -> TaskCorpus:
    task = spec.split(":", 1)[1]
    if task == "mqar" or task.startswith("mqar:"):
        return _mqar_corpus(spec, seed)
    if task not in TASKS:
        valid = ", ".join(f"synthetic:{name}" for name in (*TASKS, "mqar"))
        raise ValueError(f"unknown synthetic task {task!r} in {spec!r}: valid tasks are {valid}")
    return TaskCorpus(spec, TASK_TOKENIZER, "accuracy", task=task, seed=seed)


# ---- the one entry point -----------------------------------------------------------------


def load_corpus(spec: str, cache_dir=None, seed: int = 0) -> Corpus:
    """'shakespeare', 'synthetic:TASK' (synthetic:mqar:SETTINGS too) or a path to a UTF-8 text file -> a Corpus.

    `seed` fixes a task's validation set; text splits are fixed (first 90% / last 10%).
    A file literally named 'shakespeare' is read with a path such as './shakespeare'.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_corpus: spec must be a string, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec == "shakespeare":
        return text_corpus("shakespeare", shakespeare_text(cache_dir))
    if spec.startswith("synthetic:"):
        return _task_corpus(spec, seed)
    if not os.path.exists(spec):
        tasks = ", ".join((*TASKS, "mqar"))
        raise FileNotFoundError(
            f"data spec {spec!r} is neither a known corpus nor an existing file: valid specs are "
            f"'shakespeare', 'synthetic:TASK' (TASK one of {tasks}), or a path to a UTF-8 text file"
        )
    return text_corpus(spec, read_text_file(spec))
