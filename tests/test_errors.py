"""Every bad input is a user error: exit status 2 and one line on stderr starting with ``error:``, never a
traceback. Through ``inversionview.cli.main`` (and a few real subprocesses) and the Python API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_probed_dir, user_error, write_config
from inversionview.cli import main
from inversionview.errors import UserError
from inversionview.probed import ProbedModel
from inversionview.run import InversionView, RunSpec


TEXT = "vvzccvczvvvzvcvc|v:8"


def query(run, *extra, text=TEXT, site="x0.pre", position=":"):
    return ["query", run, "--text", text, "--site", site, "--position", position, "--samples", "8", *extra]


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a run directory, pointing its run.json at the probed model by an absolute path."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "run.json").read_text())
    spec["model"] = RunSpec.load(src).model
    (dst / "run.json").write_text(json.dumps(spec))
    return dst


@pytest.fixture(scope="module")
def other_probed(tmp_path_factory) -> Path:
    """A probed model with the same shape and vocabulary as probed_dir but other weights."""
    return make_probed_dir(tmp_path_factory.mktemp("other_probed"), seed=1)


# ---------------------------------------------------------------------------------------------- reading
def test_unknown_site_suggests_the_nearest_name(run_dir, capsys):
    msg = user_error(capsys, *query(run_dir, site="x0.pr"))
    assert "unknown site 'x0.pr'" in msg and "did you mean 'x0.pre'?" in msg
    msg = user_error(capsys, *query(run_dir, site="blocks.0.attn.hook_reslt.1"))
    assert "did you mean 'blocks.0.attn.hook_result.1'?" in msg
    msg = user_error(capsys, *query(run_dir, site="a5.0"))  # well-formed, but the model has 2 layers
    assert "unknown site 'a5.0'" in msg


def test_site_the_decoder_was_not_trained_on(run_dir, capsys):
    msg = user_error(capsys, *query(run_dir, site="m1"))
    assert "not one this decoder was trained on" in msg and "x0.pre, a0.1, x1.mid" in msg


def test_position_out_of_range_or_not_a_token(run_dir, capsys):
    assert "position 99 is out of range for an input of 21 tokens" in user_error(capsys, *query(run_dir, position="99"))
    assert "position -22 is out of range" in user_error(capsys, *query(run_dir, position="-22"))
    # EOS is not a position of the text: index 21 is out of range
    assert "out of range" in user_error(capsys, *query(run_dir, position="21"))
    assert "neither an index nor a token" in user_error(capsys, *query(run_dir, position="#"))


def test_character_outside_the_vocabulary(run_dir, capsys):
    msg = user_error(capsys, *query(run_dir, text="vvzX|v:2", position="1"))
    assert "character 'X' at index 3" in msg and "not in the vocabulary" in msg
    # special tokens are not text characters either
    assert "character 'B'" in user_error(capsys, *query(run_dir, text="aBa|a:2", position="1"))
    assert "33 tokens" in user_error(capsys, *query(run_dir, text="a" * 40, position="1"))


def test_bad_sampling_settings(run_dir, capsys):
    assert "samples must be between" in user_error(capsys, *query(run_dir, "--samples", "0"))
    assert "temperature must be positive" in user_error(capsys, *query(run_dir, "--temperature", "0"))
    assert "epsilon must be positive" in user_error(capsys, *query(run_dir, "--epsilon", "-1"))


def test_html_file_that_cannot_be_written(run_dir, tmp_path, capsys):
    msg = user_error(capsys, *query(run_dir, "--html", tmp_path / "no" / "such" / "dir" / "r.html"))
    assert msg.startswith("error: cannot write the HTML report") and "r.html" in msg


def test_evaluate_bad_query_count(run_dir, capsys):
    assert "queries per site must be at least 1, got 0" in user_error(capsys, "evaluate", run_dir, "--queries", "0")
    assert "got -3" in user_error(capsys, "evaluate", run_dir, "--queries", "-3")
    assert "epsilon must be positive" in user_error(capsys, "evaluate", run_dir, "--epsilon", "0")


# ---------------------------------------------------------------------------------------------- run directories
def test_missing_run_directory(tmp_path, capsys):
    msg = user_error(capsys, *query(tmp_path / "nope"))
    assert "run directory" in msg and "does not exist" in msg
    assert "does not exist" in user_error(capsys, "evaluate", tmp_path / "nope")


def test_unknown_shipped_name_lists_the_shipped_models(capsys):
    msg = user_error(capsys, *query("shipped:nosuch"))
    assert "shipped:nosuch" in msg and "shipped:counting" in msg and "shipped:addition" in msg


def test_empty_query_text(run_dir, capsys):
    assert "empty" in user_error(capsys, *query(run_dir, text=""))


def test_run_directory_without_run_json(tmp_path, capsys):
    msg = user_error(capsys, *query(tmp_path))
    assert "has no run.json" in msg and "inversionview train" in msg


@pytest.mark.parametrize("content", ["{not json", "[]", "{}", '{"model": "x"}', ""])
def test_corrupt_run_json(run_dir, tmp_path, capsys, content):
    run = copy_run(run_dir, tmp_path / "run")
    (run / "run.json").write_text(content)
    msg = user_error(capsys, *query(run))
    assert "run.json is corrupt" in msg


def test_corrupt_or_missing_decoder_files(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "model.safetensors is corrupt" in user_error(capsys, *query(run))
    (run / "model.safetensors").unlink()
    assert "no weights" in user_error(capsys, *query(run))
    shutil.copy(run_dir / "model.safetensors", run / "model.safetensors")
    (run / "config.json").write_text("{")
    assert "config.json is corrupt" in user_error(capsys, *query(run))
    (run / "config.json").unlink()
    assert "config.json is missing" in user_error(capsys, *query(run))


def test_copied_run_still_works(run_dir, tmp_path, capsys):
    """The control for the corruption tests: an intact copy reads fine."""
    run = copy_run(run_dir, tmp_path / "run")
    assert main([str(a) for a in query(run, "--json")]) == 0
    assert json.loads(capsys.readouterr().out)["site_short"] == "x0.pre"


def test_corrupt_checkpoint_on_resume(tmp_path, probed_dir, capsys):
    assert main(["train", str(write_config(tmp_path, probed_dir, steps=3)), "--no-progress"]) == 0
    capsys.readouterr()
    for junk in (b"not a checkpoint", b""):
        (tmp_path / "run" / "checkpoint.pt").write_bytes(junk)
        msg = user_error(capsys, "train", write_config(tmp_path, probed_dir, steps=6), "--no-progress")
        assert "checkpoint.pt is corrupt" in msg and "delete it to start over" in msg
    # a checkpoint that unpickles but is not ours
    torch.save({"something": "else"}, tmp_path / "run" / "checkpoint.pt")
    assert "checkpoint.pt is corrupt" in user_error(
        capsys, "train", write_config(tmp_path, probed_dir, steps=6), "--no-progress"
    )


# ---------------------------------------------------------------------------------------------- model mismatch
def test_decoder_with_another_probed_model_api(run_dir, probed_dir, other_probed):
    with pytest.raises(UserError, match="another probed model"):
        InversionView.load(run_dir, probed=ProbedModel.load(other_probed))
    InversionView.load(run_dir, probed=ProbedModel.load(probed_dir))  # the right one is accepted


def test_decoder_with_another_probed_model_via_run_json(run_dir, tmp_path, other_probed, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    spec = json.loads((run / "run.json").read_text())
    spec["model"] = str(other_probed)
    (run / "run.json").write_text(json.dumps(spec))
    assert "this decoder belongs to another probed model" in user_error(capsys, *query(run))
    assert "another probed model" in user_error(capsys, "evaluate", run)


def test_resume_with_another_probed_model(tmp_path, probed_dir, other_probed, capsys):
    assert main(["train", str(write_config(tmp_path, probed_dir, steps=3)), "--no-progress"]) == 0
    capsys.readouterr()
    msg = user_error(capsys, "train", write_config(tmp_path, other_probed, steps=6), "--no-progress")
    assert "trained with another fingerprint" in msg and "new 'out' directory" in msg
    msg = user_error(
        capsys,
        "train",
        write_config(tmp_path, probed_dir, steps=6, sections={"probed": {"mode": "raw"}}),
        "--no-progress",
    )
    assert "trained with another mode" in msg
    msg = user_error(
        capsys,
        "train",
        write_config(tmp_path, probed_dir, steps=6, sections={"data": {"sites": ["m1"]}}),
        "--no-progress",
    )
    assert "trained with another sites" in msg


def test_wrong_activation_mode(run_dir, probed_dir):
    with pytest.raises(UserError, match="trained on 'tl' activations, not 'raw'"):
        InversionView.load(run_dir, probed=ProbedModel.load(probed_dir, mode="raw"))
    with pytest.raises(UserError, match="unknown activation mode 'TL'"):
        ProbedModel.load(probed_dir, mode="TL")


def test_probed_model_directory_problems(tmp_path, probed_dir, capsys):
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(probed_dir / "config.json", empty / "config.json")
    shutil.copy(probed_dir / "vocab.json", empty / "vocab.json")
    cfg = write_config(tmp_path, empty, steps=2)
    assert "has no weights" in user_error(capsys, "train", cfg, "--no-progress")
    (empty / "config.json").unlink()
    assert "has no config.json" in user_error(capsys, "train", cfg, "--no-progress")
    cfg = write_config(tmp_path, tmp_path / "absent", steps=2)
    assert "does not exist" in user_error(capsys, "train", cfg, "--no-progress")
    api = tmp_path / "api_noweights"
    api.mkdir()
    shutil.copy(probed_dir / "config.json", api / "config.json")
    with pytest.raises(UserError, match="has no weights"):
        ProbedModel.load(api)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------- metrics
def test_unknown_metric(run_dir, capsys):
    iv = InversionView.load(run_dir)
    with pytest.raises(UserError, match="unknown metric 'manhattan'"):
        iv.query(TEXT, site="x0.pre", position=":", samples=4, metric="manhattan")
    with pytest.raises(UserError, match="unknown metric 'manhattan'"):
        iv.evaluate(2, metric="manhattan")
    # on the command line argparse refuses it: status 2, a usage message, no traceback
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run_dir), "--metric", "manhattan"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'manhattan'" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- configs
def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "train.toml"
    p.write_text(text)
    return p


CONFIG_ERRORS = {
    # name: (sections for write_config, expected fragment of the message)
    "unknown top-level key": ({"": {"outt": "x"}}, "unknown config key 'outt'"),
    "unknown key in a table": ({"train": {"stepz": 5}}, "unknown config key 'stepz' in [train]"),
    "unknown table": ({"optim": {"lr": 1.0}}, "unknown config key 'optim'"),
    "string for an int": ({"train": {"steps": "ten"}}, "config key 'steps' in [train] must be an int, got 'ten'"),
    "int for a bool": ({"eval": {"rebalance": 1}}, "config key 'rebalance' in [eval] must be a bool, got 1"),
    "int for bf16": ({"train": {"bf16": 1}}, "config key 'bf16' in [train] must be true, false or \"auto\", got 1"),
    "string for a float": ({"train": {"lr": "fast"}}, "config key 'lr' in [train] must be a number, got 'fast'"),
    "bool for an int": ({"eval": {"every": True}}, "config key 'every' in [eval] must be an int, got True"),
    "float for an int": ({"train": {"batch_size": 32.5}}, "config key 'batch_size' in [train] must be an int"),
    "int for the site list": ({"data": {"sites": 5}}, "config key 'sites' in [data] must be a list of strings"),
    "int for out": ({"": {"out": 5}}, "config key 'out' must be a string, got 5"),
    "int for the model": ({"probed": {"model": 5}}, "config key 'model' in [probed] must be a string"),
    "missing out": ({"": {"out": None}}, "missing the key 'out'"),
    "unknown task": ({"data": {"task": "sorting"}}, "unknown task 'sorting': expected one of counting"),
    "unknown mode": ({"probed": {"mode": "bogus"}}, "unknown activation mode 'bogus'"),
    "bad vocabulary": (
        {"probed": {"vocab": {"tokens": ["a", "b"], "bos": "B", "eos": "E", "pad": "P"}}},
        "vocabulary bos token 'B' is not in its token list",
    ),
    "unknown site": ({"data": {"sites": ["x0.pre", "x9.pre"]}}, "unknown site 'x9.pre'"),
    "site twice": ({"data": {"sites": ["x0.pre", "blocks.0.hook_resid_pre"]}}, "lists a site twice"),
    "batch not a multiple of chunk": ({"train": {"batch_size": 30}}, "multiple of train.chunk"),
    "zero chunk": ({"train": {"chunk": 0}}, "train.chunk must be positive, got 0"),
    "zero steps": ({"train": {"steps": 0}}, "train.steps must be positive, got 0"),
    "zero eval interval": ({"eval": {"every": 0}}, "eval.every must be positive, got 0"),
    "zero checkpoint interval": ({"eval": {"checkpoint_every": 0}}, "eval.checkpoint_every must be positive"),
    "zero queries": ({"eval": {"queries": 0}}, "eval.queries must be positive"),
    "negative epsilon": ({"eval": {"epsilon": -0.1}}, "eval.epsilon must be positive and finite, got -0.1"),
    "bos_prob above 1": ({"data": {"bos_prob": 2.0}}, "data.bos_prob must be between 0 and 1, got 2.0"),
    "floor above 1": ({"eval": {"rebalance_floor": 2.0}}, "eval.rebalance_floor must be between 0 and 1"),
    "heads do not divide d_model": (
        {"decoder": {"d_model": 33}},
        "decoder.d_model (33) must be a multiple of decoder.n_heads (2)",
    ),
    "unknown metric": ({"eval": {"metric": "manhattan"}}, "unknown metric 'manhattan' in [eval]"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_errors(name, tmp_path, probed_dir, capsys):
    sections, fragment = CONFIG_ERRORS[name]
    cfg = write_config(tmp_path, probed_dir, steps=3, sections=sections)
    msg = user_error(capsys, "train", cfg, "--no-progress")
    assert fragment in msg
    # refused before any training
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_config_file_errors(tmp_path, capsys):
    assert "does not exist" in user_error(capsys, "train", tmp_path / "missing.toml")
    msg = user_error(capsys, "train", _write(tmp_path, 'out = "run"\n[train\nsteps = 3\n'))
    assert "is not valid TOML" in msg
    assert "is not valid TOML" in user_error(capsys, "train", _write(tmp_path, 'out = "run"\nout = "again"\n'))
    assert "[train] must be a table" in user_error(capsys, "train", _write(tmp_path, 'out = "run"\ntrain = 5\n'))
    assert "missing the key 'out'" in user_error(capsys, "train", _write(tmp_path, ""))


def test_train_probed_unknown_task(tmp_path, capsys):
    assert "unknown task 'sorting'" in user_error(capsys, "train-probed", "sorting", "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- subprocess
@pytest.mark.parametrize("case", ["unknown site", "invalid toml", "missing run"])
def test_subprocess_user_errors_print_one_line(case, run_dir, tmp_path):
    argv = {
        "unknown site": query(run_dir, site="x0.pr"),
        "invalid toml": ["train", _write(tmp_path, "out = \n")],
        "missing run": ["evaluate", tmp_path / "nope"],
    }[case]
    r = subprocess.run(
        [sys.executable, "-m", "inversionview", *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
