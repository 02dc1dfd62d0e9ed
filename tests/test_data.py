"""Training on the user's own model and data (issue 3, part 2): inputs from a text file, a JSONL file or a
saved HF dataset; position rules (all, fixed indices, marker + offset); the held-out hash split; run.json
recording the data so ``evaluate`` works later; one-line errors for bad data; and the docs' example (docs/own-model.md),
written as it stands and trained through the command line."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import recording_trainer, user_error, write_config
from inversionview.cli import main
from inversionview.data import FileSource, PositionRule, RuledTask, is_test, open_source, read_records, record
from inversionview.errors import UserError
from inversionview.probed import ProbedModel
from inversionview.run import SHIPPED, InversionView, RunSpec
from inversionview.tasks import get_task
from inversionview.tasks.counting import Counting
from inversionview.train import DataSpec, TrainConfig

OWN_MODEL = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"  # the docs' page "Your own model"
VOCAB = get_task("counting").vocab
SITES = ["x0.pre", "a0.1", "x1.mid"]


def counting_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [Counting().generate(rng) for _ in range(n)]


def data_config(tmp_path: Path, probed_dir: Path, data: dict, steps: int = 3, **sections) -> Path:
    """A tiny config whose [data] reads a file (the task key removed)."""
    return write_config(
        tmp_path,
        probed_dir,
        steps=steps,
        sections={"data": {"sites": SITES, **data}, "eval": {"every": 3, "queries": 4}, **sections},
    )


@pytest.fixture(scope="module")
def probed(probed_dir) -> ProbedModel:
    return ProbedModel.load(probed_dir)


# ---------------------------------------------------------------------------------------------- position rules
class _Tok:
    """A tokenizer stand-in with multi-character tokens, GPT-2 style (no EOS)."""

    bos_id, eos_id, pad_id = 0, None, 0

    def __init__(self, tokens):
        self.vocab = ["<bos>", *tokens]

    def tokens_of(self, ids):
        return [self.vocab[i] for i in ids]


def test_all_positions_exclude_bos_and_eos():
    ids = VOCAB.encode("ab|c")  # B a b | c E
    assert PositionRule.parse("all").apply(ids, VOCAB) == [1, 2, 3, 4]
    assert PositionRule.parse(None) is None  # the source's default


def test_fixed_indices_count_back_from_the_last_text_token():
    ids = VOCAB.encode("ab|c")
    assert PositionRule.parse([1, -1, -2, 0]).apply(ids, VOCAB) == [1, 4, 3, 0]  # -1 is 'c', not EOS
    assert PositionRule.parse(-1).apply(ids, VOCAB) == [4]
    assert PositionRule.parse([2, 9, -9]).apply(ids, VOCAB) == [2]  # outside this input: skipped
    rule = PositionRule.parse([9])
    assert rule.apply(ids, VOCAB) == []
    assert "none of the positions [9] is inside input 'ab|c'" in rule.why_empty("ab|c", ids, VOCAB)
    # the same convention as --position
    from inversionview.preimage import resolve_position

    toks = VOCAB.tokens_of(ids)
    for i in (1, -1, -2, -5, 4):
        assert PositionRule.parse([i]).apply(ids, VOCAB) == [resolve_position(toks, 5, i)]


def test_marker_rule_reproduces_the_counting_rule():
    rule = PositionRule.parse({"marker": "|", "offset": [1, 2]})
    task = Counting()
    for text in counting_lines(300):
        assert rule.apply(VOCAB.encode(text), VOCAB) == task.positions(text)
    ids = VOCAB.encode("ab|c:1")
    assert PositionRule.parse({"marker": "|"}).apply(ids, VOCAB) == [3]  # offset 0: the marker itself
    assert PositionRule.parse({"marker": "|", "offset": -1}).apply(ids, VOCAB) == [2]
    assert PositionRule.parse({"marker": "|", "offset": 1}).apply(VOCAB.encode("a|b|c"), VOCAB) == [3, 5]  # each one
    assert PositionRule.parse({"marker": "1", "offset": 1}).apply(ids, VOCAB) == []  # would be EOS
    assert "falls outside input" in PositionRule.parse({"marker": "1", "offset": 1}).why_empty("ab|c:1", ids, VOCAB)
    rule = PositionRule.parse({"marker": "#", "offset": 1})
    assert rule.why_empty("ab|c:1", ids, VOCAB) == "marker '#' does not occur in input 'ab|c:1': every input needs one"


def test_marker_matches_tokens_with_surrounding_spaces():
    tok = _Tok(["The", " cat", " |", " sat"])
    ids = [0, 1, 2, 3, 4]
    assert PositionRule.parse({"marker": "|", "offset": 1}).apply(ids, tok) == [4]
    assert PositionRule.parse({"marker": "cat"}).apply(ids, tok) == [2]
    assert PositionRule.parse("all").apply(ids, tok) == [1, 2, 3, 4]  # no EOS to drop
    assert PositionRule.parse([-1]).apply(ids, tok) == [4]


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("some", 'data.positions must be "all", a list of token indices'),
        ([], "data.positions must be"),
        ([1.5], "data.positions must be"),
        (True, "data.positions must be"),
        ({"marker": ""}, "data.positions needs a marker token"),
        ({"marker": "|", "offset": "x"}, "data.positions.offset must be an int or a list of ints, got 'x'"),
        ({"mark": "|"}, "unknown key 'mark' in data.positions"),
    ],
)
def test_bad_position_rules(value, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        PositionRule.parse(value)


def test_rules_round_trip_through_their_config_value():
    for v in ("all", [3, -2], {"marker": "|", "offset": 1}, {"marker": "|", "offset": [1, 2]}):
        assert PositionRule.parse(v).to_spec() == v
    assert PositionRule.parse(4).to_spec() == [4]
    assert PositionRule.parse({"marker": "|"}).to_spec() == {"marker": "|", "offset": 0}


# ---------------------------------------------------------------------------------------------- reading files
def test_text_file_one_input_per_line_blank_lines_skipped(tmp_path):
    p = tmp_path / "in.txt"
    p.write_bytes(b"ab|a:1\r\n\n   \nabc|c:1\nlast")  # CRLF, blank lines, no final newline
    assert read_records(p)[:3] == (["ab|a:1", "abc|c:1", "last"], [1, 4, 5], "line")


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"text": "ab|a:1", "id": 1}\n\n{"text": "b|b:1"}\n')
    assert read_records(p)[0] == ["ab|a:1", "b|b:1"]  # format from the suffix, field "text" by default
    q = tmp_path / "in.data"
    q.write_text('{"input": "a|a:1"}\n')
    assert read_records(q, "jsonl", "input")[0] == ["a|a:1"]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "a"}\n{"text": \n', "line 2 of"),
        ('{"text": "a"}\n{"txt": "b"}\n', "line 2 of {p} has no field 'text' (set data.field; its keys: txt)"),
        ('["a"]\n', "has no field 'text' (set data.field; its keys: none: it is not an object)"),
        ('{"text": 5}\n', "line 1 of {p}: field 'text' must be a string, got int"),
        ("\n\n", "data file {p} has no inputs (it is empty or has only blank lines)"),
    ],
)
def test_jsonl_errors(tmp_path, content, fragment):
    p = tmp_path / "in.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=re.escape(fragment.format(p=p))):
        read_records(p)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="data file .*nope.txt does not exist"):
        read_records(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="unknown data.format 'csv': expected one of text, jsonl, hf"):
        read_records(tmp_path, "csv")
    with pytest.raises(UserError, match='is a directory: set format = "hf"'):
        read_records(tmp_path, "text")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_records(tmp_path / "bin.txt")


def test_hf_dataset_without_the_datasets_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError) as e:
        read_records(tmp_path)  # a directory: format hf
    assert "needs the datasets package: pip install datasets" in str(e.value)
    assert "\n" not in str(e.value)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    lines = counting_lines(20)
    datasets.Dataset.from_dict({"sentence": lines, "n": list(range(20))}).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds", field="sentence")[:3] == (lines, list(range(1, 21)), "row")
    with pytest.raises(UserError, match="has no column 'text' .*its columns: sentence, n"):
        read_records(tmp_path / "ds")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": lines[:5]}),
            "test": datasets.Dataset.from_dict({"text": lines[5:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd", "hf")[0] == lines[:5]  # the train split
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="could not load a dataset saved with save_to_disk"):
        read_records(tmp_path / "junk")


# ---------------------------------------------------------------------------------------------- sources and split
def test_held_out_split_is_a_fixed_hash_of_the_text(probed):
    lines = counting_lines(1000)
    src = FileSource(lines, PositionRule.parse("all"), probed)
    assert set(src.test) == {t for t in lines if is_test(t)}
    assert not set(src.train) & set(src.test)
    assert 0.07 < len(src.test) / len(lines) < 0.13
    # whatever the order of the file
    again = FileSource(lines[::-1], PositionRule.parse("all"), probed)
    assert set(again.test) == set(src.test)
    r1, r2 = random.Random(3), random.Random(3)
    draws = [src.sample(r1, "test") for _ in range(50)]
    assert draws == [src.sample(r2, "test") for _ in range(50)] and set(draws) <= set(src.test)
    assert all(src.sample(r1) in set(src.train) for _ in range(50))


def test_a_small_file_still_holds_one_input_out(probed):
    for lines in (["ab|a:1", "b|b:1"], ["ab|a:1", "b|b:1", "c|c:1", "cc|c:2"]):
        src = FileSource(lines, PositionRule.parse("all"), probed)
        assert src.test and src.train and not set(src.train) & set(src.test)
    src = FileSource(["ab|a:1"] * 3, PositionRule.parse("all"), probed)  # one distinct input: both sides
    assert src.train == src.test == ["ab|a:1"] * 3


def test_task_with_another_position_rule(probed):
    src = open_source("counting", {"positions": {"marker": "|", "offset": 1}}, probed)
    assert isinstance(src, RuledTask) and src.sites == Counting.sites
    text = "vvzccvczvvvzvcvc|v:8"
    assert src.positions(text) == [Counting().positions(text)[0]]
    assert src.sample(random.Random(0)) == Counting().sample(random.Random(0))
    with pytest.raises(UserError, match="marker '#' of data.positions never occurs in 200 inputs of task counting"):
        open_source("counting", {"positions": {"marker": "#"}}, probed)
    assert open_source("counting", None, probed).__class__ is Counting  # a plain task is used as it is


def test_counting_config_records_no_data_and_keeps_its_defaults(tmp_path, probed_dir):
    assert DataSpec().task == "counting" and DataSpec().record() is None
    cfg = TrainConfig.from_toml(write_config(tmp_path, probed_dir))
    assert cfg.data.task == "counting" and cfg.data.record() is None
    assert record("counting", "", "", "text", None) is None
    # a text round-trips through the tokenizer, so the step's positions are those of the sampled texts
    for t in counting_lines(200):
        assert VOCAB.text(VOCAB.encode(t)) == t


def test_training_step_queries_the_rule_positions(tmp_path, probed_dir):
    """The real step on a data file with rule [-1]: every activation the decoder gets is the last text
    token's of its input (x0.pre: each (token, position) gives a distinct activation)."""
    lines = counting_lines(300)
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    cfg = data_config(
        tmp_path,
        probed_dir,
        {"path": "in.txt", "positions": [-1], "sites": ["x0.pre"], "bos_prob": 0.0},
        decoder={"d_model": 16, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
    )
    trainer, seen = recording_trainer(cfg)
    probed, site = trainer.probed, trainer.sites[0]
    trainer.step()
    assert len(seen) == 2  # batch 32 in chunks of 16
    train_set = set(trainer.source.train)
    for ids, z in seen:
        acts = probed.run(ids, [site])[site]
        for row in range(ids.shape[0]):
            text = probed.tokenizer.text(ids[row])
            assert text in train_set
            assert torch.allclose(acts[row, len(text)], z[row], atol=1e-5)  # BOS + text: the last text token


# ---------------------------------------------------------------------------------------------- training and run.json
def test_train_on_a_jsonl_file_then_evaluate_from_the_held_out_inputs(tmp_path, probed_dir, capsys, monkeypatch):
    lines = counting_lines(200)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"s": t}) + "\n" for t in lines))
    cfg = data_config(tmp_path, probed_dir, {"path": "in.jsonl", "field": "s", "positions": [-2, -1]})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    raw = json.loads((run / "run.json").read_text())
    assert raw["task"] is None
    assert raw["data"] == {"path": "../in.jsonl", "format": "jsonl", "field": "s", "positions": [-2, -1]}
    assert json.loads((run / "train.json").read_text())["data"]["path"] == "../in.jsonl"  # relative to the run
    assert RunSpec.load(run).data["path"] == str((tmp_path / "in.jsonl").resolve())

    # evaluate draws held-out inputs only
    drawn = []
    real = FileSource.sample

    def spy(self, rng, split="train"):
        t = real(self, rng, split)
        drawn.append((split, t))
        return t

    monkeypatch.setattr(FileSource, "sample", spy)
    res = InversionView.load(run).evaluate(4)
    assert list(res["hit"]) == SITES and len(drawn) == 12
    assert all(split == "test" and is_test(t) for split, t in drawn)
    monkeypatch.undo()

    # the run moves with its data and its model
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(run, moved / "run")
    shutil.copy(tmp_path / "in.jsonl", moved / "in.jsonl")
    spec = json.loads((moved / "run" / "run.json").read_text())
    spec["model"] = str(probed_dir)
    (moved / "run" / "run.json").write_text(json.dumps(spec))
    assert main(["evaluate", str(moved / "run"), "--json", "--queries", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["queries_per_site"] == 2

    # resuming with another position rule is refused
    cfg = data_config(tmp_path, probed_dir, {"path": "in.jsonl", "field": "s", "positions": "all"}, steps=6)
    assert "trained with another data" in user_error(capsys, "train", cfg, "--no-progress")


def test_evaluate_with_the_data_file_gone(tmp_path, probed_dir, capsys):
    (tmp_path / "in.txt").write_text("\n".join(counting_lines(50)))
    cfg = data_config(tmp_path, probed_dir, {"path": "in.txt"}, steps=1)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    (tmp_path / "in.txt").unlink()
    msg = user_error(capsys, "evaluate", tmp_path / "run", "--queries", "2")
    assert "in.txt does not exist" in msg


# ---------------------------------------------------------------------------------------------- bad data: exit 2
BAD = {
    # name: (file content or None for no file, [data] keys, expected fragment; {p} is the data file)
    "empty data file": ("", {}, "data file {p} has no inputs (it is empty or has only blank lines)"),
    "only blank lines": ("\n  \n\n", {}, "data file {p} has no inputs"),
    "marker never occurs": (
        "ab|a:1\nb|b:1\n",
        {"positions": {"marker": "#", "offset": 1}},
        "marker '#' of data.positions never occurs in {p}",
    ),
    "marker missing in one input": (
        "ab|a:1\nb|b:1\nbb\n",
        {"positions": {"marker": "|", "offset": 1}},
        "line 3 of {p}: marker '|' does not occur in input 'bb': every input needs one",
    ),
    "text longer than the context": (
        "ab|a:1\n" + "a" * 32 + "\n",
        {},
        "line 2 of {p}: input is 34 tokens long but the model's context is 33 tokens",
    ),
    "character outside the vocabulary": ("ab|a:1\nab#\n", {}, "line 2 of {p}: character '#' at index 2 of 'ab#'"),
    "index outside every input": ("ab|a:1\n", {"positions": [40]}, "line 1 of {p}: none of the positions [40]"),
    "missing data file": (None, {}, "data file {p} does not exist"),
    "unknown format": ("ab\n", {"format": "csv"}, "unknown data.format 'csv': expected one of text, jsonl, hf"),
    "field with a text file": (
        "ab\n",
        {"format": "text", "field": "s"},
        "data.field applies to jsonl and hf data only",
    ),
    "bad positions": ("ab\n", {"positions": "first"}, 'data.positions must be "all", a list of token indices'),
    "both task and path": ("ab\n", {"task": "counting"}, "[data] gives both task = 'counting' and path = "),
    "no sites": ("ab\n", {"sites": None}, "data.sites is required with data.path"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_data_is_a_one_line_error_with_exit_status_2(name, tmp_path, probed_dir, capsys):
    content, keys, fragment = BAD[name]
    p = tmp_path / "in.txt"
    if content is not None:
        p.write_text(content)
    cfg = data_config(tmp_path, probed_dir, {"path": "in.txt", **keys})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert fragment.format(p=p) in msg
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_neither_task_nor_path(tmp_path, probed_dir, capsys):
    cfg = write_config(tmp_path, probed_dir, sections={"data": {"task": ""}})
    assert '[data] needs the inputs: task = "counting" or path = "inputs.txt"' in user_error(capsys, "train", cfg)


def test_a_later_input_that_breaks_the_rule_stops_training_with_one_line(tmp_path, probed_dir, capsys, monkeypatch):
    """Only the first CHECKED inputs are checked when training starts; a bad one after them stops it when drawn."""
    monkeypatch.setattr("inversionview.data.CHECKED", 2)
    (tmp_path / "in.txt").write_text("ab|a:1\nb|b:1\n" + "bb\n" * 40)
    cfg = data_config(tmp_path, probed_dir, {"path": "in.txt", "positions": {"marker": "|", "offset": 1}})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert "marker '|' does not occur in input 'bb'" in msg


# ---------------------------------------------------------------------------------------------- the README example
def _readme_example() -> str:
    section = OWN_MODEL.read_text().split("## A checkpoint and a data file", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section should have exactly one TOML example"
    return blocks[0]


def test_readme_example_trains_as_written(tmp_path, capsys):
    example = _readme_example()
    # the user's directory: a trained GPT-2-architecture model (the shipped counting model, whose vocabulary is the
    # example's) with only config.json and weights, and a text file; a random model would be refused, for it predicts
    # its inputs no better with the vocabulary shuffled (ProbedModel.check_token_order)
    model = tmp_path / "my-model"
    shutil.copytree(SHIPPED / "counting" / "probed", model)
    for extra in ("vocab.json", "training.json", "generation_config.json"):
        (model / extra).unlink(missing_ok=True)
    assert {"config.json", "model.safetensors"} <= {p.name for p in model.iterdir()}
    assert not list(model.glob("*vocab*")) and not list(model.glob("tokenizer*"))
    (tmp_path / "inputs.txt").write_text("\n".join(counting_lines(300)) + "\n")
    # as written, but 3 steps instead of the example's schedule
    assert example.count("steps = 2000\n") == 1
    (tmp_path / "my-config.toml").write_text(example.replace("steps = 2000\n", "steps = 3\n"))

    rc = main(["train", str(tmp_path / "my-config.toml"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    run = tmp_path / "runs" / "my-model"
    assert f"decoder saved to {run}" in out
    assert re.search(r"^step 3: mean hit \d\.\d{3}  x0\.pre=", out, re.M), out
    spec = json.loads((run / "run.json").read_text())
    assert spec["data"] == {
        "path": "../../inputs.txt",
        "format": "text",
        "field": "text",
        "positions": {"marker": "|", "offset": [1, 2]},
    }
    assert spec["vocab"]["tokens"] == list(VOCAB.tokens)  # the example's vocabulary is the model's
    assert main(["evaluate", str(run), "--queries", "2"]) == 0
    assert "mean" in capsys.readouterr().out
