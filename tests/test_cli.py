"""The command line end to end: ``train`` a few steps, ``evaluate`` (text and --json), ``query`` (terminal,
--json and a self-contained --html file), through ``inversionview.cli.main`` and a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import user_error, write_config
from inversionview.cli import main
from inversionview.preimage import AUTO_MIX
from inversionview.run import InversionView


TEXT = "vvzccvczvvvzvcvc|v:8"
SITES = ["x0.pre", "a0.1", "x1.mid"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _query(run, *extra):
    return ["query", run, "--text", TEXT, "--samples", "48", *extra]


@pytest.fixture(autouse=True)
def _no_colour(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def test_train_then_evaluate_then_query(tmp_path, probed_dir, capsys):
    cfg = write_config(tmp_path, probed_dir, steps=4, sections={"eval": {"every": 2, "checkpoint_every": 2}})
    run = tmp_path / "run"
    rc, out, _ = _cli(capsys, "train", cfg, "--no-progress")
    assert rc == 0
    assert f"decoder saved to {run}" in out
    assert re.search(r"^step 2: mean hit \d\.\d{3}  x0\.pre=\d\.\d\d a0\.1=\d\.\d\d x1\.mid=\d\.\d\d$", out, re.M), out
    assert re.search(r"^step 4: mean hit", out, re.M)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    before = (run / "model.safetensors").read_bytes()

    # the same command again: already trained, nothing changes
    rc, out, _ = _cli(capsys, "train", cfg, "--no-progress")
    assert rc == 0 and f"decoder saved to {run}" in out and "step" not in out
    assert (run / "model.safetensors").read_bytes() == before

    rc, out, _ = _cli(capsys, "evaluate", run, "--json", "--queries", "6")
    assert rc == 0
    res = json.loads(out)
    assert list(res["hit"]) == SITES
    assert all(round(h * 6, 6).is_integer() and 0 <= h <= 1 for h in res["hit"].values())
    assert res["mean_hit"] == pytest.approx(sum(res["hit"].values()) / 3)
    assert (res["epsilon"], res["metric"], res["queries_per_site"]) == (0.1, "euclidean", 6)
    assert res == InversionView.load(run).evaluate(6)  # the CLI reports what the API computes

    rc, out, _ = _cli(capsys, *_query(run, "--site", "a0.1", "--position", ":", "--json"))
    assert rc == 0
    d = json.loads(out)
    assert (d["site"], d["site_short"], d["position"], d["text"]) == ("blocks.0.attn.hook_result.1", "a0.1", 19, TEXT)
    assert d["decoder"] == str(run)
    assert d == InversionView.load(run).query(TEXT, site="a0.1", position=":", samples=48).to_dict()


def test_evaluate_text_output(run_dir, capsys):
    rc, out, _ = _cli(capsys, "evaluate", run_dir, "--queries", "4", "--epsilon", "0.3", "--metric", "cosine")
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == SITES + ["mean"]
    hits = [float(ln.split()[1]) for ln in lines[:3]]
    assert float(lines[3].split()[1]) == pytest.approx(sum(hits) / 3, abs=1.5e-3)
    assert "(epsilon 0.3, cosine, 4 held-out queries per site, one sample at temperature 1)" in lines[3]


def test_evaluate_json_is_deterministic_for_a_seed(run_dir, capsys):
    outs = [json.loads(_cli(capsys, "evaluate", run_dir, "--json", "--queries", "4", "--seed", "3")[1]) for _ in range(2)]
    assert outs[0] == outs[1]
    assert outs[0]["hit"].keys() == set(SITES)


def test_query_json_reading(run_dir, capsys):
    rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "a0.1", "--position", ":", "--json"))
    assert rc == 0
    d = json.loads(out)
    assert d["tokens"][0] == "B" and d["tokens"][d["position"]] == ":" and d["position"] == 19
    assert d["mode"] == "tl" and d["metric"] == "euclidean" and d["epsilon"] == 0.1
    assert d["annotation"] == "count=8"
    assert d["n_candidates"] == 48 and sum(s["count"] for s in d["samples"]) == 48
    assert d["settings"]["mix"] == [list(m) for m in AUTO_MIX]
    dist = [s["distance"] for s in d["samples"]]
    assert dist == sorted(dist)
    assert d["fraction_inside"] == pytest.approx(sum(s["count"] for s in d["samples"] if s["distance"] <= 0.1) / 48)
    for s in d["samples"]:
        assert s["tokens"][0] == "B"
        finite = [x for x in s["distances"] if x is not None]
        assert s["distance"] == pytest.approx(min(finite), abs=1e-5)
        assert s["distances"][s["position"]] == pytest.approx(s["distance"], abs=1e-5)
        assert len(s["delta"]) in (0, len(s["tokens"]))
    # a head site carries the attention pattern from the query position, over positions 0..19
    assert len(d["attention"]) == 20 and sum(d["attention"]) == pytest.approx(1, abs=1e-3)


def test_query_positions_by_index_negative_index_and_token(run_dir, capsys):
    got = []
    for pos in ("19", "-1", ":"):
        rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "x0.pre", "--position", pos, "--json", "--samples", "8"))
        assert rc == 0
        got.append(json.loads(out)["position"])
    assert got == [19, 20, 19]  # -1 is the last text token (the '8'); EOS is not counted


def test_query_html_file_is_self_contained(run_dir, tmp_path, capsys):
    path = tmp_path / "reading.html"
    rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "x1.mid", "--position", "-1", "--json", "--html", path))
    assert rc == 0
    assert json.loads(out)["site_short"] == "x1.mid"
    html = path.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html.lower()
    assert "<style" in html
    # nothing loaded from elsewhere: no external scripts, stylesheets, images or fonts
    assert not re.search(r"<script[^>]*\bsrc=", html, re.I)
    assert not re.search(r"<link\b", html, re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", html, re.I)
    assert "x1.mid" in html and "epsilon" in html


def test_query_terminal_output_has_epsilon_rule(run_dir, capsys):
    rc, out, _ = _cli(capsys, *_query(run_dir, "--site", "x0.pre", "--position", ":", "--epsilon", "0.5", "--limit", "12"))
    assert rc == 0
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == "site x0.pre (blocks.0.hook_resid_pre), tl activations, euclidean distance, epsilon 0.5"
    assert lines[1].startswith("query  B") and "[:]" in lines[1] and "position 19 ':'" in lines[1]
    assert "count=8" in lines[1]
    assert "\x1b[" not in out  # no colour when NO_COLOR is set / not a terminal
    rule = [i for i, ln in enumerate(lines) if re.fullmatch(r"-{9} epsilon = 0\.5 -{30}", ln)]
    assert len(rule) == 1
    samples = [(i, float(m.group(1))) for i, ln in enumerate(lines) if (m := re.match(r"^\s*(\d+\.\d{4})\s+\d+\s+B", ln))]
    assert 0 < len(samples) <= 12
    for i, dist in samples:  # inside epsilon above the rule, outside below it
        assert (dist <= 0.5) == (i < rule[0])
    m = re.search(r"^48 candidates, (\d+) distinct, (\d+) distinct inside epsilon; true fraction of candidates inside "
                  r"epsilon: [\d.]+%$", out, re.M)
    assert m
    if int(m.group(1)) > len(samples):
        assert f"({int(m.group(1)) - len(samples)} more distinct samples not shown;" in out


def test_subprocess_query(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "inversionview", "query", str(run_dir), "--text", TEXT, "--site", "a0.1",
                        "--position", ":", "--samples", "32"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"^-{9} epsilon = 0\.1 -+$", r.stdout, re.M), r.stdout
    assert r.stdout.startswith("site a0.1 (blocks.0.attn.hook_result.1), tl activations")
    assert "attention from the query position: " in r.stdout


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "1e308"], "temperature must be positive and at most 1e6"),  # float32 would overflow
    (["--temperature", "nan"], "temperature must be positive and at most 1e6"),
    (["--temperature", "1", "--noise", "inf"], "noise must be a finite number of at least 0"),
    (["--temperature", "1", "--noise", "-0.1"], "noise must be a finite number of at least 0"),
    (["--epsilon", "inf"], "epsilon must be positive and finite"),
    (["--limit", "-1"], "--limit must be 0 or more"),
])
def test_query_refuses_settings_that_cannot_read(run_dir, capsys, extra, message):
    err = user_error(capsys, *_query(run_dir, "--site", "x0.pre", "--position", ":", "--samples", "8", *extra))
    assert message in err, err
