"""The live viewer's HTTP API (inversionview.viewer.server) on the shipped counting model, through real HTTP
with urllib and raw sockets: the page and its assets, queries, the reading queue, reports, script payloads in
every field of a reading, a 4xx with a one-line JSON message for every bad or hostile request (never a 500 or a
traceback), time limits on slow clients, binds beyond loopback, and a burst of hostile requests and concurrent
readings that leaves no 5xx, no reset connection and the server's memory where it was."""

from __future__ import annotations

import dataclasses
import http.client
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from _payloads import Markup, injected, payload, shown_as_text, text_fields, with_payload

from inversionview import InversionView
from inversionview.cli import build_parser
from inversionview.errors import UserError
from inversionview.preimage import Preimage, Sample
from inversionview.viewer.server import MAX_BODY, MAX_SAMPLES, MAX_TEXT, Limits, make_server

TEXT = "vvzccvczvvvzvcvc|v:8"  # BOS + 20 characters + EOS: the target 'v' is at 18, ':' at 19


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


def serving(iv, **kw):
    server = make_server(iv, port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(iv):
    server = serving(iv)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def hold(server):
    """Occupies the viewer's reading worker until the test calls the returned function (or ends): readings sent
    meanwhile wait in the queue, whatever the machine's speed."""
    gate, started = threading.Event(), threading.Event()
    fut = server.viewer.readings.submit(lambda: (started.set(), gate.wait(120)))
    assert started.wait(60), "the worker never took the held job"
    yield gate.set
    gate.set()
    fut.result(60)


def call(url, path, body=None, method=None, raw: bytes | None = None, timeout: float = 60):
    """(status, headers, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": "application/json"} if data is not None else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
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
    assert "field 'epsilon' must be a number" in refused(
        url, "/api/epsilon", 400, {"reading": r["reading"], "epsilon": "x"}
    )
    assert "not a reading's JSON" in refused(url, "/api/epsilon", 400, {"reading": {"site": "a1.0"}, "epsilon": 0.2})


def test_a_busy_reader_does_not_block_the_page(url, hold):
    """While the reading worker is busy and a query waits, the page, its assets and the cheap routes answer."""
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call, url, "/api/query", query(ticket="slow"))
        wait_for(lambda: queue_state(url, "slow")["position"] == 1)
        for path in ("/api/info", "/", "/static/viewer.js", "/api/random", "/api/queue"):
            assert call(url, path)[0] == 200
        assert call(url, "/api/tokens", {"text": TEXT})[0] == 200
        assert not waiting.done()
        hold()
        assert waiting.result(120)[0] == 200


def queue_state(url, ticket=None) -> dict:
    return call(url, "/api/queue" + (f"?ticket={ticket}" if ticket else ""))[2]


def wait_for(cond, seconds: float = 120):
    """Polls ``cond`` until it holds (a safety limit only: the events themselves are what the tests wait for)."""
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "the condition never held"
        time.sleep(0.02)


def test_queue_shows_each_reading_its_place_and_drops_those_whose_client_left(url, server, hold):
    q = server.viewer.readings
    before = queue_state(url)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, url, "/api/query", query(ticket="first", seed=1))
        wait_for(lambda: queue_state(url, "first")["position"] == 1)
        # a client that sends its query and goes away while it waits
        gone = socket.create_connection(url.split("//")[1].split(":"), timeout=30)
        body = json.dumps(query(ticket="gone", seed=2)).encode()
        gone.sendall(
            b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: queue_state(url, "gone")["position"] == 2)
        second = pool.submit(call, url, "/api/query", query(ticket="second", seed=3))
        wait_for(lambda: queue_state(url, "second")["position"] == 3)
        state = queue_state(url, "first")
        assert state["running"] and state["waiting"] == 3 and state["position"] == 1
        gone.close()
        wait_for(lambda: queue_state(url, "gone")["position"] is None)
        assert queue_state(url, "second")["position"] == 2 and q.cancelled == before["cancelled"] + 1
        hold()
        assert first.result(120)[0] == 200 and second.result(120)[0] == 200
    after = queue_state(url)
    assert after["done"] == before["done"] + 3  # the held job and two readings: the one whose client left never ran
    assert after["waiting"] == 0 and queue_state(url, "first")["position"] is None


def test_a_full_queue_refuses_with_429(iv):
    server = serving(iv, limits=Limits(queue=1))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    gate = threading.Event()
    server.viewer.readings.submit(gate.wait)
    try:
        wait_for(lambda: queue_state(url)["running"])
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(call, url, "/api/query", query(ticket="w"))
            wait_for(lambda: queue_state(url, "w")["position"] == 1)
            t = time.monotonic()
            status, headers, out = call(url, "/api/query", query())
            assert status == 429 and "readings are waiting" in out["error"] and time.monotonic() - t < 10
            # a retry hint: the line's expected time (one waiting and one running, 5 s each before any has run)
            assert headers["Retry-After"] == "10" and "try again in about 10 s" in out["error"]
            gate.set()
            assert waiting.result(120)[0] == 200
    finally:
        gate.set()
        server.shutdown()
        server.server_close()


def test_serve_binds_localhost_by_default(iv):
    args = build_parser().parse_args(["serve", "shipped:counting"])
    assert args.host == "127.0.0.1" and args.db is None and not args.allow_remote and args.allowed_host == []
    server = make_server(iv, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    with pytest.raises(UserError, match="port must be between 0 and 65535"):
        make_server(iv, port=99999)


def host_status(server, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", "/api/info", headers={"Host": host})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


def test_binding_beyond_loopback_needs_allow_remote_and_keeps_the_host_check(iv, caplog, capsys):
    for host in ("0.0.0.0", "::"):
        with pytest.raises(UserError, match="--allow-remote"):
            make_server(iv, host=host, port=0)
    from conftest import user_error

    assert "--allow-remote" in user_error(capsys, "serve", "shipped:counting", "--host", "0.0.0.0", "--port", "0")
    with caplog.at_level("WARNING", logger="inversionview.viewer.server"):
        server = serving(iv, host="0.0.0.0", allow_remote=True, allowed_hosts=("viewer.lan",))
    try:
        assert "no authentication" in caplog.text and "viewer.lan" in caplog.text
        port = server.server_address[1]
        assert host_status(server, f"127.0.0.1:{port}") == 200 and host_status(server, f"localhost:{port}") == 200
        assert host_status(server, f"viewer.lan:{port}") == 200 and host_status(server, "VIEWER.LAN") == 200
        # a rebinding page's own name, or another name of this machine that was not allowed, is refused
        assert host_status(server, f"evil.example:{port}") == 403 and host_status(server, "10.1.2.3") == 403
        assert host_status(server, "") == 403
        # the address the command prints is one the check answers (#30: it printed http://0.0.0.0:PORT/, refused)
        assert server.url == f"http://viewer.lan:{port}/"
    finally:
        server.shutdown()
        server.server_close()
    for host, allowed in (("0.0.0.0", ()), ("::", ())):
        server = serving(iv, host=host, allow_remote=True, allowed_hosts=allowed)
        try:
            port = server.server_address[1]
            assert server.url == f"http://127.0.0.1:{port}/" and host_status(server, f"127.0.0.1:{port}") == 200
            with urllib.request.urlopen(server.url + "api/info", timeout=30) as r:
                assert r.status == 200
        finally:
            server.shutdown()
            server.server_close()
    # bound to a loopback address the check holds too
    server = serving(iv, host="127.0.0.1")
    try:
        assert host_status(server, "evil.example") == 403 and host_status(server, "viewer.lan") == 403
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------- bad requests
def test_unknown_route_is_404(url):
    assert "no such page" in refused(url, "/api/nothing", 404)
    assert "no such file" in refused(url, "/static/nothing.js", 404)


def test_no_file_paths_from_the_client(url):
    for path in (
        "/static/../server.py",
        "/static/%2e%2e%2fserver.py",
        "/static/..%2f..%2fcli.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/../../pyproject.toml",
    ):
        refused(url, path, 404)


def test_wrong_method_is_405(url):
    assert "use POST" in refused(url, "/api/query", 405)
    assert "use GET" in refused(url, "/api/info", 405, {"x": 1})
    assert "use GET" in refused(url, "/", 405, method="DELETE")
    status, headers, _ = call(url, "/api/report")
    assert status == 405 and headers["Allow"] == "POST"


def raw(url: str, data: bytes, timeout: float = 60) -> tuple[int, dict, bytes]:
    """Sends ``data`` as is on a new connection; the status, headers and body of the answer (read to the end)."""
    with socket.create_connection(url.split("//")[1].split(":"), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_viewer_docs_state_the_caps_the_code_has():
    """#30 item 8: docs/viewer.md said 4,096 samples while the code allows 8,192."""
    from pathlib import Path

    from inversionview.viewer.server import MAX_HEAD

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "viewer.md").read_text().split())
    assert f"queries at {MAX_SAMPLES:,} samples" in text and f"{MAX_TEXT:,} characters" in text
    assert f"{MAX_HEAD // 1024} KiB of head" in text and f"431 for a request head over {MAX_HEAD // 1024} KiB" in text
    assert f"up to {Limits().queue} waiting" in text and "Retry-After" in text


