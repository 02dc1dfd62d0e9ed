"""The one schema of a reading's JSON (inversionview.schema): what readings write passes it; every field of a reading
posted to the viewer is checked against it before any code uses it, so a structured fuzz of every field (deleted,
renamed, retyped, nested deep) gets a one-line 4xx and never a 5xx, on the viewer's epsilon and report routes."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import urllib.error
import urllib.request

import pytest

from inversionview import InversionView
from inversionview.errors import UserError
from inversionview.preimage import Preimage, Sample
from inversionview.schema import (
    MAX_DEPTH,
    RULES,
    SOURCES,
    NotAReading,
    check_reading,
    of_dataclass,
    reading_dict,
    reading_from_dict,
)
from inversionview.viewer.server import Reject, Viewer, make_server

TEXT = "vvzccvczvvvzvcvc|v:8"


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


@pytest.fixture(scope="module")
def reading(iv) -> dict:
    """A head site's reading with chains, checks and shares, as the page holds it (JSON)."""
    d = json.loads(iv.query(TEXT, site="a1.0", position=19, samples=32).to_json())
    assert d["checks"] and d["shares"] and d["chains"]["members"] and d["attention"]
    return d


@pytest.fixture(scope="module")
def viewer(iv):
    v = Viewer(iv)
    yield v
    v.close()


def refusal(d, finite: bool = True) -> str:
    with pytest.raises(UserError) as e:
        check_reading(d, finite)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("not a reading's JSON"), msg
    return msg


# ---------------------------------------------------------------------------------------------- what readings write
@pytest.mark.parametrize(
    "site, position, kw",
    [("a1.0", 19, {}), ("x0.post", 18, {"chains": 0}), ("m0", 3, {"temperature": 1.0, "noise": 0.1})],
)
def test_readings_as_written_pass_the_schema(iv, site, position, kw):
    pre = iv.query(TEXT, site=site, position=position, samples=48, **kw)
    d = json.loads(pre.to_json())
    assert check_reading(d) == d and reading_from_dict(d) == pre
    assert reading_dict(pre) == pre.to_dict()  # the schema writes what to_dict writes, without its deep copy


def test_addition_readings_pass_the_schema():
    iv = InversionView.load("shipped:addition")
    pre = iv.query("156+247=403", site=iv.sites[-1].short, position=-2, samples=32, chains=4)
    assert reading_from_dict(json.loads(pre.to_json())) == pre


