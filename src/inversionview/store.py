"""Stored readings: a SQLite file of :class:`~inversionview.preimage.Preimage` results (stdlib ``sqlite3``).

A reading is stored in full: the query (text, site, position), its settings, the decoder's fingerprint, every
distinct sample with its distance, arg-min position, per-position distances, deltas, count and annotation, and
the reading's other fields (fraction inside, attention, ...). :meth:`ReadingStore.get` gives back a Preimage
equal to the one stored.

A reading's key is ``(decoder fingerprint, text, site, position, settings)``: the same key is never stored
twice (a UNIQUE constraint). Each reading is written in one transaction, in WAL mode, so a reader (the viewer)
can browse while a batch writes, and an interrupted batch keeps every reading it finished.

>>> store = ReadingStore("readings.sqlite", create=True)
>>> rid = store.put(iv.query(text, site="a1.0", position=":"), iv.fingerprint)
>>> store.find(site="a1.0", text="|v:")          # rows: id, text, site, site_short, position, ...
>>> store.get(rid).show()

::

    meta       (key, value)            format = inversionview-readings, schema_version = 1 (a newer version
                                       or an unknown key is refused: see inversionview.artifacts)
    decoders   (fingerprint, run, created)
    readings   (id, fingerprint, text, site, site_short, position, settings, token, epsilon, metric, mode,
                n_candidates, n_samples, n_inside, fraction_inside, created, body)
                UNIQUE (fingerprint, text, site, position, settings); body: the Preimage's other fields as JSON
    samples    (reading_id, rank, text, distance, position, count, annotation)
    sample_data (reading_id, data)     zlib-compressed JSON: the per-token lists of every sample in rank order
                                       (tokens, distances, delta) and any other Sample field; 4x smaller than
                                       plain JSON on the counting model
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from .artifacts import check_fields
from .errors import UserError
from .preimage import Preimage
from .propose import AUTO_MIX
from .schema import NotAReading, reading_from_dict
from .settings import SamplingSettings, build

log = logging.getLogger(__name__)

FORMAT = "inversionview-readings"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE decoders (fingerprint TEXT PRIMARY KEY, run TEXT, created REAL NOT NULL);
CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL REFERENCES decoders(fingerprint),
    text TEXT NOT NULL,
    site TEXT NOT NULL,
    site_short TEXT NOT NULL,
    position INTEGER NOT NULL,
    settings TEXT NOT NULL,
    token TEXT,
    epsilon REAL NOT NULL,
    metric TEXT NOT NULL,
    mode TEXT,
    n_candidates INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    n_inside INTEGER NOT NULL,
    fraction_inside REAL NOT NULL,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (fingerprint, text, site, position, settings)
);
CREATE INDEX readings_site ON readings (site_short, position);
CREATE TABLE samples (
    reading_id INTEGER NOT NULL REFERENCES readings(id),
    rank INTEGER NOT NULL,
    text TEXT NOT NULL,
    distance REAL,
    position INTEGER NOT NULL,
    count INTEGER NOT NULL,
    annotation TEXT,
    PRIMARY KEY (reading_id, rank)
);
CREATE TABLE sample_data (reading_id INTEGER PRIMARY KEY REFERENCES readings(id), data BLOB NOT NULL);
"""

_SAMPLE_COLUMNS = ("text", "distance", "position", "count", "annotation")
_FLOAT_SETTINGS = ("epsilon",)
_INT64 = (-(2**63), 2**63 - 1)  # SQLite's integer range: a larger id or position would overflow, not just miss
# forward order of a layer's sites (as in inversionview.sites.all_sites), to list stored sites in model order
_KIND_ORDER = {"resid_pre": 0, "result": 1, "attn_out": 2, "resid_mid": 3, "mlp_out": 4, "resid_post": 5}


def _json(x) -> str:
    return json.dumps(x, separators=(",", ":"))


def settings_of(pre: Preimage) -> dict:
    """The settings that, with the decoder, text, site and position, determine a reading: samples, the
    (temperature, noise) mix, epsilon, metric and seed."""
    return canonical_settings(
        {
            "samples": pre.settings.get("samples", pre.n_candidates),
            "mix": pre.settings["mix"],
            "epsilon": pre.epsilon,
            "metric": pre.metric,
            "seed": pre.settings.get("seed", 0),
        }
    )


def canonical_settings(settings: dict) -> dict:
    """Settings with numbers in one form (so 1 and 1.0 give the same key)."""
    s = dict(settings)
    if "samples" in s:
        s["samples"] = int(s["samples"])
    if "seed" in s:
        s["seed"] = int(s["seed"])
    if "mix" in s:
        s["mix"] = [[float(t), float(n)] for t, n in s["mix"]]
    for k in _FLOAT_SETTINGS:
        if s.get(k) is not None:
            s[k] = float(s[k])
    return s


