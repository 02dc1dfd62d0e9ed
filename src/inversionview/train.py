"""Online decoder training (METHOD.md §3): ``inversionview train CONFIG.toml``.

Every step's data is fresh: real inputs are drawn, the frozen probed model is run up to the sites the
batch needs, one site is chosen per chunk of ``chunk`` inputs and one query position per input, and the
decoder learns to reproduce the whole input from that activation. Sites are sampled with weights that
favour the sites whose hit rate is low (rebalancing), with a floor so that no site starves.

The loop is plain PyTorch with a resumable :class:`State` written atomically to ``checkpoint.pt``. SIGINT
and SIGTERM save and exit; the same command resumes, and the result equals an uninterrupted run.

Under ``torchrun --nproc-per-node N`` the same loop runs in N processes with DDP (:mod:`inversionview.distributed`).
A step's inputs come from a seed of the config's seed and the step (:func:`step_rng`). Every process draws the
step's texts (a few milliseconds), sorts them by length into chunks as one process does, and takes its own share
of the chunks: only those it encodes, runs through the probed model and trains on. So the global batch and the
loss are those of one process, and a run may resume with any number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .decoder import Decoder, DecoderConfig, _atomic_write_text
from .distributed import Dist
from .errors import UserError
from .preimage import hit_rates, make_queries
from .probed import ProbedModel
from .run import InversionView, RunSpec, resolve_model
from .data import check_spec as check_data_spec
from .data import open_source
from .data import record as data_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbedSpec:
    model: str = "shipped:counting"
    """Probed model: a local directory, a hub id, or ``shipped:TASK``."""
    mode: str = "tl"
    """Activation mode: ``tl`` (TransformerLens-compatible, the paper's) or ``raw``."""
    vocab: dict | None = None
    """Character vocabulary ``{tokens = [...], bos = .., eos = .., pad = ..}`` if the model has no tokenizer files."""
    tokenizer: str = ""
    """A built-in tokenizer by name instead of the model's files: ``"gpt2"`` (GPT-2's BPE, offline)."""
    dtype: str = "float32"
    """The probed model's weights: ``"float32"``, or ``"float16"`` / ``"bfloat16"`` to halve its memory (the
    decoder reads its activations in float32 either way; a run reads with the dtype it was trained with)."""


@dataclass(frozen=True)
class DataSpec:
    task: str | None = None
    """Built-in task whose generator and position rules supply the inputs; "counting" when no path is given."""
    path: str = ""
    """The user's own inputs instead of a task: a text file (one per line), a JSONL file or a saved HF dataset."""
    format: str = ""
    """"text", "jsonl" or "hf"; default from the path (a directory: hf; .jsonl: jsonl; else text)."""
    field: str = "text"
    """The text field of a JSONL object or the text column of an HF dataset."""
    positions: str | list | dict | None = None
    """Query positions: "all", [3, -2] or { marker = "|", offset = 1 } (see inversionview.data); default: the
    task's rule, or "all" for a data file."""
    sites: tuple[str, ...] = ()
    """Sites to train on (TransformerLens or short names); empty means the task's paper sites."""
    bos_prob: float = 0.01
    """Probability of querying the BOS position, so that the decoder learns what "no information" looks like."""

    def __post_init__(self):
        if self.task is None and not self.path:
            object.__setattr__(self, "task", "counting")

    def record(self) -> dict | None:
        """What run.json keeps of these settings besides the task (see :func:`inversionview.data.record`)."""
        return data_record(self.task, self.path, self.format, self.field, self.positions)


@dataclass(frozen=True)
class ModelSpec:
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_act_blocks: int = 6


@dataclass(frozen=True)
class OptimSpec:
    steps: int = 2000
    """Total optimizer steps (the schedule's length)."""
    max_minutes: float = 0.0
    """Wall-time budget across resumes; 0 means none. Training stops, saved, when it is spent."""
    batch_size: int = 256
    chunk: int = 64
    """Inputs per site: each chunk of the batch reads one site."""
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    weight_decay: float = 0.01
    bf16: bool = True
    """bf16 autocast for the decoder's forward pass."""
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"; under torchrun, process k uses cuda:k."""


@dataclass(frozen=True)
class EvalSpec:
    every: int = 200
    """Steps between hit-rate evaluations (appended to metrics.jsonl)."""
    queries: int = 64
    """Held-out query activations per site for the periodic evaluation."""
    epsilon: float = 0.1
    metric: str = "euclidean"
    rebalance: bool = True
    """Sample sites with weights softmax((mean_hit - hit_site) * 6)."""
    rebalance_floor: float = 0.5
    """Each site keeps at least this fraction of its uniform share."""
    checkpoint_every: int = 200


@dataclass(frozen=True)
class TrainConfig:
    out: str
    probed: ProbedSpec = field(default_factory=ProbedSpec)
    data: DataSpec = field(default_factory=DataSpec)
    decoder: ModelSpec = field(default_factory=ModelSpec)
    train: OptimSpec = field(default_factory=OptimSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a TOML config; relative paths in it are relative to the config file."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        cfg = _build(cls, raw, "")
        base = path.resolve().parent
        out = str(base / cfg.out)
        model = cfg.probed.model
        if not model.startswith("shipped:") and (model.startswith(".") or (base / model).exists()):
            model = str(base / model)
        data = cfg.data
        if data.path:
            data = dataclasses.replace(data, path=str(base / Path(data.path).expanduser()))
        return dataclasses.replace(cfg, out=out, probed=dataclasses.replace(cfg.probed, model=model), data=data)

    def to_dict(self, relative_to: Path | None = None) -> dict:
        """The config as a dict; with ``relative_to``, local paths are made relative to that directory."""
        d = dataclasses.asdict(self)
        if relative_to is not None:
            rel = lambda p: os.path.relpath(Path(p).resolve(), Path(relative_to).resolve())  # noqa: E731
            d["out"] = "."
            if not self.probed.model.startswith("shipped:") and Path(self.probed.model).exists():
                d["probed"]["model"] = rel(self.probed.model)
            if self.data.path:
                d["data"]["path"] = rel(self.data.path)
        return d


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"config section [{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in known:
            raise UserError(f"unknown config key {k!r}{' in [' + where + ']' if where else ''}: expected one of {', '.join(known)}")
    sub = {"probed": ProbedSpec, "data": DataSpec, "decoder": ModelSpec, "train": OptimSpec, "eval": EvalSpec}
    kw = {}
    for k, v in raw.items():
        f = known[k]
        if cls is TrainConfig and k in sub:
            kw[k] = _build(sub[k], v, k)
            continue
        default = f.default if f.default is not dataclasses.MISSING else ("" if k == "out" else None)
        if isinstance(default, bool) and not isinstance(v, bool) or \
           isinstance(default, (int, float)) and not isinstance(default, bool) and (not isinstance(v, (int, float)) or isinstance(v, bool)) or \
           type(default) is int and isinstance(v, float) or \
           isinstance(default, str) and not isinstance(v, str) or \
           isinstance(default, tuple) and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            want = {bool: "a bool", int: "an int", float: "a number", str: "a string", tuple: "a list of strings"}[type(default)]
            raise UserError(f"config key {k!r}{' in [' + where + ']' if where else ''} must be {want}, got {v!r}")
        kw[k] = tuple(v) if isinstance(default, tuple) else v
    if "out" in known and "out" not in kw:
        raise UserError("config is missing the key 'out': the run directory to write")
    return cls(**kw)


def _check(cfg: TrainConfig) -> None:
    """Refuse values that would crash or silently misbehave later in training."""
    o, e, m = cfg.train, cfg.eval, cfg.decoder
    for k, v in {"train.steps": o.steps, "train.batch_size": o.batch_size, "train.chunk": o.chunk, "train.lr": o.lr,
                 "eval.every": e.every, "eval.queries": e.queries, "eval.checkpoint_every": e.checkpoint_every,
                 "eval.epsilon": e.epsilon, "decoder.d_model": m.d_model, "decoder.n_layers": m.n_layers,
                 "decoder.n_heads": m.n_heads}.items():
        if not v > 0:
            raise UserError(f"{k} must be positive, got {v}")
    for k, v in {"data.bos_prob": cfg.data.bos_prob, "train.min_lr": o.min_lr, "eval.rebalance_floor": e.rebalance_floor}.items():
        if not 0 <= v <= 1:
            raise UserError(f"{k} must be between 0 and 1, got {v}")
    if o.warmup < 0 or o.max_minutes < 0 or m.n_act_blocks < 0:
        raise UserError("train.warmup, train.max_minutes and decoder.n_act_blocks must not be negative")
    if m.d_model % m.n_heads:
        raise UserError(f"decoder.d_model ({m.d_model}) must be a multiple of decoder.n_heads ({m.n_heads})")
    if o.batch_size % o.chunk:
        raise UserError(f"train.batch_size ({o.batch_size}) must be a multiple of train.chunk ({o.chunk})")
    if e.metric not in ("euclidean", "cosine"):
        raise UserError(f"unknown metric {e.metric!r} in [eval]: expected 'euclidean' or 'cosine'")
    if cfg.probed.dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.probed.dtype!r} in [probed]: expected one of {', '.join(map(repr, DTYPES))}")
    if not distributed.DEVICE.fullmatch(o.device):
        raise UserError(f"unknown device {o.device!r} in [train]: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if cfg.probed.tokenizer:
        from .tokenizer import check_tokenizer_name

        check_tokenizer_name(cfg.probed.tokenizer)
        if cfg.probed.vocab is not None:
            raise UserError("[probed] gives both vocab and tokenizer: use one of them")
    d = cfg.data
    check_data_spec(d.task, d.path, d.format, d.field, d.positions)
    if d.path and not d.sites:
        raise UserError('data.sites is required with data.path: name the sites to train on, e.g. sites = ["x0.mid", "a1.0"]')


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, o: OptimSpec) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``steps``."""
    if step < o.warmup:
        return (step + 1) / o.warmup
    t = min(1.0, (step - o.warmup) / max(1, o.steps - o.warmup))
    return o.min_lr + (1 - o.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def site_weights(hits: list[float], floor: float) -> list[float]:
    """Sampling weights for sites from their hit rates: softmax((mean - hit) * 6), mixed with the uniform
    distribution so that each site keeps at least ``floor`` of its uniform share."""
    h = torch.tensor(hits, dtype=torch.float64)
    p = torch.softmax((h.mean() - h) * 6.0, 0)
    return (floor / len(hits) + (1 - floor) * p).tolist()


@dataclass
class State:
    """Everything needed to resume exactly, besides weights and optimizer: progress and site weights. The data
    needs no RNG state: each step's inputs are a function of the seed and the step (:func:`step_rng`)."""

    step: int = 0
    elapsed: float = 0.0
    site_probs: list[float] | None = None
    site_counts: list[int] | None = None


class _Interrupt:
    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.hit = True
        log.warning("received %s: saving a checkpoint, then stopping", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STEP_LOG = "INVERSIONVIEW_STEP_LOG"
"""Debugging aid: a directory where every process appends, per step, the global loss and a hash of its decoder
weights to ``rank{RANK}.jsonl`` (the distributed test checks that all processes hold the same weights)."""


def step_rng(seed: int, step: int) -> random.Random:
    """The random source of step ``step``'s global batch (inputs, query positions, sites). It depends on nothing
    else, so the batch is the same however many processes share it, and a run resumed with another number of
    processes continues the same sequence of batches."""
    return random.Random(f"inversionview/{seed}/{step}")


def my_chunks(n_chunks: int, d: Dist) -> range:
    """The chunks of each step that process ``d.rank`` of ``d.world`` trains on: a contiguous share of the
    length-sorted batch, sizes differing by at most one."""
    return range(d.rank * n_chunks // d.world, (d.rank + 1) * n_chunks // d.world)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, progress: bool = True) -> InversionView:
    """Train (or resume) a decoder as configured. Returns the loaded run.

    Launched by ``torchrun --nproc-per-node N``, the N processes train one decoder with DDP: ``train.batch_size``
    stays the global batch, each process runs the probed model and the decoder on its share of each step's chunks,
    DDP averages the gradients, and rank 0 alone evaluates and writes the run directory."""
    _check(cfg)
    d = distributed.from_env()
    n_chunks = cfg.train.batch_size // cfg.train.chunk
    if d.world > n_chunks:
        raise UserError(f"{d.world} processes cannot share {n_chunks} chunks per step (train.batch_size "
                        f"{cfg.train.batch_size} / train.chunk {cfg.train.chunk}): use at most {n_chunks} processes "
                        "or smaller chunks")
    dev = distributed.resolve_device(cfg.train.device, d.local_rank, d.world)
    with distributed.session(dev) as d:
        return _train(cfg, d, dev, progress and d.main)


def _train(cfg: TrainConfig, d: Dist, dev: torch.device, progress: bool) -> InversionView:
    o, e = cfg.train, cfg.eval
    n_chunks = o.batch_size // o.chunk
    bf16 = o.bf16
    if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        if d.main:
            log.warning("%s has no bf16 support: training the decoder in float32", torch.cuda.get_device_name(dev))
        bf16 = False
    out = Path(cfg.out)
    probed = ProbedModel.load(resolve_model(cfg.probed.model), vocab=cfg.probed.vocab, mode=cfg.probed.mode,
                              tokenizer=cfg.probed.tokenizer or None, dtype=DTYPES[cfg.probed.dtype], device=dev)
    task = open_source(cfg.data.task, cfg.data.record(), probed)  # a Task or another DataSource
    sites = [probed.site(x) for x in (cfg.data.sites or task.sites)]
    if len(set(sites)) != len(sites):
        raise UserError("data.sites lists a site twice")
    spec = RunSpec.for_training(cfg, probed, sites)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        RunSpec.load(out).check_same(spec)
        dcfg = DecoderConfig.load(out / "config.json")
        if any(getattr(dcfg, k) != v for k, v in dataclasses.asdict(cfg.decoder).items()):
            raise UserError(f"{out} holds a decoder of another shape than [decoder] in the config: "
                            "use a new 'out' directory or restore the [decoder] settings")
        decoder = Decoder(dcfg).to(dev).train()
        opt = _optimizer(decoder, o)
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=False)
            # the weights of the checkpoint's own step: model.safetensors may be newer after a crash
            decoder.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            known = {f.name for f in dataclasses.fields(State)}
            state = State(**{k: v for k, v in saved["state"].items() if k in known})
        except Exception as ex:
            raise UserError(f"checkpoint {ckpt} is corrupt ({str(ex).splitlines()[0][:80]}); delete it to start over") from None
        if d.main:
            log.info("resuming %s from step %d", out, state.step)
    else:
        if d.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as ex:
                raise UserError(f"cannot create the run directory {out}: {ex.strerror}") from None
        torch.manual_seed(o.seed)
        decoder = Decoder(DecoderConfig(vocab_size=probed.tokenizer.vocab_size, max_len=probed.max_len,
                                        d_act=probed.d_model, n_sites=len(sites), **dataclasses.asdict(cfg.decoder)))
        decoder.to(dev)
        _init_stats(decoder, probed, task, sites, random.Random(o.seed))
        state = State(site_probs=[1 / len(sites)] * len(sites), site_counts=[0] * len(sites))
        if d.main:
            spec.save(out)
            _atomic_write_text(out / "train.json", json.dumps(cfg.to_dict(relative_to=out), indent=1))
            (out / "metrics.jsonl").unlink(missing_ok=True)
        decoder.train()
        opt = _optimizer(decoder, o)
    model = decoder
    if d.world > 1:  # rank 0's weights are broadcast here; gradients are averaged in backward()
        model = torch.nn.parallel.DistributedDataParallel(decoder, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_log = Path(os.environ[STEP_LOG]) / f"rank{d.rank}.jsonl" if os.environ.get(STEP_LOG) else None
    if d.main:
        _truncate_metrics(out / "metrics.jsonl", state.step)
        queries = make_queries(probed, task, sites, e.queries, seed=o.seed + 10_000)

    def checkpoint():
        decoder.save(out)
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"state": dataclasses.asdict(state), "optimizer": opt.state_dict(), "model": decoder.state_dict()}, tmp)
        tmp.replace(ckpt)

    budget = o.max_minutes * 60 if o.max_minutes > 0 else float("inf")
    if state.step >= o.steps or state.elapsed >= budget:
        if d.main:
            log.info("%s is already trained (%d steps, %.0f s)", out, state.step, state.elapsed)
        return InversionView.load(out, probed=probed, device=str(dev))
    bar = tqdm(total=o.steps, initial=state.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    t_start, elapsed0 = time.time(), state.elapsed
    tokens = samples = 0
    t_rate = time.time()
    with _Interrupt() as stop:
        while state.step < o.steps:
            for g in opt.param_groups:
                g["lr"] = o.lr * lr_factor(state.step, o)
            batch = _draw(probed, task, step_rng(o.seed, state.step), state.site_probs, len(sites), o.batch_size,
                          o.chunk, cfg.data.bos_prob)
            total, n_tok = _chunks_loss(model, probed, sites, batch, my_chunks(n_chunks, d), dev, bf16)
            # one all-reduce per step: the loss sum, the token count and the stop votes
            flags = [float(stop.hit), float(elapsed0 + time.time() - t_start >= budget)]
            stats = torch.cat([total.detach().double().reshape(1),
                               torch.tensor([n_tok, *flags], dtype=torch.float64, device=dev)])
            d.all_reduce(stats)
            stats = stats.tolist()
            g_tok = stats[1]
            loss = stats[0] / g_tok  # the global batch's mean token loss, as one process would compute it
            halt, over_budget = stats[2] > 0, stats[3] > 0
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over the processes: scaling by world / global tokens makes the average the
            # gradient of the global mean loss
            (total * (d.world / g_tok)).backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
            opt.step()
            state.step += 1
            for si in batch.chunk_sites:
                state.site_counts[si] += o.chunk
            state.elapsed = elapsed0 + time.time() - t_start
            tokens += int(g_tok)
            samples += o.batch_size
            if step_log is not None:
                _log_step(step_log, state.step, loss, decoder)
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples / (time.time() - t_rate):.0f}")
            row = None
            if state.step % e.every == 0 or state.step == o.steps:
                if d.main:  # the other processes wait for its site weights (or at the next step's all-reduce)
                    dt = time.time() - t_rate
                    hits = hit_rates(decoder, probed, queries, e.epsilon, e.metric, seed=state.step)
                    row = {"step": state.step, "elapsed_s": round(state.elapsed, 1), "loss": round(loss, 4),
                           "lr": opt.param_groups[0]["lr"], "tokens_per_s": round(tokens / dt),
                           "samples_per_s": round(samples / dt, 1),
                           "hit": {s.short: round(h, 4) for s, h in zip(sites, hits)},
                           "mean_hit": round(sum(hits) / len(hits), 4),
                           "site_probs": {s.short: round(p, 4) for s, p in zip(sites, state.site_probs)},
                           "site_counts": {s.short: c for s, c in zip(sites, state.site_counts)}}
                    if d.world > 1:
                        row["processes"] = d.world
                    decoder.train()
                if e.rebalance:
                    probs = site_weights(hits, e.rebalance_floor) if d.main else state.site_probs
                    state.site_probs = d.broadcast(torch.tensor(probs, dtype=torch.float64, device=dev)).tolist()
                tokens = samples = 0
                t_rate = time.time()
                if row is not None:
                    bar.write(f"step {state.step}: mean hit {row['mean_hit']:.3f}  " +
                              " ".join(f"{k}={v:.2f}" for k, v in row["hit"].items()))
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
            done = state.step >= o.steps or over_budget
            if d.main and (done or halt or state.step % e.checkpoint_every == 0 or state.step % e.every == 0):
                checkpoint()
            if halt:
                bar.close()
                d.barrier()  # the checkpoint is written before any process reports
                raise UserError(f"interrupted at step {state.step}; checkpoint saved: run the same command to resume")
            if over_budget:
                if d.main:
                    log.info("wall-time budget of %.1f min spent at step %d", o.max_minutes, state.step)
                break
    bar.close()
    d.barrier()
    return InversionView.load(out, probed=probed, device=str(dev))


def _log_step(path: Path, step: int, loss: float, decoder: Decoder) -> None:
    h = hashlib.sha256()
    for p in decoder.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "weights": h.hexdigest()[:16]}) + "\n")


