"""Readings under a data set (issue 27): the data's epsilon-preimage found exactly, shares over its members.

The truth here is a scan written independently inside the test: one input at a time, no padding, no cache, no
stored activations, distances by hand; it shares only the probed model's forward pass with the code it checks.
"""

import json
import random
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write_config
from inversionview import InversionView
from inversionview.cli import main
from inversionview.features import builtin_features
from inversionview.dataset import ActivationIndex, DataSet, build, cache_root, scan
from inversionview.tasks.addition import Addition
from inversionview.tasks.counting import Counting


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INVERSIONVIEW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def counting():
    return InversionView.load("shipped:counting")


@pytest.fixture(scope="module")
def addition():
    return InversionView.load("shipped:addition")


def data_file(path, texts):
    path.write_text("\n".join(texts) + "\n")
    return path


def counting_texts(n, seed=11):
    rng = random.Random(seed)
    texts = [Counting().generate(rng) for _ in range(n)]
    return texts + texts[: n // 10]  # some inputs twice: the empirical distribution weighs them twice


def truth(probed, site, texts, zq, metric="euclidean"):
    """Per distinct input: its minimum distance to zq over its positions, EOS excluded, one input at a time."""
    s = probed.site(site)
    eos = probed.tokenizer.eos_id
    out = {}
    for t in dict.fromkeys(texts):
        ids = probed.encode(t)
        act = probed.run(torch.tensor([ids]), [s])[s][0].double()
        keep = [i for i, x in enumerate(ids) if x != eos]
        z = act[keep]
        q = zq.double()
        if metric == "euclidean":
            d = torch.sqrt(((z - q) ** 2).sum(-1)) / torch.sqrt((q**2).sum())
        else:
            d = 1 - (z @ q) / (torch.sqrt((z**2).sum(-1)) * torch.sqrt((q**2).sum()))
        out[t] = float(d.min())
    return out


@pytest.mark.parametrize(
    "text,site,position,metric",
    [
        ("vvzccvczvvvzvcvc|v:8", "a1.0", ":", "euclidean"),
        ("vvzccvczvvvzvcvc|v:8", "x0.post", 17, "euclidean"),  # at the target letter: a rare preimage
        ("ddkdkkkdkkgkdd|k:7", "m0", -2, "cosine"),
    ],
)
def test_counting_data_members_are_exactly_the_data_preimage(counting, tmp_path, text, site, position, metric):
    texts = counting_texts(3000)
    path = data_file(tmp_path / "data.txt", texts)
    pre = counting.query(text, site=site, position=position, data=str(path), samples=64, metric=metric)
    s = counting.probed.site(site)
    zq = counting.probed.run(torch.tensor([counting.probed.encode(text)]), [s])[s][0, pre.position].float()
    eps = pre.epsilon
    true = truth(counting.probed, site, texts, zq, metric)
    inside = {t for t, d in true.items() if d <= eps}
    dist = pre.distribution
    assert dist["kind"] == "data" and dist["inputs"] == len(texts) and dist["distinct"] == len(set(texts))
    assert dist["found"] == len(inside)
    assert set(dist["members"]) == inside  # every member kept (fewer than KEEP)
    for t, v in dist["members"].items():
        assert abs(v[0] - true[t]) < 2e-3  # the stored distance (float16 storage: within its measured error)
    weight = Counter(texts)
    assert dist["total"] == sum(weight[t] for t in inside)
    # each reported share is the weighted share over those members
    feats = builtin_features("counting")
    for sh in pre.shares:
        if sh["share"] is None:
            continue
        f = feats[sh["feature"]]
        want = sum(weight[t] for t in inside if f(t) == sh["value"]) / sum(weight[t] for t in inside)
        assert sh["share"] == pytest.approx(want, abs=1e-9), sh
    data_rows = [s for s in pre.samples if s.source == "data"]
    assert data_rows and all(s.text in set(texts) for s in data_rows)
    assert pre.sources["data"] == len(inside)
    assert "shares estimate the data set" in pre.to_html()


def test_addition_data_members_and_a_user_feature(addition, tmp_path, monkeypatch):
    rng = random.Random(3)
    texts = [Addition().generate(rng) for _ in range(3000)]
    path = data_file(tmp_path / "add.txt", texts)
    (tmp_path / "myfeat.py").write_text("def hundreds(t):\n    return tuple(sorted((t[0], t[4])))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    q = "456+378=834"
    pre = addition.query(q, site="a0.0", position="=", data=str(path), samples=64, features="myfeat:hundreds")
    s = addition.probed.site("a0.0")
    zq = addition.probed.run(torch.tensor([addition.probed.encode(q)]), [s])[s][0, pre.position].float()
    true = truth(addition.probed, "a0.0", texts, zq)
    inside = {t for t, d in true.items() if d <= pre.epsilon}
    assert pre.distribution["found"] == len(inside) and set(pre.distribution["members"]) == inside
    (sh,) = pre.shares
    assert sh["feature"] == "myfeat:hundreds" and tuple(sh["value"]) == ("3", "4")
    want = sum(1 for t in inside if tuple(sorted((t[0], t[4]))) == ("3", "4")) / len(inside)
    assert sh["share"] == pytest.approx(want)
    # the user's feature survives a change of epsilon from the reading's JSON alone (no import of the module)
    sys.modules.pop("myfeat", None)
    monkeypatch.chdir("/")
    again = type(pre).from_dict(json.loads(pre.to_json())).with_epsilon(pre.epsilon / 2)
    half = {t for t, d in true.items() if d <= pre.epsilon / 2}
    if half:
        want = sum(1 for t in half if tuple(sorted((t[0], t[4]))) == ("3", "4")) / len(half)
        (sh2,) = [x for x in again.shares if x["feature"] == "myfeat:hundreds"]
        assert sh2["share"] == pytest.approx(want)


def test_the_cache_is_reused_keyed_and_rebuilt_when_corrupt(counting, tmp_path):
    texts = counting_texts(500)
    data = DataSet.from_texts(texts, "d")
    probed, site = counting.probed, counting.probed.site("a0.0")
    a = ActivationIndex.open(probed, site, data)
    stamp = (a.path / "meta.json").stat().st_mtime_ns
    b = ActivationIndex.open(probed, site, data)
    assert (b.path / "meta.json").stat().st_mtime_ns == stamp and b.rows == a.rows
    assert b.rows == sum(len(probed.encode(t)) - 1 for t in dict.fromkeys(texts))  # every position but EOS
    other = ActivationIndex.open(probed, probed.site("a1.0"), data)
    assert other.path != a.path  # another site, another cache
    (a.path / "shard-0-of-1" / "pos.npy").write_bytes(b"garbage")
    c = ActivationIndex.open(probed, site, data)
    assert c.rows == a.rows and len(np.load(c.path / "shard-0-of-1" / "pos.npy")) == a.rows
    assert str(cache_root()).startswith(str(tmp_path))


def test_shards_built_by_two_ranks_merge_to_the_one_process_scan(counting):
    texts = counting_texts(400)
    data = DataSet.from_texts(texts, "d")
    probed, site = counting.probed, counting.probed.site("x0.post")
    zq = probed.run(torch.tensor([probed.encode(texts[0])]), [site])[site][0, 3].float()
    one = ActivationIndex.open(probed, site, data)
    d1, a1 = scan(one, zq[None], "euclidean", len(data.texts))
    root = cache_root().parent / "sharded"
    build(probed, site, data, root / "activations", rank=1, world=2)
    build(probed, site, data, root / "activations", rank=0, world=2)
    two = ActivationIndex.open(probed, site, data, root / "activations")
    assert len(two.shards) == 2
    d2, a2 = scan(two, zq[None], "euclidean", len(data.texts))
    assert torch.equal(d1, d2) and torch.equal(a1, a2)


def test_a_run_trained_on_a_data_file_reads_under_it_by_default(tmp_path, probed_dir, capsys):
    lines = counting_texts(300)
    data_file(tmp_path / "in.txt", lines)
    cfg = write_config(
        tmp_path,
        probed_dir,
        steps=2,
        sections={"data": {"sites": ["a0.0", "x1.post"], "path": "in.txt"}, "eval": {"every": 2, "queries": 2}},
    )
    assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    q = lines[0].split("|")[0] + "|" + lines[0].split("|")[1]
    argv = ["query", str(tmp_path / "run"), "--text", q, "--site", "x1.post", "--position", "-1", "--json"]
    assert main([*argv, "--samples", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["distribution"]["kind"] == "data" and out["distribution"]["inputs"] == 300 + 30
    assert out["distribution"]["found"] >= 1  # the query is an input of the data: a member at distance 0
    # --data reads under another data set
    data_file(tmp_path / "other.txt", lines[:50])
    assert main([*argv, "--samples", "16", "--data", str(tmp_path / "other.txt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["distribution"]["inputs"] == 50


def test_members_at_the_edge_of_epsilon_are_verified_exactly(counting):
    """With epsilon a hair above an input's true distance, the float16 storage's rounding alone would decide; the
    reading verifies the inputs near the edge again, so each one is in."""
    from inversionview.dataset import exact_members

    texts = counting_texts(1500)
    data = DataSet.from_texts(texts, "d")
    probed, site = counting.probed, counting.probed.site("x0.post")
    index = ActivationIndex.open(probed, site, data)
    assert index.meta["storage"] == "float16" and index.error > 0  # measured: float16 is kept for this site
    zq = probed.run(torch.tensor([probed.encode(texts[7])]), [site])[site][0, 5].float()
    true = truth(probed, "x0.post", texts, zq)
    ranked = sorted(true.values())
    missed = 0
    for k in range(1, 60):
        eps = ranked[k] + 1e-6
        dmin, amin = scan(index, zq[None], "euclidean", len(data.texts))
        missed += int((dmin[0] <= eps).sum()) != k + 1
        exact_members(probed, site, data, index, zq, dmin[0], amin[0], eps, "euclidean")
        assert int((dmin[0] <= eps).sum()) == k + 1
    assert missed > 0  # the scan alone gets some edges wrong: the check above can fail


def test_explain_and_completeness_under_a_data_set(counting, tmp_path, capsys):
    """FCRs over the data's members and the completeness scan of a data set, against the scan written here."""
    from inversionview.fcr import explain, query_texts

    texts = counting_texts(1500, seed=5)
    path = data_file(tmp_path / "data.txt", texts)
    iv = InversionView.load("shipped:counting")
    iv.data = str(path)
    res = explain(iv, sites=["a1.0"], queries=4, features="count,target", progress=False)
    assert res.data == str(path)
    weight = Counter(texts)
    feats = builtin_features("counting")
    probed, s = iv.probed, iv.probed.site("a1.0")
    for k, name in enumerate(res.positions):
        rates = []
        for q in query_texts(iv.dataset(), 4, 0):
            p = Counting().positions(q)[k]
            zq = probed.run(torch.tensor([probed.encode(q)]), [s])[s][0, p].float()
            inside = [t for t, d in truth(probed, "a1.0", texts, zq).items() if d <= iv.spec.epsilon]
            if inside:
                f = feats["count"]
                rates.append(sum(weight[t] for t in inside if f(t) == f(q)) / sum(weight[t] for t in inside))
        (row,) = [r for r in res.rows if r.position == name and r.feature == "count"]
        assert row.fcr == pytest.approx(sum(rates) / len(rates), abs=1e-9) and row.queries == len(rates)
    assert "data set" in res.table()

    q = "vvzccvczvvvzvcvc|v:8"
    argv = ["completeness", "shipped:counting", "--data", str(path), "--text", q, "--site", "a1.0", "--position", ":"]
    assert main([*argv, "--samples", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    zq = probed.run(torch.tensor([probed.encode(q)]), [s])[s][0, 19].float()
    n_in = sum(d <= iv.spec.epsilon for d in truth(probed, "a1.0", texts, zq).values())
    assert out["n_inputs"] == len(set(texts)) and out["n_inside"] == n_in and out["reading_recall"] == 1.0
    assert "data set" in out["input_set"]


def test_query_features_on_the_command_line_under_a_data_set(tmp_path, capsys, monkeypatch):
    texts = counting_texts(1200, seed=9)
    path = data_file(tmp_path / "data.txt", texts)
    (tmp_path / "feats.py").write_text("def first(t):\n    return t[0]\n")
    monkeypatch.chdir(tmp_path)
    q = "vvzccvczvvvzvcvc|v:8"
    argv = ["query", "shipped:counting", "--text", q, "--site", "a1.0", "--position", ":", "--samples", "32"]
    assert main([*argv, "--data", str(path), "--features", "count,feats:first", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    iv = InversionView.load("shipped:counting")
    s = iv.probed.site("a1.0")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(q)]), [s])[s][0, 19].float()
    inside = [t for t, d in truth(iv.probed, "a1.0", texts, zq).items() if d <= iv.spec.epsilon]
    weight = Counter(texts)
    shares = {x["feature"]: x for x in out["shares"]}
    assert set(shares) == {"count", "feats:first"}
    want = sum(weight[t] for t in inside if t[0] == "v") / sum(weight[t] for t in inside)
    assert shares["feats:first"]["value"] == "v" and shares["feats:first"]["share"] == pytest.approx(want)
    assert out["distribution"]["kind"] == "data" and out["sources"]["data"] == len(inside)


@pytest.mark.slow
def test_index_on_two_torchrun_processes_merges_to_the_one_process_scan(counting, tmp_path):
    """A real 2-process torchrun run of `inversionview index`: each rank stores its shard, a reading merges them."""
    import os
    import subprocess

    texts = counting_texts(600, seed=21)
    path = data_file(tmp_path / "data.txt", texts)
    env = {**os.environ, "INVERSIONVIEW_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    cmd += ["inversionview", "index", "shipped:counting", "--data", str(path), "--site", "a1.0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "in 2 shard(s)" in res.stdout
    probed, site = counting.probed, counting.probed.site("a1.0")
    data = DataSet.open(path)
    two = ActivationIndex.open(probed, site, data, tmp_path / "cache" / "activations")
    assert [p.name for p in sorted(two.path.iterdir()) if p.is_dir()] == ["shard-0-of-2", "shard-1-of-2"]
    one = ActivationIndex.open(probed, site, data, tmp_path / "one")
    zq = probed.run(torch.tensor([probed.encode(texts[3])]), [site])[site][0, -2].float()
    d1, a1 = scan(one, zq[None], "euclidean", len(data.texts))
    d2, a2 = scan(two, zq[None], "euclidean", len(data.texts))
    # other batches in each process: the forward pass rounds differently, by far less than the storage's error
    assert torch.allclose(d1, d2, atol=1e-5, rtol=0) and float((a1 == a2).float().mean()) > 0.99


def test_stored_readings_are_keyed_by_the_data_set(counting, tmp_path):
    """A reading under one data set is never served from the store for another (or for none)."""
    a = data_file(tmp_path / "a.txt", counting_texts(300, seed=1))
    b = data_file(tmp_path / "b.txt", counting_texts(300, seed=2))
    iv = InversionView.load("shipped:counting")
    plain = iv.fingerprint
    iv.data = str(a)
    under_a = iv.fingerprint
    iv.data = str(b)
    assert len({plain, under_a, iv.fingerprint}) == 3
    iv.data = str(a)
    assert iv.fingerprint == under_a
