"""Reading an activation (METHOD.md §4): the decoder proposes, the probed model verifies.

:func:`read` samples candidate inputs from the decoder conditioned on the query activation z_q
(temperatures, activation noise, or the paper's Auto mix), re-runs the probed model on every distinct
candidate, takes the minimum distance to z_q over each candidate's positions (PAD and EOS excluded, BOS
included) with its arg-min, and returns a :class:`Preimage`: the one result object that the terminal,
JSON and HTML views all render.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from .errors import UserError
from .dataset import find_members
from .estimate import credit
from .explore import CHAINS, can_explore, walk
from .features import builtin_features, resolve_features
from .probed import ProbedModel
from .propose import AUTO_MIX, propose
from .settings import ReadSettings
from .verify import counterfactuals, verify

CHAIN_SAMPLES = 32  # members met by the chains that a reading shows beside the decoder's samples
CHECKS = 40  # members changed in each counterfactual check


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Sample:
    tokens: list[str]
    text: str
    distance: float
    position: int  # arg-min position
    distances: list[float | None]  # per position; None at PAD/EOS
    delta: list[float]  # per token: p(t|z_q) - p(t|z_BOS); 0 for BOS
    count: int  # how many decoder candidates were this input (0: found by the chains only)
    annotation: str | None = None
    source: str = "decoder"  # "decoder": proposed by the decoder; "chain": met by the chains on the preimage


@dataclass
class Preimage:
    """One reading: the query, the samples sorted by distance, epsilon, and the true fraction inside."""

    text: str
    tokens: list[str]
    position: int
    site: str  # TransformerLens name
    site_short: str
    epsilon: float
    metric: str
    mode: str
    samples: list[Sample]
    n_candidates: int
    fraction_inside: float  # over all candidates, duplicates counted
    settings: dict = field(default_factory=dict)
    attention: list[float] | None = None  # head sites: the pattern from the query position
    annotation: str | None = None
    decoder: str | None = None  # run directory
    summary: list[str] | None = None  # what the preimage's members share and what varies (inversionview.summary)
    chart: list[dict] | None = None  # the summary's items with their values' shares and intervals: the views' bars
    shares: list[dict] | None = None  # per feature: the query's value and its estimated share with a 95% interval
    checks: list[dict] | None = None  # per shared feature: members changed in it, and how many stay inside
    chains: dict | None = None  # the chains' states and their members (inversionview.explore), or None
    distribution: dict | None = None  # what the shares estimate: kind "data" (with its members), "generator", "decoder"
    sources: dict | None = None  # distinct members found by each source (decoder, data, chains, generator draws)

    @property
    def inside(self) -> list[Sample]:
        return [s for s in self.samples if s.distance <= self.epsilon]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Preimage":
        return cls(**{**d, "samples": [Sample(**s) for s in d["samples"]]})

    def with_epsilon(self, epsilon: float) -> "Preimage":
        """The same samples read at another epsilon (distances do not depend on it). The chains' estimate holds for
        a smaller epsilon (their states inside it are draws from the smaller preimage); above the epsilon they ran
        at, the summary falls back to the decoder's samples and says so."""
        n_in = sum(s.count for s in self.samples if s.distance <= epsilon)
        pre = Preimage(**{**self.__dict__, "epsilon": epsilon, "fraction_inside": n_in / max(1, self.n_candidates)})
        if self.summary is not None:
            from .summary import feature_shares, summary

            pre.shares = feature_shares(pre)
            pre.summary, pre.chart = summary(pre)
        return pre

    def show(self, limit: int = 20, file=None) -> None:
        from .viewer.terminal import render

        print(render(self, limit=limit), file=file)

    def to_html(self, path=None) -> str:
        from .viewer.html import render_html

        html = render_html([self])
        if path is not None:
            from pathlib import Path

            Path(path).write_text(html)
        return html


