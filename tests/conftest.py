"""Shared fixtures: a tiny counting probed model (random GPT-2 weights, the counting vocabulary) saved to a
temporary directory, and a tiny decoder run trained on it for a few steps with the real ``train``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from inversionview.probed import ProbedModel
from inversionview.tasks import get_task

# Tiny models: one thread is as fast, and two threads stall badly when the 2 cores are shared (0.8 s vs 51 s
# for the run_dir fixture on a loaded machine).
torch.set_num_threads(1)

MAX_WORKERS = 4  # each worker imports torch and transformers and loads its own models


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): a worker per core this process may run on, at most MAX_WORKERS. 327 s
    against 612 s in one process on 2 cores (2026-12-04)."""
    return max(
        1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, MAX_WORKERS)
    )


def make_probed_dir(path: Path, seed: int = 0, n_layer: int = 2, n_head: int = 2, n_embd: int = 32) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    v = get_task("counting").vocab
    cfg = GPT2Config(
        vocab_size=v.vocab_size,
        n_positions=33,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_inner=4 * n_embd,
        bos_token_id=v.bos_id,
        eos_token_id=v.eos_id,
        pad_token_id=v.pad_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters, so that TL processing matters
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ProbedModel(model, v, mode="raw").save(path)
    return path


@pytest.fixture(scope="session")
def probed_dir(tmp_path_factory) -> Path:
    return make_probed_dir(tmp_path_factory.mktemp("probed"))


def _toml(v) -> str:
    """A Python value as a TOML value (booleans as true/false, strings JSON-quoted, lists recursively)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_config(dir: Path, probed: Path, steps: int = 6, sections: dict | None = None, **train) -> Path:
    """A tiny training config in ``dir/train.toml``. ``**train`` sets keys of [train]; ``sections`` maps a
    table name ("" for the top level) to keys that are added or replace the defaults; a value of None
    removes the key."""
    tables = {
        "": {"out": "run"},
        "probed": {"model": str(probed)},
        "data": {"sites": ["x0.pre", "a0.1", "x1.mid"]},
        "decoder": {"d_model": 32, "n_heads": 2, "n_act_blocks": 2},
        "train": {"steps": steps, "batch_size": 32, "chunk": 16, "warmup": 2, **train},
        "eval": {"every": 3, "queries": 8, "checkpoint_every": 3},
    }
    for name, keys in (sections or {}).items():
        tables.setdefault(name, {}).update(keys)
    lines = []
    for name, keys in tables.items():
        if name:
            lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in keys.items() if v is not None]
    path = dir / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, probed_dir) -> Path:
    from inversionview.train import TrainConfig, train

    d = tmp_path_factory.mktemp("run")
    train(TrainConfig.from_toml(write_config(d, probed_dir)), progress=False)
    return d / "run"


def user_error(capsys, *argv) -> str:
    """Run the CLI; assert exit status 2 and exactly one stderr line starting with 'error: ' (the command's log
    lines included: nothing may come before the error); return it."""
    from inversionview.cli import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # main()'s logging.basicConfig then logs to this test's stderr, as the command does
    try:
        rc = main([str(a) for a in argv])
    finally:
        root.handlers, root.level = saved
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def recording_trainer(config: Path):
    """The real trainer of a config (its run directory set up), its decoder's forward also recording every (ids, z)
    it is given, to check what the training step feeds it. Returns (trainer, list of records)."""
    from inversionview.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig.from_toml(config))
    seen = []
    real = trainer.decoder.forward

    def record(ids, z, site_ids, caches=None):
        seen.append((ids.clone(), z.detach().clone()))
        return real(ids, z, site_ids, caches)

    trainer.decoder.forward = record
    return trainer, seen
