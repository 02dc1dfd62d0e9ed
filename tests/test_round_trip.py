"""A sample's text round-trips (#30 item 9): re-encoding the text a reading shows gives the token ids it scored. A
decoder sample with a BOS inside (``BwmBdnddnond|o:3E``) showed as ``wmdnddnond|o:3``, another input; such a sample
is no input (as one with PAD or EOS inside) and is dropped, counted in the reading's ``dropped``."""

from __future__ import annotations

import pytest

from inversionview import InversionView
from inversionview.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


def test_character_vocabulary_round_trips(iv):
    tok = iv.probed.tokenizer
    ids = tok.encode("wwvdvwvddwdwwdw|v:3")
    assert tok.round_trips(ids) and tok.round_trips(ids[:-1])  # the ending EOS aside: no distance is taken there
    inner = ids[:3] + [tok.bos_id] + ids[3:]
    assert tok.text(inner) == tok.text(ids) and not tok.round_trips(inner)
    assert not tok.round_trips(ids[:3] + [tok.eos_id] + ids[3:]) and not tok.round_trips(ids[:3] + [tok.pad_id])
    assert not tok.round_trips(ids[1:]) and not tok.round_trips([])  # no BOS first


def test_gpt2_round_trips():
    tok = gpt2_tokenizer()
    ids = tok.encode("Hello world, this is text.")
    assert tok.round_trips(ids)
    eot = tok.bos_id
    assert not tok.round_trips(ids[:2] + [eot] + ids[2:])  # an <|endoftext|> inside vanishes from the text
    assert not tok.round_trips([*ids, eot, *ids[1:]]) and tok.round_trips([*ids, eot])  # an ending EOS aside


def test_every_sample_of_a_reading_re_encodes_to_the_ids_it_scored(iv):
    """At temperature 2 the counting decoder puts a BOS inside about one sample in sixty here."""
    tok = iv.probed.tokenizer
    index = {t: i for i, t in enumerate(tok.tokens)}
    pre = iv.query("wwvdvwvddwdwwdw|v:3", site="a1.0", position=-1, samples=512, temperature=2.0, chains=0)
    bad = []
    for s in pre.samples:
        scored = [index[t] for t in s.tokens]
        again = tok.encode(s.text)
        if again != scored and again[:-1] != scored:
            bad.append("".join(s.tokens))
    assert bad == [] and pre.settings["dropped"] > 0, bad[:5]


def test_the_counts_line_says_distinct_among_the_candidates_and_who_joined(iv):
    """#30 item 11: "1024 candidates, 1048 distinct" counted the chains' members in with the candidates' inputs."""
    from inversionview.viewer.terminal import render

    pre = iv.query("vvzccvczvvvzvcvc|v:8", site="a1.0", position=19, samples=64)
    own = sum(1 for s in pre.samples if s.source == "decoder")
    chain = sum(1 for s in pre.samples if s.source == "chain")
    assert own <= 64 < own + chain
    line = next(x for x in render(pre, colour=False).splitlines() if x.startswith("64 candidates"))
    assert line.startswith(f"64 candidates, {own} distinct among them (+{chain} met by the chains); ")
