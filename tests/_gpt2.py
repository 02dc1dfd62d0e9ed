"""A tiny GPT-2-shaped probed model for the GPT-2 tests: GPT-2's vocabulary (50,257 tokens) and special-token ids,
random weights, and no tokenizer files (the tests read it with tokenizer = "gpt2")."""

from __future__ import annotations

from pathlib import Path

import torch

GPT2_VOCAB = 50257
EOT = 50256  # <|endoftext|>


def make_gpt2_dir(path: Path, seed: int = 0, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=128,
        bos_token_id=EOT,
        eos_token_id=EOT,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters, so that TL processing matters
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    assert not list(Path(path).glob("tokenizer*")) and not list(Path(path).glob("vocab*"))
    return Path(path)
