"""Fidelity of readings against exact preimages: the measure of record for faithful readings (issue 10).

For the built-in enumerable tasks and the shipped models, compute the true epsilon-preimage of random held-out
queries by scanning, then read the same queries with the default reading (the decoder's Auto mix, then chains on the preimage; run for all
queries of a site at once, as ``explain`` runs it, and also one query at a time for --timed queries per site, to time
it and count the members it finds) and compare, per feature of the task,
the share of members that have the query's value (the FCR of one query):

- addition: all 810,000 inputs (exact);
- counting: --stratum inputs of every length 3..27, drawn from the generator conditioned on the length (a
  preimage at the target character is mostly inputs of the query's length and some of the lengths next to it,
  rare under the generator); strata are weighted by their exact probability and each true share comes with its
  standard error (delta method).

The scan is written here from scratch (tokens, the probed model's forward up to the site, distances, masks) and
shares no code with the reading it checks, except the probed model's forward pass and the feature definitions.

Prints per site and overall: the mean and max |FCR(reading) - FCR(true)| over queries and features (the max over
those whose true share is known to within +-0.05), shared-claim violations (the summary calls a feature shared
whose true share is below 0.75), how often the reading's 95% interval holds the true share, the recall of
distinct true members (addition) and the time per reading: warm (the site's generator draws cached by the
readings before, as in the viewer or a batch) and cold (none cached).

    python benchmarks/bench_fidelity.py [--task counting|addition|both] [--queries 32] [--sites a0.0,a1.0]
                                        [--chains 32] [--baseline]

``--baseline`` also reads each query with the decoder's samples alone (``chains=0``, the paper's reading).
Bars: mean <= 0.03 and max <= 0.15 on both tasks with >= 32 queries per site; no violation.
"""

import argparse
import json
import math
import random
import statistics
import time
from collections import defaultdict
from itertools import product
from pathlib import Path

import torch

from inversionview import InversionView, explore
from inversionview.explore import CHAINS, share, wilson
from inversionview.features import builtin_features, preimages
from inversionview.summary import is_shared
from inversionview.tasks.addition import Addition
from inversionview.tasks.counting import Counting

SURE_HALF_WIDTH = 0.05  # a true share counts for the max when its 95% half-width is at most this
MAX_BAR = 0.15  # issue 10's bar on the max error: rows over it are counted
VIOLATION = 0.75
MIN_MEMBERS = 40  # scanned members below which a true share is not known
TASKS = {"addition": Addition, "counting": Counting}  # whose class constants --set may change (addition.draws)


def length_probability(length: int) -> float:
    """P(the counting generator draws ``length`` letters): counts are three independent uniform draws from 1..9."""
    return sum(1 for c in product(range(1, 10), repeat=3) if sum(c) == length) / 729


def counting_with_length(rng: random.Random, length: int) -> str:
    """A counting input drawn from the generator conditioned on its number of letters."""
    from inversionview.tasks.counting import LETTERS

    triples = [c for c in product(range(1, 10), repeat=3) if sum(c) == length]
    counts = rng.choice(triples)
    letters = rng.sample(LETTERS, 3)
    seq = [c for c, n in zip(letters, counts) for _ in range(n)]
    rng.shuffle(seq)
    k = rng.randrange(3)
    return f"{''.join(seq)}|{letters[k]}:{counts[k]}"


