"""Estimate a preimage's shares from what exploring it found (METHOD.md §7): the statistics of a reading.

A leaf: it knows states, members and weights, nothing of models, tasks or decoders. :func:`share` pools the chains'
states (a ratio estimator with its variance measured between distinct starts), the generator draws inside and the
members met (weighed by the chains' coverage, :func:`credit`); :func:`wilson` gives the 95% intervals.
docs/estimator.md describes why each piece is there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")  # a chain's state
Z = 1.96  # 95% intervals
# Student's t at 97.5% for 1..30 degrees of freedom: a share's variance measured between a few groups is itself
# uncertain, so its interval widens as a t interval would (share())
# fmt: off
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on
SATURATED = 0.5  # the chains' coverage up to which the members met count for nothing in a share (credit())
FEW = 3  # counts up to which an interval's end is the Poisson limit (wilson())
PER_START = 4  # a share rests on at most this many effective members per distinct start of the chains (share())


class Chains(list):
    """A query's chains, as :func:`share` takes them: per distinct start, the states kept, one list each. It also
    carries every member the reading met (``members``: (member, weight under the input distribution) pairs) and the
    chains' sample coverage (``coverage``, the share of the preimage's mass they are estimated to have met; 0
    where not measured): :func:`share` then weighs the members met by that coverage; and the generator draws that
    landed inside (``draws``, independent members of the preimage, the chains' starts left out), which join the
    states in a share. A plain list of lists is read as states alone."""

    def __init__(self, states=(), members: Sequence[tuple] = (), coverage: float = 0.0, draws: Sequence = ()):
        super().__init__(states)
        self.members = list(members)
        self.coverage = coverage
        self.draws = list(draws)


@dataclass(frozen=True)
class Share:
    """An estimated share of the preimage (under the input distribution) with its 95% interval; ``n`` is the
    effective number of independent members it rests on."""

    share: float
    low: float
    high: float
    n: float


def credit(coverage: float) -> float:
    """The weight :func:`share` gives the members met, from the chains' coverage: none up to SATURATED, then
    rising linearly to 1 at full coverage. Finds by local proposals are not independent draws (a chain proposes
    the neighbours of the states it walks through again and again), so Good and Turing's coverage runs high where
    the chains met a small part of a large preimage: counting's readings measure 0.0-0.4 where their members met
    are a biased few, and the members then made the mean error worse (0.024 against 0.021)."""
    return max(0.0, (coverage - SATURATED) / (1 - SATURATED))


def coverage(counts) -> float:
    """Good and Turing's sample coverage of members found ``counts`` times each: 1 - (members found once) / (finds
    in all); 0 without finds."""
    counts = list(counts)
    n = sum(counts)
    return 1 - sum(c == 1 for c in counts) / n if n else 0.0


def wilson(p: float, n: float) -> tuple[float, float]:
    """The 95% interval of a share ``p`` measured on ``n`` independent draws: Wilson's score interval, with the
    end next to a small count (``p n`` members that have the value, or ``(1 - p) n`` that have not, at most FEW and
    the lesser of the two) taken out to the Poisson limit of that count (Brown, Cai and DasGupta's modified Wilson interval, Stat. Sci. 2001).
    Wilson's end there is too close: a value met by one member in 64 reads [0.3 %, 8.3 %], and a value of true
    share 0.2 % is then outside it 1 time in 6 (counting's rare letter sets, bench_fidelity: the intervals held the
    truth in 84 % of the printed shares); the Poisson end is 0.04 %."""
    if n <= 0:
        return 0.0, 1.0
    den = 1 + Z * Z / n
    mid = (p + Z * Z / (2 * n)) / den
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / den
    low, high = max(0.0, mid - half), min(1.0, mid + half)
    if 0 < p * n <= FEW and p < 0.5:
        low = min(low, poisson_low(p * n) / n)
    if 0 < (1 - p) * n <= FEW and p > 0.5:
        high = max(high, 1 - poisson_low((1 - p) * n) / n)
    return low, high


def poisson_low(k: float) -> float:
    """The 97.5% lower confidence limit of a Poisson mean from a count ``k`` > 0 (real counts too): the mean mu at
    which a count of at least k has probability 2.5%, P(k, mu) = 0.025 with P the regularized lower incomplete
    gamma function (for k = 1: -ln 0.975 = 0.0253)."""
    lo, hi = 0.0, k + 1.0
    for _ in range(50):  # bisection; P(k, mu) rises with mu
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if _gamma_p(k, mu) < (1 - 0.95) / 2 else (lo, mu)
    return lo


def _gamma_p(s: float, x: float) -> float:
    """The regularized lower incomplete gamma function P(s, x), by its series (s > 0, x >= 0; x small here)."""
    if x <= 0:
        return 0.0
    term = tot = 1.0 / s
    k = 0
    while term > tot * 1e-14 and k < 10_000:
        k += 1
        term *= x / (s + k)
        tot += term
    return math.exp(s * math.log(x) - x - math.lgamma(s)) * tot


def share(states: Sequence[Sequence[T]], hit: Callable[[T], bool], distinct: int | None = None) -> Share | None:
    """The share of states for which ``hit`` holds, over all groups' states pooled (None without states): a relaxed
    chain keeps only its states inside epsilon, so a group's number of states is part of the estimate (a ratio
    estimator). The interval's effective size n is p(1-p) over the ratio's variance between groups, between the
    groups' effective number (Kish's, (sum of sizes)^2 / sum of squared sizes: a group that kept half the states
    weighs half the share, so it is not worth one member among many; bench_fidelity, counting a1.0, tuning seed 555:
    the printed intervals held the truth in 84.3 % of shares, 82.7 % with the number of groups) and the number of
    states; where every state agrees, or there is one group, there is no variance between groups to measure, and n
    is the number of ``distinct`` states (counted here when the states are hashable), at least the number of groups.
    Either way a group counts for one member plus one for each time its states change ``hit``, at most PER_START:
    only chains seen to cross between the two sides have mixed over them. A few starts whose chains stay on one side
    are a few independent members, however closely they agree (5 exact starts that all agree say little against a
    share of 0.4: 0.4^5 = 1 %), so a unanimous share rests on its groups alone. Where ``states`` is a
    :class:`Chains`, the members met join in (:func:`_with_members`)."""
    memo: dict[int, bool] = {}
    hits = [_hits(s, hit, memo) for s in states if s]
    if not hits:
        return _with_members(states, hit, _with_draws(states, hit, None, memo))  # the draws' share, if any
    groups = [(sum(h), len(h)) for h in hits]
    c = len(groups)
    cap = sum(min(PER_START, 1 + sum(a != b for a, b in zip(h, h[1:]))) for h in hits)
    total = sum(m for _, m in groups)
    p = sum(h for h, _ in groups) / total
    var = c / max(1, c - 1) * sum((h - p * m) ** 2 for h, m in groups) / total**2
    n: float
    if p in (0.0, 1.0) or c == 1:  # no spread between groups to measure
        if distinct is None:
            try:
                distinct = len({x for s in states for x in s})
            except TypeError:  # unhashable states
                distinct = c
        n = max(c, min(distinct, total, cap))
    else:  # the variance has c - 1 degrees of freedom: scaled by (z / t)^2, Wilson's interval is as wide as t's
        t = T975[c - 2] if c - 1 <= len(T975) else Z + (Z**3 + Z) / (4 * (c - 1))
        kish = total**2 / sum(m * m for _, m in groups)  # the groups' effective number, by their sizes
        n = total if var == 0 else min(max(p * (1 - p) / var * (Z / t) ** 2, kish), total)
        n = min(n, cap)
    return _with_members(states, hit, _with_draws(states, hit, Share(p, *wilson(p, n), n), memo))


def _with_draws(states, hit: Callable, s: Share | None, memo: dict[int, bool]) -> Share | None:
    """The states' share ``s`` pooled with the generator draws inside where ``states`` carries them
    (:class:`Chains`): two independent estimates of the same share, each weighed by its effective number of
    members (the inverse of its variance), which add up."""
    draws = getattr(states, "draws", ())
    if not draws:
        return s
    k, m = sum(_hits(draws, hit, memo)), len(draws)
    n = m + (s.n if s else 0.0)
    p = (k + (s.n * s.share if s else 0.0)) / n
    return Share(p, *wilson(p, n), n)


def _with_members(states, hit: Callable, s: Share | None) -> Share | None:
    """The states' share ``s`` combined with the members met where ``states`` carries them (:class:`Chains`): c
    times the weighted share among the members plus 1 - c times the states' share, c = credit(coverage). The
    interval is the states', widened to take the estimate in: where the members missed a part of the preimage the
    chains did not reach either (another component), the coverage cannot tell, and the states' spread is the
    honest width."""
    c, members = credit(getattr(states, "coverage", 0.0)), getattr(states, "members", ())
    if s is None or not (c > 0 and members):
        return s
    mass = sum(wt for _, wt in members)
    p = c * sum(wt for x, wt in members if hit(x)) / mass + (1 - c) * s.share
    return Share(p, min(s.low, p), max(s.high, p), s.n)


def _hits(states: Sequence[T], hit: Callable[[T], bool], memo: dict[int, bool]) -> list[bool]:
    """``hit`` of each state, taken once per state object (``memo``, by id): chains revisit their states, and a
    chain that stays put repeats its state."""
    out: list[bool] = []
    last, v = None, False
    for x in states:
        if x is not last:
            if id(x) not in memo:
                memo[id(x)] = bool(hit(x))
            v, last = memo[id(x)], x
        out.append(v)
    return out
