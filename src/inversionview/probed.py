"""Access to the frozen probed model: loading, tokenising, and reading sites with PyTorch forward hooks.

The model is a ``transformers`` causal LM loaded from a local directory or a hub id. Sites are read by hooks on
the HF modules; the forward pass stops as soon as the last needed site has fired.

Where a site lives is an explicit table per architecture family (:class:`Family`), chosen by
``config.model_type``:

==============================  =========================  ==========================================
family                          ``model_type``             notes
==============================  =========================  ==========================================
GPT-2                           ``gpt2``                   LayerNorm, learned positions
GPT-NeoX (Pythia)               ``gpt_neox``               LayerNorm, rotary (possibly partial); with
                                                           ``use_parallel_residual`` (Pythia's
                                                           default) there is no resid_mid
Llama-style                     ``llama``, ``mistral``,    RMSNorm, rotary, grouped-query attention
                                ``qwen2``                  (a head's result uses its own rows of
                                                           ``o_proj``; several heads share a k/v head)
==============================  =========================  ==========================================

Any other model loads, but its table sites (``x0.pre``, ``a1.0``, ...) are refused with one line naming the
supported families. The escape hatch works for every model: a site named by module path plus input or
output, ``module:{path}:input|output`` (see :mod:`inversionview.sites`), read by a hook on that module.

Two activation modes:

``raw``
    the values the HF modules compute. A head's result is ``z_h @ W_O[h]``; the heads plus ``b_O`` (zero
    where the output projection has no bias) sum to ``attn_out``.
``tl``
    the values TransformerLens computes under its default weight processing (``fold_ln``,
    ``center_writing_weights``, ``fold_value_biases``). It is the paper's mode, so that epsilon means what it
    meant there, and it is the default.

    - LayerNorm families (GPT-2, GPT-NeoX): every residual write is centred across d_model, and a head's
      result is ``centre((z_h - (ln1.b @ W_V + b_V)[h]) @ W_O[h])``.
    - RMSNorm families (Llama-style): TransformerLens folds only the norm weights and skips centring
      ("You are not using LayerNorm, so the writing weights can't be centered"), so residual, attention
      and MLP sites equal the raw values; the value biases are still folded into ``b_O``, so a head's
      result is ``(z_h - b_V[kv(h)]) @ W_O[h]`` (a difference only where ``v_proj`` has a bias, as in Qwen2).
      ``kv(h)`` is the key/value head that query head ``h`` reads (TransformerLens' ``repeat_interleave``).
    - Module sites are always the raw tensor of the module, whatever the mode.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import UserError
from .sites import MODULE, Site, all_sites, parse_site
from .tokenizer import CharVocab, HFTokenizer

log = logging.getLogger(__name__)

MODES = ("tl", "raw")


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the last needed site has fired."""


@dataclass
class Batch:
    """Token ids, right-padded, and the mask of positions a distance may be taken at: within the sequence's
    length and not a PAD or EOS token wherever it stands (:attr:`ProbedModel.non_input_ids`); BOS is included."""

    ids: torch.Tensor  # (B, T) long
    valid: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,) long


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------- families
def _heads(x: torch.Tensor, d_head: int) -> torch.Tensor:
    """(B, T, n * d_head) -> (B, n, T, d_head): HF's head-major split."""
    return x.view(*x.shape[:-1], -1, d_head).transpose(1, 2)


