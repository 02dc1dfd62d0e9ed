"""Character counting (the paper's first case study).

An input is ``B`` + a shuffle of 3 distinct letters with counts 1..9 + ``|`` + one of those letters +
``:`` + its count + ``E``, one character per token, at most 33 tokens. The user-facing text leaves out
``B`` and ``E``: ``vvzccvczvvvzvcvc|v:8``.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import string
from collections.abc import Hashable

from ..tokenizer import CharVocab
from .base import Task

LETTERS = string.ascii_lowercase
DIGITS = "123456789"


_TRIPLES = {
    n: [c for c in itertools.product(range(1, 10), repeat=3) if sum(c) == n] for n in range(3, 28)
}  # count triples by length
_P_COUNT = {(n, c): sum(t[0] == c for t in ts) / 729 for n, ts in _TRIPLES.items() for c in range(1, 10)}  # _p_count


def _p_count(n: int, count: int) -> float:
    """The probability that an input has n letters and its target ``count`` of them: the three counts are uniform
    over 1..9 and the target one of the three, so the count triples summing to n whose first is ``count``, over
    729 (the target's count is distributed as the first of the triple). From a table: a reading asks it for
    every draw of its finer strata."""
    return _P_COUNT.get((n, count), 0.0)


def _arrange(letters: list[str], counts: list[int], rng: random.Random) -> str:
    """The generator's input with these letters and counts: the letters shuffled, the target drawn among them."""
    seq = [c for c, n in zip(letters, counts) for _ in range(n)]
    rng.shuffle(seq)
    k = rng.randrange(3)
    return f"{''.join(seq)}|{letters[k]}:{counts[k]}"


@functools.lru_cache(maxsize=2**18)
def _parse(text: str) -> tuple[str, str] | None:
    """:meth:`Counting.parse`."""
    head, sep, tail = text.partition("|")
    counts = {c: head.count(c) for c in set(head)}
    if (
        not sep
        or len(tail) < 3
        or tail[1] != ":"
        or len(counts) != 3
        or not set(head) <= set(LETTERS)
        or not all(1 <= n <= 9 for n in counts.values())
        or tail[0] not in counts
        or tail[2:] != str(counts[tail[0]])
    ):
        return None
    return head, tail[0]


class Counting(Task):
    name = "counting"
    vocab = CharVocab(tokens=("P", "B", "E", *LETTERS, "|", ":", *DIGITS), bos="B", eos="E", pad="P")
    sites = ("x0.pre", "a0.0", "x0.mid", "m0", "x0.post", "a1.0", "x1.mid", "m1", "x1.post")
    model = dict(n_layer=2, n_head=1, n_embd=64, n_inner=256, n_positions=33)
    recipe = dict(steps=8000, batch_size=128, lr=3e-3, aux=1.0)

    def generate(self, rng: random.Random) -> str:
        letters = rng.sample(LETTERS, 3)
        return _arrange(letters, [rng.randint(1, 9) for _ in letters], rng)

    def stratum(self, text: str) -> tuple[int, float] | None:
        """The number of letters and its probability: the generator draws three counts uniformly from 1..9, so a
        length n has probability (count triples summing to n) / 729, from 1/729 (3 and 27) to 61/729 (15). A
        preimage at the target character holds mostly inputs of the query's length (positions are part of the
        activations), and 8,192 generator draws meet few of a rare length's members."""
        p = self.parse(text)
        return None if p is None else (len(p[0]), len(_TRIPLES[len(p[0])]) / 729)

    def refine(self, text: str, level: int = 0) -> tuple[tuple, float] | None:
        """Finer strata inside the length, finest first (a reading draws a level coarser where the preimage leaks
        out of a level's strata). Level 0: the number of letters, the letters and the target, (n, letters sorted,
        target), probability P(n) / 7,800 (the letters are a uniform 3-subset of 26 with the target uniform among
        them, independent of the counts): a layer-0 preimage at the target character after the MLP keeps them.
        Level 1: the number of letters and the two letters that are not the target, (n, the two sorted),
        probability P(n) / 325 (24 third letters of 2,600 sets, times 1/3): head 0.0 there leaves the target's
        name free. Level 2: the number of letters, the target and its count, (n, target, count), probability
        P(n, count) / 26 (:func:`_p_count`): layer 1 there keeps the count and the target and renames the others.
        Level 3: the number of letters and the target's count, (n, count), probability P(n, count): where layer 1
        also lets the target's name go."""
        p = self.parse(text)
        if p is None or level > 3:
            return None
        head, target = p
        n = len(head)
        if level == 3:
            key: tuple = (n, head.count(target))
        elif level == 2:
            key = (n, target, head.count(target))
        elif level == 1:
            key = (n, "".join(sorted(set(head) - {target})))
        else:
            key = (n, "".join(sorted(set(head))), target)
        return key, self._prob(key)

    def around(self, key) -> list[tuple[Hashable, float]]:
        """The finer strata one letter more or fewer away: the length one more or one fewer, and where the stratum
        keeps the target's count (levels 2 and 3), the letter added or taken away may be the target's, so that
        count goes with it (a layer-1 preimage at the target letter spreads over its neighbouring counts too)."""
        out: list[tuple[Hashable, float]] = []
        counted = isinstance(key[-1], int)
        for m in (key[0] - 1, key[0] + 1):
            for c in (key[-1], key[-1] + m - key[0]) if counted else (None,):
                k = (m, *key[1:-1], c) if counted else (m, *key[1:])
                out += [(k, p)] if m in _TRIPLES and (p := self._prob(k)) > 0 else []
        return out

    @staticmethod
    def _prob(key: tuple) -> float:
        """A finer stratum's probability (:meth:`refine`)."""
        if isinstance(key[-1], int):
            return _p_count(key[0], key[-1]) / (26 if len(key) == 3 else 1)
        return len(_TRIPLES[key[0]]) / 729 / (7800 if len(key) == 3 else 325)

    def generate_in(self, key, rng: random.Random) -> str:
        """A generator draw in the stratum ``key``: with ``key`` letters (:meth:`stratum`), the count triple uniform
        among those summing to ``key``; or in a finer stratum (:meth:`refine`), the letters uniform given the
        stratum's (level 1: a third letter, the target, among the other 24; level 2: two other letters than the
        target; level 3: the target uniform, then two others), the count triple uniform among those summing to n
        (levels 2 and 3: with the target's count), given to the letters in order, shuffled."""
        if not isinstance(key, tuple):
            return _arrange(rng.sample(LETTERS, 3), list(rng.choice(_TRIPLES[key])), rng)
        if isinstance(key[-1], int):
            n, c = key[0], key[-1]
            target = key[1] if len(key) == 3 else rng.choice(LETTERS)
            letters = target + "".join(rng.sample([x for x in LETTERS if x != target], 2))
            counts = rng.choice([t for t in _TRIPLES[n] if t[0] == c])
        elif len(key) == 2:
            n, others = key
            target = rng.choice([c for c in LETTERS if c not in others])
            letters, counts = others + target, rng.choice(_TRIPLES[n])
        else:
            n, letters, target = key
            counts = rng.choice(_TRIPLES[n])
        seq = [x for x, k in zip(letters, counts) for _ in range(k)]
        rng.shuffle(seq)
        return f"{''.join(seq)}|{target}:{counts[letters.index(target)]}"

    def positions(self, text: str) -> list[int]:
        """The target character (after ``|``) and the ``:``; +1 for BOS."""
        bar = text.index("|")
        return [bar + 2, bar + 3]

    def answer_positions(self, text: str) -> list[int]:
        return [text.index(":") + 2]

    @staticmethod
    def parse(text: str) -> tuple[str, str] | None:
        """``(letters, target)`` of an input the generator can produce; None otherwise. Remembered for the last
        2**18 texts: a rare reading asks it of its hundred thousand draws several times over."""
        return _parse(text)

    def propose(self, text: str, rng: random.Random) -> str | None:
        """One of five moves, each reversible with respect to the generator (which draws the counts uniformly and
        the order uniformly given them, so p(x) is proportional to n1! n2! n3! / n! at a fixed length n): swap two
        positions; move the target to another of the three letters; rename a letter to one not present; re-draw
        one letter's count from 1..9 and its places among the other letters (the generator's conditional given the
        others' order); or recolour one place of a letter (drawn uniformly among its n2 places) as another letter
        present, keeping the length: p(y)/p(x) = (n1 + 1)/n2 and the reverse move has probability 1/(n1 + 1), so
        the Hastings ratio is 1. The last is the only move that changes the counts but not the length, where a
        preimage fixes the length (positions) but not the counts."""
        p = self.parse(text)
        if p is None:
            return None
        head, target = p
        letters = sorted(set(head))
        move = rng.randrange(5)
        if move == 0:
            s = list(head)
            i, j = rng.randrange(len(s)), rng.randrange(len(s))
            s[i], s[j] = s[j], s[i]
            head = "".join(s)
        elif move == 1:
            target = rng.choice([c for c in letters if c != target])
        elif move == 2:
            old, new = rng.choice(letters), rng.choice([c for c in LETTERS if c not in letters])
            head, target = head.replace(old, new), new if target == old else target
        elif move == 3:
            c, k = rng.choice(letters), rng.randint(1, 9)
            rest = [x for x in head if x != c]
            at = set(rng.sample(range(len(rest) + k), k))
            it = iter(rest)
            head = "".join(c if i in at else next(it) for i in range(len(rest) + k))
        else:
            new, old = rng.sample(letters, 2)
            if head.count(old) > 1 and head.count(new) < 9:  # else stay: counts are 1..9
                i = rng.choice([i for i, x in enumerate(head) if x == old])
                head = f"{head[:i]}{new}{head[i + 1 :]}"
        return f"{head}|{target}:{head.count(target)}"

    def weight(self, text: str) -> float:
        """n1! n2! n3! / n!: the generator draws the letters, the counts and the target uniformly and the order
        uniformly given the counts, so an input's probability is this times a constant."""
        head = text.partition("|")[0]
        counts = [head.count(c) for c in set(head)]
        return math.prod(math.factorial(k) for k in counts) / math.factorial(len(head))

    def block(self, text: str, rng: random.Random) -> list[str] | None:
        """Half the time the three choices of the target letter; otherwise one letter (of three) under each of
        its 24 possible names (itself and every letter that is not one of the other two)."""
        p = self.parse(text)
        if p is None:
            return None
        head, target = p
        letters = sorted(set(head))
        if rng.random() < 0.5:
            return [f"{head}|{t}:{head.count(t)}" for t in letters]
        old = rng.choice(letters)
        names = [c for c in LETTERS if c == old or c not in letters]
        return [f"{head.replace(old, c)}|{c if target == old else target}:{head.count(target)}" for c in names]

    def annotate(self, text: str) -> str | None:
        """The true count of the target letter, e.g. ``count=8``."""
        head, sep, tail = text.partition("|")
        if not sep or len(tail) < 1 or not head.isalpha() or tail[0] not in LETTERS:
            return None
        return f"count={head.count(tail[0])}"
