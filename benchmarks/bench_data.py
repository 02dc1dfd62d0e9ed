"""Readings under a data set (issue 27): fidelity against a truth scanned on other inputs, and scale.

``fidelity``: the shipped models read as one's own models under a data file of generator inputs (counting:
--data-size draws; addition: a random half of all 810,000 inputs) and compared with a truth scanned on *other*
inputs (counting: as many other draws; addition: the other half). Queries: --queries per site, held-out inputs drawn
with --seed (name a seed never used before for the figure of record). Per query and built-in feature (a *row*),
the reading's share of the query's value against the truth's. A row is *known* when the truth's preimage holds at
least 40 inputs and its 95% half-width is at most 0.05. Prints per site and overall: known and unknown rows, rows
the reading reports a share for, mean and max |error| over known reported rows, rows over 0.15, "shared" claims whose
truth is below 0.75, how often the 95% interval holds the truth, and the share of rows whose data preimage holds at
least 50 members that the reading reports (not "too few").

The truth's scan is written here: the probed model's activations batch by batch (verify.activations) and distances
by torch.cdist; it shares nothing with the reading's cached scan (dataset.py) but the probed model's forward pass.

``scale``: a counting data set of at least --tokens tokens: the first scan (building the cache) at one site against a
plain forward pass of the same inputs to that layer, the cache's size on disk, peak memory, and a cached reading's
time against a decoder-only reading (no chains, no data).

    python benchmarks/bench_data.py fidelity --seed 4242 [--task counting|addition|both] [--queries 32]
    python benchmarks/bench_data.py scale [--tokens 1000000] [--site a1.0]

Bars: mean <= 0.03, max <= 0.15 over known reported rows, no false "shared", >= 90% of rows with >= 50 data members
reported; scale: build >= 0.8x a plain forward pass, cached reading <= 2x a decoder-only one.
"""

import argparse
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from itertools import product

import torch
from _common import peak_rss_mib

from inversionview import InversionView
from inversionview.dataset import ActivationIndex, DataSet
from inversionview.estimate import Z, wilson
from inversionview.features import builtin_features
from inversionview.summary import FEW, is_shared
from inversionview.verify import activations, length_batches

KNOWN_MEMBERS, KNOWN_HALF_WIDTH, OVER, VIOLATION, REPORT_AT = 40, 0.05, 0.15, 0.75, 50


def addition_inputs() -> list[str]:
    return [f"{a}+{b}={a + b}" for a, b in product(range(100, 1000), repeat=2)]


