"""Decoder training throughput on the counting task, with activation generation included (fresh inputs,
probed-model forward, decoder forward/backward, optimizer step), against a naive in-script baseline: fp32,
the probed model's full forward pass instead of stopping at the batch's sites, and no length bucketing.

    python benchmarks/bench_train.py [--steps N]
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F

from _common import peak_rss_mib
from inversionview.decoder import Decoder, DecoderConfig
from inversionview.probed import ProbedModel
from inversionview.run import resolve_model
from inversionview.tasks import get_task
from inversionview.train import OptimSpec, State, _step


def naive_step(dec, probed, task, sites, rng, batch, chunk):
    texts = [task.sample(rng) for _ in range(batch)]
    b = probed.batch([probed.encode(t) for t in texts])
    last = [s for s in probed.sites if s.layer == probed.n_layers - 1 and s.kind == "resid_post"]
    acts = probed.run(b.ids, sites + last)  # full forward pass, every site
    total, n = 0.0, 0
    for c in range(batch // chunk):
        si = rng.randrange(len(sites))
        rows = slice(c * chunk, (c + 1) * chunk)
        pos = torch.tensor([rng.choice(task.positions(t)) for t in texts[rows]])
        z = acts[sites[si]][rows][torch.arange(chunk), pos]
        ids = b.ids[rows]  # padded to the batch's longest input
        logits = dec(ids[:, :-1], z, torch.full((chunk,), si))
        tgt = ids[:, 1:].masked_fill(ids[:, 1:] == probed.tokenizer.pad_id, -100)
        total = total + F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        n += int((tgt != -100).sum())
    return total / n, n


def measure(step_fn, dec, steps):
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
    step_fn()  # warm-up
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        loss, n = step_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += n
    return time.perf_counter() - t0, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    probed = ProbedModel.load(resolve_model("shipped:counting"))
    task = get_task("counting")
    sites = [probed.site(s) for s in task.sites]
    o = OptimSpec(batch_size=a.batch, chunk=64, bf16=True)
    print(f"threads {torch.get_num_threads()}, decoder d_model {a.d_model}, batch {a.batch}, {a.steps} steps")
    res = {}
    for name in ("inversionview (bf16, early stop, length buckets)", "naive (fp32, full forward, padded)"):
        torch.manual_seed(0)
        dec = Decoder(DecoderConfig(vocab_size=probed.tokenizer.vocab_size, max_len=probed.max_len, d_act=probed.d_model,
                                    n_sites=len(sites), d_model=a.d_model))
        rng = random.Random(0)
        state = State(site_probs=[1 / len(sites)] * len(sites), site_counts=[0] * len(sites))
        if name.startswith("naive"):
            fn = lambda: naive_step(dec, probed, task, sites, rng, a.batch, 64)  # noqa: E731
        else:
            fn = lambda: _step(dec, probed, task, sites, rng, state, o, 0.01, probed.device)  # noqa: E731
        dt, tokens = measure(fn, dec, a.steps)
        res[name] = a.steps * a.batch / dt
        print(f"{name:50s} {a.steps / dt:6.2f} steps/s  {a.steps * a.batch / dt:7.0f} samples/s  {tokens / dt:8.0f} tokens/s")
    fast, naive = res.values()
    print(f"speed-up: {fast / naive:.2f}x   (the authors' code on this machine class: 0.93 steps/s, ~5,000 tokens/s)")
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
