"""A screenshot of the live viewer (``inversionview serve``) on the shipped counting model, for the README:
two readings of the paper's counting query pinned side by side under the current one.

    python scripts/screenshot.py [OUT]        # default docs/viewer.png

Needs playwright and Debian's Chromium at /usr/bin/chromium (as the browser tests do).
"""

import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

from inversionview import InversionView
from inversionview.viewer.server import make_server

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
TEXT = "vvzccvczvvvzvcvc|v:8"


def read(page, site: str, position: int) -> None:
    n = int(page.locator("body").get_attribute("data-reads") or 0)
    page.click(f'#tokens .tok[data-i="{position}"]')
    page.select_option("#site", site)
    page.click("#read")
    page.wait_for_function(f"Number(document.body.dataset.reads || 0) > {n}")


def main(out: str = "docs/viewer.png") -> None:
    server = make_server(InversionView.load("shipped:counting"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(**CHROMIUM)
            page = browser.new_page(
                viewport={"width": 1400, "height": 1250}, bypass_csp=True
            )  # wait_for_function evals
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_selector("#tokens .tok")
            page.fill("#text", TEXT)
            page.wait_for_function(f"document.querySelector('#tokens').textContent === {('B' + TEXT + 'E')!r}")
            for site, position in [("x0.post", 18), ("a1.0", 19)]:  # the target letter after '|', then ':'
                read(page, site, position)
                page.click("#pin")
            read(page, "a0.0", 18)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out)
            browser.close()
    finally:
        server.shutdown()
    print(f"wrote {out} ({Path(out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
