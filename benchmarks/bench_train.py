"""Decoder training throughput on the counting task, with activation generation included (fresh inputs,
probed-model forward, decoder forward/backward, optimizer step): the real trainer's step in float32 and under
bf16 autocast, and a naive in-script baseline (fp32, the probed model's full forward pass instead of stopping at
the batch's sites, no length bucketing). It prints the CPU's capability, the precision that ``bf16 = "auto"``
chooses on this machine and why, and the speed of each.

    python benchmarks/bench_train.py [--steps N] [--max-seconds S] [--device cpu|cuda]

Each configuration runs ``--steps`` steps after one warm-up step, or fewer when it passes ``--max-seconds`` (bf16
on a CPU without bf16 instructions is slow).
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import peak_rss_mib
from inversionview.decoder import Decoder, DecoderConfig
from inversionview.distributed import choose_bf16, cpu_bf16_flags
from inversionview.probed import ProbedModel
from inversionview.run import resolve_model
from inversionview.tasks import get_task
from inversionview.train import TrainConfig, Trainer


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


def measure(step, steps: int, max_seconds: float):
    """Run ``step`` (returning its token count) after one warm-up call; (steps, seconds, tokens)."""
    step()
    t0, tokens, done = time.perf_counter(), 0, 0
    while done < steps and (done < 2 or time.perf_counter() - t0 < max_seconds):
        tokens += step()
        done += 1
    return done, time.perf_counter() - t0, tokens


def trainer(d: Path, bf16: bool, a) -> Trainer:
    (d / "train.toml").write_text(f"""out = "run"
[probed]
model = "shipped:counting"
[data]
task = "counting"
[decoder]
d_model = {a.d_model}
[train]
batch_size = {a.batch}
chunk = 64
bf16 = {str(bf16).lower()}
device = "{a.device}"
[eval]
queries = 8
""")
    return Trainer(TrainConfig.from_toml(d / "train.toml"), device=a.device)


def trainer_step(t: Trainer):
    def step():
        before = t.tokens
        t.step()
        return t.tokens - before

    return step


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    """This machine's practical fp32 peak: GFLOP/s of a large square matmul at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def useful_flops_per_token(d: int, layers: int, vocab: int, mean_len: float, probed: ProbedModel) -> float:
    """Forward + backward FLOPs of the decoder per predicted token (3x the forward: 24 d^2 per layer for the
    projections and MLP, 4 d per attended slot, 2 d V for the logits), plus the probed model's forward over the
    same token (24 d_p^2 per layer). The per-sample conditioning MLP is left out (under 1 %)."""
    slots = mean_len / 2 + 1  # causal attention: on average half the input, plus the prefix slot
    decoder = 24 * d * d * layers + 4 * d * slots * layers + 2 * d * vocab
    return 3 * decoder + 24 * probed.d_model**2 * probed.n_layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    auto, why = choose_bf16("auto", dev)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, CPU bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}"
    )
    print(f'bf16 = "auto" on {dev}: {"bfloat16" if auto else "float32"} ({why})')
    print(f"decoder d_model {a.d_model}, batch {a.batch}, up to {a.steps} steps or {a.max_seconds:g} s each")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bf16 in (("inversionview float32", False), ("inversionview bf16 autocast", True)):
            (Path(tmp) / name).mkdir()
            torch.manual_seed(0)
            t = trainer(Path(tmp) / name, bf16, a)
            res[name] = measure(trainer_step(t), a.steps, a.max_seconds)
    probed = ProbedModel.load(resolve_model("shipped:counting"), device=dev)
    task = get_task("counting")
    sites = [probed.site(s) for s in task.sites]
    torch.manual_seed(0)
    dec = Decoder(
        DecoderConfig(
            vocab_size=probed.tokenizer.vocab_size,
            max_len=probed.max_len,
            d_act=probed.d_model,
            n_sites=len(sites),
            d_model=a.d_model,
        )
    ).to(dev)
    opt, rng = torch.optim.AdamW(dec.parameters(), lr=1e-3), random.Random(0)

    def naive():
        loss, n = naive_step(dec, probed, task, sites, rng, a.batch, 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return n

    res["naive (fp32, full forward, padded)"] = measure(naive, a.steps, a.max_seconds)
    for name, (steps, dt, tokens) in res.items():
        print(
            f"{name:40s} {steps:3d} steps  {steps / dt:6.2f} steps/s  {steps * a.batch / dt:7.0f} samples/s  "
            f"{tokens / dt:8.0f} tokens/s"
        )
    speed = {k: v[2] / v[1] for k, v in res.items()}
    fp32, bf16, base = speed.values()
    chosen = bf16 if auto else fp32
    print(
        f"bf16 / float32 tokens/s: {bf16 / fp32:.2f}x   auto's choice / naive: {chosen / base:.2f}x   "
        "(the authors' code on this machine class: 0.93 steps/s, ~5,000 tokens/s)"
    )
    peak = matmul_gflops()
    steps, dt, tokens = res["inversionview float32"]
    per_tok = useful_flops_per_token(a.d_model, 2, probed.tokenizer.vocab_size, tokens / (steps * a.batch), probed)
    useful = tokens / dt * per_tok / 1e9
    print(
        f"fp32 matmul peak (1024^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s; decoder training "
        f"(float32): {per_tok / 1e6:.2f} MFLOP per token x {tokens / dt:.0f} tokens/s = {useful:.1f} GFLOP/s "
        f"useful, {useful / peak:.1%} of the peak"
    )
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
