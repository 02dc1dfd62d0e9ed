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

The escape hatch, for a model whose family has no site table (or for any tensor the table does not name):
``module:{path}:input`` or ``module:{path}:output`` names the input (the first positional argument, else the
``hidden_states`` keyword, else the first tensor keyword) or the output (its first tensor, if it is a tuple or a
``ModelOutput``) of the module at ``path`` in the causal LM (``model.get_submodule(path)``), e.g.
``module:transformer.h.0.mlp:output`` or ``module:model.layers.1.self_attn.o_proj:input``. Its TransformerLens
name and its short name are that whole string. A module site has ``kind == "module"`` and ``layer == -1``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import UserError

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "result")
MODULE = "module"  # the kind of an escape-hatch site named by module path
MODULE_IO = ("input", "output")

_TL = re.compile(
    r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)|attn\.hook_(result)\.(\d+))$"
)
_SHORT = re.compile(r"^(?:x(\d+)\.(pre|mid|post)|a(\d+)(?:\.(\d+))?|m(\d+))$")
_MODULE = re.compile(r"^module:([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*):(input|output)$")


@dataclass(frozen=True, order=True)
class Site:
    """One vector-valued place in the probed model: a site of the family's table (``layer``, ``kind``, ``head``),
    or a module site (``kind == "module"``, ``layer == -1``, ``path`` and ``io``)."""

    layer: int
    kind: str
    head: int | None = None
    path: str | None = None
    io: str | None = None

    @classmethod
    def module(cls, path: str, io: str) -> "Site":
        """The escape hatch: the input or output of the module at ``path`` (as ``model.get_submodule`` takes it)."""
        if io not in MODULE_IO:
            raise UserError(f"module site io must be 'input' or 'output', got {io!r}")
        return cls(-1, MODULE, None, path, io)

    @property
    def name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.1.attn.hook_result.0``."""
        if self.kind == MODULE:
            return f"module:{self.path}:{self.io}"
        if self.kind == "result":
            return f"blocks.{self.layer}.attn.hook_result.{self.head}"
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def short(self) -> str:
        """The paper's short name, e.g. ``a1.0``."""
        if self.kind == MODULE:
            return self.name
        if self.kind == "result":
            return f"a{self.layer}.{self.head}"
        if self.kind.startswith("resid_"):
            return f"x{self.layer}.{self.kind[6:]}"
        return f"{'a' if self.kind == 'attn_out' else 'm'}{self.layer}"

    def __str__(self) -> str:
        return self.short


def all_sites(n_layers: int, n_heads: int, resid_mid: bool = True) -> list[Site]:
    """Every table site of a model, in forward order. ``resid_mid=False`` for a model whose attention and MLP
    both read resid_pre (a parallel residual), which has no resid_mid."""
    out = []
    for layer in range(n_layers):
        out.append(Site(layer, "resid_pre"))
        out += [Site(layer, "result", h) for h in range(n_heads)]
        out += [Site(layer, "attn_out")] + ([Site(layer, "resid_mid")] if resid_mid else [])
        out += [Site(layer, "mlp_out"), Site(layer, "resid_post")]
    return out


def parse_site(name: str, n_layers: int | None = None, n_heads: int | None = None, resid_mid: bool = True) -> Site:
    """Parse a TransformerLens name, a short name or a module site (``module:{path}:input|output``); check a
    table site against the model's shape if given (a module site is checked against the model by
    :meth:`inversionview.probed.ProbedModel.site`)."""
    name = str(name).strip()
    if name.startswith(MODULE + ":"):
        m = _MODULE.match(name)
        if not m:
            raise UserError(
                f"malformed module site {name!r}: expected 'module:<dotted.module.path>:input' or "
                "'module:<dotted.module.path>:output', e.g. 'module:transformer.h.0.mlp:output'"
            )
        return Site.module(m.group(1), m.group(2))
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
    known = all_sites(n_layers, n_heads, resid_mid) if n_layers is not None and n_heads is not None else None
    if site is None or (known is not None and site not in known):
        raise UserError(_unknown(name, known))
    return site


def _unknown(name: str, known: list[Site] | None) -> str:
    if not known:
        return (
            f"unknown site {name!r}: expected a TransformerLens name like 'blocks.1.attn.hook_result.0', "
            "a short name like 'a1.0', 'x0.mid', 'm1', or a module site like 'module:transformer.h.0.mlp:output'"
        )
    names = [s.short for s in known] + [s.name for s in known]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown site {name!r}{hint} (this model has {', '.join(s.short for s in known)})"
