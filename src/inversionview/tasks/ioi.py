"""Indirect object identification (IOI) on GPT-2 small (the paper's third case study, METHOD.md §6).

An input is one sentence from the templates of Wang et al. (2022), "Interpretability in the Wild", with two
names, a place and an object filled in, ending with the indirect object (IO)::

    BABA: "Then, John and Mary went to the store. John gave a drink to Mary"
    ABBA: "Then, Mary and John went to the store. John gave a drink to Mary"

The subject S is named twice (S1 in the first clause, S2 in the second); the IO is named in the first
clause and at the end. Every name is a single GPT-2 token with its leading space (" Mary"), so names take
one position each. Inputs are tokenized with GPT-2's own tokenizer (``tokenizer = "gpt2"``), BOS
(``<|endoftext|>``) at position 0 and no EOS.

Query positions (the paper's): **end**, the last token before the final IO name (``" to"``, where GPT-2
predicts the IO), and **S2**, the second mention of the subject. :meth:`Ioi.token_positions` gives these
and the others (S1, IO).

There is no probed model to train: the probed model is GPT-2 small itself (``inversionview init ioi-gpt2-small``).
"""

from __future__ import annotations

import random
import re

from ..errors import UserError
from .base import Task

# Wang et al.'s IOI templates, in BABA order ([B] = S is named first); the ABBA versions swap the first
# clause's two names. [A] is the indirect object, [B] the subject.
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
ABBA_TEMPLATES = tuple(t.replace("[B] and [A]", "[A] and [B]", 1) for t in BABA_TEMPLATES)

