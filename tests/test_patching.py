"""Activation patching on a tiny random counting GPT-2 (exactness: no patch is the original run, patching the
embeddings everywhere is the contrast's run, a head patch changes the attention output by exactly that head's
share), the contrast generators, cumulative tables, the command line and its one-line errors, and the paper's
counting path on the shipped model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_probed_dir, user_error
from inversionview.errors import UserError
from inversionview.patching import (
    COUNTING_PATH,
    Pair,
    cumulative,
    make_pairs,
    parse_component,
    reproduce_counting_path,
    run_patched,
)
from inversionview.probed import ProbedModel
from inversionview.tasks import get_task

ORIG, CON = "abcabcab|a:3", "abcbbcab|a:2"  # one 'a' turned into 'b'


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    return ProbedModel.load(make_probed_dir(tmp_path_factory.mktemp("patch"), n_head=2))


def _ids(probed, *texts):
    return probed.batch([probed.encode(t) for t in texts]).ids


def _all(T, B=1):
    return torch.ones(B, T, dtype=torch.bool)


def test_no_patch_is_the_original_run(probed):
    ids, con = _ids(probed, ORIG), _ids(probed, CON)
    plain = probed.model(input_ids=ids).logits
    torch.testing.assert_close(run_patched(probed, ids, con, [], []), plain, rtol=0, atol=0)
    # patching from the input itself changes nothing either
    comps = [parse_component(probed, s) for s in ("a0.0@1", "a1.1@-2", "embed@3")]
    masks = [_all(ids.shape[1])] * 3
    torch.testing.assert_close(run_patched(probed, ids, ids, comps, masks), plain, rtol=1e-6, atol=1e-5)


def test_embeddings_everywhere_give_the_contrast(probed):
    ids, con = _ids(probed, ORIG, "zzyx|z:2"), _ids(probed, CON, "zyyx|z:1")
    T = ids.shape[1]
    want = probed.model(input_ids=con).logits
    comps = [parse_component(probed, "embed@0"), parse_component(probed, "pos_embed@0")]
    got = run_patched(probed, ids, con, comps, [_all(T, 2)] * 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # every head at every position as well: still the contrast (each head's value is the contrast's)
    heads = [parse_component(probed, f"a{layer}.{h}@0") for layer in range(2) for h in range(2)]
    got = run_patched(probed, ids, con, comps + heads, [_all(T, 2)] * 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the token embedding alone differs from the contrast only where the inputs differ, so it is enough too
    got = run_patched(probed, ids, con, comps[:1], [ids != con])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_patch_moves_attention_output_by_that_head_only(probed):
    """Layer 0 sees the same input in both runs, so patching head h at position p changes the attention output
    (c_proj's output) at p by exactly (z_con - z_orig)[head h] @ W_O[head h], and nothing at other positions."""
    ids, con = _ids(probed, ORIG), _ids(probed, CON)
    attn = probed.model.transformer.h[0].attn
    seen = {}
    h1 = attn.c_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("z", []).append(a[0]))
    h2 = attn.c_proj.register_forward_hook(lambda m, a, o: seen.setdefault("out", []).append(o))
    try:
        probed.model(input_ids=ids)
        probed.model(input_ids=con)
        p = 5  # the changed character ('a' -> 'b' at text index 4, token 5)
        m = torch.zeros_like(ids, dtype=torch.bool)
        m[0, p] = True
        run_patched(probed, ids, con, [parse_component(probed, f"a0.1@{p}")], [m])
    finally:
        h1.remove(), h2.remove()
    z_o, z_c = seen["z"][0], seen["z"][1]
    out_o, out_patched = seen["out"][0], seen["out"][-1]
    dh = z_o.shape[-1] // 2
    sl = slice(dh, 2 * dh)
    delta = (z_c[0, p, sl] - z_o[0, p, sl]) @ attn.c_proj.weight[sl]
    assert delta.abs().max() > 1e-3  # the contrast does differ there
    torch.testing.assert_close(out_patched[0, p], out_o[0, p] + delta, rtol=1e-5, atol=1e-5)
    others = torch.arange(ids.shape[1]) != p
    torch.testing.assert_close(out_patched[0, others], out_o[0, others], rtol=0, atol=0)


def test_counting_pairs():
    task = get_task("counting")
    pairs = make_pairs(task, 300, seed=3)
    assert len(pairs) == 300 and len({p.text for p in pairs}) > 250
    for p in pairs:
        (h, t), (hc, tc) = p.text.split("|"), p.contrast.split("|")
        assert len(p.text) == len(p.contrast) and t[0] == tc[0] and set(h) == set(hc)
        assert sum(a != b for a, b in zip(h, hc)) == 1
        assert abs(int(p.y_orig) - int(p.y_con)) == 1
        assert task.annotate(p.text) == f"count={p.y_orig}" and task.annotate(p.contrast) == f"count={p.y_con}"
        assert tc == f"{t[0]}:{p.y_con}" and 1 <= int(p.y_con) <= 9
        assert p.answer_position == p.text.index(":") + 1  # ':' predicts the count (BOS = 0)
    assert make_pairs(task, 20, seed=3) == pairs[:20]  # seeded


