"""An automatic summary of one reading: what the distinct in-epsilon samples share, each item with its share, and
what varies (METHOD.md §4-5).

Items: the task's features (:mod:`inversionview.features`), the multiset of tokens, the length, and the tokens
at aligned positions, aligned from the start and at the matched position (each sample's arg-min position
against the query's). An item is *shared* when one value holds in at least :data:`SHARED` of the samples;
a feature below that *varies*, shown with its most common values.
"""

from __future__ import annotations

from collections import Counter

from .features import builtin_features

SHARED = 0.9
EXAMPLES = 3


def _fmt(v) -> str:
    return "(none)" if v is None else str(v)


def _text_tokens(s) -> list[str]:
    """A sample's tokens without BOS and without EOS/PAD (the positions with no distance)."""
    return [t for i, t in enumerate(s.tokens) if i > 0 and (i >= len(s.distances) or s.distances[i] is not None)]


def _multiset(tokens: list[str]) -> str:
    c = Counter(tokens)
    return "{" + ", ".join(f"{t!r}" + (f"x{n}" if n > 1 else "") for t, n in sorted(c.items())) + "}"


def _short(v, width: int = 48) -> str:
    s = _fmt(v)
    return s if len(s) <= width else s[:width - 3] + "..."


def _varies(label: str, values: Counter, n: int) -> str:
    top = ", ".join(f"{_short(v)} {c / n:.0%}" for v, c in values.most_common(EXAMPLES))
    more = f", ... {len(values)} values" if len(values) > EXAMPLES else ""
    return f"varies: {label} ({top}{more})"


def _aligned(pre, inside, n: int, matched: bool) -> str | None:
    """Tokens held at fixed positions by >= SHARED of the samples, aligned from the start or at the matched
    position; None if there are none."""
    q = len(pre.tokens)
    offsets = range(1 - pre.position, q - pre.position) if matched else range(1, q)
    items = []
    for o in offsets:
        at = Counter()
        for s in inside:
            i = s.position + o if matched else o
            ok = 0 < i < len(s.tokens) and (i >= len(s.distances) or s.distances[i] is not None)
            at[s.tokens[i] if ok else None] += 1
        tok, c = at.most_common(1)[0]
        if tok is not None and c / n >= SHARED:
            items.append(f"{o:+d}={tok!r} {c / n:.0%}" if matched else f"{o}={tok!r} {c / n:.0%}")
    if not items:
        return None
    where = "at the matched position (offset from it)" if matched else "from the start (index, BOS = 0)"
    return f"tokens aligned {where}: " + ", ".join(items)


def summarize(pre, task=None) -> list[str]:
    """What the distinct in-epsilon samples of the reading ``pre`` share, with a share for each item, and what
    varies. ``task`` (a Task or its name; default: the one in ``pre.settings``) supplies the features."""
    inside = pre.inside
    n = len(inside)
    if n == 0:
        return [f"no sample inside epsilon {pre.epsilon:g}: nothing to summarise"]
    task = task if task is not None else pre.settings.get("task")
    shared, varies = [], []

    def item(label: str, values: Counter) -> None:
        v, c = values.most_common(1)[0]
        if v is not None and c / n >= SHARED:
            shared.append((c / n, f"{label} = {_fmt(v)}"))
        else:
            varies.append(_varies(label, values, n))

    for name, f in builtin_features(task).items():
        vals = Counter()
        for s in inside:
            try:
                vals[f(s.text)] += 1
            except Exception:  # a built-in feature on a malformed sample: does not apply
                vals[None] += 1
        item(name, vals)
    toks = [_text_tokens(s) for s in inside]
    item("multiset of tokens", Counter(_multiset(t) for t in toks))
    item("number of tokens", Counter(len(t) for t in toks))

    lines = [f"shared by {share:.0%} of {n} samples: {what}" for share, what in shared]
    lines += [x for x in (_aligned(pre, inside, n, matched=True), _aligned(pre, inside, n, matched=False)) if x]
    return lines + varies
