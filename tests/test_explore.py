"""Faithful readings (inversionview.explore): the task moves keep the input distribution, the chains estimate
shares over the preimage (not over the decoder's proposals), intervals and counterfactual checks."""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from itertools import product

import pytest
import torch

from inversionview.estimate import Chains, coverage, credit, poisson_low, share, wilson
from inversionview.explore import can_explore, walk
from inversionview.features import builtin_features
from inversionview.verify import verify
from inversionview.tasks import get_task


def chi2(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square statistic of two histograms over the same number of draws, bins with < 10 merged."""
    keys = sorted(set(a) | set(b), key=str)
    stat, df, ra, rb = 0.0, -1, 0, 0
    for k in keys + [None]:
        if k is not None:
            ra, rb = ra + a[k], rb + b[k]
        if (ra + rb >= 20 and k is not None) or (k is None and ra + rb):
            stat += (ra - rb) ** 2 / (ra + rb)
            df, ra, rb = df + 1, 0, 0
    return stat, df


def _stationary(task, stats, n=20_000, steps=4, seed=0, kernel=None):
    """Draw x from the generator, apply ``steps`` moves (``kernel(task, x, rng)``, by default the task's local move),
    and compare each statistic's histogram before and after: a kernel that keeps the generator's distribution leaves
    them equal up to sampling noise."""
    rng = random.Random(seed)
    kernel = kernel or (lambda t, x, r: t.propose(x, r))
    xs = [task.generate(rng) for _ in range(n)]
    ys = xs
    for _ in range(steps):
        ys = [kernel(task, y, rng) for y in ys]
    ref = [task.generate(rng) for _ in range(n)]  # an independent prior sample: the same test against itself
    out = {}
    for name, g in stats.items():
        s, df = chi2(Counter(map(g, ref)), Counter(map(g, ys)))
        out[name] = s / max(1, df)
    return out


def _runs(t):  # adjacent equal letters: sensitive to how a move places letters
    head = t.partition("|")[0]
    return sum(a == b for a, b in zip(head, head[1:]))


COUNTING_STATS = {
    "length": lambda t: len(t.partition("|")[0]),
    "count": lambda t: int(t.rpartition(":")[2]),
    "runs": _runs,
    "target": lambda t: t.partition("|")[2][0],
    "first": lambda t: t[0],
    "target first at": lambda t: t.index(t.partition("|")[2][0]),
}
ADDITION_STATS = {
    "F1": lambda t: t[0],
    "S2": lambda t: t[5],
    "F3": lambda t: t[2],
    "a // 50": lambda t: int(t[:3]) // 50,
    "b // 50": lambda t: int(t[4:7]) // 50,
    "sum // 100": lambda t: len(t) * 100 + int(t[8:]) // 100,
}


@pytest.mark.parametrize("name,stats", [("counting", COUNTING_STATS), ("addition", ADDITION_STATS)])
def test_moves_keep_the_generators_distribution(name, stats):
    # chi-square per degree of freedom near 1 for a stationary kernel; a kernel that drifts (an insert-at-a-slot
    # count move, a one-sided transfer) gives tens to hundreds on these statistics
    task = get_task(name)
    for stat, v in _stationary(task, stats).items():
        assert v < 2.0, (stat, v)


def _gibbs(task, x, rng):  # the chains' block move with every alternative inside: uniform over the block
    return rng.choice(task.block(x, rng))


@pytest.mark.parametrize("name,stats", [("counting", COUNTING_STATS), ("addition", ADDITION_STATS)])
def test_gibbs_blocks_keep_the_generators_distribution(name, stats):
    # as above (a lopsided block gives tens: see below); 3.0 leaves room for a 1-in-500 statistic among the twelve
    task = get_task(name)
    for stat, v in _stationary(task, stats, kernel=_gibbs).items():
        assert v < 3.0, (stat, v)


def test_gibbs_blocks_are_closed_and_a_lopsided_block_is_caught():
    # a block drawn from any of its members is the same block (so the uniform choice is reversible)
    for name in ("counting", "addition"):
        task = get_task(name)
        rng = random.Random(2)
        for _ in range(200):
            x = task.generate(rng)
            b = task.block(x, rng)
            assert x in b and all(task.parse(y) is not None for y in b)
            y = rng.choice(b)
            assert any(set(task.block(y, random.Random(k))) == set(b) for k in range(200)), (x, y)
    # a wrong block: a letter may only be renamed to a later letter of the alphabet (not closed: drifts to 'z')
    task = get_task("counting")

    class Lopsided(type(task)):
        def block(self, text, rng):
            head, target = self.parse(text)
            old = rng.choice(sorted(set(head)))
            names = [c for c in "abcdefghijklmnopqrstuvwxyz" if c == old or (c > old and c not in head)]
            return [f"{head.replace(old, c)}|{c if target == old else target}:{head.count(target)}" for c in names]

    assert max(_stationary(Lopsided(), COUNTING_STATS, kernel=_gibbs).values()) > 10
    assert get_task("ioi").block("x", random.Random(0)) is None


def test_a_drifting_move_is_caught():
    # the same check on a deliberately wrong kernel: re-draw a count but append the letters at the end
    task = get_task("counting")

    class Wrong(type(task)):
        def propose(self, text, rng):
            head, target = self.parse(text)
            c = rng.choice(sorted(set(head)))
            head = "".join(x for x in head if x != c) + c * rng.randint(1, 9)
            return f"{head}|{target}:{head.count(target)}"

    assert max(_stationary(Wrong(), COUNTING_STATS).values()) > 10


def test_counts_mix_where_a_preimage_fixes_the_length():
    # a chain restricted to one length (accept iff the length is kept, as in a preimage that keeps positions)
    # started at one input must reach the generator's conditional over count triples; without the recolour move
    # the triple (sorted counts) never changes, and a recolour that only feeds the target drifts
    from itertools import product

    task = get_task("counting")
    triples = [c for c in product(range(1, 10), repeat=3) if sum(c) == 20]
    # exact P(target's count, sorted triple | length 20): counts are uniform and independent, the target uniform
    exact = Counter((c[k], tuple(sorted(c))) for c in triples for k in range(3))

    def run(move, n=2000, steps=120):
        rng = random.Random(3)
        out = Counter()
        for _ in range(n):
            x = "aaaaaaaaabbbbbbbbbcc|a:9"
            for _ in range(steps):
                y = move(x, rng)
                x = y if len(y.partition("|")[0]) == 20 else x
            head, target = task.parse(x)
            out[head.count(target), tuple(sorted(Counter(head).values()))] += 1
        return out

    def stat(got):
        ref = Counter({k: round(v * sum(got.values()) / (3 * len(triples))) for k, v in exact.items()})
        s, df = chi2(ref, got)
        return s / max(1, df)

    assert stat(run(task.propose)) < 2.5

    def toward_target(text, rng):  # recolour only into the target letter: a one-sided drift
        head, target = task.parse(text)
        old = rng.choice(sorted(c for c in set(head) if c != target))
        if rng.random() < 0.5 and head.count(old) > 1 and head.count(target) < 9:
            i = rng.choice([i for i, c in enumerate(head) if c == old])
            head = f"{head[:i]}{target}{head[i + 1 :]}"
            return f"{head}|{target}:{head.count(target)}"
        return task.propose(text, rng)

    assert stat(run(toward_target)) > 10, stat(run(toward_target))


def test_carry_patterns_mix_where_a_preimage_keeps_the_sums_leading_digit():
    # the preimage of x0.mid at the sum's first digit of 516+187=703 holds the sums 700-709 and 790-799 (two carry
    # patterns): chains restricted to those sums, moving as a reading's chains do (local moves, Gibbs blocks, fresh
    # draws), must reach the exact share of 79x from 703 alone. Single-digit moves cross between the two only
    # through other sums; a re-draw that only goes up (below) drifts
    from inversionview.explore import _proposal

    task = get_task("addition")
    keep = lambda t: t is not None and (int(t[:3]) + int(t[4:7])) // 10 in (70, 79)  # noqa: E731
    exact = _exact(task, lambda t: int(t[8:]) // 10 == 79, True, keep)

    def run(kernel, n=600, steps=300):
        rng, hits = random.Random(4), 0
        for _ in range(n):
            x = "516+187=703"
            for _ in range(steps):
                ok = [y for y in kernel(task, x, rng) if keep(y)]
                x = rng.choice(ok) if ok else x
            hits += int(x[8:]) // 10 == 79
        return hits / n

    assert abs(run(_proposal) - exact) < 0.05, exact

    def upward(task, text, rng):  # re-draw the second operand above its value only: not symmetric
        a, b = task.parse(text)
        if rng.random() < 0.3:
            b = rng.randint(b, min(999, (a + b) // 100 * 100 + 99 - a))
            return [f"{a}+{b}={a + b}"]
        return _proposal(task, text, rng)

    assert abs(run(upward) - exact) > 0.1


def test_moves_produce_valid_inputs_and_refuse_others():
    for name in ("counting", "addition"):
        task = get_task(name)
        rng = random.Random(1)
        x = task.generate(rng)
        for _ in range(2000):
            x = task.propose(x, rng)
            assert task.parse(x) is not None, x
    assert get_task("counting").propose("abc|a:2", random.Random(0)) is None  # the count is wrong
    assert get_task("counting").propose("aab|a:2", random.Random(0)) is None  # two letters, not three
    assert get_task("addition").propose("123+456=578", random.Random(0)) is None  # the sum is wrong
    assert get_task("addition").propose("023+456=479", random.Random(0)) is None  # a leading zero
    assert can_explore(get_task("counting")) and not can_explore(get_task("ioi")) and not can_explore(None)


def test_addition_relatives_are_the_column_swaps():
    task = get_task("addition")
    assert task.relatives("294+381=675") == [
        "394+281=675",
        "284+391=675",
        "384+291=675",
        "291+384=675",
        "391+284=675",
        "281+394=675",
        "381+294=675",
    ]
    assert task.relatives("505+901=1406") == ["905+501=1406", "501+905=1406", "901+505=1406"]  # tens hold 0 and 0
    assert task.relatives("222+222=444") == [] and task.relatives("22+3=25") == []
    rng = random.Random(0)
    for _ in range(200):  # an orbit: the relatives of a relative are the same inputs, all with the same sum
        x = task.generate(rng)
        orbit = {x, *task.relatives(x)}
        assert all({y, *task.relatives(y)} == orbit for y in orbit)
        assert len({y.partition("=")[2] for y in orbit}) == 1
    assert get_task("counting").relatives("aab|a:2") == []


def test_addition_kin_keeps_the_sums_digits_but_the_last():
    task = get_task("addition")
    kin = task.kin("156+247=403")
    # by hand: a sum s has s - 199 pairs with a, b in 100..999 up to s = 1099 (a from 100 to s - 100), so the sums
    # 400..409 have 201 + ... + 210 = 2,055; from 1,099 on, 1999 - s + 1 (a from s - 999 to 999): 1,990..1,999 have
    # 9 + ... + 0 = 45; 1,000..1,009 have 801 + ... + 810 = 8,055
    assert len(kin) == len(set(kin)) == 2055 and all(task.parse(y) for y in kin)
    assert {y.partition("=")[2][:-1] for y in kin} == {"40"} and {"156+247=403", "264+136=400"} <= set(kin)
    assert len(task.kin("999+995=1994")) == 45 and len(task.kin("500+505=1005")) == 8055
    assert task.kin("264+136=400") == kin and task.kin("22+3=25") == [] and get_task("counting").kin("ab|a:1") == []


def test_addition_neighbours_are_one_part_away_and_symmetric():
    task = get_task("addition")
    x = "156+247=403"
    near = task.neighbours(x)
    assert x not in near and len(near) == len(set(near)) and all(task.parse(y) for y in near)
    # by hand, 78: each hundreds digit under its 8 other values 1-9 (16), each other digit under its 9 other values
    # (36); the column pairs with the same sum, less the input itself: hundreds 3 (2+1: 1), tens 9 (0+9 .. 9+0: 9),
    # units 13 (4+9 .. 9+4: 5); the values of b that keep the sum's 40x (244..253) and of a (153..162) that no
    # digit change gives (4 and 3); the relatives that swap two or three columns (4; one swap is a column pair)
    assert len(near) == 78
    assert {"256+247=503", "156+248=404", "166+237=403", "156+253=409", "162+247=409", "247+156=403"} <= set(near)
    assert "264+136=400" not in near  # two parts away
    rng = random.Random(0)
    for _ in range(100):  # y is x's neighbour iff x is y's: a closure reaches the same inputs from every member
        x = task.generate(rng)
        y = rng.choice(task.neighbours(x))
        assert x in task.neighbours(y)
    assert get_task("counting").neighbours("aab|a:2") == []


def test_wilson_interval_matches_hand_values():
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 0.96^2/40000... ) / (1 + 3.8416/100)
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson(1.0, 32)
    assert hi == 1.0 and lo == pytest.approx(0.8928, abs=1e-4)


def test_interval_ends_at_small_counts_are_poisson_limits():
    # Brown, Cai and DasGupta's modified Wilson interval: the end next to a count of at most 3 is the Poisson 97.5 %
    # lower limit of that count over n. By hand: count 1: -ln(0.975) = 0.025318; count 2: chi-square(4 df)'s 2.5 %
    # quantile / 2 = 0.48442 / 2; count 3: chi-square(6 df)'s / 2 = 1.23734 / 2 (tables)
    assert poisson_low(1) == pytest.approx(0.025318, abs=1e-6)
    assert poisson_low(2) == pytest.approx(0.48442 / 2, abs=1e-5)
    assert poisson_low(3) == pytest.approx(1.23734 / 2, abs=1e-5)
    lo, hi = wilson(1 / 64, 64)  # one member in 64 has the value: Wilson's own low end, 0.0028, is replaced
    assert lo == pytest.approx(0.025318 / 64, rel=1e-4) and hi == pytest.approx(0.0833, abs=1e-4)
    lo, hi = wilson(63 / 64, 64)  # and mirrored: one member in 64 has not
    assert hi == pytest.approx(1 - 0.025318 / 64, rel=1e-6) and lo == pytest.approx(1 - 0.0833, abs=1e-4)
    lo, _ = wilson(2 / 50, 50)
    assert lo == pytest.approx(0.48442 / 2 / 50, rel=1e-4)
    # a count above 3 keeps Wilson's end (p = 4/64: 0.0245), and so does the larger side of a small n (p = 0.5, n = 4)
    assert wilson(4 / 64, 64)[0] == pytest.approx(0.0245, abs=1e-4)
    assert wilson(0.5, 4) == pytest.approx((0.1500, 0.8500), abs=1e-4)


def test_share_pools_states_and_widens_with_disagreement():
    agree = share([[1, 1, 1, 1]] * 8 + [[0, 0, 0, 0]] * 8, bool)
    assert agree.share == 0.5
    mixed = share([[1, 0, 1, 0]] * 16, bool)
    assert mixed.share == 0.5 and mixed.high - mixed.low < agree.high - agree.low
    # states are pooled: a relaxed chain that kept more states inside weighs more (a ratio estimator). By hand:
    # p = 1/4; residuals h - p m = 0.75, -0.75; var = 2/1 * 1.125 / 16; n = 0.1875 / var * (1.96 / 12.706)^2, clamped
    # to the groups' effective number (Kish): (1 + 3)^2 / (1^2 + 3^2) = 1.6, not 2 (the group of 3 weighs 3/4)
    s = share([[1], [0, 0, 0]], bool)
    assert s.share == 0.25 and s.n == pytest.approx(1.6)
    s = share([[1, 1, 0, 0]] * 3 + [[1, 0]] * 3 + [[0] * 6] * 2, bool)  # 9 hits in 30 states; var by hand
    var = 8 / 7 * (3 * (2 - 4 * 0.3) ** 2 + 3 * (1 - 2 * 0.3) ** 2 + 2 * (6 * 0.3) ** 2) / 30**2
    assert s.share == pytest.approx(0.3) and s.n == pytest.approx(0.3 * 0.7 / var * (1.96 / 2.365) ** 2)  # t, 7 df
    # two groups at 0.50 and 0.52 agree closely (the t interval with 1 degree of freedom would be 0.51 +- 0.127),
    # but each crossed between the sides once: a group counts for 1 + its crossings, n = 2 + 2, Wilson's at 4
    two = share([[1] * 50 + [0] * 50, [1] * 52 + [0] * 48], bool)
    assert two.n == 4 and (two.low, two.high) == pytest.approx(wilson(0.51, 4))
    assert two.high - two.low > 2 * 12.706 * 0.01
    # groups that cross often count up to 4 each: n = 8
    often = share([[1, 0] * 25, [1, 0] * 26], bool)
    assert often.n == 8 and (often.low, often.high) == pytest.approx(wilson(0.5, 8))


def test_generator_draws_inside_join_a_share_by_their_number():
    # by hand: 4 one-state groups, 3 hits: p = 0.75, n = 4 (the t interval's n, 1.1, is clamped to the 4 groups);
    # 16 independent draws inside, 6 hits, join with weight 16 against the states' 4: p = (6 + 4 * 0.75) / 20
    states = [["a1"], ["a2"], ["a3"], ["b1"]]
    hit = lambda x: x.startswith("a")  # noqa: E731
    alone = share(states, hit)
    assert (alone.share, alone.n) == (0.75, 4)
    both = share(Chains(states, draws=["a"] * 6 + ["b"] * 10), hit)
    assert both.share == pytest.approx(0.45) and both.n == 20
    assert (both.low, both.high) == pytest.approx(wilson(0.45, 20))
    # draws alone (no state inside): their share; neither: none
    only = share(Chains([], draws=["a"] * 3 + ["b"]), hit)
    assert only.share == 0.75 and only.n == 4 and share(Chains([]), hit) is None


def test_share_rests_on_crossings_not_on_agreement():
    # a counting reading's 5 exact starts all had target "k" where 36 % of the preimage has it: chains that never
    # leave one side are 5 independent members, not 20. Four groups never cross, one crosses twice: n = 4 + 3 = 7.
    # By hand: p = 39/40; the variance between groups alone would give n = 0.975 * 0.025 / var * (1.96 / 2.776)^2
    # = 19.4 (4 degrees of freedom), which called the share sure (low end 0.79)
    states = [[1] * 8] * 4 + [[1] * 6 + [0, 1]]
    var = 5 / 4 * (4 * (8 - 0.975 * 8) ** 2 + (7 - 0.975 * 8) ** 2) / 40**2
    assert 0.975 * 0.025 / var * (1.96 / 2.776) ** 2 == pytest.approx(19.44, abs=0.01)
    s = share(states, bool)
    assert s.share == pytest.approx(0.975) and s.n == 7
    assert (s.low, s.high) == pytest.approx(wilson(0.975, 7)) and s.low < 0.75
    assert wilson(0.975, 19.44)[0] > 0.75


def test_unanimous_share_rests_on_its_groups():
    # every state agrees: no between-chain variance to measure and no crossing, so the effective size is the number
    # of groups, however many distinct states they met: Wilson's low end for p = 1 is n / (n + 1.96^2)
    yes = lambda x: True  # noqa: E731
    assert share([["a", "b"], ["c", "d"]], yes).low == pytest.approx(2 / (2 + 1.96**2))
    assert share([["a", "a"], ["a", "a"]], yes).low == pytest.approx(2 / (2 + 1.96**2))  # one member, two chains
    assert share([["a"], ["b"]], yes, distinct=50).low == pytest.approx(2 / (2 + 1.96**2))
    assert share([list("abcdefgh")] * 2, lambda x: False).high == pytest.approx(1.96**2 / (2 + 1.96**2))
    # one start that never left its side is one member, however far it walked
    assert share([list("abcdefgh")], yes).low == pytest.approx(1 / (1 + 1.96**2))
    # 16 agreeing starts are a sure claim (low end 0.81), 8 are not (0.68)
    assert share([["a"]] * 16, yes).low > 0.75 > share([["a"]] * 8, yes).low
    # one group that crossed 3 times: 1 + 3 members, bounded by its 3 distinct states
    one = share([["a", "b", "a", "b", "c"]], lambda x: x == "a")
    assert one.share == 0.4 and one.n == 3


def test_coverage_matches_hand_values():
    # Good-Turing: 2 members found once among 1 + 1 + 2 + 3 = 7 finds: 1 - 2/7
    assert coverage([1, 1, 2, 3]) == pytest.approx(5 / 7)
    assert coverage([4, 4]) == 1.0 and coverage([1, 1, 1]) == 0.0 and coverage([]) == 0.0


def test_members_met_weigh_in_by_the_chains_coverage():
    # coverage counts from SATURATED = 0.5: credit(0.8) = 0.6, credit(0.5) = 0, credit(1) = 1
    assert (credit(0.8), credit(0.5), credit(0.3), credit(1.0)) == pytest.approx((0.6, 0.0, 0.0, 1.0))
    # states: 2 of 6 hit (p = 1/3). Members met: a (weight 1), b (1), c (2): weighted share of a = 1/4. Coverage 0.8:
    # 0.6 * 1/4 + 0.4 * 1/3 = 17/60. The interval is the states', widened to take the estimate in
    states = [["a", "a", "b"], ["b", "b", "b"]]
    hit = lambda x: x == "a"  # noqa: E731
    alone = share(states, hit)
    both = share(Chains(states, [("a", 1.0), ("b", 1.0), ("c", 2.0)], 0.8), hit)
    assert alone.share == pytest.approx(1 / 3) and both.share == pytest.approx(17 / 60)
    assert (both.low, both.high, both.n) == (alone.low, alone.high, alone.n)
    # the weights count: unweighted, the members' share would be 1/3 and the estimate 1/3
    assert share(Chains(states, [("a", 1.0), ("b", 1.0), ("c", 1.0)], 0.8), hit).share == pytest.approx(1 / 3)
    # full coverage is the members' share alone; half or less is the states' alone; an estimate outside the states'
    # interval widens it
    assert share(Chains(states, [("a", 1.0), ("b", 3.0)], 1.0), hit).share == pytest.approx(1 / 4)
    assert share(Chains(states, [("a", 1.0), ("b", 3.0)], 0.5), hit).share == pytest.approx(1 / 3)
    wide = share(Chains([["b"] * 4] * 3, [("a", 9.0), ("b", 1.0)], 1.0), hit)
    assert wide.share == pytest.approx(0.9) and wide.high == pytest.approx(0.9) and wide.low == 0.0


def test_counting_weight_is_the_generators_probability_ratio():
    # n1! n2! n3! / n!: "aabc" has 2! 1! 1! / 4! = 1/12. The recolour move's documented ratio p(y)/p(x) = (n1 + 1)/n2
    # (one of n2 places of a letter recoloured as another letter present n1 times) must hold for the weights
    task = get_task("counting")
    assert task.weight("aabc|a:2") == pytest.approx(1 / 12) and task.weight("abcabc|b:2") == pytest.approx(8 / 720)
    x, y = "aaabbc|a:3", "aaabcc|a:3"  # one b recoloured as c: n1 = 1 (c), n2 = 2 (b)
    assert task.weight(y) / task.weight(x) == pytest.approx((1 + 1) / 2)
    x, y = "aaaabc|c:1", "aaabbc|c:1"  # one a recoloured as b: n1 = 1, n2 = 4
    assert task.weight(y) / task.weight(x) == pytest.approx(2 / 4)
    assert get_task("addition").weight("123+456=579") == 1.0  # uniform operands


@pytest.fixture(scope="module")
def addition():
    from inversionview.run import InversionView

    return InversionView.load("shipped:addition")


def _exact(task, f, vq, keep=lambda t: True):
    xs = [t for t in task.all_inputs() if keep(t)]
    return sum(f(t) == vq for t in xs) / len(xs)


def test_chains_from_look_alikes_estimate_the_true_share(addition):
    # x0.pre at '=' (index 8) is the embedding of '=' at index 8: every addition input is in its preimage, so the true
    # share of the query's hundreds digit is exactly 1/9 and of its tens digit 1/10. The chains start from the query
    # alone (the most biased proposal possible: a raw share over the starts would say 1.0) and must estimate the
    # preimage's shares.
    iv, task = addition, addition.task
    query = "456+378=834"
    s = iv.probed.site("x0.pre")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(query)]), [s])[s][0, 8].float()
    w = walk(iv.probed, task, s, zq[None], [[query]], 0.1, "euclidean", chains=32, steps=48, seed=0)[0]
    feats = builtin_features(task)
    for k, truth in (
        ("F1", 1 / 9),
        ("F2", 1 / 10),
        ("S3", 1 / 10),
        ("carry_ones", _exact(task, feats["carry_ones"], True)),
    ):
        vq = feats[k](query)
        est = share(w.states, lambda x: feats[k](x) == vq)
        assert est.low <= truth <= est.high and abs(est.share - truth) < 0.08, (k, est, truth)
    assert w.acceptance > 0.5 and len(w.members) > 300
    # 810,000 members: nearly every member the proposals find is new, so the members met stand for little
    assert w.states.coverage < 0.3 and len(w.states.members) == len(w.members)


def test_a_small_preimage_is_closed_by_the_neighbours_of_its_members(addition, monkeypatch):
    # head a0.2 at A2 of 984+569=1553 (index 9): an exact scan of all 810,000 inputs finds 322 members, 192 of them
    # with the query's third answer digit (C3 share 0.596). They fall into pieces of column swaps no move connects.
    # With 8,192 generator draws and no closure the chains saturated their pieces and met 186 members, C3 0.93;
    # the closure verifies the neighbours of every member met until no new member turns up, and meets them all
    from inversionview import explore

    q, truth = "984+569=1553", 192 / 322
    pre = addition.query(q, site="a0.2", position=9)
    members = set(pre.chains["members"])
    assert pre.chains["coverage"] == 1.0 and len(members) == 322
    got = {x["feature"]: x for x in pre.shares}["C3"]
    assert abs(got["share"] - truth) < 0.01
    # closed: every neighbour of a member is a member, or the probed model puts it outside epsilon
    probed, s = addition.probed, addition.probed.site("a0.2")
    zq = probed.run(torch.tensor([probed.encode(q)]), [s])[s][0, 9].float()
    others = sorted({y for x in members for y in addition.task.neighbours(x)} - members)
    dmin, _, _ = verify(probed, s, [probed.encode(y) for y in others], zq, "euclidean")
    assert len(others) > 1000 and (dmin > pre.epsilon).all()
    # fewer draws alone still close it; without the closure (CLOSE_AT = 0) fewer members, the share off by over 0.3
    monkeypatch.setattr(addition.task, "draws", 8192)
    assert len(addition.query(q, site="a0.2", position=9).chains["members"]) == 322
    monkeypatch.setattr(explore, "CLOSE_AT", 0)
    pre = addition.query(q, site="a0.2", position=9)
    assert len(pre.chains["members"]) < 200 and pre.chains["coverage"] < 1
    assert abs({x["feature"]: x for x in pre.shares}["C3"]["share"] - truth) > 0.3


def test_a_closure_reaches_pieces_through_the_neighbours_of_near_misses(addition):
    # head a0.2 at `=` of 731+156=887 (index 8): an exact scan of all 810,000 inputs finds 69 members in 6 pieces
    # that no move connects; the query's piece holds 16, another the 12 below (swaps of 1/7, 5/7, 6/6, 2/6 digit
    # pairs). 766+162=928 is 0.104 from the query, a near miss one part away from four of them. Closed from the
    # query alone, the closure meets its own piece only; with the near miss verified too, that piece as well
    from inversionview.explore import _check, _close

    q = "731+156=887"
    piece = {"152+776=928", "156+772=928", "162+766=928", "166+762=928", "172+756=928", "176+752=928",
             "752+166=918", "752+176=928", "756+172=928", "762+156=918", "772+156=928", "776+152=928"}  # fmt: skip
    probed, s = addition.probed, addition.probed.site("a0.2")
    zq = probed.run(torch.tensor([probed.encode(q)]), [s])[s][:, 8].float()
    met = []
    for known in ([q], [q, "766+162=928"]):
        seen: list[dict] = [{}]
        _check(probed, s, zq, seen, [(0, x) for x in known], "euclidean")
        assert 0.1 < seen[0].get("766+162=928", (0.15,))[0] <= 0.2  # a near miss, inside the relaxed level
        assert _close(probed, addition.task, s, zq, seen, 0.1, "euclidean") == [True]
        met.append({x for x, (d, _) in seen[0].items() if d <= 0.1})
    assert len(met[0]) == 16 and not met[0] & piece
    assert met[1] == met[0] | piece


def test_a_closure_verifies_the_kin_of_few_members(addition, monkeypatch):
    # head a1.0 at A1 of 156+247=403 (index 9): an exact scan of all 810,000 inputs finds three members, the query,
    # 157+246=403 (0.030) and 264+136=400 (0.084), five digits from the query; no path of one-part moves through
    # inputs within 0.3 of the query reaches it, and the decoder proposed it in none of 24,576 samples. It keeps
    # the sum's digits but the last: kin of the query (Task.kin). Without the kin, a closure meets two members
    from inversionview import explore
    from inversionview.explore import _check, _close

    q, members = "156+247=403", {"156+247=403", "157+246=403", "264+136=400"}
    probed, s = addition.probed, addition.probed.site("a1.0")
    zq = probed.run(torch.tensor([probed.encode(q)]), [s])[s][:, 9].float()
    met = []
    for kin_at in (0, explore.KIN_AT):
        monkeypatch.setattr(explore, "KIN_AT", kin_at)
        seen: list[dict] = [{}]
        _check(probed, s, zq, seen, [(0, q)], "euclidean")
        assert _close(probed, addition.task, s, zq, seen, 0.1, "euclidean") == [True]
        met.append({x for x, (d, _) in seen[0].items() if d <= 0.1})
    assert met == [members - {"264+136=400"}, members]
    # the reading closes the preimage: its shares are the true ones, and so are the shares its summary shows for
    # what varies (the chains' states, all at the first two members, would say F1 = 1 in 100 %)
    pre = addition.query(q, site="a1.0", position=9)
    assert set(pre.chains["members"]) == members and pre.chains["coverage"] == 1.0
    shares = {x["feature"]: x["share"] for x in pre.shares}
    assert shares["F1"] == pytest.approx(2 / 3) and shares["S2"] == pytest.approx(2 / 3)
    assert "varies: F1 (1 67%, 2 33%)" in pre.summary and "too few members (3 distinct) to say" in pre.summary[1]


def test_relaxed_chains_keep_only_their_states_inside_epsilon(addition, monkeypatch):
    # head a0.0 at the query's third digit (index 3): inputs with another third digit are 0.11-0.21 away, outside
    # epsilon 0.1 but inside the relaxed 0.2. With 256 generator draws (about 25 inside, fewer than the half of
    # the chains asked for here; about 75 inside 0.2) the chains walk the relaxed preimage; a share over every
    # state they visit would put other third digits in; over the states kept, none
    from inversionview import explore

    iv, task = addition, addition.task
    monkeypatch.setattr(task, "draws", 256)
    monkeypatch.setattr(explore, "STARTS", 0.5)
    query = "456+378=834"
    s = iv.probed.site("a0.0")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(query)]), [s])[s][0, 3].float()
    w = walk(iv.probed, task, s, zq[None], [[query]], 0.1, "euclidean", chains=64, steps=32, seed=0)[0]
    kept = [x for st in w.states for x in st]
    assert w.level == pytest.approx(0.2) and len(kept) > 300
    assert all(x in w.members and w.members[x][0] <= 0.1 for x in kept)
    assert share(w.states, lambda x: x[2] == "6").share == 1.0
    # with every draw it needs the same query walks the exact preimage
    monkeypatch.setattr(task, "draws", 2048)
    assert walk(iv.probed, task, s, zq[None], [[query]], 0.1, "euclidean", chains=64, steps=4, seed=0)[0].level == 0.1


def test_reading_with_a_biased_decoder_reports_preimage_shares():
    # A deliberately biased decoder: it proposes only look-alikes of the query (hundreds digits 4 and 3, as in
    # 456+378). At x0.pre on '=' every addition input is inside, so the raw share of F1 = 4 among its proposals is
    # 1.0 while the preimage's is exactly 1/9. The reading's shares must be the preimage's.
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:addition")
    rng = random.Random(0)

    def look_alikes(z, site, bos, eos, tau, max_len, g):
        texts = [f"4{rng.randint(0, 99):02d}+3{rng.randint(0, 99):02d}" for _ in range(len(z))]
        return [iv.probed.encode(f"{t}={int(t[:3]) + int(t[4:])}") for t in texts]

    iv.decoder.generate = look_alikes
    pre = iv.query("456+378=834", site="x0.pre", position=8, samples=64)
    f1 = builtin_features("addition")["F1"]
    decoder_inside = [x for x in pre.samples if x.source == "decoder" and x.distance <= pre.epsilon]
    assert len(decoder_inside) > 50 and all(f1(x.text) == 4 for x in decoder_inside)  # the bias is real
    got = {x["feature"]: x for x in pre.shares}
    assert got["F1"]["estimate"] and abs(got["F1"]["share"] - 1 / 9) < 0.06 and got["F1"]["low"] <= 1 / 9
    assert abs(got["S1"]["share"] - 1 / 9) < 0.06 and abs(got["F1S1"]["share"] - 2 / 81) < 0.04
    assert not any(line.startswith("shared by") and (": F1 = " in line or ": S1 = " in line) for line in pre.summary)
    assert any(line.startswith("varies: F1 (") for line in pre.summary)
    # sum_len = 3 (a + b < 1000) holds in 0.40 of all inputs: it must not be called shared, nor checked
    assert abs(got["sum_len"]["share"] - 0.3956) < 0.1 and all(c["feature"] != "sum_len" for c in pre.checks)
    # the same reading from the decoder's samples alone reports the biased share, and says what it describes
    raw = iv.query("456+378=834", site="x0.pre", position=8, samples=64, chains=0)
    assert {x["feature"]: x for x in raw.shares}["F1"]["share"] == 1.0 and "decoder's proposals" in raw.summary[0]


def test_checks_show_what_the_activation_keeps(addition):
    # head 0.0 at '=' attends to the hundreds digits: the pair {F1, S1} is shared and changing it leaves the preimage
    pre = addition.query("456+378=834", site="a0.0", position="=", samples=256)
    got = {x["feature"]: x for x in pre.shares}
    assert got["F1S1"]["share"] > 0.9 and got["F1S1"]["low"] >= 0.75
    check = [c for c in pre.checks if c["feature"] == "F1S1"][0]
    assert len(check["distances"]) >= 20 and sum(d <= pre.epsilon for d in check["distances"]) <= 0.1 * len(
        check["distances"]
    )
    line = [x for x in pre.summary if x.startswith("check: F1S1 changed in")][0]
    assert line.endswith("stay inside epsilon (0%)") or "stay inside epsilon" in line
    # the ones digits vary inside the preimage: F3 is not shared
    assert got["F3"]["share"] < 0.5


def test_chains_from_one_start_count_as_one(addition):
    # with no generator draws, 8 chains all begin at the query: their states form one group, so a share's interval
    # rests on one start (counting them as 8 independent chains would narrow it eightfold in effective size)
    iv, task = addition, addition.task
    query = "456+378=834"
    s = iv.probed.site("x0.pre")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(query)]), [s])[s][0, 8].float()
    w = walk(iv.probed, task, s, zq[None], [[query]], 0.1, "euclidean", chains=8, steps=10, draws=0, seed=0)[0]
    assert len(w.states) == 1 and len(w.states[0]) == 8 * 5
    # one start gives no spread between chains to measure: the share rests on at most 4 members, agreeing or not
    for hit in (lambda x: x[0] == "4", lambda x: True):
        est = share(w.states, hit)
        assert est.n <= 4 and est.high - est.low > 0.3, est


def test_readings_reuse_the_draws_of_earlier_readings_and_read_the_same(addition, monkeypatch):
    # the draws are the first use of a reading's seeded generator: a second reading at the same site with the same
    # seed finds their activations cached and must read exactly what it reads from scratch
    from inversionview import explore

    s = addition.probed.site("a0.3")

    def read(q):
        zq = addition.probed.run(torch.tensor([addition.probed.encode(q)]), [s])[s][0, 8].float()
        w = walk(addition.probed, addition.task, s, zq[None], [[q]], 0.1, "euclidean", chains=16, steps=4, seed=3)[0]
        return w.states, w.members, w.level

    forwards = []
    real = explore._activations
    monkeypatch.setattr(
        explore, "_activations", lambda p, site, texts: forwards.append(len(texts)) or real(p, site, texts)
    )
    explore._DRAWN.entries.clear()
    first = read("456+378=834")
    assert forwards  # the draws ran through the probed model
    before = len(forwards)
    assert read("456+378=834") == first and len(forwards) == before  # all from the cache
    other = read("123+456=579")  # another query: the rounds it shares with the first come from the cache
    explore._DRAWN.entries.clear()
    assert read("123+456=579") == other  # from scratch: the same reading
    # another seed draws other inputs: nothing stale is reused
    zq = addition.probed.run(torch.tensor([addition.probed.encode("456+378=834")]), [s])[s][0, 8].float()
    n = len(forwards)
    walk(addition.probed, addition.task, s, zq[None], [["456+378=834"]], 0.1, "euclidean", chains=16, steps=4, seed=4)
    assert len(forwards) > n


def test_the_draws_cache_keeps_to_its_budget_and_reads_the_same(addition, monkeypatch):
    # a small preimage (head a0.2 at the tens digit of 456+378=834) draws in rounds of 256, 256, 512, ... up to
    # 16,384 inputs; with a budget that holds only the first rounds the reading is the same, the next reading runs
    # only the rounds not kept, and another site's reading drops the site read least recently to make room
    from inversionview import explore

    def read(site, pos, q="456+378=834"):
        s = addition.probed.site(site)
        zq = addition.probed.run(torch.tensor([addition.probed.encode(q)]), [s])[s][0, pos].float()
        w = walk(addition.probed, addition.task, s, zq[None], [[q]], 0.1, "euclidean", chains=16, steps=4, seed=3)[0]
        return w.states, w.members, w.level

    forwards: list[int] = []
    real = explore._activations
    monkeypatch.setattr(
        explore, "_activations", lambda p, site, texts: forwards.append(len(texts)) or real(p, site, texts)
    )
    explore._DRAWN.entries.clear()
    full = read("a0.2", 9)
    rounds = sorted(forwards)
    assert rounds[:3] == [256, 256, 512] and len(rounds) >= 6  # doubling rounds
    mb = explore._DRAWN.nbytes() / 2**20
    budget = mb * sum(rounds[:-2]) / sum(rounds)  # holds all but the last two rounds
    monkeypatch.setattr(explore, "CACHE_MB", budget * 1.01)
    explore._DRAWN.entries.clear()
    forwards.clear()
    assert read("a0.2", 9) == full and sorted(forwards) == rounds
    assert 0 < explore._DRAWN.nbytes() <= budget * 1.01 * 2**20
    forwards.clear()
    assert read("a0.2", 9) == full and sorted(forwards) == rounds[-2:]  # the rounds kept are not run again
    # another site whose one round does not fit beside: the least recent site goes
    explore._DRAWN.entries.clear()
    forwards.clear()
    read("a0.3", 8)
    assert forwards[:2] == [256, 256] and sum(forwards) <= explore.IID_DRAWS  # until IID draws inside
    size = explore._DRAWN.nbytes()
    monkeypatch.setattr(explore, "CACHE_MB", budget * 1.01)
    explore._DRAWN.entries.clear()
    read("a0.2", 9)
    monkeypatch.setattr(explore, "CACHE_MB", (explore._DRAWN.nbytes() + size / 2) / 2**20)
    read("a0.3", 8)
    assert [k[1] for k in explore._DRAWN.entries] == [addition.probed.site("a0.3").name]
    assert explore._DRAWN.nbytes() == size


def test_chains_started_at_the_decoders_members_count_as_one_start(addition):
    # no generator draw (draws=0): the chains start at the given members, look-alikes of the query, with burn-in;
    # however many distinct members they began at, they are one start for the interval: four effective members
    # at most, so no share of theirs is a sure claim
    s = addition.probed.site("a0.0")
    query = "456+378=834"
    zq = addition.probed.run(torch.tensor([addition.probed.encode(query)]), [s])[s][0, 8].float()
    looks = ["451+327=778", "427+390=817", "490+303=793", "403+355=758"]  # hundreds {4, 3}: inside
    w = walk(
        addition.probed, addition.task, s, zq[None], [looks + [query]], 0.1, "euclidean", chains=16, steps=8, draws=0
    )[0]
    assert not w.exact and len(w.states) == 1 and len(w.states[0]) == 16 * 4  # every chain's second half, one group
    sh = share(w.states, lambda x: x[0] == "4")
    assert sh.n <= 4
    # with draws the chains start at exact draws, and each distinct start is a group
    w = walk(addition.probed, addition.task, s, zq[None], [[query]], 0.1, "euclidean", chains=16, steps=2)[0]
    assert w.exact and len(w.states) > 1


def test_counting_strata_are_the_lengths_with_the_generators_probabilities():
    # three counts uniform on 1..9: lengths 3 and 27 have 1 triple of 729; 24 has 10 (9+9+6 in 3 orders, 9+8+7 in
    # 6, 8+8+8); 15 has 61 (a+b+c = 12 with each 0..8: C(14, 2) = 91, less 3 x C(5, 2) = 30 with one over 8); the
    # probabilities of all lengths sum to 1
    task = get_task("counting")
    assert task.stratum("abc|a:1") == (3, pytest.approx(1 / 729))
    assert task.stratum("oohkokkhkhhhokokohkkoook|k:9") == (24, pytest.approx(10 / 729))
    assert task.stratum(task.generate_in(15, random.Random(0)))[1] == pytest.approx(61 / 729)
    assert sum(task.stratum(task.generate_in(n, random.Random(n)))[1] for n in range(3, 28)) == pytest.approx(1.0)
    assert task.stratum("abc|a:2") is None  # not an input the generator can produce
    # a draw in a stratum is the generator's draw conditioned on its length: at length 6 the count triples are 114
    # (3 orders), 123 (6) and 222 (1), so the sorted counts are 1,1,4 / 1,2,3 / 2,2,2 in 3:6:1, and the target's
    # count follows; compared with the generator's own draws of length 6 (rejection)
    rng = random.Random(0)
    inside = [task.generate_in(6, rng) for _ in range(3000)]
    ref = []
    while len(ref) < 3000:
        x = task.generate(rng)
        ref += [x] * (len(x.partition("|")[0]) == 6)
    assert all(task.parse(x) and task.stratum(x)[0] == 6 for x in inside)

    def pattern(x):
        return tuple(sorted(Counter(x.partition("|")[0]).values()))

    assert abs(Counter(map(pattern, inside))[(1, 2, 3)] / 3000 - 0.6) < 0.04
    for stat in (pattern, lambda x: x[-1], lambda x: x[0]):
        s, df = chi2(Counter(map(stat, inside)), Counter(map(stat, ref)))
        assert s / max(1, df) < 4, (s, df)
    generator = Counter(len(task.generate(rng).partition("|")[0]) for _ in range(72_900))
    assert abs(generator[24] / 72_900 - 10 / 729) < 0.002 and abs(generator[15] / 72_900 - 61 / 729) < 0.005


def test_chains_start_in_each_stratum_by_its_mass_in_the_preimage():
    # 10 draws inside among 1,000 drawn apart at length 24 (probability 10/729) against 4 inside among 8,192 plain
    # draws of length 15 (in no stratum drawn apart: the rest, probability 1 - 10/729): the masses are
    # 10/729 x 10/1000 = 1.372e-4 and (719/729) x 4/8192 = 4.816e-4, so 22.17 % of the chains start at length 24
    # (over the draws alone: 10/14 = 71 %; without the probability: 95 %). The split is by quota, not drawn: of 64
    # chains exactly 14 (quota 14.19; a multinomial draw gives 14 one time in eight)
    from inversionview.explore import _allocate, _Near

    task = get_task("counting")
    rng = random.Random(0)
    rare, common = [task.generate_in(24, rng) for _ in range(10)], [task.generate_in(15, rng) for _ in range(4)]
    pool = rare + [task.generate_in(24, rng) for _ in range(990)]  # the stratum's other draws: outside
    plain = common + [task.generate_in(15, rng) for _ in range(8188)]
    near = _Near(rare + common, plain=8192, strata={24: (10 / 729, pool, 1000)})
    starts = _allocate(task, near, plain, rare + common, 20_000, random.Random(1), {})
    assert len(starts) == 20_000
    share = 10 / 729 * 10 / 1000 / (10 / 729 * 10 / 1000 + 719 / 729 * 4 / 8192)
    assert sum(task.stratum(x)[0] == 24 for x in starts) / 20_000 == pytest.approx(share, abs=0.001)
    for seed in range(5):
        picks = _allocate(task, near, plain, rare + common, 64, random.Random(seed), {})
        assert sum(task.stratum(x)[0] == 24 for x in picks) == 14
    # within a stratum the starts are distinct until they run out
    starts = _allocate(task, near, plain, rare + common, 64, random.Random(2), {})
    assert len(set(x for x in starts if x in rare)) == min(10, sum(x in rare for x in starts))


def test_a_finer_stratum_takes_its_mass_out_of_its_stratum():
    # a finer stratum (length 24, letters abc, target a: probability 10/729/7800) drawn apart inside the stratum of
    # length 24: 10 distinct inputs inside, each drawn twice among its 100 draws (20 draws inside: a small stratum's
    # draws repeat, and its cell counts them with multiplicity), and of the stratum's 1,000 draws 10 inside, none of
    # them of the finer stratum. Cells: the finer one, 10/729/7800 x 20/100 = 3.517e-7; length 24 less it, (10/729 - 10/729/7800) x
    # 10/1000 = 1.3715e-4; so 0.256 % of the chains start in the finer stratum. Counting the finer stratum's draws
    # in its stratum (no cell) would give it 20/1100 of length 24's mass instead: 18 % of the chains
    from inversionview.explore import _allocate, _Near

    task = get_task("counting")
    rng = random.Random(0)
    key = (24, "abc", "a")
    fine = [task.generate_in(key, rng) for _ in range(50)] * 2
    coarse = [x for x in (task.generate_in(24, rng) for _ in range(1100)) if task.refine(x)[0] != key][:1000]
    pick = fine[:10] + coarse[:10]
    near = _Near(pick, plain=0, strata={24: (10 / 729, coarse, 1000)}, fine={key: (10 / 729 / 7800, fine, 100)})
    starts = _allocate(task, near, [], pick, 100_000, random.Random(1), {})
    f = 10 / 729 / 7800 * 20 / 100
    assert sum(task.refine(x)[0] == key for x in starts) / 100_000 == pytest.approx(
        f / (f + (10 / 729 - 10 / 729 / 7800) * 10 / 1000), abs=2e-4
    )


@pytest.mark.slow
def test_a_rare_lengths_preimage_starts_its_chains_at_draws_of_that_length(monkeypatch):
    # x0.post at the target of a 24-letter input: the preimage holds inputs of length 24 alone (none among 200,000
    # generator draws of other lengths), which the generator draws 10 times in 729: 8,192 draws meet about 4
    # members, too few independent starts for the count, which each chain keeps (the count share varies 0-0.9
    # between starts). Drawn apart at length 24 the reading starts 16+ chains there and reads the count's share
    # within 0.1 of the truth, scanned here over 20,000 inputs of length 24 built independently of the task's code
    from inversionview import explore
    from inversionview.explore import _enough
    from inversionview.run import InversionView
    from inversionview.settings import CHAINS
    from inversionview.tasks.counting import Counting

    iv = InversionView.load("shipped:counting")
    q, position = "oohkokkhkhhhokokohkkoook|k:9", 27
    xs = _counting_inputs(random.Random(5), 24, 20_000)
    s = iv.probed.site("x0.post")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, position].float()
    dmin, _, _ = verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")
    members = [x for x, d in zip(xs, dmin.tolist()) if d <= 0.1]
    truth = sum(x.endswith(":9") for x in members) / len(members)
    assert len(members) > 500 and 0.3 < truth < 0.5

    def read():
        pre = iv.query(q, site="x0.post", position=position)
        return len(pre.chains["states"]), {x["feature"]: x["share"] for x in pre.shares}["count"]

    starts, count = read()
    assert starts >= _enough(CHAINS) and abs(count - truth) < 0.1, (starts, count, truth)
    monkeypatch.setattr(Counting, "stratum", lambda self, text: None)  # no strata: the plain draws alone
    monkeypatch.setattr(explore, "REFINE", 0)  # (nor finer ones, which would give the starts on their own)
    starts, _ = read()
    assert starts < _enough(CHAINS)


def _counting_inputs(rng: random.Random, length: int, n: int) -> list[str]:
    """``n`` counting inputs of ``length`` letters as the generator draws them (three distinct letters, counts
    uniform over the triples of 1..9 with that sum, shuffled, one of the letters asked), built here apart from the
    task's code."""
    triples = [c for c in product(range(1, 10), repeat=3) if sum(c) == length]
    xs = []
    for _ in range(n):
        letters, counts = rng.sample("abcdefghijklmnopqrstuvwxyz", 3), rng.choice(triples)
        head = [a for a, k in zip(letters, counts) for _ in range(k)]
        rng.shuffle(head)
        k = rng.randrange(3)
        xs.append(f"{''.join(head)}|{letters[k]}:{counts[k]}")
    return xs


@pytest.mark.slow
@pytest.mark.parametrize(
    "q, site, position, lengths",
    [
        # members of 4-7 letters; none of 7 letters (22 % of the mass) among the members a reading knows before
        # drawing apart, but some among its near misses
        ("hdfhd|h:2", "x0.post", 8, range(3, 10)),
        # members of 6-10 letters; length 6's draws rarely land inside (0.4 %): drawn first until its 16 members,
        # it spent the draws, and lengths 7-9 got one round each (2-4 members, 0.26 read against 0.45)
        ("dodggdgd|g:3", "m1", 10, range(5, 13)),
    ],
)
def test_a_reading_weighs_the_lengths_by_their_scanned_mass(q, site, position, lengths):
    # the share of the query's length among the members: the truth scanned over 10,000 inputs of every length near
    # the query's, each length weighted by its probability (the triples of 1..9 with that sum, over 729)
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:counting")
    s = iv.probed.site(site)
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, position].float()
    mass = {}
    for n in lengths:
        xs = _counting_inputs(random.Random(n), n, 10_000)
        dmin, _, _ = verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")
        p = sum(1 for c in product(range(1, 10), repeat=3) if sum(c) == n) / 729
        mass[n] = p * float((dmin <= 0.1).float().mean())
    truth = mass[len(q.split("|")[0])] / sum(mass.values())
    assert mass[min(lengths)] + mass[max(lengths)] < 0.01 * sum(mass.values())  # the scan spans the preimage
    read = {x["feature"]: x["share"] for x in iv.query(q, site=site, position=position).shares}["length"]
    assert abs(read - truth) < 0.12, (read, truth)  # before: 0.47 against 0.30; 0.26 against 0.45


def _letters_inputs(rng: random.Random, letters: str, target: str, length: int, n: int) -> list[str]:
    """``n`` counting inputs with these three letters and target and ``length`` letters, as the generator draws them
    given those (counts uniform over the triples of 1..9 with that sum, shuffled), built here apart from the task."""
    triples = [c for c in product(range(1, 10), repeat=3) if sum(c) == length]
    xs = []
    for _ in range(n):
        counts = rng.choice(triples)
        head = [a for a, k in zip(letters, counts) for _ in range(k)]
        rng.shuffle(head)
        xs.append(f"{''.join(head)}|{target}:{counts[letters.index(target)]}")
    return xs


def test_a_rare_preimage_spread_over_lengths_is_read_by_its_finer_strata(monkeypatch):
    # issue 28: x0.post at the target of `dwbbbbw|w:2` keeps the letters and the target (1 draw in 7,800 has them)
    # and spreads over lengths 6-8. No generator draw lands inside, so without finer strata the chains start at the
    # decoder's members (all of length 7) and stay near them: length 7 read at about 0.7 against a true 0.3. The
    # truth is scanned here: for every length, draws with the query's letters and target (built apart from the task),
    # weighed by the length's probability (triples summing to it / 729); inputs sharing fewer letters hold no member
    # (checked at lengths 6-8: their nearest lie at 0.15 and more)
    from inversionview import explore
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:counting")
    q, position, s = "dwbbbbw|w:2", 9, iv.probed.site("x0.post")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, position].float()
    rng, mass = random.Random(11), {}
    for n in range(3, 28):
        xs = _letters_inputs(rng, "bdw", "w", n, 600)
        rate = (verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")[0] <= 0.1).float().mean()
        mass[str(n)] = sum(sum(c) == n for c in product(range(1, 10), repeat=3)) / 729 * float(rate)
    truth = {n: m / sum(mass.values()) for n, m in mass.items()}
    assert 0.2 < truth["7"] < 0.4 and truth["6"] > 0.2 and truth["8"] > 0.2  # spread over three lengths
    other = [
        x
        for n in (6, 7, 8)
        for x in _letters_inputs(rng, "bxw", "w", n, 300) + _letters_inputs(rng, "bdw", "b", n, 300)
    ]
    assert verify(iv.probed, s, [iv.probed.encode(x) for x in other], zq, "euclidean")[0].min() > 0.1

    def lengths(pre) -> dict:
        row = next(r for r in pre.chart if r["item"] == "length")
        return {v["value"]: v["share"] for v in row["values"]}

    read = lengths(iv.query(q, "x0.post", position, seed=0))
    assert set(read) == {"6", "7", "8"}
    assert max(abs(read[n] - truth[n]) for n in read) <= 0.15, (read, truth)
    monkeypatch.setattr(explore, "REFINE", 0)  # without finer strata: the chains' lengths stay near the decoder's
    pre = iv.query(q, "x0.post", position, seed=0)
    off = lengths(pre)
    assert max(abs(off.get(n, 0.0) - truth[n]) for n in truth) > 0.15, (off, truth)
    # and such a reading says so in every view: chains that all began at the decoder's members make nothing sure
    assert not pre.chains["exact"]
    assert pre.chart and {r["verdict"] for r in pre.chart} == {"unsure"}
    assert not any(line.startswith(("shared", "varies", "tokens aligned")) for line in pre.summary)
    assert "unsure: length (7 " in "\n".join(pre.summary) and "began at the decoder's members" in pre.summary[1]
    from inversionview.viewer.terminal import render

    html, text = pre.to_html(), render(pre, colour=False)
    assert 'class="item shared"' not in html and html.count('class="item unsure"') == len(pre.chart)
    assert "shared by" not in text and "unsure: length" in text


def test_counting_finer_strata_levels_are_nested_with_the_generators_probabilities():
    # level 0: (length, letters, target), P(n) / 7,800; level 1: (length, the two letters that are not the target),
    # P(n) / 325 (24 third letters of C(26, 3) = 2,600 sets, times 1/3 for the target); none past level 1
    task = get_task("counting")
    x = "xxfxnxfnxfxxffnn|x:7"
    p16 = sum(sum(c) == 16 for c in product(range(1, 10), repeat=3)) / 729
    assert task.refine(x) == ((16, "fnx", "x"), pytest.approx(p16 / 7800))
    assert task.refine(x, 1) == ((16, "fn"), pytest.approx(p16 / 325))
    # level 2: (length, target, its count), P(n, count) / 26: the target's count 7 and two others summing to 9 (8
    # triples of 729), the target x (1 in 26); level 3: (length, the target's count), P(n, count); none past it
    assert task.refine(x, 2) == ((16, "x", 7), pytest.approx(8 / 729 / 26))
    assert task.refine(x, 3) == ((16, 7), pytest.approx(8 / 729)) and task.refine(x, 4) is None
    # around a stratum that keeps the count: one letter more or fewer, the target's or another's (a count of 10
    # has no triple); P(15, 8) = 6 / 729: the two others sum to 7
    assert task.around((16, 9)) == [
        ((15, 9), pytest.approx(5 / 729)),
        ((15, 8), pytest.approx(6 / 729)),
        ((17, 9), pytest.approx(7 / 729)),
    ]
    assert task.around((16, "x", 9)) == [
        ((15, "x", 9), pytest.approx(5 / 729 / 26)),
        ((15, "x", 8), pytest.approx(6 / 729 / 26)),
        ((17, "x", 9), pytest.approx(7 / 729 / 26)),
    ]
    assert task.around((16, "fn")) == [
        ((15, "fn"), pytest.approx(61 / 729 / 325)),
        ((17, "fn"), pytest.approx(57 / 729 / 325)),
    ]
    # a level-1 draw is the generator's given the stratum: the two letters, a third (the target) uniform among the
    # other 24, the counts uniform over the triples summing to n; so its level-0 stratum lies inside it
    rng = random.Random(3)
    draws = [task.generate_in((16, "fn"), rng) for _ in range(4800)]
    assert all(task.refine(y, 1)[0] == (16, "fn") and len(task.parse(y)[0]) == 16 for y in draws)
    targets = Counter(task.parse(y)[1] for y in draws)
    assert set(targets) == set(string.ascii_lowercase) - {"f", "n"}
    chi2 = sum((k - 200) ** 2 / 200 for k in targets.values())
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, 0.1 % point
    # a level-3 draw: the length and the target's count kept, the target uniform over the 26 letters
    draws = [task.generate_in((16, 7), rng) for _ in range(2600)]
    assert all(task.refine(y, 3)[0] == (16, 7) for y in draws)
    targets = Counter(task.parse(y)[1] for y in draws)
    assert len(targets) == 26 and sum((k - 100) ** 2 / 100 for k in targets.values()) < 52.6  # 25 df, 0.1 %
    # and the level-1 probability against the generator itself: of 325,000 draws, 1,000 expected with others "fn"
    g = random.Random(4)
    xs = [task.generate(g) for _ in range(325_000)]
    hits = sum(task.refine(y, 1)[0][1] == "fn" for y in xs)
    assert abs(hits - 1000) < 4 * math.sqrt(1000), hits
    # and level 3's: (16, 7) holds 8 / 729 of the generator's draws (3,567 expected)
    hits = sum(task.refine(y, 3)[0] == (16, 7) for y in xs)
    assert abs(hits - 325_000 * 8 / 729) < 4 * math.sqrt(325_000 * 8 / 729), hits


@pytest.mark.slow
def test_a_preimage_that_frees_the_targets_name_is_read_by_coarser_strata(monkeypatch):
    # head 0.0 at the target of `xxfxnxfnxfxxffnn|x:7` keeps the other two letters (f, n) and leaves the target's
    # name free: the finest strata (letters and target) leak (renaming x keeps an input inside), and without a
    # coarser level the reading starts at the one or two plain draws that land inside (lengths read 17: 0.74). The
    # truth is scanned here: per length, draws with letters f, n and a third letter (the target) uniform among the
    # other 24, built apart from the task, weighed by the length's probability; inputs without f and n hold no
    # member (checked at lengths 14-18)
    from inversionview.run import InversionView
    from inversionview.tasks.counting import Counting

    iv = InversionView.load("shipped:counting")
    q, position, s = "xxfxnxfnxfxxffnn|x:7", 18, iv.probed.site("a0.0")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, position].float()
    rng, mass = random.Random(12), {}
    others = [c for c in string.ascii_lowercase if c not in "fn"]
    for n in range(3, 28):
        xs = [y for _ in range(30) for t in [rng.choice(others)] for y in _letters_inputs(rng, "fn" + t, t, n, 20)]
        rate = (verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")[0] <= 0.1).float().mean()
        mass[str(n)] = sum(sum(c) == n for c in product(range(1, 10), repeat=3)) / 729 * float(rate)
    truth = {n: m / sum(mass.values()) for n, m in mass.items()}
    assert max(truth.values()) < 0.4  # spread over lengths
    other = [
        y
        for n in range(14, 19)
        for _ in range(40)
        for a, b, t in [rng.sample([c for c in others if c != "x"], 3)]
        for y in _letters_inputs(rng, a + b + t, t, n, 5) + _letters_inputs(rng, "f" + b + t, t, n, 5)
    ]
    assert verify(iv.probed, s, [iv.probed.encode(x) for x in other], zq, "euclidean")[0].min() > 0.1

    def lengths() -> dict:  # every length's share over the chains (the summary prints the top three)
        w = walk(iv.probed, iv.task, s, zq[None], [[q]], 0.1, "euclidean", seed=0)[0]
        return {n: share(w.states, lambda x, n=n: len(x.partition("|")[0]) == int(n)).share for n in truth}

    read = lengths()
    assert max(abs(read[n] - truth[n]) for n in truth) <= 0.1, (read, truth)
    finest = Counting.refine  # only the finest level: its strata leak, and the reading falls back on few starts
    monkeypatch.setattr(Counting, "refine", lambda self, x, level=0: finest(self, x) if level == 0 else None)
    off = lengths()
    assert max(abs(off[n] - truth[n]) for n in truth) > 0.15, (off, truth)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 28: a level held after its draws ran out within the leak rounds")
def test_a_level_whose_draws_ran_out_within_its_leak_rounds_reads_the_true_share():
    # head 0.0 at the target of `aggraaaaaaggagrrr|a:8` keeps the other two letters (g, r) and leaves the target's
    # name free. With seed 2 its finest level (letters x target) spends its 32,768 draws within two leak rounds; the
    # third finds no leak among the same strata, the level is held, and the reading says target `a` is shared by
    # 0.96 (seeds 0 and 1 drop the level and read 0.20-0.22). A known failure, pinned here until a reading fixes
    # it: dropping such a level fixes this query but drops level 1 of `ppgsspspspspp|p:7` (tuning seed 555: a0.0
    # max 0.14 -> 0.34), and drawing the strata a level leaks into past its budget still holds it (0.80). The truth
    # is scanned here: per target letter t, draws with letters g, r, t and target t (built apart from the task),
    # weighed by the length's probability (the generator draws every letter set and target alike); with target g
    # or r, or without g or r, no input is inside (checked at lengths 12-21)
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:counting")
    q, position, s = "aggraaaaaaggagrrr|a:8", 19, iv.probed.site("a0.0")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, position].float()
    rng, mass = random.Random(13), {}
    p = {n: sum(sum(c) == n for c in product(range(1, 10), repeat=3)) / 729 for n in range(10, 27)}
    for t in [c for c in string.ascii_lowercase if c not in "gr"]:
        xs = [x for n in range(10, 27) for x in _letters_inputs(rng, "gr" + t, t, n, 400)]
        d = verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")[0].tolist()
        mass[t] = sum(p[len(x.partition("|")[0])] for x, dx in zip(xs, d) if dx <= 0.1)
    truth = mass["a"] / sum(mass.values())
    assert 0.1 < truth < 0.4  # the target's name is free: a holds a share, not all
    other = [
        x
        for n in range(12, 22)
        for let, t in (("agr", "g"), ("agr", "r"), ("agx", "a"), ("arx", "a"))
        for x in _letters_inputs(rng, let, t, n, 60)
    ]
    assert verify(iv.probed, s, [iv.probed.encode(x) for x in other], zq, "euclidean")[0].min() > 0.1
    pre = iv.query(q, "a0.0", position, seed=2)
    read = {x["feature"]: x["share"] for x in pre.shares}["target"]
    assert abs(read - truth) <= 0.15, (read, truth)


