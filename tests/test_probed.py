"""Reading sites from the probed model: equalities against HF's own outputs and against the TransformerLens
formulas, all in float64."""

from __future__ import annotations

import pytest
import torch

from test_families import FAMILIES, _hf_internals as _family_internals

from inversionview.errors import UserError
from inversionview.probed import ProbedModel
from inversionview.sites import Site, all_sites

TEXTS = ["abca|a:2", "zzzyxzy|z:4", "qr|q:1"]
ATOL = 1e-10


@pytest.fixture(scope="module")
def raw(probed_dir):
    p = ProbedModel.load(probed_dir, mode="raw", dtype=torch.float64)
    assert p.model.transformer.wte.weight.dtype == torch.float64
    return p


@pytest.fixture(scope="module")
def tl(raw):
    return ProbedModel(raw.model, raw.tokenizer, mode="tl")


@pytest.fixture(scope="module")
def batch(raw):
    return raw.batch([raw.encode(t) for t in TEXTS])


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def _hf_internals(model, ids):
    """HF hidden states plus, from hooks, each block's output, attention-module output, MLP output and the
    input of attn.c_proj (the concatenated per-head z): the family tests' helper with GPT-2's layout."""
    return _family_internals(model, FAMILIES["gpt2"][2], ids)


def test_batch_pads_and_masks(raw, batch):
    tok = raw.tokenizer
    assert batch.ids.shape == (3, max(len(t) for t in TEXTS) + 2)
    assert batch.lengths.tolist() == [len(t) + 2 for t in TEXTS]
    for i, t in enumerate(TEXTS):
        n = len(t) + 2
        assert batch.ids[i, 0] == tok.bos_id and batch.ids[i, n - 1] == tok.eos_id
        assert (batch.ids[i, n:] == tok.pad_id).all()
        # BOS and text valid; EOS and PAD not
        assert batch.valid[i, : n - 1].all()
        assert not batch.valid[i, n - 1 :].any()


