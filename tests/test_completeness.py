"""The completeness scan: every input's distance and log-probability agree with a brute-force computation (the
probed model's :func:`verify` and the decoder's own forward, one input at a time); the figures follow from them;
the command line writes the Fig. 11 PNG; a task whose inputs cannot be listed is refused in one line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil

import numpy as np
import pytest
import torch

from inversionview.cli import main
from inversionview import completeness
from inversionview.completeness import input_set, scan, scan_logprobs
from inversionview.decoder import Decoder
from inversionview.verify import verify
from inversionview.run import InversionView

TEXT = "vvzccvczvvvzvcvc|v:8"


def _inputs() -> list[str]:
    """Counting inputs of three lengths, many sharing long prefixes (so the shared-prefix path is taken)."""
    out = [f"{a}{b}{c}vzz|{t}:{n}" for a, b, c in itertools.product("vzc", repeat=3) for t in "vz" for n in "12"]
    rng = random.Random(1)
    out += [f"abcab{''.join(rng.sample('abcabc', 6))}|{t}:3" for t in "abc" for _ in range(20)]
    return list(dict.fromkeys(out + [TEXT, "xyzxyz|x:2"]))


@torch.no_grad()
def _brute(iv, site, texts, zq, metric):
    probed, dec = iv.probed, iv.decoder
    s, si = iv.site_index(site)
    seqs = [probed.encode(t) for t in texts]
    dmin, _, _ = verify(probed, s, seqs, zq, metric)
    lp = []
    for q in seqs:
        ids = torch.tensor([q])
        logp = dec(ids[:, :-1], zq[None], torch.tensor([si])).float().log_softmax(-1)
        lp.append(float(logp.gather(-1, ids[:, 1:, None]).sum()))
    return dmin.numpy(), np.array(lp)


@pytest.mark.parametrize("site", ["a0.1", "x1.mid"])
def test_scan_agrees_with_brute_force(run_dir, site):
    iv = InversionView.load(run_dir)
    texts = _inputs()
    s = iv.probed.site(site)
    ids = iv.probed.encode(TEXT)
    zq = iv.probed.run(torch.tensor([ids]), [s])[s][0, -3].float()
    d_ref, lp_ref = _brute(iv, site, texts, zq, "euclidean")
    eps = float(np.quantile(d_ref, 0.3))  # a third of the inputs inside
    res = scan(iv, TEXT, site, -2, samples=64, epsilon=eps, inputs=texts)
    assert res.texts == texts and res.n_inputs == len(texts)
    np.testing.assert_allclose(res.distance, d_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.logp, lp_ref, rtol=1e-5, atol=1e-4)
    inside = d_ref <= eps
    assert res.n_inside == inside.sum() > 0
    assert res.min_inside_logp == pytest.approx(lp_ref[inside].min(), abs=1e-4)
    assert res.outside_above == pytest.approx((lp_ref[~inside] > lp_ref[inside].min()).mean())
    # recall: the samples the decoder drew that are inputs of the set and inside epsilon
    pre = iv.query(TEXT, site=site, position=-2, samples=64, epsilon=eps, seed=0)
    drawn = {x.text for x in pre.samples}
    hits = sum(1 for t, i in zip(texts, inside) if i and t in drawn)
    assert res.n_sampled_inside == hits and res.recall == pytest.approx(hits / inside.sum())
    assert res.sampled.sum() == sum(1 for t in texts if t in drawn)
    # features of the preimage (the built-in ones of inversionview.features); each recall is found / total
    for name in ("count", "target", "letters", "length"):
        r = res.feature_recall[name]
        assert 1 <= r["total"] and 0 <= r["found"] <= r["total"] and r["recall"] == r["found"] / r["total"]
    true_counts = {t.split("|")[0].count(t.split("|")[1][0]) for t, i in zip(texts, inside) if i}
    assert res.feature_recall["count"]["total"] == len(true_counts)


@pytest.mark.parametrize("counts", [False, True])
def test_shared_prefixes_equal_plain_forward(run_dir, counts):
    """All rows share their first tokens in groups of various sizes: the per-chunk prefix split (and chunks that
    cut groups) give the plain forward's log-probabilities; also for a decoder with prefix counts, whose tokens
    after the shared prefix must add the prefix's counts (a decoder of random weights, counts made large)."""
    iv = InversionView.load(run_dir)
    dec = iv.decoder
    if counts:
        torch.manual_seed(0)
        dec = Decoder(dataclasses.replace(dec.config, prefix_counts=True)).eval()
        with torch.no_grad():
            dec.cnt.weight.mul_(50)
    texts = [f"{a}{b}{c}{d}|{a}:1" for a, b, c, d in itertools.product("abcz", repeat=4)]
    ids = torch.tensor([iv.probed.encode(t) for t in texts])
    zq = torch.randn(iv.probed.d_model)
    with torch.no_grad():
        ref = dec(ids[:, :-1], zq.expand(len(ids), -1), torch.full((len(ids),), 1)).float().log_softmax(-1)
    ref = ref.gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    for batch in (len(ids), 37):
        torch.testing.assert_close(scan_logprobs(dec, 1, zq, ids, batch=batch), ref, rtol=1e-5, atol=1e-4)