def test_request_heads_are_bounded_at_16_kib(url):
    """#30 item 8: a 70 KB header line, sent at once, got 200 (h11 bounds a head only while it trickles in)."""
    host = url.split("//")[1]
    for size, status in ((15_000, 200), (70_000, 431), (17_000, 431)):
        head = b"GET /api/info HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\nConnection: close\r\n\r\n" % (
            host.encode(),
            b"a" * size,
        )
        got, headers, body = raw(url, head)
        assert got == status, (size, body[:200])
        if status == 431:
            msg = json.loads(body)["error"]
            assert msg == "the request's head is over 16 KiB" and headers["connection"] == "close"
    # a body of any size (within the body's limit) in the same packet as its head is no head
    body = json.dumps({"text": "a" * 900}).encode() + b" " * 40_000
    head = b"POST /api/tokens HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % host.encode()
    got, _, out = raw(url, head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    assert got == 400 and b"head" not in out, out[:200]  # refused for its text (too long for the model), not its head


@pytest.mark.parametrize(
    "method, target",
    [
        ("TRACE", "/"),
        ("CONNECT", "example.com:443"),
        ("PUT", "/api/query"),
        ("OPTIONS", "/api/query"),
        ("BREW", "/api/info"),
        ("PATCH", "/nothing"),
    ],
)
def test_unknown_methods_are_405_with_one_json_line(url, method, target):
    status, headers, body = raw(
        url, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 405 and headers["content-type"] == "application/json" and headers["allow"] == "GET, HEAD, POST"
    msg = json.loads(body)["error"]
    assert method in msg and "\n" not in msg


def test_head_of_the_page_has_no_body_and_the_page_forbids_inline_script(url):
    status, headers, body = raw(url, b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    policy = call(url, "/")[1]["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]


def test_nested_json_huge_numbers_and_non_finite_readings_are_400(url):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/api/tokens", "/api/query"):
        assert "nested too deeply" in refused(url, path, 400, raw=b'{"text": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")
    assert "nested too deeply" in refused(url, "/api/report", 400, raw=b'{"readings": ' + deep + b"}")
    assert "seed must be between 0 and" in refused(url, "/api/query", 400, query(seed=10**40))
    assert "seed must be between 0 and" in refused(url, "/api/query", 400, query(seed=-1))
    assert "samples must be between" in refused(url, "/api/query", 400, query(samples=10**40))
    assert "out of range" in refused(url, "/api/query", 400, query(position=10**40))
    assert "out of range" in refused(url, "/api/query", 400, query(position="9" * 5000))
    assert "noise must be between 0 and 1000" in refused(url, "/api/query", 400, query(temperature=1.0, noise=1e300))
    good = call(url, "/api/query", query(samples=16))[2]["reading"]
    last = good["samples"][-1]
    for bad in (
        {**last, "distance": float("-inf")},
        {**last, "distance": float("nan")},
        {**last, "distance": -1.0},
        {**last, "distance": float("inf")},
        {**last, "distances": [float("-inf")] * len(last["tokens"])},
        {**last, "delta": [float("nan")] * len(last["tokens"])},
    ):
        reading = {**good, "samples": good["samples"][:-1] + [bad]}
        assert "not a reading's JSON" in refused(url, "/api/epsilon", 400, {"reading": reading, "epsilon": 0.3})
        assert "reading 1" in refused(url, "/api/report", 400, {"readings": [reading]})
    for bad in (
        {**good, "epsilon": float("inf")},
        {**good, "fraction_inside": float("nan")},
        {**good, "attention": [float("-inf")] * len(good["tokens"])},
        {**good, "settings": "x"},
    ):
        assert "reading 1" in refused(url, "/api/report", 400, {"readings": [bad]})
    # the library's own HTML still renders such a reading (a hand-edited file): it is shown, not refused
    pre = Preimage.from_dict(good)
    for d in (float("-inf"), float("inf"), float("nan")):
        pre.samples[-1].distance = d
        assert "<section" in pre.to_html()


SCHEMA_NO_TEXT = ("metric", "samples.source", "chains", "sources", "chart")  # a choice, numbers keyed by texts, or
# the summary's chart (a list of its items)


def test_payloads_in_every_field_are_escaped_in_reports_and_fragments(url, iv):
    """Every field of a reading that can hold text (from the dataclasses' type hints: a field added later is
    covered) carries markup that would run, show or break an attribute; the report and the page's fragment keep
    it as text, or the reading's schema refuses it where the field holds no free text."""
    good = call(url, "/api/query", query(samples=16))[2]["reading"]
    paths = [p for p, _ in text_fields()]
    assert {"metric", "mode", "site_short", "tokens", "samples.tokens", "samples.annotation", "summary"} <= set(paths)
    for path in paths:
        bad = with_payload(good, path)
        status, _, report = call(url, "/api/report", {"readings": [bad]})
        if path in SCHEMA_NO_TEXT:  # the reading's schema (inversionview.schema) admits no such text there
            assert status == 400 and "not a reading's JSON" in report["error"], (path, report)
            assert path.removeprefix("samples.") in report["error"] and "\n" not in report["error"], report
            continue
        assert status == 200, report
        assert injected(report) == [], path
        assert report == Preimage.from_dict(bad).to_html()  # the library's reports are the same
        status, _, r = call(url, "/api/epsilon", {"reading": bad, "epsilon": 0.3})
        assert status == 200 and injected(r["html"]) == [], path
        if path not in ("text", "decoder", "samples.text", "settings", "shares", "checks", "distribution"):  # shown
            # (the texts as their tokens; of the settings, the mix; the estimate through the summary's lines; the
            # distribution by its name where its kind is known, and the payload replaced its kind)
            assert shown_as_text(report, path), path


@dataclasses.dataclass
class Sample2(Sample):  # as the lead may extend them: per-sample checks, per-feature shares with intervals
    check: dict | None = None


@dataclasses.dataclass
class Preimage2(Preimage):
    samples: list[Sample2]
    verdicts: list[dict] | None = None
    note: str | None = None


def test_fields_a_later_preimage_adds_are_shown_escaped(iv):
    """A field added to Preimage or Sample (the templates do not name it) is shown as text in "other fields"."""
    pre = iv.query(TEXT, site="a1.0", position=19, samples=16)
    d = {
        **pre.to_dict(),
        "verdicts": [{"feature": "count", "share": 0.9, "interval": [0.8, 1.0]}],
        "note": "n",
        "samples": [{**s, "check": {"passed": True}} for s in pre.to_dict()["samples"]],
    }
    paths = [p for p, _ in text_fields(Preimage2)]
    assert {"verdicts", "note", "samples.check"} <= set(paths)
    for path in paths:
        bad = with_payload(d, path, Preimage2)
        html = Preimage2(**{**bad, "samples": [Sample2(**s) for s in bad["samples"]]}).to_html()
        assert injected(html) == [], path
        if path in ("verdicts", "note", "samples.check"):  # shown as their JSON
            assert json.dumps(payload(path), ensure_ascii=False)[1:-1] in "".join(Markup(html).text), path
    text = "".join(Markup(Preimage2(**{**d, "samples": [Sample2(**s) for s in d["samples"]]}).to_html()).text)
    assert (
        "other fields: verdicts, note" in text
        and '"interval": [0.8, 1.0]' in text
        and 'check: {"passed": true}' in text
    )


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
    # a client that sends a whole oversized body and asks to close hears why (the body is read first: closing on
    # unread data would reset the connection and lose the answer)
    for n in (MAX_BODY + 1, 300_000, 1_000_000):
        status, _, body = raw(
            url,
            b"POST /api/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (n, b" " * n),
        )
        assert status == 413 and f"{n:,} bytes" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "body, words",
    [
        (query(samples=MAX_SAMPLES + 1), ["samples", f"between 1 and {MAX_SAMPLES}"]),
        (query(samples=0), ["samples"]),
        (query(samples="many"), ["field 'samples' must be an int"]),
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
        (query(epsilon="wide"), ["field 'epsilon' must be a number"]),
        (query(epsilon=float("inf")), ["epsilon must be positive and finite"]),  # Python's JSON sends Infinity and NaN
        (query(temperature=float("nan")), ["temperature must be positive and at most 1e6"]),
        (query(temperature=1e300), ["temperature must be positive and at most 1e6"]),  # float32 would overflow
        (query(temperature=1.0, noise=-0.5), ["noise must be between 0 and 1000"]),
        (query(metric="manhattan"), ["manhattan", "euclidean"]),
        (query(temperature=0), ["temperature must be positive"]),
        (query(noise=0.1), ["noise applies to one sampling temperature"]),
        (query(path="/etc/passwd"), ["unknown field 'path'"]),
    ],
)
def test_bad_query_is_400_with_one_clear_line(url, body, words):
    msg = refused(url, "/api/query", 400, body)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "body, words",
    [
        ({}, ["non-empty list 'readings'"]),
        ({"readings": []}, ["non-empty list"]),
        ({"readings": [{"text": "x"}]}, ["reading 1", "not a reading's JSON"]),
        ({"readings": ["a string"]}, ["reading 1", "JSON object"]),
    ],
)
def test_bad_report_is_400(url, body, words):
    msg = refused(url, "/api/report", 400, body)
    for w in words:
        assert w in msg, msg


def test_bad_report_reading_fields_are_400(url):
    good = call(url, "/api/query", query())[2]["reading"]
    last = good["samples"][-1]  # beyond the rows the page shows, but a report or a new epsilon reads it
    for bad in (
        {**good, "position": 99},
        {**good, "epsilon": "x"},
        {**good, "samples": [{"text": 1}]},
        {**good, "tokens": None},
        {**good, "samples": good["samples"][:-1] + [{**last, "delta": "abc"}]},
        {**good, "samples": good["samples"][:-1] + [{**last, "count": "2"}]},
    ):
        assert "reading 2" in refused(url, "/api/report", 400, {"readings": [good, bad]})
        assert "not a reading's JSON" in refused(url, "/api/epsilon", 400, {"reading": bad, "epsilon": 0.3})


def test_stored_readings_without_a_db_is_404(url):
    assert "--db" in refused(url, "/api/stored", 404)
    assert "--db" in refused(url, "/api/stored/1", 404)


def test_the_server_keeps_serving_after_bad_requests(url):
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    for path, body, status in [
        ("/api/query", b"{bad", 400),
        ("/api/nothing", b"{}", 404),
        ("/api/info", None, 200),
        ("/api/tokens", b'{"text": "ab|a:1"}', 200),
    ]:
        conn.request(
            "POST" if body is not None else "GET", path, body=body, headers={"Content-Type": "application/json"}
        )
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
        ids = [
            store.put(iv.query(TEXT, site=s, position=p, samples=64), iv.fingerprint)
            for s, p in [("a1.0", 19), ("x0.post", 18)]
        ]
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


def test_stored_ids_beyond_ascii_digits_and_huge_ones_are_404(stored):
    """#30: '²' and '①' pass str.isdigit() but not int(); Arabic-Indic '١' passed both and loaded reading 1; a
    5,000-digit id broke int()'s digit limit. Each is a one-line 404 now."""
    url, ids, _ = stored
    for quoted in ("%C2%B2", "%E2%91%A0", "%D9%A1", "1%D9%A1", "%EF%BC%91"):  # ², ①, ١, 1١, fullwidth 1
        assert "ids are whole numbers (0-9)" in refused(url, f"/api/stored/{quoted}", 404)
    assert "(5,000 digits)" in refused(url, "/api/stored/" + "9" * 5000, 404)
    assert call(url, f"/api/stored/{'0' * 40}{ids[0]}")[0] == 200  # leading zeros are still the same id


def test_a_corrupt_stored_reading_is_a_404_not_a_500(iv, tmp_path):
    import sqlite3

    from inversionview.store import ReadingStore

    db = tmp_path / "r.sqlite"
    with ReadingStore(db, create=True) as store:
        ids = [store.put(iv.query(TEXT, site="a1.0", position=19, samples=16, seed=k), iv.fingerprint) for k in (1, 2)]
        pre = iv.query(TEXT, site="a1.0", position=19, samples=16, seed=3)
        pre.samples[0].distance = float("inf")  # the library stores what it is given; the page takes JSON only
        ids.append(store.put(pre, iv.fingerprint))
    with sqlite3.connect(db) as c:
        c.execute("UPDATE readings SET body = '{' WHERE id = ?", (ids[0],))
        c.execute("UPDATE samples SET count = -5 WHERE reading_id = ?", (ids[1],))
    server = serving(iv, db=str(db))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert "is corrupt (Expecting property name" in refused(url, f"/api/stored/{ids[0]}", 404)
        assert "samples[0].count must be a whole number" in refused(url, f"/api/stored/{ids[1]}", 404)
        assert "samples[0].distance must be a finite number" in refused(url, f"/api/stored/{ids[2]}", 404)
        assert call(url, "/api/stored")[0] == 200  # the list still answers
    finally:
        server.shutdown()
        server.server_close()
        server.viewer.store.close()


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


class Lines:
    """A child process's stdout, line by line, read in a thread: waiting for a line waits for that event (with a
    safety limit for a hung child, long enough for a loaded machine)."""

    def __init__(self, proc):
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(x) for x in proc.stdout] + [self.q.put(None)], daemon=True).start()

    def until(self, pattern: str, seconds: float = 600):
        while (line := self.q.get(timeout=seconds)) is not None:
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"the output ended before a line matching {pattern!r}")


