"""Training throughput with 2 processes (torchrun, DDP over gloo, one thread each) against 1 process (one thread,
and two threads), on the CPU. The config is the shipped counting decoder's shape (decoder d_model 128, batch 256,
chunk 64, the shipped probed model); the same global batch in every case.

The figure is the training loop's own samples/s from metrics.jsonl (activations included; start-up, the
one-off site statistics and the hit-rate evaluation excluded), with the whole command's wall time beside it.

    python benchmarks/bench_distributed.py [--steps 30]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """out = "run"
[probed]
model = "shipped:counting"
[decoder]
d_model = 128
[train]
steps = {steps}
batch_size = 256
chunk = 64
lr = 3e-3
warmup = 10
device = "cpu"
[eval]
every = {steps}
queries = 8
checkpoint_every = {steps}
"""


def measure(name: str, cmd: list[str], threads: int, d: Path) -> float:
    run = d / "run"
    if run.exists():
        for f in run.iterdir():
            f.unlink()
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"{name} failed: {done.stderr[-2000:]}")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    print(
        f"{name:38s} {row['samples_per_s']:7.0f} samples/s  {row['samples_per_s'] / 256:5.2f} steps/s  "
        f"{row['tokens_per_s']:7.0f} tokens/s   command {wall:5.1f} s"
    )
    return row["samples_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    with open("/proc/loadavg") if Path("/proc/loadavg").exists() else open(os.devnull) as f:
        load = f.read().split()[:3]
    print(f"{os.cpu_count()} CPU cores, load average {' '.join(load) or '?'}; {a.steps} steps, global batch 256")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = d / "c.toml"
        cfg.write_text(CONFIG.format(steps=a.steps))
        one = [sys.executable, "-m", "inversionview", "train", str(cfg), "--no-progress"]
        two = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "inversionview",
            "train",
            str(cfg),
            "--no-progress",
        ]
        r1 = measure("1 process, 1 thread", one, 1, d)
        r1b = measure("1 process, 2 threads", one, 2, d)
        r2 = measure("2 processes (torchrun), 1 thread each", two, 1, d)
    print(f"2 processes / 1 process, 1 thread: {r2 / r1:.2f}x;  2 processes / 1 process, 2 threads: {r2 / r1b:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory (RSS) of the largest training process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
