"""Find a query's epsilon-preimage under the task's input distribution (METHOD.md §7).

Generator draws (plain, and conditioned on the task's strata), Metropolis-Hastings chains whose every move is
reversible with respect to the generator (so every state is a verified member), and the closure of small preimages
through their members' neighbours and kin. What it finds goes to :mod:`inversionview.estimate` as
:class:`~inversionview.estimate.Chains`. docs/estimator.md describes these stages and why each is there.
"""

from __future__ import annotations

import logging
import math
import random
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from .estimate import Chains, coverage
from .settings import CHAINS  # chains per query, a reading's default (defined once, in settings)

log = logging.getLogger(__name__)

STEPS = 32  # moves per chain; the first half is burn-in for chains that start at the decoder's members (walk())
GLOBAL = 0.15  # share of moves that are fresh draws from the generator
DRAWS = 256  # inputs drawn from the generator per query and round before the chains start
BATCH = 1024  # generator draws per forward pass of the probed model
CACHE_MB = 256  # the draws' activations kept for the next readings, at most (_Drawn)
POOLS = 2**20  # the finer strata's draws (texts) kept for the next readings, at most (_Drawn.pool)
STARTS = 0.25  # the share of chains that must start at distinct exact draws before the draws stop
RELAX = 2.0  # where few draws land inside, the chains walk the preimage at RELAX * epsilon and keep their states inside
CLOSE_AT = 512  # members met up to which a reading closes its preimage (_close)
CLOSURE = 16384  # verifications per query at most for the closure of a small preimage (_close)
NEAR_CLOSURE = 0.5  # verifications of near misses' neighbours per closure, at most, in CLOSUREs (_around_near)
KIN_AT = 32  # members met up to which a closure first verifies the members' kin (_around_kin)
KIN = 8192  # kin verifications per query at most
IID = 256  # generator draws inside epsilon a query draws for, at most IID_DRAWS draws (_more)
IID_DRAWS = 8192
REFINE = 4  # finer strata a query with too few exact starts draws in first, at most (_draw_fine; 0: none)
FINE_IN = 32  # draws inside a finer stratum holding members draws for (doubling), within the task's draws
LEAK, LEAK_BLOCKS = 16, 8  # finer strata's members whose Gibbs blocks test that the preimage stays in (_leaks)
LEAK_ROUNDS = 3  # a level's strata the preimage leaks into are drawn too and checked again, so many rounds
FINE_FIRST = 16  # finer strata a level's first round draws in at most, the nearest first (_draw_fine)
FINE_DRAWS = 4  # draws in a level's finer strata per query at most, in the task's draws (_draw_level)
SPREAD = 4  # a level whose strata the members known fall in this many times a coarser level's is passed (_wide)


@dataclass
class Walk:
    """The chains on one query's preimage: every distinct member met (text -> (distance, arg-min position)),
    the states kept after burn-in, one list per distinct start (the chains that began there, one after the
    other), and how many moves were proposed and accepted."""

    members: dict[str, tuple[float, int]] = field(default_factory=dict)
    states: Chains = field(default_factory=lambda: Chains())
    proposed: int = 0
    accepted: int = 0
    level: float = 0.0  # the distance the chains walked within: epsilon, or RELAX * epsilon (walk())
    exact: bool = True  # the chains started at exact generator draws (False: at the decoder's members)

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.proposed)


def can_explore(task) -> bool:
    """Whether ``task`` defines moves (built-in tasks with a generator)."""
    from .tasks import Task

    return task is not None and type(task).propose is not Task.propose