def resolve_position(tokens: list[str], n_text: int, position: int | str) -> int:
    """A query position: an index (BOS = 0; negative counts back from the last text token, EOS excluded)
    or a token string (its first occurrence; leading and trailing spaces ignored, so ``to`` finds GPT-2's
    ``" to"``)."""
    if isinstance(position, str):
        p = position.strip()
        loose = [i for i, t in enumerate(tokens[:n_text]) if p and t.strip() == p]
        if p.lstrip("-").isdigit():
            position = int(p)
        elif p in tokens[:n_text]:
            return tokens.index(p)
        elif loose:
            return loose[0]
        else:
            raise UserError(
                f"position {position!r} is neither an index nor a token of the input "
                f"(tokens: {' '.join(tokens[:n_text])})"
            )
    if not -n_text <= position < n_text:
        raise UserError(
            f"position {position} is out of range for an input of {n_text} tokens "
            f"(expected 0..{n_text - 1}, or -{n_text}..-1 from the end)"
        )
    return position % n_text


@torch.no_grad()
def read(
    iv,
    text: str,
    site,
    position: int | str,
    samples: int = 1024,
    temperature: float | None = None,
    noise: float = 0.0,
    epsilon: float | None = None,
    metric: str | None = None,
    seed: int = 0,
    deltas: int = 256,
    chains: int = CHAINS,
    data=None,
    features=None,
    *,
    site_index: int,
    index=None,
) -> Preimage:
    """Read the activation of ``text`` at ``site`` and ``position``. The caller resolves what a reading reads under
    (:meth:`inversionview.run.InversionView.query`): ``site`` is a :class:`~inversionview.sites.Site` the decoder
    knows as ``site_index``, ``data`` a :class:`~inversionview.dataset.DataSet` or None, and ``index`` its cached
    activations at the site; the reading itself only calls downwards (docs/estimator.md).

    ``temperature=None`` uses the Auto mix (``samples`` candidates spread over :data:`AUTO_MIX`); otherwise
    all candidates use ``temperature`` and activation noise ``noise`` (z + N(0, I) std(z) noise). Delta
    colours are computed for the ``deltas`` closest distinct samples.

    Where the task defines moves, ``chains`` Metropolis-Hastings chains then walk the preimage from the decoder's
    members and the query (:mod:`inversionview.explore`): the summary's shares are estimates over the preimage
    under the task's input distribution, and up to :data:`CHAIN_SAMPLES` members they met join the samples
    (``source="chain"``). ``chains=0`` reads the decoder's samples alone.

    Under a data set (``data``; the API's default is the data file of a run trained on one) the input distribution is the data's: the members of the preimage within the data are found
    exactly by a scan of the site's cached activations (:mod:`inversionview.dataset`), the shares are taken over
    them, and the nearest and some random members join the samples (``source="data"``). ``features``: names or
    ``module:function`` specs of the features to measure (default: the task's built-ins)."""
    probed, tok = iv.probed, iv.probed.tokenizer
    s, si, ds = site, site_index, data
    eps, metric, mix = _settings(iv, text, samples, temperature, noise, epsilon, metric, seed, chains)
    q = _query(probed, s, text, position)
    seqs = propose(iv, q.zq, si, mix, samples, torch.Generator().manual_seed(seed))
    counts, dropped = _distinct(probed, seqs)
    uniq = [list(u) for u in counts]
    checked = verify(probed, s, uniq, q.zq, metric)
    n_in = sum(counts[tuple(u)] for u, d in zip(uniq, checked[0]) if d <= eps)
    texts = [tok.text(u) for u in uniq]
    feats = resolve_features(iv.task, features) if features is not None else builtin_features(iv.task)
    n_decoder = len(uniq)
    w, found, (uniq, texts, checked) = _members(
        iv, s, q, text, ds, index, eps, metric, chains, feats, seed, uniq, texts, checked
    )
    settings = {"mix": [list(m) for m in mix], "samples": samples, "seed": seed, "chains": chains if ds is None else 0}
    settings |= {"dropped": dropped, "task": iv.task.name if iv.task else None, "features": list(feats)}
    rows = _rows(iv, si, q.zq, q.zbos, uniq, texts, checked, counts, deltas, "data" if ds is not None else "chain")
    pre = _preimage(iv, text, q, s, eps, metric, rows, n_in, settings)
    pre.distribution = _distribution(iv, ds, found)
    pre.sources = _sources(texts[:n_decoder], checked[0][:n_decoder], eps, ds, found, w)
    _explain(iv, s, q.zq, pre, w, seed, feats)
    return pre