def _optimizer(decoder: Decoder, o: OptimSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decoder.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.98))


def _init_stats(decoder: Decoder, probed, task, sites, rng: random.Random, n: int = 1024) -> None:
    texts = [task.sample(rng) for _ in range(n)]
    b = probed.batch([probed.encode(t) for t in texts])
    pos = torch.tensor([rng.choice(task.positions(t)) for t in texts])
    acts = probed.run(b.ids, sites)
    for i, s in enumerate(sites):
        decoder.init_site_stats(i, acts[s][torch.arange(n), pos].float())


def _step(decoder, probed, task, sites, rng: random.Random, state: State, o: OptimSpec, bos_prob: float, dev):
    """One single-process step's mean token loss over ``o.batch_size`` fresh inputs drawn from ``rng``. Counts
    the inputs per site in ``state``."""
    b = _draw(probed, task, rng, state.site_probs, len(sites), o.batch_size, o.chunk, bos_prob)
    total, n_tok = _chunks_loss(decoder, probed, sites, b, range(len(b.chunk_sites)), dev, o.bf16)
    for si in b.chunk_sites:
        state.site_counts[si] += o.chunk
    return total / n_tok, n_tok


@dataclass(frozen=True)
class _Drawn:
    """A step's global batch: inputs sorted by length (so each chunk is trimmed), one query position per input,
    one site index per chunk."""

    seqs: list
    positions: list
    chunk_sites: list
    chunk: int


