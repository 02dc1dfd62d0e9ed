"""A default reading's time against the decoder's samples alone (``chains=0``, the paper's reading), per site.

For every site of the shipped models, ``--queries`` held-out queries (drawn with ``--seed`` from the task's
generator, at its query positions) are each read once with the decoder's samples alone and twice with the default
reading: the first at a site pays for the generator draws, the next finds them cached (readings with the same seed
at a site draw the same inputs). Prints per site the medians and the ratio of the cached default reading to the
decoder alone, and the largest ratio over sites. Bar (issue 28): the default reading within 2x the decoder alone at
every site, on a quiet machine, 2 threads, medians.

    python benchmarks/bench_time.py --seed N [--task counting|addition|both] [--queries 4] [--threads 2]
"""

import argparse
import random
import statistics
import time

import torch

from inversionview import InversionView


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="both", choices=["counting", "addition", "both"])
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--sites", default=None)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    worst = 0.0
    for name in ("counting", "addition") if args.task == "both" else (args.task,):
        iv = InversionView.load(f"shipped:{name}")
        rng = random.Random(f"{args.seed}:{name}")
        for site in args.sites.split(",") if args.sites else iv.task.sites:
            alone, first, cached = [], [], []
            for k in range(args.queries):
                text = iv.task.generate(rng)
                pos = rng.choice(iv.task.positions(text))
                alone.append(_time(lambda: iv.query(text, site=site, position=pos, chains=0, seed=k)))
                first.append(_time(lambda: iv.query(text, site=site, position=pos, seed=k)))
                cached.append(_time(lambda: iv.query(text, site=site, position=pos, seed=k)))
            a, f, c = (statistics.median(x) for x in (alone, first, cached))
            worst = max(worst, c / a)
            print(
                f"{name} {site} [seed {args.seed}]: decoder alone {a:.2f} s, default reading {c:.2f} s "
                f"({c / a:.1f}x; first at the site {f:.2f} s, {f / a:.1f}x), medians of {args.queries}",
                flush=True,
            )
    print(f"largest ratio (cached default / decoder alone) [seed {args.seed}]: {worst:.1f}x (bar: 2x)")


if __name__ == "__main__":
    main()
