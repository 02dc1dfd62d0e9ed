"""The decoder: a small GPT-2-style language model conditioned on (activation, site id).

Architecture (the paper's, METHOD.md §2):

1. ``h0 = concat((z - mu[site]) / sigma[site], E[site])``. ``mu``/``sigma`` are learned per-site
   normalisers and ``E`` a learned site embedding of width ``n_sites``; before training ``mu`` and
   ``sigma`` are initialised to each site's activation mean and standard deviation
   (:meth:`Decoder.init_site_stats`), which matters when sites have very different scales.
2. ``n_act_blocks`` pre-LayerNorm residual MLP blocks ``h <- h + W2 relu(W1 LN(h))`` of hidden width
   ``d_act``, then a final LayerNorm.
3. In every decoder layer a Linear+LayerNorm maps ``h`` to ``d_model``; its key and value are prepended
   as one extra attention slot that every token attends to (no position embedding, no query row). With
   the KV cache it simply lives in the cache.
4. A standard pre-LN GPT-2 body, trained from scratch.
5. With ``prefix_counts`` (not in the paper) each token's input adds ``sum_{s <= t} C[ids_s]``, a linear map of the
   counts of every token so far; the running sum lives in the first layer's cache while sampling.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import DECODER_FORMAT, atomic_write_text, check_fields, check_version, plain_mode
from .errors import UserError


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a decoder. Saved as ``config.json`` beside ``model.safetensors``."""

    vocab_size: int
    max_len: int
    d_act: int  # width of the probed activations
    n_sites: int
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_act_blocks: int = 6
    prefix_counts: bool = False  # add a running sum of a second token embedding: counts of each token so far

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps({"format_version": DECODER_FORMAT, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "DecoderConfig":
        """Read ``config.json``; a newer format or an unknown field is refused (:mod:`inversionview.artifacts`)."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is missing: not a decoder run directory") from None
        except ValueError as e:
            raise UserError(f"{path} is corrupt ({e}): expected a decoder config as JSON") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is corrupt: expected a decoder config as a JSON object")
        check_version(d.pop("format_version", None), DECODER_FORMAT, path)
        check_fields(d, [f.name for f in fields(cls)], path)
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{path} is corrupt ({e}): expected a decoder config as JSON") from None


class _ActBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h):
        return h + self.fc2(F.relu(self.fc1(self.ln(h))))


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def _heads(self, x):  # (B, T, d) -> (B, H, T, dh)
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    def prefix_kv(self, p):
        """Key and value of the prefix slot from the conditioning vector ``p`` (B, d)."""
        _, k, v = self.qkv(p[:, None]).chunk(3, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x, cache: list[torch.Tensor]):
        """``cache`` is ``[K, V]`` holding the prefix slot and any earlier tokens; it is extended in place.
        With no earlier tokens in the cache, ``x`` is a whole sequence and attention is causal."""
        B, T, d = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        past = cache[0].shape[2]
        cache[0] = K = torch.cat([cache[0], k], 2)
        cache[1] = V = torch.cat([cache[1], v], 2)
        mask = None
        if T > 1:  # query i sees every cached slot plus tokens <= i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device)
            mask[:, past:] = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        a = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = self.config = config
        width = c.d_act + c.n_sites
        self.site_mean = nn.Parameter(torch.zeros(c.n_sites, c.d_act))
        self.site_scale = nn.Parameter(torch.ones(c.n_sites))
        self.site_emb = nn.Embedding(c.n_sites, c.n_sites)
        self.act_blocks = nn.Sequential(
            *[_ActBlock(width, c.d_act) for _ in range(c.n_act_blocks)], nn.LayerNorm(width)
        )
        self.prefix = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, c.d_model), nn.LayerNorm(c.d_model)) for _ in range(c.n_layers)]
        )
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.cnt = nn.Embedding(c.vocab_size, c.d_model) if c.prefix_counts else None
        blocks = [_Block(c.d_model, c.n_heads) for _ in range(c.n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(c.d_model)
        self.apply(self._init)
        with torch.no_grad():
            self.site_emb.weight.copy_(torch.eye(c.n_sites))
            for b in blocks:  # GPT-2's scaled init of residual projections
                for lin in (b.proj, b.out):
                    lin.weight.mul_(1 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_site_stats(self, site: int, acts: torch.Tensor) -> None:
        """Initialise a site's normaliser from a sample of its activations ``(N, d_act)``."""
        self.site_mean[site] = acts.mean(0)
        self.site_scale[site] = (acts - acts.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-6) / math.sqrt(
            acts.shape[1]
        )

    def condition(self, z: torch.Tensor, site: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per-layer prefix caches ``[K, V]`` for activations ``z`` (B, d_act) at site ids ``site`` (B,)."""
        z, site = z.to(self.site_mean), site.to(self.site_mean.device)  # inputs may come from another device
        x = (z - self.site_mean[site]) / self.site_scale[site, None]
        h = self.act_blocks(torch.cat([x, self.site_emb(site)], -1))
        # ModuleList's stub yields plain Modules; these are the _Blocks __init__ put there
        blocks = cast(list[_Block], list(self.blocks))
        return [list(b.prefix_kv(p(h))) for b, p in zip(blocks, self.prefix)]

    def forward(self, ids: torch.Tensor, z: torch.Tensor, site: torch.Tensor, caches=None) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``. With ``caches`` from :meth:`condition` (and any
        earlier steps), ``ids`` continue the cached sequence."""
        caches = self.condition(z, site) if caches is None else caches
        ids = ids.to(self.tok.weight.device)
        start = caches[0][0].shape[2] - 1
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        if self.cnt is not None:  # counts so far: the running sum travels as the first layer's third cache entry
            run = self.cnt(ids).cumsum(1)
            if len(caches[0]) > 2:
                run = run + caches[0][2][:, None]
            caches[0][2:] = [run[:, -1]]
            x = x + run
        for b, cache in zip(self.blocks, caches):
            x = b(x, cache)
        return self.ln_f(x) @ self.tok.weight.T

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        site: torch.Tensor,
        bos: int,
        eos: int,
        temperature: torch.Tensor | float = 1.0,
        max_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Sample one sequence per row of ``z``, from BOS until EOS or ``max_len`` tokens, with a KV cache.
        Finished rows are dropped from the batch as they end."""
        B, dev = z.shape[0], self.tok.weight.device
        max_len = max_len or self.config.max_len
        tau = torch.as_tensor(temperature, dtype=torch.float32).expand(B).clone().to(dev)
        caches = self.condition(z, site)
        out = torch.full((B, max_len), eos, dtype=torch.long, device=dev)
        out[:, 0] = bos
        alive = torch.arange(B, device=dev)
        tok = out[:, :1]
        for t in range(1, max_len):
            logits = self(tok, None, None, caches)[:, -1].float()
            # drawn on the CPU (the generator's device): the same samples on any device
            g = torch.rand(logits.shape, generator=generator).to(dev).clamp_(1e-10, 1.0)
            g = g.log_().neg_().log_().neg_()  # Gumbel noise, in place: no (B, vocab) temporaries beyond two
            nxt = logits.div_(tau[alive, None]).add_(g).argmax(-1)  # Gumbel-max sampling
            out[alive, t] = nxt
            keep = nxt != eos
            if not keep.all():
                alive, nxt = alive[keep], nxt[keep]
                if len(alive) == 0:
                    break
                caches = [[t[keep] for t in c] for c in caches]
            tok = nxt[:, None]
        seqs = []
        for row in out.tolist():
            end = row.index(eos, 1) + 1 if eos in row[1:] else max_len
            seqs.append(row[:end])
        return seqs

    @torch.no_grad()
    def token_probs(self, ids: torch.Tensor, z: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """``p(t_i | t_<i, z)`` for i >= 1 of each row of ``ids`` (B, T): shape (B, T-1).

        Rows go in chunks and only the taken token's logit minus the logsumexp is kept, so a large
        vocabulary (GPT-2's 50,257) never holds more than one chunk's logits."""
        chunk = max(1, (1 << 24) // max(1, ids.shape[1] * self.config.vocab_size))
        out = []
        for i in range(0, ids.shape[0], chunk):
            logits = self(ids[i : i + chunk, :-1], z[i : i + chunk], site[i : i + chunk]).float()
            taken = logits.gather(-1, ids[i : i + chunk, 1:, None])[..., 0]
            out.append((taken - logits.logsumexp(-1)).exp())
        return torch.cat(out)

    # ------------------------------------------------------------------ files
    def save(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        run_dir = Path(run_dir)
        self.config.save(run_dir / "config.json")
        tmp = run_dir / "model.safetensors.tmp"
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        plain_mode(tmp)  # 0644 like the run's other files, not safetensors' 0600
        tmp.replace(run_dir / "model.safetensors")

    @classmethod
    def load(cls, run_dir: Path) -> "Decoder":
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        dec = cls(DecoderConfig.load(run_dir / "config.json"))
        path = run_dir / "model.safetensors"
        try:
            state = load_file(str(path))
            dec.load_state_dict(state)
        except FileNotFoundError:
            raise UserError(f"{path} is missing: the decoder has no weights yet (train it first)") from None
        except Exception as e:
            raise UserError(
                f"{path} is corrupt or does not match config.json ({str(e).splitlines()[0][:120]})"
            ) from None
        return dec.eval()
