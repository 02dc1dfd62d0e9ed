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
from inversionview.preimage import verify
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
    assert b.valid[1, : len(query) - 1].all() and not b.valid[1, len(query) - 1:].any()
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
