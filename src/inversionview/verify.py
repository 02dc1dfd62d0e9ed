"""Verification (METHOD.md §1, §4): the probed model re-runs inputs and measures their distance to a query activation.

The lowest layer of a reading: it knows the probed model and the distance, nothing of decoders, chains or
summaries. :func:`verify` takes the minimum distance over an input's positions (PAD and EOS excluded, BOS included)
with its arg-min; :func:`activations` yields a site's activations batch by batch, in batches of similar lengths;
:func:`counterfactuals` verifies members edited by the task's moves (a reading's checks).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from .probed import ProbedModel, distances


@torch.no_grad()
def verify(probed: ProbedModel, site, seqs: list[list[int]], zq: torch.Tensor, metric: str, batch: int = 1024):
    """Distances of candidate inputs to ``zq`` (d,) or (N, d) at ``site``.

    Returns ``(dmin (N,), argmin (N,), dist (N, T))`` with ``inf`` at PAD/EOS positions. The probed model
    runs in batches of similar lengths (:func:`activations`) and stops after the site's layer."""
    if not seqs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    dist = torch.full((len(seqs), max(map(len, seqs))), float("inf"))
    for rows, act, invalid in activations(probed, site, seqs, batch):
        zz = zq.float()[rows, None] if zq.dim() == 2 else zq.float()
        dist[rows, : act.shape[1]] = distances(zz, act, metric).masked_fill(invalid, float("inf")).cpu()
    dmin, amin = dist.min(-1)
    return dmin, amin, dist


@torch.no_grad()
def activations(probed: ProbedModel, site, seqs: list[list[int]], batch: int = 1024):
    """The activations at ``site`` of token sequences ``seqs``, batch by batch: ``(rows (B,), act (B, T, d)
    float32, invalid (B, T))``, ``rows`` the batch's indices in ``seqs``, PAD/EOS positions invalid. The probed
    model stops after the site's layer. Batches hold sequences of similar lengths (:func:`length_batches`)."""
    for rows in length_batches([len(s) for s in seqs], batch):
        b = probed.batch([seqs[r] for r in rows])
        act = probed.run(b.ids, [site])[site].float()
        yield torch.tensor(rows), act, ~b.valid.to(act.device)


def length_batches(lengths: list[int], batch: int) -> list[list[int]]:
    """Indices into ``lengths`` in batches of at most ``batch``, sorted by length; a batch that holds at least an
    eighth of ``batch`` also ends where the length changes, so little of it is padding. Counting's generator draws
    are 9 to 33 tokens long: in one batch of 1,024 a third of the tokens were padding, and the probed model's
    forward pass over them took 1.5x the time."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if not out or len(out[-1]) >= batch or (len(out[-1]) >= batch / 8 and lengths[i] != lengths[out[-1][-1]]):
            out.append([])
        out[-1].append(i)
    return out


def as_inputs(seqs: list[list[int]], tok) -> list[list[int]]:
    """Decoder samples as the probed model's inputs: where the tokenizer ends no input with EOS (HF tokenizers;
    for GPT-2 EOS is also BOS and PAD), the EOS that ended a sample is a stop signal, not part of the input."""
    if getattr(tok, "appends_eos", True) or tok.eos_id is None:
        return seqs
    return [s[:-1] if len(s) > 1 and s[-1] == tok.eos_id else s for s in seqs]


def counterfactuals(
    probed, task, site, zq: torch.Tensor, members: list[str], f: Callable, metric: str, tries: int = 30, seed: int = 0
) -> list[float]:
    """Change the feature ``f`` in each of ``members`` with the task's moves (the first move that changes its value,
    at most ``tries``) and return the changed inputs' distances: how many of them stay inside epsilon shows whether
    the activation keeps the feature."""
    rng = random.Random(seed)
    edits = []
    for x in members:
        v = f(x)
        for _ in range(tries):
            y = task.propose(x, rng)
            if y is not None and f(y) != v:
                edits.append(y)
                break
    if not edits:
        return []
    return verify(probed, site, [probed.encode(y) for y in edits], zq, metric)[0].tolist()
