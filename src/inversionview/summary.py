"""An automatic summary of one reading: what the members of the epsilon-preimage share, each item with an estimated
share and its 95% interval, what varies, and counterfactual checks (METHOD.md §4-5, §7).

Where the task has an input distribution and moves (:mod:`inversionview.explore`), the shares are estimates over the
preimage under that distribution, from the chains' states; otherwise they are shares among the decoder's distinct
in-epsilon samples, and the summary says so (they describe the decoder's proposals, not the preimage).

Items: the task's features (:mod:`inversionview.features`), the multiset of tokens, the length, and the tokens at
aligned positions, aligned from the start and at the matched position (each member's arg-min position against the
query's). An item is *shared* when its most common value has an estimated share of at least :data:`SHARED` and
the interval's low end is at least :data:`SURE`; otherwise it *varies*, shown with its most common values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .estimate import Chains, Share, credit, share, wilson
from .features import builtin_features

SHARED = 0.9
SURE = 0.75  # the low end of a shared item's interval
FEW = 5  # fewer distinct members than this: too few to say what the preimage shares
EXAMPLES = 3


@dataclass
class Member:
    text: str
    tokens: list[str]  # without BOS, EOS and PAD
    offset: int  # the arg-min position, as an index into the full token list (BOS = 0)
    full: list[str]  # all tokens, BOS included
    values: dict | None = None  # the user's own features' values, where the reading recorded them (data members)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # feature values taken (_feature_getter)


@dataclass
class Population:
    """What the summary is taken over: per chain, its states (members); ``estimate`` says whether these are draws
    from the preimage under the input distribution (chains) or the decoder's distinct samples (one per chain)."""

    chains: list[list[Member]]
    distinct: int
    estimate: bool
    weights: list[float] | None = None  # a data set's members (one per chain): each one's weight in the data
    n_eff: float = 0.0  # their intervals' effective size

    def share(self, f: Callable[[Member], bool]) -> Share | None:
        if self.weights is not None:  # the data set's preimage: a weighted share over its members
            total = sum(self.weights)
            if not total:
                return None
            p = sum(w for c, w in zip(self.chains, self.weights) if f(c[0])) / total
            return Share(p, *wilson(p, self.n_eff), self.n_eff)
        return share(self.chains, f, self.distinct)

    def members(self) -> int:
        """Distinct members in all: the states' (``distinct``) and those of the members met that weigh in (a
        closed preimage's, which the chains may not have reached)."""
        met = {m.text for m, _ in getattr(self.chains, "members", ())}
        return len({m.text for c in self.chains for m in c} | met)


def _fmt(v) -> str:
    return "(none)" if v is None else str(v)


