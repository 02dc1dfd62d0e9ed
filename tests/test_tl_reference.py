"""The default ``tl`` mode against TransformerLens itself, without TransformerLens installed.

``tests/fixtures/tl/{model}.safetensors`` hold TransformerLens's activations (default weight processing, float64
rounded to float32) at every supported site on a few inputs, for the shipped counting and addition probed models
and tiny random GPT-2, GPT-NeoX (parallel residual, partial rotary) and Llama (grouped-query attention, biases)
models saved in ``tests/fixtures/tl/models/``. ``scripts/make_tl_fixtures.py`` made them (see there for the
TransformerLens version and how to remake them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inversionview.probed import ProbedModel
from inversionview.run import SHIPPED

FIXTURES = Path(__file__).parent / "fixtures" / "tl"
MODELS = {
    "counting": SHIPPED / "counting" / "probed",
    "addition": SHIPPED / "addition" / "probed",
    "gpt2": FIXTURES / "models" / "gpt2",
    "gpt_neox": FIXTURES / "models" / "gpt_neox",
    "llama": FIXTURES / "models" / "llama",
}


def _reference(name: str):
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


@pytest.mark.parametrize("name", list(MODELS))
def test_tl_mode_matches_transformer_lens(name):
    meta, ref = _reference(name)
    probed = ProbedModel.load(MODELS[name], mode="tl", dtype=torch.float64)
    names = json.loads(meta["sites"])
    assert sorted(names) == sorted(s.name for s in probed.sites)  # the same set of sites as TransformerLens hooks
    n_inputs = len(json.loads(meta["texts"]))
    assert n_inputs >= 2
    for i in range(n_inputs):
        ids = ref[f"{i}/ids"]
        acts = probed.run(ids[None], probed.sites)
        for s in probed.sites:
            want = ref[f"{i}/{s.name}"].double()
            got = acts[s][0]
            scale = float(want.abs().max())
            assert scale > 1e-3  # a site that TransformerLens left at zero would compare trivially
            torch.testing.assert_close(
                got,
                want,
                atol=2e-6 * max(1.0, scale),
                rtol=1e-5,
                msg=lambda m, s=s, i=i: f"{name} input {i} {s.name}: {m}",
            )


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024
