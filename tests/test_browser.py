"""The live viewer's page in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium) against the
server running in this process on the shipped counting model. Typing a query, clicking a position, picking a
site, the sorted samples and the epsilon rule, pinning two readings side by side, downloading the report,
error messages in the page, the stored-readings panel, the reading queue as the page shows it, and script payloads
in every field of a reading (under the page's own content policy)."""

from __future__ import annotations

import random
import re
import threading

import pytest
from _payloads import injected, shown_as_text, text_fields, with_payload
from playwright.sync_api import sync_playwright

from inversionview import InversionView
from inversionview.preimage import Preimage
from inversionview.schema import NotAReading, check_reading
from inversionview.store import ReadingStore
from inversionview.tasks.counting import Counting
from inversionview.viewer.server import MAX_SAMPLES, make_server

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
TEXT = "vvzccvczvvvzvcvc|v:8"  # BOS + 20 characters + EOS: the target 'v' is at 18, ':' at 19
SELF_CONTAINED = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//""", re.I)


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


def _start(iv, db=None):
    server = make_server(iv, port=0, db=db)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(iv):
    server = _start(iv)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(**CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    # bypass_csp: Playwright's wait_for_function evaluates its string in the page, which the page's policy forbids
    # (test_payloads_in_every_field_never_become_markup runs under the policy)
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    pg = context.new_page()
    outside = []
    pg.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("blob:") else outside.append(r.url))
    pg.goto(url)
    pg.wait_for_selector("#tokens .tok")  # the page is up and has drawn a random input
    pg.fill("#samples", "64")
    yield pg
    context.close()
    assert outside == [], f"the page fetched from outside the server: {outside}"


def type_query(page, text: str = TEXT) -> None:
    page.fill("#text", text)
    page.wait_for_function(f"document.querySelector('#tokens').textContent === {('B' + text + 'E')!r}")


def read(page, site: str | None = None, position: int | None = None) -> None:
    if position is not None:
        page.click(f'#tokens .tok[data-i="{position}"]')
    if site is not None:
        page.select_option("#site", site)
    n = int(page.locator("body").get_attribute("data-reads") or 0)
    page.click("#read")
    page.wait_for_function(
        f"Number(document.body.dataset.reads || 0) > {n} || document.querySelector('#msg').className === 'error'"
    )
    assert page.locator("#msg.error").count() == 0, page.inner_text("#msg")


def rows(section) -> list[tuple[str, float | None]]:
    """The sample table's rows in order: ("in"/"out", distance) or ("eps", None) for the rule."""
    return [
        (cls, None if cls == "eps" else float(d))
        for cls, d in section.evaluate(
            "s => [...s.querySelectorAll('table.samples tr')].map(r => [r.className, r.dataset.distance || null])"
        )
    ]


def test_type_click_pick_and_read(page):
    type_query(page)
    page.click('#tokens .tok[data-i="19"]')
    assert page.locator("#tokens .tok.sel").inner_text() == ":"
    assert 'position 19 ":"' in page.inner_text("#posinfo")
    assert page.locator("#tokens .tok.off").inner_text() == "E"  # EOS is not a query position
    # sites come grouped by layer with short names
    groups = page.eval_on_selector_all(
        "#site optgroup", "gs => gs.map(g => [g.label, [...g.children].map(o => o.value)])"
    )
    assert groups == [
        ["layer 0", ["x0.pre", "a0.0", "x0.mid", "m0", "x0.post"]],
        ["layer 1", ["a1.0", "x1.mid", "m1", "x1.post"]],
    ]
    page.fill("#epsilon", "0.15")
    read(page, site="a1.0")

    sec = page.locator("#current section.reading")
    assert sec.get_attribute("data-site") == "a1.0" and sec.get_attribute("data-position") == "19"
    assert sec.locator(".query .tok.q").inner_text() == ":"
    # the head's attention from the query position, with the exact weight on hover
    titles = sec.locator(".query .tok").evaluate_all("ts => ts.map(t => t.title)")
    weights = [float(t.split()[1]) for t in titles if t.startswith("attention ")]
    assert len(weights) == 20 and sum(weights) == pytest.approx(1.0, abs=1e-3)
    # samples sorted by distance, the rule at epsilon between the inside and the outside
    got = rows(sec)
    ds = [d for c, d in got if c != "eps"]
    assert ds == sorted(ds) and len(ds) >= 2
    assert [c for c, _ in got].count("eps") == 1
    k = [c for c, _ in got].index("eps")
    assert all(c == "in" and d <= 0.15 for c, d in got[:k]) and all(c == "out" and d > 0.15 for c, d in got[k + 1 :])
    assert sec.locator("tr.eps").inner_text().strip() == "epsilon = 0.15"
    assert re.search(r"true fraction inside epsilon: \d+\.\d%", sec.inner_text())
    # the distribution the shares estimate, and what each source found
    dist = sec.locator("p.distribution").inner_text()
    assert dist.startswith("shares estimate the input distribution of task counting") and "decoder " in dist
    # each sample: its matched position underlined, the distance at every position on hover, delta colours
    first = sec.locator("table.samples tr.in, table.samples tr.out").first
    toks = first.locator(".toks .tok")
    assert first.locator(".toks .tok.m").count() == 1
    assert all("distance" in t or "not compared" in t for t in toks.evaluate_all("ts => ts.map(t => t.title)"))
    colours = set(toks.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)"))
    assert any(c.startswith("rgba(42, 111, 219") or c.startswith("rgba(220, 40, 40") for c in colours)
    assert re.search(r"count=\d", first.inner_text())  # the task's annotation
    assert "read in" in page.inner_text("#status")


