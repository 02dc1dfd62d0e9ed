"""The one schema of a reading's JSON (:meth:`Preimage.to_dict`): what readings write, and what is accepted back.

A reading comes back from outside the code that wrote it: the viewer's page posts it to change epsilon or to make
a report, and the readings DB holds it. Before any code uses such a reading, :func:`check_reading` checks every
field against this schema and refuses anything else with one line naming the field (``samples[3].count must be a
whole number of at least 0, got -5``); :func:`reading_dict` writes a reading as the same fields.

The schema is driven by the dataclasses :class:`~inversionview.preimage.Preimage` and
:class:`~inversionview.preimage.Sample`: each field's type hint gives its check (``str``, ``int``, ``float``,
``list[...]``, ``X | None``; ``dict`` any JSON object of bounded depth), a field without a default is required and
one with a default may be left out. :data:`RULES` narrows the fields whose values other code relies on (ranges,
choices, the structure of the dicts that the summary reads: ``settings``, ``shares``, ``checks``, ``chains``), and
each class's cross-field rule (:func:`_sample_rule`, :func:`_reading_rule`) ties them together (positions within the
tokens, one attention weight per token up to the query, the chains' states among their members). A field added to
either dataclass is checked by its type hint without editing this module; a key the dataclasses do not name is
dropped (a reading written by another version).

Only the standard library and the dataclasses are used; checking a reading of 1,024 samples takes a few ms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Union

from .errors import UserError
from .settings import MAX_CHAINS, MAX_SAMPLES, MAX_SEED, METRICS

SOURCES = ("decoder", "chain", "data")
"""Where a sample came from: proposed by the decoder, met by the chains on the preimage, or drawn from data."""
MAX_DEPTH = 32
"""Deepest nesting of a JSON value in a field the schema does not describe further (a ``dict`` field)."""
SATURATED = 0.5  # inversionview.estimate.SATURATED: above this coverage the members met weigh in (their weights)


class NotAReading(UserError):
    """A JSON value that is not a reading's; ``detail`` says which field breaks the schema and how."""

    def __init__(self, detail: str):
        super().__init__(f"not a reading's JSON (Preimage.to_dict()): {detail}")
        self.detail = detail