class _Encoded(NamedTuple):
    """A reading in the form :meth:`ReadingStore.put` writes it."""

    skey: str  # the settings as canonical JSON, part of the reading's key
    token: str | None  # the token at the query position
    n_inside: int  # distinct samples within epsilon
    body: str  # the Preimage's fields other than its samples, as JSON
    rows: list[tuple]  # per sample in rank order: rank, text, distance, position, count, annotation
    data: bytes  # the samples' other fields (per-token lists, ...) as zlib-compressed JSON


def _encode(pre: Preimage, settings: dict | None) -> _Encoded:
    """``pre`` and its ``settings`` (default: :func:`settings_of` ``pre``) as the store writes them."""
    # shallow field dicts (the values are JSON-ready): dataclasses.asdict's deep copy took 3/4 of the time
    d = {f.name: getattr(pre, f.name) for f in fields(pre) if f.name != "samples"}
    samples = [{f.name: getattr(s, f.name) for f in fields(s)} for s in pre.samples]
    settings = canonical_settings(settings if settings is not None else settings_of(pre))
    rows = [
        (rank, s["text"], s["distance"], s["position"], s["count"], s["annotation"]) for rank, s in enumerate(samples)
    ]
    data = zlib.compress(_json([{k: v for k, v in s.items() if k not in _SAMPLE_COLUMNS} for s in samples]).encode())
    return _Encoded(
        skey=_json(dict(sorted(settings.items()))),
        token=pre.tokens[pre.position] if 0 <= pre.position < len(pre.tokens) else None,
        n_inside=sum(1 for s in pre.samples if s.distance <= pre.epsilon),
        body=_json(d),
        rows=rows,
        data=data,
    )


def reading_key(
    iv,
    text: str,
    site,
    position,
    samples: int = 1024,
    temperature: float | None = None,
    noise: float = 0.0,
    epsilon: float | None = None,
    metric: str | None = None,
    seed: int = 0,
) -> tuple[str, str, str, int, dict]:
    """The key ``(fingerprint, text, site, position, settings)`` that ``iv.query(text, site, position, ...)``
    would be stored under, without reading: the site as its TransformerLens name, the position resolved to
    an index, epsilon and metric resolved to the run's defaults. Raises :class:`UserError` for an unknown
    site or a position that is not in the text, as the query would."""
    from .preimage import resolve_position

    s, _ = iv.site_index(site)
    probed, tok = iv.probed, iv.probed.tokenizer
    ids = probed.encode(text)
    n_text = len(ids) - (1 if tok.eos_id is not None and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0)
    pos = resolve_position(tok.tokens_of(ids), n_text, position)
    mix = AUTO_MIX if temperature is None else ((temperature, noise),)
    settings = canonical_settings(
        {
            "samples": samples,
            "mix": mix,
            "epsilon": iv.spec.epsilon if epsilon is None else epsilon,
            "metric": metric or iv.spec.metric,
            "seed": seed,
        }
    )
    return iv.fingerprint, text, s.name, pos, settings


def _site_order(short: str):
    from .sites import parse_site

    try:
        s = parse_site(short)
    except UserError:
        return (1, 0, 0, 0, short)
    return (0, s.layer, _KIND_ORDER.get(s.kind, 9), s.head or 0, short)


