"""The live viewer (``inversionview serve``) on the shipped counting model: the latency of one query, and bursts
of concurrent readings mixed with hostile requests, with the server's memory.

Latency (``--part latency``), each the median of several repeats after one warm-up:
  - the library call alone (``iv.query``), the baseline;
  - POST /api/query through HTTP (urllib), response parsed;
  - in the page (Chromium via Playwright): from the click on Read until the samples are rendered, timed in the
    page (performance.now) and from Python.
Target: the query appears in the page in under 2 s on 2 CPU cores.

Bursts (``--part burst``): a server process of its own (so that its RSS is the server's alone), then
``--bursts`` times ``--readings`` concurrent readings of ``--samples`` candidates, each burst with hostile
requests at the same time (path tricks, nested JSON, huge numbers, non-finite floats, bodies that never finish,
unknown methods). Prints the readings' waits, the statuses (the queue holds 8: the readings beyond them are refused
at once with 429 and a Retry-After hint, whose time to answer and hints are printed), 5xx and reset connections,
and the server's RSS at start-up, after a warm-up reading and after each burst; run it with
``--no-trim`` to see the server without ``malloc_trim`` after bursts. Targets: no 5xx, no reset, RSS within 20%
of where it was after the warm-up.

    python benchmarks/bench_serve.py [RUN_DIR] [--part latency|burst|all] [--readings 50] [--bursts 2]
                                     [--samples 1024] [--no-trim]
"""

import argparse
import collections
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _common import peak_rss_mib

TEXT, SITE, POS = "vvzccvczvvvzvcvc|v:8", "a1.0", 19  # 19: the ':'
REPEAT = 5
CHROMIUM = dict(
    executable_path="/usr/bin/chromium",
    headless=True,
    args=[
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ],
)
RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


def timed(fn, repeat=REPEAT):
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def in_thread(fn):
    """``fn()`` run in a new thread, as the server runs readings (a main thread with 2 torch threads stalls
    badly on a shared 2-core machine: 9-17 s against 2 s)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def show(name, ts):
    print(
        f"{name:<44} median {statistics.median(ts) * 1000:7.0f} ms   (min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f}, "
        f"n={len(ts)})"
    )
    return statistics.median(ts)


def post_json(url, path, body, timeout=3600):
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------------------------- latency
def latency(run):
    import torch

    from inversionview import InversionView
    from inversionview.viewer.server import make_server

    iv = InversionView.load(run)
    server = make_server(iv, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    print(
        f"{run}: {SITE} at position {POS} of {TEXT!r}, Auto mix, 1024 candidates; torch threads {torch.get_num_threads()}"
    )
    body = {"text": TEXT, "site": SITE, "position": POS, "samples": 1024}
    lib = show(
        "library call iv.query (baseline)",
        in_thread(lambda: timed(lambda: iv.query(TEXT, site=SITE, position=POS, samples=1024))),
    )
    http_s = show("POST /api/query through HTTP", timed(lambda: json.loads(post_json(url, "/api/query", body)[1])))
    print(f"{'':<44} HTTP, JSON and HTML add {1000 * (http_s - lib):.0f} ms ({http_s / lib:.2f}x the library call)")
    try:
        in_page(url)
    except ImportError:
        print("browser: playwright is not installed (pip install -e '.[dev]')")
    server.shutdown()
    server.server_close()
    print(f"peak RSS {peak_rss_mib():.0f} MiB (server and benchmark; Chromium runs in its own processes)")


def in_page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(**CHROMIUM)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)  # wait_for_function evals
        page.goto(url + "/")
        page.wait_for_selector("#tokens .tok")
        page.fill("#text", TEXT)
        page.wait_for_function(f"document.querySelector('#tokens').textContent === {('B' + TEXT + 'E')!r}")
        page.click(f'#tokens .tok[data-i="{POS}"]')
        page.select_option("#site", SITE)
        page.fill("#samples", "1024")
        ms = []

        def click():
            n = int(page.locator("body").get_attribute("data-reads") or 0)
            page.click("#read")
            page.wait_for_function(f"Number(document.body.dataset.reads || 0) > {n}")
            page.wait_for_selector("#current section.reading table.samples tr")
            ms.append(int(page.locator("body").get_attribute("data-last-ms")) / 1000)

        py = timed(click)
        page_s = show("in the page: click -> samples rendered (JS)", ms[1:])  # without the warm-up
        show("in the page: click -> samples rendered (Python)", py)
        print(f"{'':<44} target < 2000 ms: {'met' if page_s < 2 else 'NOT met'}; Chromium {browser.version}")
        browser.close()


# ---------------------------------------------------------------------------------------------- bursts
SERVER = """
import sys
from inversionview import InversionView
from inversionview.viewer import server as srv
if sys.argv[2] == "no-trim":
    srv.trim_memory = lambda: None
