"""Every setting defined once: its type, default, bounds and documentation, and the one validator.

The training config's sections (:mod:`inversionview.train`) and a reading's settings (:class:`ReadSettings`) are
frozen dataclasses. A field's annotation is its type, its default the dataclass default, its bounds a
:func:`setting` rule kept in the field's metadata, and the string literal after it its documentation
(``scripts/make_config_reference.py`` writes docs/config.md from them, and the command line's help is taken from
them). :func:`build` turns a TOML table or a JSON object into such a dataclass, refusing an unknown key (naming the
closest known one) and a value of the wrong type; :func:`check` refuses values outside their bounds. The command
line, the Python API, batch files, the viewer and the training config all validate through these two, so a bad
value gets the same one-line :class:`~inversionview.errors.UserError` wherever it comes from.

Only the standard library is imported here: the command line checks its options before torch loads.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import numbers
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Literal, Union

from .errors import UserError

METRICS = ("euclidean", "cosine")
"""Distances between activations: Euclidean distance after normalising each site's activations, or cosine
distance."""
DTYPES = ("float32", "float16", "bfloat16")
"""The probed model's weights when it is loaded."""
MAX_SAMPLES = 8192
"""Most candidates of one reading, wherever it is asked for (command line, Python, batch files, the viewer)."""
MAX_CHAINS = 1024
"""Most Metropolis-Hastings chains of one reading."""
CHAINS = 64
"""Chains of a reading by default (``inversionview.explore.CHAINS``)."""
MAX_TEMPERATURE = 1e6
"""Beyond it sampling is uniform (and float32 logits overflow near 3e38)."""
MAX_NOISE = 1e3
"""Activation noise, in standard deviations of the activation (the paper's Auto mix uses 0.1)."""
MAX_SEED = 2**63 - 1
"""torch's generators take seeds below 2**64; JSON numbers can be any size."""


# ---------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """The values a setting accepts beyond its type: a range (``lo``/``hi``, ``lo`` itself refused when
    ``lo_open``), or a set of ``choices`` named ``what`` in the error ("unknown metric 'x'")."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    choices: tuple = ()
    what: str = ""

    def ok(self, v, real: bool = False) -> bool:
        """Whether ``v`` keeps the rule; ``real``: the setting is a float, which must also be finite."""
        if self.choices:
            return v in self.choices
        if real:
            try:
                v = float(v)
            except OverflowError:  # an int beyond every float (JSON numbers can be any size)
                return False
            if not math.isfinite(v):
                return False
        return (self.lo < v if self.lo_open else self.lo <= v) and v <= self.hi

    def describe(self, real: bool = False) -> str:
        """The rule in words; ``real``: the setting is a float (an open range then also asks for a finite one)."""
        if self.choices:
            return _alternatives([repr(c) for c in self.choices])
        finite = " and finite" if real and self.hi == math.inf else ""
        if self.lo_open and self.lo == 0:
            return "positive" + (f" and at most {_num(self.hi)}" if self.hi < math.inf else finite)
        if self.hi == math.inf:
            return f"{'above' if self.lo_open else 'at least'} {_num(self.lo)}{finite}"
        return f"between {_num(self.lo)} and {_num(self.hi)}"


def setting(
    default=dataclasses.MISSING,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    above: float | None = None,
    choices: tuple = (),
    what: str = "",
):
    """A dataclass field with a :class:`Rule`: ``lo <= v <= hi``, ``v > above``, or ``v in choices``."""
    rule = Rule(lo=above, hi=hi, lo_open=True) if above is not None else Rule(lo=lo, hi=hi, choices=choices, what=what)
    return field(default=default, metadata={"rule": rule})