def _members(iv, s, q, text: str, ds, index, eps: float, metric: str, chains: int, feats: dict, seed: int, *rows):
    """The preimage's members beyond the decoder's samples: under a data set, the data's (exact: a scan); else, where
    the task has moves, the chains' from the decoder's members and the query. Returns the chains' walk (or None),
    the data's members (or None), and the samples ``rows`` (``uniq, texts, checked``) with the listed members added."""
    probed = iv.probed
    uniq, texts, checked = rows
    if ds is not None:
        found = find_members(probed, s, q.zq, ds, index, eps, metric, feats, seed)
        return None, found, _with_texts(probed, s, q.zq, metric, found.listed, uniq, texts, checked)
    if chains and can_explore(iv.task):
        inside = [t for t, d in zip(texts, checked[0]) if d <= eps]
        w = walk(probed, iv.task, s, q.zq[None], [inside + [text]], eps, metric, chains=chains, seed=seed)[0]
        return w, None, _with_members(probed, s, q.zq, metric, w, uniq, texts, checked, seed)
    return None, None, rows


def _distribution(iv, ds, found) -> dict:
    """The input distribution a reading's shares estimate, as the views name it: a data set (with its members), the
    task's generator (chains), or none (the decoder's samples)."""
    if ds is not None:
        return {**ds.describe(), **found.record}
    if iv.task is not None and can_explore(iv.task):
        return {"kind": "generator", "name": f"task {iv.task.name}"}
    return {"kind": "decoder", "name": "the decoder's samples (no input distribution)"}


def _sources(dec_texts: list[str], dmin, eps: float, ds, found, w) -> dict:
    """How many distinct members of the preimage each source found: the decoder (and of those, how many the data
    does not hold), the data scan, the generator's draws and the chains."""
    mine = {t for t, d in zip(dec_texts, dmin.tolist()) if d <= eps}
    out: dict = {"decoder": len(mine)}
    if ds is not None:
        out["data"] = found.record["found"]
        out["decoder, not in the data"] = len(mine - ds.distinct)
    if w is not None:
        out["chains"] = sum(1 for d, _ in w.members.values() if d <= eps)
        out["generator draws"] = len(w.states.draws)
    return out


class _Query(NamedTuple):
    """The query input read: its ids and tokens, the resolved position, and the activations there and at BOS."""

    ids: list[int]
    tokens: list[str]
    pos: int
    zq: torch.Tensor
    zbos: torch.Tensor


def _query(probed: ProbedModel, s, text: str, position: int | str) -> _Query:
    """Encode ``text``, resolve ``position`` among its text tokens (EOS excluded) and run the probed model to ``s``."""
    tok = probed.tokenizer
    ids = probed.encode(text)
    n_text = len(ids) - (1 if tok.eos_id is not None and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0)
    tokens = tok.tokens_of(ids)
    pos = resolve_position(tokens, n_text, position)
    act = probed.run(torch.tensor([ids]), [s])[s][0].float()
    return _Query(ids, tokens, pos, act[pos], act[0])


def _distinct(probed: ProbedModel, seqs: list[list[int]]) -> tuple[Counter, int]:
    """The decoder's samples counted by distinct input, and how many were dropped: a sample with PAD or EOS inside
    is no input."""
    eos = probed.tokenizer.eos_id
    special = set(probed.non_input_ids)
    kept = [x for x in seqs if not special.intersection(x[1:-1] if x[-1] == eos else x[1:])]
    kept = [x for x in kept if probed.tokenizer.round_trips(x)]  # its text re-encodes to it (no BOS inside, ...)
    return Counter(tuple(x) for x in kept), len(seqs) - len(kept)