def _draw(probed, task, rng: random.Random, site_probs, n_sites: int, batch: int, chunk: int, bos_prob: float) -> _Drawn:
    texts = [task.sample(rng) for _ in range(batch)]
    pairs = sorted(((probed.encode(t), t) for t in texts), key=lambda p: len(p[0]))  # stable: ties keep their order
    # positions follow the data source's rule for each (sorted) input; BOS with probability bos_prob
    positions = [0 if rng.random() < bos_prob else rng.choice(task.positions(t)) for _, t in pairs]
    chunk_sites = rng.choices(range(n_sites), weights=site_probs, k=batch // chunk)
    return _Drawn([s for s, _ in pairs], positions, chunk_sites, chunk)


def _chunks_loss(model, probed, sites, drawn: _Drawn, chunks: range, dev, bf16: bool):
    """The summed token loss of the chunks ``chunks`` of a drawn batch, and their number of predicted tokens. The
    probed model runs once, on these chunks' inputs only, up to the sites they need."""
    k = drawn.chunk
    mine = slice(chunks.start * k, chunks.stop * k)
    chunk_sites = drawn.chunk_sites[chunks.start:chunks.stop]
    positions = drawn.positions[mine]
    b = probed.batch(drawn.seqs[mine])
    acts = probed.run(b.ids, [sites[i] for i in set(chunk_sites)])
    stop = _stop_token(probed.tokenizer)
    total = torch.zeros((), device=dev)
    n_tok = 0
    for c, si in enumerate(chunk_sites):
        rows = slice(c * k, (c + 1) * k)
        lengths = b.lengths[rows]
        T = int(lengths.max())
        ids = b.ids[rows, :T]
        if stop is not None:  # the tokenizer ends no input with EOS: the decoder learns to stop after the last token
            ids = torch.cat([ids, torch.full((k, 1), probed.tokenizer.pad_id)], 1)
            ids[torch.arange(k), lengths] = stop
            lengths, T = lengths + 1, T + 1
        ids = ids.to(dev)
        z = acts[sites[si]][rows][torch.arange(k), torch.tensor(positions[rows])]
        site = torch.full((k,), si, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1], z, site)
        # the targets are each input's tokens after BOS (and its EOS); padding is ignored, found by length
        # because PAD may be the same token as EOS (GPT-2: <|endoftext|> is BOS, EOS and PAD)
        beyond = torch.arange(1, T, device=dev)[None, :] >= lengths.to(dev)[:, None]
        target = ids[:, 1:].masked_fill(beyond, -100)
        total = total + F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        n_tok += int((target != -100).sum())
    return total, n_tok


def _stop_token(tok) -> int | None:
    """The token the decoder must learn to end a sample with, where the tokenizer's inputs do not already end with
    it (HF tokenizers append no EOS): its EOS id; None for a vocabulary that appends EOS itself."""
    if getattr(tok, "appends_eos", True) or tok.eos_id is None:
        return None
    return tok.eos_id


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows written after the checkpoint we resume from: they will be written again."""
    if not path.exists():
        return
    rows = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                rows.append(ln)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill mid-write
            continue
    _atomic_write_text(path, "".join(r + "\n" for r in rows))
