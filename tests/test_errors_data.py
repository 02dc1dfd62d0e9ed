"""Bad input of issue 3, part 6, through the command line: a model directory without weights, a tokenizer that
does not match the model's vocabulary, a marker token that never occurs, an empty data file, text longer than
the model's context (in a query and in training data), and the GPT-2 path's own mistakes. Each is exit status
2 with one line on stderr, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _gpt2 import make_gpt2_dir
from conftest import user_error, write_config
from inversionview.cli import main
from inversionview.run import RunSpec

COUNTING = "vvzccvczvvvzvcvc|v:8"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2_dir(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def gpt2_config(tmp_path: Path, model: Path, data: dict, **sections) -> Path:
    return write_config(
        tmp_path,
        model,
        steps=2,
        sections={
            "probed": {"tokenizer": "gpt2"},
            "data": {"sites": ["a0.1", "x1.post"], **data},
            "decoder": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
            "train": {"batch_size": 8, "chunk": 4, "warmup": 1, "bf16": False},
            "eval": {"every": 2, "queries": 2, "checkpoint_every": 2},
            **sections,
        },
    )


def sentences(n: int) -> list[str]:
    return [f"The number {i} is written as {i} in the list of numbers." for i in range(n)]


# ---------------------------------------------------------------------------------------------- model directories
def test_run_whose_model_directory_lost_its_weights(run_dir, probed_dir, tmp_path, capsys):
    """A run is read later with `query` and `evaluate`; its model directory has lost its weights."""
    model = tmp_path / "model"
    shutil.copytree(probed_dir, model)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    spec = json.loads((run / "run.json").read_text())
    spec["model"] = str(model)
    (run / "run.json").write_text(json.dumps(spec))
    assert (
        main(["query", str(run), "--text", COUNTING, "--site", "x0.pre", "--position", ":", "--samples", "4", "--json"])
        == 0
    )  # the control: intact, it reads
    capsys.readouterr()
    (model / "model.safetensors").unlink()
    msg = user_error(capsys, "query", run, "--text", COUNTING, "--site", "x0.pre", "--position", ":")
    assert f"probed model directory {model} has no weights (model.safetensors or pytorch_model.bin)" in msg
    assert "has no weights" in user_error(capsys, "evaluate", run)


def test_gpt2_directory_without_weights(gpt2_dir, tmp_path, capsys):
    empty = tmp_path / "gpt2-noweights"
    empty.mkdir()
    shutil.copy(gpt2_dir / "config.json", empty / "config.json")
    msg = user_error(capsys, "train", gpt2_config(tmp_path, empty, {"task": "ioi"}), "--no-progress")
    assert "has no weights" in msg
    assert not (tmp_path / "run").exists()


def test_gpt2_shaped_model_without_tokenizer_files_names_the_gpt2_tokenizer(gpt2_dir, tmp_path, capsys):
    cfg = gpt2_config(tmp_path, gpt2_dir, {"task": "ioi"}, probed={"tokenizer": None})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert f"no tokenizer for {gpt2_dir}" in msg and 'tokenizer = "gpt2"' in msg
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- tokenizer vs model
def test_gpt2_tokenizer_on_a_smaller_model(probed_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, probed_dir, steps=2, sections={"probed": {"tokenizer": "gpt2"}})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert "tokenizer has 50257 tokens but the model's vocabulary has only 40" in msg
    assert not (tmp_path / "run").exists()


def test_character_vocabulary_bigger_than_the_model(probed_dir, tmp_path, capsys):
    vocab = json.loads((probed_dir / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"] + ["#"]
    cfg = write_config(tmp_path, probed_dir, steps=2, sections={"probed": {"vocab": vocab}})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert "tokenizer has 41 tokens but the model's vocabulary has only 40: the tokenizer does not belong" in msg
    assert not (tmp_path / "run").exists()


def test_character_vocabulary_smaller_than_the_model(probed_dir, tmp_path, capsys):
    """Fewer characters than the model's tokens: not the model's vocabulary. Refused before the run directory is
    made (it used to fail later, on the first input with a missing character, leaving an empty directory)."""
    vocab = json.loads((probed_dir / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"][:-1]  # drops "9"
    cfg = write_config(tmp_path, probed_dir, steps=2, sections={"probed": {"vocab": vocab}})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert msg == (
        "error: the character vocabulary has 39 tokens but the model's vocabulary has 40: it does not "
        "belong to this model (list all 40 tokens, in the model's order)"
    )
    assert not (tmp_path / "run").exists()


def test_gpt2_tokenizer_on_a_model_with_a_padded_vocabulary_trains(gpt2_dir, tmp_path, capsys):
    """A tokenizer with fewer tokens than a model's padded embedding (Pythia: 50,277 of 50,304) is that model's:
    only a character vocabulary must cover the model's tokens."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model.resize_token_embeddings(50_304)
    model.save_pretrained(tmp_path / "padded")
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    assert main(["train", str(gpt2_config(tmp_path, tmp_path / "padded", {"path": "in.txt"})), "--no-progress"]) == 0


@pytest.mark.parametrize(
    "probed, fragment",
    [
        ({"tokenizer": "gpt3"}, "unknown tokenizer 'gpt3': expected one of gpt2"),
        ({"tokenizer": 2}, "config key 'tokenizer' in [probed] must be a string, got 2"),
        (
            {"tokenizer": "gpt2", "vocab": {"tokens": ["P", "B", "E", "a"], "bos": "B", "eos": "E", "pad": "P"}},
            "[probed] gives both vocab and tokenizer",
        ),
    ],
)
def test_bad_tokenizer_settings(probed, fragment, probed_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, probed_dir, steps=2, sections={"probed": probed})
    assert fragment in user_error(capsys, "train", cfg, "--no-progress")


