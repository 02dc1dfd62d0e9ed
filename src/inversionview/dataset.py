"""A data set as the input distribution (METHOD.md §8): its epsilon-preimages found exactly by a scan.

A user's model comes with data, not with a generator. :class:`DataSet` is the empirical distribution over the inputs
of a data file: each distinct input weighs as often as it occurs. :class:`ActivationIndex` holds one site's
activations at every position of every input (PAD and EOS excluded, BOS included, as :func:`~inversionview.verify.
verify` takes them) on disk, memory-mapped, so that a reading's data-set preimage costs one pass of distance
computation: :func:`scan` returns every input's minimum distance to the query activation and its arg-min position.

The cache lives under ``$INVERSIONVIEW_CACHE`` (default ``~/.cache/inversionview``), one directory per (probed
model fingerprint, activation mode, dtype, site, data), written to a temporary directory and renamed when complete:
an interrupted build leaves nothing that a later reading would trust. Each directory holds one or more *shards*
(``torchrun`` builds one per process: :func:`build`); a reading merges them.

Storage precision is measured, not assumed: the first batch's distances are computed from float16 copies and from the
float32 originals; float16 is kept where its worst error is small (:data:`FP16_TOLERANCE`), and then the inputs whose
scanned distance lies within a margin of epsilon (the measured error, and the float32 scan's own rounding) are verified again
through the probed model (:func:`exact_members`), so the members are exactly the inputs within epsilon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .artifacts import probed_fingerprint
from .errors import UserError
from .probed import ProbedModel
from .verify import length_batches, verify

log = logging.getLogger(__name__)

FORMAT = 1
CACHE_ENV = "INVERSIONVIEW_CACHE"
BATCH = 1024  # inputs per forward pass while building
CHUNK_ROWS = 1 << 16  # activation rows per step of a scan
FP16_TOLERANCE = 2e-3  # float16 storage is kept where its worst distance error on the first batch is below this
MARGIN = 4.0  # inputs within MARGIN x the measured storage error of epsilon are verified again (exact_members)


# ---------------------------------------------------------------------------------------------- the data set
@dataclass(frozen=True)
class DataSet:
    """The empirical distribution over a data file's inputs: ``texts`` distinct, in first-seen order, and ``weights``
    how often each occurs. ``inputs`` counts them all."""

    name: str
    texts: tuple[str, ...]
    weights: np.ndarray
    inputs: int

    @classmethod
    def from_texts(cls, texts: list[str], name: str = "data") -> "DataSet":
        if not texts:
            raise UserError(f"data set {name} has no inputs")
        counts: dict[str, int] = {}
        for t in texts:
            counts[t] = counts.get(t, 0) + 1
        return cls(name, tuple(counts), np.fromiter(counts.values(), dtype=np.float64, count=len(counts)), len(texts))

    @classmethod
    def open(cls, path: str | os.PathLike, fmt: str = "", field: str = "text") -> "DataSet":
        """The inputs of a data file or directory (text, JSONL or a saved HF dataset, as training reads them)."""
        from .data import read_records

        texts, _, _, _ = read_records(Path(path), fmt, field)
        return cls.from_texts(texts, str(path))

    @cached_property
    def key(self) -> str:
        """A hash of the inputs and their weights: the cache's key for this data."""
        h = hashlib.sha256()
        for t, w in zip(self.texts, self.weights.tolist()):
            h.update(t.encode())
            h.update(b"\0%d\n" % int(w))
        return h.hexdigest()[:16]

    @cached_property
    def distinct(self) -> frozenset[str]:
        """The distinct inputs as a set."""
        return frozenset(self.texts)

    def describe(self) -> dict:
        """The distribution as a reading names it."""
        return {"kind": "data", "name": self.name, "inputs": self.inputs, "distinct": len(self.texts)}


# ---------------------------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "inversionview") / "activations"


def _key(probed: ProbedModel, site, data: DataSet) -> dict:
    dtype = str(next(probed.model.parameters()).dtype).removeprefix("torch.")
    return {
        "format": FORMAT,
        "probed": probed_fingerprint(probed.fingerprint, probed.mode, dtype),
        "mode": probed.mode,
        "dtype": dtype,
        "site": site.name,
        "data": data.key,
        "distinct": len(data.texts),
    }


def _dir(key: dict, root: Path) -> Path:
    return root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Shard:
    """One shard's rows: activations (rows, d) memory-mapped, the norm of each row, the position of each row, and per
    stored input its index into the data set's distinct inputs and its first row (``starts`` has one more entry)."""

    acts: np.ndarray
    norms: np.ndarray
    pos: np.ndarray
    inputs: np.ndarray
    starts: np.ndarray


