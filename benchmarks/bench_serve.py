"""Latency of one query through the live viewer (``inversionview serve``) on the shipped counting model: the
Auto mix (1024 candidates), verification, deltas, summary, the reading's JSON and HTML fragment.

Three figures, each the median of several repeats after one warm-up:
  - the library call alone (``iv.query``), the baseline;
  - POST /api/query through HTTP (urllib), response parsed;
  - in the page (Chromium via Playwright): from the click on Read until the samples are rendered, timed in the
    page (performance.now) and from Python.

Target: the query appears in the page in under 2 s on 2 CPU cores.

    python benchmarks/bench_serve.py [RUN_DIR]
"""

import json
import statistics
import sys
import threading
import time
import urllib.request

import torch

from _common import peak_rss_mib
from inversionview import InversionView
from inversionview.viewer.server import make_server

TEXT, SITE, POS = "vvzccvczvvvzvcvc|v:8", "a1.0", 19  # 19: the ':'
REPEAT = 5
CHROMIUM = dict(executable_path="/usr/bin/chromium", headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"])


def timed(fn, repeat=REPEAT):
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def in_thread(fn):
    """``fn()`` run in a new thread, as the server runs each request (a main thread with 2 torch threads stalls
    badly on a shared 2-core machine: 9-17 s against 2 s)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def show(name, ts):
    print(f"{name:<44} median {statistics.median(ts) * 1000:7.0f} ms   (min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f}, "
          f"n={len(ts)})")
    return statistics.median(ts)


def main(run="shipped:counting"):
    iv = InversionView.load(run)
    server = make_server(iv, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    body = json.dumps({"text": TEXT, "site": SITE, "position": POS, "samples": 1024}).encode()
    print(f"{run}: {SITE} at position {POS} of {TEXT!r}, Auto mix, 1024 candidates; torch threads {torch.get_num_threads()}")

    def post():
        req = urllib.request.Request(url + "/api/query", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            json.loads(r.read())

    lib = show("library call iv.query (baseline)",
               in_thread(lambda: timed(lambda: iv.query(TEXT, site=SITE, position=POS, samples=1024))))
    http = show("POST /api/query through HTTP", timed(post))
    print(f"{'':<44} HTTP, JSON and HTML add {1000 * (http - lib):.0f} ms ({http / lib:.2f}x the library call)")

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("browser: playwright is not installed (pip install -e '.[dev]')")
        return
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
        in_page = []

        def click():
            n = int(page.locator("body").get_attribute("data-reads") or 0)
            page.click("#read")
            page.wait_for_function(f"Number(document.body.dataset.reads || 0) > {n}")
            page.wait_for_selector("#current section.reading table.samples tr")
            in_page.append(int(page.locator("body").get_attribute("data-last-ms")) / 1000)

        py = timed(click)
        in_page = in_page[1:]  # without the warm-up
        page_ms = show("in the page: click -> samples rendered (JS)", in_page)
        show("in the page: click -> samples rendered (Python)", py)
        print(f"{'':<44} target < 2000 ms: {'met' if page_ms < 2 else 'NOT met'}; Chromium {browser.version}")
        browser.close()
    server.shutdown()
    print(f"peak RSS {peak_rss_mib():.0f} MiB (server and benchmark; Chromium runs in its own processes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
