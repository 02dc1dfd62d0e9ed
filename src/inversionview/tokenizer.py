"""Tokenizers for probed models: a character-level vocabulary described in a config, or an HF tokenizer.

Both expose the same small interface: ``encode`` (text -> ids, with BOS and, where the vocabulary has
one, EOS), ``tokens`` (ids -> token strings), ``text`` (ids -> the user-facing text), ``round_trips`` (whether
ids are what ``encode`` gives for their text: a reading keeps only such samples, so that the text it shows is the
input it scored) and the ids of the special tokens. Positions are always counted in tokens, BOS being position 0.

``appends_eos`` says whether ``encode`` ends an input with EOS (a character vocabulary does; an HF
tokenizer does not). Where it does not, the decoder still learns to end its samples: its training target
is the input followed by ``eos_id``, and the EOS it samples is dropped before the probed model re-runs a
sample (see :mod:`inversionview.train` and :mod:`inversionview.preimage`).

Named tokenizers (``[probed] tokenizer = "gpt2"`` in a config) are built offline from files shipped in this
package: ``"gpt2"`` is GPT-2's byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256 as BOS, EOS and PAD),
``transformers.GPT2Tokenizer`` (the fast tokenizer, which transformers 5 also names ``GPT2TokenizerFast``) over
GPT-2's ``vocab.json`` and ``merges.txt`` (in ``tokenizer_data/gpt2``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class CharVocab:
    """A character-level vocabulary: an ordered list of tokens (index = token id), with BOS, EOS and PAD named.

    Example (the counting task): ``CharVocab(tokens=("P", "B", "E", "a", ...), bos="B", eos="E", pad="P")``.
    """

    tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)  # token -> id, set by __post_init__
    _chars: dict[str, int] = field(init=False, repr=False, compare=False)  # an input's characters -> id (no special)

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if len(set(self.tokens)) != len(self.tokens):
            raise UserError("vocabulary has duplicate tokens: every token must appear once")
        for role in ("bos", "eos", "pad"):
            if getattr(self, role) not in self.tokens:
                raise UserError(f"vocabulary {role} token {getattr(self, role)!r} is not in its token list")
        bad = [t for t in self.tokens if len(t) != 1 and t not in (self.bos, self.eos, self.pad)]
        if bad:
            raise UserError(f"character vocabulary tokens must be single characters, got {bad[:3]}")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})
        special = (self.bos, self.eos, self.pad)
        object.__setattr__(self, "_chars", {t: i for t, i in self._index.items() if t not in special})

    @classmethod
    def from_dict(cls, d: dict) -> "CharVocab":
        try:
            return cls(tokens=tuple(d["tokens"]), bos=d["bos"], eos=d["eos"], pad=d["pad"])
        except KeyError as e:
            raise UserError(f"vocabulary is missing the field {e.args[0]!r}: expected tokens, bos, eos, pad") from None
        except TypeError:
            raise UserError("vocabulary must be a table with tokens (a list), bos, eos and pad") from None

    def to_dict(self) -> dict:
        return {k: (list(v) if k == "tokens" else v) for k, v in asdict(self).items() if not k.startswith("_")}

    appends_eos = True

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int:
        return self._index[self.bos]

    @property
    def eos_id(self) -> int:
        return self._index[self.eos]

    @property
    def pad_id(self) -> int:
        return self._index[self.pad]

    def encode(self, text: str) -> list[int]:
        chars = self._chars
        try:
            return [self._index[self.bos], *(chars[ch] for ch in text), self._index[self.eos]]
        except KeyError:  # the first character outside the vocabulary (or a special token's), in one line
            i, ch = next((i, ch) for i, ch in enumerate(text) if ch not in chars)
            raise UserError(
                f"character {ch!r} at index {i} of {text!r} is not in the vocabulary "
                f"(expected characters from {''.join(chars)!r})"
            ) from None

    def tokens_of(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def text(self, ids) -> str:
        special = (self.bos_id, self.eos_id, self.pad_id)
        return "".join(self.tokens[int(i)] for i in ids if int(i) not in special)

    def round_trips(self, ids) -> bool:
        """Whether ``ids`` are what :meth:`encode` gives for their :meth:`text`, the EOS that ends them aside (no
        distance is taken there): BOS first, then no special token (a BOS, EOS or PAD inside would vanish from the
        text, and the text a user copies would be another input)."""
        ids = [int(i) for i in ids]
        body = ids[1:-1] if len(ids) > 1 and ids[-1] == self.eos_id else ids[1:]
        special = {self.bos_id, self.eos_id, self.pad_id}
        return bool(ids) and ids[0] == self.bos_id and not special.intersection(body)


class HFTokenizer:
    """A ``transformers`` tokenizer: BOS is prepended where the tokenizer has one; no EOS is appended.

    ``name`` is the name of a built-in tokenizer (``"gpt2"``), None for one loaded from a model's files."""

    appends_eos = False

    def __init__(self, tok, name: str | None = None):
        self.tok = tok
        self.name = name
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def tokens_of(self, ids) -> list[str]:
        return [self.tok.decode([int(i)]) for i in ids]

    def text(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in (self.bos_id, self.pad_id)])

    def round_trips(self, ids) -> bool:
        """Whether no special token that :meth:`text` leaves out stands inside ``ids`` (after the BOS; an ending
        EOS aside): a BOS or PAD inside vanishes from the text. A split the tokenizer would not make (``"h"
        "ello"``) is not caught here: an untrained decoder proposes little else, and dropping them would leave its
        readings empty (the sample is shown by its tokens as well as its text)."""
        ids = [int(i) for i in ids]
        start = 1 if self.bos_id is not None and ids[:1] == [self.bos_id] else 0
        body = ids[start:-1] if len(ids) > start and ids[-1] == self.eos_id else ids[start:]
        return not {self.bos_id, self.pad_id, self.eos_id}.intersection(body)

    def to_dict(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------- named tokenizers
GPT2_FILES = Path(__file__).parent / "tokenizer_data" / "gpt2"
"""GPT-2's ``vocab.json`` and ``merges.txt``, shipped in the package (OpenAI's files, MIT; see the README there)."""
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2's real byte-level BPE tokenizer: ``transformers.GPT2Tokenizer`` (= ``GPT2TokenizerFast``) built
    offline from the ``vocab.json`` and ``merges.txt`` in :data:`GPT2_FILES`. ``<|endoftext|>`` (50256) is BOS, EOS
    and PAD; ``encode`` prepends it and appends nothing, as GPT-2's HF tokenizer with a BOS does."""
    from transformers import GPT2Tokenizer  # transformers 5 resolves GPT2TokenizerFast to this same class

    try:
        tok = GPT2Tokenizer.from_pretrained(str(GPT2_FILES), model_max_length=1024)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"could not read GPT-2's vocabulary from {GPT2_FILES}: {str(e).splitlines()[0]} (reinstall inversionview)"
        ) from None
    if len(tok) != GPT2_VOCAB_SIZE or tok.bos_token_id != GPT2_VOCAB_SIZE - 1:
        raise UserError(
            f"the GPT-2 vocabulary in {GPT2_FILES} has {len(tok)} tokens, expected {GPT2_VOCAB_SIZE} "
            f"with {GPT2_EOT} last: reinstall inversionview"
        )
    return HFTokenizer(tok, name="gpt2")


TOKENIZERS = {"gpt2": gpt2_tokenizer}
"""Built-in tokenizers, by the name a config gives in ``[probed] tokenizer``."""


def check_tokenizer_name(name: str) -> None:
    if name not in TOKENIZERS:
        raise UserError(
            f"unknown tokenizer {name!r}: expected one of {', '.join(TOKENIZERS)} (or leave it out to use "
            "the model directory's tokenizer files or a character vocabulary)"
        )


def named_tokenizer(name: str) -> HFTokenizer:
    """A built-in tokenizer by name (see :data:`TOKENIZERS`)."""
    check_tokenizer_name(name)
    return TOKENIZERS[name]()
