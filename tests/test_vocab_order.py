"""A character vocabulary listed in the wrong order is refused before training (issue 27): the shipped counting
model, brought in as one's own with its vocabulary in the config, predicts its inputs only in the right order."""

import json
import shutil

from conftest import user_error, write_config
from inversionview.cli import main
from inversionview.run import SHIPPED


def own_model(tmp_path):
    """The shipped counting model in a directory without its vocab.json: the vocabulary must come from the config."""
    d = tmp_path / "model"
    shutil.copytree(SHIPPED / "counting" / "probed", d)
    vocab = json.loads((d / "vocab.json").read_text())
    (d / "vocab.json").unlink()
    return d, vocab


def config(tmp_path, model, vocab):
    return write_config(
        tmp_path,
        model,
        steps=1,
        sections={
            "probed": {"vocab": vocab},
            "data": {"task": "counting", "sites": ["a1.0"]},
            "eval": {"every": 1, "queries": 2},
        },
    )


def test_the_vocabulary_in_the_wrong_order_is_refused(tmp_path, capsys):
    model, vocab = own_model(tmp_path)
    letters = [t for t in vocab["tokens"] if t.isalpha() and len(t) == 1 and t.islower()]
    wrong = dict(vocab, tokens=[t for t in vocab["tokens"] if t not in letters] + sorted(letters, reverse=True))
    assert wrong["tokens"] != vocab["tokens"] and sorted(wrong["tokens"]) == sorted(vocab["tokens"])
    msg = user_error(capsys, "train", config(tmp_path, model, wrong), "--no-progress")
    assert "not in the order the model was trained with" in msg and "\n" not in msg.strip()
    assert not (tmp_path / "run").exists()


def test_the_vocabulary_in_the_right_order_trains(tmp_path, capsys):
    model, vocab = own_model(tmp_path)
    assert main(["train", str(config(tmp_path, model, vocab)), "--no-progress"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()
