"""Feature consistency rates (FCR, from InverseScope; METHOD.md §5) and ``explain``: many readings at once.

The **FCR** of a feature at one site and position, over many queries, is the mean over queries of the share of
the query's preimage whose feature equals the query's: estimated under the task's input distribution from the
states of chains on the preimage (:mod:`inversionview.explore`) where the task has moves, over the data's members
under a data set (:mod:`inversionview.dataset`), else the share of the decoder's distinct in-epsilon samples. A
member whose feature is None counts as a mismatch; a query whose own feature is None is left out; a query with no
member is left out and counted (``empty``). The **baseline** is the same rate with random inputs of the task (or of
the data) in place of the in-epsilon samples, over the same queries: what the feature would score by chance.

:func:`explain` measures every feature at every site and query position of the task's rule (the paper's
Table 3, made automatic). A site *carries* a feature when FCR >= :data:`CARRIES` and FCR - baseline >=
:data:`MARGIN`; it carries it *partly* when FCR >= :data:`PARTLY` with the same margin.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .errors import UserError
from .features import Feature, resolve_features, value

CARRIES, PARTLY, MARGIN = 0.9, 0.6, 0.3
RULE = (
    f"a site carries a feature when FCR >= {CARRIES} and FCR - baseline >= {MARGIN}; "
    f"partly (~) when FCR >= {PARTLY} with the same margin"
)
BASELINE_INPUTS = 2048  # random task inputs for the baseline
POSITION_NAMES = {"counting": ("target", ":"), "addition": ("=", "A1", "A2", "A3"), "ioi": ("end", "S2")}


# ---------------------------------------------------------------------------------------------- preimages in batch
@torch.no_grad()
def preimages(
    iv,
    texts: list[str],
    site,
    positions: list[int],
    samples: int = 256,
    epsilon: float | None = None,
    seed: int = 0,
    chunk: int = 4096,
    chains: int | None = None,
) -> list[list[list[str]]]:
    """The members of many queries' preimages at one site (``positions[i]`` in ``texts[i]``), per query as chains of
    states. The decoder proposes ``samples`` candidates each (the Auto mix, as :func:`inversionview.preimage.read`),
    all verified in batches; where the task has moves, chains then walk each preimage from its members
    (:func:`inversionview.explore.walk`, all queries at once), and their states are draws from the preimage under
    the task's input distribution. Otherwise each distinct in-epsilon sample is a chain of one state."""
    from .explore import CHAINS, can_explore, walk

    probed = iv.probed
    s, si = iv.site_index(site)
    eps = iv.spec.epsilon if epsilon is None else float(epsilon)
    b = probed.batch([probed.encode(t) for t in texts])
    zq = probed.run(b.ids, [s])[s].float()[torch.arange(len(texts)), torch.tensor(positions)]
    ds = iv.dataset()
    if ds is not None:
        return _data_preimages(iv, s, zq, ds, eps, seed)
    seqs, owner = _propose_all(iv, si, zq, samples, seed, chunk)
    inside = _inside(iv, s, zq, seqs, owner, eps)
    chains = CHAINS if chains is None else chains
    if not (chains and can_explore(iv.task)):
        return [[[x] for x in xs] for xs in inside]
    walks = walk(
        probed,
        iv.task,
        s,
        zq,
        [xs + [t] for xs, t in zip(inside, texts)],
        eps,
        iv.spec.metric,
        chains=chains,
        seed=seed,
    )
    return [w.states for w in walks]


def _data_preimages(iv, s, zq: torch.Tensor, ds, eps: float, seed: int) -> list[list[list[str]]]:
    """Under a data set: each query's members within the data (exact: :mod:`inversionview.dataset`), as chains of one
    state, a member as many times as the data holds it; beyond :data:`~inversionview.dataset.KEEP` distinct members, a
    random sample of KEEP draws by weight."""
    import numpy as np

    from .dataset import KEEP, exact_members, scan

    index = iv.data_index(s, ds)
    dmin, amin = scan(index, zq, iv.spec.metric, len(ds.texts))
    rng = np.random.default_rng(seed)
    out = []
    for q in range(len(zq)):
        exact_members(iv.probed, s, ds, index, zq[q], dmin[q], amin[q], eps, iv.spec.metric)
        inside = (dmin[q] <= eps).nonzero()[:, 0].numpy()
        w = ds.weights[inside]
        if len(inside) > KEEP:
            picks = rng.choice(inside, size=KEEP, p=w / w.sum())
        else:
            picks = np.repeat(inside, w.astype(int))
        out.append([[ds.texts[i]] for i in picks.tolist()])
    return out