@torch.inference_mode()
def truth_scan(probed, site, texts: list[str], zq: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(Q, N) bool: whether each truth input lies within epsilon of each query (min over positions, PAD/EOS out)."""
    seqs = [probed.encode(t) for t in texts]
    inside = torch.zeros(len(zq), len(texts), dtype=torch.bool)
    for rows, act, invalid in activations(probed, site, seqs, 4096):
        d = torch.cdist(act.reshape(-1, act.shape[-1]), zq).reshape(act.shape[0], act.shape[1], -1)
        d = (d / zq.norm(dim=-1)).masked_fill(invalid[..., None], math.inf).amin(1)  # (B, Q)
        inside[:, rows] = (d <= epsilon).T
    return inside


def fidelity(task: str, args) -> list[dict]:
    iv = InversionView.load(f"shipped:{task}")
    probed, eps = iv.probed, iv.spec.epsilon
    rng = random.Random(args.seed)
    if task == "addition":
        everything = addition_inputs()
        rng.shuffle(everything)
        data_texts, truth_texts = everything[: len(everything) // 2], everything[len(everything) // 2 :]
    else:
        data_texts = [iv.task.generate(rng) for _ in range(args.data_size)]
        truth_texts = [iv.task.generate(rng) for _ in range(args.truth_size or args.data_size)]
    data = DataSet.from_texts(data_texts, f"{task} data ({len(data_texts):,} inputs, seed {args.seed})")
    feats = builtin_features(task)
    sites = [s.strip() for s in args.sites.split(",")] if args.sites else [s.short for s in iv.sites]
    rows = []
    for site in sites:
        s = probed.site(site)
        qrng = random.Random(f"{args.seed}-{site}")
        qs = [iv.task.sample(qrng, "test") for _ in range(args.queries)]
        poss = [qrng.choice(iv.task.positions(q)) for q in qs]
        ids = probed.batch([probed.encode(q) for q in qs]).ids
        zq = probed.run(ids, [s])[s].float()[torch.arange(len(qs)), torch.tensor(poss)]
        t0 = time.perf_counter()
        iv.data_index(s, data)
        build = time.perf_counter() - t0
        inside = truth_scan(probed, s, truth_texts, zq, eps)
        times = []
        for k, (q, p) in enumerate(zip(qs, poss)):
            t0 = time.perf_counter()
            pre = iv.query(q, site=site, position=p, data=data, samples=args.samples, seed=args.seed)
            times.append(time.perf_counter() - t0)
            members = [truth_texts[i] for i in inside[k].nonzero()[:, 0].tolist()]
            found = pre.distribution["found"]
            for sh in pre.shares:
                f, v = feats[sh["feature"]], sh["value"]
                m = len(members)
                t = sum(f(x) == v for x in members) / m if m else None
                lo, hi = wilson(t, m) if m else (0.0, 1.0)
                rows.append(
                    {
                        "site": site,
                        "query": q,
                        "position": p,
                        "feature": sh["feature"],
                        "truth": t,
                        "truth_se": math.sqrt(t * (1 - t) / m) if m else None,
                        "members": m,
                        "known": m >= KNOWN_MEMBERS and (hi - lo) / 2 <= KNOWN_HALF_WIDTH,
                        "share": sh["share"] if found >= FEW else None,
                        "low": sh["low"],
                        "high": sh["high"],
                        "shared": is_shared(sh) and found >= FEW,
                        "data_members": found,
                    }
                )
        print(
            f"  {task} {site}: cache built in {build:.1f} s, reading median {statistics.median(times):.2f} s",
            flush=True,
        )
        report([r for r in rows if r["site"] == site], f"{task} {site}")
    return rows


def report(rows: list[dict], label: str) -> None:
    known = [r for r in rows if r["known"]]
    scored = [r for r in known if r["share"] is not None]
    errs = [abs(r["share"] - r["truth"]) for r in scored]
    big = [r for r in rows if r["data_members"] >= REPORT_AT]
    viol = [r for r in rows if r["shared"] and r["truth"] is not None and r["truth"] < VIOLATION]
    held = [r["low"] - 1e-9 <= r["truth"] <= r["high"] + 1e-9 for r in scored]
    # the truth is a sample too: the reading's half-width and the truth's own, combined
    both = [
        abs(r["share"] - r["truth"]) <= math.hypot((r["high"] - r["low"]) / 2, Z * r["truth_se"]) + 1e-9 for r in scored
    ]
    print(
        f"{label:>16}: rows {len(rows)}, known {len(known)} (unknown {len(rows) - len(known)}), scored {len(scored)}; "
        + (
            f"mean |error| {statistics.mean(errs):.3f}, max {max(errs):.3f}, over {OVER} {sum(e > OVER for e in errs)}; "
            if errs
            else ""
        )
        + f"false shared {len(viol)}; interval holds {sum(held) / max(1, len(held)):.1%} "
        f"({sum(both) / max(1, len(both)):.1%} with the truth's own noise); "
        f"reported at >= {REPORT_AT} data members {sum(r['share'] is not None for r in big) / max(1, len(big)):.1%}",
        flush=True,
    )


def cmd_fidelity(args) -> None:
    torch.set_num_threads(args.threads)
    tasks = ["counting", "addition"] if args.task == "both" else [args.task]
    every = []
    for task in tasks:
        print(
            f"{task}: seed {args.seed}, {args.queries} queries per site, {args.samples} decoder candidates", flush=True
        )
        rows = fidelity(task, args)
        report(rows, f"{task} all")
        every += rows
    report(every, f"all (seed {args.seed})")


def cmd_scale(args) -> None:
    torch.set_num_threads(args.threads)
    iv = InversionView.load("shipped:counting")
    probed, s = iv.probed, iv.probed.site(args.site)
    rng = random.Random(args.seed)
    texts, tokens = [], 0
    while tokens < args.tokens:
        t = iv.task.generate(rng)
        texts.append(t)
        tokens += len(probed.encode(t))
    data = DataSet.from_texts(texts, f"counting ({len(texts):,} inputs)")
    root = tempfile.mkdtemp()
    try:
        seqs = [probed.encode(t) for t in texts]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for rows in length_batches([len(x) for x in seqs], 1024):
                probed.run(probed.batch([seqs[r] for r in rows]).ids, [s])
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = ActivationIndex.open(probed, s, data, root)
        first = time.perf_counter() - t0
        q = "vvzccvczvvvzvcvc|v:8"
        iv.query(q, site=args.site, position=":", data=data, samples=1024)  # warm
        cached, alone = [], []
        for k in range(args.repeat):
            t0 = time.perf_counter()
            iv.query(q, site=args.site, position=":", samples=1024, chains=0, seed=k)
            alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pre = iv.query(q, site=args.site, position=":", data=data, samples=1024, seed=k)
            cached.append(time.perf_counter() - t0)
        a, c = statistics.median(alone), statistics.median(cached)
        print(
            f"data: {len(texts):,} inputs, {tokens:,} tokens (with BOS/EOS), {index.rows:,} rows stored at {args.site}"
        )
        print(
            f"first scan (cache build): {first:.2f} s; plain forward pass to layer {s.layer}: {plain:.2f} s; "
            f"speed ratio {plain / first:.2f} (goal >= 0.8)"
        )
        print(
            f"cache on disk: {index.nbytes / 2**20:.1f} MiB ({index.meta['storage']}, measured error {index.error:.2e})"
        )
        print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")
        print(
            f"reading: decoder only {a:.2f} s, under the data (cached) {c:.2f} s: ratio {c / a:.2f} (goal <= 2); "
            f"scan {pre.distribution['scan']['seconds']:.3f} s, {pre.distribution['found']:,} members"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity")
    f.add_argument("--seed", type=int, required=True, help="draws the data, the truth's inputs and the queries")
    f.add_argument("--task", default="both", choices=["counting", "addition", "both"])
    f.add_argument("--queries", type=int, default=32)
    f.add_argument("--sites", default="")
    f.add_argument(
        "--samples", type=int, default=64, help="decoder candidates per reading (the shares do not use them)"
    )
    f.add_argument("--data-size", type=int, default=200_000, help="counting: inputs in the data")
    f.add_argument("--truth-size", type=int, default=0, help="counting: inputs the truth scans (default: --data-size)")
    f.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 1)))
    f.set_defaults(fn=cmd_fidelity)
    s = sub.add_parser("scale")
    s.add_argument("--tokens", type=int, default=1_000_000)
    s.add_argument("--site", default="a1.0")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    s.set_defaults(fn=cmd_scale)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
