"""Peak memory (RSS) of reading with a GPT-2-small-shaped probed model on CPU: transformers' GPT2Config defaults
(12 layers, d_model 768, 12 heads, vocabulary 50,257) with random weights, GPT-2's tokenizer, the IOI task, and a
small decoder trained for a few steps with ``inversionview.train``. One difference from the defaults: a context
of 24 positions instead of 1,024. A decoder trained for four steps never samples the stop token, so every
sample runs to the context's length; IOI inputs are at most 23 tokens with BOS and the stop token (3,000
sampled), so 24 bounds what a trained decoder samples, while 1,024 would make each reading 40x longer without
saying anything about a real one. The position table is under 1 % of the weights either way.

Each stage runs in its own process, so each peak is that stage's own:

- setup: build and save the model, train the decoder (4 steps, batch 16);
- read: ``InversionView.load`` (the probed model in ``tl`` mode, and the decoder), then one Auto reading (1,024
  candidates, verification, deltas for the 256 closest);
- read, no deltas: the same with ``deltas=0``, to show what the delta colours cost with a 50,257-token vocabulary.

The reading is at head a0.1 (layer 0), so verification runs one block; a deeper site runs more blocks one after
another (early stop frees each block's activations), which costs time, not memory.

    cd benchmarks && python bench_memory.py
"""

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_POSITIONS = 24
TEXT = "Then, Mary and John went to the store. John gave a drink to Mary"
SITE, POSITION = "a0.1", -2  # the end position: " to", before the final name


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def setup(tmp: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from inversionview.train import TrainConfig, train

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=N_POSITIONS)
    model = GPT2LMHeadModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp / "gpt2-small-random")
    del model
    (tmp / "train.toml").write_text("""out = "run"
[probed]
model = "gpt2-small-random"
tokenizer = "gpt2"
[data]
task = "ioi"
sites = ["a0.1", "x0.mid"]
[decoder]
d_model = 64
n_layers = 2
n_heads = 2
n_act_blocks = 1
[train]
steps = 4
batch_size = 16
chunk = 8
warmup = 1
[eval]
every = 1000
queries = 4
checkpoint_every = 1000
""")
    t = time.perf_counter()
    train(TrainConfig.from_toml(tmp / "train.toml"), progress=False)
    print(
        f"setup: GPT-2-small-shaped model, {n / 1e6:.1f} M parameters ({cfg.n_layer} layers, d_model {cfg.n_embd}, "
        f"vocabulary {cfg.vocab_size}, {N_POSITIONS} positions); decoder trained 4 steps in "
        f"{time.perf_counter() - t:.1f} s; peak RSS {peak_mib():.0f} MiB"
    )


def read(tmp: Path, deltas: int) -> None:
    import torch

    from inversionview import InversionView

    base = rss_mib()
    t = time.perf_counter()
    iv = InversionView.load(tmp / "run")
    t_load = time.perf_counter() - t
    loaded, peak_load = rss_mib(), peak_mib()
    if deltas:
        print(
            f"load: {t_load:.1f} s; RSS {loaded:.0f} MiB after loading (peak {peak_load:.0f} MiB; "
            f"{base:.0f} MiB before, with torch imported)"
        )
    t = time.perf_counter()
    pre = iv.query(TEXT, site=SITE, position=POSITION, samples=1024, deltas=deltas)
    t_read = time.perf_counter() - t
    mean_len = sum(len(s.tokens) for s in pre.samples) / len(pre.samples)
    print(
        f"read{'' if deltas else ', no deltas'}: {t_read:.1f} s ({len(pre.samples)} distinct samples, "
        f"{mean_len:.0f} tokens each on average, deltas for {min(deltas, len(pre.samples))}); "
        f"peak RSS {peak_mib():.0f} MiB ({peak_mib() - loaded:+.0f} MiB over the loaded model); "
        f"threads {torch.get_num_threads()}"
    )


def main():
    if len(sys.argv) > 1:  # a stage, in its own process
        stage, tmp = sys.argv[1], Path(sys.argv[2])
        setup(tmp) if stage == "setup" else read(tmp, int(stage))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("setup", "256", "0"):
            subprocess.run([sys.executable, __file__, stage, tmp], check=True)
    print(
        "RSS from getrusage (ru_maxrss) and /proc/self/statm. The machine is shared: times vary with its load; "
        "peaks much less."
    )


if __name__ == "__main__":
    main()