def test_cli_writes_png_and_json(run_dir, tmp_path, monkeypatch, capsys):
    from inversionview.cli import main

    monkeypatch.setattr(completeness, "COUNTING_POOL", 400)
    png = tmp_path / "fig11.png"
    rc = main(
        [
            "completeness",
            str(run_dir),
            "--text",
            TEXT,
            "--site",
            "a0.1",
            "--position",
            ":",
            "--samples",
            "32",
            "--png",
            str(png),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert out["n_inputs"] == 400 and "seed 0" in out["input_set"] and out["position"] == TEXT.index(":") + 1
    assert 0 <= out["n_sampled_inside"] <= out["n_inside"] <= 400
    texts, described = input_set(InversionView.load(run_dir).task)
    assert texts == input_set(InversionView.load(run_dir).task)[0]  # the pool is fixed
    assert len(set(texts)) == 400 and "400 distinct counting inputs" in described
    rc = main(
        [
            "completeness",
            str(run_dir),
            "--text",
            TEXT,
            "--site",
            "a0.1",
            "--position",
            "-2",
            "--samples",
            "32",
            "--epsilon",
            "5",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "true preimage: 400 of 400 inputs" in text and "recall of its count values" in text


def test_a_data_run_scans_its_data(run_dir, tmp_path, capsys, monkeypatch):
    """A run on a data file has an input set that can be listed: its data (issue 27; it used to be refused)."""
    monkeypatch.setenv("INVERSIONVIEW_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    spec = json.loads((run / "run.json").read_text())
    (tmp_path / "inputs.txt").write_text(f"abcabc|a:2\n{TEXT}\nabcabc|a:2\n")
    spec.update(task=None, data={"path": "../inputs.txt", "positions": "all"})
    (run / "run.json").write_text(json.dumps(spec))
    argv = ["completeness", str(run), "--text", TEXT, "--site", "a0.1", "--position", ":", "--samples", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_inputs"] == 2 and out["n_inside"] >= 1 and out["reading_recall"] == 1.0  # the query is an input


def test_ioi_task_is_refused():
    from inversionview.errors import UserError
    from inversionview.tasks import get_task

    with pytest.raises(UserError, match="task 'ioi'"):
        input_set(get_task("ioi"))


def test_addition_set_is_the_input_space():
    from inversionview.tasks import get_task

    texts, described = input_set(get_task("addition"))
    assert len(texts) == len(set(texts)) == 810_000 and "810,000" in described
    feats = completeness._recall_features(get_task("addition"))
    assert {k: f("456+378=834") for k, f in feats.items()} == {
        "F1S1": "{3,4}",
        "F2S2": "{5,7}",
        "F3S3": "{6,8}",
        "carry_ones": True,
        "carry_tens": True,
        "sum_len": 3,
    }


@pytest.mark.slow
def test_shipped_addition_scan(tmp_path):
    """The shipped addition model at a0.0 on '=': a scan over every input whose a and b lie in 400-479 x 300-399
    and 300-379 x 400-479 agrees with verify() on a sample of them, and its figure renders."""
    iv = InversionView.load("shipped:addition")
    texts = [f"{a}+{b}={a + b}" for a in range(300, 500) for b in range(300, 500) if a % 100 < 80]
    res = scan(iv, "456+378=834", "a0.0", "=", samples=256, inputs=texts)
    s = iv.probed.site("a0.0")
    zq = iv.probed.run(torch.tensor([iv.probed.encode("456+378=834")]), [s])[s][0, 8].float()
    pick = np.random.default_rng(0).choice(len(texts), 300, replace=False)
    d_ref, lp_ref = _brute(iv, "a0.0", [texts[i] for i in pick], zq, "euclidean")
    np.testing.assert_allclose(res.distance[pick], d_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.logp[pick], lp_ref, rtol=1e-5, atol=1e-4)
    assert res.n_inside > 0 and res.n_sampled_inside > 0
    res.plot(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
