"""Reference activations from TransformerLens, for ``tests/test_tl_reference.py`` (CI has no TransformerLens).

For the shipped counting and addition probed models and three tiny random models (GPT-2, GPT-NeoX with
Pythia's parallel residual and partial rotary, Llama with grouped-query attention and q/k/v/o biases), built
here with a fixed seed and saved under ``tests/fixtures/tl/models/``, this computes TransformerLens's
activations under its default weight processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``) at every site inversionview supports -- ``hook_resid_pre``, ``hook_resid_mid`` (where
the block has one), ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out`` and ``attn.hook_result`` per
head -- on a few inputs, and writes one ``tests/fixtures/tl/{model}.safetensors`` per model: for input ``i``,
``{i}/ids`` (its token ids) and ``{i}/{site}`` (T, d_model) float32, with TransformerLens's version in the
metadata. Inputs run one at a time (no padding). TransformerLens runs in float64.

Run once, out of tree, in a throwaway environment with TransformerLens (never a plain ``torch``)::

    python3 -m venv /tmp/tl && /tmp/tl/bin/pip install torch==2.13.0 transformer-lens
    PYTHONPATH=src /tmp/tl/bin/python scripts/make_tl_fixtures.py

TransformerLens 4 (``TransformerBridge`` in compatibility mode) and older releases (``HookedTransformer``, built
from the HF weights with TransformerLens's own weight converters) are both supported. The committed fixtures come
from TransformerLens 4.3.0 (transformers 5.24.0). TransformerLens 2.16.1 (with transformers 4.57.6) gave the
same values, within 4e-6, for every model but the Llama one: its Llama converter assumes "llama has no biases
anywhere" and drops the q/k/v/o biases of ``attention_bias=True`` (without biases the two agree within 1e-8).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from inversionview.run import SHIPPED
from inversionview.tasks import get_task
from inversionview.tokenizer import CharVocab

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "tl"
COUNTING_TEXTS = ["abca|a:2", "zzzyxzy|z:4", "qr|q:1"]
ADDITION_TEXTS = ["480+484=964", "100+999=1099"]
D, LAYERS, HEADS = 32, 2, 4
_COMMON = dict(
    hidden_size=D,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=2 * D,
    max_position_embeddings=24,
)
RANDOM = {  # name -> (config class, overrides)
    "gpt2": ("GPT2Config", dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_inner=4 * D, n_positions=24)),
    "gpt_neox": ("GPTNeoXConfig", {**_COMMON, "use_parallel_residual": True, "rotary_pct": 0.25}),
    "llama": ("LlamaConfig", {**_COMMON, "num_key_value_heads": 2, "attention_bias": True}),
}


def build_random(name: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model of one family with the counting vocabulary, with non-trivial norm weights and biases
    (so that TransformerLens's folding and centring matter), saved with its ``vocab.json``."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kw = RANDOM[name]
    v = get_task("counting").vocab
    cfg = getattr(transformers, cls_name)(
        vocab_size=v.vocab_size,
        bos_token_id=v.bos_id,
        eos_token_id=v.eos_id,
        pad_token_id=v.pad_id,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(v.to_dict(), indent=1))
    return path


def hf_tokenizer(v: CharVocab):
    """A word-level HF tokenizer over a character vocabulary (TransformerLens wants one; ids are given anyway)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(v.tokens)}, unk_token=v.pad))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=v.bos, eos_token=v.eos, pad_token=v.pad)


def tl_model(path: Path, v: CharVocab):
    """TransformerLens's model of the HF model in ``path``, float64, default processing, per-head results on."""
    import tempfile

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    with tempfile.TemporaryDirectory() as tmp:  # TransformerLens reads the config and tokenizer from a directory
        hf.save_pretrained(tmp)
        hf_tokenizer(v).save_pretrained(tmp)
        try:
            from transformer_lens import HookedTransformer  # noqa: F401  (gone in TransformerLens 4)
        except ImportError:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(tmp, hf_model=hf, dtype=torch.float64)
            model.enable_compatibility_mode(disable_warnings=True)
        else:
            model = legacy_model(tmp, hf, v)
    model.set_use_attn_result(True)
    return model.eval()


def legacy_model(tmp: str, hf, v: CharVocab):
    """TransformerLens < 4: what ``HookedTransformer.from_pretrained`` does with its defaults, for a local model
    (which ``from_pretrained`` refuses): TransformerLens's config and weight conversion, then its processing."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lp
    from transformers import AutoTokenizer

    if hf.config.model_type == "gpt2":  # TransformerLens reads GPT-2's context length from n_ctx
        hf.config.n_ctx = hf.config.n_positions
        hf.config.save_pretrained(tmp)
    cfg = lp.get_pretrained_model_config(
        tmp, hf_cfg=hf.config.to_dict(), fold_ln=True, dtype=torch.float64, default_prepend_bos=False
    )
    state = lp.get_pretrained_state_dict(tmp, cfg, hf, dtype=torch.float64)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(tmp), move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return model


def sites(model) -> list[str]:
    """The site names inversionview supports that this TransformerLens model has, in forward order."""
    cfg = model.cfg
    out = []
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        out.append(f"{b}.hook_resid_pre")
        out += [f"{b}.attn.hook_result.{h}" for h in range(cfg.n_heads)]
        out.append(f"{b}.hook_attn_out")
        if not getattr(cfg, "parallel_attn_mlp", False):
            out.append(f"{b}.hook_resid_mid")
        out += [f"{b}.hook_mlp_out", f"{b}.hook_resid_post"]
    return out


@torch.no_grad()
def activations(model, ids: list[int], names: list[str]) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(torch.tensor([ids]))
    out = {}
    for name in names:
        if ".attn.hook_result." in name:
            hook, head = name.rsplit(".", 1)
            out[name] = cache[hook][0, :, int(head)]
        else:
            out[name] = cache[name][0]
    return out


def make(name: str, path: Path, texts: list[str]) -> Path:
    v = CharVocab.from_dict(json.loads((path / "vocab.json").read_text()))
    model = tl_model(path, v)
    names = sites(model)
    tensors = {}
    for i, text in enumerate(texts):
        ids = v.encode(text)
        tensors[f"{i}/ids"] = torch.tensor(ids)
        for site, x in activations(model, ids, names).items():
            tensors[f"{i}/{site}"] = x.to(torch.float32).contiguous()
    meta = {
        "model": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "texts": json.dumps(texts),
        "sites": json.dumps(names),
        "transformer_lens": version("transformer-lens"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "processing": "fold_ln, center_writing_weights, center_unembed, fold_value_biases",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)
    return OUT / f"{name}.safetensors"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model names to (re)make (default: all)")
    args = ap.parse_args(argv)
    jobs = {
        "counting": (SHIPPED / "counting" / "probed", COUNTING_TEXTS),
        "addition": (SHIPPED / "addition" / "probed", ADDITION_TEXTS),
    }
    for name in RANDOM:
        jobs[name] = (OUT / "models" / name, COUNTING_TEXTS)
    for name, (path, texts) in jobs.items():
        if args.only and name not in args.only:
            continue
        if name in RANDOM:
            build_random(name, path)
        out = make(name, path, texts)
        print(f"{name}: {out} ({out.stat().st_size / 1024:.0f} KiB), TransformerLens {version('transformer-lens')}")


if __name__ == "__main__":
    main()
