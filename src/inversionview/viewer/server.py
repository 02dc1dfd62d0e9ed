"""The live viewer: ``inversionview serve RUN_DIR`` serves one page that reads any input of the run it was
started with, shows the readings, pins several side by side and downloads them as one HTML report.

Standard library only (:class:`http.server.ThreadingHTTPServer`). The page and its assets come from the
package (``static/``); nothing is fetched from the network. The server binds 127.0.0.1 by default, serves only
the run (and the stored-readings file) it was started with, and takes no file paths from the client.

Routes (JSON in and out; a bad request gets a 4xx with ``{"error": "one line"}``, never a traceback: 400 for a
user error or malformed JSON, 404 for an unknown route or file, 405 for a wrong method, 413 for an oversized
body, 415 for a POST body not sent as ``application/json`` and, on a loopback address, 403 for a request
addressed to another host name, which is what a DNS-rebinding page would send):

=======  ======================  ============================================================================
GET      ``/``                   the page
GET      ``/static/NAME``        the page's assets (only the files in ``static/``)
GET      ``/api/info``           the run: sites grouped by layer, defaults, caps
GET      ``/api/random``         a held-out input from the run's task or data, its tokens and task positions
POST     ``/api/tokens``         ``{"text"}`` -> its tokens and task positions
POST     ``/api/query``          ``{"text", "site", "position", "samples", "epsilon", "metric", "temperature",
                                 "noise", "seed"}`` -> ``{"reading": Preimage.to_dict(), "html": fragment}``
POST     ``/api/epsilon``        ``{"reading", "epsilon"}`` -> the reading at another epsilon, as ``/api/query``
POST     ``/api/report``         ``{"readings": [Preimage dicts]}`` -> the self-contained HTML report
GET      ``/api/stored``         ``?site=&position=&text=`` -> the first 200 matching stored readings and ``more`` (``--db`` only)
GET      ``/api/stored/ID``      one stored reading, as ``/api/query`` returns it
=======  ======================  ============================================================================

Queries run one at a time (the model is guarded by a lock) in the server's threads, so the page, its assets,
``/api/info``, ``/api/random`` and ``/api/tokens`` stay responsive while a query runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UserError
from .html import render_html, render_reading

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 1000  # characters of a query input
MAX_SAMPLES = 4096  # candidates of one query in the viewer
MAX_BODY = 64 * 1024  # bytes of a request body, except a report's
MAX_REPORT_BODY = 64 * 1024 * 1024  # a report carries the pinned readings' JSON (~0.5 MB each at 1024 samples)
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png", ".svg": "image/svg+xml"}


class Reject(Exception):
    """A request the viewer refuses: its HTTP status and one line for the page."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _field(body: dict, key: str, kind, default=None, none_ok: bool = False):
    """``body[key]`` checked against ``kind`` (int, float or str), or ``default`` when absent."""
    if key not in body:
        return default
    v = body[key]
    if v is None and none_ok:
        return None
    ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
        (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if kind is float else \
        isinstance(v, kind)  # JSON may carry NaN or Infinity (Python's json sends them)
    if not ok:
        want = {int: "a whole number", float: "a finite number", str: "a string"}[kind]
        raise UserError(f"{key} must be {want}{' or null' if none_ok else ''}, got {json.dumps(v)[:40]}")
    return float(v) if kind is float else v


def reading_dict(pre) -> dict:
    """``pre.to_dict()`` without its deep copy (200x faster at 1024 samples: 0.3 ms against 63 ms)."""
    return {**{f.name: getattr(pre, f.name) for f in dataclasses.fields(pre)},
            "samples": [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)} for s in pre.samples]}


