"""Options that travel as one value: `SamplingParams` (how a sequence is continued: its defaults, its
checks, and its names on the command line and in OpenAI's protocol, in one table) and the server's
defaults. No NumPy here: the CLI reads this before --threads sets the thread counts NumPy reads."""

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

# Seeds are whole numbers from 0 to this: what NumPy's generators take (any non-negative int) and 64 bits hold.
MAX_SEED = 2**64 - 1


def whole(v):
    """A whole number, and not a bool (JSON's true is no count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def number(v):
    """A finite int or float, and not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_seed(v):
    return whole(v) and 0 <= v <= MAX_SEED


def _stops(v):
    return isinstance(v, tuple) and all(isinstance(s, str) and s for s in v)


def _bias(v):
    return isinstance(v, tuple) and all(whole(t) and t >= 0 and number(b) for t, b in v)


class Field(NamedTuple):
    """One sampling option: its default, what it must be, and its names on the command line and in
    OpenAI's protocol (None: not there), with OpenAI's default and range where they differ."""

    default: object
    check: object  # value -> bool
    wants: str  # what a good value is, for the error
    flag: str = None
    openai: str = None
    openai_default: object = "same"
    openai_check: object = None  # narrower than `check`, where OpenAI's protocol says so
    openai_wants: str = None
    python: str = ""  # said to Python callers only, after `wants` (None's meaning)


FIELDS = {
    "max_new_tokens": Field(
        50, lambda v: whole(v) and v >= 0, "a whole number >= 0", "--max-new-tokens", "max_tokens", 16
    ),
    "temperature": Field(
        1.0,
        lambda v: number(v) and v >= 0,
        "a number >= 0 (0 is greedy)",
        "--temperature",
        "temperature",
        openai_check=lambda v: number(v) and 0 <= v <= 2,
        openai_wants="a number from 0 to 2",
    ),
    "top_k": Field(
        50,
        lambda v: v is None or (whole(v) and v >= 1),
        "a whole number >= 1",
        "--top-k",
        "top_k",
        None,
        python=" (or None for no limit)",
        openai_check=lambda v: v is None or (whole(v) and v >= 1),
        openai_wants="a whole number >= 1",
    ),
    "top_p": Field(1.0, lambda v: number(v) and 0 < v <= 1, "in (0, 1]", "--top-p", "top_p"),
    "repetition_penalty": Field(
        1.0,
        lambda v: number(v) and v > 0,
        "a number > 0 (1 turns it off)",
        "--repetition-penalty",
        "repetition_penalty",
    ),
    "presence_penalty": Field(
        0.0, lambda v: number(v) and -2 <= v <= 2, "a number from -2 to 2", None, "presence_penalty"
    ),
    "frequency_penalty": Field(
        0.0, lambda v: number(v) and -2 <= v <= 2, "a number from -2 to 2", None, "frequency_penalty"
    ),
    "logit_bias": Field(
        (), _bias, "token ids with biases", None, "logit_bias"
    ),  # (token, bias) pairs: protocol reads OpenAI's object
    "stop": Field((), _stops, "non-empty strings", "--stop", "stop"),
    "seed": Field(
        None,
        lambda v: v is None or is_seed(v),
        "a whole number from 0 to 2**64 - 1",
        "--seed",
        "seed",
        python=" or None",
    ),
}


class BadValue(ValueError):
    """A sampling option out of range: names the option as `name` says (the argument, a flag, a field)."""

    def __init__(self, field, value, wants, name):
        super().__init__(f"{name} must be {wants}, got {value!r}")
        self.field, self.name = field, name


@dataclass(frozen=True)
class SamplingParams:
    """How a sequence is continued: built once (by Model, the CLI and the server), checked on
    construction, and passed whole to the engine's picker. Defaults are GPT-2's usual ones
    (`picogpt generate`, Model); `named(..., openai=True)` takes OpenAI's completions defaults and ranges instead."""

    max_new_tokens: int = FIELDS["max_new_tokens"].default
    temperature: float = FIELDS["temperature"].default
    top_k: int = FIELDS["top_k"].default
    top_p: float = FIELDS["top_p"].default
    repetition_penalty: float = FIELDS["repetition_penalty"].default
    presence_penalty: float = FIELDS["presence_penalty"].default
    frequency_penalty: float = FIELDS["frequency_penalty"].default
    logit_bias: tuple = FIELDS["logit_bias"].default
    stop: tuple = FIELDS["stop"].default
    seed: int = FIELDS["seed"].default

    def __post_init__(self):
        self._normalize()
        self.check()

    def _normalize(self):
        for field in ("stop", "logit_bias"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, ())
        if isinstance(self.stop, (str, list)):  # one stop string, or a list of them
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))

    def check(self, names=None, openai=False):
        """Raise BadValue for the first option out of range (OpenAI's where they are narrower, with
        `openai`); names: {field: what to call it}, else the field's own name."""
        for field, spec in FIELDS.items():
            value, check, wants = getattr(self, field), spec.check, spec.wants
            if openai and spec.openai_check is not None:
                check, wants = spec.openai_check, spec.openai_wants
            if not check(value):
                raise BadValue(field, value, wants if names else wants + spec.python, (names or {}).get(field, field))

    @classmethod
    def named(cls, names, openai=False, **options):
        """SamplingParams of `options` (the defaults for the rest, OpenAI's with `openai`), checked, its
        errors naming each option as `names` does (the CLI's flags, OpenAI's fields)."""
        if openai:
            options = {f: spec.openai_default for f, spec in FIELDS.items() if spec.openai_default != "same"} | options
        unknown = set(options) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling option {sorted(unknown)[0]!r}: see picogpt.SamplingParams")
        params = object.__new__(cls)  # __post_init__'s check would name the fields as Python does
        for field, spec in FIELDS.items():
            object.__setattr__(params, field, options.get(field, spec.default))
        params._normalize()
        params.check(names, openai)
        return params

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def bias(self):
        return dict(self.logit_bias)


FLAGS = {field: spec.flag for field, spec in FIELDS.items() if spec.flag}  # the CLI's names
OPENAI = {field: spec.openai for field, spec in FIELDS.items() if spec.openai}  # OpenAI's names


# The server: sequences decoded together, requests waiting beyond them, and the most prompt tokens a
# step prefills (None: no cap; a budget measured from the step times decides, budget.py).
SERVE = dict(host="127.0.0.1", port=8000, parallel=8, queue=64, chunk=None, cache_mb=256, prefix_cache=True)