def _num(x) -> str:
    """A bound as the messages write it: 8192, 0.5, 1e6."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e5:
        return str(int(x))
    return re.sub(r"e\+?0*(\d)", r"e\1", f"{x:g}") if isinstance(x, float) else str(x)


def _alternatives(words: list[str]) -> str:
    """'a' or 'b'; one of 'a', 'b', 'c'."""
    return " or ".join(words) if len(words) <= 2 else "one of " + ", ".join(words)


def _join(words: list[str]) -> str:
    """a; a or b; a, b or c."""
    return " or ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " or " + words[-1]


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _in(where: str) -> str:
    return f" in [{where}]" if where else ""


# ---------------------------------------------------------------------------------------------- types
@cache
def hints(cls: type) -> dict:
    """The fields' annotations as types."""
    return typing.get_type_hints(cls)


def _is_section(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def fits(v, t) -> bool:
    """Whether ``v`` is a value of the annotation ``t`` (a bool is no number; an int is a float)."""
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        return any(fits(v, a) for a in typing.get_args(t))
    if origin is Literal:
        return any(type(v) is type(a) and v == a for a in typing.get_args(t))
    if origin is tuple:
        return isinstance(v, (list, tuple)) and all(fits(x, typing.get_args(t)[0]) for x in v)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    return isinstance(v, t)


_WORDS = {bool: "a bool", int: "an int", float: "a number", str: "a string", dict: "a table", list: "a list"}


def type_words(t) -> str:
    """The annotation ``t`` in words, as the messages and the reference say it (None is left out)."""
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        return _join([type_words(a) for a in typing.get_args(t) if a is not type(None)])
    if origin is Literal:
        words = ["true" if a is True else "false" if a is False else f'"{a}"' for a in typing.get_args(t)]
        return _join(words)
    if origin is tuple:
        return "a list of " + type_words(typing.get_args(t)[0]).split(" ", 1)[1] + "s"
    return _WORDS.get(t, getattr(t, "__name__", str(t)))


# ---------------------------------------------------------------------------------------------- the validator
def unknown_key(key: str, known, noun: str = "config key", where: str = "") -> str:
    """The message for an unknown key: the closest known key if one is close, else all of them."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
    return f"unknown {noun} {key!r}{_in(where)}: {hint}"


def build(schema, raw, where: str = "", noun: str = "config key", other: tuple = ()):
    """A dataclass made from the dict ``raw`` (a TOML table or a JSON object); nested dataclass fields are
    sections, built from their own tables. ``schema`` is the dataclass, or an instance of it whose values stand
    for the keys ``raw`` leaves out. ``where`` names the section in messages (``[train]``), ``noun`` what a key is
    called ("config key", "field"), and ``other`` keys that the caller reads itself. An unknown key (with the
    closest known one), a value of the wrong type or a missing required key is a :class:`UserError`; values
    are left to :func:`check`."""
    cls = schema if isinstance(schema, type) else type(schema)
    if not isinstance(raw, dict):
        raise UserError(f"config section [{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields and k not in other:
            raise UserError(unknown_key(k, [*fields, *other], noun, where))
    kw = {}
    for k, v in raw.items():
        if k in other:
            continue
        t = hints(cls)[k]
        if _is_section(t):
            kw[k] = build(t, v, k)
            continue
        if not fits(v, t):
            raise UserError(f"{noun} {k!r}{_in(where)} must be {type_words(t)}, got {_show(v)}")
        kw[k] = tuple(v) if typing.get_origin(t) is tuple else v
    for k, f in fields.items():
        if k not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = field_docs(cls).get(k, "")
            raise UserError(
                f"config is missing the key {k!r}{_in(where)}"
                + (f": {doc[:1].lower()}{doc[1:].rstrip('.')}" if doc else "")
            )
    return cls(**kw) if isinstance(schema, type) else dataclasses.replace(schema, **kw)


def check(obj, where: str = "", noun: str = "config key") -> None:
    """Refuse a field of the dataclass ``obj`` (and of its sections) whose value is not of its type or breaks its
    rule: ``samples must be between 1 and 8192, got 0``; in a section, ``eval.epsilon must be positive ...``."""
    cls: type = type(obj)  # as a plain type: mypy refuses type[Any] as Hashable, which the cached hints() takes
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), hints(cls)[f.name]
        if _is_section(t) and isinstance(v, t):
            check(v, f.name, noun)
            continue
        if not fits(v, t):
            raise UserError(f"{noun} {f.name!r}{_in(where)} must be {type_words(t)}, got {_show(v)}")
        rule, real = f.metadata.get("rule"), fits(0.5, t)
        if rule is None or v is None or rule.ok(v, real):
            continue
        if rule.choices:
            raise UserError(f"unknown {rule.what} {v!r}{_in(where)}: expected {rule.describe()}")
        name = f"{where}.{f.name}" if where else f.name
        raise UserError(f"{name} must be {rule.describe(real)}, got {_show(v)}")


# ---------------------------------------------------------------------------------------------- documentation
@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal right after it in the class body (inherited ones too),
    read from the source with ``ast``; ``{}`` where the source cannot be read."""
    docs: dict[str, str] = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            stmt = ast.parse(textwrap.dedent(inspect.getsource(c))).body[0]
        except (OSError, TypeError):
            continue
        if not isinstance(stmt, ast.ClassDef):  # the source of a class is its class statement
            continue
        body = stmt.body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def summary(cls, name: str) -> str:
    """A field's first sentence with its bounds, as the command line's help shows it."""
    doc = " ".join(field_docs(cls).get(name, "").split())
    first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0].rstrip(".")
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    rule = f.metadata.get("rule")
    bounds = f"; {rule.describe(real=fits(0.5, hints(cls)[name]))}" if rule and not rule.choices else ""
    if not any(c.isupper() for c in first.split(" ", 1)[0][1:]):  # "Candidates ..." but "Metropolis-Hastings ..."
        first = first[:1].lower() + first[1:]
    return re.sub(r"``?([^`]+)``?", r"\1", first) + bounds


