"""Batch readings: readings per second of ``query-batch`` (the library calls the command makes: parse and key
the queries, read, store each reading in its own SQLite transaction) on the shipped counting decoder, at the
Auto mix with 1024 candidates and with 128; the store's share of that time (the same readings put again into
a fresh DB); and the DB's size per reading.

    cd benchmarks && python bench_batch.py [--n 8] [--n-small 24]

On a shared machine set OMP_NUM_THREADS=1: two threads on two busy cores are slower and erratic (at load ~4,
a minute apart: 2.1 s per 1024-candidate reading with two threads, 1.4 s with one).
"""

import argparse
import json
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from _common import peak_rss_mib
from inversionview import InversionView
from inversionview.store import ReadingStore, query_batch, read_queries


def write_queries(iv, path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = iv.task.sample(rng, "test")
        lines.append(
            json.dumps(
                {
                    "text": text,
                    "site": iv.sites[i % len(iv.sites)].short,
                    "position": rng.choice(iv.task.positions(text)),
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


def db_bytes(path: Path) -> int:
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fold the WAL into the file
    con.close()
    return os.path.getsize(path)


def bench(iv, tmp: Path, n: int, samples: int) -> None:
    qpath, db = tmp / f"q{samples}.jsonl", tmp / f"r{samples}.sqlite"
    write_queries(iv, qpath, n, seed=samples)
    queries = read_queries(qpath, iv, samples=samples)
    iv.query(queries[0].text, queries[0].site, queries[0].position, samples=samples, seed=1)  # warm-up
    t = time.perf_counter()
    with ReadingStore(db, create=True) as store:
        s = query_batch(iv, store, queries, progress=False)
        t_batch = time.perf_counter() - t
        readings = [store.get(r["id"]) for r in store.find(limit=None)]
    assert s.read == n and s.stored == n and len(readings) == n

    with ReadingStore(tmp / f"again{samples}.sqlite", create=True) as store:  # the store alone, same readings
        t = time.perf_counter()
        ids = [store.put(p, iv.fingerprint) for p in readings]
        t_put = time.perf_counter() - t
        t = time.perf_counter()
        back = [store.get(i) for i in ids]
        t_get = time.perf_counter() - t
    assert back == readings
    size = db_bytes(db)
    distinct = sum(len(p.samples) for p in readings) / n
    print(f"Auto mix, {samples} candidates, {n} queries ({distinct:.0f} distinct samples per reading):")
    print(
        f"  query-batch  {n / t_batch:5.2f} readings/s ({1000 * t_batch / n:.0f} ms per reading); the store's share: "
        f"put {1000 * t_put / n:.1f} ms = {t_put / t_batch:.1%} of it (get {1000 * t_get / n:.1f} ms)"
    )
    print(f"  DB size      {size / n / 1024:.0f} KiB per reading ({size / 2**20:.1f} MiB for {n}, WAL checkpointed)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="queries at 1024 candidates")
    ap.add_argument("--n-small", type=int, default=24, help="queries at 128 candidates")
    args = ap.parse_args()
    iv = InversionView.load("shipped:counting")
    print(f"threads: {torch.get_num_threads()}, shipped counting decoder (fingerprint {iv.fingerprint})")
    with tempfile.TemporaryDirectory() as tmp:
        bench(iv, Path(tmp), args.n, 1024)
        bench(iv, Path(tmp), args.n_small, 128)
    print(f"peak memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
