"""The counting truth of bench_fidelity (benchmarks/_truth.py): its cells' probabilities against the generator,
counted here independently (an enumeration of the generator's choices, and the real generator's frequencies), and
its draws conditioned on a cell against that cell and the generator's law inside it."""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from itertools import permutations, product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import _truth  # noqa: E402

from inversionview.tasks.counting import LETTERS, Counting  # noqa: E402

QUERIES = ["xxddnxnxnndnxdnnxxnx|x:8", "abzzbab|z:2", "qqqqqqqqqwwwwwwwwweeeeeeeee|w:9"]


def cell_of(text: str, query: str) -> tuple[int, int, int]:
    """The cell of ``text`` relative to ``query``, read off the strings: (letters, count of the query's target,
    8 * (target = the query's: 0, another of its letters: 1, else 2) + 4 * (the query's target present) + the
    number of the query's other letters present)."""
    head, _, tail = text.partition("|")
    qhead, _, qtail = query.partition("|")
    a, X, S = qtail[0], set(qhead) - {qtail[0]}, set(head)
    return len(head), head.count(a), 8 * (0 if tail[0] == a else 1 if tail[0] in X else 2) + 4 * (a in S) + len(S & X)


def cells(mass: np.ndarray = _truth.MASS) -> dict[tuple[int, int, int], float]:
    return {_truth.split(int(h)): float(mass[h]) for h in np.flatnonzero(mass)}


def enumerated(query: str) -> dict[tuple[int, int, int], float]:
    """Every cell's probability by enumerating the generator's choices (an ordered triple of distinct letters,
    three counts 1..9, the target one of the three; the order of the letters does not change the cell)."""
    qhead, _, qtail = query.partition("|")
    a = qtail[0]
    by_slot = {}  # where t_q sits among the three letters (None: absent) -> (L, c) -> number of count triples
    for slot in (0, 1, 2, None):
        n = Counter()
        for counts in product(range(1, 10), repeat=3):
            n[(sum(counts), 0 if slot is None else counts[slot])] += 1
        by_slot[slot] = n
    out = Counter()
    triples = list(permutations(LETTERS, 3))
    for letters in triples:
        slot = letters.index(a) if a in letters else None
        for k in range(3):
            _, _, rel = cell_of(f"{''.join(letters)}|{letters[k]}:1", query)
            for (L, c), m in by_slot[slot].items():
                out[(L, c, rel)] += m
    total = len(triples) * 3 * 729
    return {key: m / total for key, m in out.items()}


@pytest.mark.parametrize("query", QUERIES)
def test_cells_equal_an_enumeration_of_the_generator(query):
    """_truth.MASS is query-free: the cells' probabilities must be the same for every query's letters."""
    enum, mass = enumerated(query), cells()
    assert enum.keys() == mass.keys()
    assert max(abs(enum[k] - mass[k]) for k in enum) < 1e-12
    assert abs(sum(mass.values()) - 1) < 1e-12


def chi2_z(freq: Counter, mass: dict, n: int) -> float:
    """(chi2 - df) / sqrt(2 df) of observed cell frequencies against ``mass``: cells with at least 10 expected,
    the rest lumped into one."""
    big = [k for k in mass if mass[k] * n >= 10]
    chi2 = sum((freq[k] - mass[k] * n) ** 2 / (mass[k] * n) for k in big)
    rest = n - sum(mass[k] * n for k in big)
    chi2 += (n - sum(freq[k] for k in big) - rest) ** 2 / rest
    return (chi2 - len(big)) / math.sqrt(2 * len(big))


def test_cells_match_the_real_generators_frequencies():
    """80,000 draws of Counting.generate, each in its cell relative to a query: chi-square against _truth.MASS; and
    the same draws reject two plausible wrong formulas (the letter set and target as if the target were uniform
    over the 26 letters independently of the set; the counts as if the target's count and the length were
    independent), so a wrong formula fails this test."""
    task, rng, n, q = Counting(), random.Random(20261205), 80_000, QUERIES[0]
    freq = Counter(cell_of(task.generate(rng), q) for _ in range(n))
    mass = cells()
    assert set(freq) <= set(mass)
    assert abs(chi2_z(freq, mass, n)) < 5

    # wrong 1: the target drawn from all 26 letters, a letter set's relation weighted as if independent
    rel_w = Counter()
    for S in permutations(LETTERS, 3):
        for t in LETTERS:
            rel_w[cell_of(f"{''.join(S)}|{t}:1", q)[2]] += 1
    tot = sum(rel_w.values())
    wrong1 = {}
    for (L, c, rel), m in mass.items():
        wrong1[(L, c, rel)] = m / _truth.REL_P[rel] * rel_w[rel] / tot if rel_w[rel] else 0.0
    norm = sum(wrong1.values())
    wrong1 = {k: v / norm for k, v in wrong1.items() if v}
    assert chi2_z(freq, wrong1, n) > 5

    # wrong 2: P(L, c | rel) as P(L) P(c), t_q's count independent of the length
    wrong2 = {}
    for L, c, rel in mass:
        wrong2[(L, c, rel)] = _truth.PAIRS_L[L] * (1 / 9 if c else 1) * _truth.REL_P[rel]
    norm = sum(wrong2.values())
    wrong2 = {k: v / norm for k, v in wrong2.items()}
    assert chi2_z(freq, wrong2, n) > 5


