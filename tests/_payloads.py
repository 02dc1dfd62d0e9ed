"""Script-injection payloads in every field of a reading that can hold text, found from the dataclasses' type hints
(so a field added to Preimage or Sample later is covered without editing this file), and a check of rendered HTML
for anything the payloads could have become."""

from __future__ import annotations

import copy
import dataclasses
import typing
from html.parser import HTMLParser

from inversionview.preimage import Preimage


def payload(mark: str) -> str:
    """Markup that would show (an element of class "inj"), run (an image's error handler, a script) or break out of
    an attribute if it were not escaped; ``mark`` names the field it was put in."""
    return (
        f'<b class="inj">{mark}</b><img src=x onerror="window.xss=(window.xss||[]).concat(\'{mark}\')">'
        f'<script>window.xss=(window.xss||[]).concat("{mark}")</script>"\' x="&amp;&lt;</td></tr></table>'
    )


def _types(t):
    yield t
    for a in typing.get_args(t):
        yield from _types(a)


def text_fields(cls=Preimage, prefix: str = "") -> list[tuple[str, object]]:
    """``(path, type)`` of every field of ``cls`` that can hold a string: ``"metric"``, ``"samples.tokens"``..."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        inner = [x for x in _types(t) if dataclasses.is_dataclass(x)]
        if inner:
            for c in inner:
                out += text_fields(c, f"{prefix}{f.name}.")
        elif any(x in (str, dict, typing.Any) or typing.get_origin(x) is dict for x in _types(t)):
            out.append((prefix + f.name, t))
    return out


def _fill(value, t, text: str):
    """``value`` (of type ``t``) with every string in it replaced by ``text``; None becomes a value holding it."""
    if isinstance(value, str):
        return text
    if isinstance(value, list):
        elem = next(
            (typing.get_args(x)[0] for x in _types(t) if typing.get_origin(x) is list and typing.get_args(x)),
            typing.Any,
        )
        return [_fill(x, elem, text) for x in value]
    if isinstance(value, dict):
        return {**{k: _fill(x, typing.Any, text) for k, x in value.items()}, "payload": text}
    if value is None:
        kinds = [x for x in _types(t) if x is not type(None)]
        if str in kinds and not any(typing.get_origin(x) is list for x in kinds):
            return text
        if any(typing.get_origin(x) is list and typing.get_args(x) == (str,) for x in kinds):
            return [text]
        if any(x is dict or typing.get_origin(x) is dict for x in kinds):
            return {"payload": text}
    return value


def with_payload(reading: dict, path: str, cls=Preimage) -> dict:
    """A copy of ``reading`` (``cls.to_dict()``) with the payload marked ``path`` in the field ``path`` (in every
    sample for a sample's field)."""
    out = copy.deepcopy(reading)
    t = dict(text_fields(cls))[path]
    head, _, rest = path.partition(".")
    for d in out[head] if rest else [out]:
        key = rest or head
        d[key] = _fill(d.get(key), t, payload(path))
    return out


class Markup(HTMLParser):
    """What an HTML document holds: its tags, attributes and text (entities decoded)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def injected(html: str) -> list[str]:
    """What the payloads became in ``html`` other than text: elements, scripts, handlers. Empty when escaped."""
    m = Markup(html)
    bad = [t for t in m.tags if t in ("img", "script", "iframe", "svg", "object", "embed", "link", "base", "a")]
    bad += [f"{k}={v}" for k, v in m.attrs if k.startswith("on") or k == "x" or (k == "class" and "inj" in (v or ""))]
    return bad


def shown_as_text(html: str, path: str) -> bool:
    """The payload put in ``path`` appears, as the very characters, in ``html``'s text or attribute values."""
    m = Markup(html)
    return any(payload(path) in x for x in m.text + [v or "" for _, v in m.attrs])
