"""Progress of a long loop: a tqdm bar on a terminal, plain log lines elsewhere.

A bar redrawn with carriage returns is unreadable in a redirected log (the whole run becomes one ``\\r``-joined
line), so :class:`Progress` draws one only where standard error is a terminal; otherwise it logs a plain line
(``train: 200/1000 steps (20%), loss=2.113``) at most every :data:`EVERY` seconds, and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("inversionview.progress")

EVERY = 30.0
"""Seconds between two plain progress lines where standard error is not a terminal."""


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (standard error by default) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """``total`` steps of ``unit`` from ``initial``: a tqdm bar on a terminal, plain lines (every :data:`EVERY`
    seconds and at :meth:`close`) elsewhere, nothing where ``enabled`` is False."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled, self.tty = enabled, enabled and on_terminal()
        self.postfix: dict[str, str] = {}
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= EVERY:
            self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = {k: str(v) for k, v in kw.items()}
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def write(self, line: str) -> None:
        """A line of its own (an evaluation's result): above the bar on a terminal, else printed as it is."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        of = f"/{self.total}" if self.total else ""
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        extra = ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) if self.postfix else ""
        log.info("%s: %d%s %ss%s%s", self.desc, self.n, of, self.unit, pct, extra)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
