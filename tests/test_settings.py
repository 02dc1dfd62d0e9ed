"""The one settings schema (inversionview.settings): an unknown key gets the closest known one, and a bad value
is refused with the same one-line message by the training config, the command line, the Python API, batch files
and the viewer; docs/config.md is the schema's own output."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import user_error
from inversionview import explore, settings, train
from inversionview.errors import UserError
from inversionview.run import InversionView
from inversionview.settings import MAX_SAMPLES, METRICS, ReadSettings, SamplingSettings
from inversionview.store import read_queries
from inversionview.train import TrainConfig
from inversionview.viewer import server

ROOT = Path(__file__).resolve().parents[1]
TEXT = "vvzccvczvvvzvcvc|v:8"
QUERY = {"text": TEXT, "site": "a1.0", "position": ":"}
CLI_QUERY = ["query", "shipped:counting", "--text", TEXT, "--site", "a1.0", "--position", ":"]


@pytest.fixture(scope="module")
def iv():
    return InversionView.load("shipped:counting")


@pytest.fixture
def viewer(iv):
    v = server.Viewer(iv)
    yield v
    v.close()


def _refused(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _batch(tmp_path, iv, line: dict, **defaults) -> str:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return _refused(read_queries, path, iv, **defaults).removeprefix(f"{path} line 1: ")


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "train.toml"
    path.write_text('out = "run"\n' + text)
    return _refused(lambda: train._check(TrainConfig.from_toml(path)))


# ---------------------------------------------------------------------------------------------- unknown keys
def test_unknown_key_in_a_toml_config_names_the_closest_key(tmp_path):
    assert (
        _toml(tmp_path, "[eval]\nepsilom = 0.2\n") == "unknown config key 'epsilom' in [eval]: did you mean 'epsilon'?"
    )
    assert _toml(tmp_path, "[train]\nbatchsize = 8\n") == (
        "unknown config key 'batchsize' in [train]: did you mean 'batch_size'?"
    )
    assert _toml(tmp_path, "[evl]\nevery = 2\n") == "unknown config key 'evl': did you mean 'eval'?"
    # nothing close: every key of the section
    assert _toml(tmp_path, "[decoder]\nzzz = 1\n") == (
        "unknown config key 'zzz' in [decoder]: expected one of d_model, n_layers, n_heads, n_act_blocks, prefix_counts"
    )


def test_unknown_field_in_a_batch_line_names_the_closest_field(tmp_path, iv):
    assert _batch(tmp_path, iv, {**QUERY, "sampels": 8}) == "unknown field 'sampels': did you mean 'samples'?"
    assert _batch(tmp_path, iv, {**QUERY, "positon": 3}) == "unknown field 'positon': did you mean 'position'?"


def test_unknown_field_in_a_viewer_query_names_the_closest_field(viewer):
    assert _refused(viewer.query_job, {**QUERY, "epsilom": 0.2}) == "unknown field 'epsilom': did you mean 'epsilon'?"
    # the viewer reads with the default chains, as batch files do
    assert _refused(viewer.query_job, {**QUERY, "chains": 4}).startswith("unknown field 'chains': expected one of")


# ---------------------------------------------------------------------------------------------- one message
def test_samples_out_of_range_is_the_same_message_everywhere(tmp_path, iv, viewer, capsys):
    assert MAX_SAMPLES == 8192
    for bad in (0, 8193):
        want = f"samples must be between 1 and 8192, got {bad}"
        assert user_error(capsys, *CLI_QUERY, "--samples", bad) == f"error: {want}"
        assert (
            user_error(
                capsys,
                "completeness",
                "shipped:addition",
                "--text",
                "456+378=834",
                "--site",
                "a0.0",
                "--position",
                "=",
                "--samples",
                bad,
            )
            == f"error: {want}"
        )
        assert (
            user_error(
                capsys,
                "query-batch",
                "shipped:counting",
                tmp_path / "none.jsonl",
                "--db",
                tmp_path / "r.sqlite",
                "--samples",
                bad,
            )
            == f"error: {want}"
        )
        assert _refused(iv.query, TEXT, site="a1.0", position=":", samples=bad) == want
        assert _batch(tmp_path, iv, {**QUERY, "samples": bad}) == want
        assert _refused(viewer.query_job, {**QUERY, "samples": bad}) == want
    assert not (tmp_path / "r.sqlite").exists()  # refused before the DB or the model is touched


def test_a_metric_outside_the_set_is_the_same_message_everywhere(tmp_path, iv, viewer, capsys):
    assert METRICS == ("euclidean", "cosine")
    want = "unknown metric 'manhattan': expected 'euclidean' or 'cosine'"
    assert _refused(iv.query, TEXT, site="a1.0", position=":", samples=4, metric="manhattan") == want
    assert _refused(iv.evaluate, 2, metric="manhattan") == want
    assert _batch(tmp_path, iv, {**QUERY, "metric": "manhattan"}) == want
    assert _batch(tmp_path, iv, QUERY, metric="manhattan") == want  # the command's default too
    assert _refused(viewer.query_job, {**QUERY, "metric": "manhattan"}) == want
    assert _toml(tmp_path, '[eval]\nmetric = "manhattan"\n') == want.replace("':", "' in [eval]:")
    # on the command line argparse refuses it, naming the same set
    for command in (CLI_QUERY, ["evaluate", "shipped:counting"], ["query-batch", "shipped:counting", "q", "--db", "d"]):
        with pytest.raises(SystemExit):
            from inversionview.cli import main

            main([*command, "--metric", "manhattan"])
        err = capsys.readouterr().err
        assert "invalid choice: 'manhattan' (choose from 'euclidean', 'cosine')" in err, err


def test_other_bounds_are_the_same_message_everywhere(tmp_path, iv, viewer, capsys):
    cases = {
        "temperature": (0.0, "temperature must be positive and at most 1e6, got 0.0"),
        "epsilon": (-1.0, "epsilon must be positive and finite, got -1.0"),
        "seed": (-1, "seed must be between 0 and 9223372036854775807, got -1"),
    }
    for name, (bad, want) in cases.items():
        assert user_error(capsys, *CLI_QUERY, f"--{name}", bad) == f"error: {want}"
        assert _refused(iv.query, TEXT, site="a1.0", position=":", samples=4, **{name: bad}) == want
        assert _batch(tmp_path, iv, {**QUERY, name: bad}) == want
        assert _refused(viewer.query_job, {**QUERY, name: bad}) == want
    # a JSON number beyond every float is refused, not converted (which would raise OverflowError)
    assert _refused(viewer.query_job, {**QUERY, "epsilon": 10**400}).startswith(
        "epsilon must be positive and finite, got 1"
    )
    want = "chains must be between 0 and 1024, got 1025"
    assert user_error(capsys, *CLI_QUERY, "--chains", 1025) == f"error: {want}"
    assert _refused(iv.query, TEXT, site="a1.0", position=":", samples=4, chains=1025) == want


def test_wrong_types_name_the_type(tmp_path, iv, viewer):
    assert (
        _refused(iv.query, TEXT, site="a1.0", position=":", samples=4.0) == "argument 'samples' must be an int, got 4.0"
    )
    assert _batch(tmp_path, iv, {**QUERY, "epsilon": "wide"}) == "field 'epsilon' must be a number, got 'wide'"
    assert _refused(viewer.query_job, {**QUERY, "seed": True}) == "field 'seed' must be an int, got True"
    assert _toml(tmp_path, "[train]\nlr = true\n") == "config key 'lr' in [train] must be a number, got True"


# ---------------------------------------------------------------------------------------------- the schema
def test_build_fills_the_defaults_of_an_instance_and_check_accepts_every_default():
    base = SamplingSettings(samples=8, seed=3)
    got = settings.build(base, {"seed": 5, "text": "x"}, noun="field", other=("text",))
    assert got == SamplingSettings(samples=8, seed=5)
    for cls in (ReadSettings, TrainConfig):
        settings.check(cls(**({"out": "run"} if cls is TrainConfig else {})))


def test_every_setting_is_documented():
    sections = [t for t in settings.hints(TrainConfig).values() if dataclasses.is_dataclass(t)]
    for cls in [TrainConfig, ReadSettings, *sections]:
        undocumented = [
            f.name
            for f in dataclasses.fields(cls)
            if not settings.field_docs(cls).get(f.name) and f.type not in [s.__name__ for s in sections]
        ]
        assert not undocumented and cls.__doc__, f"{cls.__name__}: {undocumented}"


def test_the_constants_other_modules_keep_agree_with_the_schema():
    assert explore.CHAINS == settings.CHAINS == ReadSettings.chains
    assert tuple(train.DTYPES) == settings.DTYPES
    for name, dtype in train.DTYPES.items():  # each name is torch's own dtype of that name (not an alias, nor absent)
        assert isinstance(dtype, torch.dtype) and str(dtype) == f"torch.{name}", name
    assert server.MAX_SAMPLES is settings.MAX_SAMPLES


def test_config_reference_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", ROOT / "scripts" / "make_config_reference.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.render()
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == text, (
        "docs/config.md is out of date: run python scripts/make_config_reference.py"
    )
    for section in ("[probed]", "[data]", "[decoder]", "[train]", "[eval]", "Reading settings"):
        assert section in text
    assert "- **`samples`** (an int, default `1024`, between 1 and 8192)." in text


def test_no_function_in_the_package_is_longer_than_60_lines():
    """The house bar: every function of src/inversionview (decorators excluded) fits in 60 lines."""
    long = {}
    for path in sorted((ROOT / "src" / "inversionview").rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long[f"{path.relative_to(ROOT)}:{n.lineno} {n.name}"] = n.end_lineno - n.lineno + 1
    assert not long, f"functions longer than 60 lines: {long}"
