"""The true shares of counting preimages, from draws conditioned on what the activation keeps (issue 28).

A plain generator scan meets few members of a preimage that is rare under the generator (at a0.0 and x0.post at the
target letter: the query's length, target letter, count and letter set, and their neighbours). Here the input
space is cut into cells of exact probability under the counting generator and each cell is drawn from on its own:

- a cell is (L, c, rel): the number of letters L (3..27), the target letter's count c (1..9) and how the input's
  (letter set S, target t) relates to the query's (S_q, t_q): A: t = t_q and S = S_q; B: t = t_q, S shares one
  other letter with S_q; C: t = t_q, no other letter shared; D: t != t_q but t_q in S; E: t_q not in S;
- the generator draws the letters as a uniform 3-subset of 26 with the target uniform among them (7,800 equally
  likely (S, t)), the counts independently uniform on 1..9 and the order uniformly given the counts, so
  P(cell) = #{(b, d) in 1..9^2: b + d = L - c} / 729 * P(rel), with P(rel) = 1, 46, 253, 600, 6,900 out of 7,800
  (t_q fixed, the two other letters a 2-subset of 25: 1 equal to S_q's, 2 * 23 sharing one, C(23, 2) = 253 none;
  t != t_q with t_q in S: 25 * 24 = 600; t_q not in S: C(25, 3) * 3 = 6,900);
- draws come from a pool of plain draws per length (scanned against every query of a site at once, each draw
  falling in one cell of each query) and from draws conditioned on one query's cell: a pilot in every cell of
  the rels sharing two letters with the query's (PILOT), then FLOOR draws in every cell of the query's support (the
  rels holding members and PILOT's, every count, the members' lengths and SPAN either side), then rounds allocated
  by Neyman (mass x sqrt(p(1 - p)), p a cell's inside rate shrunk towards its rel's; cells next to one holding
  members get a share though none was found there yet) until every feature's share is known or a budget is spent.
  Without the floor, the cells whose members a few pilot draws happened to meet took the draws and the others
  none: on issue 28's x1.post example at the target letter, two truths said 0.862 +- 0.022 and 0.789 +- 0.024 for
  the query's letter set, against 0.693 +- 0.008 from ten times the draws and 0.692 +- 0.084 from a plain scan;
- a share is post-stratified: sum_h W_h k_h(match) / n_h over sum_h W_h k_h / n_h, with the delta method's standard
  error over the cells (and at least the binomial one at the members' Kish effective number);
- the cells with no member found bound the mass left out: with zero members in cells of n_h draws, sum_h n_h p_h
  <= 3 at 95 % (Poisson, the rule of three), and the most mass they can hold under that is the linear program's
  greedy fill by W_h / n_h (a cell never drawn holds up to all its mass). Reported for rel A-C (near) and D-E (far)
  as a fraction of the preimage's mass.

The scan (tokens, distances, masks) is written here; it shares only the probed model's forward pass with the
reading it checks.
"""

from __future__ import annotations

import math
from itertools import combinations, product

import numpy as np
import torch

# (S, t) relative to the query's (S_q, t_q = a, others X): code = 8 * (t == a: 0, t in X: 1, else 2)
# + 4 * (a in S) + |S & X|; its number of (S, t) pairs out of 7,800, counted by hand (see the module's doc)
REL_COUNT = np.zeros(24)
for _code, _k in {
    0 * 8 + 4 + 2: 1,  # A: the query's letters and target
    0 * 8 + 4 + 1: 46,  # B: target a, one of X
    0 * 8 + 4 + 0: 253,  # C: target a, none of X
    1 * 8 + 4 + 2: 2,  # the query's letters, another target
    1 * 8 + 4 + 1: 46,  # target in X, a present, the other of X not
    1 * 8 + 0 + 2: 46,  # target in X, both of X, no a
    1 * 8 + 0 + 1: 506,  # target in X alone
    2 * 8 + 4 + 1: 46,  # target new, a and one of X
    2 * 8 + 0 + 2: 23,  # target new, both of X
    2 * 8 + 4 + 0: 506,  # target new, a, no X
    2 * 8 + 0 + 1: 1012,  # target new, one of X
    2 * 8 + 0 + 0: 5313,  # target new, none of S_q
}.items():
    REL_COUNT[_code] = _k