s = srv.make_server(InversionView.load(sys.argv[1]), port=0, limits=srv.Limits(head_seconds=5, body_seconds=5))
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


def hostile(port: int) -> list[bytes]:
    """Requests of a careless or hostile client, each on its own connection."""

    def req(method, path, body=None, ctype=b"application/json", length=None):
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (method, path, port)
        if body is None:
            return head + b"\r\n"
        n = len(body) if length is None else length
        return head + b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (ctype, n, body)

    q = json.dumps({"text": TEXT, "site": SITE, "position": POS, "samples": 8})[:-1].encode()
    nested = b"[" * 100_000 + b"]" * 100_000
    out = [
        req(b"GET", p)
        for p in (
            b"/static/../server.py",
            b"/static/%2e%2e%2fserver.py",
            b"/static//etc/passwd",
            b"/%00",
            b"/api/stored/../../x",
            b"/" + b"a" * 8000,
        )
    ]
    out += [req(m, b"/") for m in (b"TRACE", b"CONNECT", b"DELETE", b"PUT", b"OPTIONS", b"BREW")]
    out += [req(b"POST", p, b'{"x": ' + nested + b"}") for p in (b"/api/query", b"/api/tokens", b"/api/report")]
    out += [
        req(b"POST", b"/api/query", q + b', "%s": %s}' % (k, v))
        for k, v in [
            (b"seed", b"1" + b"0" * 40),
            (b"samples", b"1" + b"0" * 40),
            (b"position", b"9" * 5000),
            (b"epsilon", b"NaN"),
            (b"temperature", b"Infinity"),
            (b"noise", b"1e308"),
        ]
    ]
    bad = (
        b'{"epsilon": 0.2, "reading": {"text": "a", "tokens": ["B", "a"], "position": 1, "site": "s", '
        b'"site_short": "s", "epsilon": 0.1, "metric": "<script>", "mode": "tl", "n_candidates": 1, '
        b'"fraction_inside": 0.0, "samples": [{"tokens": ["B"], "text": "", "distance": -Infinity, "position": 0, '
        b'"distances": [0.1], "delta": [0.0], "count": 1}]}}'
    )
    out += [
        req(b"POST", b"/api/epsilon", bad),
        req(b"POST", b"/api/report", b"", length=10**12),
        req(b"POST", b"/api/query", b"a=1", ctype=b"text/plain"),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ]
    return out


