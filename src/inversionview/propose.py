"""Proposing inputs (METHOD.md §4): the decoder samples candidates conditioned on a query activation.

The first stage of a reading: it knows the decoder, the tokenizer and verification, nothing of
chains or summaries. :data:`AUTO_MIX` is the paper's default mix of temperatures and activation noise;
:func:`hit_rates` measures how often one sample lands inside epsilon (training's and the run's hit rate).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .probed import ProbedModel
from .verify import as_inputs, verify

# The paper's Auto mix: (temperature, noise) pairs, 64 candidates each, repeated 4 times -> 1024.
AUTO_MIX = ((0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (2.0, 0.1))


def propose(iv, zq: torch.Tensor, si: int, mix, samples: int, g: torch.Generator) -> list[list[int]]:
    """``samples`` decoder candidates for ``zq``, spread over the (temperature, noise) pairs of ``mix``: temperature
    tau, and noise z + N(0, I) std(z) eta. ``iv`` holds the decoder and the probed model (its tokenizer)."""
    probed, tok = iv.probed, iv.probed.tokenizer
    per = [samples // len(mix) + (k < samples % len(mix)) for k in range(len(mix))]
    z = torch.cat(
        [
            zq.expand(n, -1) + torch.randn(n, zq.shape[0], generator=g).to(zq.device) * zq.std() * eta
            for n, (_, eta) in zip(per, mix)
        ]
    )
    tau = torch.cat([torch.full((n,), t) for n, (t, _) in zip(per, mix)])
    return as_inputs(
        iv.decoder.generate(z, torch.full((samples,), si), tok.bos_id, tok.eos_id, tau, probed.max_len, g), tok
    )


@dataclass
class Queries:
    """Held-out query activations: ``z`` (N, d) with the decoder's site index of each row."""

    z: torch.Tensor
    site_idx: torch.Tensor
    sites: list


def make_queries(probed: ProbedModel, task, sites, per_site: int, seed: int) -> Queries:
    """``per_site`` held-out activations for each site, at positions drawn from the task's rule."""
    rng = random.Random(seed)
    zs, idx = [], []
    for i, s in enumerate(sites):
        texts = [task.sample(rng, "test") for _ in range(per_site)]
        b = probed.batch([probed.encode(t) for t in texts])
        pos = torch.tensor([rng.choice(task.positions(t)) for t in texts])
        zs.append(probed.run(b.ids, [s])[s][torch.arange(per_site), pos].float())
        idx += [i] * per_site
    return Queries(torch.cat(zs), torch.tensor(idx), list(sites))


@torch.no_grad()
def hit_rates(decoder, probed: ProbedModel, q: Queries, epsilon: float, metric: str, seed: int = 0) -> list[float]:
    """Per site: the fraction of queries whose one sample at temperature 1 lies within ``epsilon``."""
    decoder.eval()
    g = torch.Generator().manual_seed(seed)
    tok = probed.tokenizer
    hits = []
    for i, s in enumerate(q.sites):
        rows = (q.site_idx == i).nonzero()[:, 0]
        seqs = as_inputs(
            decoder.generate(q.z[rows], q.site_idx[rows], tok.bos_id, tok.eos_id, 1.0, probed.max_len, g), tok
        )
        dmin, _, _ = verify(probed, s, seqs, q.z[rows], metric)
        hits.append((dmin < epsilon).float().mean().item())
    return hits
