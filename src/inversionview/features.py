"""Feature functions (a leaf of the package: it imports nothing of the reading).

A *feature* maps an input text (without BOS/EOS) to a hashable value, or to None where it does not apply (a
malformed decoder sample). Each built-in task has its own (:func:`builtin_features`), a user's own task may name
its own (a class attribute ``features``), and users add their own as ``module:function`` (a function text ->
value). Feature consistency rates over many readings are in :mod:`inversionview.fcr`.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Hashable

from .errors import UserError

Feature = Callable[[str], Hashable]


# ---------------------------------------------------------------------------------------------- built-in features
@functools.lru_cache(maxsize=1 << 16)
def _counting(text: str):
    """``(letters, target)`` of a counting input ``letters|t:n``; None if malformed."""
    head, sep, tail = text.partition("|")
    if not sep or not head.isalpha() or not tail[:1].isalpha():
        return None
    return head, tail[0]


def _count(text):
    p = _counting(text)
    return None if p is None else p[0].count(p[1])


def _target(text):
    p = _counting(text)
    return None if p is None else p[1]


def _letters(text):
    p = _counting(text)
    return None if p is None else "".join(sorted(set(p[0])))


def _length(text):
    p = _counting(text)
    return None if p is None else len(p[0])


_ADDITION = re.compile(r"^(\d)(\d)(\d)\+(\d)(\d)(\d)=(\d*)$")


@functools.lru_cache(maxsize=1 << 16)
def _addition(text: str):
    """``(F1, F2, F3, S1, S2, S3, c)`` of an addition input ``F1F2F3+S1S2S3=c`` (c as written); None if malformed."""
    m = _ADDITION.match(text)
    return None if m is None else (*map(int, m.groups()[:6]), m.group(7))


def _digit(i: int):
    def f(text):
        p = _addition(text)
        return None if p is None else p[i]

    return f


def _c_digit(i: int):
    def f(text):  # the written sum's i-th digit (from the left); None where it has fewer digits
        p = _addition(text)
        return None if p is None or len(p[6]) <= i else int(p[6][i])

    return f


def _pair(i: int):
    def f(text):  # the unordered pair {Fi, Si}
        p = _addition(text)
        return None if p is None else "{%d,%d}" % tuple(sorted((p[i], p[i + 3])))

    return f


def _carry(mod: int):
    def f(text):  # whether the digits below 10^k of a and b sum to 10^k or more (carry out of that place)
        p = _addition(text)
        if p is None:
            return None
        a, b = 100 * p[0] + 10 * p[1] + p[2], 100 * p[3] + 10 * p[4] + p[5]
        return a % mod + b % mod >= mod

    return f


def _sum_len(text):
    p = _addition(text)
    return None if p is None else len(p[6])


def _ioi(role: str):
    def f(text):
        from .tasks.ioi import parse

        r = parse(text)
        return None if r is None else r[role]

    return f


BUILTIN: dict[str, dict[str, tuple[Feature, str]]] = {
    "counting": {
        "target": (_target, "the target letter (after '|')"),
        "count": (_count, "the true count of the target letter"),
        "letters": (_letters, "the set of letters before '|'"),
        "length": (_length, "the number of letters before '|'"),
    },
    "addition": {
        **{f"F{i + 1}": (_digit(i), f"digit {i + 1} of the first operand (F1: hundreds)") for i in range(3)},
        **{f"S{i + 1}": (_digit(i + 3), f"digit {i + 1} of the second operand") for i in range(3)},
        **{f"C{i + 1}": (_c_digit(i), f"digit {i + 1} of the written sum (from the left)") for i in range(4)},
        **{f"F{i + 1}S{i + 1}": (_pair(i), f"the unordered pair {{F{i + 1},S{i + 1}}}") for i in range(3)},
        "carry_ones": (_carry(10), "a carry out of the ones (F3 + S3 >= 10)"),
        "carry_tens": (_carry(100), "a carry out of the tens into the hundreds"),
        "carry_hundreds": (_carry(1000), "a carry out of the hundreds (a + b >= 1000)"),
        "sum_len": (_sum_len, "the number of digits of the written sum"),
    },
    "ioi": {"IO": (_ioi("IO"), "the indirect-object name"), "S": (_ioi("S"), "the subject name")},
}


def _task_name(task) -> str:
    """A task's name (a Task or its name); "" for none, which no built-in task has."""
    name = task if isinstance(task, str) else getattr(task, "name", None)
    return name or ""


def builtin_features(task) -> dict[str, Feature]:
    """The built-in features of a task (a Task or its name), by name, and a user's task's own (its ``features``);
    {} for a task without any."""
    own = getattr(task, "features", None)
    if isinstance(own, dict):
        return dict(own)
    return {k: f for k, (f, _) in BUILTIN.get(_task_name(task), {}).items()}


def describe(task, name: str) -> str:
    """A built-in feature's one-line description, or the name itself (user features)."""
    return BUILTIN.get(_task_name(task), {}).get(name, (None, name))[1]


def load_feature(spec: str) -> Feature:
    """A user feature ``module:function`` (the current directory is importable)."""
    from .plugins import load_object

    if not spec.partition(":")[0] or not spec.partition(":")[2]:
        raise UserError(f"feature {spec!r}: expected module:function")
    f = load_object(spec, "feature")
    if not callable(f):
        raise UserError(f"feature {spec!r} is not callable: expected a function text -> value")
    return f


def resolve_features(task, names=None) -> dict[str, Feature]:
    """Features by name: built-in names of the task and ``module:function`` specs (a list, or a comma-separated
    string); all of the task's built-ins when ``names`` is None."""
    builtin = builtin_features(task)
    if names is None:
        return builtin
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = {}
    for n in names:
        if ":" in n:
            out[n] = load_feature(n)
        elif n in builtin:
            out[n] = builtin[n]
        else:
            known = ", ".join(builtin) or "none"
            raise UserError(
                f"unknown feature {n!r}: expected a built-in feature of the task ({known}) or module:function"
            )
    if not out:
        raise UserError("no features given: expected names separated by commas")
    return out


def value(name: str, f: Feature, text: str):
    """``f(text)``; a feature that raises or returns an unhashable value is a one-line UserError."""
    try:
        v = f(text)
        hash(v)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"feature {name!r} raised {type(e).__name__}: {e} on input {text!r}") from None
    return v