@torch.no_grad()
def walk(
    probed,
    task,
    site,
    zq: torch.Tensor,
    starts: list[list[str]],
    epsilon: float,
    metric: str,
    chains: int = CHAINS,
    steps: int | None = None,
    draws: int | None = None,
    seed: int = 0,
) -> list[Walk]:
    """Run ``chains`` chains per query (``zq`` (Q, d)) for ``steps`` moves. Each query first verifies inputs from
    the generator, ``draws`` at a time (:func:`_draw_inside`): those inside are exact draws from its preimage and
    start the chains, which are then stationary from the first move: every state is kept. Only where none lands
    inside do the chains start from the members among ``starts[q]`` (e.g. the decoder's, which the chains must then
    walk away from: the first half of the moves is burn-in). A query left with no member gets an empty walk. All
    queries' proposals are verified together, in batches. ``steps`` and ``draws`` default to STEPS and DRAWS."""
    steps, draws = STEPS if steps is None else steps, DRAWS if draws is None else draws
    rng = random.Random(seed)
    seen: list[dict[str, tuple[float, int]]] = [{} for _ in starts]  # per query: text -> (distance, arg-min)
    starts = [[x for x in dict.fromkeys(st) if task.propose(x, random.Random(0))] for st in starts]  # valid inputs
    _check(probed, site, zq, seen, [(q, x) for q, st in enumerate(starts) for x in st], metric)
    relaxed = RELAX * epsilon
    near, fresh = _draw_inside(probed, task, site, zq, seen, epsilon, relaxed, metric, rng, draws, chains)
    _draw_strata(probed, task, site, zq, seen, near, fresh, epsilon, relaxed, metric, seed, draws, chains)
    _draw_fine(probed, task, site, zq, seen, near, epsilon, relaxed, metric, seed, draws, chains)
    keys: dict[str, tuple] = {}  # text -> its stratum keys (_cell); began: per query the starts, level and burn-in
    began = [
        _start(task, near[q], fresh, g, seen[q], epsilon, relaxed, chains, steps, rng, keys)
        for q, g in enumerate(starts)
    ]
    state = [list(st) for st, _, _ in began]  # the chains' current states
    walks = [Walk(states=Chains([] for _ in st), level=lv) for st, lv, _ in began]
    found: list[dict[str, int]] = [{} for _ in starts]  # per query: member -> times a proposal found it inside
    for step in range(steps):
        props = [[_proposal(task, x, rng) for x in st] for st in state]  # each a list: one text, or a Gibbs block
        todo = [(q, y) for q, ps in enumerate(props) for p in ps for y in p if y not in seen[q]]
        _check(probed, site, zq, seen, todo, metric)
        for q, (st, ps) in enumerate(zip(state, props)):
            w = walks[q]
            w.proposed += len(ps)
            for c, p in enumerate(ps):
                ok = [y for y in p if seen[q][y][0] <= w.level]
                if step >= began[q][2]:  # the other members the proposals find inside epsilon, with multiplicity
                    for y in p:
                        if y != st[c] and seen[q][y][0] <= epsilon:
                            found[q][y] = found[q].get(y, 0) + 1
                if ok:  # a Metropolis move is accepted iff inside; a Gibbs block moves uniformly among its inside
                    y = rng.choice(ok)
                    w.accepted += y != st[c]
                    st[c] = y
                if step >= began[q][2] and seen[q][st[c]][0] <= epsilon:  # a relaxed chain's states inside epsilon
                    w.states[c].append(st[c])
    closed = _close(probed, task, site, zq, seen, epsilon, metric)
    for q, (w, (st, _, burn), c) in enumerate(zip(walks, began, closed)):
        iid = Counter(x for x in fresh[: near[q].plain] if seen[q][x][0] <= epsilon) - Counter(set(st))
        _finish(w, task, seen[q], st, burn, found[q], epsilon, c, list(iid.elements()))
    return walks


def _close(probed, task, site, zq, seen: list[dict], epsilon: float, metric: str) -> list[bool]:
    """Close each small preimage: for each query that met at most CLOSE_AT members, verify every neighbour
    (:meth:`~inversionview.tasks.Task.neighbours`) of every member met, then of the new members among them, until
    none turns up (the query's preimage is *closed*: every member one part away from a member met is met) or
    CLOSURE inputs are verified. Returns per query whether it closed. A preimage in pieces no move connects
    (addition's head a0.2) has pieces the members met do not reach; the near misses the reading verified (within
    RELAX * epsilon) lie around them, so the neighbours of the nearest are verified first, NEAR_CLOSURE * CLOSURE
    of them at most (:func:`_around_near`; beside the CLOSURE of the members'), and the members among them start
    pieces of their own. (Closing *through* the near misses, their neighbours' neighbours and on, did not close
    `294+381=675` at head a0.2 within CLOSURE.) Where at most KIN_AT members are known by then, their kin
    (:meth:`~inversionview.tasks.Task.kin`, inputs that keep what the answer is read from) is verified too, KIN
    inputs at most (:func:`_around_kin`): a member may lie many parts away from every input near the preimage."""
    from .tasks import Task

    if type(task).neighbours is Task.neighbours:
        return [False] * len(seen)
    frontier = [[x for x, v in sq.items() if v[0] <= epsilon] for sq in seen]
    frontier = [f if len(f) <= CLOSE_AT else [] for f in frontier]
    around = [_around_near(task, sq, epsilon) if f else [] for sq, f in zip(seen, frontier)]
    _check(probed, site, zq, seen, [(q, y) for q, ys in enumerate(around) for y in ys], metric)
    frontier = [f + [y for y in ys if seen[q][y][0] <= epsilon] for q, (f, ys) in enumerate(zip(frontier, around))]
    kin = [_around_kin(task, sq, f) if len(f) <= KIN_AT else [] for sq, f in zip(seen, frontier)]
    _check(probed, site, zq, seen, [(q, y) for q, ys in enumerate(kin) for y in ys], metric)
    frontier = [f + [y for y in ys if seen[q][y][0] <= epsilon] for q, (f, ys) in enumerate(zip(frontier, kin))]
    closed, spent, done = [bool(f) for f in frontier], [0] * len(seen), [set(f) for f in frontier]
    while any(frontier):
        todo = []
        for q, f in enumerate(frontier):
            near = list(dict.fromkeys(y for x in f for y in task.neighbours(x)))
            new = [y for y in near if y not in seen[q]]
            if spent[q] + len(new) > CLOSURE:
                closed[q], near = False, []
            spent[q] += len(new) if near else 0
            todo += [(q, y) for y in new] if near else []
            frontier[q] = near
        _check(probed, site, zq, seen, todo, metric)
        for q, f in enumerate(frontier):
            frontier[q] = [y for y in f if seen[q][y][0] <= epsilon and y not in done[q]]
            done[q].update(frontier[q])
    return closed


