"""Feature functions on real task inputs, user features by module:function, FCRs on the shipped counting model,
``explain`` and its bad inputs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import user_error
from inversionview.errors import UserError
from inversionview.fcr import (
    BASELINE_INPUTS,
    CARRIES,
    MARGIN,
    Consistency,
    consistency,
    explain,
    measure,
    preimages,
    query_texts,
    random_values,
)
from inversionview.features import builtin_features, load_feature, resolve_features, value
from inversionview.tasks import get_task


@pytest.fixture(scope="module")
def counting_iv():
    from inversionview.run import InversionView

    return InversionView.load("shipped:counting")


def test_counting_features_on_task_inputs():
    task = get_task("counting")
    f = builtin_features(task)
    rng = random.Random(1)
    for _ in range(200):
        t = task.sample(rng)
        letters, rest = t.split("|")
        assert f["target"](t) == rest[0] and f["length"](t) == len(letters)
        assert f"count={f['count'](t)}" == task.annotate(t)
        assert f["count"](t) == int(rest.split(":")[1])  # the input's own answer
        assert len(f["letters"](t)) == 3 and set(f["letters"](t)) == set(letters)
    for bad in ("", "abc", "|a:3", "abc|:3", "ab1|a:2"):
        assert all(fn(bad) is None for fn in f.values()), bad


def test_addition_features_on_task_inputs():
    task = get_task("addition")
    f = builtin_features(task)
    rng = random.Random(2)
    for _ in range(300):
        t = task.sample(rng)
        a, b = map(int, t.split("=")[0].split("+"))
        c = a + b
        assert 100 * f["F1"](t) + 10 * f["F2"](t) + f["F3"](t) == a
        assert 100 * f["S1"](t) + 10 * f["S2"](t) + f["S3"](t) == b
        assert int("".join(str(f[f"C{i}"](t)) for i in range(1, 5) if f[f"C{i}"](t) is not None)) == c
        for i, (x, y) in enumerate(zip(str(a), str(b)), 1):
            assert f[f"F{i}S{i}"](t) == "{%s,%s}" % tuple(sorted((x, y)))
        assert f["carry_ones"](t) == (str(c)[-2] != str((a // 10 + b // 10) % 10))
        assert f["carry_hundreds"](t) == (f["sum_len"](t) == 4) == (c >= 1000)
        assert (a // 100 + b // 100 + f["carry_tens"](t)) % 10 == int(str(c)[-3])
    swapped = "378+456=834"
    assert all(f[k]("456+378=834") == f[k](swapped) for k in ("F1S1", "F2S2", "F3S3", "carry_tens"))
    assert f["F1"]("456+378=834") != f["F1"](swapped)
    assert all(fn("45+378=423") is None for fn in f.values())


def test_ioi_features_on_task_inputs():
    task = get_task("ioi")
    f = builtin_features(task)
    rng = random.Random(3)
    for _ in range(50):
        t = task.sample(rng)
        io, s = f["IO"](t), f["S"](t)
        assert t.endswith(" " + io) and io != s
        assert t.count(" " + s) + t.startswith(s) == 2
    assert f["IO"]("no names here") is None


def test_user_feature_by_module(tmp_path, monkeypatch):
    (tmp_path / "myfeats.py").write_text(
        "def first(text):\n    return text[0]\n"
        "def boom(text):\n    raise ValueError('no good')\n"
        "def listy(text):\n    return [text]\nNOT_FN = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    feats = resolve_features("counting", "count, myfeats:first")
    assert list(feats) == ["count", "myfeats:first"]
    assert value("myfeats:first", feats["myfeats:first"], "abc|a:1") == "a"
    with pytest.raises(UserError, match=r"feature 'myfeats:boom' raised ValueError: no good on input 'abc\|a:1'"):
        value("myfeats:boom", load_feature("myfeats:boom"), "abc|a:1")
    with pytest.raises(UserError, match="unhashable"):
        value("myfeats:listy", load_feature("myfeats:listy"), "abc|a:1")
    with pytest.raises(UserError, match="cannot import feature 'nosuchmod:f'.*No module named"):
        load_feature("nosuchmod:f")
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        load_feature("myfeats:missing")
    with pytest.raises(UserError, match="not callable"):
        load_feature("myfeats:NOT_FN")
    with pytest.raises(UserError, match="unknown feature 'cuont'.*target, count, letters, length"):
        resolve_features("counting", "cuont")


def test_consistency_counts_shares_and_empty_queries():
    task = get_task("counting")
    feats = resolve_features(task, "count,target")
    queries = ["aab|a:2", "abc|c:1", "xyz|x:1"]
    inside = [["aba|a:2", "bba|b:2", "aa|a:2", "garbage"], ["ccc|c:3"], []]
    ref = random_values(task, feats)
    res = {r.feature: r for r in consistency(feats, queries, inside, ref, "x0.post", "target")}
    # count: query 1 -> 3 of 4 samples have count 2 (garbage counts as a mismatch), query 2 -> 0 of 1
    assert res["count"].fcr == pytest.approx((3 / 4 + 0) / 2)
    assert res["target"].fcr == pytest.approx((2 / 4 + 1) / 2)
    assert res["count"].queries == 2 and res["count"].empty == 1 and res["count"].samples == 5
    n = sum(ref["count"].values())
    assert n == BASELINE_INPUTS
    assert res["count"].baseline == pytest.approx((ref["count"][2] + ref["count"][1]) / 2 / n)
    assert Consistency("f", "s", "p", CARRIES, CARRIES - MARGIN, 1, 0, 1).verdict == "carries"
    assert Consistency("f", "s", "p", 0.99, 0.8, 1, 0, 1).verdict == ""  # not far enough above chance
    assert Consistency("f", "s", "p", 0.7, 0.1, 1, 0, 1).verdict == "partly"
    assert Consistency("f", "s", "p", None, None, 0, 3, 0).verdict == ""


def test_preimages_are_inside_epsilon(counting_iv):
    from inversionview.verify import verify

    iv = counting_iv
    texts = query_texts(iv.task, 3)
    pos = [iv.task.positions(t)[1] for t in texts]
    chains = preimages(iv, texts, "a1.0", pos, samples=48)
    inside = [list(dict.fromkeys(x for c in q for x in c)) for q in chains]  # every chain state is a member
    assert any(inside)
    s = iv.probed.site("a1.0")
    for t, p, xs in zip(texts, pos, inside):
        if not xs:
            continue
        zq = iv.probed.run(torch.tensor([iv.probed.encode(t)]), [s])[s][0, p].float()
        d, _, _ = verify(iv.probed, s, [iv.probed.encode(x) for x in xs], zq, "euclidean")
        assert (d <= iv.spec.epsilon + 1e-6).all() and len(set(xs)) == len(xs)


def test_fcr_on_shipped_counting(counting_iv):
    iv = counting_iv
    feats = resolve_features(iv.task, "count,target")
    at_colon = {r.feature: r for r in measure(iv, "a1.0", 1, feats, queries=6, samples=64)}
    # the paper's C2 site: head 1.0 at ':' keeps the count, far above chance
    # (its true share is 0.87-0.94 by exact scans: carried, or partly by the 0.9 rule over 6 queries; read 0.79
    # [0.71, 0.87] since the finer strata's levels (issue 28), 0.8+ before: the interval must reach the truth)
    c = at_colon["count"]
    assert c.verdict in ("carries", "partly") and c.fcr >= 0.75 and c.low <= 0.87 <= c.high
    assert at_colon["count"].low <= at_colon["count"].fcr <= at_colon["count"].high and at_colon["count"].samples > 0
    assert at_colon["count"].position == ":" and at_colon["count"].site == "a1.0"
    # the embedding at the target character holds the letter at that index
    at_target = {r.feature: r for r in measure(iv, "x0.pre", 0, feats, queries=6, samples=64)}
    # (a 'v' at that index, as the target or as a letter of a longer input: the target letter's true share is about
    # 0.5, see test_summary; the decoder's samples alone said 'carries')
    assert at_target["target"].verdict != "carries" and 0.3 <= at_target["target"].fcr <= 0.85
    assert at_target["count"].verdict == ""


def test_explain_table_and_json(counting_iv):
    # (layer-0 sites, whose readings are quick: the table and its JSON are what is checked here; a layer-1 site's
    # rare readings at the target letter take seconds each, and test_fcr_on_shipped_counting reads a1.0)
    res = explain(
        counting_iv, sites=["x0.pre", "x0.mid"], queries=4, samples=48, features="count,target", progress=False
    )
    assert res.positions == ("target", ":") and res.sites == ("x0.pre", "x0.mid")
    assert len(res.rows) == 2 * 2 * 2
    row = [r for r in res.rows if r.site == "x0.mid" and r.position == ":" and r.feature == "target"][0]
    table = res.table()
    assert res.rule in table.replace("\n", " ") or "carries a feature when FCR >= 0.9" in table
    assert row.verdict == "carries"  # the residual stream after head 0.0 at ':' holds the target letter
    assert f"target {row.fcr:.2f}±{(row.high - row.low) / 2:.2f} ({row.baseline:.2f})" in table
    d = json.loads(json.dumps(res.to_dict()))
    assert {r["verdict"] for r in d["rows"]} <= {"carries", "partly", ""}


def test_explain_bad_features(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_feats.py").write_text("def boom(text):\n    raise KeyError(text)\n")
    monkeypatch.chdir(tmp_path)
    err = user_error(capsys, "explain", "shipped:counting", "--features", "nosuch_module_xyz:f", "--queries", 1)
    assert "cannot import feature 'nosuch_module_xyz:f'" in err
    err = user_error(
        capsys,
        "explain",
        "shipped:counting",
        "--features",
        "bad_feats:boom",
        "--site",
        "x0.pre",
        "--queries",
        1,
        "--samples",
        4,
    )
    assert "feature 'bad_feats:boom' raised KeyError" in err and "on input" in err
    err = user_error(capsys, "explain", "shipped:counting", "--features", "count,colour", "--queries", 1)
    assert "unknown feature 'colour'" in err
    assert "site" in user_error(capsys, "explain", "shipped:counting", "--site", "a7.0", "--queries", 1)


def test_explain_cli_with_user_feature(tmp_path, monkeypatch, capsys):
    from inversionview.cli import main

    (tmp_path / "good_feats.py").write_text(
        "from inversionview.features import builtin_features\n"
        "def target_upper(text):\n"
        "    v = builtin_features('counting')['target'](text)\n"
        "    return None if v is None else v.upper()\n"
    )
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "explain",
                "shipped:counting",
                "--site",
                "x0.pre",
                "--queries",
                "3",
                "--samples",
                "32",
                "--features",
                "target,good_feats:target_upper",
                "--json",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    rows = {(r["position"], r["feature"]): r for r in d["rows"]}
    assert set(rows) == {(p, f) for p in ("target", ":") for f in ("target", "good_feats:target_upper")}
    for p in ("target", ":"):  # the user's feature is the built-in one in capitals: the same rates
        assert rows[(p, "target")]["fcr"] == rows[(p, "good_feats:target_upper")]["fcr"]
        assert rows[(p, "target")]["samples"] == rows[(p, "good_feats:target_upper")]["samples"]
