"""End-to-end checks on the shipped counting model and decoder (the README's demo)."""

import json
import os
import random
import subprocess
import sys

import pytest

from inversionview import InversionView
from inversionview.probed import ProbedModel
from inversionview.run import SHIPPED
from inversionview.tasks import get_task
from inversionview.tasks.training import accuracy

pytestmark = pytest.mark.slow


def test_shipped_probed_model_counts():
    info = json.loads((SHIPPED / "counting" / "probed" / "training.json").read_text())
    assert info["test_accuracy"] >= 0.99 and info["command"].startswith("inversionview train-probed counting")
    probed = ProbedModel.load(SHIPPED / "counting" / "probed", mode="raw")
    assert accuracy(probed.model, get_task("counting"), n=2000, seed=7) >= 0.98


def test_demo_runs_and_reads_the_count():
    out = subprocess.run([sys.executable, "-m", "inversionview", "demo", "--samples", "256"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "epsilon = 0.1" in out.stdout and "count=" in out.stdout and "Traceback" not in out.stderr


def test_shipped_decoder_reading_keeps_the_count_at_layer1_colon():
    """The paper's finding C2: at a1.0 on ':' the in-preimage samples keep the query's count."""
    iv = InversionView.load("shipped:counting")
    pre = iv.query("vvzccvczvvvzvcvc|v:8", site="a1.0", position=":", samples=512)
    inside = pre.inside
    assert inside, "no sample inside epsilon"
    agree = sum(s.count for s in inside if s.annotation == "count=8") / sum(s.count for s in inside)
    assert agree >= 0.9
    assert pre.samples == sorted(pre.samples, key=lambda s: s.distance)


def test_shipped_decoder_hit_rate_is_recorded():
    rows = [json.loads(x) for x in (SHIPPED / "counting" / "decoder" / "metrics.jsonl").read_text().splitlines()]
    assert rows and set(rows[-1]["hit"]) == set(get_task("counting").sites)
    rng = random.Random(0)
    iv = InversionView.load("shipped:counting")
    res = iv.evaluate(queries_per_site=16, seed=rng.randrange(100))
    assert 0.0 <= res["mean_hit"] <= 1.0 and len(res["hit"]) == 9
