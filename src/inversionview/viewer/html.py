"""A self-contained HTML report of one or more readings: inline CSS, no scripts from elsewhere, opens offline."""

from __future__ import annotations

import html as _html

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{font-size:1.1em;margin:.2em 0}
.reading{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}
.tok{font-family:ui-monospace,monospace;padding:1px 2px;border-radius:2px;white-space:pre}
.q{outline:2px solid #111}
.m{text-decoration:underline 2px}
table{border-collapse:collapse}
td{padding:1px 6px;vertical-align:middle}
.bar{display:inline-block;height:.7em;background:#888}
.eps td{border-top:2px dashed #c00;color:#c00;font-size:.85em}
.meta{color:#555;font-size:.9em}
.in .bar{background:#2a6fdb}
"""


def _e(x) -> str:
    return _html.escape(str(x))


def _delta_bg(d: float) -> str:
    a = min(1.0, abs(d))
    return f"rgba(42,111,219,{a:.2f})" if d >= 0 else f"rgba(220,40,40,{a:.2f})"


def _sample_tokens(s) -> str:
    out = []
    for i, t in enumerate(s.tokens):
        d = s.delta[i] if i < len(s.delta) else 0.0
        dist = s.distances[i] if i < len(s.distances) else None
        title = f"delta {d:+.3f}" + (f"; distance {dist:.4f}" if dist is not None else "; not compared (PAD/EOS)")
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
        out.append(f'<span class="{cls}"{style}{title}>{_e(t)}</span>')
    return "".join(out)


def render_reading(p, limit: int = 100) -> str:
    rows, ruled = [], False
    top = max([s.distance for s in p.samples[:limit] if s.distance != float("inf")] + [p.epsilon * 2])
    for s in p.samples[:limit]:
        if not ruled and s.distance > p.epsilon:
            rows.append(f'<tr class="eps"><td colspan="4">epsilon = {p.epsilon:g}</td></tr>')
            ruled = True
        w = int(120 * min(1.0, s.distance / top))
        cls = "in" if s.distance <= p.epsilon else "out"
        rows.append(f'<tr class="{cls}"><td>{s.distance:.4f}</td><td><span class="bar" style="width:{w}px"></span></td>'
                    f'<td>{_sample_tokens(s)}</td><td>{_e(s.annotation or "")} <span class="meta">x{s.count}</span></td></tr>')
    if not ruled:
        rows.append(f'<tr class="eps"><td colspan="4">epsilon = {p.epsilon:g}</td></tr>')
    attn = " (shaded: the head's attention from the query position; hover for the weight)" if p.attention is not None else ""
    return (f'<section class="reading"><h2>{_e(p.site_short)} <span class="meta">{_e(p.site)}</span></h2>'
            f'<div>query: {_query_tokens(p)} <span class="meta">position {p.position} {_e(p.tokens[p.position])!s}'
            f'{" · " + _e(p.annotation) if p.annotation else ""}{attn}</span></div>'
            f'<p class="meta">{p.n_candidates} candidates, {len(p.samples)} distinct; true fraction inside epsilon: '
            f'<b>{p.fraction_inside:.1%}</b> · {p.metric} distance · {p.mode} activations · '
            f'blue: the activation raised the token\'s probability, red: lowered it; underlined: closest position</p>'
            f'<table>{"".join(rows)}</table></section>')


def render_html(readings, title: str = "InversionView report") -> str:
    body = "".join(render_reading(p) for p in readings)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title><style>{CSS}</style></head>'
            f'<body><h1>{_e(title)}</h1>{body}</body></html>')
