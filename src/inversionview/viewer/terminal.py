"""Terminal rendering of a reading: the query with its position marked, its summary (what the samples inside
epsilon share), samples sorted by distance with an
epsilon rule, delta colours (blue: the activation raised the token's probability, red: lowered it) and
the task's annotation of each sample."""

from __future__ import annotations

import os
import sys
from collections import Counter

from ..summary import distribution_line, sources_line


def _colour_enabled() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def _bg(delta: float) -> str:
    a = min(1.0, abs(delta))
    if delta >= 0:
        r, g, b = int(255 - 200 * a), int(255 - 150 * a), 255
    else:
        r, g, b = 255, int(255 - 200 * a), int(255 - 200 * a)
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m"


def _tokens(tokens, mark: int | None, delta=None, colour: bool = True) -> str:
    out = []
    for i, t in enumerate(tokens):
        t = t.replace("\n", "\\n")
        if colour:
            style = _bg(delta[i]) if delta and i < len(delta) else ""
            if i == mark:
                style += "\x1b[1;4m"
            out.append(f"{style}{t}\x1b[0m" if style else t)
        else:
            out.append(f"[{t}]" if i == mark else t)
    return "".join(out)


def render(pre, limit: int = 20, colour: bool | None = None) -> str:
    colour = _colour_enabled() if colour is None else colour
    inside = sum(1 for s in pre.samples if s.distance <= pre.epsilon)
    lines = [
        f"site {pre.site_short} ({pre.site}), {pre.mode} activations, {pre.metric} distance, epsilon {pre.epsilon:g}",
        f"query  {_tokens(pre.tokens, pre.position, colour=colour)}   position {pre.position} "
        f"{pre.tokens[pre.position]!r}" + (f"   {pre.annotation}" if pre.annotation else ""),
    ]
    if pre.attention is not None:
        top = sorted(range(len(pre.attention)), key=lambda i: -pre.attention[i])[:5]
        lines.append(
            "attention from the query position: "
            + ", ".join(f"{pre.tokens[i]!r}@{i} {pre.attention[i]:.2f}" for i in top)
        )
    own = sum(1 for s in pre.samples if s.count > 0)  # the candidates' distinct inputs; the others joined them
    joined = Counter(s.source for s in pre.samples if s.count == 0)
    lines.append(
        f"{pre.n_candidates} candidates, {own} distinct among them"
        + "".join(f" (+{n} met by {'the chains' if k == 'chain' else f'the {k}'})" for k, n in sorted(joined.items()))
        + f"; {inside} distinct samples inside epsilon; true fraction of candidates inside epsilon: "
        + f"{pre.fraction_inside:.1%}"
        + (f"; {d} dropped (a BOS, PAD or EOS inside: no input)" if (d := pre.settings.get("dropped")) else "")
    )
    lines.append(distribution_line(pre))
    if src := sources_line(pre):
        lines.append(src)
    if pre.summary:
        lines.append("summary:")
        lines += [f"  {x}" for x in pre.summary]
    if colour:
        lines.append(
            "colour: \x1b[48;2;55;105;255m blue \x1b[0m the activation raised the token's probability, "
            "\x1b[48;2;255;55;55m red \x1b[0m lowered it; underlined: the closest position"
        )
    else:
        lines.append("[x]: the position closest to the query activation")
    lines.append(f"{'distance':>9} {'n':>5}  sample")
    shown = pick_samples(pre, limit)
    ruled = False
    for s in shown:
        if not ruled and s.distance > pre.epsilon:
            lines.append(f"{'-' * 9} epsilon = {pre.epsilon:g} {'-' * 30}")
            ruled = True
        note = f"   {s.annotation}" if s.annotation else ""
        lines.append(f"{s.distance:9.4f} {s.count:5d}  {_tokens(s.tokens, s.position, s.delta, colour)}{note}")
    if not ruled:
        lines.append(f"{'-' * 9} epsilon = {pre.epsilon:g} {'-' * 30}")
    hidden = len(pre.samples) - len(shown)
    if hidden > 0:
        lines.append(
            f"({hidden} more distinct samples not shown; inside epsilon the rows are spread evenly by distance)"
        )
    return "\n".join(lines)


def pick_samples(pre, limit: int):
    """Samples spread evenly over the whole range inside epsilon (the closest and the farthest included,
    so that what varies inside the preimage shows), then the closest ones outside; about 2:1."""
    inside = [s for s in pre.samples if s.distance <= pre.epsilon]
    outside = [s for s in pre.samples if s.distance > pre.epsilon]
    n_out = min(len(outside), max(limit // 3, limit - len(inside)))
    k = min(len(inside), limit - n_out)
    if k >= 2:
        inside = [inside[round(i * (len(inside) - 1) / (k - 1))] for i in range(k)]
    return inside[:k] + outside[:n_out]
