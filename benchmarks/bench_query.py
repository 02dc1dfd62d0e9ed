"""Latency of one Auto query (1024 candidates: sampling, verification, deltas) on the shipped counting
decoder, against a naive in-script baseline: generation without a KV cache (the whole prefix recomputed at
every step) and verification with the full forward pass instead of stopping at the site's layer.

Target: <= 1 s on 2 CPU cores.

    python benchmarks/bench_query.py [RUN_DIR]
"""

import sys
import time

import torch

from _common import best_of, peak_rss_mib
from inversionview import InversionView
from inversionview.propose import AUTO_MIX

TEXT, SITE, POS = "vvzccvczvvvzvcvc|v:8", "a1.0", ":"


@torch.no_grad()
def naive_query(iv, n=1024):
    """The same work as an Auto query, written naively: no KV cache, no early stop, no de-duplication."""
    p, dec, tok = iv.probed, iv.decoder, iv.probed.tokenizer
    s, si = iv.site_index(SITE)
    ids = p.encode(TEXT)
    pos = ids.index(tok.tokens.index(":"))
    all_sites = [x for x in p.sites if x.layer == p.n_layers - 1 and x.kind == "resid_post"]
    acts = p.run(torch.tensor([ids]), [s] + all_sites)[s][0]
    zq = acts[pos]
    per = n // len(AUTO_MIX)
    z = torch.cat([zq + torch.randn(per, zq.shape[0]) * zq.std() * eta for _, eta in AUTO_MIX])
    tau = torch.cat([torch.full((per,), t) for t, _ in AUTO_MIX])
    site = torch.full((n,), si)
    seq = torch.full((n, 1), tok.bos_id)
    for _ in range(p.max_len - 1):  # recompute the whole sequence each step
        logits = dec(seq, z, site)[:, -1]
        nxt = torch.multinomial(torch.softmax(logits / tau[:, None], -1), 1)
        seq = torch.cat([seq, nxt], 1)
    seqs = []
    for row in seq.tolist():
        seqs.append(row[: row.index(tok.eos_id, 1) + 1] if tok.eos_id in row[1:] else row)
    b = p.batch(seqs)
    a = p.run(b.ids, [s] + all_sites)[s]  # full forward pass
    d = ((a - zq).norm(dim=-1) / zq.norm()).masked_fill(~b.valid, float("inf")).min(-1).values
    dec.token_probs(b.ids, zq.expand(n, -1), site), dec.token_probs(b.ids, acts[0].expand(n, -1), site)
    return d


def main():
    run = sys.argv[1] if len(sys.argv) > 1 else "shipped:counting"
    iv = InversionView.load(run)
    print(f"threads: {torch.get_num_threads()}, run: {run}")
    t_fast, pre = best_of(lambda: iv.query(TEXT, site=SITE, position=POS))
    print(
        f"auto query ({pre.n_candidates} candidates, {len(pre.samples)} distinct, deltas for the closest 256): "
        f"{t_fast * 1000:.0f} ms   [target <= 1000 ms]  inside epsilon: {pre.fraction_inside:.1%}"
    )
    t_naive, _ = best_of(lambda: naive_query(iv), repeat=1)
    print(f"naive baseline (no KV cache, full forward, no de-duplication): {t_naive * 1000:.0f} ms")
    print(f"speed-up: {t_naive / t_fast:.1f}x")
    for site in ("x0.pre", "m0", "a1.0", "x1.post"):
        t0 = time.perf_counter()
        iv.query(TEXT, site=site, position=POS)
        print(f"  {site:8s} {1000 * (time.perf_counter() - t0):.0f} ms")
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