def _around_near(task, seen: dict, epsilon: float) -> list[str]:
    """The unverified neighbours of a query's near misses (verified, outside epsilon, within RELAX * epsilon), the
    nearest misses' first, at most NEAR_CLOSURE * CLOSURE of them."""
    out: dict[str, None] = {}
    for _, x in sorted((v[0], x) for x, v in seen.items() if epsilon < v[0] <= RELAX * epsilon):
        new = [y for y in task.neighbours(x) if y not in seen and y not in out]
        if len(out) + len(new) > NEAR_CLOSURE * CLOSURE:
            break
        out.update(dict.fromkeys(new))
    return list(out)


def _around_kin(task, seen: dict, members: list[str]) -> list[str]:
    """The unverified kin (:meth:`~inversionview.tasks.Task.kin`) of a query's members, at most KIN of them: a
    member whose kin would pass KIN is passed over."""
    out: dict[str, None] = {}
    for x in members:
        new = [y for y in task.kin(x) if y not in seen and y not in out]
        if len(out) + len(new) <= KIN:
            out.update(dict.fromkeys(new))
    return list(out)


def _finish(
    w: Walk, task, seen: dict, starts: list[str], burn: int, found: dict, epsilon: float, closed: bool, iid: list[str]
) -> None:
    """Group a walk's states by start, and record its members, their weights and the chains' coverage. Chains that
    share a start are not independent: each start's chains count as one (chain c began at ``starts[c]``). Chains
    that began at the decoder's members (look-alikes of the query) are one start in all."""
    w.exact = burn == 0
    by: dict[str, list[int]] = {}
    for c, x in enumerate(starts):
        by.setdefault(x if w.exact else "", []).append(c)
    w.members = {x: v for x, v in seen.items() if v[0] <= epsilon}
    w.states = Chains(
        [[x for c in cs for x in w.states[c]] for cs in by.values()],
        [(x, task.weight(x)) for x in w.members],
        1.0 if closed else coverage(found.values()),
        iid,
    )


def _start(
    task, near: _Near, fresh: list[str], given, seen, epsilon, relaxed, chains: int, steps: int, rng, keys: dict
) -> tuple[list[str], float, int]:
    """A query's chains' start states, the distance they walk within (:func:`_level`) and their burn-in: none from
    exact draws; from the members among ``given`` (the decoder's) where no draw landed inside, half the moves.
    Distinct starts are spread over the chains in turn (chain c starts at start c % k); where strata were drawn
    apart, in proportion to each stratum's mass (:func:`_allocate`)."""
    lv, pick = _level(near.texts, seen, epsilon, relaxed, chains)
    burn = 0 if pick else steps // 2
    if pick and (near.strata or near.fine):
        return _allocate(task, near, fresh, pick, chains, rng, keys), lv, burn
    # exact draws alone where there are any: the decoder's members are look-alikes of the query, and chains
    # started there stay near them (a few exact starts give a wide interval, not a biased share)
    pick = pick or [x for x in given if seen[x][0] <= epsilon]
    st = rng.sample(pick, min(len(pick), chains))
    return (st * chains)[:chains], lv, burn


def _level(near: list[str], seen: dict, epsilon: float, relaxed: float, chains: int) -> tuple[float, list[str]]:
    """The distance a query's chains walk within, and their starts among the generator draws ``near`` (inside
    ``relaxed``): epsilon where STARTS of the chains can start inside it; ``relaxed`` where fewer can but at least a
    quarter of the relaxed draws are inside epsilon (so the relaxed chains keep enough states); else epsilon."""
    inside = [x for x in near if seen[x][0] <= epsilon]
    if _enough(chains) > len(inside) >= max(1, len(near) / 4):
        return relaxed, near
    return epsilon, inside


def _enough(chains: int) -> int:
    """Exact starts enough to stop drawing: STARTS of the chains."""
    return max(1, int(chains * STARTS))


@dataclass
class _Near:
    """A query's generator draws inside the relaxed level (``texts``), and how they were drawn: ``plain`` draws
    from the generator, and per stratum drawn apart (:func:`_draw_strata`) its probability and its draws, the
    plain ones in it included; and the same for the finer strata drawn apart (:func:`_draw_fine`)."""

    texts: list[str]
    plain: int = 0
    strata: dict = field(default_factory=dict)  # stratum -> (probability, its draws (shared), how many this query met)
    fine: dict = field(default_factory=dict)  # finer stratum (Task.refine) -> the same
    level: int = 0  # the level of its finer strata (Task.refine)

    def __post_init__(self):
        self._have = set(self.texts)

    def add(self, texts: list[str]) -> None:
        """Add the ``texts`` not yet among :attr:`texts` (in time linear in ``texts``, not in :attr:`texts`: a rare
        reading adds its finer strata's draws a few hundred at a time to tens of thousands)."""
        for x in texts:
            if x not in self._have:
                self._have.add(x)
                self.texts.append(x)

    def drop(self, texts: set[str]) -> None:
        """Remove ``texts`` from :attr:`texts`."""
        self.texts = [x for x in self.texts if x not in texts]
        self._have -= texts