def _rotary(attn, q: torch.Tensor, k: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions as the attention module applies them: its own modeling file's ``apply_rotary_pos_emb``
    on the ``(cos, sin)`` the model passed it (partial rotary included, for GPT-NeoX)."""
    cos, sin = position_embeddings
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)


def _conv1d_w(proj) -> torch.Tensor:  # GPT-2's Conv1D stores (d_in, d_out)
    return proj.weight


def _linear_w(proj) -> torch.Tensor:  # nn.Linear stores (d_out, d_in)
    return proj.weight.T


def _gpt2_w_v(attn):
    d = attn.split_size
    return attn.c_attn.weight[:, 2 * d :], attn.c_attn.bias[2 * d :]


def _gpt2_qk(attn, x, position_embeddings):
    q, k, _ = attn.c_attn(x).split(attn.split_size, dim=2)
    return _heads(q, attn.head_dim), _heads(k, attn.head_dim)


def _neox_w_v(attn):
    # query_key_value's outputs are grouped per head: [q_h | k_h | v_h] for h = 0, 1, ...
    dh = attn.head_size
    lin = attn.query_key_value
    W = lin.weight.view(-1, 3 * dh, lin.in_features)[:, 2 * dh :].reshape(-1, lin.in_features).T
    b = None if lin.bias is None else lin.bias.view(-1, 3 * dh)[:, 2 * dh :].reshape(-1)
    return W, b


def _neox_qk(attn, x, position_embeddings):
    dh = attn.head_size
    q, k, _ = attn.query_key_value(x).view(*x.shape[:-1], -1, 3 * dh).transpose(1, 2).chunk(3, dim=-1)
    return _rotary(attn, q, k, position_embeddings)


def _llama_w_v(attn):
    return attn.v_proj.weight.T, attn.v_proj.bias


def _llama_qk(attn, x, position_embeddings):
    q, k = _heads(attn.q_proj(x), attn.head_dim), _heads(attn.k_proj(x), attn.head_dim)
    return _rotary(attn, q, k, position_embeddings)


def _no_window(attn) -> None:
    return None


def _llama_window(attn) -> int | None:
    # Qwen2 sets it per layer on the module (None on full-attention layers); Mistral only in its config.
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


@dataclass(frozen=True)
class Family:
    """Where the sites of one architecture family live in its HF modules.

    ``blocks`` is a path from the causal LM; the other module paths are relative to one block. Within a block:
    resid_pre is the input of ``resid_pre``, the concatenated per-head z is the input of ``out_proj`` and
    attn_out its output, resid_mid is the input of ``resid_mid``, mlp_out is the output of ``mlp``, and
    resid_post is the block's output.
    """

    name: str
    model_types: tuple[str, ...]  # the config.model_type values this table covers
    blocks: str  # the list of transformer blocks
    resid_pre: str  # the first norm: its input is resid_pre (its bias, if any, enters the TL value bias)
    attn: str  # the attention module: its input (and the rotary (cos, sin) it is given) yields q and k
    out_proj: str  # the attention output projection: input = per-head z, concatenated; output = attn_out
    resid_mid: str | None  # the second norm, whose input is resid_mid; None when attention and MLP run in parallel
    mlp: str  # output = mlp_out
    norm: str  # "LayerNorm": tl mode centres residual writes; "RMSNorm": it does not (as TransformerLens)
    w_o: Callable  # out_proj -> W_O as (n_heads * d_head, d_model); head h owns rows h*d_head:(h+1)*d_head
    w_v: Callable  # attn -> (W_V as (d_model, n_kv_heads * d_head), b_V or None), k/v heads head-major
    qk: Callable  # (attn, attn input, position embeddings) -> q (B, n_heads, T, dh), k (B, n_kv_heads, T, dh)
    window: Callable = _no_window  # attn -> sliding-window length (a key k is seen from q iff q - w < k <= q)

    @property
    def centred(self) -> bool:
        return self.norm == "LayerNorm"


GPT2 = Family(
    "GPT-2",
    ("gpt2",),
    blocks="transformer.h",
    resid_pre="ln_1",
    attn="attn",
    out_proj="attn.c_proj",
    resid_mid="ln_2",
    mlp="mlp",
    norm="LayerNorm",
    w_o=_conv1d_w,
    w_v=_gpt2_w_v,
    qk=_gpt2_qk,
)
GPT_NEOX = Family(
    "GPT-NeoX/Pythia",
    ("gpt_neox",),
    blocks="gpt_neox.layers",
    resid_pre="input_layernorm",
    attn="attention",
    out_proj="attention.dense",
    resid_mid="post_attention_layernorm",
    mlp="mlp",
    norm="LayerNorm",
    w_o=_linear_w,
    w_v=_neox_w_v,
    qk=_neox_qk,
)
# use_parallel_residual=True (Pythia): x_post = x_pre + attn(ln1(x_pre)) + mlp(ln2(x_pre)); there is no resid_mid
# (TransformerLens' parallel_attn_mlp blocks have no hook_resid_mid either).
GPT_NEOX_PARALLEL = replace(GPT_NEOX, name="GPT-NeoX/Pythia (parallel residual)", resid_mid=None)
LLAMA = Family(
    "Llama-style",
    ("llama", "mistral", "qwen2"),
    blocks="model.layers",
    resid_pre="input_layernorm",
    attn="self_attn",
    out_proj="self_attn.o_proj",
    resid_mid="post_attention_layernorm",
    mlp="mlp",
    norm="RMSNorm",
    w_o=_linear_w,
    w_v=_llama_w_v,
    qk=_llama_qk,
    window=_llama_window,
)
FAMILIES = (GPT2, GPT_NEOX, LLAMA)
SUPPORTED_FAMILIES = tuple(t for f in FAMILIES for t in f.model_types)  # config.model_type values with a table


def family_of(config) -> Family | None:
    """The site table for a model config, or None for a family without one."""
    model_type = getattr(config, "model_type", None)
    if model_type in GPT_NEOX.model_types and getattr(config, "use_parallel_residual", False):
        return GPT_NEOX_PARALLEL
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def _families_line() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def _tensor_of(x):
    """The tensor a hook reads from a module's output (or inputs): the value itself, or its first tensor."""
    if isinstance(x, torch.Tensor):
        return x
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return next((v for v in items if isinstance(v, torch.Tensor)), None)


def _input_of(args, kwargs):
    """A module's main input: its first positional argument, else ``hidden_states=``, else its first tensor."""
    if args:
        return _tensor_of(args[0]) if not isinstance(args[0], torch.Tensor) else args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return _tensor_of(kwargs)


class ProbedModel:
    """A frozen ``transformers`` causal LM with its tokenizer and an activation mode.

    ``family`` is its site table (:data:`FAMILIES`), or None for a model of another family: such a model loads
    and reads module sites (``module:{path}:input|output``), and refuses table sites with one line.
    """

    def __init__(self, model, tokenizer, mode: str = "tl", source: str = "<memory>"):
        if mode not in MODES:
            raise UserError(f"unknown activation mode {mode!r}: expected one of {', '.join(MODES)}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mode = mode
        self.source = source
        cfg = model.config
        self.model_type = getattr(cfg, "model_type", None)
        self.family = family_of(cfg)
        self.n_layers = getattr(cfg, "num_hidden_layers", None)
        self.n_heads = getattr(cfg, "num_attention_heads", None)
        self.d_model = getattr(cfg, "hidden_size", None)
        self.max_len = getattr(cfg, "max_position_embeddings", None)
        if self.family is not None:
            self._blocks = self._resolve_table()
            self.n_layers = len(self._blocks)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has only "
                f"{cfg.vocab_size}: the tokenizer does not belong to this model"
            )
        self._fingerprint: str | None = None
        self._table_sites = frozenset(self.sites)

    def _resolve_table(self):
        """The block list, after checking that every module the family's table names exists in every block."""
        f = self.family
        try:
            blocks = self.model.get_submodule(f.blocks)
            for b in blocks:
                for path in (f.resid_pre, f.attn, f.out_proj, f.resid_mid, f.mlp):
                    if path is not None:
                        b.get_submodule(path)
        except AttributeError as e:
            raise UserError(
                f"model_type {self.model_type!r} uses the {f.name} site table, but this model's modules "
                f"do not match it ({str(e).splitlines()[0]}); name sites by module path instead, "
                "e.g. 'module:<path>:output'"
            ) from None
        return blocks

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        vocab: dict | CharVocab | None = None,
        mode: str = "tl",
        dtype: torch.dtype = torch.float32,
        tokenizer: str | None = None,
        device: str | torch.device = "cpu",
    ) -> "ProbedModel":
        """Load from a local directory (``config.json`` + weights) or a hub id, in ``dtype`` on ``device``.

        The tokenizer is, in order: ``vocab`` if given, the built-in tokenizer named by ``tokenizer`` (``"gpt2"``:
        GPT-2's BPE, offline), ``vocab.json`` in the directory, or the HF tokenizer files in the directory.
        """
        from .tokenizer import check_tokenizer_name

        if vocab is not None and tokenizer:
            raise UserError("give either a character vocabulary (vocab) or a named tokenizer, not both")
        if tokenizer:
            check_tokenizer_name(tokenizer)
        path = str(path)
        dir_vocab = _check_model_dir(path, read_vocab=vocab is None and not tokenizer)
        if dir_vocab is not None:
            vocab = dir_vocab
        config = _load_config(path)
        model = _load_weights(path, dtype, device)
        return cls(model, _load_tokenizer(path, config, vocab, tokenizer), mode=mode, source=path)

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
            from .artifacts import weights_fingerprint

            self._fingerprint = weights_fingerprint(self.model.state_dict())
        return self._fingerprint

    @property
    def sites(self) -> list[Site]:
        """Every table site of this model, in forward order (none for a family without a table)."""
        if self.family is None:
            return []
        assert self.n_layers is not None and self.n_heads is not None  # a family's config names both
        return all_sites(self.n_layers, self.n_heads, resid_mid=self.family.resid_mid is not None)

    def site(self, name: str | Site) -> Site:
        """Parse and check a site name (or check a :class:`Site`) against this model."""
        if isinstance(name, Site):
            self._check(name)
            return name
        text = str(name).strip()
        if text.startswith(MODULE + ":") or self.family is None:
            s = parse_site(text)  # a malformed name is called malformed, whatever the model
        else:
            if self.family.resid_mid is None:  # a resid_mid name gets its own message from _check
                loose: Site | None
                try:
                    loose = parse_site(text)
                except UserError:
                    loose = None
                if loose is not None and loose.kind == "resid_mid":
                    self._check(loose)
            s = parse_site(text, self.n_layers, self.n_heads, resid_mid=self.family.resid_mid is not None)
        if s.kind != MODULE:
            self._table(f"site {text!r}")
        self._check(s)
        return s

    def _check(self, s: Site) -> None:
        if s.kind == MODULE:
            assert s.path is not None  # a module site names its module
            self._module(s.path)
            return
        f = self._table(f"site {s}")
        if s.kind == "resid_mid" and f.resid_mid is None:
            raise UserError(
                f"site {s} does not exist in this {f.name} model: attention and MLP both read resid_pre "
                "and add to resid_post (use_parallel_residual=True), so there is no resid_mid "
                "(TransformerLens has no hook_resid_mid for it either); "
                f"use x{s.layer}.pre or x{s.layer}.post"
            )
        if s not in self._table_sites:
            # not in this model: parse_site raises, with a suggestion
            parse_site(s.name, self.n_layers, self.n_heads, resid_mid=f.resid_mid is not None)

    def _table(self, what: str) -> Family:
        """The family's site table; one line naming the supported families and the escape hatch if there is none."""
        if self.family is not None:
            return self.family
        example = next((n for n, _ in self.model.named_modules() if n.endswith(".0")), None) or "<module.path>"
        raise UserError(
            f"{what} needs a site table, but model_type {self.model_type!r} has none: supported families "
            f"are {_families_line()}; for this model name a site by module path plus input or output, "
            f"e.g. 'module:{example}:output' or 'module:{example}:input'"
        )

    def _module(self, path: str):
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"module site: this model has no module {path!r}{hint}") from None

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.max_len is not None and len(ids) > self.max_len:
            raise UserError(f"input is {len(ids)} tokens long but the model's context is {self.max_len} tokens")
        return ids

    def batch(self, seqs: list[list[int]]) -> Batch:
        """Right-pad token id lists into a :class:`Batch`."""
        lengths = torch.tensor([len(s) for s in seqs])
        T = int(lengths.max())
        ids = torch.full((len(seqs), T), self.tokenizer.pad_id, dtype=torch.long)
        valid = torch.arange(T)[None, :] < lengths[:, None]
        # one copy of all the tokens, row-major as the mask's True cells: a copy per row took a fifth of a
        # 1,024-row forward pass of the counting model
        ids[valid] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        for t in self.non_input_ids:  # anywhere in a sequence, not only at its end: a sample may hold a PAD mid-way
            valid &= ids != t
        return Batch(ids, valid, lengths)

    @property
    def non_input_ids(self) -> tuple[int, ...]:
        """The special token ids that are not a real input token, so no distance is taken at them: PAD and EOS,
        unless the id is also BOS (GPT-2's ``<|endoftext|>`` is all three), for BOS is a real position."""
        tok = self.tokenizer
        return tuple(sorted({tok.pad_id, tok.eos_id} - {tok.bos_id, None}))

    # ------------------------------------------------------------------ activations
    def _captures(self, s: Site) -> list[tuple]:
        """The hooked tensors a site is computed from: (layer, what) for table sites, (path, io) for module sites."""
        if s.kind == MODULE:
            return [(s.path, s.io)]
        what = {
            "resid_pre": "pre",
            "resid_mid": "mid",
            "resid_post": "post",
            "attn_out": "attn",
            "mlp_out": "mlp",
            "result": "z",
        }[s.kind]
        return [(s.layer, what)]

    def _hook_point(self, key: tuple):
        """(module, "input" | "output") for a capture key, from the family's table or the module path."""
        where, what = key
        if isinstance(where, str):
            return self._module(where), what
        f, b = self._table("a table site"), self._blocks[where]
        path, io = {
            "pre": (f.resid_pre, "input"),
            "z": (f.out_proj, "input"),
            "attn": (f.out_proj, "output"),
            "mid": (f.resid_mid, "input"),
            "mlp": (f.mlp, "output"),
            "post": ("", "output"),
        }[what]
        return b.get_submodule(path), io

    @torch.no_grad()
    def run(self, ids: torch.Tensor, sites: list[Site]) -> dict[Site, torch.Tensor]:
        """Activations ``(B, T, d_model)`` at each site, in this model's mode, from one forward pass that stops as
        soon as every needed site has fired. A module site gives its module's tensor as it is (the first call's,
        if the module runs more than once), in any mode."""
        sites = list(dict.fromkeys(sites))
        if not sites:
            return {}
        for s in sites:
            self._check(s)
        keys = list(dict.fromkeys(k for s in sites for k in self._captures(s)))
        cap: dict[tuple, torch.Tensor] = {}
        pending = set(keys)

        def fired(key, value):
            if key in cap:
                return
            cap[key] = value
            pending.discard(key)
            if not pending:
                raise _Stop

        handles = []
        for key in keys:
            mod, io = self._hook_point(key)
            if io == "input":
                hook = lambda m, args, kwargs, key=key: fired(key, _input_of(args, kwargs))  # noqa: E731
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = lambda m, args, out, key=key: fired(key, _tensor_of(out))  # noqa: E731
                handles.append(mod.register_forward_hook(hook))
        try:
            self._forward(ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for s in sites:
            for k in self._captures(s):
                if k not in cap:
                    raise UserError(f"site {s}: its module never ran in the forward pass; pick one that does")
                if cap[k] is None:
                    raise UserError(
                        f"site {s}: its module's {k[1] if s.kind == MODULE else 'value'} holds no tensor; "
                        "pick a module whose input or output is a tensor"
                    )
        return {s: self._site_value(s, cap) for s in sites}

    def _site_value(self, s: Site, cap) -> torch.Tensor:
        if s.kind == MODULE:
            return cap[(s.path, s.io)]
        f = self._table(f"site {s}")
        tl = self.mode == "tl"
        x = cap[self._captures(s)[0]]
        if s.kind == "result":
            assert s.head is not None  # a result site names its head
            out_proj = self._blocks[s.layer].get_submodule(f.out_proj)
            W_O = f.w_o(out_proj)
            dh = W_O.shape[0] // self.n_heads
            sl = slice(s.head * dh, (s.head + 1) * dh)
            zh = x[..., sl]
            if tl:
                vb = self._value_bias(s.layer)
                if vb is not None:
                    zh = zh - vb[sl]
            x = zh @ W_O[sl]
        return _centre(x) if tl and f.centred else x

    def _value_bias(self, layer: int) -> torch.Tensor | None:
        """What TransformerLens folds out of each query head's values into ``b_O``, as (n_heads * d_head,):
        ``ln1.b @ W_V + b_V`` (LayerNorm families) or ``b_V`` (RMSNorm has no bias), each key/value head's
        entry repeated for the query heads that read it. None if there is nothing to fold."""
        f = self._table("the value bias")
        b = self._blocks[layer]
        W_V, b_V = f.w_v(b.get_submodule(f.attn))
        ln_b = getattr(b.get_submodule(f.resid_pre), "bias", None)
        vb = ln_b @ W_V if ln_b is not None else None
        if b_V is not None:
            vb = b_V if vb is None else vb + b_V
        if vb is None:
            return None
        dh = f.w_o(b.get_submodule(f.out_proj)).shape[0] // self.n_heads
        n_kv = vb.shape[0] // dh
        return vb.view(n_kv, dh).repeat_interleave(self.n_heads // n_kv, dim=0).reshape(-1)

    def output_bias(self, layer: int) -> torch.Tensor:
        """``b_O`` in this mode: the per-head results at a layer plus this vector sum to ``attn_out``."""
        f = self._table("output_bias")
        out_proj = self._blocks[layer].get_submodule(f.out_proj)
        W_O = f.w_o(out_proj)
        b_O = out_proj.bias
        if b_O is None:
            b_O = torch.zeros(W_O.shape[1], dtype=W_O.dtype, device=W_O.device)
        if self.mode == "raw":
            return b_O
        vb = self._value_bias(layer)
        if vb is not None:
            b_O = b_O + vb @ W_O
        return _centre(b_O) if f.centred else b_O

    @torch.no_grad()
    def attention(self, ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
        """The head's attention pattern ``(B, T_query, T_key)`` (causal, and windowed where the layer has a sliding
        window; rows sum to 1). q and k are recomputed from the attention module's input as the family's table
        says, rotary positions included; a query head reads key head ``head // (n_heads // n_kv_heads)``."""
        f = self._table("an attention pattern")
        attn = self._blocks[layer].get_submodule(f.attn)
        cap = {}

        def hook(mod, args, kwargs):
            cap["x"] = _input_of(args, kwargs)
            cap["pos"] = kwargs.get("position_embeddings")
            raise _Stop

        h = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self._forward(ids)
        except _Stop:
            pass
        finally:
            h.remove()
        q, k = f.qk(attn, cap["x"], cap["pos"])
        q, k = q[:, head], k[:, head // (q.shape[1] // k.shape[1])]
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        i = torch.arange(ids.shape[1], device=scores.device)
        allowed = i[None, :] <= i[:, None]
        window = f.window(attn)
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    @torch.no_grad()
    def check_token_order(self, texts: list[str], shuffles: int = 8, margin: float = 0.05) -> None:
        """Refuse a character vocabulary in the wrong order: the model must predict the next token of its own
        inputs ``texts`` better than it does with the ordinary tokens' ids shuffled (what a list in the wrong order
        does to them). Measured: the shipped counting model gets 0.44 of next tokens right, 0.15-0.21 shuffled."""
        tok = self.tokenizer
        if not isinstance(tok, CharVocab) or not texts:
            return
        ids = self.batch([self.encode(t) for t in texts[:64]]).ids
        special = {tok.bos_id, tok.eos_id, tok.pad_id}
        ordinary = torch.tensor([i for i in range(tok.vocab_size) if i not in special])
        if len(ordinary) < 3:
            return

        def accuracy(x: torch.Tensor) -> float:
            pred = self._forward(x).logits[:, :-1].argmax(-1).cpu()
            target, real = x[:, 1:], x[:, 1:] != tok.pad_id
            return float(((pred == target) & real).sum() / real.sum().clamp_min(1))

        g = torch.Generator().manual_seed(0)
        mine, shuffled = accuracy(ids), []
        for _ in range(shuffles):
            perm = torch.arange(tok.vocab_size)
            perm[ordinary] = ordinary[torch.randperm(len(ordinary), generator=g)]
            shuffled.append(accuracy(perm[ids]))
        if mine < max(shuffled) + margin:
            raise UserError(
                f"the probed model predicts its own inputs no better than with its vocabulary shuffled (next-token "
                f"accuracy {mine:.2f}, shuffled up to {max(shuffled):.2f}): the vocabulary's tokens are probably not "
                "in the order the model was trained with (a token's id is its index in [probed] vocab.tokens)"
            )

    def _forward(self, ids: torch.Tensor):
        return self.model(
            input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids, device=self.device), use_cache=False
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _check_model_dir(path: str, read_vocab: bool) -> dict | None:
    """Refuse a local path that is no model directory (or a path-like name that does not exist); when
    ``read_vocab``, the character vocabulary in the directory's ``vocab.json``, if it holds one."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"probed model directory {path} has no config.json")
        if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
            raise UserError(f"probed model directory {path} has no weights (model.safetensors or pytorch_model.bin)")
        if read_vocab and (local / "vocab.json").is_file() and _is_char_vocab(local / "vocab.json"):
            return json.loads((local / "vocab.json").read_text())
    elif path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1:
        raise UserError(f"probed model directory {path} does not exist")
    return None


def _load_config(path: str):
    """The model's HF config (a family without a site table is logged, not refused)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # hub id not found, no network, malformed config.json ...
        raise UserError(f"could not load the probed model config from {path}: {str(e).splitlines()[0]}") from None
    if family_of(config) is None:
        log.info(
            "model_type %r of %s has no site table: only module sites (module:<path>:input|output) can be read from it",
            config.model_type,
            path,
        )
    return config


def _load_weights(path: str, dtype: torch.dtype, device: str | torch.device):
    """The causal LM in ``dtype`` on ``device``, without HF's progress bar."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        _fuse_gelu(model)
        # transformers wraps PreTrainedModel.to in functools.wraps, whose stub takes the bound model for an argument
        return model.to(device)  # type: ignore[arg-type]
    except Exception as e:
        raise UserError(f"could not load the probed model weights from {path}: {str(e).splitlines()[0]}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _fuse_gelu(model: torch.nn.Module) -> None:
    """Replace GPT-2's ``gelu_new`` modules (tanh-approximate GELU in five elementwise operations) with PyTorch's
    fused tanh GELU: the same function (to within 3e-7) in one pass, 2-4x faster on a CPU, where it is most of a
    small model's forward time."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    if swapped:
        log.debug("gelu_new: %d modules use the fused tanh GELU", swapped)


def _load_tokenizer(
    path: str, config, vocab: dict | CharVocab | None, tokenizer: str | None
) -> CharVocab | HFTokenizer:
    """``vocab`` if given, else the built-in tokenizer named ``tokenizer``, else the HF tokenizer files at ``path``."""
    from transformers import AutoTokenizer

    from .tokenizer import GPT2_VOCAB_SIZE, named_tokenizer

    if vocab is not None:
        return vocab if isinstance(vocab, CharVocab) else CharVocab.from_dict(vocab)
    if tokenizer:
        return named_tokenizer(tokenizer)
    try:
        hf = AutoTokenizer.from_pretrained(path)
        # transformers 5 builds an empty tokenizer (1 token, encodes nothing) for a directory without
        # tokenizer files instead of failing: that is no tokenizer either
        if len(hf) < 2 or not hf.encode("a b", add_special_tokens=False):
            raise ValueError("empty tokenizer")
        return HFTokenizer(hf)
    except Exception:
        hint = ""
        if getattr(config, "vocab_size", None) == GPT2_VOCAB_SIZE:
            hint = (
                f"; its vocabulary has {GPT2_VOCAB_SIZE} tokens, as GPT-2's: for GPT-2's own tokenizer "
                'set tokenizer = "gpt2" in [probed] (built in, offline)'
            )
        raise UserError(
            f"no tokenizer for {path}: add HF tokenizer files to it, or describe a character "
            f"vocabulary (vocab = {{tokens = [...], bos = ..., eos = ..., pad = ...}}){hint}"
        ) from None


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
