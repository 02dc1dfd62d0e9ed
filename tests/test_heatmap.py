"""explain's heat map in the real browser: every cell's colour, FCR, interval and baseline are the JSON's."""

import json
import random
import re

import pytest
from playwright.sync_api import sync_playwright

from inversionview import InversionView
from inversionview.cli import main
from inversionview.fcr import explain
from inversionview.tasks.counting import Counting
from inversionview.viewer.heatmap import render_explain
from test_browser import CHROMIUM


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    d = tmp_path_factory.mktemp("heat")
    rng = random.Random(8)
    (d / "data.txt").write_text("\n".join(Counting().generate(rng) for _ in range(3000)) + "\n")
    iv = InversionView.load("shipped:counting")
    iv.data = str(d / "data.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INVERSIONVIEW_CACHE", str(d / "cache"))
        yield d, explain(iv, sites=["a0.0", "a1.0", "m1"], queries=4, features="count,target", progress=False)


def test_cells_show_the_json(explained, tmp_path):
    _, res = explained
    page_path = tmp_path / "heat.html"
    page_path.write_text(render_explain(res))
    with sync_playwright() as p:
        browser = p.chromium.launch(**CHROMIUM)
        page = browser.new_page()
        page.goto(page_path.as_uri())
        cells = page.eval_on_selector_all(
            "table.heat td.cell",
            """tds => tds.map(td => ({fcr: td.dataset.fcr, low: td.dataset.low, high: td.dataset.high,
                base: td.dataset.baseline, bg: getComputedStyle(td).backgroundColor, text: td.textContent,
                outline: getComputedStyle(td).outlineStyle}))""",
        )
        browser.close()
    cols = list(dict.fromkeys((r.position, r.feature) for r in res.rows))
    rows = [next(r for r in res.rows if (r.site, r.position, r.feature) == (s, *c)) for s in res.sites for c in cols]
    assert len(cells) == len(rows) == len(res.sites) * 4
    for c, r in zip(cells, rows):
        assert float(c["fcr"]) == pytest.approx(r.fcr) and float(c["base"]) == pytest.approx(r.baseline)
        assert float(c["low"]) == pytest.approx(r.low) and float(c["high"]) == pytest.approx(r.high)
        m = re.fullmatch(r"rgba?\(42, 111, 219(?:, ([\d.]+))?\)", c["bg"])  # alpha 1 is written rgb(...)
        alpha = float(m.group(1) or 1.0)
        assert alpha == pytest.approx(r.fcr, abs=0.01)  # the colour is the FCR
        assert c["text"].startswith(f"{r.fcr:.2f}±{(r.high - r.low) / 2:.2f}") and f"({r.baseline:.2f})" in c["text"]
        assert (c["outline"] == "solid") == (r.verdict == "carries")


def test_explain_writes_the_heat_map_from_the_command_line(explained, capsys):
    d, _ = explained
    argv = ["explain", "shipped:counting", "--data", str(d / "data.txt"), "--site", "a1.0", "--queries", "2"]
    assert main([*argv, "--json", "--html", str(d / "h.html"), "--png", str(d / "h.png")]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    html = (d / "h.html").read_text()
    assert html.count('class="cell') + html.count('class="none"') == len(rows)
    from matplotlib.image import imread

    img = imread(d / "h.png")
    assert img.shape[0] > 100 and img.shape[1] > 300