def test_a_rare_readings_finer_draws_are_kept_and_read_the_same(monkeypatch):
    # a rare reading (x0.post at the target of `dwbbbbw|w:2`: no plain draw lands inside) draws thousands of inputs
    # in its finer strata. The draws are kept (_Drawn.pool): a second reading with the same seed, its activations
    # not cached, generates none again and reads exactly what the first read; a kept pool's i-th text is the i-th
    # draw of the generator its name seeds; another seed draws afresh
    from inversionview import explore
    from inversionview.run import InversionView
    from inversionview.tasks.counting import Counting

    iv = InversionView.load("shipped:counting")
    made: list[int] = []
    real = Counting.generate_in
    fine = lambda key: isinstance(key, tuple)  # noqa: E731  (a length's draws, _draw_strata, are not kept)
    monkeypatch.setattr(Counting, "generate_in", lambda self, k, rng: made.extend([1] * fine(k)) or real(self, k, rng))

    def read(seed=0):
        explore._DRAWN.entries.clear()  # no activations cached: every draw runs through the probed model
        pre = iv.query("dwbbbbw|w:2", "x0.post", 9, seed=seed)
        return pre.shares, pre.chains["states"]

    explore._DRAWN.pools.clear()
    first, n = read(), len(made)
    assert n > 1000 and explore._DRAWN.pools  # the finer strata were drawn, and kept
    assert read() == first and len(made) == n  # none generated again, the same reading
    (kind, name), (_, pool) = next(iter(explore._DRAWN.pools.items()))
    level, key = name.split(":fine:")[1].split(":", 1)
    rng = random.Random(name)
    assert kind == "Counting" and pool[:50] == [real(iv.task, eval(key), rng) for _ in range(50)]
    read(seed=1)
    assert len(made) > n  # another seed: other draws
    explore._DRAWN.pools.clear()
    assert read() == first  # from scratch again: the same reading


