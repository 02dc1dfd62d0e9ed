"""Issue 30's command-line findings: every refusal of ``train`` is one line with no log line before it; no traceback
from ``train-probed`` with few steps or from a reader that closes the pipe (``| head``); a run.json whose
format_version was removed says so; progress bars only on a terminal (plain lines in a redirected log); and a
trained run's files all get the same mode."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _gpt2 import make_gpt2_dir
from conftest import user_error, write_config
from inversionview.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` with the command's own logging (to this test's stderr, as on the command line)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        rc = main([str(a) for a in argv])
    finally:
        root.handlers, root.level = saved
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2_dir(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def gpt2_config(tmp_path: Path, model: Path, data: dict, **train) -> Path:
    return write_config(
        tmp_path,
        model,
        steps=2,
        sections={
            "probed": {"tokenizer": "gpt2"},
            "data": {"sites": ["a0.1", "x1.post"], **data},
            "decoder": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
            "train": {"batch_size": 8, "chunk": 4, "warmup": 1, "bf16": False, **train},
            "eval": {"every": 2, "queries": 2, "checkpoint_every": 2},
        },
    )


def sentences(n: int) -> list[str]:
    return [f"The number {i} is written as {i} in the list of numbers." for i in range(n)]


# ---------------------------------------------------------------------------------------------- train: one line (6)
def _non_utf8(tmp_path, gpt2_dir, probed_dir):
    (tmp_path / "in.txt").write_bytes(b"The number one\n\xff\xfe is not text\n")
    return gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"}), "is not UTF-8 text"


def _empty(tmp_path, gpt2_dir, probed_dir):
    (tmp_path / "in.txt").write_text("\n\n")
    return gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"}), "has no inputs"


def _too_long(tmp_path, gpt2_dir, probed_dir):
    (tmp_path / "in.txt").write_text("\n".join(sentences(3) + [" ".join(["word"] * 80)]) + "\n")
    return gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"}), "but the model's context is 64 tokens"


def _unwritable(tmp_path, gpt2_dir, probed_dir):
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    (tmp_path / "afile").write_text("")
    cfg = gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"})
    cfg.write_text(cfg.read_text().replace('out = "run"', f'out = "{tmp_path / "afile" / "run"}"'))
    return cfg, "cannot create the run directory"


def _newer_checkpoint(tmp_path, gpt2_dir, probed_dir):
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    assert main(["train", str(gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"})), "--no-progress"]) == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    torch.save({**saved, "format_version": 99}, tmp_path / "run" / "checkpoint.pt")
    return gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"}, steps=4), "has format_version 99, newer than"


def _no_weights(tmp_path, gpt2_dir, probed_dir):
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(probed_dir / "config.json", empty / "config.json")
    shutil.copy(probed_dir / "vocab.json", empty / "vocab.json")
    return write_config(tmp_path, empty, steps=2), "has no weights"


def _vocab_size(tmp_path, gpt2_dir, probed_dir):
    vocab = json.loads((probed_dir / "vocab.json").read_text())
    vocab["tokens"] = vocab["tokens"] + ["#"]
    return write_config(tmp_path, probed_dir, steps=2, sections={"probed": {"vocab": vocab}}), "tokenizer has 41 tokens"


@pytest.mark.parametrize(
    "case",
    [_non_utf8, _empty, _too_long, _unwritable, _newer_checkpoint, _no_weights, _vocab_size],
    ids=lambda f: f.__name__.strip("_"),
)
def test_train_refusals_are_one_line_with_no_log_line_before(case, gpt2_dir, probed_dir, tmp_path, capsys):
    """#30 item 6: the precision line ("decoder precision: float32 ...") and the data line ("data: 30 inputs
    from ...") came before each of these errors; the setup's log lines now wait until it has succeeded."""
    cfg, words = case(tmp_path, gpt2_dir, probed_dir)
    capsys.readouterr()
    assert words in user_error(capsys, "train", cfg, "--no-progress")


def test_a_run_that_trains_still_logs_its_setup(gpt2_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(sentences(30)) + "\n")
    rc, _, err = cli(capsys, "train", gpt2_config(tmp_path, gpt2_dir, {"path": "in.txt"}), "--no-progress")
    lines = err.splitlines()
    assert rc == 0 and lines[0].startswith("decoder precision: float32") and lines[1].startswith("data: 30 inputs")


# ---------------------------------------------------------------------------------------------- train-probed (4)
def test_the_one_cycle_schedule_takes_any_number_of_steps():
    from inversionview.tasks.training import _one_cycle

    for steps in range(1, 80):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = _one_cycle(opt, 1e-3, steps)
        rates = []
        for _ in range(steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert 0 < min(rates) and max(rates) <= 1e-3 * (1 + 1e-9), steps


@pytest.mark.slow
def test_train_probed_with_20_steps(tmp_path, capsys):
    """#30 item 4: 20 steps at 5% warm-up made OneCycleLR divide by zero (a traceback, exit 1)."""
    rc, out, err = cli(capsys, "train-probed", "counting", "--steps", "20", "--out", tmp_path / "m")
    assert rc == 0 and "Traceback" not in err and "saved to" in out
    assert "\r" not in err, "a progress bar in a log that is not a terminal"
    assert "train-probed counting: 20/20 steps (100%)" in err


# ---------------------------------------------------------------------------------------------- a closed pipe (5)
def test_a_reader_that_closes_the_pipe_gets_no_traceback():
    """#30 item 5: ``inversionview query ... | head`` ended in a BrokenPipeError traceback. The read end is closed
    before the command writes, so every write meets the closed pipe."""
    r, w = os.pipe()
    os.close(r)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "inversionview", "query", "shipped:counting", "--text", "vvzccvczvvvzvcvc|v:8"]
    cmd += ["--site", "a1.0", "--position", "19", "--samples", "16", "--chains", "0"]
    p = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.returncode == 141, p.stderr


# ---------------------------------------------------------------------------------------------- messages (7)
def test_a_run_json_whose_format_version_was_removed_says_so(run_dir, tmp_path, capsys):
    """#30 item 7: it warned "predates format_version 1" and then said the decoder "belongs to another probed
    model"; now one line says what happened."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    d = json.loads((run / "run.json").read_text())
    del d["format_version"]
    (run / "run.json").write_text(json.dumps(d))
    cmd = ["query", run, "--text", "abcab|c:1", "--site", "x0.pre", "--position", "-2", "--samples", "4"]
    msg = user_error(capsys, *cmd)
    assert "run.json has no format_version, but its fingerprint is format 1's" in msg
    assert 'add "format_version": 1 back' in msg and "another probed model" not in msg


# ---------------------------------------------------------------------------------------------- papercuts (11)
def test_progress_in_a_log_is_plain_lines_and_the_weights_are_0644(probed_dir, tmp_path, capsys):
    """#30 item 11: tqdm wrote its bar into a redirected log as one \\r-joined line; safetensors wrote the
    decoder's weights with mode 0600 while the run's other files are 0644."""
    rc, out, err = cli(capsys, "train", write_config(tmp_path, probed_dir, steps=6))  # progress on: not a terminal
    assert rc == 0 and "\r" not in err + out
    assert "train: 6/6 steps (100%)" in err and "step 6: mean hit" in out
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"] == mode["run.json"], mode


def test_train_no_progress_is_documented():
    text = (ROOT / "docs" / "training.md").read_text()
    assert "--no-progress" in text
