"""inversionview: read the information held in a neural network's activations (InversionView, Huang et al. 2024).

>>> from inversionview import InversionView
>>> iv = InversionView.load("shipped:counting")
>>> iv.query("vvzccvczvvvzvcvc|v:8", site="a1.0", position=":").show()

The names that need torch (``InversionView``, ``Preimage``, ``ProbedModel``, ...) are imported on first use, so
that ``import inversionview`` and the command line's ``--help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__
from .errors import UserError
from .sites import Site, parse_site

if TYPE_CHECKING:
    from .preimage import Preimage, Sample
    from .probed import ProbedModel
    from .run import InversionView

__all__ = ["InversionView", "Preimage", "ProbedModel", "Sample", "Site", "UserError", "parse_site"]

LAZY = {"InversionView": ".run", "Preimage": ".preimage", "Sample": ".preimage", "ProbedModel": ".probed"}
"""Public names imported from their module (which imports torch) on first access."""


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(LAZY[name], __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
