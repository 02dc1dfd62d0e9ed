"""Online decoder training (METHOD.md §3): ``inversionview train CONFIG.toml``.

Every step's data is fresh: real inputs are drawn, the frozen probed model is run up to the sites the
batch needs, one site is chosen per chunk of ``chunk`` inputs and one query position per input, and the
decoder learns to reproduce the whole input from that activation. Sites are sampled with weights that
favour the sites whose hit rate is low (rebalancing), with a floor so that no site starves.

The loop is plain PyTorch in named steps (:class:`Trainer`: set up or resume, step, evaluate, checkpoint, stop)
with a resumable :class:`State` written atomically to ``checkpoint.pt``. SIGINT and SIGTERM save and exit; the
same command resumes, and the result equals an uninterrupted run. With a wall-time budget (``max_minutes``) the
learning-rate schedule ends with the budget, and a run stopped by it is evaluated and saved.

Under ``torchrun --nproc-per-node N`` the same loop runs in N processes with DDP (:mod:`inversionview.distributed`).
A step's inputs come from a seed of the config's seed and the step (:func:`step_rng`). Every process draws the
step's texts (a few milliseconds), sorts them by length into chunks as one process does, and takes its own share
of the chunks: only those it encodes, runs through the probed model and trains on. So the global batch and the
loss are those of one process, and a run may resume with any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import signal
import subprocess
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, settings
from .artifacts import CHECKPOINT_FORMAT, atomic_write_text, check_fields, check_version
from .decoder import Decoder, DecoderConfig
from .distributed import Dist
from .errors import UserError
from .propose import hit_rates, make_queries
from .progress import Progress
from .probed import ProbedModel
from .run import InversionView, RunSpec, resolve_model
from .settings import setting
from .tokenizer import CharVocab
from .data import check_spec as check_data_spec
from .data import open_source
from .data import record as data_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbedSpec:
    """The probed model: the network whose activations are read."""

    model: str = "shipped:counting"
    """Probed model: a local directory, a hub id, or ``shipped:TASK``."""
    mode: str = "tl"
    """Activation mode: ``tl`` (TransformerLens-compatible, the paper's) or ``raw``."""
    vocab: dict | None = None
    """Character vocabulary ``{tokens = [...], bos = .., eos = .., pad = ..}`` if the model has no tokenizer files."""
    tokenizer: str = ""
    """A built-in tokenizer by name instead of the model's files: ``"gpt2"`` (GPT-2's BPE, offline)."""
    dtype: str = setting("float32", choices=settings.DTYPES, what="dtype")
    """The probed model's weights: ``"float32"``, or ``"float16"`` / ``"bfloat16"`` to halve its memory (the
    decoder reads its activations in float32 either way; a run reads with the dtype it was trained with)."""


@dataclass(frozen=True)
class DataSpec:
    """The inputs: a built-in task or the user's own data file, the query positions and the sites."""

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
    bos_prob: float = setting(0.01, lo=0, hi=1)
    """Probability of querying the BOS position, so that the decoder learns what "no information" looks like."""

    def __post_init__(self):
        if self.task is None and not self.path:
            object.__setattr__(self, "task", "counting")

    def record(self) -> dict | None:
        """What run.json keeps of these settings besides the task (see :func:`inversionview.data.record`)."""
        return data_record(self.task, self.path, self.format, self.field, self.positions)


@dataclass(frozen=True)
class ModelSpec:
    """The decoder's architecture."""

    d_model: int = setting(256, above=0)
    """Width of the decoder's transformer; a multiple of n_heads."""
    n_layers: int = setting(2, above=0)
    """Transformer layers of the decoder."""
    n_heads: int = setting(4, above=0)
    """Attention heads per layer."""
    n_act_blocks: int = setting(6, lo=0)
    """Residual MLP blocks that read the query activation before the transformer."""
    prefix_counts: bool = False
    """Give every token the counts of each token so far (a running sum of a second token embedding)."""


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer, its schedule and where training runs."""

    steps: int = setting(2000, above=0)
    """Total optimizer steps (the schedule's length)."""
    max_minutes: float = setting(0.0, lo=0)
    """Wall-time budget across resumes; 0 means none. The schedule ends when the budget or the steps run out,
    whichever comes first (see :func:`lr_factor`); training then evaluates, saves and stops. (With a budget the
    learning rate depends on the wall time, so two budgeted runs are not bit-identical.)"""
    batch_size: int = setting(256, above=0)
    """Inputs per optimizer step (all processes together); a multiple of chunk."""
    chunk: int = setting(64, above=0)
    """Inputs per site: each chunk of the batch reads one site."""
    lr: float = setting(1e-3, above=0)
    """Peak learning rate of AdamW."""
    warmup: int = setting(100, lo=0)
    """Steps of linear learning-rate warm-up."""
    min_lr: float = setting(0.1, lo=0, hi=1)
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    weight_decay: float = setting(0.01, lo=0)
    """AdamW's weight decay."""
    bf16: Literal[True, False, "auto"] = "auto"
    """bf16 autocast for the decoder's forward pass: "auto" (where the device runs bf16 fast: a CUDA GPU with native
    bf16, a CPU with AVX512-BF16, AMX or Arm BF16; else float32), true or false. The choice is logged and recorded
    in run.json's provenance."""
    seed: int = 0
    """Seed of the decoder's initialisation and of every step's inputs."""
    device: str = "auto"
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"; under torchrun, process k uses cuda:k."""


@dataclass(frozen=True)
class EvalSpec:
    """The periodic evaluation and checkpoints, the site rebalancing, and the run's reading defaults."""

    every: int = setting(200, above=0)
    """Steps between hit-rate evaluations (appended to metrics.jsonl)."""
    queries: int = setting(64, above=0)
    """Held-out query activations per site for the periodic evaluation."""
    epsilon: float = setting(0.1, above=0)
    """Preimage radius of the hit rate; readings of the run default to it."""
    metric: str = setting("euclidean", choices=settings.METRICS, what="metric")
    """Distance between activations, "euclidean" or "cosine"; readings of the run default to it."""
    rebalance: bool = True
    """Sample sites with weights softmax((mean_hit - hit_site) * 6)."""
    rebalance_floor: float = setting(0.5, lo=0, hi=1)
    """Each site keeps at least this fraction of its uniform share."""
    checkpoint_every: int = setting(200, above=0)
    """Steps between checkpoints (checkpoint.pt)."""


@dataclass(frozen=True)
class TrainConfig:
    """A training config (``inversionview train CONFIG.toml``): the run directory and one table per section."""

    out: str
    """The run directory to write, relative to the config file."""
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
        cfg = settings.build(cls, raw)
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


def _check(cfg: TrainConfig) -> None:
    """Refuse values that would crash or silently misbehave later in training."""
    settings.check(cfg)
    o, m = cfg.train, cfg.decoder
    if m.d_model % m.n_heads:
        raise UserError(f"decoder.d_model ({m.d_model}) must be a multiple of decoder.n_heads ({m.n_heads})")
    if o.batch_size % o.chunk:
        raise UserError(f"train.batch_size ({o.batch_size}) must be a multiple of train.chunk ({o.chunk})")
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
        raise UserError(
            'data.sites is required with data.path: name the sites to train on, e.g. sites = ["x0.mid", "a1.0"]'
        )


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, o: OptimSpec, elapsed: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at the end of training. The end is
    ``steps``, or, with a wall-time budget, the budget if it runs out first: the decay follows whichever of the
    two progress fractions (steps after warm-up, ``elapsed`` seconds of the budget) is further along, so a run
    stopped by its budget ends at ``min_lr``."""
    warm = (step + 1) / o.warmup if step < o.warmup else 1.0
    t = max(0.0, (step - o.warmup) / max(1, o.steps - o.warmup))
    if o.max_minutes > 0:
        t = max(t, elapsed / (o.max_minutes * 60))
    return min(warm, o.min_lr + (1 - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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


DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in settings.DTYPES}
"""The probed model's weight dtypes by name ([probed] dtype); the names are :data:`settings.DTYPES`."""
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
        raise UserError(
            f"{d.world} processes cannot share {n_chunks} chunks per step (train.batch_size "
            f"{cfg.train.batch_size} / train.chunk {cfg.train.chunk}): use at most {n_chunks} processes "
            "or smaller chunks"
        )
    dev = distributed.resolve_device(cfg.train.device, d.local_rank, d.world)
    with distributed.session(dev) as d:
        return Trainer(cfg, d, dev).run(progress and d.main)


@contextlib.contextmanager
def _held_logs():
    """The package's log lines held back until the block succeeds, then logged in order; dropped where it raises:
    a run that is refused while it sets up ("data: 30 inputs from ...", then the error) says only why."""
    pkg = logging.getLogger("inversionview")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    hold, propagate = Hold(), pkg.propagate
    pkg.addHandler(hold)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(hold)
        pkg.propagate = propagate
    for record in held:
        logging.getLogger(record.name).handle(record)


class Trainer:
    """The training loop in named steps: set up or resume (the constructor), :meth:`step`, :meth:`evaluate`,
    :meth:`checkpoint` and :meth:`stop`; :meth:`run` calls them until the run is done, spent or interrupted.

    The constructor loads the probed model and the data, and either resumes from ``checkpoint.pt`` or builds a new
    decoder and writes the run directory's first files (rank 0). It does not enter the process group: under
    torchrun, make it inside :func:`inversionview.distributed.session`."""

    def __init__(self, cfg: TrainConfig, d: Dist | None = None, device: str | torch.device | None = None):
        _check(cfg)
        self.cfg, self.d = cfg, d or Dist()
        self.dev = torch.device(device) if device is not None else distributed.resolve_device(cfg.train.device)
        self.out = Path(cfg.out)
        self.halt = False
        with _held_logs():  # a refusal while setting up is the command's one line, with no log line before it
            self.bf16, why = distributed.choose_bf16(cfg.train.bf16, self.dev)
            if self.d.main:
                log.info("decoder precision: %s (%s)", "bfloat16" if self.bf16 else "float32", why)
            self._load_inputs()
            session = provenance(self.dev, self.d.world, self.bf16, why)
            if (self.out / "checkpoint.pt").exists():
                self._resume(session)
            else:
                self._start(session)
            self.model: Decoder | torch.nn.parallel.DistributedDataParallel = self.decoder
            if self.d.world > 1:  # rank 0's weights are broadcast here; gradients are averaged in backward()
                self.model = torch.nn.parallel.DistributedDataParallel(
                    self.decoder, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
                )
            log_dir = os.environ.get(STEP_LOG)
            self.step_log = Path(log_dir) / f"rank{self.d.rank}.jsonl" if log_dir else None
            if self.d.main:
                with _writing(self.out / "metrics.jsonl"):
                    _truncate_metrics(self.out / "metrics.jsonl", self.state.step)
                self.queries = make_queries(
                    self.probed, self.source, self.sites, cfg.eval.queries, seed=cfg.train.seed + 10_000
                )
            self._restart_clock()

    # ------------------------------------------------------------------ set up or resume
    def _load_inputs(self) -> None:
        """The probed model, the data source and the sites, all checked before any file is written."""
        p = self.cfg.probed
        self.probed = ProbedModel.load(
            resolve_model(p.model),
            vocab=p.vocab,
            mode=p.mode,
            tokenizer=p.tokenizer or None,
            dtype=DTYPES[p.dtype],
            device=self.dev,
        )
        check_vocabulary(self.probed)
        self.source = open_source(self.cfg.data.task, self.cfg.data.record(), self.probed)  # a Task or a DataSource
        if p.vocab is not None:  # a character vocabulary from the config: refuse one in the wrong order
            rng = random.Random(0)
            self.probed.check_token_order([self.source.sample(rng) for _ in range(64)])
        self.sites = [self.probed.site(x) for x in (self.cfg.data.sites or self.source.sites)]
        if len(set(self.sites)) != len(self.sites):
            raise UserError("data.sites lists a site twice")

    def _resume(self, session: dict) -> None:
        out, cfg = self.out, self.cfg
        saved_spec = RunSpec.load(out)
        self.spec = RunSpec.for_training(cfg, self.probed, self.sites)
        saved_spec.check_same(self.spec)
        dcfg = DecoderConfig.load(out / "config.json")
        if any(getattr(dcfg, k) != v for k, v in dataclasses.asdict(cfg.decoder).items()):
            raise UserError(
                f"{out} holds a decoder of another shape than [decoder] in the config: "
                "use a new 'out' directory or restore the [decoder] settings"
            )
        if self.d.main:
            check_writable(out)
        self.decoder = Decoder(dcfg).to(self.dev).train()
        self.opt = _optimizer(self.decoder, cfg.train)
        saved = read_checkpoint(out / "checkpoint.pt")
        try:  # the weights of the checkpoint's own step: model.safetensors may be newer after a crash
            self.decoder.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["optimizer"])
            self.state = State(**saved["state"])
        except Exception as ex:
            raise UserError(
                f"checkpoint {out / 'checkpoint.pt'} is corrupt ({_first_line(ex)}); delete it to start over"
            ) from None
        self.spec = dataclasses.replace(
            self.spec, provenance=_add_session(saved_spec.provenance, session, self.state.step)
        )
        if self.d.main:
            with _writing(out / "run.json"):
                self.spec.save(out)
            log.info("resuming %s from step %d", out, self.state.step)

    def _start(self, session: dict) -> None:
        cfg, o = self.cfg, self.cfg.train
        torch.manual_seed(o.seed)
        max_len, d_act = self.probed.max_len, self.probed.d_model
        assert max_len is not None and d_act is not None, "the probed model's config gives no context length or width"
        self.decoder = Decoder(
            DecoderConfig(
                vocab_size=self.probed.tokenizer.vocab_size,
                max_len=max_len,
                d_act=d_act,
                n_sites=len(self.sites),
                **dataclasses.asdict(cfg.decoder),
            )
        )
        self.decoder.to(self.dev)
        _init_stats(self.decoder, self.probed, self.source, self.sites, random.Random(o.seed))
        self.decoder.train()
        self.opt = _optimizer(self.decoder, o)
        self.state = State(site_probs=[1 / len(self.sites)] * len(self.sites), site_counts=[0] * len(self.sites))
        self.spec = RunSpec.for_training(cfg, self.probed, self.sites, _add_session({}, session, 0))
        if not self.d.main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as ex:
            raise UserError(f"cannot create the run directory {self.out}: {ex.strerror}") from None
        check_writable(self.out)
        with _writing(self.out):
            self.spec.save(self.out)
            atomic_write_text(self.out / "train.json", json.dumps(cfg.to_dict(relative_to=self.out), indent=1))
            (self.out / "metrics.jsonl").unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    tokens: int
    """Tokens predicted (over all processes) since the last evaluation; ``samples`` likewise."""
    samples: int

    def _restart_clock(self) -> None:
        self._t0, self._elapsed0 = time.time(), self.state.elapsed
        self._t_rate, self.tokens, self.samples = time.time(), 0, 0

    @property
    def budget_spent(self) -> bool:
        o = self.cfg.train
        return o.max_minutes > 0 and self.state.elapsed >= o.max_minutes * 60

    @property
    def done(self) -> bool:
        """The schedule is complete: all steps taken, or the wall-time budget spent."""
        return self.state.step >= self.cfg.train.steps or self.budget_spent

    def run(self, progress: bool = False) -> InversionView:
        """Step, evaluate and checkpoint until done; then :meth:`stop`. SIGINT or SIGTERM: checkpoint, then stop."""
        o, e, st = self.cfg.train, self.cfg.eval, self.state
        if self.done:
            if self.d.main:
                log.info("%s is already trained (%d steps, %.0f s)", self.out, st.step, st.elapsed)
            return self.stop()
        self._restart_clock()
        bar = Progress(o.steps, "train", "step", initial=st.step, enabled=progress)  # a bar on a terminal only
        with _Interrupt() as signals:
            while not (self.done or self.halt):
                loss = self.step(interrupted=signals.hit)
                bar.update(1)
                if st.step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{self.samples / (time.time() - self._t_rate):.0f}")
                regular = st.step % e.every == 0 or st.step >= o.steps
                if regular or self.done:  # a run stopped by its budget is evaluated too, without rebalancing
                    self.evaluate(loss, rebalance=regular)
                if self.d.main and (self.done or self.halt or st.step % e.checkpoint_every == 0 or regular):
                    self.checkpoint()
        bar.close()
        return self.stop()

    def step(self, interrupted: bool = False) -> float:
        """One optimizer step on the step's global batch; returns its mean token loss. ``interrupted``: this
        process got a signal (every process learns it in the step's one all-reduce, and sets :attr:`halt`)."""
        o, st, d = self.cfg.train, self.state, self.d
        for g in self.opt.param_groups:
            g["lr"] = o.lr * lr_factor(st.step, o, st.elapsed)
        batch = _draw(
            self.probed,
            self.source,
            step_rng(o.seed, st.step),
            st.site_probs,
            len(self.sites),
            o.batch_size,
            o.chunk,
            self.cfg.data.bos_prob,
        )
        total, n_tok = _chunks_loss(
            self.model, self.probed, self.sites, batch, my_chunks(o.batch_size // o.chunk, d), self.dev, self.bf16
        )
        # one all-reduce: the loss sum, the token count, the stop votes and the clocks (their mean is every
        # process's elapsed time, so that the schedule and the budget agree between processes)
        now = self._elapsed0 + time.time() - self._t0
        stats = torch.cat(
            [
                total.detach().double().reshape(1),
                torch.tensor([n_tok, float(interrupted), now], dtype=torch.float64, device=self.dev),
            ]
        )
        loss_sum, g_tok, votes, clocks = d.all_reduce(stats).tolist()
        self.opt.zero_grad(set_to_none=True)
        # DDP averages gradients over the processes: scaling by world / global tokens makes the average the
        # gradient of the global mean loss
        (total * (d.world / g_tok)).backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 1.0)
        self.opt.step()
        st.step += 1
        assert st.site_counts is not None  # set when the run starts or resumes
        for si in batch.chunk_sites:
            st.site_counts[si] += o.chunk
        st.elapsed = clocks / d.world
        self.halt = votes > 0
        self.tokens += int(g_tok)
        self.samples += o.batch_size
        loss = loss_sum / g_tok  # the global batch's mean token loss, as one process would compute it
        if self.step_log is not None:
            _log_step(self.step_log, st.step, loss, self.decoder)
        return loss

    def evaluate(self, loss: float, rebalance: bool = True) -> dict | None:
        """Hit rates on the held-out queries (rank 0), appended to metrics.jsonl as a row, which is returned (None
        on other ranks). With ``rebalance`` (and eval.rebalance) the site weights follow the hit rates."""
        st, e = self.state, self.cfg.eval
        row = hits = None
        if self.d.main:  # the other processes wait for its site weights (or at the next step's all-reduce)
            hits = hit_rates(self.decoder, self.probed, self.queries, e.epsilon, e.metric, seed=st.step)
            self.decoder.train()
            row = self._row(loss, hits)
        if rebalance and e.rebalance:
            if self.d.main:
                assert hits is not None  # rank 0 measured them above
                probs = site_weights(hits, e.rebalance_floor)
            else:  # replaced by rank 0's in the broadcast
                assert st.site_probs is not None  # set when the run starts or resumes
                probs = st.site_probs
            st.site_probs = self.d.broadcast(torch.tensor(probs, dtype=torch.float64, device=self.dev)).tolist()
        self._t_rate, self.tokens, self.samples = time.time(), 0, 0
        if row is not None:
            tqdm.write(
                f"step {st.step}: mean hit {row['mean_hit']:.3f}  "
                + " ".join(f"{k}={v:.2f}" for k, v in row["hit"].items())
            )
            with _writing(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def _row(self, loss: float, hits: list[float]) -> dict:
        st, dt = self.state, time.time() - self._t_rate
        assert st.site_probs is not None and st.site_counts is not None  # set when the run starts or resumes
        row = {
            "step": st.step,
            "elapsed_s": round(st.elapsed, 1),
            "loss": round(loss, 4),
            "lr": self.opt.param_groups[0]["lr"],
            "tokens_per_s": round(self.tokens / dt),
            "samples_per_s": round(self.samples / dt, 1),
            "hit": {s.short: round(h, 4) for s, h in zip(self.sites, hits)},
            "mean_hit": round(sum(hits) / len(hits), 4),
            "site_probs": {s.short: round(p, 4) for s, p in zip(self.sites, st.site_probs)},
            "site_counts": {s.short: c for s, c in zip(self.sites, st.site_counts)},
        }
        if self.d.world > 1:
            row["processes"] = self.d.world
        if self.budget_spent and st.step < self.cfg.train.steps:
            row["budget_spent"] = True  # the schedule ended here, before train.steps
        return row

    def checkpoint(self) -> None:
        """Write the decoder and ``checkpoint.pt`` atomically (rank 0)."""
        ckpt, tmp = self.out / "checkpoint.pt", self.out / "checkpoint.pt.tmp"
        with _writing(ckpt):
            self.decoder.save(self.out)
            try:
                torch.save(
                    {
                        "format_version": CHECKPOINT_FORMAT,
                        "state": dataclasses.asdict(self.state),
                        "optimizer": self.opt.state_dict(),
                        "model": self.decoder.state_dict(),
                    },
                    tmp,
                )
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(ckpt)

    def stop(self) -> InversionView:
        """Wait for every process; the trained run, or, after a signal, the one-line error that says how to
        resume."""
        self.d.barrier()  # the checkpoint is written before any process reports
        if self.halt:
            raise UserError(f"interrupted at step {self.state.step}; checkpoint saved: run the same command to resume")
        if self.budget_spent and self.state.step < self.cfg.train.steps and self.d.main:
            log.info("wall-time budget of %g min spent at step %d", self.cfg.train.max_minutes, self.state.step)
        return InversionView.load(self.out, probed=self.probed, device=str(self.dev))


# ---------------------------------------------------------------------------------------------- files and checks
@contextmanager
def _writing(path: Path):
    """A failed write (read-only directory, disk full) as a one-line error."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _first_line(ex: BaseException) -> str:
    return (str(ex).splitlines() or [type(ex).__name__])[0][:80]


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written (read-only, not a directory), before training starts: by
    trying, since permission bits say nothing for root or on a read-only file system."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"cannot write to the run directory {run_dir} ({e.strerror or e}): training writes its "
            "checkpoints there; make it writable or use another 'out'"
        ) from None


def read_checkpoint(path: Path) -> dict:
    """``checkpoint.pt`` as a dict, refusing a newer format, missing parts and unknown fields."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as ex:
        raise UserError(f"checkpoint {path} is corrupt ({_first_line(ex)}); delete it to start over") from None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} is corrupt (not a dict); delete it to start over")
    check_version(saved.get("format_version"), CHECKPOINT_FORMAT, path)
    parts = {"state", "optimizer", "model"}
    if not parts <= set(saved) or not isinstance(saved["state"], dict):
        raise UserError(
            f"checkpoint {path} is corrupt (it lacks {', '.join(sorted(parts - set(saved))) or 'a state'});"
            " delete it to start over"
        )
    check_fields(saved, {"format_version", *parts}, path)
    check_fields(saved["state"], [f.name for f in dataclasses.fields(State)], f"{path} (state)")
    return saved


def check_vocabulary(probed: ProbedModel) -> None:
    """A character vocabulary must name every token of the model: with fewer tokens it is not the model's (and
    training would fail later, on the first input with a missing character)."""
    n_model = probed.model.config.vocab_size
    if isinstance(probed.tokenizer, CharVocab) and probed.tokenizer.vocab_size < n_model:
        raise UserError(
            f"the character vocabulary has {probed.tokenizer.vocab_size} tokens but the model's vocabulary "
            f"has {n_model}: it does not belong to this model (list all {n_model} tokens, in the model's "
            "order)"
        )


def provenance(device: torch.device, world: int, bf16: bool, why: str) -> dict:
    """How this training session runs: versions, git commit (of a source checkout), device and precision."""
    import transformers

    from ._version import __version__

    return {
        "inversionview": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **_git_commit(),
        "device": str(device),
        "processes": world,
        "decoder_precision": "bfloat16" if bf16 else "float32",
        "precision_reason": why,
    }


def _git_commit() -> dict:
    """The commit of the git checkout this package runs from, if it runs from one (not an installed wheel)."""
    here = Path(__file__).resolve()
    git = ["git", "-C", str(here.parent)]
    try:
        tracked = subprocess.run([*git, "ls-files", "--error-unmatch", here.name], capture_output=True, timeout=10)
        if tracked.returncode != 0:
            return {"git_commit": None}
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    return {"git_commit": commit.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip())}


