"""The task interface: what a built-in or a user's own task gives the trainer and the readings."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable

from ..tokenizer import CharVocab


class Task:
    """A task: a vocabulary, a seeded input generator with a fixed train/test split, the positions the paper
    queried, and the answer tokens the probed model is trained on.

    The toy tasks have a character vocabulary (``vocab``); a task on a pretrained model names its tokenizer
    instead (IOI: ``tokenizer_name = "gpt2"``), and :meth:`tokenizer` gives whichever it has: positions are
    token indices in that tokenizer's encoding."""

    name: str
    vocab: CharVocab
    tokenizer_name: str | None = None  # a built-in tokenizer (inversionview.tokenizer.TOKENIZERS) instead of vocab
    sites: tuple[str, ...]  # the paper's sites for this task
    model: dict  # GPT2Config fields of the paper's probed model
    test_fraction = 0.1
    blocks = 0.1  # the share of a reading's chain moves that are Gibbs blocks (:meth:`block`; explore._proposal)
    draws = 8192  # generator draws a reading verifies per query at most, before its chains (explore._draw_inside)

    @property
    def recipe(self) -> dict:
        """train_probed settings that reach the paper's accuracy on CPU (a task sets its own; none by default)."""
        return {}

    def tokenizer(self):
        """The tokenizer the task's positions are counted in: its named tokenizer, else its character vocabulary."""
        if self.tokenizer_name:
            from ..tokenizer import named_tokenizer

            return named_tokenizer(self.tokenizer_name)
        return self.vocab

    def generate(self, rng: random.Random) -> str:
        raise NotImplementedError

    def sample(self, rng: random.Random, split: str = "train") -> str:
        """A random input from one side of the split. The split is a hash of the text, so it is fixed
        whatever the seed."""
        while True:
            text = self.generate(rng)
            if self.is_test(text) == (split == "test"):
                return text

    def is_test(self, text: str) -> bool:
        return hashlib.sha1(text.encode()).digest()[0] < 256 * self.test_fraction

    def positions(self, text: str) -> list[int]:
        """Query positions (token indices, BOS = 0) the task's rule allows for this input."""
        raise NotImplementedError

    def answer_positions(self, text: str) -> list[int]:
        """Token indices of the answer: the probed model's loss and accuracy are taken on these."""
        raise NotImplementedError

    def annotate(self, text: str) -> str | None:
        """A short task-specific reading of any input (e.g. its true count); None if it is malformed."""
        return None

    def propose(self, text: str, rng: random.Random) -> str | None:
        """A random local move from a valid input, reversible with respect to the generator's distribution p:
        p(x) K(x -> y) = p(y) K(y -> x). Each move re-draws one part of the input from the generator (given the
        rest) or swaps parts of equal probability, so a Metropolis-Hastings chain whose target is p restricted to
        a preimage accepts a move exactly when the probed model puts it inside (:mod:`inversionview.explore`).
        None where the text is not an input the generator can produce, or the task defines no moves."""
        return None

    def weight(self, text: str) -> float:
        """The generator's probability of a valid input, up to a factor that is the same for every input: the
        members a reading met are weighted by it (:mod:`inversionview.explore`). Uniform unless a task says."""
        return 1.0

    def block(self, text: str, rng: random.Random) -> list[str] | None:
        """A random Gibbs block around a valid input: ``text`` and its alternatives in one part of the input (e.g.
        every letter one letter could be renamed to), all equally probable under the generator, and such that from
        any member of the block the same block is drawn with the same probability. A chain that moves to a member
        of the block drawn uniformly among those inside epsilon then keeps its target distribution, and mixes along
        that part in one step (:mod:`inversionview.explore`). None where the task defines no blocks."""
        return None

    def stratum(self, text: str) -> tuple[Hashable, float] | None:
        """The stratum of a valid input under the generator (a part of the input space the generator can draw in
        alone, :meth:`generate_in`) and the stratum's probability. A reading draws apart in the strata of the
        members and near misses it knows, and weighs each stratum by its probability and the share of its draws
        inside (:mod:`inversionview.explore`): a preimage whose members lie in strata the generator rarely draws
        (counting: inputs of one length) gets enough exact starts, and a share that varies between strata rests on
        each stratum's draws. None where the task defines no strata."""
        return None

    def refine(self, text: str, level: int = 0) -> tuple[Hashable, float] | None:
        """A finer stratum of a valid input, inside its :meth:`stratum`, and its probability; :meth:`generate_in`
        draws in it too. ``level`` 0 is the finest (counting: its length, letters and target); each level's stratum
        lies inside the next one's (counting's level 1: its length and the two letters that are not the target), and
        past the coarsest it is None. Where few draws of the coarse strata land inside (a preimage that keeps what
        the generator rarely draws), a reading draws in the finest strata of its members and near misses and in those
        :meth:`around` them that hold members, and weighs each by its probability; where the preimage leaks out of
        them, it draws a level coarser (:mod:`inversionview.explore`). None where the task defines none."""
        return None

    def around(self, key: Hashable) -> list[tuple[Hashable, float]]:
        """The finer strata next to the finer stratum ``key`` (:meth:`refine`; counting: one letter more or fewer),
        with their probabilities."""
        return []

    def generate_in(self, key: Hashable, rng: random.Random) -> str:
        """A draw from the generator conditioned on the stratum ``key`` (:meth:`stratum` or :meth:`refine`)."""
        raise NotImplementedError

    def neighbours(self, text: str) -> list[str]:
        """Every input one part away from a valid input (each member of each :meth:`block` around it, and its
        :meth:`relatives`): a reading closes a small preimage by verifying the neighbours of its members
        (:mod:`inversionview.explore`). Empty where the task defines none."""
        return []

    def kin(self, text: str) -> list[str]:
        """The inputs that keep what the task's answer is read from, all else free (addition: every input whose sum
        has the digits of ``text``'s sum but the last, 2,000-8,000 inputs): a member of a small preimage may be
        many parts away from every other member, and from every input near the preimage. A reading that met few
        members verifies their kin before it closes them (:mod:`inversionview.explore`). Empty where the task
        defines none."""
        return []

    def relatives(self, text: str) -> list[str]:
        """The other inputs a symmetry of the generator maps a valid input to: equally probable, and holding the
        same parts up to that symmetry (addition: the operands' digits swapped column by column). Where a reading's
        chains have met most of their part of the preimage, it verifies the relatives of the members met
        (:mod:`inversionview.explore`): a preimage that keeps only what the symmetry keeps falls apart into pieces
        no local move connects. Empty where the task defines none."""
        return []