def truth_for(query: str, seed: int = 0) -> _truth.Counting:
    """A _truth.Counting without a probed model (draws only)."""
    vocab = Counting.vocab
    iv = SimpleNamespace(probed=SimpleNamespace(tokenizer=vocab, site=lambda s: s))
    return _truth.Counting(iv, "a0.0", [query], [0], torch.zeros(1, 4), 0.1, seed)


@pytest.mark.parametrize("L, c, rel", [(20, 8, 6), (19, 8, 5), (12, 3, 20), (15, 0, 16), (9, 2, 13), (27, 9, 5)])
def test_conditioned_draws_follow_the_generator_in_their_cell(L, c, rel):
    """Draws conditioned on a cell are in it, well formed, and distributed there as the generator is: (S, t)
    uniform over the cell's pairs, the other counts uniform given the length, every place of the sequence holding
    t_q with probability c / L."""
    q = QUERIES[0]
    tr = truth_for(q, seed=L * 100 + c)
    n = 6000
    texts = [tr._text(row) for row in tr.draw_cell(0, L, c, rel, n)]
    task = Counting()
    assert all(task.parse(x) is not None for x in texts)
    assert all(cell_of(x, q) == (L, c, rel) for x in texts)
    # (S, t) uniform over the rel's pairs: chi-square
    st = Counter((frozenset(x.partition("|")[0]), x.partition("|")[2][0]) for x in texts)
    k = int(_truth.REL_COUNT[rel])
    assert len(st) <= k
    if k > 1:
        e = n / k
        chi2 = sum((v - e) ** 2 / e for v in st.values()) + (k - len(st)) * e
        assert abs(chi2 - (k - 1)) / math.sqrt(2 * (k - 1)) < 5
    # the other letters' counts: uniform over the count triples (or pairs) the cell allows
    a = q.partition("|")[2][0]
    rest = Counter(
        tuple(sorted(n_ for ch, n_ in Counter(x.partition("|")[0]).items() if ch != a))
        if c
        else tuple(sorted(Counter(x.partition("|")[0]).values()))
        for x in texts
    )
    if c:  # (b, d) ordered uniform over b + d = L - c: a sorted pair {b, d} has weight 2 (1 where b = d)
        allowed = Counter(tuple(sorted((b, L - c - b))) for b in range(1, 10) if 1 <= L - c - b <= 9)
    else:
        allowed = Counter(tuple(sorted(t)) for t in product(range(1, 10), repeat=3) if sum(t) == L)
    tot = sum(allowed.values())
    for key, v in allowed.items():
        p = v / tot
        assert abs(rest[key] - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (key, rest[key], n * p)
    assert set(rest) <= set(allowed)
    # every place holds t_q with probability c / L (the order uniform given the counts)
    if c:
        at = np.array([[ch == a for ch in x.partition("|")[0]] for x in texts], dtype=float).sum(0)
        p = c / L
        assert np.all(np.abs(at - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1), at


def test_plan_floors_every_support_cell_before_neyman():
    """With members found in one cell, the next draws first fill FLOOR in every cell of the support (every rel that
    holds members or shares two letters with the query's, every count, the members' lengths +- SPAN), largest
    cells first when the budget runs short; only then Neyman. Without the floor, two truths of issue 28's example
    at x1.post (target letter) disagreed by 4.5 of their standard errors."""
    tr = truth_for(QUERIES[0])
    h = _truth.cell(20, 8, 6)
    tr.member_cells[0] = [h] * 5
    tr.n[0][h] = 40
    sup = tr.support(0)
    L = np.arange(_truth.NCELLS) // _truth.NREL // 10
    rel = np.arange(_truth.NCELLS) % _truth.NREL
    assert sup[h] and set(rel[sup]) == set(_truth.PILOT) and set(L[sup]) == set(range(18, 23))
    assert sup.sum() > 200  # every count of the rels holding t_q
    need = tr.floor_left(0)
    assert need == _truth.FLOOR * sup.sum() - 40
    plan = tr.plan(0, need + 1000)
    got = np.zeros(_truth.NCELLS)
    for c, k in plan.items():
        got[c] = k
    assert np.all(tr.n[0][sup] + got[sup] >= _truth.FLOOR)
    short = tr.plan(0, 500)  # a short budget: the largest cells' floors first
    assert sum(short.values()) <= 500 and all(_truth.MASS[c] >= np.median(_truth.MASS[sup]) for c in short)
