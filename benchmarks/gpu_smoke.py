"""GPU smoke test and throughput: train a decoder for a few hundred steps on one GPU, then read with it there.

1. the counting task with the shipped probed model and a paper-shaped decoder (d_model 256), bf16 autocast;
2. a GPT-2-small-shaped probed model (random weights, 12 layers, d_model 768) held in bfloat16
   ([probed] dtype), sites in layers 6 and 11;
3. Auto queries (1024 candidates) with the first decoder, probed model and decoder on the GPU.

Prints steps/s, samples/s, tokens/s (the training loop's own figures, from metrics.jsonl), query latency and
peak GPU memory. With no CUDA GPU it prints one line and exits with status 0. ``--device cpu`` runs the same
script on the CPU (a dry run of the script itself; use a few steps).

    python benchmarks/gpu_smoke.py [--steps 300] [--device cuda]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import peak_rss_mib
from inversionview import InversionView
from inversionview.probed import ProbedModel
from inversionview.tasks import get_task
from inversionview.train import TrainConfig, train

TEXT, SITE, POS = "vvzccvczvvvzvcvc|v:8", "a1.0", ":"


def gpt2_small_probed(path: Path) -> Path:
    """A GPT-2-small-shaped model (random weights) over the counting vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    v = get_task("counting").vocab
    cfg = GPT2Config(
        vocab_size=v.vocab_size,
        n_positions=64,
        n_layer=12,
        n_head=12,
        n_embd=768,
        bos_token_id=v.bos_id,
        eos_token_id=v.eos_id,
        pad_token_id=v.pad_id,
    )
    ProbedModel(GPT2LMHeadModel(cfg), v, mode="tl").save(path)
    return path


def run(name: str, d: Path, toml: str, device: torch.device) -> dict:
    (d / f"{name}.toml").write_text(toml)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    iv = train(TrainConfig.from_toml(d / f"{name}.toml"), progress=False)
    wall = time.perf_counter() - t
    row = json.loads((d / name / "metrics.jsonl").read_text().splitlines()[-1])
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"train {name:14s} {row['step']} steps in {wall:5.1f} s (incl. setup)  {row['samples_per_s'] / 256:6.2f} steps/s  "
        f"{row['samples_per_s']:8.0f} samples/s  {row['tokens_per_s']:9.0f} tokens/s  peak GPU memory {mem:.2f} GiB"
    )
    return {"iv": iv, "row": row}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA GPU available (torch {torch.__version__}); nothing measured")
        sys.exit(0)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, {a.steps} steps per run")
    every = max(a.steps // 3, 1)
    common = f"""
[train]
steps = {a.steps}
batch_size = 256
chunk = 64
lr = 3e-3
warmup = {min(100, a.steps // 4)}
device = "{a.device}"
[eval]
every = {every}
queries = 64
checkpoint_every = {a.steps}
"""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run(
            "counting",
            d,
            'out = "counting"\n[probed]\nmodel = "shipped:counting"\n[decoder]\nd_model = 256\n' + common,
            device,
        )
        probed = gpt2_small_probed(d / "gpt2-small-shaped")
        run(
            "gpt2-small-bf16",
            d,
            f'out = "gpt2-small-bf16"\n[probed]\nmodel = "{probed}"\ndtype = "bfloat16"\n'
            '[data]\ntask = "counting"\nsites = ["x6.post", "a11.0", "x11.post"]\n[decoder]\nd_model = 256\n' + common,
            device,
        )

        iv = InversionView.load(d / "counting", device=a.device)
        times = []
        for seed in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            pre = iv.query(TEXT, site=SITE, position=POS, samples=1024, seed=seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        best = min(times[1:])  # the first call warms up kernels
        print(
            f"read  Auto query, 1024 candidates: {best * 1000:.0f} ms ({1 / best:.1f} readings/s); "
            f"{len(pre.samples)} distinct samples, {pre.fraction_inside:.2f} inside epsilon"
        )
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
