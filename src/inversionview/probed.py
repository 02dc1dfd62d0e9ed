"""Access to the frozen probed model: loading, tokenising, and reading sites with PyTorch forward hooks.

The model is a ``transformers`` GPT-2-architecture causal LM loaded from a local directory or a hub id.
Sites are read by hooks on the HF modules; the forward pass stops as soon as the last needed site has
fired. Two activation modes:

``raw``
    the values the HF modules compute. A head's result is ``z_h @ W_O[h]``; the heads plus ``b_O`` sum to
    ``attn_out``.
``tl``
    the values TransformerLens computes under its default weight processing (LayerNorm folding, centred
    writing weights, value biases folded into ``b_O``). Every residual write is centred across d_model,
    and a head's result is ``centre((z_h - (ln1.b @ W_V + b_V)[h]) @ W_O[h])``. This is the paper's
    mode, so that epsilon means what it meant there. It is the default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .sites import Site, all_sites, parse_site
from .tokenizer import CharVocab, HFTokenizer

log = logging.getLogger(__name__)

MODES = ("tl", "raw")
SUPPORTED_FAMILIES = ("gpt2",)
# The hooked values inside one block, in the order the forward pass produces them.
_ORDER = ("pre", "z", "attn", "mid", "mlp")


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the last needed site has fired."""


@dataclass
class Batch:
    """Token ids, right-padded, and the mask of positions a distance may be taken at (not PAD, not EOS)."""

    ids: torch.Tensor  # (B, T) long
    valid: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,) long


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


