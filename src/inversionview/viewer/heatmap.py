"""``explain``'s table drawn: sites x (position, feature) as a heat map of FCRs with their intervals and baselines,
as a self-contained HTML page (:func:`render_explain`) or a PNG/SVG figure (:func:`plot_explain`).

A cell's colour is its FCR (white 0 to blue 1); its text is the FCR, the half-width of its 95% interval and the
baseline in parentheses; a cell the rule calls *carries* is outlined, *partly* dashed; a cell without an FCR (no query
had a member) is grey.
"""

from __future__ import annotations

import math

from .html import ENV, CSS


def _cells(expl) -> tuple[list[tuple[str, str]], dict]:
    """The columns (position, feature) in the order measured, and the rows by (site, position, feature)."""
    cols: list[tuple[str, str]] = []
    by = {}
    for r in expl.rows:
        key = (r.position, r.feature)
        if key not in cols:
            cols.append(key)
        by[(r.site, *key)] = r
    return cols, by


def colour(fcr: float | None) -> str:
    """A cell's background: grey without an FCR, else from white (0) to blue (1)."""
    if fcr is None or not math.isfinite(fcr):
        return "rgba(160,160,160,0.35)"
    return f"rgba(42,111,219,{max(0.0, min(1.0, fcr)):.3f})"


def render_explain(expl, title: str = "InversionView: which features each site carries") -> str:
    """The heat map as one HTML page (the reports' style inlined)."""
    from markupsafe import Markup

    cols, by = _cells(expl)
    rows = []
    for s in expl.sites:
        cells = []
        for pos, feat in cols:
            r = by.get((s, pos, feat))
            cells.append(
                None
                if r is None
                else {
                    "fcr": r.fcr,
                    "low": r.low,
                    "high": r.high,
                    "baseline": r.baseline,
                    "verdict": r.verdict,
                    "bg": colour(r.fcr),
                    "half": None if r.high is None or r.low is None else (r.high - r.low) / 2,
                    "queries": r.queries,
                    "empty": r.empty,
                }
            )
        rows.append((s, cells))
    return ENV.get_template("explain.html").render(
        title=title, css=Markup(CSS), expl=expl, cols=cols, rows=rows, positions=_spans(cols)
    )


def _spans(cols: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """The position headers over the feature columns: (position, how many columns)."""
    out: list[tuple[str, int]] = []
    for pos, _ in cols:
        if out and out[-1][0] == pos:
            out[-1] = (pos, out[-1][1] + 1)
        else:
            out.append((pos, 1))
    return out


def plot_explain(expl, path) -> None:
    """The heat map as a figure (PNG or SVG by the file's suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..errors import UserError

    cols, by = _cells(expl)
    grid = [[by[(s, *c)].fcr if (s, *c) in by else None for c in cols] for s in expl.sites]
    fig = Figure(figsize=(1.2 + 1.05 * len(cols), 0.9 + 0.5 * len(expl.sites)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    data = [[math.nan if v is None else v for v in row] for row in grid]
    ax.imshow(data, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, s in enumerate(expl.sites):
        for j, c in enumerate(cols):
            r = by.get((s, *c))
            if r is None or r.fcr is None:
                continue
            half = "" if r.high is None or r.low is None else f"±{(r.high - r.low) / 2:.2f}"
            text = f"{r.fcr:.2f}{half}\n({r.baseline:.2f})" + ("\ncarries" if r.verdict == "carries" else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if r.fcr > 0.6 else "black")
    ax.set_xticks(range(len(cols)), [f"{p}: {f}" for p, f in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(expl.sites)), expl.sites, fontsize=8)
    ax.set_title("FCR±(half its 95% interval) (baseline)", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UserError(f"cannot write the heat map {path}: {e.strerror}") from None