def test_addition_pairs():
    task = get_task("addition")
    for places, answer in ((("F1", "S1"), 0), (("F2", "S2", "F3"), 1), (None, 2)):
        for p in make_pairs(task, 100, seed=1, places=places, answer=answer):
            a, rest = p.contrast.split("+")
            b, c = rest.split("=")
            assert int(a) + int(b) == int(c) and 100 <= int(a) <= 999 and 100 <= int(b) <= 999
            assert len(p.contrast) == len(p.text) and p.y_orig != p.y_con == c[answer]
            assert p.y_orig == p.text.split("=")[1][answer] and p.answer_position == 8 + answer
            kept = [k for k, name in enumerate(("F1", "F2", "F3", "S1", "S2", "S3")) if places and name not in places]
            digits, new_digits = p.text.split("=")[0].replace("+", ""), a + b  # six digit strings
            assert all(digits[k] == new_digits[k] for k in kept)
    with pytest.raises(UserError, match="unknown digit place"):
        make_pairs(task, 5, places=("F4",))
    with pytest.raises(UserError, match="no contrast generator"):
        make_pairs(get_task("ioi"), 5)


def test_cumulative_steps_are_consistent(probed):
    pairs = make_pairs(get_task("counting"), 40, seed=0)
    res = cumulative(probed, pairs, ["embed@-3", "a0.0@-3", "a1.1@:"], batch=16)
    assert res.path == ("embed@-3", "a0.0@-3", "a1.1@:") and res.pairs == 40
    assert [s.patched for s in res.left_to_right] == [res.path[:1], res.path[:2], res.path]
    assert [s.patched for s in res.right_to_left] == [res.path[2:], res.path[1:], res.path]
    # the same set of patches gives the same LDs whichever way it was reached
    assert res.lds["l2r2"] == pytest.approx(res.lds["r2l2"], abs=1e-5)
    assert res.effect == pytest.approx(res.ld_before - res.ld_after)
    # LD before is the plain run's logit difference at ':'
    tok = probed.tokenizer
    p = pairs[0]
    logits = probed.model(input_ids=_ids(probed, p.text)).logits[0, p.answer_position]
    want = logits[tok.encode(p.y_orig)[1]] - logits[tok.encode(p.y_con)[1]]
    assert res.lds["none"][0] == pytest.approx(float(want), abs=1e-4)
    # one patch on its own, checked against run_patched directly
    m = torch.zeros(1, len(probed.encode(p.text)), dtype=torch.bool)
    m[0, -4] = True  # -3 from the last text token = 4 from the end, EOS included
    lg = run_patched(probed, _ids(probed, p.text), _ids(probed, p.contrast), [parse_component(probed, "embed@-3")], [m])
    got = lg[0, p.answer_position, tok.encode(p.y_orig)[1]] - lg[0, p.answer_position, tok.encode(p.y_con)[1]]
    assert res.lds["l2r0"][0] == pytest.approx(float(got), abs=1e-4)
    assert "L->R embed@-3 + a0.0@-3" in res.table() and "effect of the whole path" in res.table()
    assert json.loads(json.dumps(res.to_dict()))["left_to_right"][0]["patched"] == ["embed@-3"]


def test_pair_lengths_must_match(probed):
    with pytest.raises(UserError, match="same length"):
        cumulative(probed, [Pair("abab|a:2", "ababa|a:3", 6, "2", "3")], ["a0.0@1"])


def test_cli(probed_dir, capsys):
    from inversionview.cli import main

    rc = main(["patch", str(probed_dir), "--task", "counting", "--path", "a0.0@-3,a1.0@:", "--pairs", "24", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["pairs"] == 24 and out["path"] == ["a0.0@-3", "a1.0@:"]
    assert out["effect"] == pytest.approx(out["ld_before"] - out["ld_after"])


def test_cli_errors(probed_dir, capsys):
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "a0.0@40", "--pairs", "4")
    assert "a0.0@40" in line and "out of range" in line
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "a0.0@:,mlp@3", "--pairs", "4")
    assert "unknown component 'mlp'" in line and "a{L}.{H}" in line
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "a5.0@3", "--pairs", "4")
    assert "unknown component 'a5.0'" in line
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "x0.mid@3", "--pairs", "4")
    assert "not a head result" in line
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "a0.0", "--pairs", "4")
    assert "COMPONENT@POSITION" in line
    line = user_error(capsys, "patch", probed_dir, "--task", "counting", "--path", "a0.0@q", "--pairs", "4")
    assert "'q'" in line
    line = user_error(capsys, "patch", probed_dir, "--path", "a0.0@1")
    assert "--task" in line


@pytest.mark.slow
def test_paper_counting_path_on_shipped_model():
    """Patching head 0.0 at the target character and head 1.0 at ':' flips the answer (the paper's C3)."""
    r = reproduce_counting_path(pairs=100, seed=0)
    assert r["pairs"] == 100 and r["ld_before"] > 0 > r["ld_after"]
    assert r["effect"] == pytest.approx(r["ld_before"] - r["ld_after"])
    assert COUNTING_PATH == ("a0.0@-3", "a1.0@:")
