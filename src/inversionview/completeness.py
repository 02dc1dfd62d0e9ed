"""Completeness scan (METHOD.md §5, the paper's Fig. 11): is every input of the true epsilon-preimage one that the
decoder finds likely?

For a task whose inputs can be listed, :func:`scan` computes, for every input of the set:

- its true distance to the query activation z_q: the minimum over its positions (PAD and EOS excluded, BOS
  included), as :func:`inversionview.verify.verify` takes it; the probed model runs in batches and stops
  after the site's layer;
- the decoder's log-probability of the whole input given z_q (teacher-forced, from the token after BOS to EOS,
  with the site's id), log p(x | z_q) = sum_i log p(x_i | x_<i, z_q).

and reports the size of the true preimage, the recall of N decoder samples (the Auto mix, as
:meth:`InversionView.query` draws them) against it, as distinct inputs and as distinct values of a few task
features, and the share of inputs outside epsilon that the decoder finds more likely than the least likely input
inside. :meth:`Completeness.plot` writes the scatter of distance against log-probability with the epsilon line.

The input sets (:func:`input_set`):

- **addition**: all 810,000 inputs ``a+b=c`` (100 <= a, b <= 999), i.e. the whole input space.
- **counting**: the input space (about 10^13 inputs) cannot be listed. The scan uses a fixed pool: the first
  :data:`COUNTING_POOL` distinct inputs that the task's generator draws with ``random.Random(COUNTING_SEED)``,
  every length included. Recall is then recall of the preimage *within that pool*; a decoder sample counts for
  the input recall only if it is one of the pool's inputs.

Speed. All inputs share one z_q, so the decoder's conditioning (its per-layer prefix slot) is computed once and
expanded. Inputs are grouped by length and sorted, and within each chunk of sorted inputs the decoder runs every
distinct prefix of the first P tokens once (P chosen per chunk to minimise the tokens run; for addition P = 7,
``B a1 a2 a3 + b1 b2``, shared by 10 inputs) and each input's remaining tokens once, attending to its prefix's
cached keys and values. Both passes take :data:`BATCH` rows at a time: much larger chunks allocate tensors above
glibc's mmap threshold, which are handed back to the OS and page-faulted in again for every chunk (measured on
addition, one thread: 1.7x slower at 16,384 rows, with 3x the memory).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import UserError
from .probed import distances
from .tokenizer import CharVocab

log = logging.getLogger(__name__)

COUNTING_POOL = 100_000
COUNTING_SEED = 0
PLOT_OUTSIDE = 20_000  # outside points drawn in the scatter (a fixed-seed subsample when there are more)
BATCH = 512  # rows per chunk (see Speed above)


# ---------------------------------------------------------------------------------------------- input sets
def input_set(task) -> tuple[list[str], str]:
    """The inputs a scan covers for a task, and a one-line description of the set."""
    name = getattr(task, "name", None)
    if name == "addition":
        texts = list(task.all_inputs())
        return texts, f"all {len(texts):,} addition inputs a+b=c with 100 <= a, b <= 999 (the whole input space)"
    if name == "counting":
        rng = random.Random(COUNTING_SEED)
        seen: dict[str, None] = {}  # an ordered set
        while len(seen) < COUNTING_POOL:
            seen.setdefault(task.generate(rng), None)
        return list(seen), (
            f"a fixed pool of {COUNTING_POOL:,} distinct counting inputs, the first the task's "
            f"generator draws with seed {COUNTING_SEED} (all lengths; the input space, ~1e13 inputs, "
            "cannot be listed)"
        )
    what = f"task {name!r}" if name else "a data file"
    raise UserError(
        f"completeness needs a task whose inputs can be listed (addition: all 810,000 inputs; counting: a "
        f"fixed pool of {COUNTING_POOL:,}), but this run reads {what}"
    )


# The built-in features (inversionview.features) whose distinct values the recall is counted over.
RECALL_FEATURES = {
    "addition": ("F1S1", "F2S2", "F3S3", "carry_ones", "carry_tens", "sum_len"),
    "counting": ("count", "target", "letters", "length"),
}


def _recall_features(task) -> dict:
    from .features import builtin_features

    name = getattr(task, "name", None) or ""  # "": no built-in task, so no features
    builtin = builtin_features(name)
    return {k: builtin[k] for k in RECALL_FEATURES.get(name, ())}


# ---------------------------------------------------------------------------------------------- encoding
def _encode_all(tok, texts: list[str]) -> dict[int, tuple[np.ndarray, torch.Tensor]]:
    """Encode a character-vocabulary input set at once: ``{length: (indices into texts, ids (n, length))}``,
    BOS and EOS included."""
    lut = np.full(128, -1, dtype=np.int64)
    for i, ch in enumerate(tok.tokens):
        if len(ch) == 1 and ch not in (tok.bos, tok.eos, tok.pad) and ord(ch) < 128:
            lut[ord(ch)] = i
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    out = {}
    for n in np.unique(lens):
        idx = np.nonzero(lens == n)[0]
        try:
            raw = np.frombuffer("".join(texts[i] for i in idx).encode("ascii"), dtype=np.uint8).reshape(len(idx), n)
        except UnicodeEncodeError:
            raise UserError("an input of the set has a character outside the vocabulary") from None
        ids = np.empty((len(idx), n + 2), dtype=np.int64)
        ids[:, 0], ids[:, -1], ids[:, 1:-1] = tok.bos_id, tok.eos_id, lut[raw]
        if (ids < 0).any():
            raise UserError("an input of the set has a character outside the vocabulary")
        out[int(n) + 2] = (idx, torch.from_numpy(ids))
    return out


# ---------------------------------------------------------------------------------------------- the two passes
@torch.inference_mode()
def scan_distances(
    probed, site, ids: torch.Tensor, zq: torch.Tensor, metric: str, batch: int = BATCH, progress=None
) -> torch.Tensor:
    """Minimum distance to ``zq`` over the positions of each row of ``ids`` (N, T) (all rows BOS ... EOS, no PAD):
    EOS is excluded, BOS included, as in :func:`inversionview.verify.verify`."""
    eos = probed.tokenizer.eos_id
    out = []
    for i in range(0, len(ids), batch):
        b = ids[i : i + batch]
        act = probed.run(b, [site])[site].float()
        d = distances(zq.float(), act, metric)
        if eos is not None and eos != probed.tokenizer.bos_id:
            d = d.masked_fill(b.to(d.device) == eos, float("inf"))
        out.append(d.min(-1).values.cpu())
        if progress is not None:
            progress(len(b))
    return torch.cat(out)


@torch.inference_mode()
def scan_logprobs(
    decoder, site_index: int, zq: torch.Tensor, ids: torch.Tensor, batch: int = BATCH, progress=None
) -> torch.Tensor:
    """``log p(ids[i, 1:] | ids[i, 0], z_q)`` for every row of ``ids`` (N, T), all rows of one length, teacher-forced.

    The conditioning is computed once for all rows. Rows are sorted; in each chunk the decoder runs every distinct
    prefix of the first P tokens once and each row's remaining tokens once after its prefix's cached keys and values
    (P chosen per chunk to run the fewest tokens; P = 0 is a plain forward). Same math as ``decoder.forward``."""
    N, T = ids.shape
    order = torch.from_numpy(np.lexsort(ids.numpy().T[::-1].copy()))
    fast = _Fast(decoder, decoder.condition(zq[None].float(), torch.tensor([site_index])))
    out = torch.empty(N)
    for i in range(0, N, batch):
        rows = order[i : i + batch]
        out[rows] = _chunk_logprobs(fast, ids[rows])
        if progress is not None:
            progress(len(rows))
    return out


class _Fast:
    """The decoder's forward for one conditioning vector, written out for scoring many inputs: layer 0's q, k, v
    come from a (position, token) table (they depend on nothing else), attention is batched matrix products over
    the few cached slots."""

    def __init__(self, dec, cond):
        self.dec, self.cond = dec, cond
        c = dec.config
        self.H, self.dh = c.n_heads, c.d_model // c.n_heads
        b0 = dec.blocks[0]
        self.qkv0 = None  # with prefix counts a token's input depends on the tokens before it: no table
        if dec.cnt is None:
            emb = dec.tok.weight[None] + dec.pos.weight[:, None]  # (max_len, V, d)
            self.qkv0 = b0.qkv(b0.ln1(emb))  # (max_len, V, 3d)

    def run(self, ids: torch.Tensor, past: list, start: int, keep: bool = False, before: torch.Tensor | None = None):
        """Log-softmax (n, L, V) after each token of ``ids`` (n, L) at positions ``start ..`` after the cached
        ``past`` (per layer (K, V), each (n or 1, H, start + 1, dh)); with ``keep``, also the per-layer keys and
        values of the cache and these tokens. Attention is taken over the cache and the new tokens separately
        (one softmax over both), so the cache is never copied next to the new keys. ``before`` (n, start): the
        tokens in the cache, which a decoder with prefix counts adds up."""
        dec, H, dh = self.dec, self.H, self.dh
        n, L = ids.shape
        pos = torch.arange(start, start + L)
        x = dec.tok(ids) + dec.pos(pos)
        if dec.cnt is not None:
            x = x + dec.cnt(ids).cumsum(1)
            if before is not None and before.shape[1]:
                x = x + dec.cnt(before).sum(1)[:, None]
        Sp, scale = past[0][0].shape[2], dh**-0.5
        # scores are laid out (keys, queries): the softmax over dim 1 is much faster than over a short last dim
        causal = torch.full((L, L), float("-inf")).tril(-1)
        kv = []
        for layer, (b, (pk, pv)) in enumerate(zip(dec.blocks, past)):
            qkv = self.qkv0[pos[None], ids] if layer == 0 and self.qkv0 is not None else b.qkv(b.ln1(x))
            q, k, v = (t.reshape(n * H, L, dh) for t in qkv.view(n, L, 3, H, dh).permute(2, 0, 3, 1, 4))
            pk, pv = (t.expand(n, -1, -1, -1).reshape(n * H, Sp, dh) for t in (pk, pv))
            if keep:
                kv.append((torch.cat([pk, k], 1).view(n, H, Sp + L, dh), torch.cat([pv, v], 1).view(n, H, Sp + L, dh)))
            qt = q.transpose(1, 2)
            s = torch.cat([torch.bmm(pk, qt).mul_(scale), torch.baddbmm(causal, k, qt, alpha=scale)], 1).softmax(1)
            a = torch.bmm(s[:, :Sp].transpose(1, 2), pv).baddbmm_(s[:, Sp:].transpose(1, 2), v)
            a = a.view(n, H, L, dh).transpose(1, 2).reshape(n, L, H * dh)
            x = x + b.proj(a)
            x = x + b.out(torch.nn.functional.gelu(b.fc(b.ln2(x))))
        return (dec.ln_f(x) @ dec.tok.weight.T).float().log_softmax(-1), kv


def _chunk_logprobs(fast: _Fast, ids: torch.Tensor) -> torch.Tensor:
    n, T = ids.shape
    x = ids[:, :-1]  # what the decoder reads; it predicts ids[:, 1:]
    same = (x[1:] == x[:-1]).long().cumprod(1).sum(1)  # common prefix length with the row before
    lcp = torch.cat([torch.zeros(1, dtype=torch.long), same])
    # tokens run with a shared prefix of length P: (distinct P-prefixes) * P + n * (T - 1 - P)
    P = 0
    if T > 2:
        distinct = torch.tensor([int((lcp < p).sum()) for p in range(1, T - 1)])
        cost = distinct * torch.arange(1, T - 1) + n * (T - 1 - torch.arange(1, T - 1))
        if int(cost.min()) < n * (T - 1):
            P = int(cost.argmin()) + 1
    if P == 0:
        logp, _ = fast.run(x, fast.cond, 0)
        return logp.gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    first = lcp < P  # rows that start a new prefix group
    first[0] = True
    group = first.long().cumsum(0) - 1
    heads = torch.nonzero(first)[:, 0]
    plp, pkv = fast.run(x[heads, :P], fast.cond, 0, keep=True)  # (u, P, V)
    prefix_sum = plp[:, :-1].gather(-1, ids[heads, 1:P, None])[..., 0].sum(1)  # tokens 1 .. P-1
    lp = prefix_sum[group] + plp[group, -1].gather(-1, ids[:, P, None])[:, 0]  # token P
    slp, _ = fast.run(x[:, P:], [(k[group], v[group]) for k, v in pkv], P, before=x[:, :P])  # tokens P+1 .. T-1
    return lp + slp.gather(-1, ids[:, P + 1 :, None])[..., 0].sum(1)


# ---------------------------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class Completeness:
    """One completeness scan. ``texts``, ``distance``, ``logp`` and ``sampled`` hold every scanned input (not in
    :meth:`to_dict`); the other fields are the figures."""

    text: str
    site: str
    site_short: str
    position: int
    epsilon: float
    metric: str
    input_set: str  # which inputs were scanned
    n_inputs: int
    n_inside: int  # the size of the true epsilon-preimage within the set
    samples: int  # decoder samples drawn (Auto mix)
    n_sampled: int  # distinct samples that are inputs of the set
    n_sampled_inside: int  # ... and inside epsilon
    recall: float | None  # n_sampled_inside / n_inside
    reading_recall: float | None  # under a data set: the reading's members / n_inside (None otherwise)
    feature_recall: dict  # feature -> {"found", "total", "recall"}: distinct values of in-epsilon samples vs preimage
    min_inside_logp: float | None
    outside_above: float | None  # share of inputs outside epsilon more likely than the least likely input inside
    seconds: dict  # wall time of each pass
    texts: list = field(repr=False, default_factory=list)
    distance: np.ndarray | None = field(repr=False, default=None)
    logp: np.ndarray | None = field(repr=False, default=None)
    sampled: np.ndarray | None = field(repr=False, default=None)  # bool: drawn by the decoder

    def to_dict(self) -> dict:
        keep = ("texts", "distance", "logp", "sampled")
        return {k: v for k, v in self.__dict__.items() if k not in keep}

    def lines(self) -> list[str]:
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"  # noqa: E731
        out = [
            f"completeness of {self.text!r} at {self.site_short} position {self.position} "
            f"(epsilon {self.epsilon:g}, {self.metric})",
            f"scanned: {self.input_set}",
            f"true preimage: {self.n_inside:,} of {self.n_inputs:,} inputs within epsilon",
            f"decoder samples: {self.samples} (Auto mix), {self.n_sampled} distinct inputs of the set, "
            f"{self.n_sampled_inside} inside epsilon",
            f"recall of the preimage's inputs: {pct(self.recall)} ({self.n_sampled_inside} of {self.n_inside})",
        ]
        if self.reading_recall is not None:
            out.append(f"recall of the reading (its members within the data): {pct(self.reading_recall)}")
        for name, r in self.feature_recall.items():
            out.append(f"recall of its {name} values: {pct(r['recall'])} ({r['found']} of {r['total']})")
        if self.min_inside_logp is not None:
            out.append(
                f"inputs outside epsilon more likely than the least likely input inside "
                f"(log p {self.min_inside_logp:.2f}): {pct(self.outside_above)}"
            )
        s = self.seconds
        out.append(
            f"time: distances {s['distances']:.1f} s, log-probabilities {s['logprobs']:.1f} s, "
            f"samples {s['samples']:.1f} s, total {s['total']:.1f} s"
        )
        return out

    def plot(self, path) -> None:
        """Write the scatter of distance against log p(x | z_q) (the paper's Fig. 11) as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        assert self.distance is not None and self.logp is not None  # set by scan, which makes every Completeness
        inside = self.distance <= self.epsilon
        out_idx = np.nonzero(~inside)[0]
        if len(out_idx) > PLOT_OUTSIDE:
            out_idx = np.sort(np.random.default_rng(0).choice(out_idx, PLOT_OUTSIDE, replace=False))
        fig = Figure(figsize=(7, 4.8), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        shown = "" if len(out_idx) == int((~inside).sum()) else f", {len(out_idx):,} shown"
        ax.scatter(
            self.distance[out_idx],
            self.logp[out_idx],
            s=3,
            c="0.6",
            alpha=0.5,
            linewidths=0,
            label=f"outside epsilon ({int((~inside).sum()):,}{shown})",
        )
        ax.scatter(
            self.distance[inside],
            self.logp[inside],
            s=6,
            c="tab:blue",
            linewidths=0,
            label=f"inside epsilon ({int(inside.sum()):,})",
        )
        if self.sampled is not None and self.sampled.any():
            ax.scatter(
                self.distance[self.sampled],
                self.logp[self.sampled],
                s=9,
                marker="x",
                c="tab:orange",
                linewidths=0.6,
                alpha=0.8,
                label=f"sampled by the decoder ({int(self.sampled.sum())})",
            )
        ax.axvline(self.epsilon, color="tab:red", ls="--", lw=1, label=f"epsilon = {self.epsilon:g}")
        if self.min_inside_logp is not None:
            ax.axhline(self.min_inside_logp, color="tab:blue", ls=":", lw=1, label="least likely input inside")
        ax.set_xlabel(f"distance to the query activation ({self.metric})")
        ax.set_ylabel("decoder log-probability log p(x | z_q)")
        ax.set_title(f"{self.text}  {self.site_short} @ {self.position}: {self.n_inputs:,} inputs", fontsize=10)
        ax.legend(fontsize=7, loc="lower left", markerscale=2)
        fig.tight_layout()
        try:
            fig.savefig(path)
        except OSError as e:
            raise UserError(f"cannot write the plot {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------- the scan
@torch.inference_mode()
def scan(
    iv,
    text: str,
    site,
    position: int | str,
    samples: int = 1024,
    epsilon: float | None = None,
    metric: str | None = None,
    seed: int = 0,
    inputs: list[str] | None = None,
) -> Completeness:
    """Scan every input of the set (the run's data set, the task's :func:`input_set`, or ``inputs``) for the query
    ``text`` at ``site`` and ``position``; ``samples`` decoder samples (Auto mix) are checked against the true
    preimage."""
    t_start = time.perf_counter()
    texts, described = _inputs(iv.task, inputs, ds := iv.dataset() if inputs is None else None)
    if not isinstance(iv.probed.tokenizer, CharVocab):
        raise UserError("completeness scans inputs of a character vocabulary (the built-in toy tasks)")
    s, si = iv.site_index(site)
    eps, metric = _threshold(iv, epsilon, metric)
    pos, zq = _query(iv.probed, s, text, position)

    dist, logp, sec = _scan_set(iv, s, si, zq, metric, texts)

    t0 = time.perf_counter()
    pre = iv.query(text, site=s, position=pos, samples=samples, epsilon=eps, metric=metric, seed=seed, deltas=0)
    sec["samples"] = time.perf_counter() - t0
    sampled, inside = _sampled(texts, pre), dist <= eps
    n_in, hit = int(inside.sum()), int((sampled & inside).sum())
    frec = _feature_recall(iv.task, [texts[i] for i in np.nonzero(inside)[0]], pre)
    reading = (pre.distribution or {}).get("found") if ds is not None else None
    min_in, above = _least_likely_inside(logp, inside)
    sec["total"] = time.perf_counter() - t_start
    log.info("scanned %d inputs in %.1f s", len(texts), sec["total"])
    return Completeness(
        text=text,
        site=s.name,
        site_short=s.short,
        position=pos,
        epsilon=eps,
        metric=metric,
        input_set=described,
        n_inputs=len(texts),
        n_inside=n_in,
        samples=samples,
        n_sampled=int(sampled.sum()),
        n_sampled_inside=hit,
        recall=hit / n_in if n_in else None,
        reading_recall=(reading / n_in if n_in else None) if reading is not None else None,
        feature_recall=frec,
        min_inside_logp=min_in,
        outside_above=above,
        seconds={k: round(v, 3) for k, v in sec.items()},
        texts=texts,
        distance=dist,
        logp=logp,
        sampled=sampled,
    )


def _inputs(task, inputs: list[str] | None, ds=None) -> tuple[list[str], str]:
    """The inputs to scan (a data set's: a data run, or --data; the task's :func:`input_set`; or the distinct
    ``inputs`` given) and their description."""
    if ds is not None:
        return list(ds.texts), f"the data set {ds.name} ({len(ds.texts):,} distinct of {ds.inputs:,} inputs)"
    if inputs is None:
        return input_set(task)
    return list(dict.fromkeys(inputs)), f"{len(set(inputs)):,} given inputs"


def _threshold(iv, epsilon: float | None, metric: str | None) -> tuple[float, str]:
    """Epsilon and metric, the run's defaults where not given; a non-positive epsilon is a UserError."""
    eps = iv.spec.epsilon if epsilon is None else float(epsilon)
    if not eps > 0:
        raise UserError(f"epsilon must be positive, got {eps}")
    return eps, metric or iv.spec.metric


def _query(probed, s, text: str, position: int | str) -> tuple[int, torch.Tensor]:
    """The query's position (resolved among its tokens, EOS excluded) and its activation there at ``s``."""
    from .preimage import resolve_position

    ids = probed.encode(text)
    pos = resolve_position(probed.tokenizer.tokens_of(ids), len(ids) - 1, position)
    return pos, probed.run(torch.tensor([ids]), [s])[s][0, pos].float()


def _sampled(texts: list[str], pre) -> np.ndarray:
    """Which of ``texts`` the reading ``pre``'s decoder sampled (not the members the chains or a data scan added)."""
    where = {t: i for i, t in enumerate(texts)}
    sampled = np.zeros(len(texts), dtype=bool)
    sampled[[where[x.text] for x in pre.samples if x.text in where and x.source == "decoder"]] = True
    return sampled


def _scan_set(
    iv, s, si: int, zq: torch.Tensor, metric: str, texts: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The distance to ``zq`` and the decoder's log-probability given ``zq`` of every input in ``texts``, with the
    seconds each pass took."""
    from tqdm.auto import tqdm

    probed = iv.probed
    buckets = _encode_all(probed.tokenizer, texts)
    dist, logp = np.empty(len(texts)), np.empty(len(texts))
    sec = {"distances": 0.0, "logprobs": 0.0}
    with tqdm(total=2 * len(texts), desc="completeness scan", unit="input", unit_scale=True, leave=False) as bar:
        for idx, b in buckets.values():
            t0 = time.perf_counter()
            dist[idx] = scan_distances(probed, s, b, zq, metric, progress=bar.update).numpy()
            t1 = time.perf_counter()
            logp[idx] = scan_logprobs(iv.decoder, si, zq, b, progress=bar.update).numpy()
            sec["distances"] += t1 - t0
            sec["logprobs"] += time.perf_counter() - t1
    return dist, logp, sec


def _feature_recall(task, inside_texts: list[str], pre) -> dict[str, dict]:
    """Per recall feature of the task: how many of its distinct values over the true preimage ``inside_texts`` the
    reading ``pre``'s in-epsilon samples have."""
    frec = {}
    for k, f in _recall_features(task).items():
        vals = {f(t) for t in inside_texts} - {None}
        if vals:
            found = len(vals & {f(x.text) for x in pre.inside if x.source != "data"})  # a data scan's are all in
            frec[k] = {"found": found, "total": len(vals), "recall": found / len(vals)}
    return frec


def _least_likely_inside(logp: np.ndarray, inside: np.ndarray) -> tuple[float | None, float | None]:
    """The log-probability of the least likely input inside epsilon, and the share of inputs outside epsilon more
    likely than it (None where there is no input inside, or none outside)."""
    n_in = int(inside.sum())
    if not n_in:
        return None, None
    min_in = float(logp[inside].min())
    above = float((logp[~inside] > min_in).mean()) if n_in < len(logp) else None
    return min_in, above
