"""HTML rendering of readings: one self-contained report (inline CSS, no scripts, opens offline) and the
fragment of one reading that the live viewer (:mod:`inversionview.viewer.server`) shows in its page.

``inversionview query ... --html FILE``, :meth:`Preimage.to_html` and the viewer's download button all call
:func:`render_html`; the viewer's page shows :func:`render_reading`'s fragments with the same stylesheet
(``static/report.css``), so a report shows what the page showed.

The HTML comes from Jinja2 templates (``templates/``) with autoescaping on, so every string of a reading (its
text, tokens, site, metric, mode, annotations, summary, and any field added to :class:`Preimage` or
:class:`Sample` later) is escaped wherever it lands. Fields the templates do not name are shown as text in an
"other fields" box. Numbers are formatted in Python; a distance that is not a finite number (a reading from a
hand-edited file) still renders.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from .terminal import pick_samples

HERE = Path(__file__).parent
CSS = (HERE / "static" / "report.css").read_text()
# Preimage fields the reading template shows (or leaves out on purpose: the query text is shown as its tokens,
# the decoder's path and the settings other than the mix are in the JSON); any other field goes to "other fields"
SHOWN = {
    "text",
    "tokens",
    "position",
    "site",
    "site_short",
    "epsilon",
    "metric",
    "mode",
    "samples",
    "n_candidates",
    "fraction_inside",
    "settings",
    "attention",
    "annotation",
    "decoder",
    "summary",
    "shares",
    "checks",
    "chains",
    "distribution",
    "sources",
    "chart",
}  # the estimate: shown through the summary's lines, whole in the JSON
SAMPLE_SHOWN = {"tokens", "text", "distance", "position", "distances", "delta", "count", "annotation", "source"}


def delta_bg(d: float) -> str:
    """The background of a token whose probability the activation moved by ``d``: blue up, red down."""
    a = min(1.0, abs(d)) if math.isfinite(d) else 1.0
    return f"rgba(42,111,219,{a:.2f})" if d >= 0 else f"rgba(220,40,40,{a:.2f})"


def show_value(v) -> str:
    """A field the templates do not name, as one line of JSON (escaped by the template like any string)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # an instance (asdict refuses a class)
        v = dataclasses.asdict(v)
    return json.dumps(v, default=str, ensure_ascii=False)


def extra_fields(obj, shown: set[str] = SAMPLE_SHOWN) -> list[tuple[str, object]]:
    """``(name, value)`` of ``obj``'s dataclass fields outside ``shown`` that hold something."""
    return [
        (f.name, getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if f.name not in shown and getattr(obj, f.name) not in (None, [], {}, "")
    ]


ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)
ENV.filters.update(fmt=format, rep=lambda x: repr(float(x)), show=show_value)


def bar_width(distance: float, top: float) -> int:
    """Pixels of a sample's distance bar: 120 at ``top`` or beyond (or at an infinite or NaN distance), 0 at 0."""
    x = distance / top if top > 0 else math.inf
    return int(120 * min(1.0, max(0.0, x))) if not math.isnan(x) else 120


def sample_row(s, epsilon: float, top: float) -> dict:
    """What the template shows of one sample: its class, bar, and each token with its mark, colour and title."""
    tokens = []
    for i, t in enumerate(s.tokens):
        d = (s.delta[i] if i < len(s.delta) else 0.0) + 0.0  # -0.0 -> 0.0: the same text after a JSON round trip in JS
        dist = s.distances[i] if i < len(s.distances) else None
        title = (
            f"position {i}: "
            + (f"delta {d:+.3f}; " if i < len(s.delta) else "")
            + (f"distance {dist:.4f}" if dist is not None else "not compared (PAD/EOS)")
        )
        tokens.append((t, i == s.position, delta_bg(d), title))
    return {
        "s": s,
        "cls": "in" if s.distance <= epsilon else "out",
        "bar": bar_width(s.distance, top),
        "tokens": tokens,
        "extra": extra_fields(s),
    }


VERDICTS = ("shared", "unsure", "varies", "few")


def chart_rows(chart) -> list[dict]:
    """The summary's chart (:func:`inversionview.summary.summary`) as the template draws it: the rows and values that
    are well formed (a verdict among :data:`VERDICTS`, shares and interval ends finite within 0..1), every text as a
    string; anything else is left out (the library draws readings that no schema checked)."""

    def unit(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0

    rows = []
    for it in chart if isinstance(chart, list) else []:
        if not isinstance(it, dict) or it.get("verdict") not in VERDICTS or not isinstance(it.get("values"), list):
            continue
        vals = [
            {"value": str(v.get("value")), "share": float(v["share"]), "low": float(v["low"]), "high": float(v["high"])}
            for v in it["values"]
            if isinstance(v, dict) and all(unit(v.get(k)) for k in ("share", "low", "high"))
        ]
        query = it.get("query")
        rows.append(
            {
                "item": str(it.get("item")),
                "verdict": it["verdict"],
                "values": [{**v, "mine": query is not None and v["value"] == str(query)} for v in vals],
                "check": None if it.get("check") is None else str(it["check"]),
            }
        )
    return rows


def render_reading(p, limit: int = 100) -> str:
    """One reading as a ``<section class="reading">``: the query (position outlined, the head's attention
    shaded for head sites), the automatic summary, and up to ``limit`` samples sorted by distance (inside
    epsilon spread evenly by distance, then the closest outside) with an epsilon rule."""
    shown = pick_samples(p, limit)
    top = max([s.distance for s in shown if math.isfinite(s.distance)] + [p.epsilon * 2])
    mix = (p.settings or {}).get("mix") if isinstance(p.settings, dict) else None
    how = ("Auto mix" if len(mix) > 1 else f"temperature {mix[0][0]:g}, noise {mix[0][1]:g}") if mix else ""
    from ..summary import distribution_line, sources_line

    return ENV.get_template("reading.html").render(
        p=p,
        distribution=distribution_line(p),
        chart=chart_rows(p.chart),
        sources=sources_line(p),
        rows=[sample_row(s, p.epsilon, top) for s in shown],
        hidden=len(p.samples) - len(shown),
        how=how,
        extra=extra_fields(p, SHOWN),
    )


def render_html(readings, title: str = "InversionView report") -> str:
    """A self-contained HTML page of ``readings``, side by side when there are several."""
    return ENV.get_template("report.html").render(
        title=title, css=Markup(CSS), readings=[Markup(render_reading(p)) for p in readings]
    )