@pytest.mark.slow
def test_serve_command_serves_until_interrupted():
    proc = subprocess.Popen(
        [sys.executable, "-m", "inversionview", "serve", "shipped:counting", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = Lines(proc)
        url = out.until(r"at (http://127\.0\.0\.1:\d+)/").group(1)
        status, _, info = call(url, "/api/info")
        assert status == 200 and info["task"] == "counting"
        proc.send_signal(signal.SIGINT)
        out.until(r"^viewer stopped")  # the server has shut down: now the process exits
        rc = proc.wait(timeout=600)
        assert rc == 0, f"exit status {rc}: {proc.stderr.read()[-2000:]}"
    finally:
        proc.kill()
        proc.wait()


def test_requests_from_elsewhere_are_refused(url):
    """A JSON body must say so (a cross-site form cannot), and the Host must be this machine (no DNS rebinding)."""
    req = urllib.request.Request(
        url + "/api/query", data=json.dumps(query()).encode(), headers={"Content-Type": "text/plain"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and "application/json" in json.loads(e.value.read())["error"]
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    conn.request("GET", "/api/info", headers={"Host": "evil.example:8000"})
    r = conn.getresponse()
    assert r.status == 403 and "evil.example" in json.loads(r.read())["error"]
    conn.close()
    assert call(url.replace("127.0.0.1", "localhost"), "/api/info")[0] == 200


# ---------------------------------------------------------------------------------------------- slow and hostile clients
def answer(s: socket.socket) -> tuple[int, dict, bytes]:
    """The answer on an open connection, read until the server closes it."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return (
        int(lines[0].split()[1]),
        {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])},
        body,
    )


def test_slow_clients_are_cut_off_while_others_are_served(iv):
    """A body shorter than its Content-Length, a head sent in drips, an idle connection: each is answered 408 (or
    closed) when its time is up, and nothing waits for them meanwhile."""
    server = serving(iv, limits=Limits(head_seconds=1, body_seconds=1, idle_seconds=1))
    addr = ("127.0.0.1", server.server_address[1])
    url = f"http://127.0.0.1:{addr[1]}"
    try:
        slow_body, slow_head, idle = (socket.create_connection(addr, timeout=60) for _ in range(3))
        slow_body.sendall(
            b"POST /api/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": "'
        )
        slow_head.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
        assert call(url, "/api/info")[0] == 200 and call(url, "/api/tokens", {"text": "ab|a:1"})[0] == 200
        status, headers, body = answer(slow_body)
        assert status == 408 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "the request body did not arrive within 1 s"
        status, _, body = answer(slow_head)
        assert status == 408 and "head did not arrive within 1 s" in json.loads(body)["error"]
        assert idle.recv(100) == b""  # closed without a word: it never asked anything
        for s in (slow_body, slow_head, idle):
            s.close()
        assert call(url, "/api/info")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


HOSTILE_SERVER = """
from inversionview import InversionView
from inversionview.viewer.server import Limits, make_server
server = make_server(InversionView.load("shipped:counting"), port=0, limits=Limits(head_seconds=2, body_seconds=2))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


def settled_rss_mib(pid: int) -> float:
    """The least RSS over two seconds: the queue's worker trims the heap just after it reports idle, and answers
    still being sent hold their buffers, so one sample can read up to 25 % high (CI saw 521 -> 625 MiB where
    settled figures read 426 -> 427)."""
    least = float("inf")
    for _ in range(10):
        least = min(least, rss_mib(pid))
        time.sleep(0.2)
    return least


def hostile_requests(url: str) -> list[tuple[str, bytes]]:
    """Requests a careless or hostile client sends: path tricks, nested JSON, huge numbers, non-finite floats,
    unknown methods, oversized and chunked bodies, garbage."""

    def post(path, body: bytes, extra=b""):
        return (
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(body), body)
        )

    q = {"text": TEXT, "site": "a1.0", "position": 19, "samples": 8}
    out = [
        (f"path {p}", b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % p.encode())
        for p in (
            "/static/../server.py",
            "/static/%2e%2e%2fserver.py",
            "/static/..%2f..%2fcli.py",
            "//api/info",
            "/static//etc/passwd",
            "/%00",
            "/static/%ff%fe",
            "/api/stored/../../etc/passwd",
            "/api/info?%zz=&&=",
            "/api/stored?position=" + "9" * 5000,
            "/" + "a" * 8000,
            "/api/queue?ticket=" + "%00" * 50,
        )
    ]
    out += [
        (f"method {m.decode()}", b"%s / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % m)
        for m in (b"TRACE", b"CONNECT", b"DELETE", b"PUT", b"OPTIONS", b"BREW", b"PROPFIND")
    ]
    nested = b"[" * 50_000 + b"]" * 50_000
    out += [(f"nested {p}", post(p, b'{"x": ' + nested + b"}")) for p in ("/api/query", "/api/tokens", "/api/epsilon")]
    out += [("nested report", post("/api/report", b'{"readings": [' + nested + b"]}"))]
    for k, v in [
        ("seed", "1" + "0" * 40),
        ("samples", "1" + "0" * 40),
        ("position", "1" + "0" * 40),
        ("seed", "9" * 5000),
        ("epsilon", "1e999"),
        ("epsilon", "NaN"),
        ("temperature", "Infinity"),
        ("noise", "-Infinity"),
        ("temperature", "1e308"),
        ("epsilon", "-0.0"),
    ]:
        out.append(
            (f"number {k}={v[:12]}", post("/api/query", json.dumps(q)[:-1].encode() + f', "{k}": {v}}}'.encode()))
        )
    reading = (
        '{"text": "a", "tokens": ["B", "a"], "position": 1, "site": "s", "site_short": "s", "epsilon": 0.1, '
        '"metric": "m", "mode": "tl", "n_candidates": 1, "fraction_inside": 0.0, "samples": [{"tokens": ["B"], '
        '"text": "", "distance": -Infinity, "position": 0, "distances": [0.1], "delta": [0.0], "count": 1}]}'
    )
    out += [
        ("-Infinity distance", post("/api/epsilon", b'{"epsilon": 0.2, "reading": %s}' % reading.encode())),
        ("-Infinity report", post("/api/report", b'{"readings": [%s]}' % reading.encode())),
        (
            "huge length",
            post("/api/report", b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 99999999999") + b"\r\n\r\n",
        ),
        ("bad length", post("/api/query", b"{}").replace(b"Content-Length: 2", b"Content-Length: -5")),
        (
            "chunked",
            b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3 + b"0\r\n\r\n",
        ),
        ("not json", post("/api/query", b"\xff\xfe{", b"")),
        ("form", post("/api/query", b"a=1").replace(b"application/json", b"application/x-www-form-urlencoded")),
        ("wrong host", b"GET /api/info HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
        ("no host", b"GET /api/info HTTP/1.0\r\n\r\n"),
        ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
        ("slow body", b"SLOW" + post("/api/query", json.dumps(q).encode())[:-10]),
        ("slow head", b"SLOW" + b"GET /api/info HTTP/1.1\r\nHost: 12"),
    ]
    return out


def send_hostile(addr, name: str, data: bytes) -> str:
    """The status line's code of the answer, or what went wrong ("reset", "no answer")."""
    try:
        with socket.create_connection(addr, timeout=120) as s:
            s.sendall(data.removeprefix(b"SLOW"))
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return "reset"
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", out)
    return m.group(1).decode() if m else "no answer"


def reading_burst(url: str, n: int, samples: int) -> list[str]:
    """``n`` readings sent at once: each one's status, or "reset"."""

    def one(i):
        try:
            return str(
                # the server reads one at a time: the last of a burst waits for all the others
                call(
                    url,
                    "/api/query",
                    {"text": TEXT, "site": "a1.0", "position": 19, "samples": samples, "seed": i},
                    timeout=300,
                )[0]
            )
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, urllib.error.URLError):
            return "reset"

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.slow
def test_hostile_requests_and_reading_bursts_leave_no_5xx_no_reset_and_flat_memory():
    proc = subprocess.Popen([sys.executable, "-c", HOSTILE_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(Lines(proc).until(r"^(\d+)$").group(1))
        url, addr = f"http://127.0.0.1:{port}", ("127.0.0.1", port)
        assert reading_burst(url, 2, 64) == ["200", "200"]  # warm: the model's first readings allocate its caches
        results, rss = {}, []
        for _ in range(3):  # the first round warms the threads' heaps; a leak grows over the next two
            with ThreadPoolExecutor(8) as pool:  # the hostile requests and 4 readings (chains included) at once
                hostile = {name: pool.submit(send_hostile, addr, name, data) for name, data in hostile_requests(url)}
                readings = reading_burst(url, 4, 64)
                results.update({name: f.result() for name, f in hostile.items()})
            assert readings == ["200"] * 4, readings
            wait_for(lambda: call(url, "/api/queue")[2]["running"] is False)
            rss.append(settled_rss_mib(proc.pid))
        bad = {k: v for k, v in results.items() if not v.isdigit() or int(v) >= 500}
        assert bad == {}, bad  # every hostile request answered: no 5xx, no reset, no silence
        assert sum(v.startswith("4") for v in results.values()) >= len(results) - 2  # two harmless GETs get a 200
        assert results["slow body"] == "408" and results["slow head"] == "408" and results["method TRACE"] == "405"
        assert results["nested report"] == "400" and results["-Infinity report"] == "400"
        assert (
            results["huge length"] == "413" and results["chunked"] == "413" and results["nested /api/tokens"] == "413"
        )
        assert call(url, "/api/info")[0] == 200
        print("server RSS after each round (MiB):", " ".join(f"{x:.0f}" for x in rss))
        assert rss[2] <= 1.15 * rss[0], f"RSS {rss[0]:.0f} MiB after the first round, {rss[2]:.0f} MiB after the third"
    finally:
        proc.kill()
        proc.wait()