def _attention(probed: ProbedModel, s, q: _Query) -> list[float] | None:
    """A head site's attention pattern from the query position (None at other sites)."""
    if s.kind != "result":
        return None
    pattern = probed.attention(torch.tensor([q.ids]), s.layer, s.head)[0, q.pos, : q.pos + 1]
    return [round(float(a), 5) for a in pattern]


def _preimage(iv, text: str, q: _Query, s, eps: float, metric: str, rows, n_in: int, settings: dict) -> Preimage:
    """The reading's result, before the chains' record and the summary are added (:func:`_explain`)."""
    samples = settings["samples"]
    return Preimage(
        text=text,
        tokens=q.tokens,
        position=q.pos,
        site=s.name,
        site_short=s.short,
        epsilon=eps,
        metric=metric,
        mode=iv.probed.mode,
        samples=rows,
        n_candidates=samples,
        fraction_inside=n_in / samples,
        attention=_attention(iv.probed, s, q),
        settings=settings,
        annotation=iv.task.annotate(text) if iv.task else None,
        decoder=str(iv.run_dir) if iv.run_dir else None,
    )


def _explain(iv, s, zq: torch.Tensor, pre: Preimage, w, seed: int, feats: dict) -> None:
    """Add to ``pre`` the chains' record (where they ran), the feature shares, the counterfactual checks and the
    summary."""
    probed = iv.probed
    if w is not None:
        pre.chains = chains_record(w, pre.epsilon, lambda x: probed.tokenizer.tokens_of(probed.encode(x)))
    from .summary import feature_shares, summary

    pre.shares = feature_shares(pre, iv.task, feats)
    pre.checks = _checks(iv, s, zq, pre, w, pre.metric, seed, feats)
    pre.summary, pre.chart = summary(pre, iv.task, feats)


def _settings(iv, text, samples, temperature, noise, epsilon, metric, seed, chains):
    """The reading's settings checked by the schema (:class:`~inversionview.settings.ReadSettings`), each bad one a
    one-line UserError: ``(epsilon, metric, mix)``."""
    s = ReadSettings(
        samples=samples, temperature=temperature, noise=noise, epsilon=epsilon, metric=metric, seed=seed, chains=chains
    ).checked()
    if not text:
        raise UserError("the query text is empty: give the input to read (without BOS/EOS)")
    mix = AUTO_MIX if s.temperature is None else ((float(s.temperature), float(s.noise)),)
    return iv.spec.epsilon if s.epsilon is None else float(s.epsilon), s.metric or iv.spec.metric, mix


def _with_members(probed, s, zq, metric, w, uniq, texts, checked, seed):
    """The decoder's distinct samples plus up to :data:`CHAIN_SAMPLES` members the chains met (verified)."""
    return _with_texts(
        probed,
        s,
        zq,
        metric,
        random.Random(seed).sample(sorted(w.members), min(len(w.members), CHAIN_SAMPLES)),
        uniq,
        texts,
        checked,
    )


def _with_texts(probed, s, zq, metric, more_texts: list[str], uniq, texts, checked):
    """The decoder's distinct samples plus the inputs ``more_texts`` that are not among them, verified."""
    known = set(texts)
    extra = [x for x in dict.fromkeys(more_texts) if x not in known]
    if not extra:
        return uniq, texts, checked
    more = [probed.encode(x) for x in extra]
    d2, a2, t2 = verify(probed, s, more, zq, metric)
    dmin, amin, dist = checked
    width = max(dist.shape[1], t2.shape[1])

    def pad(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("inf"))

    return uniq + more, texts + extra, (torch.cat([dmin, d2]), torch.cat([amin, a2]), torch.cat([pad(dist), pad(t2)]))