def _draw_inside(
    probed,
    task,
    site,
    zq,
    seen,
    epsilon: float,
    relaxed: float,
    metric: str,
    rng: random.Random,
    draws: int,
    chains: int,
) -> tuple[list[_Near], list[str]]:
    """Per query, the distinct generator draws that land inside ``relaxed`` (exact draws from the relaxed
    preimage; those inside ``epsilon`` are exact draws from the preimage). Draws come in rounds (``draws``, then as
    many as drawn so far), until STARTS of the chains can start inside epsilon or the task's
    :attr:`~inversionview.tasks.Task.draws` are spent. The queries
    still drawing share each round's draws: the probed model runs once per draw, whatever the number of queries
    (each query's draws are still independent draws from the generator); a round drawn before at this site, by a
    reading with the same seed, is not run again (:class:`_Drawn`)."""
    fresh: list[str] = []
    near = [_Near([]) for _ in seen]
    need = list(range(len(seen))) if draws > 0 else []
    rounds = _DRAWN.get(probed, site) if need else {}
    while need:
        new = [task.generate(rng) for _ in range(max(draws, min(len(fresh), task.draws - len(fresh))))]
        start, fresh = len(fresh), fresh + new
        acts = _DRAWN.activations(probed, site, rounds, start, new)
        for q in need:
            _record(seen[q], new, acts, zq[q], metric)
            near[q] = _Near([x for x in dict.fromkeys(fresh) if seen[q][x][0] <= relaxed], len(fresh))
        need = [q for q in need if _more(seen[q], near[q].texts, fresh, epsilon, task, draws, chains)]
    return near, fresh


def _more(seen: dict, near: list[str], fresh: list[str], epsilon: float, task, draws: int, chains: int) -> bool:
    """Whether a query with generator draws ``fresh`` (``near``: the distinct ones within the relaxed level) draws
    another round: until STARTS of the chains can start at distinct draws inside or the task's draws are spent, then
    on until IID draws inside or IID_DRAWS draws (the draws inside are independent members that join the share,
    :func:`share`)."""
    if len(fresh) >= max(draws, task.draws):
        return False
    if sum(seen[x][0] <= epsilon for x in near) < _enough(chains):
        return True
    return len(fresh) < IID_DRAWS and sum(seen[x][0] <= epsilon for x in fresh) < IID


def _draw_strata(
    probed, task, site, zq, seen, near: list[_Near], fresh, epsilon, relaxed, metric: str, seed: int, draws: int, chains
) -> None:
    """Draw apart in the strata (:meth:`~inversionview.tasks.Task.stratum`) of the members each query knows (the
    decoder's, the generator draws' ``fresh``) and of its near misses (within ``relaxed``, where members of a stratum
    no member is known in often lie): rounds of ``draws`` from the generator conditioned on the stratum, one stratum
    after the other, each doubling, until STARTS of the chains can start inside epsilon in that stratum, or the
    query's strata have spent the task's draws; a near misses' stratum with none inside goes on as long as a
    stratum with members does (a stratum the chains reach but too few draws to see it would be left out). Each stratum's draws are exact draws from its part of the preimage, and :func:`_allocate` weighs the
    strata by them: a share that varies between strata (counting's length) then rests on each stratum's draws, not
    on the few plain draws that happen to land inside. Queries needing a stratum share its draws, which are seeded
    by the reading's seed and the stratum (so cached as the plain draws, :class:`_Drawn`)."""
    if draws <= 0:
        return
    need: dict = {}  # stratum -> the queries drawing in it
    known: list[set] = []  # per query: the strata of its members known
    for q, sq in enumerate(seen):
        known.append({task.stratum(x) for x, (d, _) in sq.items() if d <= epsilon} - {None})
        for st in known[q] | {task.stratum(x) for x, (d, _) in sq.items() if d <= relaxed} - {None}:
            need.setdefault(st, set()).add(q)
    if not need:
        return
    rounds, spent = _DRAWN.get(probed, site), dict.fromkeys(range(len(seen)), 0)
    pools: dict = {st: [] for st in need}  # stratum -> its draws so far
    gen = {st: random.Random(f"{seed}:{st[0]}") for st in need}
    while need:  # a round in each stratum in turn: a stratum whose draws rarely land inside does not starve the rest
        for (key, prob), qs in list(need.items()):
            pool = pools[key, prob]
            new = [task.generate_in(key, gen[key, prob]) for _ in range(max(draws, len(pool)))]
            acts = _DRAWN.activations(probed, site, rounds, (key, len(pool)), new)
            pool += new
            for q in qs:
                _record(seen[q], new, acts, zq[q], metric)
                n = near[q]
                n.add([x for x in new if seen[q][x][0] <= relaxed])
                n.strata[key] = (prob, pool, len(pool))
                spent[q] += len(new)
        inside = {
            (st, q): sum(seen[q][x][0] <= epsilon and task.stratum(x) == st for x in near[q].texts)
            for st, qs in need.items()
            for q in qs
        }
        more = {  # a stratum with members goes on until STARTS of the chains can start there
            (st, q)
            for (st, q), c in inside.items()
            if spent[q] < task.draws and (c or st in known[q]) and c < _enough(chains)
        }
        going = {q for _, q in more}  # a near misses' stratum with none inside yet goes on beside them
        more |= {(st, q) for (st, q), c in inside.items() if not c and st not in known[q] and q in going}
        need = {st: qs & {q for s2, q in more if s2 == st} for st, qs in need.items()}
        need = {st: qs for st, qs in need.items() if qs}


