"""The live viewer's HTTP API (inversionview.viewer.server) on the shipped counting model, through real HTTP
with urllib: the page and its assets, queries, reports, and a 4xx with a one-line JSON message for every bad
request (never a 500 or a traceback)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from inversionview import InversionView
from inversionview.cli import build_parser
from inversionview.preimage import Preimage
from inversionview.viewer.server import MAX_BODY, MAX_SAMPLES, MAX_TEXT, make_server

TEXT = "vvzccvczvvvzvcvc|v:8"  # BOS + 20 characters + EOS: the target 'v' is at 18, ':' at 19


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


@pytest.fixture(scope="module")
def url(iv):
    server = make_server(iv, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, path, body=None, method=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, payload = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, payload = e.code, e.headers, e.read()
    text = payload.decode()
    return status, headers, json.loads(text) if headers.get("Content-Type", "").startswith("application/json") else text


def refused(url, path, status, body=None, method=None, raw=None) -> str:
    got, headers, out = call(url, path, body, method, raw)
    assert got == status, out
    assert headers["Content-Type"] == "application/json" and set(out) == {"error"}
    msg = out["error"]
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 300
    return msg


def query(**kw):
    return {"text": TEXT, "site": "a1.0", "position": 19, "samples": 64, **kw}


# ---------------------------------------------------------------------------------------------- what works
def test_page_and_assets_come_from_the_package(url):
    status, headers, page = call(url, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(assets) == ["/static/report.css", "/static/viewer.css", "/static/viewer.js", "data:,"]  # no favicon
    assets.remove("data:,")
    for a in assets:
        s, h, body = call(url, a)
        assert s == 200 and body and "http://" not in body and "https://" not in body
    assert call(url, "/static/viewer.js")[1]["Content-Type"].startswith("text/javascript")


def test_info_groups_sites_by_layer(url, iv):
    status, _, info = call(url, "/api/info")
    assert status == 200
    assert [g["label"] for g in info["groups"]] == ["layer 0", "layer 1"]
    shorts = [s["short"] for g in info["groups"] for s in g["sites"]]
    assert shorts == [s.short for s in iv.sites]
    heads = {s["short"] for g in info["groups"] for s in g["sites"] if s["head"]}
    assert heads == {"a0.0", "a1.0"}
    assert info["max_samples"] == MAX_SAMPLES and info["max_text"] == MAX_TEXT and info["epsilon"] == iv.spec.epsilon


def test_random_input_is_a_task_input_with_its_positions(url, iv):
    status, _, r = call(url, "/api/random")
    assert status == 200
    assert r["tokens"] == iv.probed.tokenizer.tokens_of(iv.probed.encode(r["text"]))
    assert r["positions"] == iv.task.positions(r["text"]) and r["n_text"] == len(r["tokens"]) - 1


def test_tokens_of_a_typed_input(url):
    status, _, r = call(url, "/api/tokens", {"text": TEXT})
    assert status == 200 and r["tokens"][0] == "B" and r["tokens"][19] == ":" and r["tokens"][-1] == "E"
    assert r["positions"] == [18, 19] and r["n_text"] == 21
    # an input outside the task's format can still be read: it just has no task positions
    assert call(url, "/api/tokens", {"text": "abc"})[2]["positions"] == []


def test_query_returns_the_reading_and_its_fragment(url):
    status, _, r = call(url, "/api/query", query(epsilon=0.2))
    assert status == 200
    pre = Preimage.from_dict(r["reading"])
    assert pre.site_short == "a1.0" and pre.position == 19 and pre.epsilon == 0.2 and pre.n_candidates == 64
    ds = [s.distance for s in pre.samples]
    assert ds == sorted(ds) and pre.attention is not None and len(pre.attention) == 20
    assert pre.fraction_inside == sum(s.count for s in pre.samples if s.distance <= 0.2) / 64
    frag = r["html"]
    assert frag.startswith('<section class="reading" data-site="a1.0" data-position="19"')
    assert "epsilon = 0.2" in frag and f"{pre.fraction_inside:.1%}" in frag and r["seconds"] > 0
    # a token position may be given as the token; the temperature replaces the Auto mix
    r2 = call(url, "/api/query", query(position=":", temperature=1.0, noise=0.1, seed=3))[2]["reading"]
    assert r2["position"] == 19 and r2["settings"]["mix"] == [[1.0, 0.1]] and r2["settings"]["seed"] == 3


def test_report_renders_the_readings_json_side_by_side(url):
    a = call(url, "/api/query", query())[2]["reading"]
    b = call(url, "/api/query", query(site="x0.post", position=18))[2]["reading"]
    status, headers, html = call(url, "/api/report", {"readings": [a, b]})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "attachment" in headers["Content-Disposition"]
    assert html.count('<section class="reading"') == 2 and '<div class="readings">' in html
    assert 'data-site="a1.0" data-position="19"' in html and 'data-site="x0.post" data-position="18"' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    # the same code path as `inversionview query --html`
    from inversionview.viewer.html import render_html

    assert html == render_html([Preimage.from_dict(a), Preimage.from_dict(b)])


def test_epsilon_moves_the_rule_without_sampling_again(url):
    r = call(url, "/api/query", query())[2]
    status, _, r2 = call(url, "/api/epsilon", {"reading": r["reading"], "epsilon": 0.35})
    want = Preimage.from_dict(r["reading"]).with_epsilon(0.35)
    assert status == 200 and Preimage.from_dict(r2["reading"]) == want
    assert "epsilon = 0.35" in r2["html"] and f"{want.fraction_inside:.1%}" in r2["html"]
    assert "epsilon must be positive" in refused(url, "/api/epsilon", 400, {"reading": r["reading"], "epsilon": 0})
    assert "epsilon must be a finite number" in refused(url, "/api/epsilon", 400, {"reading": r["reading"], "epsilon": "x"})
    assert "not a reading's JSON" in refused(url, "/api/epsilon", 400, {"reading": {"site": "a1.0"}, "epsilon": 0.2})


def test_a_slow_query_does_not_block_the_page(url):
    done = {}

    def slow():
        done["r"] = call(url, "/api/query", query(samples=2048))

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)  # the query is now holding the model
    t0 = time.perf_counter()
    for path in ("/api/info", "/", "/static/viewer.js", "/api/random"):
        assert call(url, path)[0] == 200
    quick = time.perf_counter() - t0
    still_running = t.is_alive()
    t.join()
    assert done["r"][0] == 200
    assert still_running, "the query finished before the other requests were served: nothing was tested"
    assert quick < 1.5


def test_serve_binds_localhost_by_default(iv):
    args = build_parser().parse_args(["serve", "shipped:counting"])
    assert args.host == "127.0.0.1" and args.db is None
    server = make_server(iv, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    from inversionview.errors import UserError

    with pytest.raises(UserError, match="port must be between 0 and 65535"):
        make_server(iv, port=99999)


# ---------------------------------------------------------------------------------------------- bad requests
def test_unknown_route_is_404(url):
    assert "no such page" in refused(url, "/api/nothing", 404)
    assert "no such file" in refused(url, "/static/nothing.js", 404)


def test_no_file_paths_from_the_client(url):
    for path in ("/static/../server.py", "/static/%2e%2e%2fserver.py", "/static/..%2f..%2fcli.py",
                 "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/../../pyproject.toml"):
        refused(url, path, 404)


def test_wrong_method_is_405(url):
    assert "use POST" in refused(url, "/api/query", 405)
    assert "use GET" in refused(url, "/api/info", 405, {"x": 1})
    assert "use GET" in refused(url, "/", 405, method="DELETE")
    status, headers, _ = call(url, "/api/report")
    assert status == 405 and headers["Allow"] == "POST"


def test_malformed_json_is_400(url):
    assert "not valid JSON" in refused(url, "/api/query", 400, raw=b'{"text": "ab')
    assert "not valid JSON" in refused(url, "/api/query", 400, raw=b"\xff\xfe")
    assert "JSON object" in refused(url, "/api/query", 400, raw=b'["text"]')


def test_oversized_body_is_413(url):
    msg = refused(url, "/api/query", 413, raw=b'{"text": "' + b"a" * (MAX_BODY + 10) + b'"}')
    assert f"{MAX_BODY:,}" in msg
    # a client that announces a huge body is refused before anything is read
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    conn.putrequest("POST", "/api/report")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "unpin some readings" in json.loads(r.read())["error"]
    conn.close()


@pytest.mark.parametrize("body, words", [
    (query(samples=MAX_SAMPLES + 1), ["samples", f"between 1 and {MAX_SAMPLES}"]),
    (query(samples=0), ["samples"]),
    (query(samples="many"), ["samples must be a whole number"]),
    (query(text="v" * (MAX_TEXT + 1)), [f"{MAX_TEXT + 1} characters", f"at most {MAX_TEXT}"]),
    (query(text="vvvv" * 10 + "|v:9"), ["tokens long", "context is 33"]),
    (query(text="VVZ|v:2"), ["character 'V'", "not in the vocabulary"]),
    (query(text=""), ["type an input"]),
    (query(site="a7.3"), ["unknown site 'a7.3'"]),
    (query(site="a1"), ["not one this decoder was trained on", "expected one of"]),
    (query(site=""), ["choose a site"]),
    (query(position=40), ["position 40", "out of range"]),
    (query(position=None), ["position must be"]),
    (query(position="#"), ["'#'", "neither an index nor a token"]),
    (query(epsilon=-1), ["epsilon must be positive"]),
    (query(epsilon="wide"), ["epsilon must be a finite number"]),
    (query(epsilon=float("inf")), ["epsilon must be a finite number"]),  # Python's JSON sends Infinity and NaN
    (query(temperature=float("nan")), ["temperature must be a finite number"]),
    (query(temperature=1e300), ["temperature must be positive and at most 1e6"]),  # float32 would overflow
    (query(temperature=1.0, noise=-0.5), ["noise must be a finite number of at least 0"]),
    (query(metric="manhattan"), ["manhattan", "euclidean"]),
    (query(temperature=0), ["temperature must be positive"]),
    (query(noise=0.1), ["noise applies to one sampling temperature"]),
    (query(path="/etc/passwd"), ["unknown field 'path'"]),
])
def test_bad_query_is_400_with_one_clear_line(url, body, words):
    msg = refused(url, "/api/query", 400, body)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("body, words", [
    ({}, ["non-empty list 'readings'"]),
    ({"readings": []}, ["non-empty list"]),
    ({"readings": [{"text": "x"}]}, ["reading 1", "not a reading's JSON"]),
    ({"readings": ["a string"]}, ["reading 1", "JSON object"]),
])
def test_bad_report_is_400(url, body, words):
    msg = refused(url, "/api/report", 400, body)
    for w in words:
        assert w in msg, msg


def test_bad_report_reading_fields_are_400(url):
    good = call(url, "/api/query", query())[2]["reading"]
    last = good["samples"][-1]  # beyond the rows the page shows, but a report or a new epsilon reads it
    for bad in ({**good, "position": 99}, {**good, "epsilon": "x"}, {**good, "samples": [{"text": 1}]},
                {**good, "tokens": None}, {**good, "samples": good["samples"][:-1] + [{**last, "delta": "abc"}]},
                {**good, "samples": good["samples"][:-1] + [{**last, "count": "2"}]}):
        assert "reading 2" in refused(url, "/api/report", 400, {"readings": [good, bad]})
        assert "not a reading's JSON" in refused(url, "/api/epsilon", 400, {"reading": bad, "epsilon": 0.3})


def test_stored_readings_without_a_db_is_404(url):
    assert "--db" in refused(url, "/api/stored", 404)
    assert "--db" in refused(url, "/api/stored/1", 404)


def test_the_server_keeps_serving_after_bad_requests(url):
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    for path, body, status in [("/api/query", b"{bad", 400), ("/api/nothing", b"{}", 404), ("/api/info", None, 200),
                               ("/api/tokens", b'{"text": "ab|a:1"}', 200)]:
        conn.request("POST" if body is not None else "GET", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == status
    conn.close()


# ---------------------------------------------------------------------------------------------- stored readings
@pytest.fixture(scope="module")
def stored(iv, tmp_path_factory):
    """A server with a readings DB of two readings, their ids, and the store."""
    from inversionview.store import ReadingStore

    db = tmp_path_factory.mktemp("db") / "readings.sqlite"
    with ReadingStore(db, create=True) as store:
        ids = [store.put(iv.query(TEXT, site=s, position=p, samples=64), iv.fingerprint)
               for s, p in [("a1.0", 19), ("x0.post", 18)]]
    server = make_server(iv, port=0, db=str(db))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", ids, db
    server.shutdown()
    server.server_close()
    server.viewer.store.close()


def test_stored_readings_list_and_filters(stored):
    url, ids, _ = stored
    status, _, r = call(url, "/api/stored")
    assert status == 200 and [x["id"] for x in r["readings"]] == ids and r["sites"] == ["x0.post", "a1.0"]
    row = r["readings"][0]
    assert {"id", "text", "site", "site_short", "position", "fraction_inside", "n_samples"} <= set(row)
    assert row["text"] == TEXT and row["site_short"] == "a1.0" and row["position"] == 19
    assert call(url, "/api/info")[2]["stored"] is True
    assert [x["id"] for x in call(url, "/api/stored?site=x0.post")[2]["readings"]] == [ids[1]]
    assert [x["id"] for x in call(url, "/api/stored?position=19")[2]["readings"]] == [ids[0]]
    assert [x["id"] for x in call(url, "/api/stored?site=a1.0&position=18")[2]["readings"]] == []
    assert len(call(url, "/api/stored?text=%7Cv%3A8&site=")[2]["readings"]) == 2  # text "|v:8"; an empty filter is none
    assert call(url, "/api/stored?text=zzz")[2]["readings"] == []


def test_stored_reading_loads_as_a_query_does(stored):
    from inversionview.store import ReadingStore

    url, ids, db = stored
    status, _, r = call(url, f"/api/stored/{ids[1]}")
    with ReadingStore(db) as store:
        want = store.get(ids[1])
    assert status == 200 and Preimage.from_dict(r["reading"]) == want
    assert r["html"].startswith('<section class="reading" data-site="x0.post" data-position="18"')


def test_bad_stored_requests(stored, iv, tmp_path):
    url, ids, _ = stored
    assert "no reading with id 999" in refused(url, "/api/stored/999", 404)
    assert "no reading with id 1" in refused(url, "/api/stored/" + "1" * 30, 404)  # beyond SQLite's integers
    assert call(url, "/api/stored?position=" + "9" * 30)[2]["readings"] == []
    assert "whole numbers" in refused(url, "/api/stored/abc", 404)
    assert "whole number" in refused(url, "/api/stored?position=x", 400)
    assert "unknown filter 'path'" in refused(url, "/api/stored?path=/etc/passwd", 400)
    assert "use GET" in refused(url, "/api/stored", 405, {"site": "a1.0"})
    # the DB is named when the server starts, never by the client; a missing one is refused then
    from inversionview.errors import UserError

    with pytest.raises(UserError, match="no readings DB"):
        make_server(iv, port=0, db=str(tmp_path / "none.sqlite"))


def test_stored_list_says_when_it_is_cut(iv, tmp_path, caplog):
    from inversionview.store import ReadingStore, settings_of
    from inversionview.viewer.server import Viewer

    pre = iv.query(TEXT, site="a1.0", position=19, samples=8)
    with ReadingStore(tmp_path / "r.sqlite", create=True) as store:
        for seed in range(201):  # 201 keys of one reading
            store.put(pre, iv.fingerprint, {**settings_of(pre), "seed": seed})
        store.put(pre, "0123456789abcdef")  # and one of another decoder: listed, with a warning when the viewer starts
    with caplog.at_level("WARNING", logger="inversionview.viewer.server"):
        v = Viewer(iv, db=str(tmp_path / "r.sqlite"))
    assert "holds readings of 1 other decoder(s) (0123456789abcdef)" in caplog.text
    try:
        r = v.stored({})
        assert len(r["readings"]) == 200 and r["more"] is True
        assert [x["settings"]["seed"] for x in r["readings"]] == list(range(200))  # oldest first
        r = v.stored({"site": ["a1.0"], "text": ["|v:8"], "position": ["19"]})
        assert r["more"] is True
        assert v.stored({"position": ["18"]}) == {"readings": [], "more": False, "sites": ["a1.0"]}
    finally:
        v.store.close()


def test_reading_dict_equals_to_dict(iv):
    from inversionview.viewer.server import reading_dict

    pre = iv.query(TEXT, site="a0.0", position=18, samples=64)
    assert reading_dict(pre) == pre.to_dict()


@pytest.mark.slow
def test_serve_command_serves_until_interrupted():
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "inversionview", "serve", "shipped:counting", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert m, f"{line!r} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        status, _, info = call(m.group(1), "/api/info")
        assert status == 200 and info["task"] == "counting"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        assert rc == 0, f"exit status {rc}: {proc.stderr.read()[-2000:]}"
    finally:
        proc.kill()


def test_requests_from_elsewhere_are_refused(url):
    """A JSON body must say so (a cross-site form cannot), and the Host must be this machine (no DNS rebinding)."""
    req = urllib.request.Request(url + "/api/query", data=json.dumps(query()).encode(),
                                 headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and "application/json" in json.loads(e.value.read())["error"]
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    conn.request("GET", "/api/info", headers={"Host": "evil.example:8000"})
    r = conn.getresponse()
    assert r.status == 403 and "evil.example" in json.loads(r.read())["error"]
    conn.close()
    assert call(url.replace("127.0.0.1", "localhost"), "/api/info")[0] == 200
