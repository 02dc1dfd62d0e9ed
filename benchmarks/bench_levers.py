"""One training lever at a time: hit rate after a fixed wall-time budget, each variant against the same base.

Each variant trains a fresh decoder on a built-in task for ``--minutes`` of wall time (the schedule fitted to that
budget, float32 unless the CPU runs bf16 fast), in its own process with ``--threads`` threads; ``--parallel``
variants run at once (keep parallel x threads <= cores). Then every decoder is evaluated on the same fresh
held-out queries (``--queries`` per site, seed 0: one sample at temperature 1, epsilon 0.1) and the script prints
the mean and per-site hit rate, the steps taken, samples/s, and each variant's difference from the base.

    python benchmarks/bench_levers.py --task counting --minutes 8 --threads 1 --parallel 2 [--variants base,lr6e-3]

Variants (a change to the task's shipped config):
    base        the shipped config, fp32 (bf16 "auto"), schedule fitted to the budget
    wd_all      weight decay on every parameter (LayerNorms, biases and site normalisers too; the old optimizer)
    lr6e-3      twice the learning rate            lr1.5e-3   half of it
    batch128    batch 128 (twice the steps)        batch512   batch 512
    d192 / d256 decoder width 192 / 256            layers3    three decoder layers
    norebal     no site rebalancing (uniform sites)
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "base": {},
    "wd_all": {},
    "lr6e-3": {"train": {"lr": 6e-3}},
    "lr1.5e-3": {"train": {"lr": 1.5e-3}},
    "batch128": {"train": {"batch_size": 128}},
    "batch512": {"train": {"batch_size": 512}},
    "d192": {"decoder": {"d_model": 192}},
    "d256": {"decoder": {"d_model": 256}},
    "layers3": {"decoder": {"n_layers": 3}},
    "norebal": {"eval": {"rebalance": False}},
    "counts": {"decoder": {"prefix_counts": True}},
}


def config(task: str, variant: str, minutes: float, out: Path):
    import inversionview
    from inversionview.train import TrainConfig

    cfg = TrainConfig.from_toml(Path(inversionview.__file__).parent / "configs" / f"{task}.toml")
    cfg = dataclasses.replace(
        cfg, out=str(out), train=dataclasses.replace(cfg.train, max_minutes=minutes, steps=1_000_000, bf16="auto")
    )
    for section, changes in VARIANTS[variant].items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    return cfg


def train_one(task: str, variant: str, minutes: float, out: Path) -> None:
    """Runs in a child process."""
    import torch

    from inversionview import train as T

    if variant == "wd_all":  # the ablation: AdamW's decay on every parameter, as before
        T._optimizer = lambda dec, o: torch.optim.AdamW(
            dec.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.98)
        )
    T.train(config(task, variant, minutes, out), progress=False)


def evaluate(out: Path, queries: int) -> dict:
    from inversionview import InversionView

    res = InversionView.load(out).evaluate(queries, seed=0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "mean": res["mean_hit"],
        "hit": res["hit"],
        "steps": rows[-1]["step"],
        "samples_per_s": rows[-1]["samples_per_s"],
        "curve": [(r["elapsed_s"], r["mean_hit"]) for r in rows],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="counting")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--variants", default="base,wd_all,lr6e-3,batch128,d256,norebal")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return train_one(a.task, a.one[0], a.minutes, Path(a.one[1]))
    import torch

    from inversionview.distributed import cpu_bf16_flags

    torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 flags: "
        f"{cpu_bf16_flags() or 'none'}; {a.parallel} variants at a time, {a.threads} thread(s) each, "
        f"{a.minutes} min each, task {a.task}"
    )
    root = Path(a.out or tempfile.mkdtemp())
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: expected some of {', '.join(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    pending, running = list(names), []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < a.parallel:
            n = pending.pop(0)
            cmd = [sys.executable, __file__, "--task", a.task, "--minutes", str(a.minutes), "--one", n, str(root / n)]
            running.append((n, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)))
        time.sleep(2)
        for n, p in list(running):
            if p.poll() is not None:
                running.remove((n, p))
                print(f"  {n} trained (exit {p.returncode}) at {(time.time() - t0) / 60:.1f} min", flush=True)
    res = {n: evaluate(root / n, a.queries) for n in names}
    sites = list(res[names[0]]["hit"])
    print(f"\nhit rate after {a.minutes} min ({a.queries} fresh queries per site, seed 0)")
    print(f"{'variant':10} {'mean':>6} {'vs base':>8} {'steps':>6} {'smp/s':>6}  " + " ".join(f"{s:>7}" for s in sites))
    base = res.get("base", res[names[0]])["mean"]
    for n, r in res.items():
        print(
            f"{n:10} {r['mean']:6.3f} {r['mean'] - base:+8.3f} {r['steps']:6d} {r['samples_per_s']:6.0f}  "
            + " ".join(f"{r['hit'][s]:7.2f}" for s in sites)
        )
    print(
        f"(a mean over {len(sites)} sites x {a.queries} queries: standard error about "
        f"{(0.25 / (len(sites) * a.queries)) ** 0.5:.3f})"
    )
    (root / "levers.json").write_text(json.dumps(res, indent=1))
    print(f"runs and levers.json in {root}")


if __name__ == "__main__":
    main()
