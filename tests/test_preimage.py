"""Distances, verification of candidates by the probed model, and readings (Preimage) with their views."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from inversionview.errors import UserError
from inversionview.preimage import Preimage, Sample, resolve_position
from inversionview.verify import activations, length_batches, verify
from inversionview.probed import ProbedModel, distances
from inversionview.sites import Site


# ---------------------------------------------------------------------------------------------- distances
def test_euclidean_distance_by_hand():
    zq = torch.tensor([3.0, 4.0])
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [3.0, 4.5], [-3.0, -4.0]])
    torch.testing.assert_close(distances(zq, z), torch.tensor([0.0, 1.0, 1.0, 0.1, 2.0]))
    assert distances(zq, z, "euclidean").shape == (5,)


def test_euclidean_distance_is_normalised_by_the_query():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])
    # ||a - b|| = 5; normalised by ||a|| = 5 one way and ||b|| = 10 the other
    assert float(distances(a, b)) == pytest.approx(1.0)
    assert float(distances(b, a)) == pytest.approx(0.5)


def test_cosine_distance_by_hand():
    zq = torch.tensor([3.0, 4.0])
    z = torch.tensor([[6.0, 8.0], [4.0, -3.0], [-3.0, -4.0], [1.0, 0.0]])
    torch.testing.assert_close(distances(zq, z, "cosine"), torch.tensor([0.0, 1.0, 2.0, 1 - 0.6]), atol=1e-6, rtol=0)


def test_distance_broadcasts_over_positions():
    zq = torch.tensor([[1.0, 0.0], [0.0, 2.0]])[:, None]  # (N, 1, d)
    z = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]])  # (N, T, d)
    torch.testing.assert_close(distances(zq, z), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(
        distances(zq, z, "cosine"), torch.tensor([[0.0, 1 - 2**-0.5], [0.0, 1.0]]), atol=1e-6, rtol=0
    )


def test_unknown_metric():
    with pytest.raises(UserError, match="metric"):
        distances(torch.ones(2), torch.ones(3, 2), "manhattan")


# ---------------------------------------------------------------------------------------------- verify
@pytest.fixture(scope="module")
def probed(probed_dir):
    return ProbedModel.load(probed_dir, mode="tl")


@pytest.fixture(scope="module")
def probed_raw(probed_dir):
    return ProbedModel.load(probed_dir, mode="raw")


CANDIDATES = ["a|a:1", "aaab|a:3", "zyxxy|y:2", "qrs|s:1"]


def _hand_verify(p, site, seqs, zq, metric):
    """Per sequence, alone (no padding): distance at every position but EOS, then min and arg-min."""
    mins, args = [], []
    for s in seqs:
        act = p.run(torch.tensor([s]), [site])[site][0]
        n = len(s) - (1 if s[-1] == p.tokenizer.eos_id else 0)
        d = [float(distances(zq, act[t], metric)) for t in range(n)]
        m = min(d)
        mins.append(m)
        args.append(d.index(m))
    return mins, args


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("site", ["a0.1", "x1.mid", "m1"])
def test_verify_matches_hand_computation(probed, site, metric):
    s = probed.site(site)
    seqs = [probed.encode(t) for t in CANDIDATES]
    # a query activation from another input, at its ':' position
    q = probed.encode("bbcbc|c:2")
    zq = probed.run(torch.tensor([q]), [s])[s][0, 7].float()
    dmin, amin, dist = verify(probed, s, seqs, zq, metric)
    want_min, want_arg = _hand_verify(probed, s, seqs, zq, metric)
    torch.testing.assert_close(dmin, torch.tensor(want_min), atol=1e-5, rtol=1e-5)
    assert amin.tolist() == want_arg
    T = max(map(len, seqs))
    assert dist.shape == (len(seqs), T)
    for i, seq in enumerate(seqs):
        n = len(seq)
        assert torch.isfinite(dist[i, : n - 1]).all()  # BOS and the text
        assert torch.isinf(dist[i, n - 1 :]).all()  # EOS and PAD
        assert dist[i].min() == dmin[i]
    # batching does not change anything (the batches are padded to one width)
    d1, a1, dd1 = verify(probed, s, seqs, zq, metric, batch=1)
    torch.testing.assert_close(d1, dmin, atol=1e-5, rtol=1e-5)
    assert a1.tolist() == amin.tolist()
    torch.testing.assert_close(dd1, dist, atol=1e-5, rtol=1e-5)


def test_verify_includes_bos(probed):
    s = Site(0, "resid_pre")  # at BOS, position 0: the same vector for every input
    seqs = [probed.encode(t) for t in CANDIDATES]
    zq = probed.run(torch.tensor([probed.encode("zz|z:2")]), [s])[s][0, 0]
    dmin, amin, _ = verify(probed, s, seqs, zq, "euclidean")
    assert dmin.abs().max() < 1e-6
    assert (amin == 0).all()


def test_length_batches_sort_by_length_and_cut_where_it_changes():
    lengths = [3, 1, 2, 1, 3, 3, 2, 1, 1]
    # batch 8: an eighth is 1 row, so every change of length ends a batch
    assert length_batches(lengths, 8) == [[1, 3, 7, 8], [2, 6], [0, 4, 5]]
    # batch 3: a full batch ends too, within a length
    assert length_batches(lengths, 3) == [[1, 3, 7], [8], [2, 6], [0, 4, 5]]
    # batch 16: an eighth is 2 rows, so the lone length-1 row's batch goes on past the change
    assert length_batches([1, 2, 2, 5, 5, 5], 16) == [[0, 1, 2], [3, 4, 5]]
    assert length_batches([], 4) == []


def test_activations_in_length_batches_equal_one_sequence_at_a_time(probed):
    s = probed.site("a1.0")
    texts = CANDIDATES + ["abcabcc|c:3", "zz|z:2", "aabbbccc|b:3", "q|q:1"]
    seqs = [probed.encode(t) for t in texts]
    seen = []
    for rows, act, invalid in activations(probed, s, seqs, batch=2):
        assert len(rows) <= 2 and act.shape[1] == max(len(seqs[r]) for r in rows)  # padded to the batch's own longest
        for r, a, bad in zip(rows.tolist(), act, invalid):
            alone = probed.run(torch.tensor([seqs[r]]), [s])[s][0].float()
            n = len(seqs[r])
            torch.testing.assert_close(a[:n], alone, atol=1e-5, rtol=1e-5)
            assert bad.tolist() == [t >= n - 1 for t in range(act.shape[1])]  # EOS and PAD
            seen.append(r)
    assert sorted(seen) == list(range(len(texts)))


def test_verify_excludes_eos(probed):
    s = Site(0, "resid_pre")  # token + position embedding: equal only for the same token at the same position
    seq = probed.encode("aaab|a:3")
    act = probed.run(torch.tensor([seq]), [s])[s][0]
    zq = act[len(seq) - 1]  # the EOS position's own activation
    dmin, amin, dist = verify(probed, s, [seq], zq, "euclidean")
    assert dmin[0] > 0.05  # a naive minimum would be 0 at EOS
    assert amin[0] != len(seq) - 1
    assert torch.isinf(dist[0, len(seq) - 1])


def test_verify_excludes_pad(probed):
    s = Site(0, "resid_pre")
    short, long = probed.encode("a|a:1"), probed.encode("aaab|a:3")
    b = probed.batch([short, long])
    padded = probed.run(b.ids, [s])[s]
    assert b.ids[0, len(short)] == probed.tokenizer.pad_id
    zq = padded[0, len(short) + 1]  # a PAD position's activation inside the padded batch
    dmin, amin, _ = verify(probed, s, [short, long], zq, "euclidean")
    assert dmin[0] > 0.05
    assert amin[0] < len(short) - 1


def test_own_activation_gives_distance_zero(probed):
    text = "abcabcc|c:3"
    ids = probed.encode(text)
    for name in ("a0.1", "x1.post", "a1"):
        s = probed.site(name)
        pos = ids.index(probed.tokenizer.tokens.index(":"))
        zq = probed.run(torch.tensor([ids]), [s])[s][0, pos].float()
        others = [probed.encode(t) for t in CANDIDATES]
        dmin, amin, _ = verify(probed, s, others + [ids], zq, "euclidean")
        assert float(dmin[-1]) < 1e-5
        assert int(amin[-1]) == pos
        assert (dmin[:-1] > float(dmin[-1]) + 1e-4).all()  # the other candidates are farther
        dmin_c, _, _ = verify(probed, s, [ids], zq, "cosine")
        assert abs(float(dmin_c[0])) < 1e-5


def test_verify_per_row_queries(probed_raw):
    p = probed_raw
    s = p.site("x0.mid")
    seqs = [p.encode(t) for t in CANDIDATES]
    acts = [p.run(torch.tensor([q]), [s])[s][0] for q in seqs]
    zq = torch.stack([a[2] for a in acts])  # (N, d): row i is candidate i's own activation at position 2
    dmin, amin, _ = verify(p, s, seqs, zq, "euclidean")
    assert dmin.abs().max() < 1e-5
    # and against a single shared query, each row gets its own distances
    dmin1, _, _ = verify(p, s, seqs, zq[0], "euclidean")
    assert dmin1[0] < 1e-5 and (dmin1[1:] > 1e-3).all()


def test_modes_give_different_distances(probed, probed_raw):
    s = Site(0, "result", 1)
    seqs = [probed.encode(t) for t in CANDIDATES]
    q = probed.encode("bbcbc|c:2")
    dt = verify(probed, s, seqs, probed.run(torch.tensor([q]), [s])[s][0, 7], "euclidean")[0]
    dr = verify(probed_raw, s, seqs, probed_raw.run(torch.tensor([q]), [s])[s][0, 7], "euclidean")[0]
    assert not torch.allclose(dt, dr, atol=1e-3)


# ---------------------------------------------------------------------------------------------- positions
TOKENS = ["B", "a", "b", "|", "a", ":", "2", "E"]


@pytest.mark.parametrize(
    "position, want",
    [
        (0, 0),
        (3, 3),
        (6, 6),
        (-1, 6),
        (-2, 5),
        (-7, 0),
        ("-1", 6),
        (" 4 ", 4),
        (":", 5),
        ("|", 3),
        ("a", 1),
        ("B", 0),
    ],
)
def test_resolve_position(position, want):
    assert resolve_position(TOKENS, 7, position) == want


@pytest.mark.parametrize("position", [7, -8, 100, "7", "E", "z", "::"])
def test_resolve_position_rejects(position):
    with pytest.raises(UserError, match="position"):
        resolve_position(TOKENS, 7, position)


# ---------------------------------------------------------------------------------------------- readings
QUERY = "abcab|b:2"


@pytest.fixture(scope="module")
def iv(run_dir):
    from inversionview.run import InversionView

    return InversionView.load(run_dir)


@pytest.fixture(scope="module")
def reading(iv):
    return iv.query(QUERY, site="a0.1", position=":", samples=24, seed=3)


def test_reading_basics(iv, reading):
    pre = reading
    assert pre.site == "blocks.0.attn.hook_result.1" and pre.site_short == "a0.1"
    assert pre.tokens == ["B", *QUERY, "E"]
    assert pre.tokens[pre.position] == ":" and pre.position == QUERY.index(":") + 1
    assert pre.mode == iv.probed.mode and pre.metric == iv.spec.metric and pre.epsilon == iv.spec.epsilon
    assert pre.n_candidates == 24
    assert sum(s.count for s in pre.samples) + pre.settings["dropped"] == 24  # dropped: a PAD or EOS inside
    assert len({tuple(s.tokens) for s in pre.samples}) == len(pre.samples)  # distinct
    assert pre.settings["samples"] == 24 and len(pre.settings["mix"]) == 4  # the Auto mix
    # head site: the attention pattern from the query position over the prefix
    assert pre.attention is not None and len(pre.attention) == pre.position + 1
    assert sum(pre.attention) == pytest.approx(1.0, abs=1e-3)


def test_reading_samples_sorted_and_consistent(reading):
    ds = [s.distance for s in reading.samples]
    assert ds == sorted(ds)
    for s in reading.samples:
        assert s.tokens[0] == "B"
        assert len(s.distances) == len(s.tokens) == len(s.delta)
        finite = [d for d in s.distances if d is not None]
        assert s.distance == pytest.approx(min(finite), abs=1e-4)
        assert s.distances[s.position] == pytest.approx(s.distance, abs=1e-4)
        if s.tokens[-1] == "E":
            assert s.distances[-1] is None
        assert s.delta[0] == 0.0
        assert all(-1.0 <= x <= 1.0 for x in s.delta)


def test_reading_distances_recomputed_by_hand(iv, reading):
    """The reported distance of each sample equals the one computed directly with the probed model."""
    p = iv.probed
    s = p.site("a0.1")
    ids = p.encode(QUERY)
    zq = p.run(torch.tensor([ids]), [s])[s][0, reading.position].float()
    vocab = p.tokenizer
    for sample in reading.samples[:5]:
        seq = [vocab.tokens.index(t) for t in sample.tokens]
        act = p.run(torch.tensor([seq]), [s])[s][0].float()
        n = len(seq) - (1 if seq[-1] == vocab.eos_id else 0)
        d = (act[:n] - zq).norm(dim=-1) / zq.norm()
        assert sample.distance == pytest.approx(float(d.min()), rel=1e-4, abs=1e-5)
        assert sample.position == int(d.argmin())


def _fraction(pre, eps):
    return sum(s.count for s in pre.samples if s.distance <= eps) / pre.n_candidates


def test_fraction_inside_and_with_epsilon(reading):
    pre = reading
    assert pre.fraction_inside == pytest.approx(_fraction(pre, pre.epsilon))
    ds = sorted({s.distance for s in pre.samples if s.source == "decoder"})  # chain members count no candidate
    assert all(s.count == 0 for s in pre.samples if s.source == "chain")
    assert len(ds) >= 2, "expected samples at several distances"
    mid = ds[len(ds) // 2]
    wider = pre.with_epsilon(mid)
    assert wider.epsilon == mid
    assert wider.fraction_inside == pytest.approx(_fraction(pre, mid))
    assert 0 < wider.fraction_inside < 1
    assert [s.distance for s in wider.inside] == [d for d in (s.distance for s in pre.samples) if d <= mid]
    assert pre.with_epsilon(ds[-1] + 1).fraction_inside == 1 - pre.settings["dropped"] / pre.n_candidates
    if ds[0] > 0:
        assert pre.with_epsilon(ds[0] / 2).fraction_inside == 0.0
    # the original is untouched
    assert pre.epsilon != mid and pre.fraction_inside == pytest.approx(_fraction(pre, pre.epsilon))


def test_json_round_trip(reading):
    text = reading.to_json()
    d = json.loads(text)
    assert d["site"] == reading.site and len(d["samples"]) == len(reading.samples)
    back = Preimage.from_dict(d)
    assert back == reading
    assert isinstance(back.samples[0], Sample)
    assert back.with_epsilon(0.5).fraction_inside == reading.with_epsilon(0.5).fraction_inside


def test_html_is_self_contained(reading, tmp_path):
    out = tmp_path / "r.html"
    html = reading.to_html(out)
    assert out.read_text() == html
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script src" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    assert "http" not in html
    assert f"epsilon = {reading.epsilon:g}" in html
    assert reading.site_short in html
    assert f"{reading.fraction_inside:.1%}" in html
    # every sample appears, with each of its tokens
    assert html.count('class="tok') >= sum(len(s.tokens) for s in reading.samples)


def test_terminal_render(reading):
    from inversionview.viewer.terminal import render

    text = render(reading, limit=10, colour=False)
    assert f"epsilon = {reading.epsilon:g}" in text
    assert reading.site_short in text and reading.site in text
    assert "\x1b[" not in text
    assert f"{reading.fraction_inside:.1%}" in text
    # the query with its position marked
    assert "[:]" in text
    # the epsilon rule sits between the samples inside and outside epsilon
    wide = reading.with_epsilon(sorted(s.distance for s in reading.samples)[len(reading.samples) // 2])
    lines = render(wide, limit=40, colour=False).splitlines()
    rule = next(i for i, ln in enumerate(lines) if f"epsilon = {wide.epsilon:g}" in ln and ln.startswith("-"))
    rows = [(i, float(ln.split()[0])) for i, ln in enumerate(lines) if re.match(r"^\s*\d+\.\d{4}\s+\d+\s", ln)]
    assert rows
    tol = 5e-5  # distances are printed with 4 decimals
    assert all(d <= wide.epsilon + tol for i, d in rows if i < rule)
    assert all(d > wide.epsilon - tol for i, d in rows if i > rule)
    assert any(i < rule for i, _ in rows) and any(i > rule for i, _ in rows)
    buf = io.StringIO()
    reading.show(limit=5, file=buf)
    assert "epsilon" in buf.getvalue()
    coloured = render(reading, limit=5, colour=True)
    assert "\x1b[" in coloured


def test_query_at_bos_is_all_inside(iv):
    """x0.pre at BOS is the same vector for every input starting with BOS: every candidate is at distance 0."""
    pre = iv.query(QUERY, site="x0.pre", position=0, samples=6, temperature=1.0)
    assert pre.position == 0 and pre.settings["mix"] == [[1.0, 0.0]]
    assert pre.fraction_inside == pytest.approx(1 - pre.settings["dropped"] / 6)  # a dropped one is no input
    assert all(s.distance < 1e-5 for s in pre.samples)
    assert pre.attention is None


def test_query_negative_position_excludes_eos(iv):
    pre = iv.query(QUERY, site="x1.mid", position=-1, samples=2, temperature=1.0)
    assert pre.position == len(QUERY)  # the last text token, not EOS
    assert pre.tokens[pre.position] == QUERY[-1]
    pre2 = iv.query(QUERY, site="blocks.1.hook_resid_mid", position="|", samples=2, temperature=1.0, epsilon=0.3)
    assert pre2.position == QUERY.index("|") + 1 and pre2.epsilon == 0.3


def test_query_bad_arguments(iv):
    with pytest.raises(UserError, match="not one this decoder was trained on"):
        iv.query(QUERY, site="a1.0", position=":")
    with pytest.raises(UserError, match="position"):
        iv.query(QUERY, site="a0.1", position=50, samples=2)
    with pytest.raises(UserError, match="metric"):
        iv.query(QUERY, site="a0.1", position=":", samples=2, metric="l1")
    with pytest.raises(UserError, match="epsilon"):
        iv.query(QUERY, site="a0.1", position=":", samples=2, epsilon=0)
    with pytest.raises(UserError, match="samples"):
        iv.query(QUERY, site="a0.1", position=":", samples=0)
    with pytest.raises(UserError, match="temperature"):
        iv.query(QUERY, site="a0.1", position=":", samples=2, temperature=0.0)