def test_ioi_task_needs_the_gpt2_tokenizer(probed_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, probed_dir, steps=2, sections={"data": {"task": "ioi", "sites": ["a0.1"]}})
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert "task ioi counts positions in gpt2 tokens" in msg and 'set tokenizer = "gpt2" in [probed]' in msg


def test_train_probed_ioi_is_refused(tmp_path, capsys):
    msg = user_error(capsys, "train-probed", "ioi", "--out", tmp_path / "m")
    assert "pretrained GPT-2 small" in msg and "inversionview init ioi-gpt2-small" in msg
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- data
def test_marker_that_never_occurs_in_gpt2_tokens(gpt2_dir, tmp_path, capsys):
    p = tmp_path / "in.txt"
    p.write_text("\n".join(sentences(20)) + "\n")
    msg = user_error(
        capsys,
        "train",
        gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt", "positions": {"marker": "|", "offset": 1}}),
        "--no-progress",
    )
    assert f"marker '|' of data.positions never occurs in {p}: check the marker against the model's tokens" in msg
    # with spaces the marker is found (GPT-2's " is" matches "is"), so the same file trains
    assert (
        main(
            [
                "train",
                str(gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt", "positions": {"marker": "is", "offset": 1}})),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tokenizer"] == "gpt2"


@pytest.mark.parametrize(
    "name, content",
    [("in.jsonl", ""), ("in.jsonl", "\n \n"), ("in.jsonl", '{"text": ""}\n'), ("in.txt", ""), ("in.txt", "\n\n  \n")],
)
def test_empty_data_file(name, content, gpt2_dir, tmp_path, capsys):
    p = tmp_path / name
    p.write_text(content)
    msg = user_error(capsys, "train", gpt2_config(tmp_path, gpt2_dir, {"path": name}), "--no-progress")
    assert f"data file {p} has no inputs (it is empty or has only blank lines)" in msg
    assert not (tmp_path / "run").exists()


def test_training_text_longer_than_the_context(gpt2_dir, tmp_path, capsys):
    long = " ".join(["word"] * 80)  # 80 tokens + BOS > 64
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(3) + [long]))
    msg = user_error(capsys, "train", gpt2_config(tmp_path, gpt2_dir, {"path": "in.jsonl"}), "--no-progress")
    assert f"line 4 of {tmp_path / 'in.jsonl'}: input is 81 tokens long but the model's context is 64 tokens" in msg
    assert not (tmp_path / "run").exists()


def test_query_text_longer_than_the_context(gpt2_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    assert main(["train", str(gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"})), "--no-progress"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    msg = user_error(capsys, "query", run, "--text", " ".join(["word"] * 80), "--site", "a0.1", "--position", "-1")
    assert msg == "error: input is 81 tokens long but the model's context is 64 tokens"
    # one token fewer than the context reads
    assert (
        main(
            [
                "query",
                str(run),
                "--text",
                " ".join(["word"] * 63),
                "--site",
                "a0.1",
                "--position",
                "-1",
                "--samples",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["position"] == 63


@pytest.mark.parametrize(
    "content, data, fragment",
    [
        (
            '{"text": "The Louvre is in the city of", "subject": "Eiffel Tower"}\n',
            {"format": "jsonl"},
            "line 1 of {p}: its subject 'Eiffel Tower' does not occur in input 'The Louvre is in the city of'",
        ),
        (
            '{"text": "The Louvre is in the city of"}\n',
            {"format": "jsonl"},
            "line 1 of {p}: input 'The Louvre is in the city of' has no 'subject' field",
        ),
        (
            "The Louvre is in the city of\n",
            {"format": "text"},
            "data.positions reads the field 'subject' of each input, so {p} must be JSONL or a saved HF dataset",
        ),
    ],
)
def test_span_positions_errors(content, data, fragment, gpt2_dir, tmp_path, capsys):
    p = tmp_path / "in.data"
    p.write_text(content)
    cfg = gpt2_config(tmp_path, gpt2_dir, {"path": "in.data", "positions": [-1, {"span": "subject"}], **data})
    assert fragment.format(p=p) in user_error(capsys, "train", cfg, "--no-progress")


def test_span_positions_with_a_task(gpt2_dir, tmp_path, capsys):
    cfg = gpt2_config(tmp_path, gpt2_dir, {"task": "ioi", "positions": {"span": "subject"}})
    assert "reads the field 'subject' of each input: that needs a data file" in user_error(capsys, "train", cfg)


def test_resuming_with_another_tokenizer_is_refused(gpt2_dir, tmp_path, capsys):
    from inversionview.tokenizer import gpt2_tokenizer

    model = tmp_path / "gpt2-with-files"
    shutil.copytree(gpt2_dir, model)
    gpt2_tokenizer().tok.save_pretrained(model)  # HF tokenizer files: the directory has its own tokenizer too
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    assert main(["train", str(gpt2_config(tmp_path, model, {"path": "in.txt"})), "--no-progress"]) == 0
    capsys.readouterr()
    assert RunSpec.load(tmp_path / "run").tokenizer == "gpt2"
    msg = user_error(
        capsys,
        "train",
        gpt2_config(tmp_path, model, {"path": "in.txt"}, train={"steps": 4}, probed={"tokenizer": None}),
        "--no-progress",
    )
    assert "the run directory was trained with another tokenizer ('gpt2', config gives None)" in msg
