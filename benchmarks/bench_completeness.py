"""Completeness scan throughput: all 810,000 addition inputs at one site (the shipped addition model and decoder,
``456+378=834`` at a0.0 on ``=``, 1024 decoder samples), against a naive in-script baseline for the decoder's
log-probabilities (the decoder's own forward on every whole input, conditioning recomputed per row, in batches),
timed on a slice of 32,768 inputs. Wall and CPU time are both printed: on a shared machine the wall time also
counts other processes. About 2-3 minutes.

Target: the whole scan in <= 60 s on 2 CPU cores.

    python benchmarks/bench_completeness.py [SITE]
"""

import os
import resource
import sys
import time

import torch

from _common import peak_rss_mib
from inversionview import InversionView
from inversionview.completeness import _encode_all, scan, scan_logprobs

TEXT, POS, TARGET = "456+378=834", "=", 60.0


@torch.inference_mode()
def naive_logprobs(iv, site, texts, batch=4096):
    p, dec = iv.probed, iv.decoder
    s, si = iv.site_index(site)
    zq = p.run(torch.tensor([p.encode(TEXT)]), [s])[s][0, 8].float()
    for _, ids in _encode_all(p.tokenizer, texts).values():
        for i in range(0, len(ids), batch):
            b = ids[i : i + batch]
            logp = dec(b[:, :-1], zq.expand(len(b), -1), torch.full((len(b),), si)).float().log_softmax(-1)
            logp.gather(-1, b[:, 1:, None]).sum((1, 2))


def timed(fn, repeat=2):
    """Best wall time and best CPU time (user + sys) of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - t)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return min(walls), min(cpus)


def main():
    site = sys.argv[1] if len(sys.argv) > 1 else "a0.0"
    torch.set_num_threads(2)
    iv = InversionView.load("shipped:addition")
    load = os.getloadavg()[0]
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = scan(iv, TEXT, site, POS, samples=1024)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    n = res.n_inputs
    print(
        f"Scan of the shipped addition model: {TEXT!r} at {site} on {POS!r}, {torch.get_num_threads()} threads "
        f"(load average {load:.1f} before the run; the machine has {os.cpu_count()} cores)"
    )
    print(
        f"  {n:,} inputs in {wall:.1f} s wall = {n / wall:,.0f} inputs/s; target {TARGET:.0f} s: "
        f"{wall / TARGET:.2f}x the target ({'met' if wall <= TARGET else 'NOT met'})"
    )
    print(
        f"  CPU time {cpu:.1f} s (user + sys) = {cpu / 2:.1f} s on 2 otherwise idle cores "
        f"({cpu / 2 / TARGET:.2f}x the target)"
    )
    s = res.seconds
    print(
        f"  distances {s['distances']:.1f} s ({n / s['distances']:,.0f} inputs/s), log-probabilities "
        f"{s['logprobs']:.1f} s ({n / s['logprobs']:,.0f} inputs/s), 1024 samples {s['samples']:.1f} s"
    )
    # the decoder pass alone on a slice, against the naive baseline, best of 2 each (the machine may be shared)
    slice_ = res.texts[200_000 : 200_000 + 32_768]
    s_, si = iv.site_index(site)
    zq = iv.probed.run(torch.tensor([iv.probed.encode(TEXT)]), [s_])[s_][0, 8].float()
    buckets = _encode_all(iv.probed.tokenizer, slice_)

    def ours():
        with torch.inference_mode():
            for ids in (b for _, b in buckets.values()):
                scan_logprobs(iv.decoder, si, zq, ids)

    (w_ours, c_ours), (w_naive, c_naive) = timed(ours), timed(lambda: naive_logprobs(iv, site, slice_))
    print(
        f"  decoder log-probabilities on {len(slice_):,} inputs: shared-prefix pass {w_ours:.2f} s wall / "
        f"{c_ours:.2f} s CPU, naive plain forward {w_naive:.2f} s / {c_naive:.2f} s: {w_naive / w_ours:.1f}x faster by wall time, "
        f"{c_naive / c_ours:.1f}x by CPU time"
    )
    print(f"  true preimage {res.n_inside:,}, recall {res.recall:.3f}, peak memory {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