def test_the_chart_draws_every_share_with_its_interval(page):
    """Each summary item's values as bars: the bar's length is the share and the line its 95% interval, as in the
    reading's JSON; the query's own value is outlined, and a checked feature carries its check."""
    type_query(page)
    read(page, site="a1.0", position=19)
    reading = page.evaluate("state.current.reading")
    chart = reading["chart"]
    assert chart and {c["item"] for c in chart} >= {"count", "target", "number of tokens"}
    drawn = page.eval_on_selector_all(
        "#current table.chart tr.item",
        """rows => rows.map(r => ({item: r.querySelector('th').firstChild.textContent,
            check: r.querySelector('.check').textContent,
            vals: [...r.querySelectorAll('.val')].map(v => {
              const t = v.querySelector('.track').getBoundingClientRect(), f = v.querySelector('.fill')
                .getBoundingClientRect(), c = v.querySelector('.ci').getBoundingClientRect();
              return {value: v.querySelector('.lab').textContent, mine: v.classList.contains('mine'),
                      fill: f.width / t.width,
                      low: (c.left - t.left) / t.width, high: (c.right - t.left) / t.width};
            })}))""",
    )
    assert [d["item"] for d in drawn] == [c["item"] for c in chart]
    for d, c in zip(drawn, chart):
        assert [v["value"] for v in d["vals"]] == [v["value"] for v in c["values"]]
        for v, want in zip(d["vals"], c["values"]):
            assert v["fill"] == pytest.approx(want["share"], abs=0.01)
            assert v["low"] == pytest.approx(want["low"], abs=0.01) and v["high"] == pytest.approx(
                want["high"], abs=0.01
            )
            assert v["mine"] == (v["value"] == c["query"])
    # the chart's shares are the reading's: the feature's share of the query's value, as pre.shares has it
    for sh in reading["shares"]:
        row = next(c for c in chart if c["item"] == sh["feature"])
        mine = [v for v in row["values"] if v["value"] == str(sh["value"])]
        if mine:
            assert mine[0]["share"] == pytest.approx(sh["share"]) and mine[0]["low"] == pytest.approx(sh["low"])
    # every share with an interval that the summary prints is drawn (shared, unsure, the aligned tokens)
    drawn_pct = {f"{v['share']:.0%} [{v['low']:.0%}-{v['high']:.0%}]" for c in chart for v in c["values"]}
    printed = [m for line in reading["summary"][1:] for m in re.findall(r"\d+% \[\d+%-\d+%\]", line)]
    assert printed and set(printed) <= drawn_pct
    checked = {c["feature"] for c in reading["checks"]}
    assert checked and all(("stay inside epsilon" in d["check"]) == (d["item"] in checked) for d in drawn)


def test_a_viewer_under_a_data_set_names_it_and_marks_its_members(browser, tmp_path, monkeypatch):
    """`serve --data`: the page's readings are under the data set; its members are listed, marked `data`."""
    monkeypatch.setenv("INVERSIONVIEW_CACHE", str(tmp_path / "cache"))
    rng = random.Random(4)
    (tmp_path / "data.txt").write_text("\n".join(Counting().generate(rng) for _ in range(2000)) + "\n")
    own = InversionView.load("shipped:counting")
    own.data = str(tmp_path / "data.txt")
    server = _start(own)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("#tokens .tok")
        page.fill("#samples", "32")
        type_query(page)
        read(page, site="a1.0", position=19)
        sec = page.locator("#current section.reading")
        dist = sec.locator("p.distribution").inner_text()
        assert dist.startswith(f"shares estimate the data set {tmp_path / 'data.txt'} (2,000 inputs)")
        assert re.search(r"data \d+", dist)
        assert "exact over the data set's preimage" in sec.locator("ul.summary").inner_text()
        assert sec.locator("td", has_text="· data").count() >= 1
        context.close()
    finally:
        server.shutdown()
        server.server_close()