def _sample_ok(s) -> bool:
    """Every field of a sample from the client has its type (a report renders them, epsilon sums them)."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (isinstance(s.tokens, list) and all(isinstance(t, str) for t in s.tokens) and isinstance(s.text, str)
            and num(s.distance) and isinstance(s.position, int) and isinstance(s.count, int)
            and isinstance(s.distances, list) and all(x is None or num(x) for x in s.distances)
            and isinstance(s.delta, list) and all(num(x) for x in s.delta)
            and (s.annotation is None or isinstance(s.annotation, str)))


def preimage_from_dict(d) -> "Preimage":  # noqa: F821
    """A reading from its JSON (``Preimage.to_dict``), refusing anything else with one line."""
    from ..preimage import Preimage, Sample

    if not isinstance(d, dict):
        raise UserError("a reading must be a JSON object (Preimage.to_dict())")
    keep = {f.name for f in dataclasses.fields(Preimage)}  # a field added later is kept; an unknown one dropped
    skeep = {f.name for f in dataclasses.fields(Sample)}
    try:
        if not isinstance(d.get("samples"), list) or not all(isinstance(s, dict) for s in d["samples"]):
            raise TypeError("samples must be a list of objects")
        p = Preimage.from_dict({**{k: v for k, v in d.items() if k in keep},
                                "samples": [{k: v for k, v in s.items() if k in skeep} for s in d["samples"]]})
        if not 0 <= p.position < len(p.tokens) or not p.epsilon > 0:
            raise ValueError("position or epsilon out of range")
        if not isinstance(p.n_candidates, int) or not all(_sample_ok(s) for s in p.samples):
            raise TypeError("a sample or n_candidates has a field of the wrong type")
        render_reading(p, limit=1)  # the reading's own fields have the right type
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"not a reading's JSON (Preimage.to_dict()): {e}") from None
    return p


def _run_name(run_dir) -> str:
    """``shipped:TASK`` for a shipped decoder, else the run directory."""
    from ..run import SHIPPED

    try:
        rel = Path(run_dir).resolve().relative_to(SHIPPED.resolve())
        return f"shipped:{rel.parts[0]}"
    except (ValueError, IndexError, TypeError):
        return str(run_dir)


class Viewer:
    """The state behind the page: one loaded run, a lock around its model, and an optional readings store."""

    def __init__(self, iv, db: str | None = None):
        self.iv, self.db = iv, db
        self.store = None
        if db is not None:
            from ..store import ReadingStore

            self.store = ReadingStore(db)  # refuses a missing or foreign file; safe to share between threads
            if other := sorted(set(self.store.decoders()) - {iv.fingerprint}):
                log.warning("%s holds readings of %d other decoder(s) (%s); they are listed with this run's",
                            db, len(other), ", ".join(other))
        self.lock = threading.Lock()
        self.rng = random.Random()
        self.files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # the client can name only these
        self._source = None

    # ------------------------------------------------------------------------------------------ reads
    def info(self) -> dict:
        groups: dict[str, list] = {}
        for s in self.iv.sites:
            groups.setdefault(f"layer {s.layer}" if s.layer >= 0 else "modules", []).append(
                {"short": s.short, "name": s.name, "head": s.kind == "result"})
        spec = self.iv.spec
        return {"run": _run_name(self.iv.run_dir), "task": spec.task, "mode": spec.mode,
                "groups": [{"label": k, "sites": v} for k, v in groups.items()],
                "epsilon": spec.epsilon, "metric": spec.metric, "samples": 1024,
                "max_samples": MAX_SAMPLES, "max_text": MAX_TEXT, "stored": self.db is not None,
                "random": self.iv.task is not None or spec.data is not None}

    def tokens(self, text: str) -> dict:
        if len(text) > MAX_TEXT:
            raise UserError(f"the input is {len(text)} characters long; the viewer takes at most {MAX_TEXT}")
        if not text:
            raise UserError("type an input first")
        probed = self.iv.probed
        ids = probed.encode(text)
        tok = probed.tokenizer
        n_text = len(ids) - (1 if tok.eos_id is not None and ids[-1] == tok.eos_id and tok.eos_id != tok.bos_id else 0)
        try:
            positions = list(self.source().positions(text)) if self.source() is not None else []
        except Exception:  # an input outside the task's format has no task positions; it can still be read
            positions = []
        return {"text": text, "tokens": tok.tokens_of(ids), "n_text": n_text, "positions": positions}

    def source(self):
        if self._source is None and (self.iv.task is not None or self.iv.spec.data is not None):
            self._source = self.iv.data_source()
        return self._source

    def random(self) -> dict:
        if self.source() is None:
            raise Reject(404, "this run has no task or data file to draw inputs from: type an input")
        return self.tokens(self.source().sample(self.rng, "test"))

    def query(self, body: dict) -> dict:
        allowed = {"text", "site", "position", "samples", "epsilon", "metric", "temperature", "noise", "seed"}
        if extra := sorted(set(body) - allowed):
            raise UserError(f"unknown field {extra[0]!r}: expected some of {', '.join(sorted(allowed))}")
        text = _field(body, "text", str, "")
        self.tokens(text)  # the length cap and the vocabulary, before taking the lock
        site = _field(body, "site", str)
        if not site:
            raise UserError("choose a site")
        position = body.get("position")
        if not isinstance(position, (int, str)) or isinstance(position, bool):
            raise UserError("position must be a token index or a token: click a token of the query")
        samples = _field(body, "samples", int, 1024)
        if not 1 <= samples <= MAX_SAMPLES:
            raise UserError(f"samples must be between 1 and {MAX_SAMPLES} in the viewer, got {samples}")
        kw = dict(samples=samples, epsilon=_field(body, "epsilon", float, None, none_ok=True),
                  metric=_field(body, "metric", str, None, none_ok=True),
                  temperature=_field(body, "temperature", float, None, none_ok=True),
                  noise=_field(body, "noise", float, 0.0), seed=_field(body, "seed", int, 0))
        with self.lock:
            t = time.perf_counter()
            pre = self.iv.query(text, site=site, position=position, **kw)
            seconds = time.perf_counter() - t
        log.info("read %s at %s of %r: %d samples in %.2f s", pre.site_short, pre.position, text, samples, seconds)
        return {"reading": reading_dict(pre), "html": render_reading(pre), "seconds": round(seconds, 3)}

    def epsilon(self, body: dict) -> dict:
        """The same reading at another epsilon (``Preimage.with_epsilon``): the rule moves, nothing is sampled."""
        eps = _field(body, "epsilon", float)
        if eps is None or not eps > 0:
            raise UserError(f"epsilon must be positive, got {eps}")
        pre = preimage_from_dict(body.get("reading")).with_epsilon(eps)
        return {"reading": reading_dict(pre), "html": render_reading(pre)}

    def report(self, body: dict) -> str:
        readings = body.get("readings")
        if not isinstance(readings, list) or not readings:
            raise UserError("a report needs a non-empty list 'readings' of readings' JSON: pin a reading first")
        pres = []
        for i, d in enumerate(readings):
            try:
                pres.append(preimage_from_dict(d))
            except UserError as e:
                raise UserError(f"reading {i + 1}: {e}") from None
        return render_html(pres)

    # ------------------------------------------------------------------------------------------ stored readings
    def _store(self):
        if self.store is None:
            raise Reject(404, "no stored readings: start the viewer with `inversionview serve RUN --db FILE`")
        return self.store

    def stored(self, query: dict) -> dict:
        q = {k: v[-1] for k, v in query.items()}
        if extra := sorted(set(q) - {"site", "position", "text"}):
            raise UserError(f"unknown filter {extra[0]!r}: expected site, position or text")
        position = q.get("position") or None
        if position is not None:
            try:
                position = int(position)
            except ValueError:
                raise UserError(f"position must be a whole number, got {position!r}") from None
        store = self._store()
        rows = store.find(site=q.get("site") or None, position=position, text=q.get("text") or None, limit=201)
        return {"readings": rows[:200], "more": len(rows) > 200, "sites": list(store.sites())}

    def stored_one(self, reading_id: str) -> dict:
        store = self._store()
        if not reading_id.isdigit():
            raise Reject(404, f"there is no stored reading {reading_id[:40]!r}: ids are whole numbers")
        try:
            pre = store.get(int(reading_id))
        except UserError as e:
            raise Reject(404, str(e)) from None
        return {"reading": reading_dict(pre), "html": render_reading(pre)}


class Handler(BaseHTTPRequestHandler):
    server_version = "inversionview"
    protocol_version = "HTTP/1.1"

    # (method, path or prefix ending in "/") -> the Viewer call
    def _route(self, method: str, path: str):
        v: Viewer = self.server.viewer
        routes = {
            "/": {"GET": lambda: self._file("index.html")},
            "/api/info": {"GET": lambda: self._json(v.info())},
            "/api/random": {"GET": lambda: self._json(v.random())},
            "/api/tokens": {"POST": lambda: self._json(v.tokens(_field(self._body(), "text", str, "")))},
            "/api/query": {"POST": lambda: self._json(v.query(self._body()))},
            "/api/epsilon": {"POST": lambda: self._json(v.epsilon(self._body(MAX_REPORT_BODY)))},
            "/api/report": {"POST": lambda: self._send(200, v.report(self._body(MAX_REPORT_BODY)).encode(), TYPES[".html"],
                                                      {"Content-Disposition": 'attachment; filename="inversionview-report.html"'})},
            "/api/stored": {"GET": lambda: self._json(v.stored(parse_qs(urlsplit(self.path).query)))},
        }
        prefixes = {
            "/static/": {"GET": lambda rest: self._file(rest)},
            "/api/stored/": {"GET": lambda rest: self._json(v.stored_one(rest))},
        }
        if path in routes:
            table, arg = routes[path], ()
        else:
            hit = next((p for p in prefixes if path.startswith(p) and len(path) > len(p)), None)
            if hit is None:
                raise Reject(404, f"no such page or endpoint: {path[:100]}")
            table, arg = prefixes[hit], (path[len(hit):],)
        fn = table.get("GET" if method == "HEAD" else method)
        if fn is None:
            allow = ", ".join(table)
            raise Reject(405, f"{method} is not allowed on {path}: use {allow}", {"Allow": allow})
        fn(*arg)

    def _dispatch(self):
        self._consumed = (self.headers.get("Content-Length") or "0").strip() == "0" and "Transfer-Encoding" not in self.headers
        try:
            self._check_host()
            self._route(self.command, unquote(urlsplit(self.path).path))
        except Reject as e:
            self._error(e.status, e.message, e.headers)
        except UserError as e:
            self._error(400, str(e))
        except Exception as e:  # a bug: log it here, tell the page one line
            log.exception("viewer request %s %s failed", self.command, self.path)
            self._error(500, f"internal error ({type(e).__name__}); see the server's log")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # ------------------------------------------------------------------------------------------ helpers
    def _check_host(self):
        """On a loopback address, answer only requests addressed to this machine by name: a web page elsewhere
        that rebinds its own domain name to 127.0.0.1 (DNS rebinding) is refused."""
        if not self.server.server_address[0] in ("127.0.0.1", "::1", "localhost"):
            return
        host = (self.headers.get("Host") or "").strip()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name.lower() not in ("127.0.0.1", "localhost", "::1"):
            raise Reject(403, f"this viewer answers requests for 127.0.0.1 or localhost, not {host[:60]!r}")

    def _body(self, limit: int = MAX_BODY) -> dict:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            # a cross-site form or "simple" fetch cannot send this type without the browser asking first (CORS)
            raise Reject(415, "send the request body as JSON with Content-Type: application/json")
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n < 0:
                raise ValueError
        except ValueError:
            raise Reject(400, "Content-Length must be a whole number of bytes") from None
        if n > limit:
            raise Reject(413, f"the request body is {n:,} bytes; at most {limit:,} are accepted"
                         + (" (unpin some readings)" if limit == MAX_REPORT_BODY else ""))
        raw = self.rfile.read(n) if n > 0 else b""
        self._consumed = True
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise Reject(400, "the request body must be a JSON object")
        return body

    def _file(self, name: str):
        path = self.server.viewer.files.get(name)
        if path is None:
            raise Reject(404, f"no such file: {name[:100]}")
        self._send(200, path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))

    def _json(self, obj, status: int = 200):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, headers: dict | None = None):
        if status >= 500 or not self._consumed:  # an unread body would be taken for the next request
            self.close_connection = True
        self._send(status, json.dumps({"error": message}).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(iv, host: str = "127.0.0.1", port: int = 8000, db: str | None = None) -> ThreadingHTTPServer:
    """A viewer server for the loaded run ``iv`` (not started: call ``serve_forever``). Port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise UserError(f"port must be between 0 and 65535 (0 picks a free one), got {port}")
    viewer = Viewer(iv, db=db)
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.daemon_threads = True
    server.viewer = viewer
    return server