def _draw_fine(
    probed, task, site, zq, seen, near: list[_Near], epsilon, relaxed, metric: str, seed: int, draws: int, chains: int
) -> None:
    """Where the strata drawn so far left a query fewer exact draws inside than STARTS of its chains (a preimage that
    keeps what the generator rarely draws: counting's letters at the target character), draw apart in finer strata
    (:meth:`~inversionview.tasks.Task.refine`), the finest level first (:func:`_draw_level`), its first round in
    FINE_FIRST strata at most. Where the preimage leaks out of a level's strata (:func:`_leaks`), the strata it
    leaks into are drawn too and the level tested again, LEAK_ROUNDS rounds at most (head 0.0 at the target of
    `ppgsspspspspp|p:7` read length 13 at 0.81 against a true 0.29 when a leak into one stratum more dropped its
    level). Where it still leaks, the query's finer strata are dropped and it draws a level coarser (counting: head
    0.0 at the target keeps the other two letters, not the target's name), until a level holds it or the task has
    no coarser one. Before any is drawn, the Gibbs blocks of the members known are verified
    (:func:`_around_members`), and a level whose strata those members fall in many times more of than a coarser
    level's is passed without drawing (:func:`_wide`)."""
    from .tasks import Task

    if draws <= 0 or not REFINE or type(task).refine is Task.refine:
        return
    qs = [q for q, sq in enumerate(seen) if sum(sq[x][0] <= epsilon for x in near[q].texts) < _enough(chains)]
    _around_members(probed, task, site, zq, seen, qs, epsilon, metric, seed)
    level = 0
    memo: dict[tuple[str, int], object] = {}  # (text, level) -> its finer stratum (Task.refine), once per reading
    wide = {q: _wide(task, seen[q], epsilon, memo) for q in qs}  # the levels each query passes
    while qs:
        for q in qs:
            near[q].level = level
        out = [q for q in qs if level in wide[q]]
        todo, r = [q for q in qs if q not in out], 0
        while todo:  # the first round in the FINE_FIRST nearest strata only
            cap = FINE_FIRST if r == 0 else None
            _draw_level(probed, task, site, zq, seen, near, todo, epsilon, relaxed, metric, seed, draws, memo, cap)
            leaked = _leaks(probed, task, site, zq, seen, near, todo, epsilon, metric, f"{seed}:{r}")
            out += [q for q in leaked if r == LEAK_ROUNDS - 1]
            todo, r = [q for q in leaked if q not in out], r + 1  # the strata it leaks into are drawn too
        held = [q for q in qs if q not in out]  # and every member's stratum the first round left out
        _draw_level(probed, task, site, zq, seen, near, held, epsilon, relaxed, metric, seed, draws, memo)
        for q in out:  # still leaking: the level's strata do not hold the preimage
            drawn = {x for _, pool, m in near[q].fine.values() for x in pool[:m]}
            near[q].drop(drawn)
            near[q].fine = {}
        qs, level = out, level + 1


def _around_members(probed, task, site, zq, seen, qs: list[int], epsilon: float, metric: str, seed) -> None:
    """Verify the alternatives of LEAK_BLOCKS Gibbs blocks (:meth:`~inversionview.tasks.Task.block`) of LEAK members
    each query of ``qs`` knows (the query itself among them), before its finer strata are drawn: the members among
    them show how wide the preimage spreads over a level's strata (:func:`_wide`)."""
    rng = random.Random(f"{seed}:around")
    todo = []
    for q in qs:
        alts = _alternatives(task, sorted(x for x, (d, _) in seen[q].items() if d <= epsilon), rng)
        todo += [(q, y) for y in alts if y not in seen[q]]
    _check(probed, site, zq, seen, todo, metric)


def _alternatives(task, members: list[str], rng: random.Random) -> list[str]:
    """The alternatives of LEAK_BLOCKS Gibbs blocks (:meth:`~inversionview.tasks.Task.block`) of each of LEAK
    ``members`` drawn at random (:func:`_around_members`, :func:`_leaks`)."""
    return [
        y
        for x in rng.sample(members, min(LEAK, len(members)))
        for _ in range(LEAK_BLOCKS)
        for y in task.block(x, rng) or []
    ]