def test_every_field_of_the_dataclasses_has_a_check_and_every_rule_names_a_field():
    for cls in (Preimage, Sample):
        obj = of_dataclass(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(obj.fields) == names and set(RULES[cls.__name__]) <= names, cls
    assert set(SOURCES) >= {"decoder", "chain", "data"}


def test_a_field_added_to_the_dataclasses_is_checked_by_its_type(reading):
    """As ``distribution`` and ``sources`` (dicts or None) were added to Preimage: no edit of the schema needed."""
    Later = dataclasses.make_dataclass(
        "Preimage", [("distribution", dict | None, None), ("sources", dict | None, None)], bases=(Preimage,)
    )
    schema = of_dataclass(Later)
    ok = {**reading, "distribution": {"counts": [1, 2], "name": "test"}, "sources": None}
    schema.check(ok, "", True)
    from inversionview.schema import Bad

    deep: dict = {}
    for _ in range(MAX_DEPTH + 5):
        deep = {"a": deep}
    for bad, words in [
        ({**ok, "distribution": 5}, "distribution must be an object"),
        ({**ok, "sources": ["x"]}, "sources must be an object"),
        ({**ok, "distribution": deep}, f"nested more than {MAX_DEPTH} deep"),
        ({**ok, "distribution": {"x": float("nan")}}, "non-finite"),
    ]:
        with pytest.raises(Bad, match=words):
            schema.check(bad, "", True)
    # keys no dataclass field names (a later version's) are dropped, not refused
    assert "verdicts" not in check_reading({**reading, "verdicts": {"a": 1}})


# ---------------------------------------------------------------------------------------------- the fields (#30 item 3)
def test_unchecked_fields_of_issue_30_are_refused(reading):
    s0 = reading["samples"][0]
    cases = [
        ({**reading, "samples": [{**s0, "count": -5}]}, "samples[0].count must be a whole number from 0"),
        ({**reading, "samples": [{**s0, "position": 999}]}, "samples[0].position must be a token index below"),
        ({**reading, "samples": [{**s0, "position": True}]}, "samples[0].position must be a whole number"),
        ({**reading, "position": True}, "position must be a whole number of at least 0, got true"),
        ({**reading, "attention": reading["attention"][:-1]}, "attention must hold one weight per token"),
        ({**reading, "site": "m0 "}, 'site must be a non-empty string without leading or trailing spaces, got "m0 "'),
        ({**reading, "site_short": ""}, "site_short must be a non-empty string"),
        ({**reading, "samples": [{**s0, "source": "elsewhere"}]}, "samples[0].source must be one of"),
        ({**reading, "samples": [{**s0, "distances": s0["distances"][:-1]}]}, "must hold one entry per token"),
        ({**reading, "samples": [{**s0, "count": 33}]}, "more than n_candidates (32)"),
        ({**reading, "n_candidates": 0}, "n_candidates must be a whole number from 1 to 8192"),
        ({**reading, "fraction_inside": 1.5}, "fraction_inside must be a finite number from 0 to 1"),
        ({**reading, "metric": "manhattan"}, "metric must be one of 'euclidean', 'cosine'"),
        ({**reading, "epsilon": 10**400}, "epsilon must be a finite number above 0"),
        ({**reading, "settings": {**reading["settings"], "mix": [[0, 0]]}}, "settings.mix[0][0] must be"),
        ({**reading, "checks": [{"feature": "count", "value": 8}]}, "checks[0] has no field 'distances'"),
        ({**reading, "chains": {**reading["chains"], "states": [["nope"]]}}, "not among the chains' members"),
        ({**reading, "samples": "x"}, "samples must be a list (each item an object)"),
        ([reading], "a reading must be a JSON object, got a list"),
    ]
    for bad, words in cases:
        assert words in refusal(bad), words


def test_a_renamed_chains_or_checks_field_names_it(reading):
    ch = dict(reading["chains"])
    ch["eps"] = ch.pop("epsilon")
    assert "chains has no field 'epsilon'" in refusal({**reading, "chains": ch})
    checks = copy.deepcopy(reading["checks"])
    del checks[0]["distances"]
    assert "checks[0] has no field 'distances'" in refusal({**reading, "checks": checks})


def test_non_finite_numbers_only_where_asked(reading):
    s = [{**reading["samples"][0], "distance": float("inf")}, *reading["samples"][1:]]
    assert "samples[0].distance must be a finite number" in refusal({**reading, "samples": s})
    assert check_reading({**reading, "samples": s}, finite=False)["samples"][0]["distance"] == float("inf")


# ---------------------------------------------------------------------------------------------- the fuzz
DEPTH = 900
WRONG = [None, True, -5, 999, 2.5, 10**400, "x", " m0 ", "", [], {}, ["x"], {"a": 1}]


def deep_list(n: int = DEPTH):
    out: list = []
    for _ in range(n):
        out = [out]
    return out


def deep_dict(n: int = DEPTH):
    out: dict = {}
    for _ in range(n):
        out = {"a": out}
    return out


def places(x, path=(), depth=0):
    """Paths to the values of ``x`` to mutate: every key of every object (two of a big object's, such as the
    chains' members), the first and last item of every list, recursively."""
    if depth > 6:
        return
    if isinstance(x, dict):
        keys = list(x)
        for k in keys if len(keys) <= 24 else keys[:2]:
            yield (*path, k)
            yield from places(x[k], (*path, k), depth + 1)
    elif isinstance(x, list) and x:
        for i in sorted({0, len(x) - 1}):
            yield (*path, i)
            yield from places(x[i], (*path, i), depth + 1)


def mutations(reading: dict, under: str | None = None):
    """(name, mutated reading): each place (in the field ``under`` only, where given) deleted, renamed, set to each
    wrong value and nested DEPTH deep."""
    text = json.dumps(reading)
    for path in places(reading):
        if under is not None and path[0] != under:
            continue
        *head, last = path

        def at(d):
            for k in head:
                d = d[k]
            return d

        name = ".".join(map(str, path))
        for how in ["delete", "rename", "deep list", "deep dict", *range(len(WRONG))]:
            d = json.loads(text)  # a copy, as a route parses it
            parent = at(d)
            if how == "delete":
                del parent[last]
            elif how == "rename":
                if not isinstance(parent, dict):
                    continue
                parent[f"{last}_renamed"] = parent.pop(last)
            elif how == "deep list":
                parent[last] = deep_list()
            elif how == "deep dict":
                parent[last] = deep_dict()
            else:
                parent[last] = copy.deepcopy(WRONG[how])
            yield f"{name} {how if isinstance(how, str) else 'set to ' + repr(WRONG[how])[:20]}", d


def outcome(fn, body) -> int:
    """The status the viewer's route answers: 200, a refusal's 4xx, or 500 (what the route makes of any other
    exception: see inversionview.viewer.server.endpoint)."""
    try:
        fn(body)
        return 200
    except Reject as e:
        return e.status
    except UserError:
        return 400
    except RecursionError:
        return 400
    except Exception:  # noqa: BLE001 - a bug: the route answers 500
        return 500


def under_data(reading: dict) -> dict:
    """The reading as if read under a data set: its chains' members as the data's members within epsilon."""
    ch = reading["chains"]
    members = {x: [*v[:3], 1.0, {}] for x, v in ch["members"].items()}
    dist = {"kind": "data", "name": "d.txt", "inputs": 900, "distinct": 800, "epsilon": ch["epsilon"], "found": 50}
    return {
        **reading,
        "chains": None,
        "distribution": {**dist, "metric": "euclidean", "n_eff": 12.5, "members": members},
    }


@pytest.mark.slow
def test_fuzz_of_every_field_gives_no_5xx(viewer, reading):
    """Every field of a reading deleted, renamed, retyped and nested 900 deep, sent (as JSON, through the same
    methods the routes call) to /api/epsilon at an epsilon below and above the chains' and to /api/report; and
    every field of a data set's distribution (the summary reads its members)."""
    data = under_data(reading)
    summary = viewer.epsilon({"reading": data, "epsilon": 0.05})["reading"]["summary"]
    assert summary[0].startswith("exact over the data set's preimage"), summary
    bad, seen, statuses = [], 0, {}
    for i, (name, d) in enumerate([*mutations(reading), *mutations(data, "distribution")]):
        eps = (0.05, 0.3)[i % 2]
        for route, fn, b in (
            ("epsilon", viewer.epsilon, {"reading": d, "epsilon": eps}),
            ("report", viewer.report, {"readings": [d]}),
        ):
            status = outcome(fn, b)
            statuses[status] = statuses.get(status, 0) + 1
            seen += 1
            if status >= 500:
                bad.append(f"{route}: {name}")
    assert seen > 2000 and statuses.get(400, 0) > 1000, statuses
    assert bad == [], f"{len(bad)} of {seen} gave a 5xx: {bad[:10]}"


def test_issue_30_bodies_over_http_are_400(iv, reading):
    """The 500s of issue 30, through real HTTP: a renamed chains.epsilon, a deleted checks[0].distances, chains
    nested 900 deep; each refused with one line, on /api/epsilon and /api/report alike."""
    server = make_server(iv, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        ch = dict(reading["chains"])
        ch["eps"] = ch.pop("epsilon")
        checks = copy.deepcopy(reading["checks"])
        del checks[0]["distances"]
        for d in ({**reading, "chains": ch}, {**reading, "checks": checks}, {**reading, "chains": deep_list()}):
            for path, body in (("/api/epsilon", {"reading": d, "epsilon": 0.2}), ("/api/report", {"readings": [d]})):
                req = urllib.request.Request(
                    url + path, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
                )
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=60)
                msg = json.loads(e.value.read())["error"]
                assert e.value.code == 400 and "\n" not in msg and "not a reading's JSON" in msg, msg
    finally:
        server.shutdown()
        server.server_close()


def test_not_a_reading_carries_the_detail(reading):
    with pytest.raises(NotAReading) as e:
        check_reading({**reading, "text": 1})
    assert e.value.detail == "text must be a string, got 1"
    with pytest.raises(NotAReading) as e:
        check_reading({"text": "x"})
    assert e.value.detail == "the reading has no field 'tokens'"
