"""User-facing errors.

Every mistake a user can make (a bad site name, a position out of range, a corrupt checkpoint, ...)
raises :class:`UserError` with a one-line message naming what was wrong and what is expected. The
command line prints that line and exits with status 2; it never shows a traceback for these.
"""


class UserError(Exception):
    """A problem with the user's input, files or configuration (exit status 2 on the command line)."""