def _wide(task, seen: dict, epsilon: float, memo: dict) -> set[int]:
    """The levels of finer strata a query passes: those whose strata its members known so far (the query's, the
    decoder's, the draws' and their Gibbs blocks' alternatives, :func:`_around_members`) fall in more than SPREAD
    times as many as in a coarser level's. The preimage then spreads over what the level tells apart and
    concentrates in what the coarser level keeps, and drawing the level would spend its draws for a leak test to
    drop it: counting's head 1.0 at the target of `lylllzlllzl|y:1`, whose members fell in 93, 54, 30 and 11
    strata of levels 0-3, drew 32,768 inputs in each of levels 0-2 before level 3 held it. Head 0.0 at the target
    of `ppgsspspspspp|p:7` (45, 18, 41 and 15 strata) draws every level: its level 1 holds it, and level 0's draws
    show level 1 which of its strata to draw."""
    spread = []
    for level in range(8):
        cells = {f[0] for x, (d, _) in seen.items() if d <= epsilon and (f := _refined(task, x, level, memo))}
        if not cells:
            break
        spread.append(len(cells))
    return {lv for lv, k in enumerate(spread) if any(k > SPREAD * c for c in spread[lv + 1 :])}


def _draw_level(
    probed, task, site, zq, seen, near: list[_Near], qs, epsilon, relaxed, metric: str, seed, draws: int, memo, cap=None
) -> None:
    """Draw the queries ``qs`` apart in finer strata of their level: those of their members and of their nearest
    misses (REFINE at most, the nearest first), then those around (:meth:`~inversionview.tasks.Task.around`) each finer
    stratum whose draws hold members, until none is left or the query has spent FINE_DRAWS times the task's draws: a
    preimage that spreads over neighbouring lengths and counts is then drawn in each of them, where the chains alone
    stay near the decoder's members. ``draws`` a finer stratum, shared by the queries that need it and seeded by the
    reading's seed, the level and the stratum."""
    todo: dict[int, dict] = {}  # per query: finer stratum -> its probability, still to draw
    for q in qs:
        level = near[q].level
        near_ones = sorted((d, x) for x, (d, _) in seen[q].items() if d <= relaxed)
        fine = [(d, f) for d, f in ((d, _refined(task, x, level, memo)) for d, x in near_ones) if f is not None]
        todo[q] = dict(list(dict(f for _, f in fine).items())[:REFINE])  # the nearest, and every member's: a
        todo[q].update(f for d, f in fine if d <= epsilon)  # member in no cell drawn apart would weigh its cell
        todo[q] = dict([(k, p) for k, p in todo[q].items() if k not in near[q].fine][:cap])  # (not drawn before)
    rounds = _DRAWN.get(probed, site)
    spent, budget = {q: sum(v[2] for v in near[q].fine.values()) for q in qs}, FINE_DRAWS * task.draws
    pools: dict = {}  # (level, finer stratum) -> its draws in this call
    while any(todo.values()):
        need: dict = {}
        for q, t in todo.items():
            for key, prob in t.items():
                need.setdefault((near[q].level, key, prob), []).append(q)
            todo[q] = {}
        for (level, key, prob), qs_ in need.items():
            qs_ = [q for q in qs_ if spent[q] < budget]  # per level, at most (and a round)
            if not qs_:
                continue
            pool = pools.setdefault((level, key), [])
            start = min(near[q].fine.get(key, (0, 0, 0))[2] for q in qs_)
            if start == len(pool):  # a round more: as many as drawn so far (doubling)
                gen, made = _DRAWN.pool(task, f"{seed}:fine:{level}:{key}")
                end = len(pool) + max(draws, len(pool))
                made += [task.generate_in(key, gen) for _ in range(end - len(made))]
                pool += made[len(pool) : end]
            new = pool[start:]
            acts = _DRAWN.activations(probed, site, rounds, ("fine", level, key, start), new)
            for q in qs_:
                _record(seen[q], new, acts, zq[q], metric)
                n = near[q]
                n.add([x for x in new if seen[q][x][0] <= relaxed])
                n.fine[key] = (prob, pool, len(pool))
                spent[q] += len(new)
                k = sum(seen[q][x][0] <= epsilon for x in pool)
                if k and spent[q] < budget:  # members: draw around, and here again until FINE_IN inside
                    todo[q].update((f, p) for f, p in task.around(key) if f not in n.fine)
                    todo[q].update([(key, prob)] if k < FINE_IN else [])


