"""Training a built-in task's probed model (``inversionview train-probed TASK``)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..probed import ProbedModel
from . import Task

log = logging.getLogger(__name__)


def _batch(task: Task, texts: list[str]):
    seqs = [task.vocab.encode(t) for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), task.vocab.pad_id)
    labels = torch.full((len(seqs), T), -100)
    for i, (s, t) in enumerate(zip(seqs, texts)):
        ids[i, : len(s)] = torch.tensor(s)
        for p in task.answer_positions(t):
            labels[i, p - 1] = s[p]  # the logit at p-1 predicts token p
    return ids, labels


@torch.no_grad()
def accuracy(model, task: Task, n: int = 10_000, seed: int = 1) -> float:
    """Exact-match accuracy on the answer tokens over ``n`` held-out test inputs."""
    rng = random.Random(seed)
    correct = 0
    for start in range(0, n, 1000):
        ids, labels = _batch(task, [task.sample(rng, "test") for _ in range(min(1000, n - start))])
        pred = model(input_ids=ids).logits.argmax(-1)
        mask = labels != -100
        correct += ((pred == labels) | ~mask).all(-1).sum().item()
    return correct / n


def train_probed(task: Task, out: str | Path, steps: int = 6000, batch_size: int = 256, lr: float = 3e-3,
                 seed: int = 0, command: str | None = None) -> dict:
    """Train the paper's probed model for ``task`` from scratch and save it to ``out``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    v = task.vocab
    config = GPT2Config(vocab_size=v.vocab_size, bos_token_id=v.bos_id, eos_token_id=v.eos_id,
                        pad_token_id=v.pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **task.model)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train-probed {task.name}", unit="step")
    for step in bar:
        ids, labels = _batch(task, [task.sample(rng) for _ in range(batch_size)])
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    acc = accuracy(model, task)
    info = {"task": task.name, "test_accuracy": acc, "test_inputs": 10_000, "steps": steps,
            "batch_size": batch_size, "lr": lr, "seed": seed, "train_seconds": round(time.time() - t0, 1), "command": command}
    ProbedModel(model, task.vocab, mode="raw").save(out)
    (Path(out) / "training.json").write_text(json.dumps(info, indent=1))
    log.info("test accuracy %.4f", acc)
    return info
