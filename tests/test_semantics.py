"""Semantics that a wrong implementation could break without any other test noticing: which positions a
distance is taken at (PAD inside a sample), the delta colours' sign and values, the activation-noise scale,
sampling at temperature t, and the temperature of the hit rate. Everything runs on real models (the shipped
ones, or tiny real decoders); expected values are computed here independently of the code under test."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from inversionview.decoder import Decoder, DecoderConfig
from inversionview.verify import verify
from inversionview.probed import ProbedModel, distances
from inversionview.run import SHIPPED, InversionView


# ---------------------------------------------------------------------------------------------- PAD inside a sample
@pytest.fixture(scope="module")
def addition():
    return ProbedModel.load(SHIPPED / "addition" / "probed", mode="tl")


def test_pad_inside_a_sample_is_not_a_position(addition):
    """A decoder sample with a PAD mid-way (issue 11.1, found in a reading of the shipped addition decoder): the
    PAD's activation lies at 0.02 from the query's, so scoring it would call a sample at 0.58 inside epsilon."""
    p, v = addition, addition.tokenizer
    s = p.site("a0.3")
    query = p.encode("480+484=964")
    zq = p.run(torch.tensor([query]), [s])[s][0, 8].float()
    sample = [v.tokens.index(t) for t in "B43P5115=550E"]
    act = p.run(torch.tensor([sample]), [s])[s][0].float()
    d = distances(zq, act)
    pad, eos = 3, len(sample) - 1
    assert d[pad] < 0.05  # the trap: the naive minimum is at the PAD, inside epsilon 0.1
    real = [t for t in range(len(sample)) if t not in (pad, eos)]  # BOS included
    want = d[real].min()
    assert want > 0.5

    b = p.batch([sample, query])
    assert b.valid[0].tolist() == [t in real for t in range(len(sample))]
    assert b.valid[1, : len(query) - 1].all() and not b.valid[1, len(query) - 1 :].any()
    dmin, amin, dist = verify(p, s, [sample], zq, "euclidean")
    assert float(dmin[0]) == pytest.approx(float(want), abs=1e-5)
    assert int(amin[0]) == real[int(d[real].argmin())]
    assert torch.isinf(dist[0, pad]) and torch.isinf(dist[0, eos])


def test_bos_stays_a_position_when_it_is_also_pad_and_eos(probed_dir):
    """GPT-2's <|endoftext|> is BOS, EOS and PAD: position 0 is still compared, and only length masks."""
    from inversionview.tokenizer import CharVocab

    v = CharVocab(tokens=("B", *"abcdefghijklmnopqrstuvwxyz|:123456789"), bos="B", eos="B", pad="B")
    p = ProbedModel.load(probed_dir, vocab=v)
    b = p.batch([[0, 1, 2, 0], [0, 3]])
    assert b.valid.tolist() == [[True] * 4, [True, True, False, False]]


# ---------------------------------------------------------------------------------------------- delta colours
COUNT_QUERY = "vvzccvczvvvzvcvc|v:8"


@pytest.fixture(scope="module")
def counting():
    iv = InversionView.load("shipped:counting")
    return iv, iv.query(COUNT_QUERY, site="a1.0", position=":", samples=64, seed=1)


@pytest.mark.slow
def test_delta_is_p_given_query_minus_p_given_bos(counting):
    """delta_i = p(t_i | t_<i, z_q) - p(t_i | t_<i, z_BOS), each p the softmax of the decoder's own forward logits
    at the taken token; z_BOS is the same site's activation at the query's BOS. 0 at BOS."""
    iv, pre = counting
    p, dec, v = iv.probed, iv.decoder, iv.probed.tokenizer
    s, si = iv.site_index("a1.0")
    act = p.run(torch.tensor([p.encode(COUNT_QUERY)]), [s])[s][0].float()
    zq, zbos = act[pre.position], act[0]
    seen_pos = seen_neg = 0
    for sample in pre.samples[:12]:
        ids = torch.tensor([[v.tokens.index(t) for t in sample.tokens]])
        want = [0.0]
        for i in range(1, ids.shape[1]):  # each prefix on its own: no reliance on teacher forcing
            with torch.no_grad():
                pq, pb = (
                    dec(ids[:, :i], z[None], torch.tensor([si]))[0, -1].softmax(-1)[ids[0, i]] for z in (zq, zbos)
                )
            want.append(float(pq - pb))
        assert sample.delta == pytest.approx(want, abs=1e-4)
        seen_pos += sum(x > 0.1 for x in want)
        seen_neg += sum(x < -0.1 for x in want)
    assert seen_pos and seen_neg  # both signs occur with a size that a flipped sign cannot hide


