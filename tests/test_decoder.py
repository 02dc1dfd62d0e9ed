"""The decoder: KV cache, sampling, the prefix slot, and its files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inversionview.decoder import Decoder, DecoderConfig
from inversionview.errors import UserError

BOS, EOS = 1, 2
CFG = DecoderConfig(vocab_size=11, max_len=16, d_act=8, n_sites=3, d_model=16, n_layers=2, n_heads=2, n_act_blocks=2)


def make_decoder(seed: int = 0, counts: bool = False) -> Decoder:
    """A tiny decoder with weights large enough that its outputs depend visibly on every input (with ``counts``,
    also on the counts of the tokens so far)."""
    torch.manual_seed(seed)
    dec = Decoder(dataclasses.replace(CFG, prefix_counts=counts))
    norms = {f"{n}.weight" for n, m in dec.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.startswith(("site_mean", "site_scale", "site_emb")):
                continue
            if name in norms:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return dec.eval()


@pytest.fixture(scope="module")
def dec():
    return make_decoder()


def _inputs(B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, CFG.d_act, generator=g) * 3
    site = torch.arange(B) % CFG.n_sites
    ids = torch.randint(3, CFG.vocab_size, (B, T), generator=g)
    ids[:, 0] = BOS
    return z, site, ids


def test_logit_shape(dec):
    z, site, ids = _inputs()
    with torch.no_grad():
        out = dec(ids, z, site)
    assert out.shape == (3, 7, CFG.vocab_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("counts", [False, True])
def test_kv_cache_matches_full_recomputation(counts):
    """Token by token and in chunks, the cache gives the full forward; with prefix counts the running count travels
    in the cache (a decoder that restarted the counts at each call would fail here)."""
    dec = make_decoder(counts=counts)
    z, site, ids = _inputs()
    with torch.no_grad():
        full = dec(ids, z, site)
        # one token at a time
        caches = dec.condition(z, site)
        steps = torch.cat([dec(ids[:, t : t + 1], None, None, caches) for t in range(ids.shape[1])], 1)
        # a chunk, then single tokens, then a chunk (T > 1 with a non-empty cache)
        caches = dec.condition(z, site)
        parts = [
            dec(ids[:, :3], None, None, caches),
            dec(ids[:, 3:4], None, None, caches),
            dec(ids[:, 4:], None, None, caches),
        ]
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # the cache holds the prefix slot plus every token
    assert caches[0][0].shape[2] == 1 + ids.shape[1]


def test_causal(dec):
    z, site, ids = _inputs()
    other = ids.clone()
    other[:, 4:] = (other[:, 4:] + 1 - 3) % (CFG.vocab_size - 3) + 3
    with torch.no_grad():
        a, b = dec(ids, z, site), dec(other, z, site)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_prefix_slot_conditions_every_position(dec):
    z, site, ids = _inputs()
    with torch.no_grad():
        base = dec(ids, z, site)
        moved = dec(ids, z + torch.randn_like(z), site)
        other_site = dec(ids, z, (site + 1) % CFG.n_sites)
    for changed in (moved, other_site):
        # every position, the first included, sees the prefix slot
        diff = (changed - base).abs().amax(-1)
        assert (diff > 1e-4).all(), diff
    # a row only sees its own z
    z2 = z.clone()
    z2[1] += 5
    with torch.no_grad():
        part = dec(ids, z2, site)
    torch.testing.assert_close(part[[0, 2]], base[[0, 2]], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(part[1], base[1], atol=1e-4)


def test_site_normaliser(dec):
    z, site, ids = _inputs()
    d = make_decoder()
    acts = torch.randn(50, CFG.d_act) * 4 + 7
    d.init_site_stats(2, acts)
    torch.testing.assert_close(d.site_mean[2].detach(), acts.mean(0))
    want = (acts - acts.mean(0)).pow(2).sum(-1).mean().sqrt() / CFG.d_act**0.5
    torch.testing.assert_close(d.site_scale[2].detach(), want)
    # shifting z and the site mean together leaves the output unchanged
    shift = torch.randn(CFG.d_act)
    with torch.no_grad():
        d.site_mean[site[0]] += shift
        a = d(ids[:1], z[:1] + shift, site[:1])
        d.site_mean[site[0]] -= shift
        b = d(ids[:1], z[:1], site[:1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _check_sequences(seqs, max_len):
    for s in seqs:
        assert s[0] == BOS
        assert 1 < len(s) <= max_len
        assert EOS not in s[1:-1]
        assert s[-1] == EOS or len(s) == max_len
        assert all(0 <= t < CFG.vocab_size for t in s)


def _eos_prone(strength: float = 0.3, counts: bool = False):
    """A decoder whose EOS logit is raised by a constant, so that some samples end early and others run on."""
    d = make_decoder(seed=3, counts=counts)
    with torch.no_grad():
        d.ln_f.bias[0] = 3.0
        d.tok.weight[EOS] = 0.0
        d.tok.weight[EOS, 0] = strength
    return d


def test_generate_reproducible_and_well_formed():
    d = _eos_prone()
    z = torch.randn(12, CFG.d_act) * 3
    site = torch.arange(12) % CFG.n_sites
    runs = [
        d.generate(z, site, BOS, EOS, 1.0, max_len=10, generator=torch.Generator().manual_seed(7)) for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 12
    _check_sequences(runs[0], 10)
    other = d.generate(z, site, BOS, EOS, 1.0, max_len=10, generator=torch.Generator().manual_seed(8))
    assert other != runs[0]
    # default max_len is the config's
    _check_sequences(d.generate(z, site, BOS, EOS, 1.0, generator=torch.Generator().manual_seed(1)), CFG.max_len)


def test_generate_both_endings_occur():
    d = _eos_prone()
    z = torch.randn(48, CFG.d_act) * 3
    site = torch.arange(48) % CFG.n_sites
    seqs = d.generate(z, site, BOS, EOS, 1.5, max_len=8, generator=torch.Generator().manual_seed(0))
    _check_sequences(seqs, 8)
    ends = {s[-1] == EOS for s in seqs}
    assert ends == {True, False}, "expected some sequences to end at EOS and some at max_len"


def _greedy(d, z, site, max_len):
    out = []
    with torch.no_grad():
        for i in range(z.shape[0]):
            ids = [BOS]
            while len(ids) < max_len:
                logits = d(torch.tensor([ids]), z[i : i + 1], site[i : i + 1])[0, -1]
                ids.append(int(logits.argmax()))
                if ids[-1] == EOS:
                    break
            out.append(ids)
    return out


@pytest.mark.parametrize("counts", [False, True])
def test_low_temperature_is_greedy(counts):
    """Also with prefix counts: finished rows leave the batch, and the others keep their own running counts."""
    d = _eos_prone(0.5, counts)
    z = torch.randn(4, CFG.d_act, generator=torch.Generator().manual_seed(0)) * 3
    site = torch.arange(4) % CFG.n_sites
    want = _greedy(d, z, site, 7)
    assert {w[-1] == EOS for w in want} == {True, False}  # both endings are exercised
    got = d.generate(z, site, BOS, EOS, 1e-6, max_len=7, generator=torch.Generator().manual_seed(0))
    assert got == want
    # per-row temperatures: rows at a tiny temperature stay greedy even beside hot rows
    tau = torch.tensor([1e-6, 5.0, 1e-6, 5.0])
    mixed = d.generate(z, site, BOS, EOS, tau, max_len=7, generator=torch.Generator().manual_seed(3))
    for i in (0, 2):
        assert mixed[i] == want[i]


def test_token_probs(dec):
    z, site, ids = _inputs()
    p = dec.token_probs(ids, z, site)
    assert p.shape == (3, 6)
    with torch.no_grad():
        want = dec(ids[:, :-1], z, site).softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(p, want, atol=1e-6, rtol=1e-5)
    assert ((p > 0) & (p < 1)).all()


def test_save_load_round_trip(dec, tmp_path):
    dec.save(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    back = Decoder.load(tmp_path)
    assert back.config == dec.config
    assert not back.training
    for (k, a), (k2, b) in zip(dec.state_dict().items(), back.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    z, site, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, z, site), dec(ids, z, site), atol=0, rtol=0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert back.generate(z, site, BOS, EOS, 1.0, 8, g1) == dec.generate(z, site, BOS, EOS, 1.0, 8, g2)


def test_corrupt_weights_raise_user_error(dec, tmp_path):
    dec.save(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()

    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt"):
        Decoder.load(tmp_path)

    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt"):
        Decoder.load(tmp_path)

    path.unlink()
    with pytest.raises(UserError, match="missing"):
        Decoder.load(tmp_path)


def test_weights_not_matching_config_raise_user_error(dec, tmp_path):
    dec.save(tmp_path)
    import dataclasses

    dataclasses.replace(CFG, d_model=32, n_heads=4).save(tmp_path / "config.json")
    with pytest.raises(UserError, match="does not match config.json"):
        Decoder.load(tmp_path)


def test_bad_config_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        Decoder.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Decoder.load(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 5}')  # required fields missing
    with pytest.raises(UserError, match="corrupt"):
        Decoder.load(tmp_path)
