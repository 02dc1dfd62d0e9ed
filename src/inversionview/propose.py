"""Proposing inputs (METHOD.md §4): the decoder samples candidates conditioned on a query activation.

The first stage of a reading, below verification's users: it knows the decoder and the tokenizer, nothing of
distances, chains or summaries. :data:`AUTO_MIX` is the paper's default mix of temperatures and activation noise.
"""

from __future__ import annotations

import torch

from .verify import as_inputs

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
