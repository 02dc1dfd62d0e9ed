"""Site names: TransformerLens hook names and the paper's short names, both ways."""

from __future__ import annotations

import pytest

from inversionview.errors import UserError
from inversionview.sites import KINDS, Site, all_sites, parse_site

TABLE = [
    ("blocks.0.hook_resid_pre", "x0.pre", Site(0, "resid_pre")),
    ("blocks.3.hook_resid_mid", "x3.mid", Site(3, "resid_mid")),
    ("blocks.1.hook_resid_post", "x1.post", Site(1, "resid_post")),
    ("blocks.2.hook_attn_out", "a2", Site(2, "attn_out")),
    ("blocks.1.hook_mlp_out", "m1", Site(1, "mlp_out")),
    ("blocks.1.attn.hook_result.0", "a1.0", Site(1, "result", 0)),
    ("blocks.11.attn.hook_result.10", "a11.10", Site(11, "result", 10)),
]


@pytest.mark.parametrize("tl, short, site", TABLE)
def test_parse_both_names(tl, short, site):
    assert parse_site(tl) == site
    assert parse_site(short) == site
    assert site.name == tl
    assert site.short == short
    assert str(site) == short


@pytest.mark.parametrize("tl, short, site", TABLE[:6])
def test_parse_checked_against_shape(tl, short, site):
    # every site in the table exists in a 4-layer, 2-head model
    assert parse_site(tl, 4, 2) == site
    assert parse_site(short, 4, 2) == site


def test_whitespace_is_ignored():
    assert parse_site("  a1.0 \n") == Site(1, "result", 0)
    assert parse_site(" blocks.0.hook_mlp_out ") == Site(0, "mlp_out")


@pytest.mark.parametrize("n_layers, n_heads", [(1, 1), (2, 1), (2, 4), (3, 2)])
def test_round_trip_over_all_sites(n_layers, n_heads):
    sites = all_sites(n_layers, n_heads)
    assert len(sites) == n_layers * (5 + n_heads)
    assert len(set(sites)) == len(sites)
    assert len({s.name for s in sites}) == len(sites)
    assert len({s.short for s in sites}) == len(sites)
    for s in sites:
        assert s.kind in KINDS
        assert parse_site(s.name, n_layers, n_heads) == s
        assert parse_site(s.short, n_layers, n_heads) == s
        assert parse_site(s.name).short == s.short
        assert parse_site(s.short).name == s.name


def test_all_sites_forward_order():
    sites = all_sites(2, 2)
    assert [s.short for s in sites[:7]] == ["x0.pre", "a0.0", "a0.1", "a0", "x0.mid", "m0", "x0.post"]
    assert sites[7] == Site(1, "resid_pre")
    assert sites[-1] == Site(1, "resid_post")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x0",
        "x0.foo",
        "a",
        "blocks.0.hook_resid",
        "blocks.0.attn.hook_result",
        "blocks.x.hook_resid_pre",
        "resid_pre",
        "a0.0.0",
        "q1.0",
    ],
)
def test_malformed_names_raise(name):
    with pytest.raises(UserError) as e:
        parse_site(name)
    msg = str(e.value)
    assert repr(name.strip()) in msg
    assert "a1.0" in msg  # shows what a valid name looks like


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("a1.3", "a1.1"),  # head out of range
        ("x2.pre", "x1.pre"),  # layer out of range
        ("blocks.0.hook_resid_mod", "blocks.0.hook_resid_mid"),  # typo in a TL name
        ("m7", None),
        ("blocks.5.attn.hook_result.0", None),
    ],
)
def test_unknown_name_suggests(name, suggestion):
    with pytest.raises(UserError) as e:
        parse_site(name, 2, 2)
    msg = str(e.value)
    assert "did you mean" in msg
    assert repr(name) in msg
    if suggestion is not None:
        assert f"did you mean {suggestion!r}" in msg
    # the suggestion is itself a valid name of this model
    suggested = msg.split("did you mean ", 1)[1].split("?", 1)[0].strip("'")
    assert parse_site(suggested, 2, 2) in all_sites(2, 2)
    # and the message lists the model's sites
    assert "x0.pre" in msg and "a1.1" in msg


def test_site_ordering_and_hashing():
    assert Site(0, "result", 1) == Site(0, "result", 1)
    assert {Site(0, "result", 1): 1}[parse_site("a0.1")] == 1
    assert Site(0, "resid_pre") < Site(1, "resid_pre")
