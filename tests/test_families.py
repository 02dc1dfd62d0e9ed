"""The site table of each supported architecture family (GPT-2, GPT-NeoX with and without a parallel residual,
Llama, Qwen2, Mistral), on tiny random models saved to a temporary directory and loaded with
``ProbedModel.load``; an unknown family (OPT) and the module-path escape hatch. All comparisons in float64.

``HF`` below is this file's own statement of where each family keeps its parts, written independently of
``inversionview.probed``'s tables, so that a wrong table entry fails here."""

from __future__ import annotations

import pytest
import torch

from inversionview.errors import UserError
from inversionview.probed import SUPPORTED_FAMILIES, ProbedModel
from inversionview.sites import MODULE, Site, parse_site
from inversionview.tasks import get_task

TEXTS = ["abca|a:2", "zzzyxzy|z:4", "qr|q:1"]
ATOL = 1e-10
D, LAYERS, HEADS = 32, 2, 4

# family -> (config class, config overrides, where HF keeps the parts)
_LLAMA_HF = dict(
    blocks="model.layers",
    ln1="input_layernorm",
    attn="self_attn",
    o="self_attn.o_proj",
    ln2="post_attention_layernorm",
    mlp="mlp",
    final="model.norm",
)
_NEOX_HF = dict(
    blocks="gpt_neox.layers",
    ln1="input_layernorm",
    attn="attention",
    o="attention.dense",
    ln2="post_attention_layernorm",
    mlp="mlp",
    final="gpt_neox.final_layer_norm",
)
FAMILIES = {
    "gpt2": (
        "GPT2Config",
        dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_inner=2 * D, n_positions=40),
        dict(
            blocks="transformer.h",
            ln1="ln_1",
            attn="attn",
            o="attn.c_proj",
            ln2="ln_2",
            mlp="mlp",
            final="transformer.ln_f",
        ),
    ),
    # Pythia's layout: parallel residual, rotary on a quarter of each head
    "gpt_neox": ("GPTNeoXConfig", dict(use_parallel_residual=True, rotary_pct=0.25), _NEOX_HF),
    "gpt_neox_seq": ("GPTNeoXConfig", dict(use_parallel_residual=False, rotary_pct=0.5), _NEOX_HF),
    # grouped-query attention: 4 query heads, 2 key/value heads
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True), _LLAMA_HF),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2), _LLAMA_HF),  # q/k/v biases, no o_proj bias
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=3), _LLAMA_HF),
}
_COMMON = dict(
    hidden_size=D,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=2 * D,
    max_position_embeddings=40,
)


def _build(cls_name: str, overrides: dict, path, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    v = get_task("counting").vocab
    kw = dict(overrides) if cls_name == "GPT2Config" else {**_COMMON, **overrides}
    cfg = getattr(transformers, cls_name)(
        vocab_size=v.vocab_size, bos_token_id=v.bos_id, eos_token_id=v.eos_id, pad_token_id=v.pad_id, **kw
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so that the norm handling and TL processing matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ProbedModel(model, v, mode="raw").save(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
    """(family key, its HF layout, the saved directory, raw and tl ProbedModels in float64, a padded batch)."""
    key = request.param
    cls_name, overrides, hf = FAMILIES[key]
    path = _build(cls_name, overrides, tmp_path_factory.mktemp(key))
    raw = ProbedModel.load(path, mode="raw", dtype=torch.float64)
    tl = ProbedModel(raw.model, raw.tokenizer, mode="tl")
    batch = raw.batch([raw.encode(t) for t in TEXTS])
    return key, hf, path, raw, tl, batch


def _hf_internals(model, hf, ids):
    """HF hidden states plus, from hooks on the HF modules, each block's output, attention-module output, MLP
    output and the input of the attention output projection."""
    cap, handles = {}, []
    first = lambda x: x[0] if isinstance(x, tuple) else x  # noqa: E731
    for i, b in enumerate(model.get_submodule(hf["blocks"])):
        handles += [
            b.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("block", i), first(o))),
            b.get_submodule(hf["attn"]).register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("attn", i), o[0])),
            b.get_submodule(hf["mlp"]).register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("mlp", i), o)),
            b.get_submodule(hf["o"]).register_forward_pre_hook(lambda m, a, i=i: cap.__setitem__(("z", i), a[0])),
        ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states, cap