def _rows(iv, si, zq, zbos, uniq, texts, checked, counts, deltas: int, other: str = "chain") -> list[Sample]:
    """The samples sorted by distance, with delta colours for the ``deltas`` closest."""
    tok = iv.probed.tokenizer
    dmin, amin, dist = checked
    order = dmin.argsort(stable=True).tolist()
    top = order[:deltas]
    delta = _deltas(iv.decoder, iv.probed, [uniq[i] for i in top], zq, zbos, si) if top else []
    out = []
    for rank, i in enumerate(order):
        seq = uniq[i]
        out.append(
            Sample(
                tokens=tok.tokens_of(seq),
                text=texts[i],
                distance=float(dmin[i]),
                position=int(amin[i]),
                distances=[None if d == float("inf") else round(float(d), 5) for d in dist[i, : len(seq)]],
                delta=delta[rank] if rank < len(delta) else [],
                count=counts.get(tuple(seq), 0),
                annotation=iv.task.annotate(texts[i]) if iv.task else None,
                source="decoder" if tuple(seq) in counts else other,
            )
        )
    return out


def chains_record(w, epsilon: float, tokens_of) -> dict:
    """A walk as a reading keeps it (JSON): its states; the distance, arg-min position, tokens and weight under the
    input distribution of every member met (:class:`inversionview.estimate.Chains`), or of the states' alone where
    the chains' coverage gives the others no weight in a share (:func:`inversionview.estimate.credit`: a large
    preimage, whose members met can run to thousands); and the chains' coverage."""
    weight = dict(w.states.members)
    kept = (
        w.members
        if credit(w.states.coverage) > 0
        else dict.fromkeys([x for st in w.states for x in st] + w.states.draws)
    )
    return {
        "epsilon": epsilon,
        "level": w.level,  # the distance the chains walked within (epsilon, or relaxed where few draws landed inside)
        "exact": w.exact,  # the chains started at exact generator draws (else at the decoder's members: one start)
        "states": w.states,
        "proposed": w.proposed,
        "accepted": w.accepted,
        "distinct": len(w.members),
        "coverage": w.states.coverage,
        "draws": w.states.draws,  # the generator draws inside epsilon, the chains' starts left out: they join a share
        "members": {x: [round(w.members[x][0], 5), w.members[x][1], tokens_of(x), weight.get(x, 1.0)] for x in kept},
    }


def _checks(iv, s, zq, pre, w, metric: str, seed: int, feats: dict) -> list[dict]:
    """Counterfactual checks: each feature the estimate calls shared, changed in up to :data:`CHECKS` members with
    the task's moves; where there are none (a data set without a task), each check says it could not be made."""
    from .summary import is_shared

    pool = sorted(w.members) if w is not None else sorted((pre.distribution or {}).get("members") or ())
    if not pool:
        return []
    members = random.Random(seed).sample(pool, min(len(pool), CHECKS))
    out = []
    for sh in pre.shares or []:
        if is_shared(sh) and sh["feature"] in feats:
            if not can_explore(iv.task):
                out.append({"feature": sh["feature"], "value": sh["value"], "distances": [], "edit": None})
                continue
            d = counterfactuals(iv.probed, iv.task, s, zq, members, feats[sh["feature"]], metric, seed=seed)
            out.append({"feature": sh["feature"], "value": sh["value"], "distances": [round(x, 5) for x in d]})
    return out


def _deltas(dec, probed, seqs, zq, zbos, si) -> list[list[float]]:
    b = probed.batch(seqs)
    ids = b.ids
    site = torch.full((len(seqs),), si)
    pq = dec.token_probs(ids, zq.expand(len(seqs), -1), site)
    pb = dec.token_probs(ids, zbos.expand(len(seqs), -1), site)
    d = (pq - pb).tolist()
    return [[0.0] + [round(x, 4) for x in row[: len(s) - 1]] for row, s in zip(d, seqs)]
