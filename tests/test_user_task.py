"""A user's own task registered from the config (issue 27): a generator function, read under its draws as a data set,
and a Task subclass, whose moves give the chains of the built-in tasks and whose features the summary measures."""

import json

import pytest

from conftest import user_error, write_config
from inversionview.cli import main

MODULE = """
import random

from inversionview.tasks.counting import Counting


def gen(rng: random.Random) -> str:
    return Counting().generate(rng)


def first_letter(text):
    return text[0]


def always(text):
    return "same"


class MyCounting(Counting):
    features = {"first": first_letter}
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVERSIONVIEW_CACHE", str(tmp_path / "cache"))
    return tmp_path


def train(tmp_path, probed_dir, task, capsys):
    sections = {"data": {"task": task, "sites": ["a0.0", "x1.post"]}, "eval": {"every": 2, "queries": 2}}
    assert main(["train", str(write_config(tmp_path, probed_dir, steps=2, sections=sections)), "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["task"] == task


def query(tmp_path, capsys, *extra):
    argv = ["query", str(tmp_path / "run"), "--text", "abcabc|a:2", "--site", "x1.post", "--position", "-1"]
    assert main([*argv, "--samples", "16", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_generator_function_is_read_under_its_draws(user_dir, probed_dir, capsys):
    train(user_dir, probed_dir, "mytask:gen", capsys)
    out = query(user_dir, capsys)
    dist = out["distribution"]
    assert dist["kind"] == "data" and dist["name"] == "20,000 draws of the generator mytask:gen"
    assert dist["inputs"] == 20_000 and out["sources"]["data"] == dist["found"]
    # a feature every member shares, which nothing can change (the generator has no moves): the check says so
    out = query(user_dir, capsys, "--features", "mytask:always", "--epsilon", "0.5")
    assert out["distribution"]["found"] >= 5
    assert any(x.startswith("shared by 100%") and "mytask:always = same" in x for x in out["summary"])
    assert "check: mytask:always cannot be changed in members: the data set has no edits for it" in out["summary"]


def test_a_task_class_gets_chains_and_its_own_features(user_dir, probed_dir, capsys):
    train(user_dir, probed_dir, "mytask:MyCounting", capsys)
    out = query(user_dir, capsys, "--chains", "4")
    assert out["distribution"] == {"kind": "generator", "name": "task mytask:MyCounting"}
    assert out["chains"] is not None  # its moves (Counting's) walk the preimage
    assert [s["feature"] for s in out["shares"]] == ["first"] and out["shares"][0]["value"] == "a"


def test_a_task_that_is_neither_class_nor_function_is_one_line(user_dir, probed_dir, capsys):
    (user_dir / "bad.py").write_text("THING = 3\n")
    sections = {"data": {"task": "bad:THING", "sites": ["a0.0"]}}
    msg = user_error(capsys, "train", write_config(user_dir, probed_dir, steps=1, sections=sections), "--no-progress")
    assert "must be a subclass of inversionview.tasks.Task or a generator function" in msg