def encode(vocab, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + characters + EOS, right-padded with PAD; and the mask of positions a distance is taken at (not PAD
    or EOS)."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    T = max(map(len, texts)) + 2
    out = torch.full((len(texts), T), ids[vocab.pad], dtype=torch.long)
    for r, t in enumerate(texts):
        out[r, : len(t) + 2] = torch.tensor([ids[vocab.bos], *(ids[c] for c in t), ids[vocab.eos]])
    return out, (out != ids[vocab.pad]) & (out != ids[vocab.eos])


@torch.inference_mode()
def scan(iv, site, zq: torch.Tensor, texts: list[str], epsilon: float, chunk: int = 8192) -> torch.Tensor:
    """(Q, N) bool: whether each text is inside each query's epsilon-preimage (min over positions of
    ||zq - z|| / ||zq||)."""
    p = iv.probed
    s = p.site(site)
    inside = []
    for i in range(0, len(texts), chunk):
        ids, valid = encode(p.tokenizer, texts[i : i + chunk])
        z = p.run(ids, [s])[s].float()  # (B, T, d)
        d = torch.cdist(z.reshape(-1, z.shape[-1]), zq).reshape(z.shape[0], z.shape[1], -1)  # (B, T, Q)
        d = (d / zq.norm(dim=-1)).masked_fill(~valid[..., None], math.inf).amin(1)  # (B, Q)
        inside.append((d <= epsilon).T)
    return torch.cat(inside, 1)


def pool(task, n_stratum: int, seed: int = 7):
    """Scan inputs with their weights: addition, all inputs (weight 1); counting, n_stratum inputs of every length
    3..27, each weighted by its length's exact probability over n_stratum. A preimage at the target character holds
    mostly inputs of the query's length, but often some of the lengths next to it: a plain generator scan meets
    few of those where they are rare, and calls a share known that leaves them out."""
    if task.name == "addition":
        texts = list(task.all_inputs())
        return texts, torch.ones(len(texts))
    rng = random.Random(seed)
    texts = [counting_with_length(rng, L) for L in range(3, 28) for _ in range(n_stratum)]
    w = torch.tensor([length_probability(L) / n_stratum for L in range(3, 28) for _ in range(n_stratum)])
    return texts, w


def truth(inside: torch.Tensor, match: torch.Tensor, w: torch.Tensor, exact: bool) -> tuple[float | None, float]:
    """The weighted share of ``match`` among ``inside`` rows and its standard error: 0 where the scan covered every
    input (``exact``: addition), the share of a finite preimage being then known however small it is; else the
    larger of the delta
    method's over the strata (which have constant weights within; counting's lengths L and 30 - L, of equal
    probability, are pooled there, which overstates the error a little) and a binomial one at the members' effective
    number (Kish: (sum w)^2 / sum w^2), so that a share of 0 or 1 among few members is not taken as known;
    infinite below MIN_MEMBERS members, where it means nothing."""
    m = inside.float() * w
    den = m.sum()
    if den == 0:
        return None, math.inf
    r = float((m * match).sum() / den)
    if exact:
        return r, 0.0
    if int(inside.sum()) < MIN_MEMBERS:
        return r, math.inf
    var = 0.0
    for wv in w.unique():
        if wv == 0:
            continue
        rows = w == wv
        n_h = int(rows.sum())
        resid = inside[rows].float() * (match[rows].float() - r)
        var += float((wv * n_h) ** 2 * resid.var(unbiased=True) / n_h) if n_h > 1 else 0.0
    n_eff = float(den) ** 2 / float((m * m).sum())
    lo, hi = wilson(r, n_eff)
    return r, max(math.sqrt(var) / float(den), (hi - lo) / 2 / 1.96)


def run_task(name: str, args) -> dict:
    iv = InversionView.load(f"shipped:{name}")
    task, eps = iv.task, iv.spec.epsilon
    feats = builtin_features(task)
    sites = args.sites.split(",") if args.sites else list(iv.spec.sites)
    rng = random.Random(args.seed)
    qs = {
        s: [task.sample(r, "test") for r in [random.Random(f"{args.seed}:{s}")] for _ in range(args.queries)]
        for s in sites
    }  # each site's queries depend on the site alone, so runs on a subset of sites compare
    t0 = time.perf_counter()
    texts, weights = pool(task, args.stratum)
    values = {k: [f(t) for t in texts] for k, f in feats.items()}
    print(f"{name}: scan pool of {len(texts):,} inputs ({time.perf_counter() - t0:.0f} s to build)")
    rows = defaultdict(list)
    modes = ("chains", "decoder") if args.baseline else ("chains",)
    for site in sites:
        s = iv.probed.site(site)
        poss = [task.positions(t)[i % len(task.positions(t))] for i, t in enumerate(qs[site])]
        b = iv.probed.batch([iv.probed.encode(t) for t in qs[site]])
        zq = iv.probed.run(b.ids, [s])[s].float()[torch.arange(len(poss)), torch.tensor(poss)]
        t0 = time.perf_counter()
        inside = scan(iv, s, zq, texts, eps)
        t_scan = time.perf_counter() - t0
        for mode in modes:
            t0 = time.perf_counter()
            chains = preimages(
                iv,
                qs[site],
                s,
                poss,
                samples=args.samples,
                chains=args.chains if mode == "chains" else 0,
                seed=args.seed,
            )
            t_batch = (time.perf_counter() - t0) / len(poss)
            for q, text in enumerate(qs[site]):
                for k, f in feats.items():
                    vq = f(text)
                    tr, se = truth(inside[q], torch.tensor([v == vq for v in values[k]]), weights, name == "addition")
                    est = share(chains[q], lambda x: f(x) == vq)
                    if tr is None or est is None:
                        continue
                    rows[(mode, site)].append(
                        dict(
                            err=abs(est.share - tr),
                            sure=1.96 * se <= SURE_HALF_WIDTH,
                            violation=is_shared(est) and tr + 1.96 * se < VIOLATION,
                            time=t_batch,
                            feature=k,
                            query=text,
                            truth=tr,
                            read=est.share,
                            low=est.low,
                            high=est.high,
                            n=est.n,
                            groups=len(chains[q]),
                            states=sum(map(len, chains[q])),
                            site=site,
                            mode=mode,
                        )
                    )
            for q in range(min(args.timed, len(poss))):  # the default reading, one query at a time: time and recall
                explore._DRAWN.entries.clear()  # cold: this site's generator draws run through the probed model again
                t0 = time.perf_counter()
                iv.query(
                    qs[site][q],
                    site=site,
                    position=poss[q],
                    samples=args.samples,
                    chains=args.chains if mode == "chains" else 0,
                )
                cold = time.perf_counter() - t0
                t0 = time.perf_counter()  # warm: the draws' activations of the reading before are reused
                pre = iv.query(
                    qs[site][q],
                    site=site,
                    position=poss[q],
                    samples=args.samples,
                    chains=args.chains if mode == "chains" else 0,
                )
                size = int(inside[q].sum())
                found = (
                    pre.chains["distinct"]
                    if pre.chains
                    else sum(1 for x in pre.samples if x.distance <= eps and task.propose(x.text, rng))
                )
                rows[(mode, site)].append(
                    dict(
                        reading=time.perf_counter() - t0,
                        cold=cold,
                        recall=found / size if name == "addition" and size else None,
                    )
                )
        print(
            f"  {site}: scanned in {t_scan:.1f} s; " + "; ".join(report(rows[(m, site)], m) for m in modes), flush=True
        )
        for r in sorted((r for r in rows[("chains", site)] if r.get("sure")), key=lambda r: -r["err"])[:1]:
            print(
                f"    worst: {r['query']} {r['feature']}: read {r['read']:.2f} [{r['low']:.2f}, {r['high']:.2f}], true {r['truth']:.2f}"
            )
        if name == "addition" and "chains" in modes:  # why a query is over the bar: the pieces its reading missed
            over = dict.fromkeys(r["query"] for r in rows[("chains", site)] if r.get("sure") and r["err"] > MAX_BAR)
            for q, text in enumerate(qs[site]):
                if text in over:
                    members = [texts[i] for i in inside[q].nonzero().flatten().tolist()]
                    print(f"    over {MAX_BAR}: {text}: {pieces(task, members, getattr(chains[q], 'members', []))}")
    out = {}
    for mode in ("chains", "decoder") if args.baseline else ("chains",):
        allr = [r for (m, _), v in rows.items() if m == mode for r in v]
        print(f"{name} overall [{mode}]: {report(allr, mode)}")
        if mode == "chains":
            print(f"    by distinct starts: {by_starts(allr)}")
        worst = sorted((r for r in allr if r.get("sure")), key=lambda r: -r["err"])[:3]
        for r in worst:
            print(
                f"    worst: {r['site']} {r['query']} {r['feature']}: read {r['read']:.2f} "
                f"[{r['low']:.2f}, {r['high']:.2f}], true {r['truth']:.2f}"
            )
        out[mode] = allr
    return out


def pieces(task, members: list[str], met: list[tuple]) -> str:
    """The true members split into pieces (connected by the task's neighbours, one part apart: no move of the
    reading's chains or closure crosses between pieces) and how many of each piece the reading met."""
    left, met_set, out = set(members), {x for x, _ in met}, []
    while left:
        piece, frontier = set(), [left.pop()]
        while frontier:
            piece.update(frontier)
            frontier = [y for x in frontier for y in task.neighbours(x) if y in left]
            left.difference_update(frontier)
        out.append((len(piece & met_set), len(piece)))
    out.sort(key=lambda m: (-m[0], -m[1]))
    reached = [m for m in out if m[0]]
    return (
        f"{len(members)} true members in {len(out)} pieces; the reading met {sum(m for m, _ in out)} in "
        f"{len(reached)} of them (met/size: {', '.join(f'{m}/{n}' for m, n in out[:8])}{' ...' if len(out) > 8 else ''})"
    )


def report(rows: list[dict], mode: str) -> str:
    errs = [r["err"] for r in rows if "err" in r]
    if not errs:
        return f"[{mode}] no rows"
    sure = [r["err"] for r in rows if r.get("sure")]
    rec = [r["recall"] for r in rows if r.get("recall") is not None]
    times = [r["reading"] for r in rows if "reading" in r]
    cold = [r["cold"] for r in rows if "cold" in r]
    held = [r["low"] - 1e-9 <= r["truth"] <= r["high"] + 1e-9 for r in rows if r.get("sure") and "low" in r]
    held_over = [
        r["low"] - 1e-9 <= r["truth"] <= r["high"] + 1e-9 for r in rows if r.get("sure") and r["err"] > MAX_BAR
    ]
    return (
        f"[{mode}] mean |dFCR| {statistics.mean(sure) if sure else float('nan'):.3f} known, "
        f"{statistics.mean(errs):.3f} all, max {max(sure) if sure else float('nan'):.3f} "
        f"({len(sure)}/{len(errs)} known to +-{SURE_HALF_WIDTH}), {sum(e > MAX_BAR for e in sure)} known over {MAX_BAR}, "
        f"violations {sum(r.get('violation', 0) for r in rows)}"
        + (
            f", the 95% interval holds the truth in {statistics.mean(held):.1%} of known rows "
            f"({sum(held_over)} of the {len(held_over)} over {MAX_BAR})"
            if held
            else ""
        )
        + (f", recall median {statistics.median(rec):.1%}" if rec else "")
        + f", {statistics.mean(r['time'] for r in rows if 'time' in r):.2f} s per query batched"
        + (f", {statistics.median(times):.2f} s per reading (median of {len(times)})" if times else "")
        + (f", {statistics.median(cold):.2f} s cold (no draws cached)" if cold else "")
    )


def by_starts(rows: list[dict]) -> str:
    """The known rows' errors by the number of distinct starts their chains began at (a share's groups)."""
    out = []
    for lo, hi in ((1, 1), (2, 4), (5, 15), (16, math.inf)):
        e = [r["err"] for r in rows if r.get("sure") and lo <= r["groups"] <= hi]
        if e:
            name = f"{lo}+" if hi == math.inf else f"{lo}" if lo == hi else f"{lo}-{hi}"
            out.append(f"{name}: {len(e)} rows, mean {statistics.mean(e):.3f}, max {max(e):.3f}")
    return "; ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="both", choices=["counting", "addition", "both"])
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--sites", default=None)
    ap.add_argument("--chains", type=int, default=CHAINS)
    ap.add_argument("--samples", type=int, default=1024, help="decoder candidates per query (the default reading's)")
    ap.add_argument("--timed", type=int, default=4, help="queries per site also read one at a time (time, recall)")
    ap.add_argument("--stratum", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--dump", default=None, help="write every compared (query, feature) row to this JSON file")
    ap.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a reading's constant (explore.STEPS=48)"
    )
    args = ap.parse_args()
    for kv in args.set:  # a lever to measure: e.g. --set STEPS=48 --set GLOBAL=0.05 --set addition.draws=8192
        k, _, v = kv.partition("=")
        owner, _, k = k.rpartition(".")
        where = TASKS.get(owner, explore) if owner else explore
        if owner not in ("", *TASKS) or not hasattr(where, k):
            raise SystemExit(f"--set {kv}: expected an explore constant (STEPS) or a task's (addition.draws)")
        setattr(where, k, type(getattr(where, k))(v))
        print(f"{owner or 'explore'}.{k} = {getattr(where, k)}")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    dump = {}
    for name in ["counting", "addition"] if args.task == "both" else [args.task]:
        dump[name] = run_task(name, args)
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
