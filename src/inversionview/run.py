"""A run directory: a trained decoder plus what it was trained on, and the three-line Python API.

::

    RUN_DIR/
      run.json            probed model (path, fingerprint, activation mode, vocabulary or tokenizer), sites, task or
                          data, epsilon, format_version, provenance (versions, git commit, decoder precision)
      config.json         DecoderConfig
      model.safetensors   decoder weights
      train.json          the full training config
      metrics.jsonl       periodic hit rates, throughput, site weights
      checkpoint.pt       resumable training state (not needed for reading)

>>> iv = InversionView.load("runs/counting")
>>> pre = iv.query("vvzccvczvvvzvcvc|v:8", site="a1.0", position=":")
>>> pre.show()
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .artifacts import (
    RUN_FORMAT,
    atomic_write_text,
    check_fields,
    check_version,
    probed_fingerprint,
    weights_fingerprint,
)
from .decoder import Decoder
from .errors import UserError
from .probed import ProbedModel
from .settings import SamplingSettings
from .sites import Site

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "shipped"


def resolve_model(ref: str) -> str:
    """``shipped:TASK`` names a probed model inside the package; anything else is a path or hub id."""
    if ref.startswith("shipped:"):
        path = SHIPPED / ref.split(":", 1)[1] / "probed"
        if not path.is_dir():
            raise UserError(
                f"there is no shipped model {ref!r}: expected one of "
                f"{', '.join('shipped:' + p.name for p in SHIPPED.iterdir() if (p / 'probed').is_dir())}"
            )
        return str(path)
    return ref


@dataclass(frozen=True)
class RunSpec:
    """What a decoder belongs to. ``fingerprint`` (:func:`~inversionview.artifacts.probed_fingerprint`) covers the
    probed model's weights, ``mode`` and ``dtype``: a decoder is refused for another model, and for its own model
    read in another mode or dtype, even when run.json's mode or dtype was edited."""

    model: str
    mode: str
    fingerprint: str
    sites: tuple[str, ...]
    task: str | None = None
    vocab: dict | None = None
    epsilon: float = 0.1
    metric: str = "euclidean"
    extra: dict = field(default_factory=dict)
    data: dict | None = None
    """The data file and position rule of a run not on a plain task (see :func:`inversionview.data.record`)."""
    tokenizer: str | None = None
    """The built-in tokenizer the probed model was read with (``"gpt2"``), None for its own files or ``vocab``."""
    dtype: str = "float32"
    """The probed model's weights during training ([probed] dtype); reading loads them the same way."""
    provenance: dict = field(default_factory=dict)
    """How the decoder was made: ``sessions``, one entry per training session that differed from the one before
    (step it started at, package, Python, torch and transformers versions, git commit, device, processes, the
    decoder's precision and why)."""

    @classmethod
    def for_training(cls, cfg, probed: ProbedModel, sites: list[Site], provenance: dict | None = None) -> "RunSpec":
        return cls(
            model=cfg.probed.model,
            mode=cfg.probed.mode,
            fingerprint=probed_fingerprint(probed.fingerprint, cfg.probed.mode, cfg.probed.dtype),
            sites=tuple(s.name for s in sites),
            task=cfg.data.task or None,
            vocab=cfg.probed.vocab,
            epsilon=cfg.eval.epsilon,
            metric=cfg.eval.metric,
            data=cfg.data.record(),
            tokenizer=cfg.probed.tokenizer or None,
            dtype=cfg.probed.dtype,
            provenance=provenance or {},
        )

    def save(self, run_dir: Path) -> None:
        d = {"format_version": RUN_FORMAT, **asdict(self)}
        m = self.model
        if not m.startswith("shipped:") and Path(m).exists():  # keep the run movable with its model
            d["model"] = os.path.relpath(Path(m).resolve(), Path(run_dir).resolve())
        if self.data and self.data.get("path") and Path(self.data["path"]).exists():  # and with its data
            d["data"] = {
                **self.data,
                "path": os.path.relpath(Path(self.data["path"]).resolve(), Path(run_dir).resolve()),
            }
        atomic_write_text(Path(run_dir) / "run.json", json.dumps(d, indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> "RunSpec":
        run_dir = Path(run_dir)
        path = run_dir / "run.json"
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist")
        try:
            d = json.loads(path.read_text())
            version = check_version(d.pop("format_version", None), RUN_FORMAT, path)
            check_fields(d, [f.name for f in fields(cls)], path)
            d["sites"] = tuple(d["sites"])
            unversioned = d["fingerprint"] if version == 0 else None
            if version == 0:  # before format 1 the fingerprint was the weights' alone: mode and dtype are trusted
                d["fingerprint"] = probed_fingerprint(d["fingerprint"], d["mode"], d.get("dtype", "float32"))
            spec = cls(**d)
        except FileNotFoundError:
            raise UserError(
                f"{run_dir} is not a decoder run: it has no run.json (train one with `inversionview train`)"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{path} is corrupt ({e}): expected the JSON written by `inversionview train`") from None
        m = spec.model
        if not m.startswith("shipped:") and not Path(m).is_absolute() and (run_dir / m).exists():
            spec = cls(**{**asdict(spec), "model": str((run_dir / m).resolve())})
        data = spec.data
        if data and data.get("path") and not Path(data["path"]).is_absolute():
            spec = cls(**{**asdict(spec), "data": {**data, "path": str((run_dir / data["path"]).resolve())}})
        # a run.json without format_version: its fingerprint as written, and where (check() says which it was)
        object.__setattr__(spec, "_unversioned", (unversioned, path) if unversioned is not None else None)
        return spec

    def load_probed(self, device="cpu") -> ProbedModel:
        import torch

        return ProbedModel.load(
            resolve_model(self.model),
            vocab=self.vocab,
            mode=self.mode,
            tokenizer=self.tokenizer,
            dtype=getattr(torch, self.dtype),
            device=device,
        )

    def check(self, probed: ProbedModel) -> None:
        """Refuse a probed model other than the decoder's, or its own read in another mode or dtype."""
        from .probed import MODES

        dtype = dtype_name(probed)
        mine = probed_fingerprint(probed.fingerprint, probed.mode, dtype)
        unversioned = getattr(self, "_unversioned", None)
        if mine == self.fingerprint:
            if unversioned is not None:
                log.warning(
                    "%s has no format_version, so it predates format_version 1: its mode and dtype are not checked "
                    "against its fingerprint",
                    unversioned[1],
                )
            return
        if unversioned is not None and unversioned[0] == mine:  # format 1's fingerprint: the version was removed
            raise UserError(
                f"{unversioned[1]} has no format_version, but its fingerprint is format 1's (it covers the mode and "
                'dtype): the field was removed; add "format_version": 1 back'
            )
        for mode in MODES:
            for dt in {self.dtype, dtype, "float32", "bfloat16", "float16"}:
                if probed_fingerprint(probed.fingerprint, mode, dt) != self.fingerprint:
                    continue
                edited = (
                    " (run.json's mode or dtype was changed after training)"
                    if (mode, dt) != (self.mode, self.dtype)
                    else ""
                )
                if mode != probed.mode:
                    raise UserError(
                        f"this decoder was trained on {mode!r} activations, not {probed.mode!r}{edited}: "
                        f"load the probed model with mode={mode!r}"
                    )
                raise UserError(
                    f"this decoder was trained on the probed model in {dt}, not {dtype}{edited}: "
                    f"load it with dtype={dt}"
                )
        raise UserError(
            f"this decoder belongs to another probed model (fingerprint {self.fingerprint}, got "
            f"{probed_fingerprint(probed.fingerprint, probed.mode, dtype)} from {probed.source} read as "
            f"{probed.mode!r} in {dtype})"
        )

    def check_same(self, other: "RunSpec") -> None:
        for k in ("dtype", "mode", "fingerprint", "sites", "task", "data", "tokenizer"):
            if getattr(self, k) != getattr(other, k):
                raise UserError(
                    f"the run directory was trained with another {k} ({getattr(self, k)!r}, config gives "
                    f"{getattr(other, k)!r}): use a new 'out' directory"
                )


def dtype_name(probed: ProbedModel) -> str:
    """The dtype of a probed model's weights by name ("float32", "bfloat16", ...)."""
    return str(next(probed.model.parameters()).dtype).removeprefix("torch.")


class InversionView:
    """A trained decoder with its probed model: read activations with :meth:`query`."""

    def __init__(self, spec: RunSpec, decoder: Decoder, probed: ProbedModel, run_dir: Path | None = None):
        spec.check(probed)
        self.spec, self.decoder, self.probed, self.run_dir = spec, decoder.eval(), probed, run_dir
        self.sites = [probed.site(s) for s in spec.sites]
        if decoder.config.n_sites != len(self.sites) or decoder.config.d_act != probed.d_model:
            raise UserError(f"decoder in {run_dir} does not match its run.json (sites or activation width differ)")
        self.data: str | None = None
        """A data file or directory to read under in place of the run's own (``--data``; None: the run's)."""
        self.task = None
        if spec.task:
            from .tasks import get_task

            self.task = get_task(spec.task)
        if spec.vocab is not None:  # a character vocabulary from the config: refuse one in the wrong order
            probed.check_token_order(self._own_inputs(64))

    @classmethod
    def load(
        cls, run_dir: str | os.PathLike = "shipped:counting", probed: ProbedModel | None = None, device: str = "cpu"
    ) -> "InversionView":
        """Load a run directory (or ``shipped:TASK``) on ``device`` ("cpu", "cuda", "cuda:N" or "auto");
        ``probed`` overrides the probed model it names."""
        from .distributed import resolve_device

        dev = resolve_device(device)
        if str(run_dir).startswith("shipped:"):
            resolve_model(str(run_dir))  # a clear error for an unknown shipped name
            run_dir = SHIPPED / str(run_dir).split(":", 1)[1] / "decoder"
        run_dir = Path(run_dir)
        spec = RunSpec.load(run_dir)
        return cls(spec, Decoder.load(run_dir).to(dev), probed or spec.load_probed(dev), run_dir)

    @property
    def fingerprint(self) -> str:
        """A hash of the decoder's weights, its probed model's fingerprint, mode and sites, and of the data set its
        readings are under where there is one: stored readings are keyed by it (see :mod:`inversionview.store`), so
        a reading under one data set is never served for another."""
        if getattr(self, "_fingerprint", None) is None:
            context = [self.spec.fingerprint, self.spec.mode, list(self.spec.sites)]
            self._fingerprint = weights_fingerprint(self.decoder.state_dict(), context)
        ds = self.dataset()
        if ds is None:
            return self._fingerprint
        import hashlib

        return hashlib.sha256(f"{self._fingerprint} data {ds.key}".encode()).hexdigest()[: len(self._fingerprint)]

    def site_index(self, site: str | Site) -> tuple[Site, int]:
        s = self.probed.site(site)
        if s not in self.sites:
            raise UserError(
                f"site {s.short} ({s.name}) is not one this decoder was trained on: "
                f"expected one of {', '.join(x.short for x in self.sites)}"
            )
        return s, self.sites.index(s)

    def query(self, text: str, site: str | Site, position: int | str, **kw):
        """Read the activation at ``site`` and ``position`` of ``text``: see :func:`inversionview.preimage.read`."""
        from .preimage import read

        s, si = self.site_index(site)
        ds = self.dataset(kw.pop("data", None))
        index = self.data_index(s, ds) if ds is not None else None
        return read(self, text, s, position, **kw, data=ds, site_index=si, index=index)

    def _own_inputs(self, n: int) -> list[str]:
        """Up to ``n`` inputs of the run's own data file, or of its task."""
        import random

        ds = self.dataset()
        if ds is not None:
            return list(ds.texts[:n])
        rng = random.Random(0)
        return [self.task.sample(rng) for _ in range(n)] if self.task is not None else []

    def dataset(self, data=None):
        """The data set a reading's shares estimate under: ``data`` (a path or a
        :class:`~inversionview.dataset.DataSet`), else the data file this run was trained on, else None (the task's
        generator, or the decoder's samples). Files are read once per InversionView."""
        from .dataset import DataSet

        if isinstance(data, DataSet):
            return data
        data = data if data is not None else getattr(self, "data", None)
        spec = self.spec.data or {}
        if data is None and not spec.get("path"):
            return self._drawn()
        path = str(data if data is not None else spec["path"])
        if data is None and not Path(path).exists():
            log.warning("this run's data file %s is missing: readings fall back to the decoder's samples", path)
            return None
        cache = self.__dict__.setdefault("_datasets", {})
        if path not in cache:
            same = data is None or Path(path).resolve() == Path(spec.get("path", "")).resolve()
            fmt, field = (spec.get("format", ""), spec.get("field", "text")) if same else ("", "text")
            cache[path] = DataSet.open(path, fmt, field)
        return cache[path]

    def _drawn(self):
        """A user's own task without moves (``module:function`` or a Task subclass that defines no ``propose``):
        ``task.draws`` of its generator's inputs, read as a data set. None for any other run."""
        from .dataset import DataSet
        from .explore import can_explore

        task = self.task
        if task is None or ":" not in task.name or can_explore(task):
            return None
        if getattr(self, "_drawn_set", None) is None:
            import random

            rng = random.Random(0)
            n = int(getattr(task, "draws", 20_000))
            texts = [task.generate(rng) for _ in range(n)]
            self._drawn_set = DataSet.from_texts(texts, f"{n:,} draws of the generator {task.name}")
        return self._drawn_set

    def data_index(self, site, data):
        """The cached activations of ``site`` over the data set ``data`` (:class:`~inversionview.dataset.
        ActivationIndex`), built on first use; kept open for the next readings."""
        from .dataset import ActivationIndex

        cache = self.__dict__.setdefault("_indexes", {})
        key = (self.probed.site(site).name, data.key)
        if key not in cache:
            cache[key] = ActivationIndex.open(self.probed, self.probed.site(site), data)
        return cache[key]

    def data_source(self):
        """Where this run's inputs come from (its task or its data file): held-out queries are drawn from it."""
        from .data import open_source

        if self.spec.data is None and self.task is not None and ":" not in self.task.name:
            return self.task
        return open_source(self.spec.task, self.spec.data, self.probed)

    def evaluate(
        self, queries_per_site: int = 256, epsilon: float | None = None, metric: str | None = None, seed: int = 0
    ) -> dict:
        """Hit rate per site (one sample at temperature 1 per held-out query) and the mean."""
        from .propose import hit_rates, make_queries

        if queries_per_site < 1:
            raise UserError(f"queries per site must be at least 1, got {queries_per_site}")
        given = SamplingSettings(epsilon=epsilon, metric=metric, seed=seed).checked()
        eps, met = given.epsilon if given.epsilon is not None else self.spec.epsilon, given.metric or self.spec.metric
        queries = make_queries(self.probed, self.data_source(), self.sites, queries_per_site, seed=seed + 20_000)
        hits = hit_rates(self.decoder, self.probed, queries, eps, met, seed=seed)
        per = {s.short: h for s, h in zip(self.sites, hits)}
        return {
            "hit": per,
            "mean_hit": sum(hits) / len(hits),
            "epsilon": eps,
            "metric": met,
            "queries_per_site": queries_per_site,
        }
