"""Online decoder training (METHOD.md §3): resuming after a signal or a spent wall-time budget gives the
same decoder as an uninterrupted run, metrics rows, atomic checkpoints, site rebalancing, the learning-rate
schedule, the counting task's position rule and generator, and ``train-probed``."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import recording_trainer, write_config
from inversionview.errors import UserError
from inversionview.probed import ProbedModel
from inversionview.tasks import get_task
from inversionview.tasks.counting import Counting
from inversionview import distributed
from inversionview.distributed import choose_bf16, cpu_bf16_flags
from inversionview.train import DataSpec, OptimSpec, TrainConfig, lr_factor, site_weights, train

# Tiny models: on a loaded 2-core machine, torch's default intra-op threads spin against each other and a
# 6-step run takes ~50 s instead of ~1 s.

SITES = ["x0.pre", "a0.1", "x1.mid"]
# long enough that a SIGTERM sent once the first checkpoint exists lands well before the end
RESUME_STEPS = 60
RESUME_SECTIONS = {"eval": {"every": 10, "checkpoint_every": 2}}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def _rows(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").exists():  # interrupted before the first evaluation
        return []
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _comparable(rows: list[dict]) -> list[tuple]:
    """What must not depend on interruptions (throughput and wall time do)."""
    return [(r["step"], r["loss"], r["lr"], r["hit"], r["mean_hit"], r["site_probs"], r["site_counts"]) for r in rows]


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"tensor {k} differs after resuming"


def _ckpt_step(run: Path) -> int:
    return torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, probed_dir) -> Path:
    """An uninterrupted run of the config that the resume tests interrupt."""
    d = tmp_path_factory.mktemp("reference")
    train(
        TrainConfig.from_toml(write_config(d, probed_dir, steps=RESUME_STEPS, sections=RESUME_SECTIONS)), progress=False
    )
    return d / "run"


# ---------------------------------------------------------------------------------------------- resuming
@pytest.mark.slow
def test_sigterm_saves_checkpoint_then_same_command_resumes_to_identical_result(tmp_path, probed_dir, reference):
    cfg = write_config(tmp_path, probed_dir, steps=RESUME_STEPS, sections=RESUME_SECTIONS)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "inversionview", "train", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, f"training ended before it was interrupted: {proc.communicate()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    m = re.fullmatch(r"error: interrupted at step (\d+); checkpoint saved: run the same command to resume", errors[0])
    assert m, errors[0]
    k = int(m.group(1))
    assert 2 <= k < RESUME_STEPS
    assert _ckpt_step(run) == k
    assert not list(run.glob("*.tmp"))
    assert all(r["step"] <= k for r in _rows(run))

    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {k}" in done.stderr
    assert f"decoder saved to {run}" in done.stdout
    assert _ckpt_step(run) == RESUME_STEPS
    _assert_same_weights(reference, run)
    assert _comparable(_rows(run)) == _comparable(_rows(reference))
    assert [r["step"] for r in _rows(run)] == list(range(10, RESUME_STEPS + 1, 10))


def test_wall_time_budget_stops_saved_and_resumes_to_identical_result(tmp_path, probed_dir, reference):
    run = tmp_path / "run"
    # a budget spent by the first step: training stops after it, with a checkpoint
    iv = train(
        TrainConfig.from_toml(
            write_config(tmp_path, probed_dir, steps=RESUME_STEPS, max_minutes=1e-9, sections=RESUME_SECTIONS)
        ),
        progress=False,
    )
    assert iv.run_dir == run
    assert _ckpt_step(run) == 1
    (stopped,) = _rows(run)  # evaluated where the budget stopped it
    assert stopped["step"] == 1 and stopped["budget_spent"] is True
    # the same budget again: nothing more to do
    train(
        TrainConfig.from_toml(
            write_config(tmp_path, probed_dir, steps=RESUME_STEPS, max_minutes=1e-9, sections=RESUME_SECTIONS)
        ),
        progress=False,
    )
    assert _ckpt_step(run) == 1
    # the budget lifted: resumes from step 1 and ends where the uninterrupted run ended (the budget's evaluation
    # left the training state as it was)
    train(
        TrainConfig.from_toml(write_config(tmp_path, probed_dir, steps=RESUME_STEPS, sections=RESUME_SECTIONS)),
        progress=False,
    )
    assert _ckpt_step(run) == RESUME_STEPS
    _assert_same_weights(reference, run)
    rows = _rows(run)
    assert rows[0] == stopped
    assert _comparable(rows[1:]) == _comparable(_rows(reference))


def test_crash_while_writing_checkpoint_keeps_a_consistent_checkpoint(tmp_path, probed_dir, monkeypatch):
    """A crash in the middle of a checkpoint (disk full, a second Ctrl-C) must leave the previous checkpoint
    usable, and resuming from it must give the uninterrupted result."""
    sections = {"eval": {"every": 3, "checkpoint_every": 3}}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    train(TrainConfig.from_toml(write_config(ref_dir, probed_dir, steps=9, sections=sections)), progress=False)

    d = tmp_path / "crash"
    d.mkdir()
    cfg = write_config(d, probed_dir, steps=9, sections=sections)
    real_save = torch.save
    calls = []

    def save_then_crash(obj, f, *a, **kw):
        calls.append(obj["state"]["step"])
        if len(calls) == 2:  # the second checkpoint (step 6) dies half-written
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(UserError, match=r"^cannot write .*checkpoint.pt: No space left on device$"):
        train(TrainConfig.from_toml(cfg), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [3, 6]
    assert _ckpt_step(d / "run") == 3  # the old checkpoint is intact
    assert not (d / "run" / "checkpoint.pt.tmp").exists()  # and the half-written one is gone

    train(TrainConfig.from_toml(cfg), progress=False)
    assert _ckpt_step(d / "run") == 9
    _assert_same_weights(ref_dir / "run", d / "run")
    assert _comparable(_rows(d / "run")) == _comparable(_rows(ref_dir / "run"))


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_rows_and_run_directory(run_dir):
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [3, 6]  # every 3 steps and at the end of the 6
    for r in rows:
        for key in (
            "step",
            "elapsed_s",
            "loss",
            "lr",
            "tokens_per_s",
            "samples_per_s",
            "hit",
            "mean_hit",
            "site_probs",
            "site_counts",
        ):
            assert key in r, key
        assert list(r["hit"]) == SITES
        assert all(0.0 <= h <= 1.0 for h in r["hit"].values())
        assert all(round(h * 8, 6).is_integer() for h in r["hit"].values())  # 8 queries per site
        assert r["mean_hit"] == pytest.approx(sum(r["hit"].values()) / 3, abs=1e-4)
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0
        # tokens per sample: at least 8 (shortest counting input plus EOS), at most 32 predicted tokens
        assert 8 <= r["tokens_per_s"] / r["samples_per_s"] <= 32
        assert list(r["site_probs"]) == SITES and sum(r["site_probs"].values()) == pytest.approx(1, abs=1e-3)
        assert list(r["site_counts"]) == SITES
        assert sum(r["site_counts"].values()) == r["step"] * 32  # batch 32 per step
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["elapsed_s"] >= 0
    assert rows[0]["elapsed_s"] <= rows[1]["elapsed_s"]
    for name in ("run.json", "config.json", "model.safetensors", "train.json", "metrics.jsonl", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")), "a checkpoint write left a temporary file"
    assert _ckpt_step(run_dir) == 6
    saved = json.loads((run_dir / "train.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["data"]["sites"] == SITES


# ---------------------------------------------------------------------------------------------- rebalancing
def test_site_weights_favour_weak_sites_and_respect_the_floor():
    hits = [0.9, 0.1, 0.5, 0.3]
    for floor in (0.0, 0.25, 0.5, 0.9):
        w = site_weights(hits, floor)
        assert sum(w) == pytest.approx(1.0)
        assert all(x >= floor / len(hits) - 1e-12 for x in w)
        order = sorted(range(4), key=lambda i: hits[i])
        assert [w[i] for i in order] == sorted(w, reverse=True)  # lower hit, higher weight
        if floor < 1:
            assert w[1] > 0.25 > w[0]
    # softmax((mean - hit) * 6) without a floor
    logits = [(sum(hits) / 4 - h) * 6 for h in hits]
    z = sum(math.exp(x) for x in logits)
    assert site_weights(hits, 0.0) == pytest.approx([math.exp(x) / z for x in logits])
    # a starved site keeps its floor: hit 1.0 against three sites at 0
    w = site_weights([1.0, 0.0, 0.0, 0.0], 0.5)
    assert w[0] >= 0.5 / 4 and w[0] < 0.25
    assert site_weights([0.4] * 3, 0.5) == pytest.approx([1 / 3] * 3)  # equal hits: uniform
    assert site_weights([0.0, 1.0], 1.0) == pytest.approx([0.5, 0.5])  # floor 1: uniform


def test_rebalancing_samples_low_hit_sites_more_after_the_first_evaluation(tmp_path, probed_dir):
    floor = 0.2
    cfg = write_config(
        tmp_path,
        probed_dir,
        steps=16,
        chunk=4,
        sections={"eval": {"every": 8, "checkpoint_every": 8, "rebalance_floor": floor}},
    )
    train(TrainConfig.from_toml(cfg), progress=False)
    first, second = _rows(tmp_path / "run")
    hits = [first["hit"][s] for s in SITES]
    assert len(set(hits)) > 1, f"the construction needs unequal hit rates at the first evaluation, got {hits}"
    # before the first evaluation, sites are uniform
    assert all(p == pytest.approx(1 / 3, abs=1e-4) for p in first["site_probs"].values())
    # after it, the weights come from its hit rates, with the floor
    probs = [second["site_probs"][s] for s in SITES]
    assert probs == pytest.approx(site_weights(hits, floor), abs=2e-4)
    assert min(probs) >= floor / 3 - 1e-4
    # ... and the sampling follows them: the weakest site got more than the uniform share of the inputs
    # drawn between the two evaluations, the strongest less
    counts = [second["site_counts"][s] - first["site_counts"][s] for s in SITES]
    total = sum(counts)
    assert total == 8 * 32
    weak, strong = hits.index(min(hits)), hits.index(max(hits))
    assert counts[weak] / total > 1 / 3 > counts[strong] / total


def test_without_rebalancing_site_probabilities_stay_uniform(tmp_path, probed_dir):
    cfg = write_config(tmp_path, probed_dir, steps=6, sections={"eval": {"rebalance": False}})
    train(TrainConfig.from_toml(cfg), progress=False)
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2
    for r in rows:
        assert all(p == pytest.approx(1 / 3, abs=1e-4) for p in r["site_probs"].values())
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]["site_probs"] == pytest.approx(
        [1 / 3] * 3
    )


# ---------------------------------------------------------------------------------------------- lr schedule
def test_lr_schedule_warms_up_linearly_then_cosine_decays_to_min_lr():
    o = OptimSpec(steps=100, warmup=10, min_lr=0.1)
    f = [lr_factor(s, o) for s in range(101)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to 1
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then never rising
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine: halfway down
    t = (30 - 10) / 90
    assert f[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert f[100] == pytest.approx(0.1)  # ends at min_lr
    assert lr_factor(500, o) == pytest.approx(0.1)  # and stays there
    assert min(f) >= 0.1 - 1e-12
    # no warm-up
    assert lr_factor(0, OptimSpec(steps=10, warmup=0, min_lr=0.0)) == pytest.approx(1.0)
    assert lr_factor(10, OptimSpec(steps=10, warmup=0, min_lr=0.0)) == pytest.approx(0.0)


def test_logged_lr_follows_the_schedule(run_dir):
    o = OptimSpec(steps=6, warmup=2)  # the run_dir fixture's config; lr 1e-3, min_lr 0.1
    for r in _rows(run_dir):
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"] - 1, o))  # the lr of the row's last step


def test_with_a_budget_the_schedule_ends_when_the_budget_does():
    o = OptimSpec(steps=1000, warmup=10, min_lr=0.1, max_minutes=1.0)  # 60 s
    # time further along than steps: the cosine follows the time
    assert lr_factor(100, o, elapsed=30.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half the budget: halfway down
    assert lr_factor(100, o, elapsed=60.0) == pytest.approx(0.1)  # the budget spent: min_lr
    assert lr_factor(100, o, elapsed=600.0) == pytest.approx(0.1)
    # steps further along than time: the cosine follows the steps, as without a budget
    assert lr_factor(505, o, elapsed=1.0) == pytest.approx(lr_factor(505, OptimSpec(steps=1000, warmup=10, min_lr=0.1)))
    # warm-up is in steps, and never exceeds the decayed value
    assert lr_factor(4, o, elapsed=0.0) == pytest.approx(0.5)
    assert lr_factor(4, o, elapsed=60.0) == pytest.approx(0.1)


def test_a_run_stopped_by_its_budget_ends_its_schedule_evaluates_and_checkpoints(tmp_path, probed_dir):
    """max_minutes far shorter than the steps: the learning rate has decayed to about min_lr by the last step,
    and the run ends with a hit-rate row and a checkpoint at that step (no regular evaluation is due)."""
    budget_s = 4.0
    cfg = write_config(
        tmp_path,
        probed_dir,
        steps=100_000,
        max_minutes=budget_s / 60,
        sections={"eval": {"every": 50_000, "checkpoint_every": 50_000}},
    )
    train(TrainConfig.from_toml(cfg), progress=False)
    run = tmp_path / "run"
    (row,) = _rows(run)
    assert row["budget_spent"] is True
    assert 2 <= row["step"] < 100_000 and _ckpt_step(run) == row["step"]
    assert row["elapsed_s"] >= budget_s - 0.1
    assert list(row["hit"]) == SITES and 0 <= row["mean_hit"] <= 1
    # the last step's lr: well down the cosine (1e-3 at the peak, 1e-4 at the end)
    assert row["lr"] < 0.3e-3, row
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["state"]["elapsed"] >= budget_s


# ---------------------------------------------------------------------------------------------- task rules
def test_counting_generator_format():
    task = get_task("counting")
    rng = random.Random(0)
    for _ in range(2000):
        text = task.generate(rng)
        m = re.fullmatch(r"([a-z]+)\|([a-z]):([1-9])", text)
        assert m, text
        head, target, count = m.group(1), m.group(2), int(m.group(3))
        letters = set(head)
        assert len(letters) == 3
        assert all(1 <= head.count(c) <= 9 for c in letters)
        assert target in letters and head.count(target) == count
        assert len(task.vocab.encode(text)) <= 33
        assert task.annotate(text) == f"count={count}"
    assert task.annotate("abc") is None and task.annotate("ab|1") is None


def test_counting_train_test_split_is_disjoint_and_deterministic():
    task = get_task("counting")

    def draw(seed, split, n=400):
        r = random.Random(seed)
        return [task.sample(r, split) for _ in range(n)]

    train_a, train_b = draw(0, "train"), draw(0, "train")
    assert train_a == train_b  # same seed, same inputs
    assert draw(1, "train") != train_a
    test_ = draw(0, "test") + draw(7, "test")
    assert not set(train_a + draw(3, "train")) & set(test_)
    assert all(task.is_test(t) for t in test_) and not any(task.is_test(t) for t in train_a)
    # the split is a property of the text, about test_fraction of all inputs
    rng = random.Random(5)
    frac = sum(task.is_test(task.generate(rng)) for _ in range(4000)) / 4000
    assert 0.07 < frac < 0.13


def test_counting_positions_are_the_target_character_and_colon():
    task = Counting()
    for text in ("vvzccvczvvvzvcvc|v:8", "abcab|c:1", "zzzyx|x:1"):
        toks = task.vocab.tokens_of(task.vocab.encode(text))
        pos = task.positions(text)
        assert [toks[p] for p in pos] == [text[text.index("|") + 1], ":"]
        assert toks[pos[0] - 1] == "|"
    assert task.positions("vvzccvczvvvzvcvc|v:8") == [18, 19]


def _spy_step_positions(tmp_path: Path, probed_dir: Path, bos_prob: float, steps: int):
    """Run the real training step and recover, from the activations the decoder was given, which position
    of each input was queried."""
    task = get_task("counting")
    d = tmp_path / f"spy-{bos_prob}"
    d.mkdir()
    cfg = write_config(
        d,
        probed_dir,
        sections={  # x0.pre, embeddings: each (token, position) gives a distinct activation
            "data": {"sites": ["x0.pre"], "bos_prob": bos_prob},
            "decoder": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_act_blocks": 1},
            "train": {"batch_size": 256, "chunk": 64, "bf16": False},
        },
    )
    trainer, seen = recording_trainer(cfg)
    probed, site = trainer.probed, trainer.sites[0]
    for _ in range(steps):
        assert math.isfinite(trainer.step())
    assert trainer.state.site_counts == [steps * 256]
    kinds = []  # "bos", "target", "colon" per queried input
    for ids, z in seen:
        acts = probed.run(ids, [site])[site]  # (chunk, T, d)
        d = (acts - z[:, None]).norm(dim=-1)
        best = d.argmin(-1)
        for row in range(ids.shape[0]):
            p = int(best[row])
            assert d[row, p] < 1e-4 * z[row].norm(), "the queried activation is not one of the input's"
            text = probed.tokenizer.text(ids[row])
            allowed = {0: "bos", task.positions(text)[0]: "target", task.positions(text)[1]: "colon"}
            assert p in allowed, (text, p)
            kinds.append(allowed[p])
    return kinds


def test_training_step_queries_task_positions_and_bos_about_one_percent(tmp_path, probed_dir):
    assert DataSpec().bos_prob == 0.01
    kinds = _spy_step_positions(tmp_path, probed_dir, 0.01, steps=8)
    n = len(kinds)
    assert n == 8 * 256
    assert 0.002 < kinds.count("bos") / n < 0.025
    assert 0.4 < kinds.count("target") / n < 0.6
    assert 0.4 < kinds.count("colon") / n < 0.6
    assert "bos" not in _spy_step_positions(tmp_path, probed_dir, 0.0, steps=1)
    assert set(_spy_step_positions(tmp_path, probed_dir, 1.0, steps=1)) == {"bos"}


# ---------------------------------------------------------------------------------------------- train-probed
@pytest.mark.slow
def test_train_probed_writes_a_loadable_model_with_its_accuracy_and_command(tmp_path):
    out = tmp_path / "probed"
    r = subprocess.run(
        [sys.executable, "-m", "inversionview", "train-probed", "counting", "--out", str(out), "--steps", "5"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for name in ("config.json", "model.safetensors", "vocab.json", "training.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "training.json").read_text())
    assert 0.0 <= info["test_accuracy"] <= 1.0
    assert info["test_inputs"] == 10_000 and info["steps"] == 5 and info["task"] == "counting"
    assert info["command"] == f"inversionview train-probed counting --out {out} --steps 5"
    assert f"test accuracy {info['test_accuracy']:.4f} on 10000 held-out inputs" in r.stdout
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["tokens"] == list(get_task("counting").vocab.tokens)
    probed = ProbedModel.load(out)  # loads with its character vocabulary; the decoder trains on it
    assert probed.tokenizer.encode("ab|a:1") == get_task("counting").vocab.encode("ab|a:1")
    assert (probed.n_layers, probed.n_heads, probed.d_model, probed.max_len) == (2, 1, 64, 33)


# ---------------------------------------------------------------------------------------------- precision, provenance
def test_cpu_bf16_flags_come_from_cpuinfo(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert cpu_bf16_flags(str(p)) == []  # this machine's kind: AVX2 only
    p.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bf16_flags(str(p)) == ["avx512_bf16", "amx_bf16"]
    p.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Arm (Graviton 3, ...)
    assert cpu_bf16_flags(str(p)) == ["bf16"]
    assert cpu_bf16_flags(str(tmp_path / "missing")) == []


def test_bf16_auto_uses_bf16_only_on_a_cpu_that_runs_it_fast(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda: [])  # a CPU without bf16 instructions
    use, why = choose_bf16("auto", cpu)
    assert use is False and "no bf16 instructions" in why and torch.backends.cpu.get_cpu_capability() in why
    assert choose_bf16(False, cpu)[0] is False
    with caplog.at_level("WARNING", logger="inversionview.distributed"):
        assert choose_bf16(True, cpu)[0] is True  # asked for: given, with a warning
    assert "bf16 runs several times slower than float32 here" in caplog.text
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda: ["amx_bf16"])
    use, why = choose_bf16("auto", cpu)
    assert use is True and "amx_bf16" in why
    assert choose_bf16(False, cpu)[0] is False
    assert OptimSpec().bf16 == "auto"


@pytest.mark.parametrize("value, ok", [("auto", True), (True, True), (False, True), ("yes", False), (1, False)])
def test_bf16_setting_values(value, ok, tmp_path, probed_dir):
    cfg = write_config(tmp_path, probed_dir, bf16=value)
    if ok:
        assert TrainConfig.from_toml(cfg).train.bf16 == value
    else:
        with pytest.raises(
            UserError, match=f"config key 'bf16' in \\[train\\] must be true, false or \"auto\", got {value!r}"
        ):
            TrainConfig.from_toml(cfg)


def test_run_json_records_provenance_and_the_precision_chosen(run_dir):
    import platform

    import transformers

    import inversionview

    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["format_version"] == 1
    (s,) = spec["provenance"]["sessions"]
    assert s["from_step"] == 0 and s["inversionview"] == inversionview.__version__
    assert s["torch"] == torch.__version__ and s["transformers"] == transformers.__version__
    assert s["python"] == platform.python_version() and s["device"] == "cpu" and s["processes"] == 1
    # the default, bf16 = "auto": bf16 on a CPU with bf16 instructions, else float32 (this machine: AVX2 only)
    assert s["decoder_precision"] == ("bfloat16" if cpu_bf16_flags() else "float32")
    assert s["precision_reason"] == choose_bf16("auto", torch.device("cpu"))[1]
    # the git commit of the checkout the package runs from
    src = Path(inversionview.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    tracked = subprocess.run(["git", "-C", str(src), "ls-files", "--error-unmatch", "train.py"], capture_output=True)
    if head.returncode == 0 and tracked.returncode == 0:
        assert s["git_commit"] == head.stdout.strip() and isinstance(s["git_dirty"], bool)
    else:
        assert s["git_commit"] is None


def test_resuming_the_same_way_adds_no_session_and_another_way_adds_one(tmp_path, probed_dir):
    train(TrainConfig.from_toml(write_config(tmp_path, probed_dir, steps=2)), progress=False)
    train(TrainConfig.from_toml(write_config(tmp_path, probed_dir, steps=3)), progress=False)
    sessions = json.loads((tmp_path / "run" / "run.json").read_text())["provenance"]["sessions"]
    assert [s["from_step"] for s in sessions] == [0]
    # the other precision than "auto" chose on this machine (bfloat16 where the CPU has bf16 instructions)
    other = not cpu_bf16_flags()
    train(TrainConfig.from_toml(write_config(tmp_path, probed_dir, steps=4, bf16=other)), progress=False)
    sessions = json.loads((tmp_path / "run" / "run.json").read_text())["provenance"]["sessions"]
    assert [s["from_step"] for s in sessions] == [0, 3]
    assert sessions[1]["precision_reason"].startswith(f"bf16 = {str(other).lower()} in [train]")
    assert sessions[1]["decoder_precision"] != sessions[0]["decoder_precision"]


# ---------------------------------------------------------------------------------------------- run directory files
def _obey_permissions():  # pragma: no cover - runs in the child
    """Before exec: root drops CAP_DAC_OVERRIDE from its bounding set, so that the program it runs obeys permission
    bits like any user (other users obey them anyway). Exit 99 if that is not allowed here."""
    if os.geteuid() == 0:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
            os._exit(99)


def test_resuming_in_a_read_only_run_directory_is_a_one_line_error(tmp_path, probed_dir):
    train(TrainConfig.from_toml(write_config(tmp_path, probed_dir, steps=3)), progress=False)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = write_config(tmp_path, probed_dir, steps=6)  # more steps: it resumes
    run.chmod(0o555)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "inversionview", "train", str(cfg), "--no-progress"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
            preexec_fn=_obey_permissions,
        )
    finally:
        run.chmod(0o755)
    if r.returncode == 99:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so root could write the read-only directory anyway")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot write to the run directory {run} (Permission denied): training writes its checkpoints there; "
        "make it writable or use another 'out'"
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_write_that_fails_while_training_is_a_one_line_error(tmp_path, probed_dir, capsys):
    """A file that cannot be written (here the metrics file, rewritten on resuming: a directory stands where its
    temporary copy goes) is a one-line error naming it; the last checkpoint stays."""
    from conftest import user_error

    cfg = write_config(tmp_path, probed_dir, steps=3)
    train(TrainConfig.from_toml(cfg), progress=False)
    run = tmp_path / "run"
    (run / "metrics.jsonl.tmp").mkdir()  # where the metrics are rewritten before they replace the old file
    (run / "metrics.jsonl.tmp" / "x").write_text("")
    msg = user_error(capsys, "train", write_config(tmp_path, probed_dir, steps=6), "--no-progress")
    assert msg.startswith(f"error: cannot write {run / 'metrics.jsonl'}: ")
    assert _ckpt_step(run) == 3


def _copy_run(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


@pytest.mark.parametrize("name", ["run.json", "config.json", "checkpoint.pt"])
def test_artifacts_carry_a_format_version_and_a_newer_one_is_refused(name, run_dir, tmp_path, probed_dir, capsys):
    from conftest import user_error

    run = _copy_run(run_dir, tmp_path / "run")
    if name == "checkpoint.pt":
        saved = torch.load(run / name, weights_only=True)
        assert saved["format_version"] == 1
        torch.save({**saved, "format_version": 99}, run / name)
        cmd = ["train", write_config(tmp_path, probed_dir, steps=9), "--no-progress"]
    else:
        d = json.loads((run / name).read_text())
        assert d["format_version"] == 1
        (run / name).write_text(json.dumps({**d, "format_version": 99}))
        cmd = ["query", run, "--text", "abcab|c:1", "--site", "x0.pre", "--position", "-2", "--samples", "4"]
    msg = user_error(capsys, *cmd)
    assert msg.startswith(f"error: {run / name} has format_version 99, newer than this inversionview (")
    assert msg.endswith("reads (1): upgrade inversionview to read it")
    assert _ckpt_step(run) == 6


@pytest.mark.parametrize(
    "name, where", [("run.json", None), ("config.json", None), ("checkpoint.pt", None), ("checkpoint.pt", "state")]
)
def test_artifacts_with_unknown_fields_are_refused(name, where, run_dir, tmp_path, probed_dir, capsys):
    from conftest import user_error

    run = _copy_run(run_dir, tmp_path / "run")
    if name == "checkpoint.pt":
        saved = torch.load(run / name, weights_only=True)
        (saved[where] if where else saved)["momentum"] = 0.5
        torch.save(saved, run / name)
        cmd = ["train", write_config(tmp_path, probed_dir, steps=9), "--no-progress"]
    else:
        d = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**d, "momentum": 0.5}))
        cmd = ["query", run, "--text", "abcab|c:1", "--site", "x0.pre", "--position", "-2", "--samples", "4"]
    msg = user_error(capsys, *cmd)
    assert "has unknown field 'momentum': it was edited or written by another version of inversionview" in msg
    assert _ckpt_step(run) == 6


def test_a_run_json_from_before_format_versions_still_reads(run_dir, tmp_path, probed_dir, caplog):
    """run.json without a format_version (version 0): its fingerprint was the probed weights' alone."""
    from inversionview.run import InversionView

    run = _copy_run(run_dir, tmp_path / "run")
    d = json.loads((run / "run.json").read_text())
    del d["format_version"], d["provenance"]
    d["fingerprint"] = ProbedModel.load(probed_dir).fingerprint
    (run / "run.json").write_text(json.dumps(d))
    with caplog.at_level("WARNING", logger="inversionview.run"):
        iv = InversionView.load(run)
    assert "predates format_version 1" in caplog.text
    assert iv.query("abcab|c:1", site="x0.pre", position=-2, samples=4).samples


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            {"mode": "raw"},
            "this decoder was trained on 'tl' activations, not 'raw' (run.json's mode or dtype was changed "
            "after training): load the probed model with mode='tl'",
        ),
        ({"dtype": "float16"}, "this decoder belongs to another probed model"),
    ],
)
def test_editing_the_mode_or_dtype_in_run_json_is_refused(edit, fragment, run_dir, tmp_path, capsys):
    from conftest import user_error

    run = _copy_run(run_dir, tmp_path / "run")
    d = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**d, **edit}))
    for cmd in (
        ["query", run, "--text", "abcab|c:1", "--site", "x0.pre", "--position", "-2", "--samples", "4"],
        ["evaluate", run, "--queries", "2"],
    ):
        assert fragment in user_error(capsys, *cmd)


def test_the_fingerprint_covers_the_probed_weights_mode_and_dtype(run_dir, probed_dir):
    from inversionview.artifacts import probed_fingerprint
    from inversionview.run import RunSpec

    spec = RunSpec.load(run_dir)
    weights = ProbedModel.load(probed_dir).fingerprint
    assert spec.fingerprint == probed_fingerprint(weights, "tl", "float32")
    assert (
        len(
            {
                probed_fingerprint(w, m, t)
                for w in (weights, "0" * 16)
                for m in ("tl", "raw")
                for t in ("float32", "bfloat16")
            }
        )
        == 8
    )
    with pytest.raises(UserError, match="trained on the probed model in float32, not float64"):
        spec.check(ProbedModel.load(probed_dir, dtype=torch.float64))  # the same weights, read in another dtype