class Bad(Exception):
    """A value that breaks the schema: where (``samples[3].count``) and what was expected."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path or 'the reading'} {message}")


def _show(v) -> str:
    try:
        s = json.dumps(v, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        s = repr(type(v).__name__)
    return s if len(s) <= 40 else s[:37] + "..."


def _type_name(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


# ---------------------------------------------------------------------------------------------- the checks
class Spec:
    """One value's check: :meth:`check` raises :class:`Bad` naming ``path``; ``finite`` False lets numbers be
    infinite or NaN (a library's reading may hold them; JSON sent to a browser may not)."""

    what = "a value"

    def check(self, v, path: str, finite: bool) -> None:
        raise NotImplementedError

    def bad(self, v, path: str) -> Bad:
        return Bad(path, f"must be {self.what}, got {_show(v)}")


class AnyJSON(Spec):
    """Any JSON value nested at most :data:`MAX_DEPTH` deep (checked without recursion)."""

    what = f"a JSON value nested at most {MAX_DEPTH} deep"

    def __init__(self, kind: type | None = None):
        self.kind = kind
        if kind is dict:
            self.what = f"an object nested at most {MAX_DEPTH} deep"

    def check(self, v, path, finite):
        if self.kind is not None and not isinstance(v, self.kind):
            raise self.bad(v, path)
        stack = [(v, 0)]
        while stack:
            x, depth = stack.pop()
            if isinstance(x, (dict, list, tuple)):
                if depth >= MAX_DEPTH:
                    raise Bad(path, f"is nested more than {MAX_DEPTH} deep")
                items = x.items() if isinstance(x, dict) else enumerate(x)
                for k, y in items:
                    if isinstance(x, dict) and not isinstance(k, str):
                        raise Bad(path, "has a key that is not a string")
                    stack.append((y, depth + 1))
            elif isinstance(x, float):
                if finite and not math.isfinite(x):
                    raise Bad(path, f"holds the non-finite number {x}")
            elif not (x is None or isinstance(x, (str, bool, int))):
                raise Bad(path, f"holds {_type_name(x)}, which is no JSON value")


class Str(Spec):
    def __init__(self, nonempty: bool = False, stripped: bool = False, choices: tuple = ()):
        self.nonempty, self.stripped, self.choices = nonempty or stripped, stripped, choices
        self.what = (
            "one of " + ", ".join(map(repr, choices))
            if choices
            else "a non-empty string without leading or trailing spaces"
            if stripped
            else "a non-empty string"
            if nonempty
            else "a string"
        )

    def check(self, v, path, finite):
        if not isinstance(v, str):
            raise self.bad(v, path)
        if (self.choices and v not in self.choices) or (self.nonempty and not v) or (self.stripped and v != v.strip()):
            raise self.bad(v, path)


class Bool(Spec):
    what = "true or false"

    def check(self, v, path, finite):
        if not isinstance(v, bool):
            raise self.bad(v, path)


class Int(Spec):
    def __init__(self, lo: int = -(2**63), hi: int = 2**63 - 1):
        self.lo, self.hi = lo, hi
        self.what = f"a whole number of at least {lo}" if hi >= 2**63 - 1 else f"a whole number from {lo} to {hi}"

    def check(self, v, path, finite):
        if isinstance(v, bool) or not isinstance(v, int) or not self.lo <= v <= self.hi:
            raise self.bad(v, path)


class Num(Spec):
    """A number (an int is one) in ``[lo, hi]``, above ``lo`` where ``open``; finite unless ``finite`` is False."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, open: bool = False):
        self.lo, self.hi, self.open = lo, hi, open
        rng = (
            f"above {lo:g}"
            if open and hi == math.inf
            else f"of at least {lo:g}"
            if hi == math.inf and lo > -math.inf
            else f"from {lo:g} to {hi:g}"
            if lo > -math.inf
            else ""
        )
        self.what = f"a finite number {rng}".rstrip()

    def check(self, v, path, finite):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.bad(v, path)
        try:
            x = float(v)
        except OverflowError:  # an int beyond every float (JSON numbers can be any size)
            raise self.bad(v, path) from None
        if math.isnan(x):
            if finite:
                raise self.bad(v, path)
            return
        if math.isinf(x) and not finite:
            return
        if not math.isfinite(x) or x < self.lo or x > self.hi or (self.open and x == self.lo):
            raise self.bad(v, path)


class Opt(Spec):
    """``inner`` or null."""

    def __init__(self, inner: Spec):
        self.inner = inner
        self.what = f"{inner.what} or null"

    def check(self, v, path, finite):
        if v is not None:
            self.inner.check(v, path, finite)


class List(Spec):
    def __init__(self, item: Spec, nonempty: bool = False):
        self.item, self.nonempty = item, nonempty
        self.what = f"a {'non-empty ' if nonempty else ''}list (each item {item.what})"

    def check(self, v, path, finite):
        if not isinstance(v, (list, tuple)) or (self.nonempty and not v):
            raise self.bad(v, path)
        item = self.item
        if isinstance(item, Str) and not (item.nonempty or item.stripped or item.choices):
            if all(type(x) is str for x in v):  # the common case, fast: tokens, states
                return
        for i, x in enumerate(v):
            item.check(x, f"{path}[{i}]", finite)


class Row(Spec):
    """A fixed list: one check per place; the places from ``required`` on may be left out."""

    def __init__(self, items: tuple[Spec, ...], required: int, what: str):
        self.items, self.required, self.what = items, required, what

    def check(self, v, path, finite):
        if not isinstance(v, (list, tuple)) or not self.required <= len(v) <= len(self.items):
            raise self.bad(v, path)
        for i, (x, s) in enumerate(zip(v, self.items)):
            s.check(x, f"{path}[{i}]", finite)


class Obj(Spec):
    """A JSON object with the ``fields`` it may hold (``required`` ones it must), checked by ``rule`` as a whole
    afterwards. ``extra``: a key the fields do not name is refused (None), or checked by ``extra``."""

    def __init__(
        self,
        fields: dict[str, Spec],
        required: tuple[str, ...] = (),
        extra: Spec | None = None,
        rule: Callable[[dict, str, bool], None] | None = None,
        keys: Spec | None = None,
    ):
        self.fields, self.required, self.extra, self.rule, self.keys = fields, required, extra, rule, keys
        self.what = "an object"

    def check(self, v, path, finite):
        if not isinstance(v, dict):
            raise self.bad(v, path)
        for k in self.required:
            if k not in v:
                raise Bad(path, f"has no field {k!r}")
        for k, x in v.items():
            spec = self.fields.get(k, self.extra)
            if spec is None:
                raise Bad(path, f"has the unknown field {_show(k)}")
            spec.check(x, f"{path}.{k}" if path else k, finite)
        if self.rule is not None:
            self.rule(v, path, finite)


class Map(Spec):
    """A JSON object from any string key to ``value``."""

    def __init__(self, value: Spec):
        self.value = value
        self.what = f"an object of {value.what}"

    def check(self, v, path, finite):
        if not isinstance(v, dict):
            raise self.bad(v, path)
        for k, x in v.items():
            self.value.check(x, f"{path}[{_show(k)}]", finite)


# ---------------------------------------------------------------------------------------------- from the dataclasses
def from_hint(t) -> Spec:
    """The check of a field's type hint: a dataclass by its own schema (:func:`of_dataclass`), ``dict`` as any JSON
    object, lists item by item, ``X | None`` as X or null."""
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        inner = from_hint(args[0]) if len(args) == 1 else AnyJSON()
        return Opt(inner) if len(args) < len(typing.get_args(t)) else inner
    if dataclasses.is_dataclass(t) and isinstance(t, type):
        return of_dataclass(t)
    if t is dict or origin is dict:
        return AnyJSON(dict)
    if t is list or origin is list:
        item = typing.get_args(t)
        return List(from_hint(item[0]) if item else AnyJSON())
    return {str: Str(), bool: Bool(), int: Int(), float: Num()}.get(t, AnyJSON())


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def of_dataclass(cls: type) -> Obj:
    """The schema of a dataclass's JSON: its fields from their type hints, narrowed by :data:`RULES`; keys that it
    does not name are dropped before the check (:func:`check_reading`)."""
    hints = typing.get_type_hints(cls)
    rules, rule = RULES.get(cls.__name__, {}), CROSS.get(cls.__name__)
    fields = {f.name: rules.get(f.name) or from_hint(hints[f.name]) for f in dataclasses.fields(cls)}
    required = tuple(f.name for f in dataclasses.fields(cls) if _required(f))
    return Obj(fields, required, rule=rule)


# ---------------------------------------------------------------------------------------------- the narrowing rules
def _sample_rule(s: dict, path: str, finite: bool) -> None:
    n = len(s["tokens"])
    if not s["position"] < n:
        raise Bad(f"{path}.position", f"must be a token index below {n} (the sample's tokens), got {s['position']}")
    if len(s["distances"]) != n:
        raise Bad(f"{path}.distances", f"must hold one entry per token ({n}), got {len(s['distances'])}")
    if len(s["delta"]) not in (0, n):
        raise Bad(f"{path}.delta", f"must hold one entry per token ({n}) or none, got {len(s['delta'])}")


def _chains_rule(c: dict, path: str, finite: bool) -> None:
    members = c["members"]
    for key in ("states", "draws"):
        for i, st in enumerate(c.get(key, ())):
            for x in st if key == "states" else (st,):
                if x not in members:
                    raise Bad(f"{path}.{key}[{i}]", f"names {_show(x)}, which is not among the chains' members")
    for x, m in members.items():
        if not m[1] < len(m[2]):
            raise Bad(f"{path}.members[{_show(x)}][1]", f"must be a token index below {len(m[2])}, got {m[1]}")
    if c.get("coverage", 0.0) > SATURATED and any(len(m) < 4 for m in members.values()):
        raise Bad(f"{path}.members", "must give every member's weight (its fourth entry) where coverage is given")


def _distribution_rule(d: dict, path: str, finite: bool) -> None:
    if d.get("kind") == "data":
        for k in ("epsilon", "members"):
            if k not in d:
                raise Bad(path, f"has no field {k!r} (a data set's members within epsilon)")
    for x, m in d.get("members", {}).items():
        if not m[1] < len(m[2]):
            raise Bad(f"{path}.members[{_show(x)}][1]", f"must be a token index below {len(m[2])}, got {m[1]}")


def _reading_rule(p: dict, path: str, finite: bool) -> None:
    n = len(p["tokens"])
    if not p["position"] < n:
        raise Bad("position", f"must be a token index below {n} (the reading's tokens), got {p['position']}")
    att = p.get("attention")
    if att is not None and len(att) != p["position"] + 1:
        raise Bad(
            "attention",
            f"must hold one weight per token up to the query position ({p['position'] + 1}), got {len(att)}",
        )
    counted = sum(s["count"] for s in p["samples"])
    if counted > p["n_candidates"]:
        raise Bad("samples", f"count {counted} candidates in all, more than n_candidates ({p['n_candidates']})")


_MEMBER = Row(
    (Num(0), Int(0), List(Str(), nonempty=True), Num(0, open=True)),
    3,
    "[distance, position, tokens, weight]",
)
_DATA_MEMBER = Row(
    (Num(0), Int(0), List(Str(), nonempty=True), Num(0), AnyJSON(dict)),
    4,
    "[distance, position, tokens, weight, feature values]",
)
_MIX = Row((Num(0, open=True), Num(0)), 2, "a [temperature, noise] pair")
_SHARE = Opt(Num(0, 1))

RULES: dict[str, dict[str, Spec]] = {
    "Sample": {
        "tokens": List(Str(), nonempty=True),
        "distance": Num(0),
        "position": Int(0),
        "distances": List(Opt(Num(0))),
        "delta": List(Num(-1, 1)),
        "count": Int(0, MAX_SAMPLES),
        "source": Str(choices=SOURCES),
    },
    "Preimage": {
        "tokens": List(Str(), nonempty=True),
        "position": Int(0),
        "site": Str(stripped=True),
        "site_short": Str(stripped=True),
        "epsilon": Num(0, open=True),
        "metric": Str(choices=METRICS),
        "mode": Str(stripped=True),
        "n_candidates": Int(1, MAX_SAMPLES),
        "fraction_inside": Num(0, 1),
        "settings": Obj(
            {
                "mix": List(_MIX, nonempty=True),
                "samples": Int(1, MAX_SAMPLES),
                "seed": Int(0, MAX_SEED),
                "chains": Int(0, MAX_CHAINS),
                "dropped": Int(0, MAX_SAMPLES),
                "task": Opt(Str()),
                "features": List(Str()),
            },
            extra=AnyJSON(),
        ),
        "attention": Opt(List(Num(0, 1))),
        "summary": Opt(List(Str())),
        "shares": Opt(
            List(
                Obj(
                    {
                        "feature": Str(),
                        "value": AnyJSON(),
                        "share": _SHARE,
                        "low": _SHARE,
                        "high": _SHARE,
                        "n": Opt(Num(0)),
                        "estimate": Bool(),
                    },
                    ("feature",),
                    extra=AnyJSON(),
                )
            )
        ),
        "checks": Opt(
            List(
                Obj(
                    {"feature": Str(), "value": AnyJSON(), "distances": List(Num(0))},
                    ("feature", "distances"),
                    extra=AnyJSON(),
                )
            )
        ),
        "chains": Opt(
            Obj(
                {
                    "epsilon": Num(0, open=True),
                    "level": Num(0),
                    "exact": Bool(),
                    "states": List(List(Str())),
                    "proposed": Int(0),
                    "accepted": Int(0),
                    "distinct": Int(0),
                    "coverage": Num(0, 1),
                    "draws": List(Str()),
                    "members": Map(_MEMBER),
                },
                ("epsilon", "states", "members"),
                extra=AnyJSON(),
                rule=_chains_rule,
            )
        ),
        "distribution": Opt(
            Obj(
                {
                    "kind": Str(),
                    "name": Opt(Str()),
                    "inputs": Int(0),
                    "distinct": Int(0),
                    "epsilon": Num(0, open=True),
                    "metric": Str(choices=METRICS),
                    "found": Int(0),
                    "total": Num(0),
                    "n_eff": Num(0),
                    "subsampled": Bool(),
                    "members": Map(_DATA_MEMBER),
                },
                extra=AnyJSON(),
                rule=_distribution_rule,
            )
        ),
        "sources": Opt(Map(Int(0))),
        "chart": Opt(
            List(
                Obj(
                    {
                        "item": Str(),
                        "verdict": Str(choices=("shared", "unsure", "varies", "few")),
                        "query": Opt(Str()),
                        "values": List(
                            Obj(
                                {"value": Str(), "share": Num(0, 1), "low": Num(0, 1), "high": Num(0, 1)},
                                ("value", "share", "low", "high"),
                            )
                        ),
                        "distinct": Int(0),
                        "check": Opt(Str()),
                    },
                    ("item", "verdict", "values"),
                )
            )
        ),
    },
}
"""Per dataclass (by name), the fields narrowed beyond their type hints."""
CROSS: dict[str, Callable[[dict, str, bool], None]] = {"Sample": _sample_rule, "Preimage": _reading_rule}
"""Per dataclass (by name), the rule that ties its fields together (run after each field is checked)."""


# ---------------------------------------------------------------------------------------------- the entry points
def _classes():
    from .preimage import Preimage, Sample

    return Preimage, Sample


_SCHEMA: Obj | None = None


def reading_schema() -> Obj:
    """The schema of :class:`~inversionview.preimage.Preimage`'s JSON (built once, from the dataclasses)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = of_dataclass(_classes()[0])
    return _SCHEMA


def reading_dict(pre) -> dict:
    """A reading's JSON fields, as :meth:`Preimage.to_dict` gives them but without its deep copy (200x faster at
    1,024 samples: 0.3 ms against 63 ms)."""
    return {
        **{f.name: getattr(pre, f.name) for f in dataclasses.fields(pre)},
        "samples": [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)} for s in pre.samples],
    }