class ReadingStore:
    """Readings in a SQLite file. ``create=True`` makes the file if it does not exist; otherwise a missing
    file is a :class:`UserError`. Safe to share between threads (one connection behind a lock) and between
    processes (SQLite's WAL locking)."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"readings DB {self.path} is a directory: expected a SQLite file such as readings.sqlite")
        if not self.path.exists() and not create:
            raise UserError(
                f"no readings DB at {self.path}: write one with `inversionview query-batch RUN "
                f"QUERIES.jsonl --db {self.path}`"
            )
        if create and not self.path.parent.is_dir():
            raise UserError(f"cannot create the readings DB {self.path}: directory {self.path.parent} does not exist")
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"cannot open the readings DB {self.path}: {e}") from None
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError:
            raise UserError(
                f"{self.path} is not a readings DB (not an SQLite file): expected a file written by "
                "`inversionview query-batch`"
            ) from None
        if not tables:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("BEGIN IMMEDIATE")
                if not {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}:
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                    db.executemany(
                        "INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))]
                    )
                db.execute("COMMIT")
            except sqlite3.Error as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise UserError(f"cannot create the readings DB {self.path}: {e}") from None
            log.debug("created readings DB %s", self.path)
        else:
            meta = dict(db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            if meta.get("format") != FORMAT:
                raise UserError(
                    f"{self.path} is an SQLite file but not a readings DB (it has tables "
                    f"{', '.join(sorted(tables))}): expected a file written by `inversionview query-batch`"
                )
            self._check_version(meta)
            try:
                db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as e:  # read-only file or directory: reading still works
                log.debug("could not set WAL mode on %s: %s", self.path, e)
        db.execute("PRAGMA foreign_keys = ON")

    def _check_version(self, meta: dict) -> None:
        """Refuse a DB of another schema version (saying to upgrade for a newer one) or with unknown meta keys."""
        from ._version import __version__

        found = meta.get("schema_version")
        if found != str(SCHEMA_VERSION):
            shown = str(found)
            newer = shown.isdigit() and int(shown) > SCHEMA_VERSION
            hint = (
                f"newer than this inversionview ({__version__}) reads ({SCHEMA_VERSION}): upgrade inversionview to "
                "read it, or use"
                if newer
                else f"but this inversionview reads version {SCHEMA_VERSION}: use the version that wrote it, or"
            )
            raise UserError(f"{self.path} is a readings DB of schema version {found}, {hint} a new --db")
        check_fields(meta, ("format", "schema_version"), f"{self.path} (meta table)")

    # ------------------------------------------------------------------ writing
    def put(self, pre: Preimage, fingerprint: str, settings: dict | None = None) -> int:
        """Store a reading under ``fingerprint`` (see :attr:`inversionview.run.InversionView.fingerprint`) and
        ``settings`` (default: :func:`settings_of` ``pre``) in one transaction; return its id. A reading whose
        key is already stored is not stored again: the stored one's id is returned."""
        rec = _encode(pre, settings)
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                rid = self._insert(pre, fingerprint, rec)
                if rid is None:  # the key is already stored
                    db.execute("ROLLBACK")
                    rid = self._id(fingerprint, pre.text, pre.site, pre.position, rec.skey)
                    assert rid is not None  # the row whose key the insert conflicted with
                    log.debug("reading %d is already stored; not storing it again", rid)
                    return rid
                db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)", [(rid, *r) for r in rec.rows])
                db.execute("INSERT INTO sample_data VALUES (?, ?)", (rid, rec.data))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return rid

    def _insert(self, pre: Preimage, fingerprint: str, rec: _Encoded) -> int | None:
        """Insert the decoder (where new) and the reading's row, in the caller's transaction: the new row's id, or
        None where a reading of the same key is already stored (nothing inserted)."""
        db = self._db
        db.execute(
            "INSERT INTO decoders VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (fingerprint, pre.decoder, time.time()),
        )
        cur = db.execute(
            "INSERT INTO readings (fingerprint, text, site, site_short, position, settings, token, epsilon, metric,"
            " mode, n_candidates, n_samples, n_inside, fraction_inside, created, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                fingerprint,
                pre.text,
                pre.site,
                pre.site_short,
                pre.position,
                rec.skey,
                rec.token,
                pre.epsilon,
                pre.metric,
                pre.mode,
                pre.n_candidates,
                len(rec.rows),
                rec.n_inside,
                pre.fraction_inside,
                time.time(),
                rec.body,
            ),
        )
        if cur.rowcount == 0:
            return None
        assert cur.lastrowid is not None  # the row just inserted
        return cur.lastrowid

    # ------------------------------------------------------------------ reading
    def _id(self, fingerprint: str, text: str, site: str, position: int, skey: str) -> int | None:
        row = self._db.execute(
            "SELECT id FROM readings WHERE fingerprint = ? AND text = ? AND (site = ? OR site_short = ?)"
            " AND position = ? AND settings = ?",
            (fingerprint, text, site, site, position, skey),
        ).fetchone()
        return row[0] if row else None

    def id_of(self, fingerprint: str, text: str, site: str, position: int, settings: dict) -> int | None:
        """The id of the reading stored under this key (site: TransformerLens or short name), or None."""
        with self._lock:
            return self._id(
                fingerprint, text, site, int(position), _json(dict(sorted(canonical_settings(settings).items())))
            )

    def has(self, fingerprint: str, text: str, site: str, position: int, settings: dict) -> bool:
        """Whether a reading with this key is stored (``reading_key`` gives the key of a query)."""
        return self.id_of(fingerprint, text, site, position, settings) is not None

    def get(self, reading_id: int) -> Preimage:
        """The stored reading, equal to the Preimage that was put. A row that does not hold a reading (the file
        edited or damaged) is a :class:`UserError` naming it: its JSON is checked against the reading's schema
        (:mod:`inversionview.schema`), non-finite distances allowed (a reading is stored as it was given)."""
        rid = int(reading_id)
        with self._lock:
            row = (
                self._db.execute("SELECT body FROM readings WHERE id = ?", (rid,)).fetchone()
                if _INT64[0] <= rid <= _INT64[1]
                else None
            )
            if row is None:
                shown = (
                    str(rid) if rid.bit_length() < 64 else f"of {rid.bit_length():,} bits (beyond SQLite's integers)"
                )
                raise UserError(f"no reading with id {shown} in {self.path} ({len(self)} readings stored)")
            rows = self._db.execute(
                "SELECT text, distance, position, count, annotation FROM samples WHERE reading_id = ? ORDER BY rank",
                (rid,),
            ).fetchall()
            data = self._db.execute("SELECT data FROM sample_data WHERE reading_id = ?", (rid,)).fetchone()
        try:
            rest = json.loads(zlib.decompress(data[0])) if data is not None else None
            if not isinstance(rest, list) or len(rest) != len(rows) or not all(isinstance(r, dict) for r in rest):
                raise ValueError(f"its sample data does not match its {len(rows)} samples")
            samples = [
                {
                    **r,
                    "text": text,
                    "distance": float("nan") if dist is None else dist,
                    "position": pos,
                    "count": count,
                    "annotation": ann,
                }
                for (text, dist, pos, count, ann), r in zip(rows, rest)
            ]
            body = json.loads(row[0])
            if not isinstance(body, dict):
                raise ValueError("its body is not a JSON object")
            return reading_from_dict({**body, "samples": samples}, finite=False)
        except (ValueError, TypeError, zlib.error, NotAReading) as e:
            raise UserError(
                f"reading {rid} in {self.path} is corrupt ({e.detail if isinstance(e, NotAReading) else e}): the "
                "file was edited or damaged; read the query again into a new --db"
            ) from None

    def find(
        self,
        site: str | None = None,
        position: int | None = None,
        text: str | None = None,
        limit: int = 200,
        fingerprint: str | None = None,
    ) -> list[dict]:
        """Stored readings, oldest first, as rows: id, text, site, site_short, position, token, epsilon, metric,
        n_candidates, n_samples (distinct samples), n_inside (distinct samples inside epsilon), fraction_inside
        (of all candidates), settings, fingerprint, created. ``site``: TransformerLens or short name; ``text``:
        a substring of the query text; ``limit``: at most this many rows (None: all)."""
        where: list[str] = []
        args: list[str | int] = []
        if site is not None:
            where.append("(site = ? OR site_short = ?)")
            args += [str(site).strip()] * 2
        if position is not None:
            if not _INT64[0] <= int(position) <= _INT64[1]:  # SQLite's integers; no reading is there
                return []
            where.append("position = ?")
            args.append(int(position))
        if text:
            where.append("instr(text, ?) > 0")
            args.append(text)
        if fingerprint is not None:
            where.append("fingerprint = ?")
            args.append(fingerprint)
        sql = (
            "SELECT id, text, site, site_short, position, token, epsilon, metric, n_candidates, n_samples, n_inside,"
            " fraction_inside, settings, fingerprint, created FROM readings"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id"
        )
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [c[0] for c in cur.description]
            out = [dict(zip(names, r)) for r in cur.fetchall()]
        for r in out:
            r["settings"] = json.loads(r["settings"])
        return out

    def sites(self) -> list[str]:
        """The short names of the sites with stored readings, in the model's forward order."""
        with self._lock:
            names = [r[0] for r in self._db.execute("SELECT DISTINCT site_short FROM readings")]
        return sorted(names, key=_site_order)

    def decoders(self) -> dict[str, str | None]:
        """Fingerprint -> run directory of every decoder with stored readings."""
        with self._lock:
            return dict(self._db.execute("SELECT fingerprint, run FROM decoders ORDER BY created"))

    def check_decoder(self, fingerprint: str) -> None:
        """Refuse to add readings of another decoder to a DB that holds some (resuming a batch with a retrained
        decoder would otherwise read every query again and mix two decoders' readings)."""
        other = {f: r for f, r in self.decoders().items() if f != fingerprint}
        if other:
            f, r = next(iter(other.items()))
            raise UserError(
                f"{self.path} holds readings of another decoder (fingerprint {f}, run {r}), not of this one "
                f"({fingerprint}): use another --db for this decoder"
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM readings").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ReadingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- batches
QUERY_FIELDS = ("text", "site", "position")


@dataclass(frozen=True)
class Query:
    """One line of a queries file: where it is, the query, its read settings and its key."""

    line: int
    text: str
    site: str
    position: int | str
    settings: dict
    key: tuple


@dataclass(frozen=True)
class BatchSummary:
    queries: int  # valid query lines
    read: int  # readings made and stored now
    skipped: int  # already stored by an earlier run, or repeating an earlier line's key
    stored: int  # readings in the DB afterwards
    seconds: float


def read_queries(
    path: str | os.PathLike,
    iv,
    samples: int = 1024,
    temperature: float | None = None,
    noise: float = 0.0,
    epsilon: float | None = None,
    metric: str | None = None,
    seed: int = 0,
) -> list[Query]:
    """Parse and check every line of a JSONL queries file before anything is read: one JSON object per line,
    ``{"text": ..., "site": ..., "position": ...}``, optionally overriding the settings given here (``samples``,
    ``temperature``, ``noise``, ``epsilon``, ``metric``, ``seed``). Blank lines are skipped. The first bad line
    (invalid JSON, a missing or unknown field, a wrong type, an unknown site, a position outside the text, a
    bad setting) raises a :class:`UserError` naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"queries file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the queries file {path}: {e}") from None
    defaults = SamplingSettings(
        samples=samples, temperature=temperature, noise=noise, epsilon=epsilon, metric=metric, seed=seed
    )
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            raise UserError(
                f"{where} is not valid JSON ({e}): expected an object such as "
                '{"text": "vvzccvczvvvzvcvc|v:8", "site": "a1.0", "position": ":"}'
            ) from None
        if not isinstance(d, dict):
            raise UserError(f"{where} is a JSON {type(d).__name__}, not an object with text, site and position")
        missing = [k for k in QUERY_FIELDS if k not in d]
        if missing:
            raise UserError(f"{where} has no {', '.join(map(repr, missing))}: each line needs text, site and position")
        try:
            # the line's settings over the defaults, by the schema: unknown fields, types and bounds
            settings = asdict(build(defaults, d, noun="field", other=QUERY_FIELDS).checked(noun="field"))
            if not isinstance(d["text"], str) or not isinstance(d["site"], str):
                raise UserError("text and site must be strings")
            if isinstance(d["position"], bool) or not isinstance(d["position"], (int, str)):
                raise UserError(f"position must be an integer or a token string, got {d['position']!r}")
            key = reading_key(iv, d["text"], d["site"], d["position"], **settings)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        out.append(Query(n, d["text"], d["site"], d["position"], settings, key))
    if not out:
        raise UserError(f"queries file {path} holds no queries: expected one JSON object per line")
    return out


def query_batch(iv, store: ReadingStore, queries: list[Query], progress: bool = True) -> BatchSummary:
    """Read every query whose key is not stored yet and store each reading in its own transaction. Stopping
    (Ctrl-C, a kill) loses at most the reading in progress; calling this again resumes."""
    from .progress import Progress

    store.check_decoder(iv.fingerprint)
    t0 = time.time()
    todo, seen, repeats = [], set(), 0
    for q in queries:
        k = (*q.key[:4], _json(dict(sorted(q.key[4].items()))))
        if k in seen:
            repeats += 1
        elif not store.has(*q.key):
            todo.append(q)
        seen.add(k)
    skipped = len(queries) - len(todo)
    log.info(
        "%d queries: %d already stored, %d repeat an earlier line, %d to read",
        len(queries),
        skipped - repeats,
        repeats,
        len(todo),
    )
    done = 0
    stopped: str | None = "stopped"  # why the batch ended early; None once every query is read
    try:
        with Progress(len(todo), "query-batch", "reading", enabled=progress) as bar:  # a bar on a terminal only
            for q in todo:
                try:
                    pre = iv.query(q.text, q.site, q.position, **q.settings)
                except UserError as e:
                    raise UserError(f"query on line {q.line}: {e}") from None
                store.put(pre, iv.fingerprint, q.key[4])
                done += 1
                bar.update()
        stopped = None
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    finally:
        s = BatchSummary(len(queries), done, skipped, len(store), time.time() - t0)
        log.info(
            "%sread %d, skipped %d already stored; %s holds %d readings (%.1f s%s)",
            f"{stopped}: " if stopped else "",
            s.read,
            s.skipped,
            store.path,
            s.stored,
            s.seconds,
            f", {s.read / s.seconds:.2f} readings/s" if s.read and s.seconds else "",
        )
        if stopped:
            log.info("run the same command again to read the %d queries left", len(todo) - done)
    return s