def _leaks(probed, task, site, zq, seen, near: list[_Near], qs: list[int], epsilon: float, metric: str, seed) -> dict:
    """The queries of ``qs`` whose preimage leaks out of their finer strata, each with the strata it leaks into: of
    LEAK members in a query's finer strata, verify the alternatives of LEAK_BLOCKS Gibbs blocks each
    (:meth:`~inversionview.tasks.Task.block`; counting: the target among the letters, a letter under each other
    name) that fall in no finer stratum drawn; where one is inside epsilon, the preimage reaches strata the finer
    draws did not weigh (counting's head 0.0 at the target: the target's name is free), and a share resting on the
    finer strata would take them for the whole preimage (0.70 against a true 0.14) (:func:`_draw_fine`)."""
    rng = random.Random(f"{seed}:leaks")
    todo = []
    for q in qs:
        n = near[q]
        drawn = {x for _, pool, m in n.fine.values() for x in pool[:m]}
        alts = _alternatives(task, sorted({x for x in drawn if seen[q][x][0] <= epsilon}), rng)
        todo += [(q, y) for y in alts if _keys(task, y, {}, n.level)[1] not in n.fine and y not in seen[q]]
    _check(probed, site, zq, seen, todo, metric)
    leaked: dict[int, set] = {}
    for q, y in dict.fromkeys(todo):
        if near[q].fine and seen[q][y][0] <= epsilon:
            leaked.setdefault(q, set()).add(_keys(task, y, {}, near[q].level)[1])
    for q, cells in leaked.items():
        log.debug(
            "the preimage leaks out of its finer strata (level %d) into %d more: %s",
            near[q].level,
            len(cells),
            sorted(cells)[:4],
        )
    return leaked


def _allocate(
    task, near: _Near, fresh: list[str], pick: list[str], chains: int, rng: random.Random, keys: dict
) -> list[str]:
    """The chains' starts among the draws ``pick`` where strata were drawn apart: the chains split between the cells
    in proportion to their estimated mass in the preimage (:func:`_apportion`), each chain's start among its cell's
    draws, distinct until they run out (then repeated: such chains count as one start). The cells part the input
    space: each finer stratum drawn apart, each stratum drawn apart less its finer ones, and the rest. A cell's mass
    is its probability times the share of the draws that fell in it (plain, a stratum's or a finer one's: each is a
    draw from the generator given the cell) that are in ``pick``, counted with their multiplicity (a finer stratum
    holds few inputs, and its draws repeat them)."""
    prob: dict[object, float] = {("fine", k): v[0] for k, v in near.fine.items()}
    coarse = {k: _keys(task, v[1][0], keys, near.level)[0] for k, v in near.fine.items()}  # its stratum
    for k, v in near.strata.items():
        prob["stratum", k] = v[0] - sum(near.fine[f][0] for f in near.fine if coarse[f] == k)
    prob[None] = 1 - sum(prob.values())
    inside, n, k_in, groups = set(pick), Counter[object](), Counter[object](), dict[object, list[str]]()
    pools = [fresh[: near.plain]] + [v[1][: v[2]] for v in (*near.strata.values(), *near.fine.values())]
    for xs in pools:
        for x in xs:
            c = _cell(task, near, x, keys)
            n[c] += 1
            k_in[c] += x in inside
    for x in pick:
        groups.setdefault(_cell(task, near, x, keys), []).append(x)
    cells = list(groups)
    mass = [max(prob[c], 0.0) * k_in[c] / n[c] for c in cells]
    if not sum(mass):
        mass = [len(groups[c]) for c in cells]
    starts = []
    for c, m in zip(cells, _apportion(mass, chains)):
        xs = rng.sample(groups[c], min(m, len(groups[c])))
        starts += (xs * m)[:m]
    return starts


def _refined(task, x: str, level: int, memo: dict):
    """``task.refine(x, level)``, asked once per text and level (``memo``)."""
    if (x, level) not in memo:
        memo[x, level] = task.refine(x, level)
    return memo[x, level]


def _keys(task, x: str, keys: dict, level: int) -> tuple:
    """``x``'s stratum key and finer stratum key at ``level`` (None where it has none), computed once per text and
    level (``keys``)."""
    if (x, level) not in keys:
        s, f = task.stratum(x), task.refine(x, level)
        keys[x, level] = (s[0] if s else None, f[0] if f else None)
    return keys[x, level]


def _cell(task, near: _Near, x: str, keys: dict):
    """The cell ``x`` falls in (:func:`_allocate`): its finer stratum if drawn apart, else its stratum if drawn
    apart, else None (the rest)."""
    s, f = _keys(task, x, keys, near.level)
    if f is not None and f in near.fine:
        return "fine", f
    return ("stratum", s) if s is not None and s in near.strata else None


def _apportion(mass: list[float], seats: int) -> list[int]:
    """``seats`` split in proportion to ``mass`` by largest remainders (Hamilton): each part within one seat of its
    exact quota. A random split (each chain's stratum drawn) would add to a share's error the spread of a
    multinomial draw, about 0.06 at 64 chains for a stratum holding half the mass."""
    quota = [seats * m / sum(mass) for m in mass]
    out = [math.floor(x) for x in quota]
    for i in sorted(range(len(mass)), key=lambda i: out[i] - quota[i])[: seats - sum(out)]:
        out[i] += 1
    return out