# ---------------------------------------------------------------------------------------------- a reading
@dataclass(frozen=True)
class SamplingSettings:
    """What a reading samples and how it verifies: the settings that the command line, the Python API, batch
    files (each line may override them) and the viewer all take."""

    samples: int = setting(1024, lo=1, hi=MAX_SAMPLES)
    """Candidates sampled from the decoder."""
    temperature: float | None = setting(None, above=0, hi=MAX_TEMPERATURE)
    """One sampling temperature for every candidate; by default (None) the paper's Auto mix: temperatures 0.5, 1
    and 2, and 2 with activation noise 0.1."""
    noise: float = setting(0.0, lo=0, hi=MAX_NOISE)
    """Activation noise with a temperature: candidates are sampled from z + N(0, I) std(z) noise. It needs a
    temperature (the Auto mix sets its own noise)."""
    epsilon: float | None = setting(None, above=0)
    """Preimage radius; by default (None) the run's, the epsilon it was trained with ([eval] epsilon)."""
    metric: str | None = setting(None, choices=METRICS, what="metric")
    """Distance between activations, "euclidean" or "cosine"; by default (None) the run's ([eval] metric)."""
    seed: int = setting(0, lo=0, hi=MAX_SEED)
    """Seed of the sampling and of the chains: the same seed reads the same samples."""

    def checked(self, noun: str = "argument"):
        """These settings, each value checked (:func:`check`); a bad one is a one-line :class:`UserError`."""
        check(self, noun=noun)
        if self.temperature is None and self.noise:
            raise UserError(
                "noise applies to one sampling temperature: give a temperature too (the Auto mix sets its own noise)"
            )
        return self


@dataclass(frozen=True)
class ReadSettings(SamplingSettings):
    """A reading's settings on the command line (``query``, ``demo``) and in Python (``InversionView.query``,
    ``preimage.read``)."""

    chains: int = setting(CHAINS, lo=0, hi=MAX_CHAINS)
    """Metropolis-Hastings chains that walk the preimage to estimate what its members share; 0 reads the decoder's
    samples alone. Batch files and the viewer use the default."""
