"""The automatic summary of a reading, on real readings of the shipped counting and addition models."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from inversionview.features import builtin_features
from inversionview.preimage import Preimage
from inversionview.summary import SHARED, summarize
from inversionview.viewer.terminal import render

QUERY = "vvzccvczvvvzvcvc|v:8"


@pytest.fixture(scope="module")
def counting_iv():
    from inversionview.run import InversionView

    return InversionView.load("shipped:counting")


@pytest.fixture(scope="module")
def colon(counting_iv):
    return counting_iv.query(QUERY, site="a1.0", position=":", samples=128)


def _share(line: str) -> tuple[int, int]:
    m = re.match(r"shared by (\d+)% of (\d+) samples: ", line)
    return int(m.group(1)), int(m.group(2))


def test_reading_states_the_count_as_shared(colon):
    # head 1.0 at ':' keeps the count (the paper's C2); the shares are those of the in-epsilon samples
    s = colon.summary
    assert s == summarize(colon, "counting")
    inside = colon.inside
    counts = Counter(builtin_features("counting")["count"](x.text) for x in inside)
    value, n = counts.most_common(1)[0]
    assert value == 8 and n / len(inside) >= SHARED
    line = [x for x in s if x.endswith(": count = 8")][0]
    assert _share(line) == (round(100 * n / len(inside)), len(inside))
    # the matched position is ':' in every sample (the minimum over positions lands on the same token)
    matched = [x for x in s if x.startswith("tokens aligned at the matched position")][0]
    assert "+0=':'" in matched


def test_varying_feature_listed_with_examples(counting_iv):
    # the embedding of the target character carries the letter and its position, not the count
    pre = counting_iv.query(QUERY, site="x0.pre", position=18, samples=128)
    s = pre.summary
    assert any(x.endswith(": target = v") for x in s)
    vary = [x for x in s if x.startswith("varies: count (")]
    assert vary, s
    counts = Counter(builtin_features("counting")["count"](x.text) for x in pre.inside)
    top = counts.most_common(1)[0]
    assert f"{top[0]} {top[1] / len(pre.inside):.0%}" in vary[0]
    assert all(x.startswith(("shared by", "tokens aligned", "varies:")) for x in s)


def test_addition_reading_summary():
    from inversionview.run import InversionView

    iv = InversionView.load("shipped:addition")
    pre = iv.query("456+378=834", site="x0.mid", position="=", samples=128)
    inside = pre.inside
    f = builtin_features("addition")["F1S1"]
    share = Counter(f(x.text) for x in inside).most_common(1)[0]
    line = [x for x in pre.summary if "F1S1" in x][0]
    if share[1] / len(inside) >= SHARED:
        assert line == f"shared by {share[1] / len(inside):.0%} of {len(inside)} samples: F1S1 = {share[0]}"
    else:
        assert line.startswith("varies: F1S1 (")
    # '+' and '=' stand at fixed places in every addition input
    start = [x for x in pre.summary if x.startswith("tokens aligned from the start")][0]
    assert "4='+' 100%" in start and "8='=' 100%" in start


def test_summary_follows_epsilon_and_round_trips(colon):
    d = colon.to_dict()
    assert d["summary"] == colon.summary and d["settings"]["task"] == "counting"
    assert Preimage.from_dict(d).summary == colon.summary
    old = {k: v for k, v in d.items() if k != "summary"}  # a reading saved before the field existed
    assert Preimage.from_dict(old).summary is None
    tiny = colon.with_epsilon(1e-9)
    assert tiny.summary == [f"no sample inside epsilon {1e-9:g}: nothing to summarise"]
    wide = colon.with_epsilon(0.3)
    assert _share([x for x in wide.summary if x.startswith("shared by")][0])[1] == len(wide.inside)


def test_terminal_shows_summary(colon):
    out = render(colon, limit=5, colour=False)
    assert "summary (distinct samples inside epsilon):" in out
    for line in colon.summary:
        assert "  " + line in out
