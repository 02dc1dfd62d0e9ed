"""The user's own code named in a config or on the command line as ``module:name`` (features, tasks)."""

from __future__ import annotations

import importlib
import os
import sys

from .errors import UserError


def load_object(spec: str, what: str):
    """The object ``name`` of ``module`` for ``spec`` = ``module:name``; the current directory is importable. Every
    failure is a one-line :class:`UserError` that names ``what`` was being loaded."""
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise UserError(f"{what} {spec!r}: expected module:name")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # an ImportError or anything the module raises at import
        raise UserError(f"cannot import {what} {spec!r}: {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj = getattr(m, name, None)
    if obj is None:
        raise UserError(f"cannot import {what} {spec!r}: module {mod!r} has no attribute {name!r}")
    return obj