def send(port: int, data: bytes, partial: bool = False) -> str:
    """The answer's status ("reset" or "no answer" if none came). ``partial``: the body is sent but for its last
    bytes, and never finished: the connection stays open until the server gives up on it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3600) as s:
            s.sendall(data[:-5] if partial else data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except RESETS:
        return "reset"
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", out)
    return m.group(1).decode() if m else "no answer"


def one_reading(url: str, i: int, samples: int, t0: float) -> tuple[str, float, str | None]:
    """(status, seconds from the burst's start to the answer, the answer's Retry-After)."""
    body = {"text": TEXT, "site": SITE, "position": POS, "samples": samples, "seed": i, "ticket": f"b{i}"}
    req = urllib.request.Request(
        url + "/api/query", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    retry = None
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            status = r.status
            r.read()
    except urllib.error.HTTPError as e:
        status, retry = e.code, e.headers.get("Retry-After")
        e.read()
    except RESETS + (urllib.error.URLError,):
        status = "reset"
    return str(status), time.perf_counter() - t0, retry


def watch_queue(url: str, n: int, done: threading.Event, places: dict):
    """The place in line /api/queue reports for the last reading of the burst, as the page would show it."""
    while not done.is_set():
        try:
            with urllib.request.urlopen(f"{url}/api/queue?ticket=b{n - 1}", timeout=60) as r:
                q = json.loads(r.read())
            if q["position"] is not None:
                places.setdefault("first", q["position"])
                places["last"] = q["position"]
        except RESETS + (urllib.error.URLError,):
            places["resets"] = places.get("resets", 0) + 1
        done.wait(0.5)


def burst(url: str, port: int, n: int, samples: int) -> dict:
    places, done = {}, threading.Event()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n + 16) as pool:
        watcher = pool.submit(watch_queue, url, n, done, places)
        slow = [pool.submit(send, port, hostile(port)[-4], True) for _ in range(5)]  # bodies that never finish
        bad = [pool.submit(send, port, r) for r in hostile(port)]
        readings = [pool.submit(one_reading, url, i, samples, t0) for i in range(n)]
        results = [f.result() for f in readings]
        done.set()
        watcher.result()
        statuses = [f.result() for f in bad + slow]
    waits = [t for s, t, _ in results if s == "200"]
    return {
        "seconds": time.perf_counter() - t0,
        "reading_status": collections.Counter(s for s, _, _ in results),
        "refused": [(t, r) for s, t, r in results if s == "429"],
        "hostile_status": collections.Counter(statuses),
        "waits": waits,
        "places": places,
    }


def bursts(run: str, n: int, k: int, samples: int, trim: bool):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, run, "trim" if trim else "no-trim"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        rss0 = rss_mib(proc.pid)
        post_json(url, "/api/query", {"text": TEXT, "site": SITE, "position": POS, "samples": samples})
        time.sleep(1)  # the worker trims after the queue runs dry
        rss1 = rss_mib(proc.pid)
        print(
            f"server (malloc_trim after bursts: {'on' if trim else 'off'}): RSS {rss0:.0f} MiB at start-up, "
            f"{rss1:.0f} MiB after one warm-up reading of {samples} samples"
        )
        worst, bad = rss1, 0
        for b in range(k):
            r = burst(url, port, n, samples)
            time.sleep(1)
            rss = rss_mib(proc.pid)
            worst = max(worst, rss)
            fives = sum(v for s, v in (r["reading_status"] + r["hostile_status"]).items() if s.startswith("5"))
            resets = sum(v for s, v in (r["reading_status"] + r["hostile_status"]).items() if not s.isdigit())
            resets += r["places"].get("resets", 0)
            bad += fives + resets
            w = sorted(r["waits"]) or [0.0]
            refused = r["refused"]
            print(
                f"burst {b + 1}: {n} readings of {samples} samples at once in {r['seconds']:.1f} s; "
                f"{len(r['waits'])} read ({len(r['waits']) / r['seconds']:.2f} readings/s), waits first {w[0]:.1f} s, "
                f"median {statistics.median(w):.1f} s, last {w[-1]:.1f} s; statuses {dict(r['reading_status'])}"
            )
            if refused:
                after = sorted(int(x) for _, x in refused if x is not None)
                print(
                    f"         {len(refused)} refused with 429, answered within {max(t for t, _ in refused):.2f} s of "
                    f"the burst's start; Retry-After {after[0]}-{after[-1]} s"
                    + ("" if len(after) == len(refused) else f" ({len(refused) - len(after)} without one)")
                )
            print(
                f"         {sum(r['hostile_status'].values())} hostile requests meanwhile: "
                f"{dict(sorted(r['hostile_status'].items()))}; 5xx {fives}, resets or no answer {resets}; "
                f"RSS after {rss:.0f} MiB ({100 * (rss / rss1 - 1):+.1f}% against after the warm-up)"
            )
        answers = urllib.request.urlopen(f"{url}/api/info", timeout=60).status
        print(
            f"afterwards /api/info answers {answers}; RSS {rss_mib(proc.pid):.0f} MiB, highest after a burst "
            f"{worst:.0f} MiB = {worst / rss1:.2f}x after the warm-up (target <= 1.20x: "
            f"{'met' if worst <= 1.2 * rss1 else 'NOT met'}); 5xx + resets: {bad} (target 0)"
        )
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="shipped:counting")
    ap.add_argument("--part", choices=("latency", "burst", "all"), default="all")
    ap.add_argument("--readings", type=int, default=50, help="concurrent readings per burst (default 50)")
    ap.add_argument("--bursts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--no-trim", action="store_true", help="the server without malloc_trim after bursts")
    args = ap.parse_args()
    if args.part in ("latency", "all"):
        latency(args.run)
    if args.part in ("burst", "all"):
        bursts(args.run, args.readings, args.bursts, args.samples, trim=not args.no_trim)


if __name__ == "__main__":
    main()
