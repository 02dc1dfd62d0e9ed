"""What every file inversionview writes for later carries: a format version, and fingerprints that tie it to
what it was made from.

Versions. ``run.json``, the decoder's ``config.json`` and ``checkpoint.pt`` hold a ``format_version`` (the
readings DB holds its ``schema_version`` in its ``meta`` table). A reader refuses a file of a newer version than
it knows, with one line naming the file and saying to upgrade, and refuses fields it does not know (a file
edited by hand, or written by another version): ignoring them could read a file the wrong way. A file with no
version predates versioning (version 0) and is read as before.

Fingerprints. :func:`weights_fingerprint` hashes named tensors (a probed model's weights; a decoder's, with
the run it belongs to). :func:`probed_fingerprint` ties a probed model's weights to the activation mode and
dtype a decoder was trained on: ``run.json`` records it, so a decoder is refused for another model and for the
same model read another way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import UserError

RUN_FORMAT = 1
"""``run.json``: 1 adds ``format_version`` and ``provenance``, and its fingerprint covers the mode and dtype."""
DECODER_FORMAT = 1
"""The decoder's ``config.json``."""
CHECKPOINT_FORMAT = 1
"""``checkpoint.pt``: ``{format_version, state, optimizer, model}``."""


def check_version(found, current: int, path) -> int:
    """The format version of the file at ``path`` (0 for none), refusing a newer or malformed one."""
    if found is None:
        return 0
    if isinstance(found, bool) or not isinstance(found, int) or found < 0:
        raise UserError(f"{path} is corrupt: its format_version is {found!r}, expected a whole number")
    if found > current:
        from ._version import __version__

        raise UserError(
            f"{path} has format_version {found}, newer than this inversionview ({__version__}) reads "
            f"({current}): upgrade inversionview to read it"
        )
    return found


def check_fields(d: Mapping, known: Iterable[str], path) -> None:
    """Refuse fields of a file that this version does not know."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(
            f"{path} has unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: it was "
            "edited or written by another version of inversionview; remove them or use that version"
        )


def weights_fingerprint(tensors: Mapping, context: list | None = None) -> str:
    """A 16-hex-digit hash of named tensors (in float32, so it does not depend on the device), preceded by the
    JSON of ``context`` if given."""
    import torch

    h = hashlib.sha256(json.dumps(context).encode()) if context is not None else hashlib.sha256()
    for name, p in sorted(tensors.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def probed_fingerprint(weights: str, mode: str, dtype: str) -> str:
    """What a decoder reads: the probed model's weights fingerprint, its activation mode and its dtype."""
    return hashlib.sha256(json.dumps(["probed", weights, mode, dtype]).encode()).hexdigest()[:16]


def plain_mode(path: Path) -> None:
    """Give ``path`` the mode a plain new file gets (0644 under the usual umask 022), as the run's other files have:
    safetensors writes its files for the owner alone (0600)."""
    import os

    mask = os.umask(0o022)  # Python reads the umask only by setting it: put it back at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
