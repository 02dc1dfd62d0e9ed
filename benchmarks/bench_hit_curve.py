"""Hit rate against wall time on this machine.

By default prints the curves recorded in the shipped decoders' metrics.jsonl (counting and addition, as they
trained), then re-evaluates each final decoder on fresh held-out queries on this machine, whose CPU capability is
printed. A run directory instead shows that run. With
``--train MINUTES`` it first trains a fresh decoder for that long with the shipped config (and a naive
baseline config: the authors' settings, lr 1e-4 constant, fp32) and prints both curves.

    python benchmarks/bench_hit_curve.py [RUN_DIR ...] [--train MINUTES] [--queries N]
"""

import argparse
import json
import tempfile
from pathlib import Path

from _common import peak_rss_mib
import inversionview
from inversionview import InversionView
from inversionview.run import SHIPPED


def curve(run_dir: Path) -> None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    spec = json.loads((run_dir / "train.json").read_text()) if (run_dir / "train.json").exists() else {}
    if spec:
        print(
            f"trained with bf16 = {spec['train'].get('bf16')}, batch {spec['train'].get('batch_size')}, "
            f"d_model {spec['decoder'].get('d_model')}, budget {spec['train'].get('max_minutes')} min"
        )
    sites = list(rows[0]["hit"])
    print(f"{'step':>6} {'minutes':>8} {'mean':>6}  " + " ".join(f"{s:>7}" for s in sites))
    for r in rows:
        print(
            f"{r['step']:6d} {r['elapsed_s'] / 60:8.1f} {r['mean_hit']:6.3f}  "
            + " ".join(f"{r['hit'][s]:7.2f}" for s in sites)
        )
    print(f"last throughput: {rows[-1]['samples_per_s']} samples/s, {rows[-1]['tokens_per_s']} tokens/s")


def train_for(minutes: float, naive: bool, out: Path) -> Path:
    from inversionview.train import TrainConfig, train

    import dataclasses

    cfg = TrainConfig.from_toml(Path(inversionview.__file__).parent / "configs" / "counting.toml")

    o = dataclasses.replace(cfg.train, max_minutes=minutes, steps=100_000 if naive else cfg.train.steps)
    if naive:
        o = dataclasses.replace(o, lr=1e-4, warmup=1, min_lr=1.0, bf16=False)
    cfg = dataclasses.replace(
        cfg, out=str(out), train=o, probed=dataclasses.replace(cfg.probed, model="shipped:counting")
    )
    train(cfg, progress=False)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="*", default=[str(SHIPPED / t / "decoder") for t in ("counting", "addition")])
    ap.add_argument("--train", type=float, default=0.0, help="minutes to train fresh decoders for")
    ap.add_argument("--queries", type=int, default=256)
    a = ap.parse_args()
    import torch

    from inversionview.distributed import cpu_bf16_flags

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}"
    )
    runs = [Path(r) for r in a.run]
    if a.train:
        tmp = Path(tempfile.mkdtemp())
        runs = [train_for(a.train, False, tmp / "ours"), train_for(a.train, True, tmp / "naive")]
    for r in runs:
        print(f"== {r}")
        curve(r)
        res = InversionView.load(r).evaluate(a.queries)
        print(
            f"final hit rate on {a.queries} fresh held-out queries per site: mean {res['mean_hit']:.3f}  "
            + " ".join(f"{k}={v:.3f}" for k, v in res["hit"].items())
        )
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