def _propose_all(
    iv, si: int, zq: torch.Tensor, samples: int, seed: int, chunk: int
) -> tuple[list[list[int]], list[int]]:
    """``samples`` decoder candidates (the Auto mix) for each query activation of ``zq`` (N, d), generated in chunks
    of ``chunk``, with the query each belongs to."""
    from .propose import AUTO_MIX
    from .verify import as_inputs

    probed, tok = iv.probed, iv.probed.tokenizer
    g = torch.Generator().manual_seed(seed)
    per = [samples // len(AUTO_MIX) + (k < samples % len(AUTO_MIX)) for k in range(len(AUTO_MIX))]
    zs, taus, owner = [], [], []
    for q in range(len(zq)):
        for n, (t, eta) in zip(per, AUTO_MIX):
            zs.append(zq[q].expand(n, -1) + torch.randn(n, zq.shape[1], generator=g).to(zq.device) * zq[q].std() * eta)
            taus += [t] * n
            owner += [q] * n
    z, tau = torch.cat(zs), torch.tensor(taus)
    seqs = []
    for i in range(0, len(z), chunk):
        zc = z[i : i + chunk]
        seqs += iv.decoder.generate(
            zc, torch.full((len(zc),), si), tok.bos_id, tok.eos_id, tau[i : i + chunk], probed.max_len, g
        )
    return as_inputs(seqs, tok), owner


def _inside(iv, s, zq: torch.Tensor, seqs: list[list[int]], owner: list[int], eps: float) -> list[list[str]]:
    """Per query: the texts of its distinct candidates within ``eps`` of its activation (verified in batches)."""
    from .verify import verify

    probed, tok = iv.probed, iv.probed.tokenizer
    uniq = list(dict.fromkeys((owner[i], tuple(x)) for i, x in enumerate(seqs)))
    dmin, _, _ = verify(probed, s, [list(x) for _, x in uniq], zq[torch.tensor([q for q, _ in uniq])], iv.spec.metric)
    inside: list[list[str]] = [[] for _ in range(len(zq))]
    for (q, x), d in zip(uniq, dmin.tolist()):
        if d <= eps:
            inside[q].append(tok.text(list(x)))
    return inside


# ---------------------------------------------------------------------------------------------- FCR
@dataclass(frozen=True)
class Consistency:
    """One feature's FCR at one site and position, with its baseline and what it was measured on."""

    feature: str
    site: str  # short name
    position: str  # the position's name in the task's rule
    fcr: float | None  # None when no query had a sample inside epsilon
    baseline: float | None
    queries: int  # queries measured (their own feature defined and some sample inside epsilon)
    empty: int  # queries with no sample inside epsilon (left out)
    samples: int  # distinct members over the measured queries
    low: float | None = None  # the FCR's 95% interval
    high: float | None = None

    @property
    def verdict(self) -> str:
        """'carries', 'partly' or '' by the rule :data:`RULE`."""
        if self.fcr is None:
            return ""
        assert self.baseline is not None  # measured with the FCR, over the same queries
        if self.fcr - self.baseline < MARGIN - 1e-9:
            return ""
        return "carries" if self.fcr >= CARRIES else "partly" if self.fcr >= PARTLY else ""

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def random_values(task, features: dict[str, Feature], n: int = BASELINE_INPUTS, seed: int = 0) -> dict[str, Counter]:
    """The value counts of each feature over ``n`` random inputs of the task, or of a data set (drawn by weight): the
    baseline's reference."""
    rng = random.Random(seed + 40_000)
    texts = _draw(task, n, rng)
    return {k: Counter(value(k, f, t) for t in texts) for k, f in features.items()}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def consistency(
    features: dict[str, Feature],
    queries: list[str],
    inside: list,
    reference: dict[str, Counter],
    site: str = "",
    position: str = "",
) -> list[Consistency]:
    """FCR and baseline of each feature over ``queries`` with their members ``inside``: per query, chains of states
    (:func:`preimages`) or a plain list of distinct samples (each a chain of one). The FCR's interval combines the
    queries' own 95% intervals."""
    from .estimate import Z, Chains, share

    out = []
    inside = [c if isinstance(c, Chains) else [[x] if isinstance(x, str) else x for x in c] for c in inside]
    empty = sum(not any(c) for c in inside)
    for k, f in features.items():
        rates, base, var, n = [], [], 0.0, 0
        total = sum(reference[k].values())
        for q, chains in zip(queries, inside):
            vq = value(k, f, q)
            if vq is None or not any(chains):
                continue
            sh = share(chains, lambda x: value(k, f, x) == vq)
            assert sh is not None  # some chain has a state
            rates.append(sh.share)
            var += ((sh.high - sh.low) / (2 * Z)) ** 2
            base.append(reference[k][vq] / total)
            n += len({x for c in chains for x in c})
        fcr = _mean(rates)
        low = high = None
        if fcr is not None:
            half = Z * math.sqrt(var) / len(rates)
            low, high = max(0.0, fcr - half), min(1.0, fcr + half)
        out.append(Consistency(k, site, position, fcr, _mean(base), len(rates), empty, n, low, high))
    return out


def position_names(task) -> tuple[str, ...]:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    return POSITION_NAMES.get(name or "", ())


def query_texts(task, n: int, seed: int = 0) -> list[str]:
    """``n`` held-out inputs of the task, or of a data set (the queries of :func:`measure` and :func:`explain`)."""
    rng = random.Random(seed + 30_000)
    return _draw(task, n, rng)


def _draw(source, n: int, rng: random.Random) -> list[str]:
    """``n`` held-out inputs of a task (its test side) or of a data set (its held-out inputs by weight, every input
    where none is held out: :func:`inversionview.data.is_test`)."""
    from .dataset import DataSet

    if not isinstance(source, DataSet):
        return [source.sample(rng, "test") for _ in range(n)]
    from .data import is_test

    held = [(t, w) for t, w in zip(source.texts, source.weights.tolist()) if is_test(t)]
    held = held or list(zip(source.texts, source.weights.tolist()))
    return rng.choices([t for t, _ in held], weights=[w for _, w in held], k=n)


def measure(
    iv,
    site,
    position: int,
    features: dict[str, Feature],
    queries: int = 16,
    samples: int = 256,
    seed: int = 0,
    reference: dict[str, Counter] | None = None,
) -> list[Consistency]:
    """FCRs of ``features`` at ``site`` over ``queries`` held-out inputs, at the ``position``-th position of the
    task's rule (e.g. 0: the target character in counting, 1: ``:``)."""
    task = iv.task
    if task is None:
        raise UserError("FCRs need a run on a built-in task (its inputs give the queries and the baseline)")
    names = position_names(task)
    texts = query_texts(task, queries, seed)
    pos = [task.positions(t)[position] for t in texts]
    inside = preimages(iv, texts, site, pos, samples, seed=seed)
    reference = reference or random_values(task, features, seed=seed)
    s = iv.probed.site(site)
    return consistency(
        features, texts, inside, reference, s.short, names[position] if position < len(names) else str(position)
    )


@dataclass(frozen=True)
class Explanation:
    """:func:`explain`'s result: every (site, position, feature) measured."""

    task: str
    sites: tuple[str, ...]
    positions: tuple[str, ...]
    rows: tuple[Consistency, ...]
    queries: int
    samples: int
    rule: str = RULE
    data: str | None = None  # the data set the FCRs are taken under (None: the task's generator)

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [r.to_dict() for r in self.rows]}

    def table(self, width: int = 40) -> str:
        """Site x position: the features each site carries, with FCR (baseline); long cells wrap."""
        import textwrap

        cells: dict[tuple[str, str], list[str]] = {}
        for r in self.rows:
            key = (r.site, r.position)
            cells.setdefault(key, [])
            if r.verdict:
                assert r.high is not None and r.low is not None  # an FCR comes with its interval
                mark = "" if r.verdict == "carries" else "~"
                cells[key].append(f"{mark}{r.feature} {r.fcr:.2f}±{(r.high - r.low) / 2:.2f} ({r.baseline:.2f})")
            if r.empty and f"[{r.empty} empty]" not in cells[key]:
                cells[key].append(f"[{r.empty} empty]")
        wrapped = {k: _wrap_items(v, width) for k, v in cells.items()}
        w = max([len(x) for v in wrapped.values() for x in v] + [len(p) for p in self.positions])
        lines = [f"{'site':>8}  " + "  ".join(f"{p:<{w}}" for p in self.positions).rstrip()]
        for s in self.sites:
            col = [wrapped.get((s, p), ["-"]) for p in self.positions]
            for i in range(max(map(len, col))):
                lines.append(
                    (f"{s:>8}  " if i == 0 else " " * 10)
                    + "  ".join(f"{c[i] if i < len(c) else '':<{w}}" for c in col).rstrip()
                )
        notes = [
            f"each cell: the features the site carries at that position, FCR±(half its 95% interval) (baseline); "
            f"{self.rule}.",
        ]
        if self.data is not None:
            notes.append(
                f"FCR: mean over {self.queries} held-out queries of the data set {self.data} of the share of the "
                "data's members of each query's preimage (found exactly by a scan, weighted as the data holds them) "
                f"whose feature equals the query's; baseline: the same share among {BASELINE_INPUTS} random inputs "
                "of the data; [k empty]: queries with no member inside epsilon, left out."
            )
            return "\n".join(lines + [""] + [textwrap.fill(n, 118) for n in notes])
        notes += [
            f"FCR: mean over {self.queries} held-out queries of the share of the preimage's members whose feature "
            f"equals the query's, estimated under the task's input distribution by chains on the preimage started "
            f"from exact generator draws (the decoder's members where none lands inside; {self.samples} candidates "
            f"per query, Auto mix); baseline: the same share "
            f"among {BASELINE_INPUTS} random inputs of the task; [k empty]: queries with no sample inside epsilon, "
            "left out.",
        ]
        return "\n".join(lines + [""] + [textwrap.fill(n, 118) for n in notes])