def test_pin_two_readings_compare_and_download_the_report(page, tmp_path):
    type_query(page)
    read(page, site="a1.0", position=19)
    page.click("#pin")
    read(page, site="x0.post", position=18)
    page.click("#pin")
    pins = page.locator("#pins .pin section.reading")
    assert pins.count() == 2
    assert [pins.nth(i).get_attribute("data-site") for i in range(2)] == ["a1.0", "x0.post"]
    a, b = pins.nth(0).bounding_box(), pins.nth(1).bounding_box()
    assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"]  # side by side
    assert "2" in page.inner_text("#npins")

    with page.expect_download() as d:
        page.click("#download")
    path = tmp_path / "report.html"
    d.value.save_as(path)
    html = path.read_text()
    assert d.value.suggested_filename == "inversionview-report.html"
    assert html.startswith("<!doctype html>") and "<style>" in html
    assert not SELF_CONTAINED.search(html) and "<script" not in html.lower() and "<link" not in html.lower()
    assert re.findall(r'<section class="reading" data-site="([^"]+)" data-position="(\d+)"', html) == [
        ("a1.0", "19"),
        ("x0.post", "18"),
    ]
    assert html.count("epsilon = 0.1<") == 2
    # what the page showed: the same fragments
    fragments = page.evaluate("state.pins.map(r => r.html)")
    assert len(fragments) == 2 and all(f in html for f in fragments)

    # unpinning one leaves the other
    page.locator("#pins .unpin").first.click()
    assert page.locator("#pins .pin section.reading").get_attribute("data-site") == "x0.post"


def test_temperature_instead_of_the_auto_mix(page):
    type_query(page)
    assert page.is_disabled("#temperature")
    page.uncheck("#auto")
    assert page.is_enabled("#temperature") and page.is_enabled("#noise")
    page.fill("#temperature", "")  # not silently the Auto mix
    page.click("#read")
    page.wait_for_selector("#msg.error")
    assert "type a temperature" in page.inner_text("#msg") and page.locator("body").get_attribute("data-reads") is None
    page.fill("#temperature", "0.5")
    read(page, site="x0.mid", position=18)
    assert "temperature 0.5, noise 0" in page.inner_text("#current .reading")


def test_changing_epsilon_moves_the_rule_without_a_new_query(page):
    type_query(page)
    read(page, site="a1.0", position=19)
    before = rows(page.locator("#current section.reading"))
    page.fill("#epsilon", "0.4")
    page.dispatch_event("#epsilon", "change")
    page.wait_for_function("document.querySelector('#current tr.eps').textContent === 'epsilon = 0.4'")
    after = rows(page.locator("#current section.reading"))
    assert page.locator("body").get_attribute("data-reads") == "1"  # no new query
    assert sorted(d for c, d in after if c != "eps") == sorted(
        d for c, d in before if c != "eps"
    )  # 64 samples and <= 32 chain members: all shown
    k = [c for c, _ in after].index("eps")
    assert all(d <= 0.4 for _, d in after[:k]) and all(d > 0.4 for _, d in after[k + 1 :])


def test_random_input_from_the_task(page):
    before = page.input_value("#text")
    texts = {before}
    for _ in range(3):
        old = page.input_value("#text")
        page.click("#random")
        page.wait_for_function(f"document.querySelector('#text').value !== {old!r}")
        texts.add(page.input_value("#text"))
    text = page.input_value("#text")
    assert len(texts) >= 3 and re.fullmatch(r"[a-z]+\|[a-z]:[1-9]", text)
    page.wait_for_function(f"document.querySelector('#tokens').textContent === {('B' + text + 'E')!r}")
    # the selected position is the task's ':' position
    assert page.locator("#tokens .tok.sel").inner_text() == ":"