def test_raw_resid_equals_hf_hidden_states(raw, batch):
    ids = batch.ids
    hs, cap = _hf_internals(raw.model, ids)
    n = raw.n_layers
    assert len(hs) == n + 1
    acts = raw.run(ids, raw.sites)
    for L in range(n):
        torch.testing.assert_close(acts[Site(L, "resid_pre")], hs[L], atol=ATOL, rtol=0)
        # the block output; HF's last hidden state has ln_f applied, so compare with the hook there
        torch.testing.assert_close(acts[Site(L, "resid_post")], cap[("block", L)], atol=ATOL, rtol=0)
        if L < n - 1:
            torch.testing.assert_close(acts[Site(L, "resid_post")], hs[L + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(acts[Site(L, "attn_out")], cap[("attn", L)], atol=ATOL, rtol=0)
        torch.testing.assert_close(acts[Site(L, "resid_mid")], hs[L] + cap[("attn", L)], atol=ATOL, rtol=0)
        torch.testing.assert_close(acts[Site(L, "mlp_out")], cap[("mlp", L)], atol=ATOL, rtol=0)
    # sanity: the final hidden state really is ln_f of the last block's output (so the hook was needed)
    last = acts[Site(n - 1, "resid_post")]
    torch.testing.assert_close(raw.model.transformer.ln_f(last), hs[n], atol=ATOL, rtol=0)
    assert not torch.allclose(last, hs[n])


def test_shapes_and_dtype(raw, tl, batch):
    for p in (raw, tl):
        acts = p.run(batch.ids, p.sites)
        assert set(acts) == set(all_sites(raw.n_layers, raw.n_heads))
        for v in acts.values():
            assert v.shape == (*batch.ids.shape, raw.d_model)
            assert v.dtype == torch.float64


@pytest.mark.parametrize("mode", ["raw", "tl"])
def test_head_results_plus_bias_sum_to_attn_out(mode, raw, tl, batch):
    p = raw if mode == "raw" else tl
    for L in range(p.n_layers):
        heads = [Site(L, "result", h) for h in range(p.n_heads)]
        acts = p.run(batch.ids, heads + [Site(L, "attn_out")])
        total = sum(acts[s] for s in heads) + p.output_bias(L)
        torch.testing.assert_close(total, acts[Site(L, "attn_out")], atol=ATOL, rtol=0)
        # and the heads are not all equal to attn_out / n (the split is real)
        assert not torch.allclose(acts[heads[0]], acts[heads[1]])


def test_raw_head_result_is_z_times_WO(raw, batch):
    _, cap = _hf_internals(raw.model, batch.ids)
    dh = raw.d_model // raw.n_heads
    for L in range(raw.n_layers):
        W_O = raw.model.transformer.h[L].attn.c_proj.weight  # Conv1D: (d_in, d_out)
        for h in range(raw.n_heads):
            z = cap[("z", L)][..., h * dh : (h + 1) * dh]
            want = z @ W_O[h * dh : (h + 1) * dh]
            got = raw.run(batch.ids, [Site(L, "result", h)])[Site(L, "result", h)]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_tl_resid_and_outputs_are_centred_raw(raw, tl, batch):
    r = raw.run(batch.ids, raw.sites)
    t = tl.run(batch.ids, tl.sites)
    for s in raw.sites:
        if s.kind == "result":
            continue
        torch.testing.assert_close(t[s], _centre(r[s]), atol=ATOL, rtol=0)
        assert t[s].mean(-1).abs().max() < 1e-12
    # the raw values are not centred (the test model has non-trivial biases), so the modes differ
    assert r[Site(0, "resid_pre")].mean(-1).abs().max() > 1e-3


def test_tl_head_result_formula(raw, tl, batch):
    """centre((z_h - (ln1.b @ W_V + b_V)[h]) @ W_O[h]), computed here from the HF weights."""
    _, cap = _hf_internals(raw.model, batch.ids)
    d, dh = raw.d_model, raw.d_model // raw.n_heads
    for L in range(raw.n_layers):
        blk = raw.model.transformer.h[L]
        W = blk.attn.c_attn.weight  # (d, 3d), columns q | k | v
        b = blk.attn.c_attn.bias
        W_V, b_V = W[:, 2 * d :], b[2 * d :]
        vbias = blk.ln_1.bias @ W_V + b_V
        W_O = blk.attn.c_proj.weight
        for h in range(raw.n_heads):
            sl = slice(h * dh, (h + 1) * dh)
            want = _centre((cap[("z", L)][..., sl] - vbias[sl]) @ W_O[sl])
            got = tl.run(batch.ids, [Site(L, "result", h)])[Site(L, "result", h)]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            # the correction matters: the naive centred z_h @ W_O differs by a constant vector
            naive = _centre(cap[("z", L)][..., sl] @ W_O[sl])
            assert (naive - got).norm(dim=-1).min() > 1e-3


def test_tl_output_bias(raw, tl):
    for L in range(raw.n_layers):
        torch.testing.assert_close(raw.output_bias(L), raw.model.transformer.h[L].attn.c_proj.bias)
        assert abs(float(tl.output_bias(L).mean())) < 1e-12


def test_stops_early(raw, batch):
    first = [Site(0, "resid_pre"), Site(0, "result", 1), Site(0, "resid_mid")]
    last = Site(raw.n_layers - 1, "resid_post")
    together = raw.run(batch.ids, first + [last])
    alone = raw.run(batch.ids, first)
    for s in first:
        torch.testing.assert_close(alone[s], together[s], atol=0, rtol=0)

    calls = []
    hooks = [
        raw.model.transformer.h[-1].register_forward_pre_hook(lambda m, a: calls.append("last block")),
        raw.model.transformer.h[0].mlp.register_forward_pre_hook(lambda m, a: calls.append("mlp0")),
        raw.model.transformer.ln_f.register_forward_pre_hook(lambda m, a: calls.append("ln_f")),
    ]
    try:
        raw.run(batch.ids, first)
        assert calls == []  # stopped at layer 0's ln_2, before the MLP
        raw.run(batch.ids, [last])
        assert calls == ["mlp0", "last block"]  # the full stack ran, but not ln_f
    finally:
        for h in hooks:
            h.remove()
    # the hooks the model installed are gone: a plain forward still works and reaches ln_f
    with torch.no_grad():
        raw.model(input_ids=batch.ids)


def test_run_deduplicates_and_empty(raw, batch):
    assert raw.run(batch.ids, []) == {}
    s = Site(1, "mlp_out")
    out = raw.run(batch.ids, [s, s])
    assert list(out) == [s]


def test_padding_does_not_change_earlier_positions(raw, batch):
    sites = [Site(1, "resid_post"), Site(1, "result", 0)]
    padded = raw.run(batch.ids, sites)
    for i, t in enumerate(TEXTS):
        ids = torch.tensor([raw.encode(t)])
        alone = raw.run(ids, sites)
        for s in sites:
            torch.testing.assert_close(padded[s][i, : ids.shape[1]], alone[s][0], atol=ATOL, rtol=0)


def test_attention_matches_hf_eager(probed_dir, raw, batch):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(probed_dir, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        out = eager(input_ids=batch.ids, output_attentions=True, use_cache=False)
    assert out.attentions is not None and len(out.attentions) == raw.n_layers
    T = batch.ids.shape[1]
    for L in range(raw.n_layers):
        for h in range(raw.n_heads):
            a = raw.attention(batch.ids, L, h)
            assert a.shape == (len(TEXTS), T, T)
            torch.testing.assert_close(a.sum(-1), torch.ones(len(TEXTS), T, dtype=a.dtype), atol=1e-12, rtol=0)
            assert (a.triu(1) == 0).all()  # causal
            torch.testing.assert_close(a, out.attentions[L][:, h], atol=1e-10, rtol=0)


def test_attention_is_softmax_of_scaled_scores(raw, batch):
    """Independent of HF's attention outputs: softmax(q k^T / sqrt(d_head)) from the weights."""
    hs, _ = _hf_internals(raw.model, batch.ids)
    d, dh = raw.d_model, raw.d_model // raw.n_heads
    L, h = 1, 1
    blk = raw.model.transformer.h[L]
    qkv = blk.ln_1(hs[L]) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
    q, k = qkv[..., h * dh : (h + 1) * dh], qkv[..., d + h * dh : d + (h + 1) * dh]
    T = batch.ids.shape[1]
    scores = (q @ k.transpose(-1, -2)) / dh**0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(raw.attention(batch.ids, L, h), scores.softmax(-1), atol=1e-12, rtol=0)


def test_fingerprint(probed_dir, tmp_path):
    a = ProbedModel.load(probed_dir, mode="raw")
    b = ProbedModel.load(probed_dir, mode="tl")
    c = ProbedModel.load(probed_dir, mode="raw", dtype=torch.float64)
    assert isinstance(a.fingerprint, str) and len(a.fingerprint) == 16
    assert a.fingerprint == b.fingerprint == c.fingerprint  # stable across reloads, modes and load dtype

    a.save(tmp_path / "copy")
    assert ProbedModel.load(tmp_path / "copy").fingerprint == a.fingerprint

    with torch.no_grad():
        a.model.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-3
    changed = ProbedModel(a.model, a.tokenizer, mode="raw")
    assert changed.fingerprint != b.fingerprint


def test_fingerprint_differs_between_models(tmp_path, probed_dir):
    from conftest import make_probed_dir

    other = make_probed_dir(tmp_path / "other", seed=1)
    assert ProbedModel.load(other).fingerprint != ProbedModel.load(probed_dir).fingerprint


def test_unknown_site_and_mode(raw, probed_dir):
    with pytest.raises(UserError, match="did you mean"):
        raw.site("a0.5")
    assert raw.site("blocks.1.attn.hook_result.0") == Site(1, "result", 0)
    with pytest.raises(UserError, match="mode"):
        ProbedModel(raw.model, raw.tokenizer, mode="processed")


def _tl_cache_v4(probed_dir, ids, process: bool, tmp):
    """TransformerLens >= 4: a TransformerBridge over a fresh HF copy, in compatibility mode."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformer_lens.model_bridge import TransformerBridge

    from inversionview.tasks import get_task

    v = get_task("counting").vocab
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(v.tokens)}, unk_token=v.pad))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=v.bos, eos_token=v.eos, pad_token=v.pad)
    hf = AutoModelForCausalLM.from_pretrained(probed_dir, dtype=torch.float64)  # the bridge edits it in place
    d = tmp / f"tl-{process}"  # the bridge (re)loads its tokenizer from the model's directory
    hf.save_pretrained(d)
    fast.save_pretrained(d)
    bridge = TransformerBridge.boot_transformers(str(d), hf_model=hf, dtype=torch.float64)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process)
    if hasattr(bridge, "set_use_attn_result"):
        bridge.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    return cache


def _tl_cache_legacy(hf, ids, process: bool):
    """TransformerLens < 4: HookedTransformer loaded from the HF weights with its default processing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    except ImportError:  # older layout
        from transformer_lens.loading_from_pretrained import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        dtype=torch.float64,
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    state = {k: v.clone() for k, v in convert_gpt2_weights(hf, cfg).items()}
    model.load_and_process_state_dict(
        state, fold_ln=process, center_writing_weights=process, center_unembed=process, fold_value_biases=process
    )
    model.set_use_attn_result(True)
    model.eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    return cache


def test_matches_transformer_lens(probed_dir, raw, tl, batch, tmp_path):
    """TransformerLens itself, with its default processing (fold_ln, centre writing weights, fold value
    biases), gives the tl-mode values; without processing it gives the raw values."""
    pytest.importorskip("transformer_lens")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401  (removed in TransformerLens 4)
    except (ImportError, AttributeError):
        legacy = False
    else:
        legacy = True

    for probed, process in ((tl, True), (raw, False)):
        if legacy:
            cache = _tl_cache_legacy(raw.model, batch.ids, process)
        else:
            cache = _tl_cache_v4(probed_dir, batch.ids, process, tmp_path)
        acts = probed.run(batch.ids, probed.sites)
        for s in probed.sites:
            if s.kind == "result":
                want = cache[f"blocks.{s.layer}.attn.hook_result"][:, :, s.head]
            else:
                want = cache[s.name]
            torch.testing.assert_close(
                acts[s],
                want.to(acts[s].dtype),
                atol=1e-6,
                rtol=0,
                msg=lambda m, s=s, p=probed: f"{p.mode} {s.name}: {m}",
            )