def known_fields(d) -> dict:
    """``d`` (a reading's JSON) with only the keys the dataclasses name, in the reading and in each sample; anything
    that is not an object is left as it is (the check refuses it)."""
    Preimage, Sample = _classes()
    if not isinstance(d, dict):
        return d
    keep = {f.name for f in dataclasses.fields(Preimage)}
    skeep = {f.name for f in dataclasses.fields(Sample)}
    out = {k: v for k, v in d.items() if k in keep}
    if isinstance(out.get("samples"), list):
        out["samples"] = [
            {k: v for k, v in s.items() if k in skeep} if isinstance(s, dict) else s for s in d["samples"]
        ]
    return out


def check_reading(d, finite: bool = True) -> dict:
    """``d`` checked against the schema, keys it does not know dropped; a break is a one-line :class:`UserError`
    (``not a reading's JSON (Preimage.to_dict()): samples[2].count must be ...``). ``finite`` False lets numbers be
    infinite or NaN (a reading the library stored as it was given)."""
    if not isinstance(d, dict):
        raise NotAReading(f"a reading must be a JSON object, got {_type_name(d)}")
    d = known_fields(d)
    try:
        reading_schema().check(d, "", finite)
    except Bad as e:
        raise NotAReading(str(e)) from None
    return d


def reading_from_dict(d, finite: bool = True):
    """The :class:`~inversionview.preimage.Preimage` of a reading's JSON, checked (:func:`check_reading`)."""
    Preimage, Sample = _classes()
    d = check_reading(d, finite)
    return Preimage(**{**d, "samples": [Sample(**s) for s in d["samples"]]})