def _short(v, width: int = 48) -> str:
    s = _fmt(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def _multiset(tokens: list[str]) -> str:
    c = Counter(tokens)
    return "{" + ", ".join(f"{t!r}" + (f"x{n}" if n > 1 else "") for t, n in sorted(c.items())) + "}"


def _pct(s: Share) -> str:
    return f"{s.share:.0%} [{s.low:.0%}-{s.high:.0%}]"


def population(pre) -> Population:
    """The reading's members: the chains' states where the reading has them and its epsilon is within the one the
    chains ran at (a state inside the smaller epsilon is still a draw from the smaller preimage), else the
    decoder's distinct samples inside epsilon."""
    dist = getattr(pre, "distribution", None) or {}
    if dist.get("kind") == "data" and pre.epsilon <= dist.get("epsilon", -1.0):
        return _data_population(pre, dist)
    ch = pre.chains
    if ch and pre.epsilon <= ch["epsilon"]:
        memo = {}

        def member(x):
            if x not in memo:
                d, pos, toks = ch["members"][x][:3]
                memo[x] = Member(x, toks[1:], pos, toks) if d <= pre.epsilon else None
            return memo[x]

        states = [[m for m in map(member, st) if m is not None] for st in ch["states"]]
        cov = ch.get("coverage", 0.0)  # a reading saved before members kept weights has none
        met = [(member(x), v[3]) for x, v in ch["members"].items()] if credit(cov) > 0 else []
        draws = [m for m in map(member, ch.get("draws", ())) if m is not None]  # none in a reading saved before
        chains = Chains(states, [(m, w) for m, w in met if m is not None], cov, draws)
        return Population(chains, len({m.text for st in states for m in st}), True)
    inside = [
        Member(
            s.text,
            [t for i, t in enumerate(s.tokens) if i > 0 and i < len(s.distances) and s.distances[i] is not None],
            s.position,
            s.tokens,
        )
        for s in pre.inside
    ]
    return Population([[m] for m in inside], len(inside), False)


def _data_population(pre, dist: dict) -> Population:
    """The members of the data set's preimage the reading kept, within the reading's epsilon, with their weights. The
    intervals' effective size shrinks with the kept weight that is inside (a smaller epsilon than the scan's)."""
    kept = [(x, v) for x, v in dist["members"].items() if v[0] <= pre.epsilon]
    weights = [float(v[3]) for _, v in kept]
    all_w = sum(float(v[3]) for v in dist["members"].values())
    n_eff = float(dist.get("n_eff", 0.0)) * (sum(weights) / all_w if all_w else 0.0)
    members = [[Member(x, v[2][1:], v[1], v[2], v[4] if len(v) > 4 else None)] for x, v in kept]
    return Population(members, len(members), True, weights, n_eff)


def _aligned(pre, pop: Population, matched: bool) -> tuple[str | None, list[dict]]:
    """Tokens held at fixed positions, aligned from the start or at the matched position: the summary's line (None
    if none is shared) and a chart row for each shared position."""
    q = len(pre.tokens)
    offsets = range(1 - pre.position, q - pre.position) if matched else range(1, q)
    items, rows = [], []
    for o in offsets:

        def at(m, o=o):
            i = m.offset + o if matched else o
            return m.full[i] if 0 < i < len(m.full) and m.full[i] in m.tokens else None

        top = Counter(at(m) for c in pop.chains for m in c).most_common(1)[0][0]
        s = pop.share(lambda m: at(m, o) == top)  # called at once: no need to bind o and top
        if top is not None and s and is_shared(s):
            where = f"{o:+d}" if matched else f"{o}"
            items.append(f"{where}={top!r} {_pct(s)}")
            name = f"token at {where} from the matched position" if matched else f"token at index {where}"
            i = pre.position + o if matched else o
            rows.append(_chart_row(name, "shared", pre.tokens[i] if 0 <= i < q else None, [(top, s)], 1, None))
    if not items:
        return None, []
    where = "at the matched position (offset from it)" if matched else "from the start (index, BOS = 0)"
    return f"tokens aligned {where}: " + ", ".join(items), rows


def _features(pre, task, features: dict | None) -> dict:
    """The features to summarise, by name: ``features`` where given (the reading's own, callables), else the task's
    built-ins and, by name, the user's features the reading recorded (their values are kept with the data members,
    never computed again from a reading's JSON)."""
    if features is not None:
        return dict(features)
    out: dict = dict(builtin_features(task))
    for name in (getattr(pre, "settings", None) or {}).get("features") or ():
        if isinstance(name, str) and ":" in name:
            out.setdefault(name, None)
    return out


def items(pop: Population, task, features: dict | None = None) -> list[tuple[str, list[tuple[object, Share]], int]]:
    """Per item (the task's features, then the multiset of tokens and the number of tokens), its most common
    values with their estimated shares, the largest first (at most EXAMPLES), and its number of distinct values.
    The values are counted over the chains' states and the members met that weigh in (the members of a closed
    preimage, whose states may have met only some of them); each value's share is estimated (:meth:`Population.share`)."""
    feats = builtin_features(task) if features is None else features
    getters = {name: _feature_getter(f, name) for name, f in feats.items()}
    getters["multiset of tokens"] = lambda m: _multiset(m.tokens)
    getters["number of tokens"] = lambda m: len(m.tokens)
    met = [m for m, _ in getattr(pop.chains, "members", ())]
    out = []
    for name, g in getters.items():
        if pop.weights is not None:  # a data set's members: one pass, each value's weight
            tally: dict[object, float] = {}
            for c, w in zip(pop.chains, pop.weights):
                v = g(c[0])
                tally[v] = tally.get(v, 0.0) + w
            total = sum(tally.values())
            top = [(v, w / total) for v, w in sorted(tally.items(), key=lambda vw: -vw[1])[:EXAMPLES]]
            out.append((name, [(v, Share(p, *wilson(p, pop.n_eff), pop.n_eff)) for v, p in top], len(tally)))
            continue
        values = Counter(g(m) for c in pop.chains for m in c) + Counter(g(m) for m in met)
        shares = [(v, pop.share(lambda m: g(m) == v)) for v, _ in values.most_common(EXAMPLES)]  # called at once
        known = [(v, x) for v, x in shares if x is not None]  # None: no state (at a smaller epsilon) and no draw
        out.append((name, sorted(known, key=lambda vx: -vx[1].share), len(values)))
    return out


def summarize(pre, task=None, features: dict | None = None) -> list[str]:
    """What the members of the reading ``pre``'s preimage share, with an estimated share and interval for each
    item, what varies, and the counterfactual checks (``pre.checks``). ``task`` (a Task or its name; default: the
    one in ``pre.settings``) supplies the features, or ``features`` (by name: callables) where given."""
    return summary(pre, task, features)[0]


def summary(pre, task=None, features: dict | None = None) -> tuple[list[str], list[dict]]:
    """:func:`summarize`'s lines and the same items as a chart (what the views draw as bars): per item, its name,
    its verdict (``shared``, ``unsure``, ``varies``, or ``few`` members), the query's own value, and its most common
    values, each with its estimated share and 95% interval; a feature that a counterfactual check changed carries
    the check (how many of the changed members stay inside epsilon)."""
    task = task if task is not None else pre.settings.get("task")
    pop = population(pre)
    if not pop.distinct:
        return [f"no member found inside epsilon {pre.epsilon:g}: nothing to summarise"], []
    n_members = pop.members()
    lines, varies, shared, unsure, chart = [_head(pre, pop, n_members)], [], [], [], []
    few = n_members < FEW
    if few:
        lines.append(f"too few members ({n_members} distinct) to say what the preimage shares")
    feats = _features(pre, task, features)
    mine = _query_values(pre, feats)
    checks = {c["feature"]: c for c in pre.checks or []}
    # chains that all began at the decoder's members rest on look-alikes of the query: no share of theirs is sure
    loose = pop.estimate and pop.weights is None and not (pre.chains or {}).get("exact", True)
    for name, shares, n_values in items(pop, task, feats):
        if not shares:
            continue
        top, s = shares[0]
        tops = ", ".join(f"{_short(v)} {x.share:.0%}" for v, x in shares)
        more = f", ... {n_values} values" if n_values > EXAMPLES else ""
        if loose and not few:
            verdict = "unsure"
            unsure.append(f"unsure: {name} ({tops}{more}): the chains all began at the decoder's members")
        elif not few and top is not None and is_shared(s):
            verdict = "shared"
            shared.append(f"shared by {_pct(s)}: {name} = {_fmt(top)}")
        elif not few and top is not None and s is not None and s.share >= SHARED:  # high, but on too few starts
            verdict = "unsure"
            unsure.append(f"unsure: {name} = {_fmt(top)} in {_pct(s)}: too few independent members to call it shared")
        else:
            verdict = "few" if few else "varies"
            varies.append(f"varies: {name} ({tops}{more})")
        check = _check_text(checks[name], pre.epsilon) if name in checks else None
        shown = shares if verdict in ("varies", "few") or loose else shares[:1]
        chart.append(_chart_row(name, verdict, mine.get(name), shown, n_values, check))
    lines += shared + unsure
    if not few and not loose:
        for matched in (True, False):
            line, rows = _aligned(pre, pop, matched)
            lines += [line] if line else []
            chart += rows
    lines += varies
    for c in pre.checks or []:
        lines.append(f"check: {c['feature']} {_check_text(c, pre.epsilon)}")
    return lines, chart


def _chart_row(name: str, verdict: str, query, shown, n_values: int, check: str | None) -> dict:
    """One item of the chart: the values ``shown`` (its most common, or the top one alone where it is shared or,
    on chains from exact starts, unsure)."""
    return {
        "item": name,
        "verdict": verdict,
        "query": None if query is None else _fmt(query),
        "values": [{"value": _fmt(v), "share": x.share, "low": x.low, "high": x.high} for v, x in shown],
        "distinct": n_values,
        "check": check,
    }


def _head(pre, pop: Population, n_members: int) -> str:
    """The summary's first line: what its shares are taken over."""
    n_states = sum(map(len, pop.chains))
    dist = getattr(pre, "distribution", None) or {}
    if pop.weights is not None:
        head = (
            f"exact over the data set's preimage: {dist.get('found', n_members):,} distinct inputs of {dist.get('name')} "
            f"({dist.get('distinct', 0):,} distinct of {dist.get('inputs', 0):,} inputs) lie within epsilon; shares "
            f"over them, with 95% intervals for the distribution the data was drawn from"
        )
        if dist.get("subsampled"):
            head += f" (taken over a random sample of {n_members:,} of them by weight)"
    elif pop.estimate:
        starts = (
            f"{len(pop.chains)} distinct starts"
            if pre.chains.get("exact", True)
            else "the decoder's members (no generator draw landed inside: they count as one start)"
        )
        head = (
            f"estimated over the preimage under the input distribution: {n_states} chain states from {starts}, "
            f"{n_members} distinct members; shares with 95% intervals"
        )
        level = pre.chains.get("level", 0.0)
        if level > pre.chains["epsilon"]:  # few generator draws landed inside: the chains walked a larger preimage
            head += f" (the chains walked within {level:g}, where the preimage is better connected, and kept their states inside)"
    else:
        head = (
            f"shares among {pop.distinct} distinct decoder samples inside epsilon, with 95% intervals: they "
            "describe the decoder's proposals, not the preimage (no input distribution to estimate it under)"
        )
    return head


def _check_text(c: dict, epsilon: float) -> str:
    """A counterfactual check in words: how many of the members changed in its feature stay inside epsilon."""
    d = c["distances"]
    if "edit" in c and c["edit"] is None:
        return "cannot be changed in members: the data set has no edits for it"
    inside = sum(x <= epsilon for x in d)
    return f"changed in {len(d)} members: {inside} stay inside epsilon" + (f" ({inside / len(d):.0%})" if d else "")


def _query_values(pre, feats: dict) -> dict:
    """The query's own value of each summary item (a user feature recorded by name: as the reading measured it)."""
    before = {x.get("feature"): x.get("value") for x in pre.shares or [] if isinstance(x, dict)}
    q = Member(pre.text, pre.tokens[1:], pre.position, pre.tokens)
    out: dict = {}
    for name, f in feats.items():
        v = before.get(name) if f is None else _safe(f, pre.text)
        out[name] = tuple(v) if isinstance(v, list) else v
    out["multiset of tokens"] = _multiset(q.tokens)
    out["number of tokens"] = len(q.tokens)
    return out


def is_shared(s: dict | Share) -> bool:
    """The rule for calling an item shared: estimated share >= SHARED and the interval's low end >= SURE."""
    share_, low = (s["share"], s["low"]) if isinstance(s, dict) else (s.share, s.low)
    return share_ is not None and share_ >= SHARED and low >= SURE


def feature_shares(pre, task=None, features: dict | None = None) -> list[dict]:
    """Per feature of the task: the query's value and the estimated share of members that have it (FCR of this one
    query), with its 95% interval; share None where the reading has no member or the query's value is None."""
    task = task if task is not None else pre.settings.get("task")
    pop = population(pre)
    out = []
    before = {x.get("feature"): x.get("value") for x in pre.shares or [] if isinstance(x, dict)}
    for name, f in _features(pre, task, features).items():
        if f is None:  # a user feature recorded by name: the query's value as the reading measured it
            v = before.get(name)
            v = tuple(v) if isinstance(v, list) else v
        else:
            try:
                v = f(pre.text)
            except Exception:
                v = None
        g = _feature_getter(f, name)
        s = None if v is None else pop.share(lambda m: g(m) == v)  # called at once
        out.append(
            {
                "feature": name,
                "value": v,
                "share": s and s.share,
                "low": s and s.low,
                "high": s and s.high,
                "n": s and round(s.n, 1),
                "estimate": pop.estimate,
            }
        )
    return out


def _feature_getter(f, name: str = "") -> Callable[[Member], object]:
    """A member's value of the feature ``f`` (None where it raises), taken once per member: a population's chains
    hold the same Member object wherever they revisit a member, and the getter lives no longer than they do. Where
    the member carries the value the reading recorded (``Member.values``), or ``f`` is None, that value is taken."""
    memo: dict[int, object] = {}

    def get(m: Member) -> object:
        k = id(m)
        if k not in memo:
            if name and name in m.cache:  # taken by another getter of the same feature (items, shares, summary)
                memo[k] = m.cache[name]
            elif m.values is not None and name in m.values:
                v = m.values[name]
                memo[k] = tuple(v) if isinstance(v, list) else v
            else:
                memo[k] = None if f is None else _safe(f, m.text)
            if name:
                m.cache[name] = memo[k]
        return memo[k]

    return get


def _safe(f, text):
    try:
        return f(text)
    except Exception:
        return None


def distribution_line(pre) -> str:
    """The input distribution the reading's shares estimate, in one line (every view shows it)."""
    dist = getattr(pre, "distribution", None) or {}
    kind = dist.get("kind")
    if kind == "data":
        return (
            f"shares estimate the data set {dist.get('name')} ({dist.get('inputs', 0):,} inputs): its members within "
            "epsilon found exactly by a scan"
        )
    if kind == "generator":
        return (
            f"shares estimate the input distribution of {dist.get('name')} (its generator, with chains on the preimage)"
        )
    if kind == "decoder" or (pre.chains is None and not dist):
        return "shares are over the decoder's samples: no input distribution (give --data to read under a data set)"
    return "shares estimate the task's input distribution (chains on the preimage)"


def sources_line(pre) -> str | None:
    """How many distinct members of the preimage each source found, or None where the reading does not say."""
    src = getattr(pre, "sources", None)
    if not src:
        return None
    return "members found by source: " + ", ".join(
        f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}" for k, v in src.items()
    )
