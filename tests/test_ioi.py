"""IOI on GPT-2 (issue 3, part 4) and the factual-recall data format (part 5): the IOI generator in Wang et
al.'s ABBA and BABA forms with single-token names, its query positions on GPT-2 tokens, the ready configs,
span positions for "last subject token", and an end-to-end run (train, evaluate, query, JSON) on a tiny
GPT-2-shaped model with GPT-2's real tokenizer."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import inversionview
from _gpt2 import EOT, make_gpt2_dir
from conftest import write_config
from inversionview.cli import main
from inversionview.data import FileSource, PositionRule, open_source
from inversionview.errors import UserError
from inversionview.preimage import Preimage
from inversionview.verify import as_inputs
from inversionview.probed import ProbedModel, distances
from inversionview.run import InversionView, RunSpec
from inversionview.sites import parse_site
from inversionview.tasks import get_task
from inversionview.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, OBJECTS, PLACES, Ioi, parse
from inversionview.tokenizer import gpt2_tokenizer
from inversionview.train import TrainConfig, Trainer, step_rng

CONFIGS = Path(inversionview.__file__).parent / "configs"  # the example configs shipped in the package
SITES = ["a0.1", "a1.0", "x1.post"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2_dir(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


@pytest.fixture(scope="module")
def probed(gpt2_dir) -> ProbedModel:
    return ProbedModel.load(gpt2_dir, tokenizer="gpt2")


# ---------------------------------------------------------------------------------------------- the generator
def test_names_places_and_objects_are_single_gpt2_tokens():
    tok = gpt2_tokenizer().tok
    for word in NAMES + PLACES + OBJECTS:
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    assert len(set(NAMES)) == len(NAMES) >= 90


def test_generator_gives_well_formed_abba_and_baba_sentences():
    task = get_task("ioi")
    assert isinstance(task, Ioi) and task.tokenizer() is gpt2_tokenizer() and task.vocab is gpt2_tokenizer()
    rng = random.Random(0)
    orders, templates = set(), set()
    for _ in range(400):
        text = task.generate(rng)
        roles = parse(text)
        assert roles is not None, text
        io, s = roles["IO"], roles["S"]
        assert io != s and io in NAMES and s in NAMES
        names = [w for w in re.findall(r"[A-Za-z]+", text) if w in NAMES]
        expect = [io, s, s, io] if roles["order"] == "ABBA" else [s, io, s, io]
        assert names == expect, text
        assert text.endswith(" " + io) and text.startswith(("Then", "After", "When", "While", "The", "Friends"))
        # the sentence is one template with its slots filled
        form = text.replace(io, "[A]").replace(s, "[B]")
        for w in PLACES:
            form = re.sub(rf"\b{w}\b", "[PLACE]", form)
        for w in OBJECTS:
            form = re.sub(rf"\b{w}\b", "[OBJECT]", form)
        assert form in (ABBA_TEMPLATES if roles["order"] == "ABBA" else BABA_TEMPLATES), text
        orders.add(roles["order"])
        templates.add(form)
        assert task.annotate(text) == f"IO={io} S={s}"
    assert orders == {"ABBA", "BABA"} and len(templates) >= 25
    # seeded, and split by a hash of the text
    assert [task.generate(random.Random(5)) for _ in range(3)] == [task.generate(random.Random(5)) for _ in range(3)]
    test = [task.sample(random.Random(1), "test") for _ in range(20)]
    assert all(task.is_test(t) for t in test) and not any(task.is_test(task.sample(rng)) for _ in range(20))


def test_positions_point_at_the_end_and_s2_tokens():
    task = Ioi()
    tok = gpt2_tokenizer()
    text = "Then, Mary and John went to the store. John gave a drink to Mary"
    ids = tok.encode(text)
    tokens = tok.tokens_of(ids)
    assert tokens[0] == "<|endoftext|>" and tokens[-1] == " Mary"
    p = task.token_positions(text)
    assert {k: tokens[v] for k, v in p.items()} == {"S1": " John", "IO": " Mary", "S2": " John", "end": " to"}
    assert p == {"IO": 3, "S1": 5, "S2": 11, "end": 15} and task.positions(text) == [15, 11]
    assert task.answer_positions(text) == [16]
    # BABA, and a prompt that stops before the IO: the end is its last token
    p = task.token_positions("After John and Mary went to the school, John gave a ring to Mary")
    assert (p["S1"], p["IO"]) == (2, 4)
    prompt = "Then, Mary and John went to the store. John gave a drink to"
    assert task.token_positions(prompt)["end"] == len(tok.encode(prompt)) - 1
    assert parse(prompt) == {"IO": "Mary", "S": "John", "order": "ABBA"}
    rng = random.Random(3)
    for _ in range(200):
        text = task.generate(rng)
        roles, tokens = parse(text), tok.tokens_of(tok.encode(text))
        p = task.token_positions(text)
        assert tokens[p["S1"]] == tokens[p["S2"]] == " " + roles["S"] and tokens[p["IO"]] == " " + roles["IO"]
        assert tokens[p["end"] + 1] == " " + roles["IO"] and p["end"] == len(tokens) - 2
        assert p["S1"] < p["S2"] < p["end"]


@pytest.mark.parametrize(
    "text",
    [
        "Then, Mary and John went to the store.",
        "Mary gave a drink to Mary",
        "Then, Mary and John went to the store. Mary gave a drink to Mary",
        "hello",
    ],
)
def test_not_ioi_sentences(text):
    assert parse(text) is None and Ioi().annotate(text) is None
    with pytest.raises(UserError, match="not an IOI sentence"):
        Ioi().positions(text)


# ---------------------------------------------------------------------------------------------- configs
def test_ioi_config_is_ready_for_gpt2_small():
    cfg = TrainConfig.from_toml(CONFIGS / "ioi-gpt2-small.toml")
    assert cfg.probed.model == "gpt2" and cfg.probed.tokenizer == "gpt2" and cfg.probed.mode == "tl"
    assert cfg.data.task == "ioi" and cfg.data.record() is None  # the task's own positions: end and S2
    assert cfg.eval.metric == "cosine"
    sites = [parse_site(s, 12, 12) for s in cfg.data.sites]
    short = [s.short for s in sites]
    assert {"a9.9", "a0.1", "a5.5"} <= set(short) and len(set(short)) == len(short)
    assert all(s.kind == "result" for s in sites)
    assert tuple(cfg.data.sites) == Ioi.sites


def test_factual_config_and_its_data_format():
    cfg = TrainConfig.from_toml(CONFIGS / "factual-gpt2-xl.toml")
    assert cfg.probed.model == "gpt2-xl" and cfg.probed.tokenizer == "gpt2"
    assert (cfg.eval.metric, cfg.eval.epsilon) == ("cosine", 0.25)
    sites = [parse_site(s, 48, 25) for s in cfg.data.sites]
    assert len(sites) == len(set(sites)) == 25 and all(s.kind == "result" and s.layer >= 24 for s in sites)
    rec = cfg.data.record()
    assert rec["format"] == "jsonl" and rec["positions"] == [-1, {"span": "subject", "offset": 0}]
    rows = [json.loads(line) for line in Path(rec["path"]).read_text().splitlines()]
    assert rows and all(r["subject"] in r["text"] for r in rows)


def test_span_rule_gives_the_last_subject_token_and_the_last_position(probed, tmp_path):
    rule = PositionRule.parse([-1, {"span": "subject"}])
    assert rule.to_spec() == [-1, {"span": "subject", "offset": 0}] and rule.fields() == ("subject",)
    tok = probed.tokenizer
    text = "The Eiffel Tower is located in the city of"
    ids = tok.encode(text)
    tokens = tok.tokens_of(ids)
    got = rule.apply(ids, tok, text, {"subject": "Eiffel Tower"})
    assert [tokens[i] for i in got] == [" of", " Tower"]
    # a span ending inside a token gives the token holding its last character
    # (" Eiffel" is " E" + "iff" + "el"; "Eif" and "Eiffel Tow" end inside "iff" and " Tower")
    span = PositionRule.parse({"span": "s"})
    assert [tokens[i] for i in span.apply(ids, tok, text, {"s": "Eiff"})] == ["iff"]
    assert [tokens[i] for i in span.apply(ids, tok, text, {"s": "Eif"})] == ["iff"]
    assert [tokens[i] for i in span.apply(ids, tok, text, {"s": "Eiffel Tow"})] == [" Tower"]
    assert span.apply(ids, tok, text, {"s": "Louvre"}) == [] and span.apply(ids, tok, text, {}) == []
    assert PositionRule.parse({"span": "s", "offset": 1}).apply(ids, tok, text, {"s": "Tower"}) == [got[1] + 1]
    # read from the example file as training reads it
    src = open_source(
        None, {"path": str(CONFIGS / "factual-example.jsonl"), "positions": [-1, {"span": "subject"}]}, probed
    )
    assert isinstance(src, FileSource)
    for text, rec in zip(src.texts, src.records):
        tokens = tok.tokens_of(tok.encode(text))
        last, subj = src.positions(text)
        assert last == len(tokens) - 1
        assert rec["subject"].endswith(tokens[subj].strip()) and tokens[subj].strip()


# ---------------------------------------------------------------------------------------------- training
def test_decoder_learns_to_end_gpt2_inputs(gpt2_dir, tmp_path, monkeypatch):
    """The real step's targets: each input's tokens after BOS, then <|endoftext|> as the stop token (GPT-2
    inputs carry no EOS), and nothing for the padding, although PAD is the same token."""
    cfg = write_config(
        tmp_path,
        gpt2_dir,
        sections={
            "probed": {"tokenizer": "gpt2"},
            "data": {"task": "ioi", "sites": ["a0.1"], "bos_prob": 0.0},
            "decoder": {"d_model": 8, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
            "train": {"batch_size": 8, "chunk": 8, "bf16": False},
            "eval": {"queries": 2},
        },
    )
    trainer = Trainer(TrainConfig.from_toml(cfg))
    probed = trainer.probed
    replay = step_rng(0, 0)  # step 0 draws its 8 inputs first, from this source
    texts = [trainer.source.sample(replay) for _ in range(8)]
    seen = []
    real = F.cross_entropy

    def spy(logits, target, **kw):
        seen.append(target.clone())
        return real(logits, target, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    trainer.step()
    (target,) = seen
    rows = target.view(8, -1).tolist()
    expected = sorted(probed.encode(t)[1:] + [EOT] for t in texts)
    got = [[t for t in r if t != -100] for r in rows]
    assert sorted(got) == expected and len({tuple(x) for x in got}) > 1
    for r in rows:  # -100 only after the stop token
        n = len([t for t in r if t != -100])
        assert r[n - 1] == EOT and all(t == -100 for t in r[n:])


def test_ioi_end_to_end_on_a_tiny_gpt2(gpt2_dir, tmp_path, capsys):
    cfg = write_config(
        tmp_path,
        gpt2_dir,
        steps=3,
        sections={
            "probed": {"tokenizer": "gpt2"},
            "data": {"task": "ioi", "sites": SITES},
            "decoder": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
            "train": {"batch_size": 8, "chunk": 4, "warmup": 1, "bf16": False},
            "eval": {"every": 3, "queries": 2, "checkpoint_every": 3, "metric": "cosine"},
        },
    )
    rc = main(["train", str(cfg), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert re.search(r"^step 3: mean hit \d\.\d{3}  a0\.1=", out, re.M), out
    run = tmp_path / "run"
    spec = json.loads((run / "run.json").read_text())
    assert (
        spec["tokenizer"] == "gpt2" and spec["task"] == "ioi" and spec["metric"] == "cosine" and spec["vocab"] is None
    )
    assert json.loads((run / "config.json").read_text())["vocab_size"] == 50257
    assert RunSpec.load(run).tokenizer == "gpt2"

    assert main(["evaluate", str(run), "--json", "--queries", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["hit"]) == SITES and res["metric"] == "cosine" and 0 <= res["mean_hit"] <= 1

    text = "Then, Mary and John went to the store. John gave a drink to Mary"
    assert (
        main(["query", str(run), "--text", text, "--site", "a0.1", "--position", "-2", "--samples", "6", "--json"]) == 0
    )
    d = json.loads(capsys.readouterr().out)
    pre = Preimage.from_dict(d)
    assert pre.to_dict() == d and json.loads(pre.to_json()) == d  # the JSON round-trips
    assert pre.metric == "cosine" and pre.site_short == "a0.1" and pre.annotation == "IO=Mary S=John"
    assert pre.tokens[pre.position] == " to" and pre.position == 15 and pre.tokens[0] == "<|endoftext|>"
    assert pre.attention is not None and len(pre.attention) == 16 and abs(sum(pre.attention) - 1) < 1e-4
    assert pre.samples and sum(s.count for s in pre.samples) == 6
    # the distances are the probed model's: recompute every sample's cosine distance from the decoder's own
    # samples (captured by wrapping the real generate) and the query activation
    iv = InversionView.load(run)
    assert iv.probed.tokenizer.name == "gpt2"  # the run reloads the same tokenizer
    captured = []
    generate = iv.decoder.generate

    def spy(*a, **kw):
        out = generate(*a, **kw)
        captured.extend(out)
        return out

    iv.decoder.generate = spy
    again = iv.query(text, site="a0.1", position="to", samples=6, seed=1)
    assert again.position == 7 and again.metric == "cosine"  # "to": its first occurrence, GPT-2's " to"
    assert len(captured) == 6 and all(c[0] == EOT for c in captured)
    inputs = {tuple(as_inputs([c], iv.probed.tokenizer)[0]) for c in captured}
    assert all(len(x) == 1 or x[-1] != EOT for x in inputs)  # the stop token is not part of a GPT-2 input
    site = iv.probed.site("a0.1")
    zq = iv.probed.run(torch.tensor([iv.probed.encode(text)]), [site])[site][0, 7].float()
    want = sorted(
        float(distances(zq, iv.probed.run(torch.tensor([list(x)]), [site])[site][0].float(), "cosine").min())
        for x in inputs
    )
    assert [s.distance for s in again.samples] == pytest.approx(want, abs=1e-4)
    for smp in again.samples:  # BOS included, every position of a GPT-2 input has a distance
        assert smp.tokens[0] == "<|endoftext|>" and all(x is not None for x in smp.distances)
        assert smp.annotation is None or smp.annotation.startswith("IO=")