def _wrap_items(items: list[str], width: int) -> list[str]:
    """Items joined with ', ' into lines of at most ``width`` characters, never splitting an item."""
    lines: list[str] = []
    for it in items:
        if lines and len(lines[-1]) + 2 + len(it) <= width:
            lines[-1] += ", " + it
        else:
            if lines:
                lines[-1] += ","
            lines.append(it)
    return lines or ["-"]


def explain(
    iv, sites=None, queries: int = 16, samples: int = 256, features=None, seed: int = 0, progress: bool = True
) -> Explanation:
    """FCR and baseline of every feature at every site (default: the decoder's) and query position of the task's
    rule, over ``queries`` held-out inputs with ``samples`` candidates each."""
    task, ds = iv.task, iv.dataset()
    if task is None and ds is None:
        raise UserError("explain needs a run on a built-in task or on a data file (its inputs give the queries)")
    if queries < 1 or samples < 1:
        raise UserError(f"queries and samples must be at least 1, got {queries} and {samples}")
    feats = resolve_features(task, features)
    if not feats:
        what = f"the task {task.name!r} has" if task is not None else "a data run has"
        raise UserError(f"{what} no built-in features: give --features module:function")
    sites = [iv.site_index(s)[0] for s in (sites or iv.sites)]
    source = ds if ds is not None else task
    rule = iv.data_source()  # the query positions: the task's rule, or the run's
    texts = query_texts(source, queries, seed)
    n_pos = min(len(rule.positions(t)) for t in texts)
    names = list(position_names(task)[:n_pos]) + [f"p{k}" for k in range(len(position_names(task)), n_pos)]
    reference = random_values(source, feats, seed=seed)
    rows = []
    bar = tqdm(total=len(sites) * n_pos, desc="explain", disable=not progress)
    for s in sites:
        for k in range(n_pos):
            inside = preimages(iv, texts, s, [rule.positions(t)[k] for t in texts], samples, seed=seed)
            rows += consistency(feats, texts, inside, reference, s.short, names[k])
            bar.update()
    bar.close()
    return Explanation(
        task.name if task is not None else "",
        tuple(s.short for s in sites),
        tuple(names),
        tuple(rows),
        queries,
        samples,
        data=ds.name if ds is not None else None,
    )
