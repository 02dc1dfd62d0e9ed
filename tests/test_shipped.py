"""End-to-end checks on the shipped counting model and decoder (the README's demo)."""

import json
import os
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
    out = subprocess.run(
        [sys.executable, "-m", "inversionview", "demo", "--samples", "256"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
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
    assert 0.5 <= rows[-1]["mean_hit"] <= 1.0


# `inversionview evaluate shipped:TASK --queries 64 --seed 0 --json`, measured with torch 2.13.0 on a CPU:
# counting mean 0.668 (x0.pre 1.0, a0.0 0.719, x0.mid 0.609, m0 0.703, x0.post 0.813, a1.0 0.609, x1.mid 0.531,
# m1 0.469, x1.post 0.563); addition (the decoder with prefix counts, 2026-12-03) mean 0.683 (x0.pre 0.766,
# a0.0 0.906, a0.1 0.734, a0.2 0.281, a0.3 0.891, x0.mid 0.828, x0.post 0.844, a1.0 0.438, a1.1 0.703, a1.2 0.422,
# a1.3 0.734, x1.mid 0.797, x1.post 0.531).
# The floors sit a little under: the mean 0.03 under, each site 0.12 under (64 queries: a site's standard error
# is about 0.06), so that a worse decoder, a broken site or a wrong sampling or verification path fails.
HIT_FLOORS = {
    "counting": (
        0.64,
        {
            "x0.pre": 0.95,
            "a0.0": 0.6,
            "x0.mid": 0.49,
            "m0": 0.58,
            "x0.post": 0.69,
            "a1.0": 0.49,
            "x1.mid": 0.41,
            "m1": 0.35,
            "x1.post": 0.44,
        },
    ),
    "addition": (
        0.65,
        {
            "x0.pre": 0.64,
            "a0.0": 0.78,
            "a0.1": 0.61,
            "a0.2": 0.16,
            "a0.3": 0.77,
            "x0.mid": 0.7,
            "x0.post": 0.72,
            "a1.0": 0.31,
            "a1.1": 0.58,
            "a1.2": 0.3,
            "a1.3": 0.61,
            "x1.mid": 0.67,
            "x1.post": 0.41,
        },
    ),
}


@pytest.mark.parametrize("task", list(HIT_FLOORS))
def test_shipped_decoder_hit_rate_floor(task, capsys):
    from inversionview.cli import main

    assert main(["evaluate", f"shipped:{task}", "--queries", "64", "--seed", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    mean_floor, site_floors = HIT_FLOORS[task]
    assert res["queries_per_site"] == 64 and res["epsilon"] == 0.1 and res["metric"] == "euclidean"
    assert set(res["hit"]) == set(site_floors)
    assert res["mean_hit"] >= mean_floor, res
    low = {s: h for s, h in res["hit"].items() if h < site_floors[s]}
    assert not low, f"sites under their floor: {low} (floors {site_floors})"
