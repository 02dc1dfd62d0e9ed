"""``reproduce``: the paper's claims checked on the shipped models, with small counts."""

from __future__ import annotations

import json

from conftest import user_error
from inversionview.fcr import CARRIES, MARGIN, PARTLY
from inversionview.reproduce import CLAIMS, Check, Claim, reproduce


def _rule(k: Check) -> bool:
    """The stated rules, written out again."""
    if k.value is None or k.baseline is None:
        return False
    if k.expect == "flips":
        return k.baseline > 0 and k.value < 0
    far = k.value - k.baseline >= MARGIN - 1e-9
    return {
        "carries": k.value >= CARRIES and far,
        "approx.": k.value >= PARTLY and far,
        "varies": not (k.value >= PARTLY and far),
    }[k.expect]


def test_verdict_rules():
    ok = Check("X", "s", "p", "f", "carries", 0.95, 0.1, 10, 2)
    weak = Check("X", "s", "p", "f", "carries", 0.95, 0.7, 10, 2)  # not far enough above chance
    assert ok.holds and not weak.holds
    assert Check("X", "s", "p", "f", "varies", 0.5, 0.1, 10, 2).holds
    assert Check("X", "s", "p", "f", "varies", 0.7, 0.5, 10, 2).holds  # not far enough above chance
    assert not Check("X", "s", "p", "f", "varies", 0.7, 0.1, 10, 2).holds  # partly carried
    assert Check("X", "s", "p", "f", "approx.", 0.7, 0.1, 10, 2).holds
    assert Check("X", "path", "p", "LD", "flips", -3.0, 18.0, 50, 0).holds
    assert not Check("X", "path", "p", "LD", "flips", 2.0, 18.0, 50, 0).holds
    assert not Check("X", "path", "p", "LD", "flips", None, None, 0, 0).holds  # not checked
    assert Claim("X", "", (ok, weak)).verdict == "partly supported"
    assert Claim("X", "", (ok,)).verdict == "supported" and Claim("X", "", (weak,)).verdict == "not supported"


def test_reproduce_counting_small():
    res = reproduce("counting", queries=4, samples=48, pairs=8, progress=False)
    assert [c.name for c in res.claims] == list(CLAIMS["counting"])
    for c in res.claims:
        assert len(c.checks) == len(CLAIMS["counting"][c.name][1])
        for k in c.checks:
            assert k.holds == _rule(k)
            if k.expect != "flips":
                assert k.queries + k.empty <= 4 and (k.samples > 0) == (k.queries > 0)
    table = res.table()
    for c in res.claims:
        assert c.name in table and c.verdict in table
    # C3's patching: the first link alone and the whole path, both against the same LD before patching
    first, path = res.claims[2].checks[-2:]
    assert (first.site, path.site) == ("patch a0.0@-3", "patch a0.0@-3 + a1.0@:")
    assert first.samples == path.samples == 8 and first.baseline == path.baseline > 0
    assert first.value != path.value and "C3 patching: head 0.0" in table and "a0.0@-3 alone" in table
    d = json.loads(json.dumps(res.to_dict()))
    assert [c["verdict"] for c in d["claims"]] == [c.verdict for c in res.claims]


def test_reproduce_addition_cli(capsys):
    from inversionview.cli import main

    assert main(["reproduce", "addition", "--queries", "3", "--samples", "48", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [c["claim"] for c in d["claims"]] == ["A1", "A2", "A3"]
    assert set(d["roles"]) == {"F1S1", "F2S2", "F3S3", "carry_tens"}
    for c in d["claims"]:
        for k in c["checks"]:
            assert k["holds"] == _rule(Check(**{f: k[f] for f in Check.__dataclass_fields__}))


def test_reproduce_bad_input(capsys):
    assert "unknown task 'ioi'" in user_error(capsys, "reproduce", "ioi")
    assert "unknown task 'countng'" in user_error(capsys, "reproduce", "countng")
    assert "at least 1" in user_error(capsys, "reproduce", "counting", "--queries", 0)