class _Drawn:
    """The probed model's activations at a site for the generator draws of recent readings, by round: the draws
    are the first use of a reading's seeded generator, so readings with the same seed at the same site draw the
    same inputs, and a reading after the first pays only for the distances (a round is reused only where its
    texts are identical). It holds at most CACHE_MB: the sites read least recently go first, and a round that
    does not fit beside the current site's earlier rounds is not kept (a small preimage's reading at an addition
    site draws up to 32,768 inputs, whose activations take 0.05 GiB)."""

    def __init__(self):
        self.entries: OrderedDict[tuple[int, str], tuple[weakref.ref, dict]] = OrderedDict()
        self.pools: OrderedDict[tuple[str, str], tuple[random.Random, list[str]]] = OrderedDict()  # (pool())

    def get(self, probed, site) -> dict:
        key = (id(probed), site.name)
        hit = self.entries.get(key)
        if hit is None or hit[0]() is not probed:  # a model since freed whose id was reused is not a hit
            hit = self.entries[key] = (weakref.ref(probed), {})
        self.entries.move_to_end(key)
        return hit[1]

    def activations(self, probed, site, rounds: dict, start, texts: list[str]) -> list:
        """The site's activations of a round of draws (``rounds`` from :meth:`get`, ``start`` its key): from the
        cache where the same texts were drawn there before (the same seed at this site), else computed and kept."""
        if start in rounds and rounds[start][0] == texts:
            return rounds[start][1]
        acts = _activations(probed, site, texts)
        self.keep(rounds, start, texts, acts)
        return acts

    def pool(self, task, name: str) -> tuple[random.Random, list[str]]:
        """The generator seeded by ``name`` (a reading's seed, a level and a finer stratum) and the texts it drew
        so far for ``task``: a pool's i-th text is always the generator's i-th draw, so a later reading with the
        same seed extends the pool rather than drawing it again (a rare reading draws 100,000 texts in its finer
        strata). POOLS texts at most are kept, the pools used least recently dropped first."""
        key = (type(task).__name__, name)
        if key not in self.pools:
            while self.pools and sum(len(p) for _, p in self.pools.values()) > POOLS:
                self.pools.popitem(last=False)
            self.pools[key] = (random.Random(name), [])
        self.pools.move_to_end(key)
        return self.pools[key]

    def keep(self, rounds: dict, start, texts: list[str], acts: list) -> None:
        """Keep a round of the current site (``rounds`` from :meth:`get`) if it fits within CACHE_MB, making room
        by dropping the sites read least recently."""
        size = _nbytes(acts)
        while len(self.entries) > 1 and self.nbytes() + size > CACHE_MB * 2**20:
            self.entries.popitem(last=False)
        if self.nbytes() + size <= CACHE_MB * 2**20:
            rounds[start] = (texts, acts)

    def nbytes(self) -> int:
        return sum(_nbytes(a) for _, rounds in self.entries.values() for _, a in rounds.values())


def _nbytes(acts: list) -> int:
    return sum(t.numel() * t.element_size() for batch in acts for t in batch)


_DRAWN = _Drawn()


def _activations(probed, site, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The site's activations of ``texts`` in batches of BATCH: each batch's rows in ``texts``, its activations and
    its invalid positions (:func:`inversionview.verify.activations`)."""
    from .verify import activations

    return list(activations(probed, site, [probed.encode(x) for x in texts], BATCH))


def _record(seen: dict, texts: list[str], acts: list, zq, metric: str) -> None:
    """Record in ``seen`` each text's distance to ``zq`` and its arg-min position, as
    :func:`inversionview.verify.verify` computes them (``acts`` as :func:`_activations` returns them)."""
    from .probed import distances

    for rows, act, invalid in acts:
        dmin, amin = distances(zq.float(), act, metric).masked_fill(invalid, float("inf")).min(-1)
        for r, d, a in zip(rows.tolist(), dmin.tolist(), amin.tolist()):
            seen[texts[r]] = (d, a)


def _proposal(task, x: str, rng: random.Random) -> list[str]:
    """One move of a chain at ``x``: a fresh generator draw (probability GLOBAL), a Gibbs block (the task's share
    ``blocks``: every alternative verified, one inside taken), or the task's local move."""
    u = rng.random()
    if u < GLOBAL:
        return [task.generate(rng)]
    if u < GLOBAL + task.blocks:
        b = task.block(x, rng)
        if b:
            return b
    return [task.propose(x, rng)]


def _check(probed, site, zq, seen: list[dict], todo: list[tuple[int, str]], metric: str) -> None:
    """Verify the distinct (query, text) pairs of ``todo`` and record them in ``seen``."""
    from .verify import verify

    todo = list(dict.fromkeys(todo))
    if todo:
        dmin, amin, _ = verify(probed, site, [probed.encode(x) for _, x in todo], zq[[q for q, _ in todo]], metric)
        for (q, x), d, a in zip(todo, dmin.tolist(), amin.tolist()):
            seen[q][x] = (d, a)