class ProbedModel:
    """A frozen GPT-2-architecture model with its tokenizer and an activation mode."""

    def __init__(self, model, tokenizer, mode: str = "tl", source: str = "<memory>"):
        if mode not in MODES:
            raise UserError(f"unknown activation mode {mode!r}: expected one of {', '.join(MODES)}")
        family = getattr(model.config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise UserError(f"unsupported model family {family!r}: supported families are {', '.join(SUPPORTED_FAMILIES)}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mode = mode
        self.source = source
        cfg = model.config
        self.n_layers, self.n_heads, self.d_model = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.max_len = cfg.n_positions
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has only "
                            f"{cfg.vocab_size}: the tokenizer does not belong to this model")
        self._fingerprint = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, vocab: dict | CharVocab | None = None, mode: str = "tl",
             dtype: torch.dtype = torch.float32) -> "ProbedModel":
        """Load from a local directory (``config.json`` + weights) or a hub id.

        The tokenizer is, in order: ``vocab`` if given, ``vocab.json`` in the directory, or the HF
        tokenizer files in the directory.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = str(path)
        local = Path(path).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise UserError(f"probed model directory {path} has no config.json")
            if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
                raise UserError(f"probed model directory {path} has no weights (model.safetensors or pytorch_model.bin)")
            if vocab is None and (local / "vocab.json").is_file() and _is_char_vocab(local / "vocab.json"):
                vocab = json.loads((local / "vocab.json").read_text())
        elif path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1:
            raise UserError(f"probed model directory {path} does not exist")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # hub id not found, no network, malformed config.json ...
            raise UserError(f"could not load the probed model config from {path}: {str(e).splitlines()[0]}") from None
        if config.model_type not in SUPPORTED_FAMILIES:
            raise UserError(f"unsupported model family {config.model_type!r} in {path}: "
                            f"supported families are {', '.join(SUPPORTED_FAMILIES)}")
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:
            raise UserError(f"could not load the probed model weights from {path}: {str(e).splitlines()[0]}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if vocab is not None:
            tok = vocab if isinstance(vocab, CharVocab) else CharVocab.from_dict(vocab)
        else:
            try:
                tok = HFTokenizer(AutoTokenizer.from_pretrained(path))
            except Exception:
                raise UserError(f"no tokenizer for {path}: add HF tokenizer files to it, or describe a character "
                                "vocabulary (vocab = {tokens = [...], bos = ..., eos = ..., pad = ...})") from None
        return cls(model, tok, mode=mode, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (``config.json`` + ``model.safetensors``) and a character vocabulary if it has one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        if isinstance(self.tokenizer, CharVocab):
            (path / "vocab.json").write_text(json.dumps(self.tokenizer.to_dict(), indent=1))

    @property
    def fingerprint(self) -> str:
        """A hash of the weights: a decoder is refused for any other model."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, p in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def sites(self) -> list[Site]:
        return all_sites(self.n_layers, self.n_heads)

    def site(self, name: str | Site) -> Site:
        return name if isinstance(name, Site) else parse_site(name, self.n_layers, self.n_heads)

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_len:
            raise UserError(f"input is {len(ids)} tokens long but the model's context is {self.max_len} tokens")
        return ids

    def batch(self, seqs: list[list[int]]) -> Batch:
        """Right-pad token id lists into a :class:`Batch`."""
        lengths = torch.tensor([len(s) for s in seqs])
        T = int(lengths.max())
        ids = torch.full((len(seqs), T), self.tokenizer.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        valid = torch.arange(T)[None, :] < lengths[:, None]
        eos = self.tokenizer.eos_id
        if eos is not None and eos != self.tokenizer.bos_id:
            valid &= ids != eos
        return Batch(ids, valid, lengths)

    # ------------------------------------------------------------------ activations
    @torch.no_grad()
    def run(self, ids: torch.Tensor, sites: list[Site]) -> dict[Site, torch.Tensor]:
        """Activations ``(B, T, d_model)`` at each site, in this model's mode, from one forward pass that
        stops after the last needed site."""
        sites = list(dict.fromkeys(sites))
        if not sites:
            return {}
        need = {(s.layer, k) for s in sites for k in _captures(s.kind)}
        last = max(need, key=lambda lk: (lk[0], _ORDER.index(lk[1])))
        cap: dict[tuple[int, str], torch.Tensor] = {}
        handles = []

        def grab(key, from_input):
            def hook(mod, args, out=None):
                cap[key] = args[0] if from_input else out
                if key == last:
                    raise _Stop

            return hook

        for layer, key in need:
            b = self.model.transformer.h[layer]
            mod, from_input = {"pre": (b.ln_1, True), "z": (b.attn.c_proj, True), "attn": (b.attn.c_proj, False),
                               "mid": (b.ln_2, True), "mlp": (b.mlp, False)}[key]
            hook = grab((layer, key), from_input)
            handles.append(mod.register_forward_pre_hook(hook) if from_input else mod.register_forward_hook(hook))
        try:
            self.model.transformer(input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids, device=self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {s: self._site_value(s, cap) for s in sites}

    def _site_value(self, s: Site, cap) -> torch.Tensor:
        tl = self.mode == "tl"
        L = s.layer
        if s.kind == "resid_pre":
            x = cap[(L, "pre")]
        elif s.kind == "resid_mid":
            x = cap[(L, "mid")]
        elif s.kind == "resid_post":
            x = cap[(L, "mid")] + cap[(L, "mlp")]
        elif s.kind == "attn_out":
            x = cap[(L, "attn")]
        elif s.kind == "mlp_out":
            x = cap[(L, "mlp")]
        else:
            z = cap[(L, "z")]
            d_head = self.d_model // self.n_heads
            zh = z[..., s.head * d_head:(s.head + 1) * d_head]
            attn = self.model.transformer.h[L].attn
            if tl:
                zh = zh - self._value_bias(L)[s.head * d_head:(s.head + 1) * d_head]
            x = zh @ attn.c_proj.weight[s.head * d_head:(s.head + 1) * d_head]
        return _centre(x) if tl else x

    def _value_bias(self, layer: int) -> torch.Tensor:
        """``ln1.b @ W_V + b_V``: what TransformerLens folds out of each head's values into ``b_O``."""
        b = self.model.transformer.h[layer]
        d = self.d_model
        W_V, b_V = b.attn.c_attn.weight[:, 2 * d:], b.attn.c_attn.bias[2 * d:]
        return b.ln_1.bias @ W_V + b_V

    def output_bias(self, layer: int) -> torch.Tensor:
        """``b_O`` in this mode: the per-head results at a layer plus this vector sum to ``attn_out``."""
        attn = self.model.transformer.h[layer].attn
        if self.mode == "raw":
            return attn.c_proj.bias
        return _centre(attn.c_proj.bias + self._value_bias(layer) @ attn.c_proj.weight)

    @torch.no_grad()
    def attention(self, ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
        """The head's attention pattern ``(B, T_query, T_key)`` (causal; rows sum to 1)."""
        cap = {}
        attn = self.model.transformer.h[layer].attn

        def hook(mod, args, out):
            cap["qkv"] = out
            raise _Stop

        h = attn.c_attn.register_forward_hook(hook)
        try:
            self.model.transformer(input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids, device=self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        d, dh = self.d_model, self.d_model // self.n_heads
        q = cap["qkv"][..., head * dh:(head + 1) * dh]
        k = cap["qkv"][..., d + head * dh:d + (head + 1) * dh]
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        T = ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids, device=self.device), use_cache=False).logits

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _captures(kind: str) -> tuple[str, ...]:
    return {"resid_pre": ("pre",), "resid_mid": ("mid",), "resid_post": ("mid", "mlp"), "attn_out": ("attn",),
            "mlp_out": ("mlp",), "result": ("z",)}[kind]


def _is_char_vocab(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "tokens" in d and "bos" in d


def distances(zq: torch.Tensor, z: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """D(z_q, z) along the last dimension: ``||z_q - z|| / ||z_q||`` or ``1 - cos(z_q, z)``."""
    if metric == "euclidean":
        return (z - zq).norm(dim=-1) / zq.norm(dim=-1).clamp_min(1e-12)
    if metric == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(z, zq.expand_as(z), dim=-1)
    raise UserError(f"unknown metric {metric!r}: expected 'euclidean' or 'cosine'")