def _parallel(p: ProbedModel) -> bool:
    return bool(getattr(p.model.config, "use_parallel_residual", False))


def test_family_tables_cover_the_issue():
    assert set(SUPPORTED_FAMILIES) == {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"}


def test_loads_with_its_table(fam):
    key, hf, path, raw, tl, batch = fam
    assert raw.family is not None and raw.model_type in raw.family.model_types
    assert (raw.n_layers, raw.n_heads, raw.d_model) == (LAYERS, HEADS, D)
    assert next(raw.model.parameters()).dtype == torch.float64
    kinds = {s.kind for s in raw.sites}
    assert ("resid_mid" in kinds) == (not _parallel(raw))
    assert len(raw.sites) == LAYERS * (HEADS + (4 if _parallel(raw) else 5))


def test_resid_sites_equal_hf_hidden_states(fam):
    key, hf, path, raw, tl, batch = fam
    hs, cap = _hf_internals(raw.model, hf, batch.ids)
    assert len(hs) == LAYERS + 1
    acts = raw.run(batch.ids, raw.sites)
    for L in range(LAYERS):
        pre, post = acts[Site(L, "resid_pre")], acts[Site(L, "resid_post")]
        attn, mlp = acts[Site(L, "attn_out")], acts[Site(L, "mlp_out")]
        torch.testing.assert_close(pre, hs[L], atol=ATOL, rtol=0)
        torch.testing.assert_close(post, cap[("block", L)], atol=ATOL, rtol=0)
        if L < LAYERS - 1:
            torch.testing.assert_close(post, hs[L + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(attn, cap[("attn", L)], atol=ATOL, rtol=0)
        torch.testing.assert_close(mlp, cap[("mlp", L)], atol=ATOL, rtol=0)
        if _parallel(raw):
            torch.testing.assert_close(post, pre + attn + mlp, atol=ATOL, rtol=0)
        else:
            mid = acts[Site(L, "resid_mid")]
            torch.testing.assert_close(mid, pre + attn, atol=ATOL, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=ATOL, rtol=0)
    # HF's last hidden state has the final norm applied: resid_post of the last block is its input
    last = acts[Site(LAYERS - 1, "resid_post")]
    final = raw.model.get_submodule(hf["final"])
    torch.testing.assert_close(final(last), hs[LAYERS], atol=1e-6, rtol=0)  # RMSNorm computes in float32
    assert not torch.allclose(last, hs[LAYERS])


@pytest.mark.parametrize("mode", ["raw", "tl"])
def test_head_results_plus_bias_sum_to_attn_out(fam, mode):
    key, hf, path, raw, tl, batch = fam
    p = raw if mode == "raw" else tl
    for L in range(LAYERS):
        heads = [Site(L, "result", h) for h in range(HEADS)]
        acts = p.run(batch.ids, heads + [Site(L, "attn_out")])
        total = sum(acts[s] for s in heads) + p.output_bias(L)
        torch.testing.assert_close(total, acts[Site(L, "attn_out")], atol=ATOL, rtol=0)
        for h in range(1, HEADS):  # the split is real, also between heads that share a key/value head
            assert not torch.allclose(acts[heads[0]], acts[heads[h]])


def _w_o(p: ProbedModel, hf, L):
    """W_O as (n_heads * d_head, d_model), from the HF module (Conv1D stores (in, out), Linear (out, in))."""
    o = p.model.get_submodule(hf["blocks"])[L].get_submodule(hf["o"])
    return o.weight if type(o).__name__ == "Conv1D" else o.weight.T


def test_raw_head_result_is_z_times_WO(fam):
    key, hf, path, raw, tl, batch = fam
    _, cap = _hf_internals(raw.model, hf, batch.ids)
    dh = D // HEADS
    for L in range(LAYERS):
        W_O = _w_o(raw, hf, L)
        acts = raw.run(batch.ids, [Site(L, "result", h) for h in range(HEADS)])
        for h in range(HEADS):
            sl = slice(h * dh, (h + 1) * dh)
            torch.testing.assert_close(acts[Site(L, "result", h)], cap[("z", L)][..., sl] @ W_O[sl], atol=ATOL, rtol=0)


def _value_bias(p: ProbedModel, key: str, hf, L) -> torch.Tensor:
    """TransformerLens' folded value bias per query head, (HEADS, d_head), from the HF weights."""
    b = p.model.get_submodule(hf["blocks"])[L]
    attn = b.get_submodule(hf["attn"])
    dh = D // HEADS
    if key == "gpt2":
        W_V, b_V = attn.c_attn.weight[:, 2 * D :], attn.c_attn.bias[2 * D :]
        return (b.ln_1.bias @ W_V + b_V).view(HEADS, dh)
    if key.startswith("gpt_neox"):  # rows of query_key_value: head 0 [q k v], head 1 [q k v], ...
        W = attn.query_key_value.weight.view(HEADS, 3, dh, D)[:, 2]  # (H, dh, D)
        b_V = attn.query_key_value.bias.view(HEADS, 3, dh)[:, 2]
        return torch.einsum("hed,d->he", W, b.input_layernorm.bias) + b_V
    n_kv = attn.v_proj.out_features // dh  # Llama-style: RMSNorm has no bias; b_V per key/value head
    b_V = attn.v_proj.bias if attn.v_proj.bias is not None else torch.zeros(n_kv * dh, dtype=torch.float64)
    return torch.stack([b_V.view(n_kv, dh)[h // (HEADS // n_kv)] for h in range(HEADS)])


def test_tl_mode(fam):
    """LayerNorm families: residual writes centred, head result centre((z_h - (ln1.b @ W_V + b_V)[h]) @ W_O[h]).
    RMSNorm families: TransformerLens does not centre (its warning "writing weights can't be centered"), but
    still folds the value biases: result (z_h - b_V[kv(h)]) @ W_O[h]."""
    key, hf, path, raw, tl, batch = fam
    centred = key == "gpt2" or key.startswith("gpt_neox")
    r, t = raw.run(batch.ids, raw.sites), tl.run(batch.ids, tl.sites)
    for s in raw.sites:
        if s.kind != "result":
            want = r[s] - r[s].mean(-1, keepdim=True) if centred else r[s]
            torch.testing.assert_close(t[s], want, atol=ATOL, rtol=0)
    _, cap = _hf_internals(raw.model, hf, batch.ids)
    dh = D // HEADS
    for L in range(LAYERS):
        vb, W_O = _value_bias(raw, key, hf, L), _w_o(raw, hf, L)
        # every test model but Mistral (no biases at all, so tl == raw there) has value biases to fold
        assert (vb.abs().max() > 1e-3) == (key != "mistral")
        for h in range(HEADS):
            sl = slice(h * dh, (h + 1) * dh)
            want = (cap[("z", L)][..., sl] - vb[h]) @ W_O[sl]
            want = want - want.mean(-1, keepdim=True) if centred else want
            torch.testing.assert_close(t[Site(L, "result", h)], want, atol=ATOL, rtol=0)
    if not centred:
        assert r[Site(0, "resid_pre")].mean(-1).abs().max() > 1e-3  # so the modes really differ in centring
    if key == "mistral":
        for s in raw.sites:
            torch.testing.assert_close(t[s], r[s], atol=0, rtol=0)


def test_stops_early(fam):
    key, hf, path, raw, tl, batch = fam
    first = [Site(0, "resid_pre"), Site(0, "result", 1), Site(0, "attn_out")]
    last = Site(LAYERS - 1, "resid_post")
    together = raw.run(batch.ids, first + [last])
    alone = raw.run(batch.ids, first)
    for s in first:
        torch.testing.assert_close(alone[s], together[s], atol=0, rtol=0)
    blocks = raw.model.get_submodule(hf["blocks"])
    calls = []
    hooks = [
        blocks[-1].register_forward_pre_hook(lambda m, a: calls.append("last block")),
        blocks[0].get_submodule(hf["mlp"]).register_forward_pre_hook(lambda m, a: calls.append("mlp0")),
        raw.model.get_submodule(hf["final"]).register_forward_pre_hook(lambda m, a: calls.append("final")),
    ]
    try:
        raw.run(batch.ids, first)
        assert calls == []  # stopped at layer 0's output projection, before the MLP
        raw.run(batch.ids, [last])
        assert calls == ["mlp0", "last block"]  # the whole stack ran, but not the final norm
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():  # no hook left behind
        raw.model(input_ids=batch.ids)


def test_attention_matches_hf_eager(fam):
    """Rotary positions, grouped-query attention and Mistral's sliding window, against HF's own eager weights."""
    from transformers import AutoModelForCausalLM

    key, hf, path, raw, tl, batch = fam
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        out = eager(input_ids=batch.ids, output_attentions=True, use_cache=False)
    assert out.attentions is not None and len(out.attentions) == LAYERS
    B, T = batch.ids.shape
    for L in range(LAYERS):
        for h in range(HEADS):
            a = raw.attention(batch.ids, L, h)
            assert a.shape == (B, T, T)
            torch.testing.assert_close(a.sum(-1), torch.ones(B, T, dtype=a.dtype), atol=1e-12, rtol=0)
            assert (a.triu(1) == 0).all()
            # HF's eager softmax runs in float32 for the rotary families
            torch.testing.assert_close(a, out.attentions[L][:, h], atol=1e-6, rtol=0)
    if key == "mistral":  # the window of 3 is applied: position 5 sees only positions 3..5
        assert (a[:, 5, :3] == 0).all() and (a[:, 5, 3:6] > 0).all()


def _module_site(hf, L, part, io):
    return f"module:{hf['blocks']}.{L}{'.' + hf[part] if part else ''}:{io}"


def test_module_sites_equal_table_sites(fam):
    """The escape hatch by module path reads the same tensors as the table, for every family."""
    key, hf, path, raw, tl, batch = fam
    pairs = [
        (Site(1, "resid_pre"), _module_site(hf, 1, "ln1", "input")),
        (Site(0, "attn_out"), _module_site(hf, 0, "o", "output")),
        (Site(1, "mlp_out"), _module_site(hf, 1, "mlp", "output")),
        (Site(0, "resid_post"), _module_site(hf, 0, None, "output")),
    ]
    if not _parallel(raw):
        pairs.append((Site(1, "resid_mid"), _module_site(hf, 1, "ln2", "input")))
    mods = [raw.site(m) for _, m in pairs]
    assert all(m.kind == MODULE and m.name == m.short == name for m, (_, name) in zip(mods, pairs))
    acts = raw.run(batch.ids, [s for s, _ in pairs] + mods)
    for (s, _), m in zip(pairs, mods):
        torch.testing.assert_close(acts[m], acts[s], atol=0, rtol=0)
    # the merged per-head z, which the table does not name as a site: a head's slice times W_O is its result
    z = raw.run(batch.ids, [raw.site(_module_site(hf, 0, "o", "input"))])
    (zval,) = z.values()
    dh = D // HEADS
    torch.testing.assert_close(
        zval[..., dh : 2 * dh] @ _w_o(raw, hf, 0)[dh : 2 * dh],
        raw.run(batch.ids, [Site(0, "result", 1)])[Site(0, "result", 1)],
        atol=ATOL,
        rtol=0,
    )


def test_parallel_residual_has_no_resid_mid(fam):
    key, hf, path, raw, tl, batch = fam
    if not _parallel(raw):
        assert raw.site("x1.mid") == Site(1, "resid_mid")
        return
    for name in ("x0.mid", "blocks.1.hook_resid_mid"):
        with pytest.raises(UserError, match="no resid_mid") as e:
            raw.site(name)
        assert "\n" not in str(e.value) and "use_parallel_residual" in str(e.value)
    with pytest.raises(UserError, match="no resid_mid"):
        raw.run(batch.ids, [Site(0, "resid_mid")])
    with pytest.raises(UserError, match="did you mean"):  # other unknown sites still get a suggestion
        raw.site("a0.7")


# ---------------------------------------------------------------------------------------------- unknown family
@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    path = _build("OPTConfig", dict(ffn_dim=2 * D, word_embed_proj_dim=D), tmp_path_factory.mktemp("opt"))
    p = ProbedModel.load(path, mode="tl", dtype=torch.float64)  # loads, in either mode
    return p, p.batch([p.encode(t) for t in TEXTS])


@pytest.mark.parametrize("name", ["x0.pre", "a1.0", "blocks.0.hook_mlp_out", "x0.mid"])
def test_unknown_family_refuses_table_sites_in_one_line(opt, name):
    p, batch = opt
    assert p.family is None and p.sites == []
    with pytest.raises(UserError) as e:
        p.site(name)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'opt'" in msg and name in msg
    for family in SUPPORTED_FAMILIES:
        assert family in msg
    assert "module:model.decoder.layers.0:output" in msg  # the escape hatch, with a path of this model
    with pytest.raises(UserError, match="supported families"):
        p.run(batch.ids, [parse_site(name)])


def test_unknown_family_other_table_uses_refused(opt):
    p, batch = opt
    with pytest.raises(UserError, match="supported families"):
        p.attention(batch.ids, 0, 0)
    with pytest.raises(UserError, match="supported families"):
        p.output_bias(0)
    with pytest.raises(UserError, match="unknown site"):  # a malformed name is still called malformed
        p.site("x0.foo")


def test_unknown_family_module_sites(opt):
    p, batch = opt
    fc2 = p.site("module:model.decoder.layers.1.fc2:output")
    o_in = p.site("module:model.decoder.layers.0.self_attn.out_proj:input")
    layer0 = p.site("module:model.decoder.layers.0:output")
    cap, handles = {}, []
    layers = p.model.model.decoder.layers
    handles.append(layers[1].fc2.register_forward_hook(lambda m, a, o: cap.__setitem__("fc2", o)))
    handles.append(layers[0].self_attn.out_proj.register_forward_pre_hook(lambda m, a: cap.__setitem__("o", a[0])))
    try:
        with torch.no_grad():
            out = p.model(input_ids=batch.ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    acts = p.run(batch.ids, [fc2, o_in, layer0])
    torch.testing.assert_close(acts[fc2], cap["fc2"], atol=ATOL, rtol=0)
    torch.testing.assert_close(acts[o_in], cap["o"], atol=ATOL, rtol=0)
    torch.testing.assert_close(acts[layer0], out.hidden_states[1], atol=ATOL, rtol=0)
    # stops early: a layer-0 site alone does not run layer 1
    calls = []
    h = layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        alone = p.run(batch.ids, [o_in])
    finally:
        h.remove()
    assert calls == []
    torch.testing.assert_close(alone[o_in], acts[o_in], atol=0, rtol=0)


def test_module_site_errors(opt):
    p, batch = opt
    with pytest.raises(UserError, match="did you mean 'model.decoder.layers.0.fc2'"):
        p.site("module:model.decoder.layers.0.fc3:output")
    with pytest.raises(UserError, match="malformed module site"):
        p.site("module:model.decoder.layers.0")
    with pytest.raises(UserError, match="malformed module site"):
        parse_site("module:model.decoder:inout")
    with pytest.raises(UserError, match="never ran"):
        p.run(batch.ids, [_never_called(p)])


def _never_called(p):
    """A module that exists but that the forward pass never calls: one appended to the model for the test."""
    if not hasattr(p.model, "unused_probe"):
        p.model.add_module("unused_probe", torch.nn.Identity())
    return p.site("module:unused_probe:output")


def test_module_site_names():
    s = parse_site(" module:transformer.h.0.mlp:output ")
    assert s == Site.module("transformer.h.0.mlp", "output")
    assert s.kind == MODULE and s.path == "transformer.h.0.mlp" and s.io == "output"
    assert s.name == s.short == str(s) == "module:transformer.h.0.mlp:output"
    assert parse_site(s.name, 2, 2) == s  # the shape check does not apply to module sites
    assert len({s, Site.module("transformer.h.0.mlp", "input"), Site(0, "mlp_out")}) == 3
    assert sorted([s, Site(0, "mlp_out")])[0] == s  # orders before table sites (layer -1)
    with pytest.raises(UserError, match="input' or 'output"):
        Site.module("transformer.h.0", "both")


def test_table_that_does_not_match_the_modules_fails_loudly(fam):
    key, hf, path, raw, tl, batch = fam
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    block = model.get_submodule(hf["blocks"])[1]
    delattr(block, hf["mlp"])
    with pytest.raises(UserError, match="do not match") as e:
        ProbedModel(model, raw.tokenizer)
    assert "\n" not in str(e.value) and "module:" in str(e.value)