def test_caps_and_errors_are_shown_in_the_page(page):
    page.fill("#text", "vvZ|v:2")  # tokenizing fails: the message names the character
    page.wait_for_selector("#msg.error")
    assert "character 'Z'" in page.inner_text("#msg")
    type_query(page)
    page.wait_for_function("document.querySelector('#msg').textContent === ''")
    page.fill("#samples", str(MAX_SAMPLES + 1))
    page.click("#read")
    page.wait_for_selector("#msg.error")
    assert f"samples must be between 1 and {MAX_SAMPLES}" in page.inner_text("#msg")
    page.fill("#samples", "64")
    page.fill("#text", "v" * 2000)
    page.wait_for_function("document.querySelector('#msg').textContent.includes('characters')")
    assert "2000 characters" in page.inner_text("#msg") and "at most" in page.inner_text("#msg")


def test_stored_readings_panel(iv, browser, tmp_path):
    db = tmp_path / "readings.sqlite"
    with ReadingStore(db, create=True) as store:
        ids = [
            store.put(iv.query(TEXT, site=s, position=p, samples=64), iv.fingerprint)
            for s, p in [("a1.0", 19), ("x0.post", 18)]
        ]
        want = store.get(ids[1])
    server = _start(iv, db=str(db))
    context = browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("#stored tr[data-id]", state="attached")
        page.click("#storedbox summary")
        assert page.locator("#stored tr[data-id]").count() == 2
        assert page.eval_on_selector_all("#ssite option", "os => os.map(o => o.value)") == ["", "x0.post", "a1.0"]
        page.select_option("#ssite", "x0.post")
        page.click("#ssearch")
        page.wait_for_function("document.querySelectorAll('#stored tr[data-id]').length === 1")
        page.fill("#stext", "no such text")
        page.click("#ssearch")
        page.wait_for_function("document.querySelectorAll('#stored tr[data-id]').length === 0")
        page.fill("#stext", "|v:")
        page.click("#ssearch")
        page.wait_for_function("document.querySelectorAll('#stored tr[data-id]').length === 1")
        page.click(f'#stored tr[data-id="{ids[1]}"]')
        page.wait_for_selector('#current section.reading[data-site="x0.post"]')
        sec = page.locator("#current section.reading")
        assert sec.get_attribute("data-position") == "18"
        assert len(rows(sec)) == min(100, len(want.samples)) + 1
        assert page.is_enabled("#pin")
        # the controls now hold the stored query: Read reads it again
        page.wait_for_selector('#tokens .tok.sel[data-i="18"]')
        assert page.input_value("#text") == TEXT and page.input_value("#site") == "x0.post"
    finally:
        context.close()
        server.shutdown()
        server.server_close()
        server.viewer.store.close()


def test_report_matches_the_library(iv, page, tmp_path):
    """The page's download and `Preimage.to_html` render the same reading identically (one code path)."""
    type_query(page)
    read(page, site="m0", position=18)
    page.click("#pin")
    with page.expect_download() as d:
        page.click("#download")
    d.value.save_as(tmp_path / "r.html")
    reading = page.evaluate("state.pins[0].reading")
    assert (tmp_path / "r.html").read_text() == Preimage.from_dict(reading).to_html()


def test_read_right_after_typing_reads_the_marked_position(page):
    """Read pressed before the typed input was tokenized: the page tokenizes first, and reads the position it
    then marks (never a stale one from the previous input)."""
    page.fill("#text", TEXT)
    page.click("#read")
    page.wait_for_function("Number(document.body.dataset.reads || 0) > 0")
    marked = page.locator("#tokens .tok.sel").get_attribute("data-i")
    sec = page.locator("#current section.reading")
    assert sec.get_attribute("data-position") == marked
    assert page.inner_text("#tokens").replace("\n", "") == "B" + TEXT + "E"


def test_the_page_shows_its_place_in_the_queue_and_drops_a_superseded_query(page, server):
    """Readings run one at a time: while others run, the page says how many are ahead; a query replaced by a new
    Read is dropped by the server, not read for nobody."""
    gate, started = threading.Event(), threading.Event()
    server.viewer.readings.submit(lambda: (started.set(), gate.wait(120)))
    try:
        assert started.wait(60)
        before = server.viewer.readings.state()
        type_query(page)
        page.click("#read")
        page.wait_for_function(
            "document.querySelector('#status').textContent === 'queued: 1 reading ahead of this one'"
        )
        assert page.locator("body").get_attribute("data-queued") == "1"
        page.click("#read")  # a second Read: the first query is aborted and the server drops it
        page.wait_for_function(
            f"fetch('/api/queue').then(r => r.json()).then(q => q.cancelled > {before['cancelled']})"
            " && document.querySelector('#status').textContent.startsWith('queued')"
        )
        assert server.viewer.readings.state()["waiting"] == 1
    finally:
        gate.set()
    page.wait_for_function("Number(document.body.dataset.reads || 0) === 1")
    assert page.locator("#current section.reading").count() == 1 and page.locator("#msg.error").count() == 0