# Common first names, each a single GPT-2 token with its leading space (tests/test_ioi.py checks it).
NAMES = (
    "Michael",
    "Christopher",
    "Jessica",
    "Matthew",
    "Ashley",
    "Jennifer",
    "Joshua",
    "Amanda",
    "Daniel",
    "David",
    "James",
    "Robert",
    "John",
    "Joseph",
    "Andrew",
    "Ryan",
    "Brandon",
    "Jason",
    "Justin",
    "Sarah",
    "William",
    "Jonathan",
    "Stephanie",
    "Brian",
    "Nicole",
    "Nicholas",
    "Anthony",
    "Heather",
    "Eric",
    "Elizabeth",
    "Adam",
    "Megan",
    "Melissa",
    "Kevin",
    "Steven",
    "Thomas",
    "Timothy",
    "Christina",
    "Kyle",
    "Rachel",
    "Laura",
    "Lauren",
    "Amber",
    "Brittany",
    "Danielle",
    "Richard",
    "Kimberly",
    "Jeffrey",
    "Amy",
    "Crystal",
    "Michelle",
    "Tiffany",
    "Jeremy",
    "Benjamin",
    "Mark",
    "Emily",
    "Aaron",
    "Charles",
    "Rebecca",
    "Jacob",
    "Stephen",
    "Patrick",
    "Sean",
    "Erin",
    "Jamie",
    "Kelly",
    "Samantha",
    "Nathan",
    "Sara",
    "Dustin",
    "Paul",
    "Angela",
    "Tyler",
    "Scott",
    "Katherine",
    "Andrea",
    "Gregory",
    "Erica",
    "Mary",
    "Travis",
    "Lisa",
    "Kenneth",
    "Bryan",
    "Lindsey",
    "Kristen",
    "Jose",
    "Alexander",
    "Jesse",
    "Katie",
    "Lindsay",
    "Shannon",
    "Vanessa",
    "Courtney",
    "Christine",
    "Alicia",
    "Cody",
    "Allison",
    "Bradley",
    "Samuel",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
_NAME_SET = frozenset(NAMES)
_WORD = re.compile(r"[A-Za-z]+")

# The paper's head sites (name mover 9.9, duplicate-token head 0.1, induction head 5.5) and other heads of the
# Wang et al. circuit: duplicate token 3.0, previous token 2.2 and 4.11, induction 6.9, S-inhibition 7.3, 7.9,
# 8.6 and 8.10, name movers 9.6 and 10.0, negative name mover 10.7.
SITES = (
    "a0.1",
    "a3.0",
    "a2.2",
    "a4.11",
    "a5.5",
    "a6.9",
    "a7.3",
    "a7.9",
    "a8.6",
    "a8.10",
    "a9.9",
    "a9.6",
    "a10.0",
    "a10.7",
)


def parse(text: str) -> dict | None:
    """The roles of an IOI sentence: ``{"IO", "S", "order"}`` (order "ABBA" or "BABA"), or None if the text
    is not one. A sentence ends with the IO (the templates' form) or just before it (a prompt): its names are
    IO and S in some order, then S, then (if present) IO, and nothing else is a name from :data:`NAMES`."""
    words = _WORD.findall(text)
    names = [w for w in words if w in _NAME_SET]
    if len(names) == 4 and words and words[-1] == names[-1]:
        io, s = names[3], names[2]
    elif len(names) == 3:
        s = names[2]
        io = names[0] if names[1] == s else names[1]
    else:
        return None
    if io == s or {names[0], names[1]} != {io, s}:
        return None
    return {"IO": io, "S": s, "order": "ABBA" if names[0] == io else "BABA"}


class Ioi(Task):
    name = "ioi"
    tokenizer_name = "gpt2"
    sites = SITES
    model = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)  # GPT-2 small (pretrained, not trained here)

    @property
    def vocab(self):
        """GPT-2's tokenizer (the task has no character vocabulary)."""
        return self.tokenizer()

    @property
    def recipe(self) -> dict:
        # `inversionview train-probed ioi` reads this first: refuse it with one line
        raise UserError(
            "the ioi task's probed model is the pretrained GPT-2 small: there is no probed model to train; "
            "train a decoder for it with `inversionview init ioi-gpt2-small > ioi.toml; inversionview train ioi.toml`"
        )

    def generate(self, rng: random.Random) -> str:
        template = rng.choice(ABBA_TEMPLATES if rng.random() < 0.5 else BABA_TEMPLATES)
        io, s = rng.sample(NAMES, 2)
        return (
            template.replace("[PLACE]", rng.choice(PLACES))
            .replace("[OBJECT]", rng.choice(OBJECTS))
            .replace("[A]", io)
            .replace("[B]", s)
        )

    def token_positions(self, text: str) -> dict[str, int]:
        """Token positions (BOS = 0, GPT-2 tokens) of S1, IO (its first mention), S2 and end (the token before the
        final IO name; the last token of a prompt that stops before it)."""
        roles = parse(text)
        if roles is None:
            raise UserError(f"not an IOI sentence (two names, the subject repeated): {text!r}")
        tok = self.tokenizer()
        ids = tok.encode(text)
        s_ids, io_ids = (tok.tok.encode(" " + roles[k], add_special_tokens=False) for k in ("S", "IO"))
        s_at = [i for i, t in enumerate(ids) if [t] == s_ids]
        io_at = [i for i, t in enumerate(ids) if [t] == io_ids]
        ends_with_io = [ids[-1]] == io_ids
        if len(s_at) != 2 or len(io_at) != 1 + ends_with_io:
            raise UserError(f"the names of {text!r} are not single GPT-2 tokens with a leading space")
        return {"S1": s_at[0], "IO": io_at[0], "S2": s_at[1], "end": len(ids) - (2 if ends_with_io else 1)}

    def positions(self, text: str) -> list[int]:
        """The end position and S2 (the paper's IOI query positions)."""
        p = self.token_positions(text)
        return [p["end"], p["S2"]]

    def answer_positions(self, text: str) -> list[int]:
        """The final IO name (GPT-2 predicts it at the end position)."""
        return [self.token_positions(text)["end"] + 1]

    def annotate(self, text: str) -> str | None:
        """The sentence's roles, e.g. ``IO=Mary S=John``; None if it is not an IOI sentence."""
        roles = parse(text)
        return None if roles is None else f"IO={roles['IO']} S={roles['S']}"
