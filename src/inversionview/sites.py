"""Site names: TransformerLens hook names as the public vocabulary, plus the paper's short names.

=========================================  ==============
TransformerLens name                       short name
=========================================  ==============
``blocks.{l}.hook_resid_pre``              ``x{l}.pre``
``blocks.{l}.hook_resid_mid``              ``x{l}.mid``
``blocks.{l}.hook_resid_post``             ``x{l}.post``
``blocks.{l}.hook_attn_out``               ``a{l}``
``blocks.{l}.hook_mlp_out``                ``m{l}``
``blocks.{l}.attn.hook_result.{h}``        ``a{l}.{h}``
=========================================  ==============
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import UserError

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "result")

_TL = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)|attn\.hook_(result)\.(\d+))$")
_SHORT = re.compile(r"^(?:x(\d+)\.(pre|mid|post)|a(\d+)(?:\.(\d+))?|m(\d+))$")


@dataclass(frozen=True, order=True)
class Site:
    """One vector-valued place in the probed model."""

    layer: int
    kind: str
    head: int | None = None

    @property
    def name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.1.attn.hook_result.0``."""
        if self.kind == "result":
            return f"blocks.{self.layer}.attn.hook_result.{self.head}"
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def short(self) -> str:
        """The paper's short name, e.g. ``a1.0``."""
        if self.kind == "result":
            return f"a{self.layer}.{self.head}"
        if self.kind.startswith("resid_"):
            return f"x{self.layer}.{self.kind[6:]}"
        return f"{'a' if self.kind == 'attn_out' else 'm'}{self.layer}"

    def __str__(self) -> str:
        return self.short


def all_sites(n_layers: int, n_heads: int) -> list[Site]:
    """Every site of a model, in forward order."""
    out = []
    for layer in range(n_layers):
        out.append(Site(layer, "resid_pre"))
        out += [Site(layer, "result", h) for h in range(n_heads)]
        out += [Site(layer, "attn_out"), Site(layer, "resid_mid"), Site(layer, "mlp_out"), Site(layer, "resid_post")]
    return out


def parse_site(name: str, n_layers: int | None = None, n_heads: int | None = None) -> Site:
    """Parse a TransformerLens or short site name; check it against the model's shape if given."""
    name = str(name).strip()
    site = None
    m = _TL.match(name)
    if m:
        layer, kind, res, head = m.groups()
        site = Site(int(layer), "result", int(head)) if res else Site(int(layer), kind)
    m = _SHORT.match(name)
    if m:
        xl, xk, al, ah, ml = m.groups()
        if xl is not None:
            site = Site(int(xl), f"resid_{xk}")
        elif al is not None:
            site = Site(int(al), "result", int(ah)) if ah is not None else Site(int(al), "attn_out")
        else:
            site = Site(int(ml), "mlp_out")
    known = all_sites(n_layers, n_heads) if n_layers is not None and n_heads is not None else None
    if site is None or (known is not None and site not in known):
        raise UserError(_unknown(name, known))
    return site


def _unknown(name: str, known: list[Site] | None) -> str:
    if not known:
        return (f"unknown site {name!r}: expected a TransformerLens name like 'blocks.1.attn.hook_result.0' "
                "or a short name like 'a1.0', 'x0.mid', 'm1'")
    names = [s.short for s in known] + [s.name for s in known]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown site {name!r}{hint} (this model has {', '.join(s.short for s in known)})"