def test_a_level_whose_members_spread_over_many_times_a_coarser_levels_strata_is_passed(monkeypatch):
    # head 1.0 at the target of `lylllzlllzl|y:1` keeps the letter l and leaves the others free: its members known
    # before the finer draws (the query's, the decoder's, the draws' and their Gibbs blocks') fall in many times
    # more strata of levels 0 and 1 (letters) than of level 3 (length x count). Those levels are passed, not drawn
    # for a leak test to drop them: 32,768 draws each, three levels in all, before. Counted here by hand from the
    # members the reading knew, with the task's own strata left out (length, letter set, target, count)
    from inversionview import explore
    from inversionview.run import InversionView
    from inversionview.tasks.counting import Counting

    iv = InversionView.load("shipped:counting")
    drawn, known = [], {}
    real_level, real_wide = explore._draw_level, explore._wide

    def level(probed, task, site, zq, seen, near, qs, *a, **k):
        drawn.extend(near[q].level for q in qs)
        return real_level(probed, task, site, zq, seen, near, qs, *a, **k)

    def wide(task, seen, epsilon, memo):
        known.update({x: d for x, (d, _) in seen.items() if d <= epsilon})
        return real_wide(task, seen, epsilon, memo)

    monkeypatch.setattr(explore, "_draw_level", level)
    monkeypatch.setattr(explore, "_wide", wide)
    made: list[int] = []
    gen = Counting.generate_in
    monkeypatch.setattr(
        Counting, "generate_in", lambda s, k, r: made.extend([1] * isinstance(k, tuple)) or gen(s, k, r)
    )
    explore._DRAWN.pools.clear()  # every finer draw generated here, none kept from before
    iv.query("lylllzlllzl|y:1", "a1.0", 13, seed=0)
    heads = [(x.partition("|")[0], x.partition("|")[2][0]) for x in known]
    cells = [
        {(len(h), "".join(sorted(set(h))), t) for h, t in heads},  # level 0
        {(len(h), "".join(sorted(set(h) - {t}))) for h, t in heads},  # level 1
        {(len(h), t, h.count(t)) for h, t in heads},  # level 2
        {(len(h), h.count(t)) for h, t in heads},  # level 3
    ]
    passed = {lv for lv in range(4) if any(len(cells[lv]) > 4 * len(c) for c in cells[lv + 1 :])}
    assert {0, 1} <= passed and 0 not in drawn and 1 not in drawn and set(drawn) == set(range(4)) - passed
    budget = explore.FINE_DRAWS * iv.task.draws  # a level's draws (a round may pass it); 4 levels drawn before
    assert 0 < len(made) < 2.5 * budget  # two levels' draws
