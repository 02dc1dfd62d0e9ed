"""3-digit addition (the paper's second case study).

An input is ``B a+b=c E`` with 100 <= a, b <= 999 and c = a + b written without leading zeros, one
character per token: 810,000 inputs in all. The user-facing text leaves out ``B`` and ``E``:
``123+456=579``. The paper queried ``=`` and the first three answer positions (A1, A2, A3).
"""

from __future__ import annotations

import functools
import random

from ..tokenizer import CharVocab
from .base import Task

DIGITS = "0123456789"


class Addition(Task):
    name = "addition"
    vocab = CharVocab(tokens=("P", "B", "E", *DIGITS, "+", "="), bos="B", eos="E", pad="P")
    sites = (
        "x0.pre",
        "a0.0",
        "a0.1",
        "a0.2",
        "a0.3",
        "x0.mid",
        "x0.post",
        "a1.0",
        "a1.1",
        "a1.2",
        "a1.3",
        "x1.mid",
        "x1.post",
    )
    model = dict(n_layer=2, n_head=4, n_embd=32, n_inner=128, n_positions=16)
    recipe = dict(steps=12000, batch_size=256, lr=3e-3, aux=0.0)
    # a preimage here often leaves one digit, or one column's pair at a fixed sum, free, and a chain crosses it in one
    # block: 60 % blocks against 10 % took the mean |FCR error| at x0.mid and a1.2 (32 queries x 2 seeds) from
    # 0.035 to 0.029 and the rows over 0.15 from 88 to 41 (counting's blocks, letter names, did worse at 60 %)
    blocks = 0.6
    # a preimage of 100 of the 810,000 inputs (head a0.2 keeps unordered digit pairs) gets about one draw in 8,192 and
    # its chains one start; with up to 65,536 draws (8 % of the inputs), on heads a0.2, a0.3 and a1.0-a1.3, 32
    # queries each: rows over 0.15 72 -> 17, mean |FCR error| 0.026 -> 0.021, the first reading at a site 0.99 ->
    # 1.16 s (1 thread). Counting keeps 8,192: its draws cost twice as much, and 65,536 took its first reading at
    # head a1.0 from 1.1 to 4.9 s with no measurable gain. Since small preimages are closed (explore._close), 32,768
    # read those six heads as well (mean 0.013 either way, max 0.139 either way, none over 0.15, the same recall)
    # and took the first reading of 156+247=403 at a1.0 from 2.7-3.3 to 2.1 s (2 threads, 2026-12-04)
    draws = 32768

    def generate(self, rng: random.Random) -> str:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"{a}+{b}={a + b}"

    def positions(self, text: str) -> list[int]:
        """``=`` and the answer positions A1, A2, A3 (+1 for BOS)."""
        eq = text.index("=") + 1
        return [eq, eq + 1, eq + 2, eq + 3]

    def answer_positions(self, text: str) -> list[int]:
        eq = text.index("=") + 1
        return list(range(eq + 1, len(text) + 1)) + [len(text) + 1]  # the digits of c, then EOS

    def annotate(self, text: str) -> str | None:
        """Whether the sample's sum is correct: ``sum ok`` or ``sum wrong``."""
        try:
            lhs, c = text.split("=")
            a, b = lhs.split("+")
            ok = int(a) + int(b) == int(c) and not c.startswith("0")
        except ValueError:
            return None
        return "sum ok" if ok else "sum wrong"

    @staticmethod
    def parse(text: str) -> tuple[int, int] | None:
        """``(a, b)`` of an input the generator can produce; None otherwise."""
        lhs, _, c = text.partition("=")
        a, _, b = lhs.partition("+")
        if not (a.isdigit() and b.isdigit() and len(a) == len(b) == 3 and a[0] != "0" and b[0] != "0"):
            return None
        return (int(a), int(b)) if c == str(int(a) + int(b)) else None

    def propose(self, text: str, rng: random.Random) -> str | None:
        """One of six moves, each reversible with respect to the generator (a and b uniform on 100..999):
        re-draw one digit; re-draw one column (both operands' digits at one place); swap the operands; re-draw
        one operand; move d from one operand to the other (keeping the sum); or re-draw one operand among the
        values that keep all of the sum's digits but its last one or two (uniform over a set that is the same from
        every member: symmetric). The last moves between a sum's carry patterns, e.g. 516+187=703 to 515+284=799,
        which single-digit moves cross only through inputs with another leading digit of the sum."""
        p = self.parse(text)
        if p is None:
            return None
        digits = [int(x) for x in f"{p[0]}{p[1]}"]
        move = rng.randrange(6)
        if move == 0:
            i = rng.randrange(6)
            digits[i] = rng.randint(1 if i % 3 == 0 else 0, 9)
        elif move == 1:
            i = rng.randrange(3)
            digits[i], digits[i + 3] = (rng.randint(1 if i == 0 else 0, 9) for _ in range(2))
        elif move == 2:
            digits = digits[3:] + digits[:3]
        elif move == 3:
            i = 3 * rng.randrange(2)
            digits[i : i + 3] = map(int, str(rng.randint(100, 999)))
        a, b = int("".join(map(str, digits[:3]))), int("".join(map(str, digits[3:])))
        if move == 4:
            d = rng.choice((-1, 1)) * rng.randint(1, 899)
            a, b = (a + d, b - d) if 100 <= a + d <= 999 and 100 <= b - d <= 999 else (a, b)
        elif move == 5:
            unit, keep = 10 ** rng.randint(1, 2), rng.randrange(2)  # keep: the operand that stays
            x, y = (a, b) if keep == 0 else (b, a)
            r = _same_leading(x, y, unit)
            y = rng.randint(r.start, r.stop - 1)
            a, b = (x, y) if keep == 0 else (y, x)
        return f"{a}+{b}={a + b}"

    def block(self, text: str, rng: random.Random) -> list[str] | None:
        """One of three kinds, each closed and of equally probable inputs: one of the six digits under each of its
        values (1-9 for a leading digit, else 0-9); one column (both operands' digits at one place) under every
        pair with the same column sum, which keeps a + b; or one operand under every value that keeps all of the
        sum's digits but its last (as the last of :meth:`propose`'s moves, which may also free the last two, but
        all at once). Ten alternatives at most each: a block's inputs are all verified."""
        p = self.parse(text)
        if p is None:
            return None
        u = rng.random()
        if u < 0.4:
            return _digit_block(*p, rng.randrange(6))
        if u < 0.8:
            return _column_block(*p, rng.randrange(3))
        return _leading_block(*p, 0 if rng.random() < 0.5 else 1)

    def neighbours(self, text: str) -> list[str]:
        """Every input in a block around ``text`` (:meth:`block`: each digit's values, each column's pairs with the
        same sum, each operand's values that keep the sum's leading digits) and its :meth:`relatives`: at most
        about 110 inputs, each one part of ``text`` away."""
        p = self.parse(text)
        if p is None:
            return []
        out = [y for i in range(6) for y in _digit_block(*p, i)]
        out += [y for i in range(3) for y in _column_block(*p, i)] + _leading_block(*p, 0) + _leading_block(*p, 1)
        return [y for y in dict.fromkeys(out + self.relatives(text)) if y != text]

    def relatives(self, text: str) -> list[str]:
        """The inputs with the operands' digits swapped in some of the columns (all three: the operands swapped),
        e.g. 294+381 gives 394+281, 284+391, 291+384, ...: 7 at most, fewer where a column holds equal digits.
        Each is as probable as ``text`` and has its sum. Head a0.2's preimages at the answer digits keep the
        unordered pairs of some columns and fall apart into such pieces: `294+381=675` has 174 members; its
        reading met 13, all in one piece, and their relatives are 37 members."""
        p = self.parse(text)
        if p is None:
            return []
        a, b = map(str, p)
        out = []
        for mask in range(1, 8):
            x = "".join(b[i] if mask >> i & 1 else a[i] for i in range(3))
            y = "".join(a[i] if mask >> i & 1 else b[i] for i in range(3))
            if x != a:
                out.append(f"{x}+{y}={int(x) + int(y)}")
        return list(dict.fromkeys(out))

    def kin(self, text: str) -> list[str]:
        """Every input whose sum keeps the digits of ``text``'s sum but the last, ``text`` included: from 2,055
        (sums 400-409) to 8,055 inputs (sums 1000-1009). `156+247=403` at head a1.0 and A1 has three members;
        the third, `264+136=400`, differs in five digits, and no input within 0.3 of the query lies on a path of
        one-part moves to it."""
        p = self.parse(text)
        return [] if p is None else list(_kin((p[0] + p[1]) // 10))

    def all_inputs(self):
        """Every input of the task, in order (810,000)."""
        for a in range(100, 1000):
            for b in range(100, 1000):
                yield f"{a}+{b}={a + b}"


@functools.lru_cache(maxsize=8)
def _kin(top: int) -> tuple[str, ...]:
    """The inputs whose sum s has s // 10 == top."""
    return tuple(
        _text(a, s - a) for s in range(10 * top, 10 * top + 10) for a in range(max(100, s - 999), min(999, s - 100) + 1)
    )


def _same_leading(x: int, y: int, unit: int) -> range:
    """The operands y' (100..999) for which x + y' keeps x + y's digits above ``unit``: the same set from each of
    its members, so a uniform draw from it is symmetric."""
    top = (x + y) // unit * unit
    return range(max(100, top - x), min(999, top + unit - 1 - x) + 1)


def _text(a: int, b: int) -> str:
    return f"{a}+{b}={a + b}"


def _digit_block(a: int, b: int, i: int) -> list[str]:
    """The inputs with the ``i``-th of the six digits (a's three, then b's) under each of its values."""
    s = f"{a}{b}"
    ts = [f"{s[:i]}{v}{s[i + 1 :]}" for v in range(1 if i % 3 == 0 else 0, 10)]
    return [_text(int(t[:3]), int(t[3:])) for t in ts]


def _column_block(a: int, b: int, i: int) -> list[str]:
    """The inputs with column ``i`` (both operands' digits at one place) under every pair with its sum."""
    s = f"{a}{b}"
    low, total = 1 if i == 0 else 0, int(s[i]) + int(s[i + 3])
    ts = [f"{s[:i]}{u}{s[i + 1 : i + 3]}{total - u}{s[i + 4 :]}" for u in range(low, 10) if low <= total - u <= 9]
    return [_text(int(t[:3]), int(t[3:])) for t in ts]


def _leading_block(a: int, b: int, which: int) -> list[str]:
    """The inputs with one operand (``which``: 0 for b, 1 for a) under every value that keeps the sum's digits but
    its last."""
    return (
        [_text(a, y) for y in _same_leading(a, b, 10)] if which == 0 else [_text(x, b) for x in _same_leading(b, a, 10)]
    )