def _add_session(prov: dict, session: dict, step: int) -> dict:
    """``prov`` with this session appended to its ``sessions`` unless it runs as the last one did."""
    sessions = list(prov.get("sessions", []))
    if not sessions or {k: v for k, v in sessions[-1].items() if k != "from_step"} != session:
        sessions.append({"from_step": step, **session})
    return {**prov, "sessions": sessions}


def _log_step(path: Path, step: int, loss: float, decoder: Decoder) -> None:
    h = hashlib.sha256()
    for p in decoder.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "weights": h.hexdigest()[:16]}) + "\n")


def _optimizer(decoder: Decoder, o: OptimSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices only: LayerNorms, biases, the site normalisers and the site
    embedding are not pulled towards zero (the normalisers start at each site's statistics)."""
    decay: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, p in decoder.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("site_") else rest).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.98))


def _init_stats(decoder: Decoder, probed, task, sites, rng: random.Random, n: int = 1024) -> None:
    texts = [task.sample(rng) for _ in range(n)]
    b = probed.batch([probed.encode(t) for t in texts])
    pos = torch.tensor([rng.choice(task.positions(t)) for t in texts])
    acts = probed.run(b.ids, sites)
    for i, s in enumerate(sites):
        decoder.init_site_stats(i, acts[s][torch.arange(n), pos].float())


@dataclass(frozen=True)
class _Drawn:
    """A step's global batch: inputs sorted by length (so each chunk is trimmed), one query position per input,
    one site index per chunk."""

    seqs: list
    positions: list
    chunk_sites: list
    chunk: int


def _draw(
    probed, task, rng: random.Random, site_probs, n_sites: int, batch: int, chunk: int, bos_prob: float
) -> _Drawn:
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
    chunk_sites = drawn.chunk_sites[chunks.start : chunks.stop]
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
        total = total + F.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
        )
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
    atomic_write_text(path, "".join(r + "\n" for r in rows))
