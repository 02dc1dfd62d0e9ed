"""Presentation: the terminal view and the self-contained HTML report of a :class:`~inversionview.preimage.Preimage`."""
