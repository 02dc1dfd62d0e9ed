"""Character counting (the paper's first case study).

An input is ``B`` + a shuffle of 3 distinct letters with counts 1..9 + ``|`` + one of those letters +
``:`` + its count + ``E``, one character per token, at most 33 tokens. The user-facing text leaves out
``B`` and ``E``: ``vvzccvczvvvzvcvc|v:8``.
"""

from __future__ import annotations

import random
import string

from ..tokenizer import CharVocab
from . import Task

LETTERS = string.ascii_lowercase
DIGITS = "123456789"


class Counting(Task):
    name = "counting"
    vocab = CharVocab(tokens=("P", "B", "E", *LETTERS, "|", ":", *DIGITS), bos="B", eos="E", pad="P")
    sites = ("x0.pre", "a0.0", "x0.mid", "m0", "x0.post", "a1.0", "x1.mid", "m1", "x1.post")
    model = dict(n_layer=2, n_head=1, n_embd=64, n_inner=256, n_positions=33)
    recipe = dict(steps=8000, batch_size=128, lr=3e-3, aux=1.0)

    def generate(self, rng: random.Random) -> str:
        letters = rng.sample(LETTERS, 3)
        counts = [rng.randint(1, 9) for _ in letters]
        seq = [c for c, n in zip(letters, counts) for _ in range(n)]
        rng.shuffle(seq)
        k = rng.randrange(3)
        return f"{''.join(seq)}|{letters[k]}:{counts[k]}"

    def positions(self, text: str) -> list[int]:
        """The target character (after ``|``) and the ``:``; +1 for BOS."""
        bar = text.index("|")
        return [bar + 2, bar + 3]

    def answer_positions(self, text: str) -> list[int]:
        return [text.index(":") + 2]

    def annotate(self, text: str) -> str | None:
        """The true count of the target letter, e.g. ``count=8``."""
        head, sep, tail = text.partition("|")
        if not sep or len(tail) < 1 or not head.isalpha() or tail[0] not in LETTERS:
            return None
        return f"count={head.count(tail[0])}"
