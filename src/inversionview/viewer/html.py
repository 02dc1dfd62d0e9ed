"""HTML rendering of readings: one self-contained report (inline CSS, no scripts, opens offline) and the
fragment of one reading that the live viewer (:mod:`inversionview.viewer.server`) shows in its page.

``inversionview query ... --html FILE``, :meth:`Preimage.to_html` and the viewer's download button all call
:func:`render_html`; the viewer's page shows :func:`render_reading`'s fragments with the same stylesheet
(``static/report.css``), so a report shows what the page showed.
"""

from __future__ import annotations

import html as _html
from pathlib import Path

from .terminal import _pick

CSS = (Path(__file__).parent / "static" / "report.css").read_text()


def _e(x) -> str:
    return _html.escape(str(x))


def _delta_bg(d: float) -> str:
    a = min(1.0, abs(d))
    return f"rgba(42,111,219,{a:.2f})" if d >= 0 else f"rgba(220,40,40,{a:.2f})"


def _sample_tokens(s) -> str:
    out = []
    for i, t in enumerate(s.tokens):
        d = (s.delta[i] if i < len(s.delta) else 0.0) + 0.0  # -0.0 -> 0.0: the same text after a JSON round trip in JS
        dist = s.distances[i] if i < len(s.distances) else None
        title = (f"position {i}: " + (f"delta {d:+.3f}; " if i < len(s.delta) else "")
                 + (f"distance {dist:.4f}" if dist is not None else "not compared (PAD/EOS)"))
        cls = "tok m" if i == s.position else "tok"
        out.append(f'<span class="{cls}" style="background:{_delta_bg(d)}" title="{_e(title)}">{_e(t)}</span>')
    return "".join(out)


def _query_tokens(p) -> str:
    out = []
    for i, t in enumerate(p.tokens):
        a = p.attention[i] if p.attention is not None and i < len(p.attention) else None
        style = f' style="background:rgba(255,150,0,{a:.2f})"' if a is not None else ""
        title = f' title="attention {a:.4f}"' if a is not None else ""
        cls = "tok q" if i == p.position else "tok"
        out.append(f'<span class="{cls}" data-i="{i}"{style}{title}>{_e(t)}</span>')
    return "".join(out)


def render_summary(p) -> str:
    """The reading's automatic summary (``Preimage.summary``, lines such as "shared by 100% of 73 samples:
    count = 8"), or nothing where the reading has none."""
    lines = getattr(p, "summary", None)
    if not lines:
        return ""
    return '<ul class="summary">' + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>"


def render_reading(p, limit: int = 100) -> str:
    """One reading as a ``<section class="reading">``: the query (position outlined, the head's attention
    shaded for head sites), the automatic summary, and up to ``limit`` samples sorted by distance (inside
    epsilon spread evenly by distance, then the closest outside) with an epsilon rule."""
    shown = _pick(p, limit)
    rows, ruled = [], False
    top = max([s.distance for s in shown if s.distance != float("inf")] + [p.epsilon * 2])
    for s in shown:
        if not ruled and s.distance > p.epsilon:
            rows.append(f'<tr class="eps"><td colspan="4">epsilon = {p.epsilon:g}</td></tr>')
            ruled = True
        w = int(120 * min(1.0, s.distance / top))
        cls = "in" if s.distance <= p.epsilon else "out"
        rows.append(f'<tr class="{cls}" data-distance="{float(s.distance)!r}"><td>{s.distance:.4f}</td>'
                    f'<td><span class="bar" style="width:{w}px"></span></td><td class="toks">{_sample_tokens(s)}</td>'
                    f'<td>{_e(s.annotation or "")} <span class="meta">x{s.count}</span></td></tr>')
    if not ruled:
        rows.append(f'<tr class="eps"><td colspan="4">epsilon = {p.epsilon:g}</td></tr>')
    hidden = len(p.samples) - len(shown)
    more = (f'<p class="meta">{hidden} more distinct samples not shown; inside epsilon the rows are spread evenly '
            f'by distance.</p>' if hidden > 0 else "")
    attn = " (shaded: the head's attention from the query position; hover for the weight)" if p.attention is not None else ""
    mix = (p.settings or {}).get("mix")
    how = ("Auto mix" if mix and len(mix) > 1 else f"temperature {mix[0][0]:g}, noise {mix[0][1]:g}") if mix else ""
    return (f'<section class="reading" data-site="{_e(p.site_short)}" data-position="{p.position}">'
            f'<h2>{_e(p.site_short)} <span class="meta">{_e(p.site)} · position {p.position} '
            f'{_e(p.tokens[p.position])}</span></h2>'
            f'<div class="query">query: {_query_tokens(p)} <span class="meta">{_e(p.annotation) if p.annotation else ""}'
            f'{attn}</span></div>{render_summary(p)}'
            f'<p class="meta">{p.n_candidates} candidates{" (" + how + ")" if how else ""}, {len(p.samples)} distinct; '
            f'true fraction inside epsilon: <b class="fraction">{p.fraction_inside:.1%}</b> · {p.metric} distance · '
            f'{p.mode} activations · blue: the activation raised the token\'s probability, red: lowered it; '
            f'underlined: closest position; hover a token for its distance</p>'
            f'<table class="samples">{"".join(rows)}</table>{more}</section>')


def render_html(readings, title: str = "InversionView report") -> str:
    """A self-contained HTML page of ``readings``, side by side when there are several."""
    body = "".join(render_reading(p) for p in readings)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title><style>{CSS}</style></head>'
            f'<body><h1>{_e(title)}</h1><div class="readings">{body}</div></body></html>')