assert REL_COUNT.sum() == 7800
REL_P = REL_COUNT / 7800
NREL = 24
PILOT = {6: 16, 5: 4, 14: 4, 13: 4, 21: 4, 10: 32, 18: 32}  # rels sharing two letters with S_q: draws per cell
PAIRS = {s: sum(1 for b in range(1, 10) if 1 <= s - b <= 9) for s in range(-9, 30)}  # (b, d) in 1..9 with b + d = s
TRIPLES = {L: [c for c in product(range(1, 10), repeat=3) if sum(c) == L] for L in range(3, 28)}
PAIRS_L = {L: len(TRIPLES[L]) / 729 for L in TRIPLES}  # P(length L)
MIN_MEMBERS = 40
FLOOR = 48  # draws in every cell of a query's support (its members' rels and PILOT's, every count, near their lengths)
SPAN = 2  # the support's lengths: the members' and this many either side
PRIOR = 8  # a support cell's inside rate is shrunk towards its rel's by this many draws' worth
Z = 1.959964


def cell(L: int, c: int, rel: int) -> int:
    return (L * 10 + c) * NREL + rel


def split(h: int) -> tuple[int, int, int]:
    lc, rel = divmod(h, NREL)
    return *divmod(lc, 10), rel


HAS_A = np.array([r & 4 > 0 for r in range(NREL)])  # rels whose letters hold t_q: their cells split by its count
NCELLS = cell(28, 0, 0)
MASS = np.zeros(NCELLS)  # each cell's exact probability under the generator
FEASIBLE = np.zeros(NCELLS, bool)
for _L, _r in product(range(3, 28), range(NREL)):
    for _c in range(1, 10) if HAS_A[_r] else (0,):
        if REL_COUNT[_r] and (_c == 0 or PAIRS[_L - _c]):
            MASS[cell(_L, _c, _r)] = (PAIRS[_L - _c] / 729 if _c else len(TRIPLES[_L]) / 729) * REL_P[_r]
            FEASIBLE[cell(_L, _c, _r)] = True