def _reading_with_deltas(deltas):
    from inversionview.preimage import Preimage, Sample

    toks = ["B", "a", "b", "c", "E"][: len(deltas)]
    sample = Sample(
        tokens=toks,
        text="".join(toks[1:-1]),
        distance=0.05,
        position=1,
        distances=[0.2, 0.05, 0.3, 0.4, None][: len(toks)],
        delta=deltas,
        count=1,
    )
    return Preimage(
        text="ab",
        tokens=["B", "a", "b", "E"],
        position=1,
        site="blocks.0.hook_resid_pre",
        site_short="x0.pre",
        epsilon=0.1,
        metric="euclidean",
        mode="tl",
        samples=[sample],
        n_candidates=1,
        fraction_inside=1.0,
    )


def _rgb(colour: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"#([0-9a-fA-F]{2})([0-9a-fA-F]{2})([0-9a-fA-F]{2})", colour)
    if m:
        return tuple(int(x, 16) for x in m.groups())
    return tuple(int(float(x)) for x in re.findall(r"[\d.]+", colour)[:3])


def test_terminal_colours_positive_delta_blue_negative_red():
    from inversionview.viewer.terminal import render

    out = render(_reading_with_deltas([0.0, 0.8, -0.8, 0.0, 0.0]), colour=True)
    row = next(line for line in out.splitlines() if line.strip().startswith("0.0500"))
    bg = {
        tok: tuple(map(int, rgb))
        for rgb, tok in (
            (m[:3], m[3]) for m in re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m(?:\x1b\[[\d;]*m)*([abc])", row)
        )
    }
    assert bg["a"][2] > bg["a"][0] + 100  # raised by the activation: blue
    assert bg["b"][0] > bg["b"][2] + 100  # lowered: red


def test_html_colours_positive_delta_blue_negative_red():
    from inversionview.viewer.html import render_html

    html = render_html([_reading_with_deltas([0.0, 0.8, -0.8, 0.0, 0.0])])
    spans = re.findall(r"<span([^>]*)>\s*([abc])\s*</span>", html)
    colour = {
        tok: _rgb(re.search(r"background(?:-color)?:\s*(#[0-9a-fA-F]{6}|rgba?\([^)]*\))", attrs).group(1))
        for attrs, tok in spans
        if "background" in attrs
    }
    assert colour["a"][2] > colour["a"][0] + 100
    assert colour["b"][0] > colour["b"][2] + 100


# ---------------------------------------------------------------------------------------------- noise and temperature
def _record_generate(dec) -> list[dict]:
    """Record the arguments of every ``generate`` call of a real decoder (defaults filled in); it still runs."""
    calls, real = [], dec.generate
    sig = inspect.signature(real)

    def generate(*args, **kw):
        bound = sig.bind(*args, **kw)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        calls[-1]["out"] = real(*args, **kw)
        return calls[-1]["out"]

    dec.generate = generate
    return calls


def _given(calls) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations and per-row temperatures the decoder was asked to sample from, over all calls."""
    z = torch.cat([c["z"].float().cpu() for c in calls])
    tau = torch.cat([torch.as_tensor(c["temperature"], dtype=torch.float32).expand(len(c["z"])).cpu() for c in calls])
    return z, tau


def _query_activation(iv, text, site, position):
    s = iv.probed.site(site)
    return iv.probed.run(torch.tensor([iv.probed.encode(text)]), [s])[s][0, position].float()


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_noise_is_gaussian_scaled_by_the_query_std(run_dir, noise):
    """read(temperature=1, noise=eta) conditions every candidate on z_q + N(0, I) * std(z_q) * eta."""
    iv = InversionView.load(run_dir)
    calls = _record_generate(iv.decoder)
    iv.query("abcab|b:2", site="x1.mid", position=3, samples=400, temperature=1.0, noise=noise, seed=5, deltas=0)
    z, tau = _given(calls)
    zq = _query_activation(iv, "abcab|b:2", "x1.mid", 3)
    assert z.shape == (400, zq.shape[0]) and (tau == 1.0).all()
    e = (z - zq) / zq.std()
    if noise == 0:
        assert e.abs().max() < 1e-6
        return
    assert abs(float(e.mean())) < 0.02
    assert float(e.std(0).mean()) == pytest.approx(noise, rel=0.05)  # across candidates, per dimension
    assert float(e.std(1).mean()) == pytest.approx(noise, rel=0.05)  # across dimensions, per candidate
    corr = torch.corrcoef(e.T)  # independent dimensions: off-diagonal correlations near 0
    assert float((corr - torch.eye(len(corr))).abs().max()) < 0.3


def test_auto_mix_temperatures_and_noise(run_dir):
    """The Auto mix: equal shares of (0.5, 0), (1, 0), (2, 0), (2, 0.1); noise only on the last."""
    iv = InversionView.load(run_dir)
    calls = _record_generate(iv.decoder)
    iv.query("abcab|b:2", site="x1.mid", position=3, samples=512, seed=2, deltas=0)
    z, tau = _given(calls)
    zq = _query_activation(iv, "abcab|b:2", "x1.mid", 3)
    noisy = (z - zq).abs().amax(1) > 1e-6
    assert {t: int((tau == t).sum()) for t in (0.5, 1.0, 2.0)} == {0.5: 128, 1.0: 128, 2.0: 256}
    assert int(noisy.sum()) == 128 and (tau[noisy] == 2.0).all()
    e = (z[noisy] - zq) / zq.std()
    assert float(e.std()) == pytest.approx(0.1, rel=0.05) and abs(float(e.mean())) < 0.005


def test_hit_rate_samples_at_temperature_one(run_dir):
    """Per site: one sample per held-out query, drawn at temperature 1 from the query's activation without noise;
    the hit rate is the fraction of those samples whose distance is below epsilon."""
    from inversionview.verify import as_inputs
    from inversionview.propose import hit_rates, make_queries

    iv = InversionView.load(run_dir)
    calls = _record_generate(iv.decoder)
    q = make_queries(iv.probed, iv.task, iv.sites, 8, seed=3)
    hits = hit_rates(iv.decoder, iv.probed, q, 0.5, "euclidean", seed=1)
    z, tau = _given(calls)
    site = torch.cat([torch.as_tensor(c["site"]).expand(len(c["z"])).cpu() for c in calls])
    seqs = as_inputs([x for c in calls for x in c["out"]], iv.probed.tokenizer)
    assert (tau == 1.0).all() and len(z) == len(q.z)
    for i in range(len(iv.sites)):  # each site's queries, each once, exactly (no noise)
        mine = z[site == i]
        assert sorted(map(tuple, mine.tolist())) == sorted(map(tuple, q.z[q.site_idx == i].tolist()))
    n_hit = 0
    for i, s in enumerate(iv.sites):
        rows = (site == i).nonzero()[:, 0]
        dmin, _, _ = verify(iv.probed, s, [seqs[r] for r in rows], z[rows], "euclidean")
        assert hits[i] == pytest.approx(float((dmin < 0.5).float().mean()))
        n_hit += int((dmin < 0.5).sum())
    assert 0 < n_hit < len(z)  # epsilon 0.5 on the tiny run: some hits and some misses, so the count is tested

    calls.clear()
    iv.evaluate(queries_per_site=4, seed=0)  # the public path (CLI `evaluate`) samples at temperature 1 too
    z, tau = _given(calls)
    assert (tau == 1.0).all() and len(z) == 4 * len(iv.sites)


# ---------------------------------------------------------------------------------------------- sampling temperature
TEMPERATURES = (0.5, 1.0, 2.0)


def _chi2_pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to probabilities ``p``; categories expected fewer than 5
    times are pooled into one."""
    n = counts.sum()
    expected = p.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].sum(0, keepdim=True).double()])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(len(obs) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


@pytest.fixture(scope="module")
def sampler():
    """A tiny real decoder with spread-out logits (so the temperature matters) and one fixed conditioning."""
    torch.manual_seed(0)
    dec = Decoder(
        DecoderConfig(vocab_size=12, max_len=3, d_act=8, n_sites=1, d_model=16, n_layers=1, n_heads=2, n_act_blocks=1)
    ).eval()
    with torch.no_grad():
        dec.tok.weight.normal_(0, 0.15)
        z = torch.randn(8)
        first = dec(torch.tensor([[0]]), z[None], torch.tensor([0]))[0, -1]
    return dec, z, 0, int(first.argsort(descending=True)[1])  # decoder, z, BOS id, EOS id: the 2nd likeliest token


def test_sampling_at_temperature_t_follows_softmax_of_logits_over_t(sampler):
    """One generate() call holds rows at temperatures 0.5, 1 and 2, interleaved. For each, the first sampled token is
    distributed as softmax(logits / t) of the decoder's forward logits after BOS, and the second, given the most
    likely first token, as softmax(logits / t) after (BOS, that token) (rows that ended with EOS at step 1 leave
    the batch, so the per-row temperatures must follow the surviving rows). Each fit is rejected for the other
    temperatures."""
    dec, z, bos, eos = sampler
    n = 12000
    tau = torch.tensor(TEMPERATURES).repeat(n)  # interleaved: 0.5, 1, 2, 0.5, ...
    g = torch.Generator().manual_seed(0)
    seqs = dec.generate(z.expand(len(tau), -1), torch.zeros(len(tau), dtype=torch.long), bos, eos, tau, 3, g)
    with torch.no_grad():
        first = dec(torch.tensor([[bos]]), z[None], torch.tensor([0]))[0, -1]
        top = int(first.argmax())
        second = dec(torch.tensor([[bos, top]]), z[None], torch.tensor([0]))[0, -1]
    assert top != eos and float(first.softmax(-1)[eos]) > 0.02  # some rows end early at every temperature
    for k, t in enumerate(TEMPERATURES):
        rows = seqs[k :: len(TEMPERATURES)]
        c1 = torch.bincount(torch.tensor([s[1] for s in rows]), minlength=12)
        c2 = torch.bincount(torch.tensor([s[2] for s in rows if s[1] == top]), minlength=12)
        for counts, logits in ((c1, first), (c2, second)):
            assert _chi2_pvalue(counts, (logits / t).softmax(-1)) > 1e-4, t
            for wrong in TEMPERATURES:
                if wrong != t:
                    assert _chi2_pvalue(counts, (logits / wrong).softmax(-1)) < 1e-6, (t, wrong)


def test_a_sample_with_pad_inside_is_dropped_and_counted():
    # the decoder may emit PAD mid-way; such a sample is no input of the task (its text would hide the PAD), so the
    # reading drops it, counts it, and treats it as a candidate outside epsilon
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:addition")
    p = iv.probed
    pad = p.tokenizer.pad_id
    good, bad = p.encode("480+484=964"), p.encode("435+115=550")
    bad = bad[:3] + [pad] + bad[3:]

    def fixed(z, site, bos, eos, tau, max_len, g):
        return [list(good) if i % 2 else list(bad) for i in range(len(z))]

    iv.decoder.generate = fixed
    pre = iv.query("480+484=964", site="a0.3", position=8, samples=8, chains=0)
    assert pre.settings["dropped"] == 4
    assert all(pad not in [p.tokenizer.tokens.index(t) for t in s.tokens] for s in pre.samples)
    assert pre.fraction_inside == pytest.approx(4 / 8)
    from inversionview.viewer.terminal import render

    assert "4 dropped (a BOS, PAD or EOS inside: no input)" in render(pre, colour=False)