class ActivationIndex:
    """One site's activations over a data set, on disk: see the module docstring."""

    def __init__(self, path: Path, meta: dict, shards: list[Shard]):
        self.path, self.meta, self.shards = path, meta, shards

    @property
    def rows(self) -> int:
        return sum(len(s.pos) for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    @property
    def error(self) -> float:
        """The storage's worst distance error measured when it was built (0 for float32)."""
        return float(self.meta["error"])

    @classmethod
    def open(cls, probed: ProbedModel, site, data: DataSet, root: Path | None = None) -> "ActivationIndex":
        """The cached index of ``site`` over ``data``, built first where there is none (one process)."""
        root = cache_root() if root is None else Path(root)
        key = _key(probed, site, data)
        path = _dir(key, root)
        index = cls._load(path, key)
        if index is None:
            build(probed, site, data, root)
            index = cls._load(path, key)
            assert index is not None
        return index

    @classmethod
    def _load(cls, path: Path, key: dict) -> "ActivationIndex | None":
        """The index at ``path`` if it is complete and its key matches (else None: it is rebuilt)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key:
            log.warning("activation cache %s was made for another model, site or data: rebuilding it", path)
            return None
        shards = []
        try:
            for name in meta["shards"]:
                d = path / name
                info = json.loads((d / "shard.json").read_text())
                acts = np.memmap(d / "acts.bin", dtype=meta["storage"], mode="r", shape=(info["rows"], meta["d"]))
                shards.append(
                    Shard(
                        acts,
                        np.load(d / "norms.npy"),
                        np.load(d / "pos.npy"),
                        np.load(d / "inputs.npy"),
                        np.load(d / "starts.npy"),
                    )
                )
        except (OSError, ValueError, KeyError) as e:
            log.warning("activation cache %s is unreadable (%s): rebuilding it", path, e)
            return None
        if sum(len(s.inputs) for s in shards) != key["distinct"]:
            log.warning("activation cache %s is incomplete: rebuilding it", path)
            return None
        return cls(path, meta, shards)


def build(
    probed: ProbedModel, site, data: DataSet, root: Path | None = None, rank: int = 0, world: int = 1, barrier=None
) -> Path:
    """Run the probed model over ``data`` up to ``site`` and store the activations: with ``world`` processes, rank
    ``rank`` stores the inputs ``i % world == rank`` as its shard, and rank 0 writes the index's metadata once every
    shard is in place (``barrier``: the process group's barrier). Returns the index's directory."""
    root = cache_root() if root is None else Path(root)
    key = _key(probed, site, data)
    path = _dir(key, root)
    path.mkdir(parents=True, exist_ok=True)
    name = f"shard-{rank}-of-{world}"
    mine = list(range(rank, len(data.texts), world))
    t0 = time.perf_counter()
    storage, error = _write_shard(
        probed, site, [data.texts[i] for i in mine], np.array(mine, dtype=np.int64), path / name
    )
    log.info(
        "activation cache: %s over %d inputs of %s stored in %.1f s (%s)",
        site.short,
        len(mine),
        data.name,
        time.perf_counter() - t0,
        storage,
    )
    if barrier is not None:
        barrier()
    if rank == 0:
        metas = [json.loads((path / f"shard-{r}-of-{world}" / "shard.json").read_text()) for r in range(world)]
        kinds = {m["storage"] for m in metas}
        if len(kinds) > 1:  # shards measured differently: keep the index readable as one dtype
            raise UserError(f"activation cache {path}: shards were stored as {sorted(kinds)}; rebuild with one process")
        meta = {
            "key": key,
            "d": metas[0]["d"],
            "storage": metas[0]["storage"],
            "error": max(m["error"] for m in metas),
            "shards": [f"shard-{r}-of-{world}" for r in range(world)],
        }
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(path / "meta.json")
    if barrier is not None:
        barrier()
    return path


@torch.no_grad()
def _write_shard(probed: ProbedModel, site, texts: list[str], inputs: np.ndarray, out: Path) -> tuple[str, float]:
    """Store the activations of ``texts`` (the data set's inputs ``inputs``) in the shard directory ``out``, through a
    temporary directory renamed at the end. Returns the storage dtype and its measured error."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seqs = []
    for k, t in enumerate(texts):
        try:
            seqs.append(probed.encode(t))
        except UserError as e:
            raise UserError(f"input {k + 1} of the data ({t[:40]!r}): {e}") from None
    storage, error = None, 0.0
    norms, pos, order, starts = [], [], [], [0]
    d = 0
    with open(tmp / "acts.bin", "wb") as f:
        for rows in length_batches([len(s) for s in seqs], BATCH):
            b = probed.batch([seqs[r] for r in rows])
            act = probed.run(b.ids, [site])[site].float().cpu()
            valid = b.valid.cpu()
            if storage is None:
                d = act.shape[-1]
                storage, error = _measure(act[valid])
            n_valid = valid.sum(1)
            flat = act[valid]  # rows in input order, each input's positions together
            stored = flat.to(torch.float16 if storage == "float16" else torch.float32)
            f.write(stored.numpy().tobytes())
            norms.append(stored.float().norm(dim=-1).numpy())
            pos.append(valid.nonzero()[:, 1].to(torch.int32).numpy())
            order += rows
            for n in n_valid.tolist():
                starts.append(starts[-1] + n)
    np.save(tmp / "norms.npy", np.concatenate(norms) if norms else np.zeros(0, np.float32))
    np.save(tmp / "pos.npy", np.concatenate(pos) if pos else np.zeros(0, np.int32))
    np.save(tmp / "inputs.npy", inputs[np.array(order, dtype=np.int64)] if order else np.zeros(0, np.int64))
    np.save(tmp / "starts.npy", np.array(starts, dtype=np.int64))
    (tmp / "shard.json").write_text(
        json.dumps({"rows": starts[-1], "d": d, "storage": storage or "float32", "error": error})
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return storage or "float32", error


def _measure(acts: torch.Tensor, pairs: int = 4096) -> tuple[str, float]:
    """float16 or float32 storage, by the worst error float16 makes in distances between rows of ``acts`` (the
    distances that matter: those up to 0.5)."""
    if len(acts) < 2:
        return "float32", 0.0
    g = torch.Generator().manual_seed(0)
    a = acts[torch.randint(len(acts), (pairs,), generator=g)]
    b = acts[torch.randint(len(acts), (pairs,), generator=g)]
    near = a + (b - a) * torch.rand(pairs, 1, generator=g) * 0.3  # points between, so that small distances occur
    exact = (near - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
    half = (near.half().float() - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
    err = float((half - exact).abs()[exact <= 0.5].max()) if bool((exact <= 0.5).any()) else 0.0
    if not np.isfinite(err) or err > FP16_TOLERANCE or bool(acts.abs().max() > 6e4):
        return "float32", 0.0
    return "float16", err


# ---------------------------------------------------------------------------------------------- scanning
@torch.no_grad()
def scan(index: ActivationIndex, zq: torch.Tensor, metric: str, n_inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input's minimum distance to each query activation of ``zq`` (Q, d) and the arg-min position: ``(dmin
    (Q, n_inputs), pos (Q, n_inputs))``. Distances come from the stored activations (the measured storage error
    applies: :func:`exact_members`)."""
    zq = zq.float().cpu().reshape(-1, zq.shape[-1])
    Q = len(zq)
    qn = zq.norm(dim=-1).clamp_min(1e-12)
    dmin = torch.full((Q, n_inputs), float("inf"))
    amin = torch.zeros((Q, n_inputs), dtype=torch.long)
    for sh in index.shards:
        starts = sh.starts
        k = 0
        while k < len(sh.inputs):
            # whole inputs per chunk, so that each input's minimum is taken within one chunk
            end = int(np.searchsorted(starts, starts[k] + CHUNK_ROWS, side="right")) - 1
            end = max(end, k + 1)
            end = min(end, len(sh.inputs))
            a, b = int(starts[k]), int(starts[end])
            z = torch.from_numpy(np.array(sh.acts[a:b])).float()  # a copy, then torch's float16 conversion: 8x numpy's
            zn = torch.from_numpy(np.asarray(sh.norms[a:b], dtype=np.float32))
            dots = z @ zq.T  # (rows, Q)
            if metric == "euclidean":
                d = (zn[:, None] ** 2 - 2 * dots + qn[None] ** 2).clamp_min(0).sqrt() / qn[None]
            elif metric == "cosine":
                d = 1 - dots / (zn[:, None].clamp_min(1e-12) * qn[None])
            else:
                raise UserError(f"unknown metric {metric!r}: expected 'euclidean' or 'cosine'")
            lengths = torch.from_numpy(np.diff(starts[k : end + 1]))
            seg = torch.repeat_interleave(torch.arange(end - k), lengths)
            local = torch.full((Q, end - k), float("inf")).scatter_reduce(1, seg.expand(Q, -1), d.T, "amin")
            rows = torch.arange(b - a).expand(Q, -1)
            first = torch.where(d.T <= local[:, seg], rows, b - a)
            first = torch.full((Q, end - k), b - a).scatter_reduce(1, seg.expand(Q, -1), first, "amin")
            pos = torch.from_numpy(np.asarray(sh.pos[a:b], dtype=np.int64))
            cols = torch.from_numpy(np.asarray(sh.inputs[k:end], dtype=np.int64))
            dmin[:, cols] = local
            amin[:, cols] = pos[first.clamp_max(max(0, b - a - 1))]
            k = end
    return dmin, amin


def exact_members(
    probed: ProbedModel,
    site,
    data: DataSet,
    index: ActivationIndex,
    zq: torch.Tensor,
    dmin: torch.Tensor,
    amin: torch.Tensor,
    epsilon: float,
    metric: str,
) -> None:
    """Verify again (in place, through the probed model) the inputs whose scanned distance to ``zq`` (d,) lies within
    the storage's error margin of ``epsilon``: membership is then exact."""
    margin = MARGIN * index.error + 1e-5  # float32 storage: the scan's own rounding (|z|^2 - 2 z.q + |q|^2)
    near = ((dmin - epsilon).abs() <= margin).nonzero()[:, 0].tolist()
    if not near:
        return
    d, a, _ = verify(probed, site, [probed.encode(data.texts[i]) for i in near], zq, metric)
    dmin[near], amin[near] = d, a


# ---------------------------------------------------------------------------------------------- a reading's members
DATA_SAMPLES = 32  # data members a reading lists among its samples: the nearest half, the other half at random
KEEP = 4096  # members a reading keeps (and takes its shares over): beyond this, a random sample by weight


@dataclass
class Found:
    """A reading's members within the data: ``listed`` the inputs shown among the samples, ``record`` what the reading
    keeps of them (:func:`find_members`)."""

    listed: list[str]
    record: dict


def find_members(
    probed: ProbedModel,
    site,
    zq: torch.Tensor,
    data: DataSet,
    index: ActivationIndex,
    epsilon: float,
    metric: str,
    features: dict,
    seed: int,
) -> Found:
    """Every input of ``data`` within ``epsilon`` of ``zq`` at ``site`` (exact: :func:`scan`, then
    :func:`exact_members`). The record keeps each member's distance, arg-min position, tokens, weight and the values
    of the user's own features (``module:function``: the views cannot compute those again); where there are more
    than :data:`KEEP` distinct members it keeps a random sample of KEEP draws by weight, and the shares' interval
    widens by it (``n_eff``)."""
    t0 = time.perf_counter()
    dmin, amin = scan(index, zq[None], metric, len(data.texts))
    dmin, amin = dmin[0], amin[0]
    exact_members(probed, site, data, index, zq, dmin, amin, epsilon, metric)
    seconds = time.perf_counter() - t0
    inside = (dmin <= epsilon).nonzero()[:, 0].numpy()
    w = data.weights[inside]
    total = float(w.sum())
    n_data = total**2 / float((w**2).sum()) if len(inside) else 0.0
    rng = np.random.default_rng(seed)
    if len(inside) > KEEP:
        idx, counts = np.unique(rng.choice(len(inside), size=KEEP, p=w / total), return_counts=True)
        kept, kept_w, n_eff = inside[idx], counts.astype(float), 1 / (1 / n_data + 1 / KEEP)
    else:
        kept, kept_w, n_eff = inside, w, n_data
    user = {n: f for n, f in features.items() if ":" in n}
    tok = probed.tokenizer
    members = {}
    for i, wt in zip(kept.tolist(), kept_w.tolist()):
        x = data.texts[i]
        members[x] = [
            round(float(dmin[i]), 5),
            int(amin[i]),
            tok.tokens_of(probed.encode(x)),
            wt,
            {n: _jsonable(_value(f, x)) for n, f in user.items()},
        ]
    nearest = dmin.argsort()[: DATA_SAMPLES // 2].tolist()
    rand = (
        rng.choice(inside, min(len(inside), DATA_SAMPLES - len(nearest)), replace=False).tolist() if len(inside) else []
    )
    record = {
        "epsilon": epsilon,
        "metric": metric,
        "found": int(len(inside)),  # distinct members in the data
        "total": total,  # members with their weights (inputs, duplicates counted)
        "n_eff": round(n_eff, 2),  # the effective size of the shares' intervals
        "subsampled": bool(len(inside) > KEEP),
        "members": members,
        "scan": {"rows": index.rows, "storage": index.meta["storage"], "seconds": round(seconds, 4)},
    }
    return Found([data.texts[i] for i in nearest + rand], record)


def _value(f, text: str):
    try:
        return f(text)
    except Exception:
        return None


def _jsonable(v):
    """A feature value as JSON keeps it (tuples as lists; anything else but plain values as its text)."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return str(v)