SANITIZE = (
    '<span class="tok" title="t" onclick="window.xss=1" style="background:url(http://e/)">a</span>'
    '<img src=x onerror="window.xss=1"><script>window.xss=1</script><iframe src="http://e/"></iframe>'
    '<a href="javascript:void(0)">l</a><b id="i" class="">c</b><style>*{}</style><svg onload="window.xss=1"/>'
    '<table><tr><td style="width:3px" onmouseover="x">w</td></tr></table>'
)


def _admitted(reading: dict) -> bool:
    """Whether the reading's schema (inversionview.schema) admits ``reading``."""
    try:
        check_reading(reading)
    except NotAReading:
        return False
    return True


SHOWN_IN_PAGE = {"tokens", "site", "site_short", "metric", "mode", "annotation", "samples.tokens", "samples.annotation"}


def _in_page(page, selector: str) -> str:
    """The markup of what the page holds at ``selector``: an injected element would be in it as an element."""
    assert page.evaluate("window.xss") is None, page.evaluate("window.xss")  # no payload's script or handler ran
    return page.inner_html(selector)


@pytest.mark.slow
def test_payloads_in_every_field_never_become_markup(iv, browser, tmp_path):
    """Each field of a reading that can hold text (from the dataclasses' type hints) carries markup that would
    run, show or break out of an attribute; sent to /api/epsilon, pinned, downloaded as a report, or stored in a
    readings DB and opened in the panel, it stays text. The page's content policy is on (no bypass)."""
    good = iv.query(TEXT, site="a1.0", position=19, samples=16)
    # the fields whose text the reading's schema admits (a choice such as the metric is refused before any view)
    admitted = [p for p, _ in text_fields() if _admitted(with_payload(good.to_dict(), p))]
    assert {"summary", "tokens", "site_short", "samples.annotation"} <= set(admitted) and "metric" not in admitted
    db = tmp_path / "readings.sqlite"
    stored_reading = good.to_dict()
    for path in admitted:
        stored_reading = with_payload(stored_reading, path)
    with ReadingStore(db, create=True) as store:  # every payload at once, summary included (kept as stored)
        stored_id = store.put(Preimage.from_dict(stored_reading), iv.fingerprint)
    server = _start(iv, db=str(db))
    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("#tokens .tok")
        # the page inserts the server's HTML only through an allow-list: markup the templates never write is dropped
        kept = page.evaluate(
            """(html) => { const d = document.createElement("div"); d.appendChild(safeFragment(html));
                                            return d.innerHTML; }""",
            SANITIZE,
        )
        assert kept == (
            '<span class="tok" title="t">a</span>l<b class="">c</b>'
            '<table><tbody><tr><td style="width:3px">w</td></tr></tbody></table>'
        )
        for path in admitted:
            page.evaluate(
                "async (reading) => { show(await api('/api/epsilon', {reading, epsilon: 0.3})); pin(); }",
                with_payload(good.to_dict(), path),
            )
            html = _in_page(page, "#current")
            assert injected(html) == [], (path, injected(html))
            if path in SHOWN_IN_PAGE:
                assert shown_as_text(html, path), path
        pinned = _in_page(page, "#pins")
        assert injected(pinned) == [] and pinned.count('class="reading"') == len(admitted)
        with page.expect_download() as d:
            page.click("#download")
        d.value.save_as(tmp_path / "report.html")
        report = (tmp_path / "report.html").read_text()
        assert injected(report) == []
        opened = context.new_page()  # the report opened in the browser: nothing runs, nothing shows as markup
        opened.goto((tmp_path / "report.html").as_uri())
        assert injected(_in_page(opened, "body")) == []
        page.click("#storedbox summary")
        page.wait_for_selector(f'#stored tr[data-id="{stored_id}"]')
        assert injected(_in_page(page, "#stored")) == []
        page.click(f'#stored tr[data-id="{stored_id}"]')
        page.wait_for_selector("#status:has-text('stored reading')")  # (wait_for_function would need eval)
        html = _in_page(page, "#current")
        assert injected(html) == [] and shown_as_text(html, "summary") and shown_as_text(html, "site_short")
    finally:
        context.close()
        server.shutdown()
        server.server_close()
        server.viewer.store.close()