NEAR = np.array([split(h)[2] // 8 == 0 for h in range(NCELLS)])  # the query's target letter


def neighbours(h: int) -> list[int]:
    """Cells next to ``h``: length one apart in the same rel (and count, one apart or the same, where the rel's
    cells split by count); the cells of other rels at the same length (and count, where both split by it)."""
    L, c, rel = split(h)
    if c:
        near = ((L - 1, c), (L + 1, c), (L, c - 1), (L, c + 1), (L - 1, c - 1), (L + 1, c + 1))
    else:
        near = ((L - 1, 0), (L + 1, 0))
    out = [cell(L2, c2, rel) for L2, c2 in near if 3 <= L2 <= 27]
    for r in range(NREL):
        if r != rel:
            out += [cell(L, c2, r) for c2 in ((c,) if c else range(1, 10))] if HAS_A[r] else [cell(L, 0, r)]
    return [x for x in out if 0 <= x < NCELLS and FEASIBLE[x]]


NEIGHBOURS = {h: neighbours(h) for h in np.flatnonzero(FEASIBLE)}
ALL_ST = torch.tensor([[t, *(x for x in S if x != t)] for S in combinations(range(26), 3) for t in S])


def relation(letters: torch.Tensor, S: list[int], a: int) -> torch.Tensor:
    """The rel code of each row of ``letters`` ((N, 3), the target first) against the query's (S_q, t_q = a)."""
    X = torch.tensor([x for x in S if x != a])
    inX = (letters[..., None] == X).any(-1)
    t = letters[:, 0]
    tc = torch.where(t == a, 0, torch.where(inX[:, 0], 1, 2))
    return tc * 8 + (letters == a).any(1).long() * 4 + inX.sum(1)


def stratified(cells: np.ndarray, match: np.ndarray, n: np.ndarray, mass: np.ndarray = MASS):
    """The post-stratified share of ``match`` among members (``cells``: each member's cell; ``n``: draws per
    cell; ``mass``: cells' probabilities), its standard error (delta method over the cells, at least the binomial
    one at the Kish effective number) and the number of members; (None, inf, 0) without members."""
    k = len(cells)
    if k == 0:
        return None, math.inf, 0
    w = mass[cells] / n[cells]
    den = w.sum()
    r = float((w * match).sum() / den)
    y = match - r
    sy = np.bincount(cells, y, minlength=len(n))
    sy2 = np.bincount(cells, y * y, minlength=len(n))
    nh = np.maximum(n, 1)
    s2 = np.where(n > 1, (sy2 - sy * sy / nh) / np.maximum(n - 1, 1), 0.0)
    var = float((mass**2 * s2 / nh).sum())
    n_eff = den**2 / float((w * w).sum())
    lo, hi = wilson(r, n_eff)
    return r, max(math.sqrt(max(var, 0.0)) / den, (hi - lo) / 2 / Z), k


def wilson(p: float, n: float) -> tuple[float, float]:
    den = 1 + Z * Z / n
    mid = (p + Z * Z / (2 * n)) / den
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def missing_bound(zero: np.ndarray, n: np.ndarray, mass: np.ndarray = MASS) -> float:
    """The most member mass the cells ``zero`` (no member found) can hold at 95 %: sum n_h p_h <= 3, filled
    greedily by mass per draw; a cell never drawn can hold all its mass."""
    idx = np.flatnonzero(zero)
    bound = float(mass[idx[n[idx] == 0]].sum())
    drawn = idx[n[idx] > 0]
    budget = 3.0
    for h in drawn[np.argsort(-mass[drawn] / n[drawn])]:
        p = min(1.0, budget / n[h])
        bound += mass[h] * p
        budget -= n[h] * p
        if budget <= 0:
            break
    return bound


class Counting:
    """Per query of one site: the draws per cell and the members found (their cells and texts)."""

    def __init__(self, iv, site, texts: list[str], positions: list[int], zq: torch.Tensor, epsilon: float, seed):
        self.iv, self.site, self.zq, self.eps = iv, iv.probed.site(site), zq, epsilon
        tok = iv.probed.tokenizer
        self.ids = {t: i for i, t in enumerate(tok.tokens)}
        self.letter0 = self.ids["a"]
        self.bos, self.eos, self.bar, self.colon, self.one = (self.ids[x] for x in (tok.bos, tok.eos, "|", ":", "1"))
        self.tokens = list(tok.tokens)
        self.gen = torch.Generator().manual_seed(seed)
        self.queries = []
        for t in texts:
            head, _, tail = t.partition("|")
            self.queries.append((sorted(ord(x) - 97 for x in set(head)), ord(tail[0]) - 97, len(head)))
        self.st = []  # per query, per rel: the (S, t) pairs of that rel (the target first)
        for S, a, _ in self.queries:
            rel = relation(ALL_ST, S, a)
            assert np.array_equal(np.bincount(rel.numpy(), minlength=NREL), REL_COUNT)  # the hand counts
            self.st.append({int(r): ALL_ST[rel == r] for r in np.flatnonzero(REL_COUNT)})
        Q = len(texts)
        self.n = [np.zeros(NCELLS) for _ in range(Q)]
        self.member_cells = [[] for _ in range(Q)]
        self.member_texts = [[] for _ in range(Q)]
        self._values: dict[tuple[int, str], list] = {}
        self.draws = 0
        self.seconds = 0.0

    # -------------------------------------------------------------- draws
    def _arrange(self, L: int, letters: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L + 6): letters[:, i] ``counts[:, i]`` times (the counts sum to L), shuffled uniformly;
        then ``|t:n`` for the target letters[:, 0] and its count."""
        N = len(letters)
        j = torch.arange(L)[None]
        c0, c1 = counts[:, :1], counts[:, :1] + counts[:, 1:2]
        head = torch.where(j < c0, letters[:, :1], torch.where(j < c1, letters[:, 1:2], letters[:, 2:3]))
        head = head.gather(1, torch.rand(N, L, generator=self.gen).argsort(1))
        col = lambda v: torch.full((N, 1), v, dtype=torch.long)  # noqa: E731
        return torch.cat(
            [col(self.bos), head + self.letter0, col(self.bar), letters[:, :1] + self.letter0, col(self.colon),
             counts[:, :1] + self.one - 1, col(self.eos)], 1)  # fmt: skip

    def draw_cell(self, q: int, L: int, c: int, rel: int, N: int) -> torch.Tensor:
        """N draws from the generator conditioned on query q's cell (L, c, rel): (S, t) uniform among the 7,800
        pairs of that rel; t_q (in S where c > 0) has count c, the two others counts (b, d) uniform among the pairs
        with b + d = L - c; where c = 0, the counts are a triple uniform among those summing to L."""
        S, a, _ = self.queries[q]
        pairs = self.st[q][rel]
        letters = pairs[torch.randint(len(pairs), (N,), generator=self.gen)]  # the target first
        if c == 0:  # a rel without t_q: the counts as the generator draws them given the length
            trip = torch.tensor(TRIPLES[L])[torch.randint(len(TRIPLES[L]), (N,), generator=self.gen)]
            return self._arrange(L, letters, trip)
        s = L - c
        lo, hi = max(1, s - 9), min(9, s - 1)
        b = lo + torch.randint(hi - lo + 1, (N,), generator=self.gen)
        key = (letters == a).long().argmax(1)  # the column of t_q
        counts = torch.stack([b, s - b], 1)
        full = torch.zeros(N, 3, dtype=torch.long)
        full[torch.arange(N), key] = c
        rest = torch.ones(N, 3, dtype=torch.bool)
        rest[torch.arange(N), key] = False
        full[rest] = counts.flatten()
        return self._arrange(L, letters, full)

    def draw_plain(self, L: int, N: int):
        """N draws from the generator given the length L; with each draw's letters (target first) and counts."""
        trip = torch.tensor(TRIPLES[L])[torch.randint(len(TRIPLES[L]), (N,), generator=self.gen)]
        letters = torch.rand(N, 26, generator=self.gen).argsort(1)[:, :3]
        return self._arrange(L, letters, trip), letters, trip

    # -------------------------------------------------------------- scan
    @torch.inference_mode()
    def _distances(self, ids: torch.Tensor, owner: torch.Tensor | None, chunk: int = 8192) -> torch.Tensor:
        """Relative distance (min over positions but EOS) of each row to its owner query, or to every query ((N, Q))."""
        out = []
        p = self.iv.probed
        for i in range(0, len(ids), chunk):
            x = ids[i : i + chunk]
            z = p.run(x, [self.site])[self.site].float()[:, :-1]  # the last position is EOS
            if owner is None:
                d = torch.cdist(z.reshape(-1, z.shape[-1]), self.zq).reshape(z.shape[0], z.shape[1], -1)
                out.append((d / self.zq.norm(dim=-1)).amin(1))
            else:
                zq = self.zq[owner[i : i + chunk]]
                d = (z - zq[:, None]).norm(dim=-1) / zq.norm(dim=-1)[:, None]
                out.append(d.amin(1))
        self.draws += len(ids)
        return torch.cat(out)

    def _text(self, row: torch.Tensor) -> str:
        return "".join(self.tokens[i] for i in row[1:-1].tolist())

    def pool(self, per_length: int) -> None:
        """Plain draws of every length, scanned against every query: each falls in one cell of each query."""
        import time

        t0 = time.perf_counter()
        for L in range(3, 28):
            ids, letters, counts = self.draw_plain(L, per_length)
            inside = self._distances(ids, None) <= self.eps  # (N, Q)
            for q, (S, tq, _) in enumerate(self.queries):
                rel = relation(letters, S, tq)
                has_a = letters == tq
                c = (counts * has_a).sum(1)  # t_q's count, 0 where absent
                h = ((L * 10 + c) * NREL + rel).numpy()
                self.n[q] += np.bincount(h, minlength=NCELLS)
                for i in inside[:, q].nonzero().flatten().tolist():
                    self.member_cells[q].append(int(h[i]))
                    self.member_texts[q].append(self._text(ids[i]))
        self.seconds += time.perf_counter() - t0

    def targeted(self, plan: dict[int, dict[int, int]]) -> None:
        """Draws conditioned on cells: ``plan[q][cell] = number``; run grouped by length across queries."""
        import time

        t0 = time.perf_counter()
        by_L: dict[int, list] = {}
        for q, cells in plan.items():
            for h, N in cells.items():
                if N > 0:
                    L, c, rel = split(h)
                    by_L.setdefault(L, []).append((q, h, self.draw_cell(q, L, c, rel, N)))
        for parts in by_L.values():
            ids = torch.cat([x for _, _, x in parts])
            owner = torch.cat([torch.full((len(x),), q) for q, _, x in parts])
            cells = np.concatenate([np.full(len(x), h) for _, h, x in parts])
            inside = (self._distances(ids, owner) <= self.eps).numpy()
            for q, h, x in parts:
                self.n[q][h] += len(x)
            for i in np.flatnonzero(inside):
                q = int(owner[i])
                self.member_cells[q].append(int(cells[i]))
                self.member_texts[q].append(self._text(ids[i]))
        self.seconds += time.perf_counter() - t0

    # -------------------------------------------------------------- estimates
    def share(self, q: int, key: str, f, value) -> tuple[float | None, float, int]:
        """The post-stratified share of members with ``f(member) == value`` (``key`` names ``f`` for the cache of
        members' values), its standard error and the number of members."""
        vals = self._values.setdefault((q, key), [])
        texts = self.member_texts[q]
        for x in texts[len(vals) :]:
            try:
                vals.append(f(x))
            except Exception:
                vals.append(None)
        cells = np.asarray(self.member_cells[q], dtype=np.int64)
        match = np.fromiter((v == value for v in vals), dtype=float, count=len(vals))
        return stratified(cells, match, self.n[q])

    def bounds(self, q: int) -> tuple[float, float, float]:
        """The preimage's estimated mass and the 95 % bounds on the member mass of near (rel A-C) and far (D, E)
        cells without a member found, as fractions of the preimage's mass (plus that bound)."""
        n = self.n[q]
        k = np.bincount(np.asarray(self.member_cells[q], dtype=np.int64), minlength=NCELLS)
        mass = float((MASS * k / np.maximum(n, 1)).sum())
        zero = FEASIBLE & (k == 0)
        near = missing_bound(zero & NEAR, n)
        far = missing_bound(zero & ~NEAR, n)
        return mass, near / (mass + near) if mass + near else 1.0, far / (mass + far) if mass + far else 1.0

    def support(self, q: int) -> np.ndarray:
        """The cells where query q's members may be found in numbers: of every rel holding a member or sharing two
        letters with the query's (PILOT), every count, at the members' lengths and SPAN either side. Each gets FLOOR
        draws before the shares are trusted: otherwise the cells whose members a few pilot draws met (or missed) by
        chance decide the allocation, and the standard error does not see a cell whose members were all missed (two
        truths of one query differed by 4.5 of their standard errors, and both from a 10x larger one, before this)."""
        cells = np.asarray(self.member_cells[q], dtype=np.int64)
        out = np.zeros(NCELLS, bool)
        if not len(cells):
            return out
        L = cells // NREL // 10
        rels = np.union1d(cells % NREL, list(PILOT))
        h = np.arange(NCELLS)
        hl = h // NREL // 10
        return FEASIBLE & np.isin(h % NREL, rels) & (hl >= L.min() - SPAN) & (hl <= L.max() + SPAN)

    def floor_left(self, q: int) -> int:
        """Draws query q's support still needs to reach FLOOR in every cell."""
        return int(np.maximum(0, FLOOR - self.n[q][self.support(q)]).sum())

    def plan(self, q: int, budget: int, explore: float = 0.3) -> dict[int, int]:
        """The next ``budget`` draws of query q: first FLOOR draws in every cell of its support (the largest cells
        first where the budget runs short); then most by Neyman allocation over the support (mass x sqrt(p(1 - p))
        of the cell's inside rate p, shrunk towards its rel's rate over the support by PRIOR draws, so a cell
        without a member found yet still gets draws where its rel has members), a share ``explore`` over the cells
        next to the ones with members outside the support, p then the rate of the cell's rel over all its draws
        (at most 0.5 / (n + 1)): members found in one cell of a rel point to its neighbours in length and count."""
        n = self.n[q]
        k = np.bincount(np.asarray(self.member_cells[q], dtype=np.int64), minlength=NCELLS)
        found = np.flatnonzero(k)
        if not len(found):
            return {}
        sup = self.support(q)
        need = np.where(sup, np.maximum(0.0, FLOOR - n), 0.0)
        alloc = np.zeros(NCELLS)
        if need.sum() > 0:
            for h in np.flatnonzero(need)[np.argsort(-MASS[need > 0])]:
                take = min(need[h], budget - alloc.sum())
                if take <= 0:
                    break
                alloc[h] = take
            budget -= int(alloc.sum())
            if budget <= 0:
                return {int(h): int(alloc[h]) for h in np.flatnonzero(alloc)}
        rel = np.arange(NCELLS) % NREL
        kr, nr = np.bincount(rel, k * sup, NREL), np.bincount(rel, n * sup, NREL)
        prior = (kr + 0.5) / (nr + 1)
        p = np.where(sup, (k + PRIOR * prior[rel]) / (n + PRIOR), 0.0)
        alloc += self._neyman(MASS * np.sqrt(p * (1 - p)), n, budget * (1 - explore))
        nb = np.zeros(NCELLS, bool)
        for h in found:
            nb[NEIGHBOURS[h]] = True
        nb &= (k == 0) & ~sup
        if nb.any():
            rate = (np.bincount(rel, k, NREL) + 0.5) / (np.bincount(rel, n, NREL) + 1)
            p0 = np.minimum(rate[rel], 0.5 / (n + 1))
            alloc += self._neyman(np.where(nb, MASS * np.sqrt(p0), 0.0), n * nb, budget * explore)
        return {int(h): int(alloc[h]) for h in np.flatnonzero(alloc)}

    @staticmethod
    def _neyman(score: np.ndarray, n: np.ndarray, budget: float) -> np.ndarray:
        """``budget`` more draws so that the cells' totals come as close as they can to proportional to ``score``."""
        if score.sum() == 0:
            return np.zeros(len(score))
        target = (n[score > 0].sum() + budget) * score / score.sum()
        deficit = np.maximum(0.0, target - n) * (score > 0)
        return np.floor(deficit * budget / deficit.sum())

    def pilot(self, q: int) -> dict[int, int]:
        """Draws in every cell of the rels that share two letters with the query's, most where all three."""
        return {h: PILOT[split(h)[2]] for h in np.flatnonzero(FEASIBLE) if split(h)[2] in PILOT}
