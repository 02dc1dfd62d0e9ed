"""The live viewer: ``inversionview serve RUN_DIR`` serves one page that reads any input of the run it was
started with, shows the readings, pins several side by side and downloads them as one HTML report.

An ASGI app (Starlette) served by uvicorn. The page and its assets come from the package (``static/``); nothing
is fetched from the network. The server binds 127.0.0.1 by default (any other address needs ``allow_remote``,
and there is no authentication), serves only the run (and the stored-readings file) it was started with, and
takes no file paths from the client. Whatever the address, it answers only requests addressed (``Host``) to a
loopback name, the address it is bound to, or a name in ``allowed_hosts``: a web page elsewhere that rebinds its
own domain name to this machine (DNS rebinding) is refused.

Routes (JSON in and out; a bad request gets a 4xx with ``{"error": "one line"}``, never a traceback: 400 for a
user error or malformed JSON, 403 for a request addressed to another host name, 404 for an unknown route or
file, 405 for a wrong or unknown method, 408 for a request whose head or body does not arrive in time, 413 for
an oversized body, 415 for a POST body not sent as ``application/json``, 429 when the reading queue is full or
a reading waited too long, 431 for a request head over 16 KiB; a GET route also answers HEAD):

=======  ======================  ============================================================================
GET      ``/``                   the page
GET      ``/static/NAME``        the page's assets (only the files in ``static/``)
GET      ``/api/info``           the run: sites grouped by layer, defaults, caps
GET      ``/api/random``         a held-out input from the run's task or data, its tokens and task positions
POST     ``/api/tokens``         ``{"text"}`` -> its tokens and task positions
POST     ``/api/query``          ``{"text", "site", "position", "samples", "epsilon", "metric", "temperature",
                                 "noise", "seed", "ticket"}`` -> ``{"reading": Preimage.to_dict(), "html":
                                 fragment, "seconds"}``; ``ticket`` (optional) names the request in ``/api/queue``
GET      ``/api/queue``          ``?ticket=`` -> ``{"position": 0 reading now, k k-th in line, null unknown,
                                 "waiting", "running", "done", "cancelled"}``
POST     ``/api/epsilon``        ``{"reading", "epsilon"}`` -> the reading at another epsilon, as ``/api/query``
POST     ``/api/report``         ``{"readings": [Preimage dicts]}`` -> the self-contained HTML report
GET      ``/api/stored``         ``?site=&position=&text=`` -> the first 200 matching stored readings and ``more`` (``--db`` only)
GET      ``/api/stored/ID``      one stored reading, as ``/api/query`` returns it
=======  ======================  ============================================================================

Readings run one at a time, in order of arrival, in one worker thread (:class:`ReadingQueue`); a reading whose
client goes away while it waits is dropped. At most :attr:`Limits.queue` (8) wait: beyond them a reading is refused
at once with 429 and ``Retry-After`` (the line's expected time, from the readings' mean duration), rather than
waiting many minutes in a long line (a burst of 50 readings of 1,024 samples on 2 busy cores waited up to 900 s;
``benchmarks/bench_serve.py --part burst``). Parsing and rendering big bodies (reports, epsilon changes, stored
readings) run in a second thread, and everything else on the event loop, so the page stays responsive while
readings run. Every request is bounded in size (:data:`MAX_BODY`, :data:`MAX_REPORT_BODY`, 16 KiB of head) and
in time (:class:`Limits`). When the queue runs dry the worker hands freed memory back to the system
(``malloc_trim``): without it the server's RSS doubled over bursts of readings (``benchmarks/bench_serve.py``).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import json
import logging
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h11
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn import Config, Server
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import UserError
from ..preimage import resolve_position
from ..schema import check_reading, reading_dict, reading_from_dict
from ..settings import MAX_SAMPLES, SamplingSettings, build, check
from .html import render_html, render_reading

if TYPE_CHECKING:
    from ..preimage import Preimage

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 1000  # characters of a query input
QUERY_FIELDS = ("text", "site", "position", "ticket")  # a query's fields besides its settings (SamplingSettings)
MAX_BODY = 64 * 1024  # bytes of a request body, except a report's
MAX_REPORT_BODY = 64 * 1024 * 1024  # a report carries the pinned readings' JSON (~0.5 MB each at 1024 samples)
MAX_HEAD = 16 * 1024  # bytes of a request's line and headers (h11 refuses a longer one only while it trickles in)
DRAIN = 1024 * 1024  # a refused body of up to this many bytes is read (and dropped) before the answer
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# the page runs only its own script; inline style attributes are the readings' colours
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """How long a request may take and how many readings may wait."""

    head_seconds: float = 10.0  # from a connection's first byte (or the previous response) to a whole request head
    body_seconds: float = 60.0  # to receive a request's body
    idle_seconds: float = 5.0  # an idle keep-alive connection is closed
    queue: int = 8  # readings waiting (beyond the one running); more are refused at once with 429 and Retry-After
    wait_seconds: float = 900.0  # a reading still waiting after this long is dropped with 429


class Reject(Exception):
    """A request the viewer refuses: its HTTP status and one line for the page."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _text(body: dict, key: str, default=None, none_ok: bool = False):
    """``body[key]``, which must be a string, or ``default`` when absent (the reading settings are checked by the
    schema: :mod:`inversionview.settings`)."""
    if key not in body:
        return default
    v = body[key]
    if v is None and none_ok:
        return None
    if not isinstance(v, str):
        raise UserError(f"{key} must be a string{' or null' if none_ok else ''}, got {json.dumps(v)[:40]}")
    return v


def preimage_from_dict(d) -> Preimage:
    """A reading from its JSON (``Preimage.to_dict``), every field checked against the one schema of a reading
    (:mod:`inversionview.schema`) before any code uses it; anything else is refused with one line."""
    from jinja2 import TemplateError

    p = reading_from_dict(d)
    try:
        render_reading(p, limit=1)  # the schema's fields render (a template's bug is refused, not a 500)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, TemplateError) as e:
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


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise); nothing elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ReadingQueue:
    """Readings run one at a time, in order of arrival, in one worker thread. Each waits under a ticket (the
    page's, to show its place in line) and can be cancelled until it starts. When the queue runs dry the freed
    memory is handed back (:func:`trim_memory`)."""

    SECONDS = 5.0  # what a reading is taken to last before one has run (1,024 samples on a busy 2-core machine)

    def __init__(self, limit: int):
        self.limit, self.done, self.cancelled = limit, 0, 0
        self.seconds = self.SECONDS  # a running mean of how long the readings took (Retry-After)
        # (ticket, future, job); (None, None, None) tells the worker to stop
        self.waiting: deque[tuple[str | None, Future | None, Callable[[], object] | None]] = deque()
        self.running: str | None | bool = False  # the running job's ticket (None: it has none); False: idle
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="inversionview-readings", daemon=True)
        self.thread.start()

    def submit(self, fn, ticket: str | None = None) -> Future:
        fut: Future = Future()
        with self.cond:
            if len(self.waiting) >= self.limit:
                after = self.retry_after()
                raise Reject(
                    429,
                    f"{len(self.waiting)} readings are waiting, the most this viewer queues: try again in about "
                    f"{after} s, when some have finished",
                    {"Retry-After": str(after)},
                )
            self.waiting.append((ticket, fut, fn))
            self.cond.notify()
        return fut

    def retry_after(self) -> int:
        """Seconds until the line has moved on by the waiting readings and the running one (at their mean time)."""
        return max(1, math.ceil(self.seconds * (len(self.waiting) + (self.running is not False))))

    def cancel(self, fut: Future) -> bool:
        """Drop a reading that has not started; False once it runs (it finishes, and nobody reads it)."""
        with self.cond:
            for item in self.waiting:
                if item[1] is fut:
                    self.waiting.remove(item)
                    self.cancelled += 1
                    return fut.cancel()
        return False

    def state(self, ticket: str | None = None) -> dict:
        with self.cond:
            tickets = [t for t, _, _ in self.waiting]
            running = self.running is not False
            position = (
                0
                if running and ticket is not None and self.running == ticket
                else tickets.index(ticket) + 1
                if ticket is not None and ticket in tickets
                else None
            )
            return {
                "position": position,
                "waiting": len(tickets),
                "running": running,
                "done": self.done,
                "cancelled": self.cancelled,
            }

    def close(self) -> None:
        with self.cond:
            for _, fut, _ in self.waiting:
                if fut is not None:  # a stop signal left by an earlier close
                    fut.cancel()
            self.waiting.clear()
            self.waiting.append((None, None, None))  # the worker's signal to stop
            self.cond.notify()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                ticket, fut, fn = self.waiting.popleft()
                if fut is None:
                    return
                assert fn is not None  # a job has its function; only the stop signal has none
                self.running = ticket
            result = error = None
            t0 = time.perf_counter()
            if ran := fut.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as e:  # noqa: BLE001 - handed to the request that waits for it
                    error = e
            with self.cond:
                self.running, self.done = False, self.done + ran
                if ran and error is None:
                    self.seconds = 0.7 * self.seconds + 0.3 * (time.perf_counter() - t0)
                idle = not self.waiting
            if ran:
                fut.set_exception(error) if error is not None else fut.set_result(result)
            if idle:
                trim_memory()


class Viewer:
    """The state behind the page: one loaded run, the queue its readings wait in, and an optional readings store."""

    def __init__(self, iv, db: str | None = None, limits: Limits = Limits()):
        self.iv, self.db, self.limits = iv, db, limits
        self.store = None
        if db is not None:
            from ..store import ReadingStore

            self.store = ReadingStore(db)  # refuses a missing or foreign file; safe to share between threads
            if other := sorted(set(self.store.decoders()) - {iv.fingerprint}):
                log.warning(
                    "%s holds readings of %d other decoder(s) (%s); they are listed with this run's",
                    db,
                    len(other),
                    ", ".join(other),
                )
        self.readings = ReadingQueue(limits.queue)
        self.work = ThreadPoolExecutor(1, thread_name_prefix="inversionview-work")  # big parsing and rendering
        self.rng = random.Random()
        self.files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # the client can name only these
        self._source = None

    def close(self) -> None:
        self.readings.close()
        self.work.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ reads
    def info(self) -> dict:
        groups: dict[str, list] = {}
        for s in self.iv.sites:
            groups.setdefault(f"layer {s.layer}" if s.layer >= 0 else "modules", []).append(
                {"short": s.short, "name": s.name, "head": s.kind == "result"}
            )
        spec = self.iv.spec
        return {
            "run": _run_name(self.iv.run_dir),
            "task": spec.task,
            "mode": spec.mode,
            "groups": [{"label": k, "sites": v} for k, v in groups.items()],
            "epsilon": spec.epsilon,
            "metric": spec.metric,
            "samples": SamplingSettings.samples,
            "max_samples": MAX_SAMPLES,
            "max_text": MAX_TEXT,
            "stored": self.db is not None,
            "random": self.iv.task is not None or spec.data is not None,
        }

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

    def query_job(self, body: dict):
        """The reading a query asks for, checked here (a bad one never waits in the queue), as ``(ticket, job)``:
        ``job()`` reads and returns the response's JSON bytes."""
        kw = dataclasses.asdict(build(SamplingSettings, body, noun="field", other=QUERY_FIELDS).checked(noun="field"))
        text = _text(body, "text", "")
        t = self.tokens(text)  # the length cap and the vocabulary
        site = _text(body, "site")
        if not site:
            raise UserError("choose a site")
        self.iv.site_index(site)
        position = body.get("position")
        if not isinstance(position, (int, str)) or isinstance(position, bool):
            raise UserError("position must be a token index or a token: click a token of the query")
        if isinstance(position, int) and abs(position) >= 10**6 or isinstance(position, str) and len(position) > 100:
            raise UserError(f"position {str(position)[:12]}... is out of range for an input of {t['n_text']} tokens")
        resolve_position(t["tokens"], t["n_text"], position)
        ticket = _text(body, "ticket", None, none_ok=True)
        return (ticket[:100] if ticket else None), functools.partial(self.read, text, site, position, kw)

    def read(self, text: str, site: str, position, kw: dict) -> bytes:
        t = time.perf_counter()
        pre = self.iv.query(text, site=site, position=position, **kw)
        seconds = time.perf_counter() - t
        log.info(
            "read %s at %s of %r: %d samples in %.2f s", pre.site_short, pre.position, text, kw["samples"], seconds
        )
        return json.dumps(
            {"reading": reading_dict(pre), "html": render_reading(pre), "seconds": round(seconds, 3)}
        ).encode()

    def epsilon(self, body: dict) -> dict:
        """The same reading at another epsilon (``Preimage.with_epsilon``): the rule moves, nothing is sampled."""
        given = build(SamplingSettings, {"epsilon": body.get("epsilon")}, noun="field")
        check(given, noun="field")
        if given.epsilon is None:
            raise UserError("give the epsilon to read the reading at")
        eps = float(given.epsilon)
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
        given = q.get("position") or None
        position: int | None = None
        if given is not None:
            try:
                position = int(given)
            except ValueError:
                raise UserError(f"position must be a whole number, got {given[:40]!r}") from None
        store = self._store()
        rows = store.find(site=q.get("site") or None, position=position, text=q.get("text") or None, limit=201)
        return {"readings": rows[:200], "more": len(rows) > 200, "sites": list(store.sites())}

    def stored_one(self, reading_id: str) -> dict:
        store = self._store()
        if not (reading_id.isascii() and reading_id.isdigit()):  # str.isdigit() also takes '²', '①' and '١'
            raise Reject(404, f"there is no stored reading {reading_id[:40]!r}: ids are whole numbers (0-9)")
        if len(reading_id.lstrip("0")) > 19:  # beyond SQLite's integers (and int()'s digit limit past 4,300)
            raise Reject(404, f"no reading with id {reading_id[:20]}... ({len(reading_id):,} digits) in {store.path}")
        try:
            pre = store.get(int(reading_id))
            d = check_reading(reading_dict(pre))  # the page's JSON holds finite numbers only
        except UserError as e:
            raise Reject(404, str(e)) from None
        return {"reading": d, "html": render_reading(pre)}


# ---------------------------------------------------------------------------------------------- HTTP
def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return _send(json.dumps(obj).encode(), "application/json", status, headers)


def _send(data: bytes, ctype: str, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        data,
        status,
        {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})},
        media_type=ctype,
    )


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return _json({"error": message}, status, headers)


def endpoint(fn):
    """A route's handler whose refusals become a 4xx with one line of JSON (and a bug a 500 with one line)."""

    @functools.wraps(fn)
    async def handle(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.viewer)
        except Reject as e:
            return _error(e.status, e.message, e.headers)
        except UserError as e:
            return _error(400, str(e))
        except RecursionError:
            return _error(400, "the request is nested too deeply")
        except ClientDisconnect:
            return _error(400, "the client went away before its request arrived")
        except Exception as e:  # a bug: log it here, tell the page one line
            log.exception("viewer request %s %s failed", request.method, request.url.path)
            return _error(500, f"internal error ({type(e).__name__}); see the server's log")

    return handle


async def _body(request: Request, limit: int = MAX_BODY) -> dict:
    """The request's JSON object, refused unless sent as JSON, within ``limit`` bytes and in time."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        # a cross-site form or "simple" fetch cannot send this type without the browser asking first (CORS)
        raise Reject(415, "send the request body as JSON with Content-Type: application/json")
    announced = int(request.headers.get("content-length") or 0)  # h11 has checked that it is a whole number
    too_big = Reject(
        413,
        f"the request body is {f'{announced:,}' if announced > limit else f'over {limit:,}'} bytes; "
        f"at most {limit:,} are accepted" + (" (unpin some readings)" if limit == MAX_REPORT_BODY else ""),
    )
    if announced > limit:
        raise too_big
    chunks, size = [], 0
    seconds = request.app.state.viewer.limits.body_seconds
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise Reject(408, f"the request body did not arrive within {seconds:g} s", {"Connection": "close"}) from None
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise Reject(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise Reject(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise Reject(400, "the request body must be a JSON object")
    return body


async def _in_thread(request: Request, fn, *args):
    """``fn(*args)`` in the thread for big parsing and rendering, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.viewer.work, fn, *args)


async def _until_gone(receive) -> None:
    """Returns when the client has closed its connection (its body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _wait_reading(request: Request, queue: ReadingQueue, fut: Future, seconds: float) -> bytes:
    """The queued reading's result; the reading is dropped if its client goes away or it waits too long."""
    job, gone = asyncio.wrap_future(fut), asyncio.ensure_future(_until_gone(request.receive))
    try:
        done, _ = await asyncio.wait({job, gone}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        if job not in done and gone not in done and queue.cancel(fut):
            raise Reject(429, f"the reading waited {seconds:g} s in line and was dropped: try again later")
        if job not in done and gone not in done:  # it has started: it finishes soon
            done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        if job not in done:
            queue.cancel(fut)
            log.info("a reading's client went away; %s", "dropped it" if fut.cancelled() else "it runs on")
            raise ClientDisconnect()
        return job.result()
    finally:
        gone.cancel()


@endpoint
async def page(request, v):
    return _send(v.files["index.html"].read_bytes(), TYPES[".html"], headers={"Content-Security-Policy": PAGE_POLICY})


@endpoint
async def static(request, v):
    name = request.path_params["name"]
    if (path := v.files.get(name)) is None:
        raise Reject(404, f"no such file: {name[:100]}")
    return _send(path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))


@endpoint
async def info(request, v):
    return _json(v.info())


@endpoint
async def random_input(request, v):
    return _json(v.random())


@endpoint
async def tokens(request, v):
    return _json(v.tokens(_text(await _body(request), "text", "")))


@endpoint
async def query(request, v):
    ticket, job = v.query_job(await _body(request))
    fut = v.readings.submit(job, ticket)
    return _send(await _wait_reading(request, v.readings, fut, v.limits.wait_seconds), "application/json")


@endpoint
async def queue(request, v):
    return _json(v.readings.state(request.query_params.get("ticket")))


@endpoint
async def epsilon(request, v):
    return _json(await _in_thread(request, v.epsilon, await _body(request, MAX_REPORT_BODY)))


@endpoint
async def report(request, v):
    html = await _in_thread(request, v.report, await _body(request, MAX_REPORT_BODY))
    return _send(
        html.encode(),
        TYPES[".html"],
        headers={"Content-Disposition": 'attachment; filename="inversionview-report.html"'},
    )


@endpoint
async def stored(request, v):
    q: dict[str, list[str]] = {}
    for k, x in request.query_params.multi_items():
        q.setdefault(k, []).append(x)
    return _json(await _in_thread(request, v.stored, q))


@endpoint
async def stored_one(request, v):
    return _json(await _in_thread(request, v.stored_one, request.path_params["reading_id"]))


ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/static/{name}", static, methods=["GET"]),
    Route("/api/info", info, methods=["GET"]),
    Route("/api/random", random_input, methods=["GET"]),
    Route("/api/tokens", tokens, methods=["POST"]),
    Route("/api/query", query, methods=["POST"]),
    Route("/api/queue", queue, methods=["GET"]),
    Route("/api/epsilon", epsilon, methods=["POST"]),
    Route("/api/report", report, methods=["POST"]),
    Route("/api/stored", stored, methods=["GET"]),
    Route("/api/stored/{reading_id}", stored_one, methods=["GET"]),
]


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """The router's refusals (an unknown route, a wrong method) as one line of JSON."""
    path = request.url.path[:100]
    if exc.status_code == 405:
        order = ["GET", "HEAD", "POST"]
        allow = ", ".join(sorted((m.strip() for m in (exc.headers or {}).get("Allow", "").split(",")), key=order.index))
        return _error(405, f"{request.method} is not allowed on {path}: use {allow}", {"Allow": allow})
    message = f"no such page or endpoint: {path}" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, message, dict(exc.headers or {}))


class Guard:
    """The first and last look at every request. Methods other than GET, HEAD and POST are refused with 405, and a
    request addressed (``Host``) to a name this viewer does not answer to with 403 (DNS rebinding). A body that a
    refusal leaves unread is read to its end (up to :data:`DRAIN` bytes, in the body's time) before the answer
    goes out: closing a connection with unread data resets it, and the client would never hear why."""

    def __init__(self, app, names: frozenset[str], seconds: float):
        self.app, self.names, self.seconds = app, names, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rest = [int(headers.get(b"content-length", b"0")) if b"transfer-encoding" not in headers else DRAIN]

        async def read():
            msg = await receive()
            rest[0] = 0 if msg["type"] == "http.disconnect" or not msg.get("more_body") else rest[0]
            return msg

        async def answer(msg):
            if msg["type"] == "http.response.start" and 0 < rest[0] <= DRAIN and msg["status"] != 408:
                await self.drain(read, rest)
            await send(msg)

        await (self.refusal(scope, headers) or self.app)(scope, read, answer)

    def refusal(self, scope, headers) -> Response | None:
        host = headers.get(b"host", b"").decode("latin-1").strip()
        name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name.lower() not in self.names:
            return _error(403, f"this viewer answers requests for {', '.join(sorted(self.names))}, not {host[:60]!r}")
        if scope["method"] not in ("GET", "HEAD", "POST"):
            return _error(
                405,
                f"{scope['method'][:20]} is not a method this viewer answers: use GET or POST",
                {"Allow": "GET, HEAD, POST"},
            )
        return None

    async def drain(self, read, rest: list[int]) -> None:
        got = 0
        try:
            async with asyncio.timeout(self.seconds):
                while rest[0] and got <= DRAIN:
                    got += len((await read()).get("body", b""))
        except TimeoutError:
            pass


def make_app(viewer: Viewer, names: frozenset[str]) -> Guard:
    # starlette types each handler as taking any Exception, though it calls one only with its exception class
    app = Starlette(routes=ROUTES, exception_handlers={HTTPException: _http_error})  # type: ignore[dict-item]
    app.router.redirect_slashes = False  # /api/info/ is no route (a redirect would answer a typo)
    app.state.viewer = viewer
    return Guard(app, names, viewer.limits.body_seconds)


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head: a connection that sends nothing, or
    trickles its request line and headers, for ``head_seconds`` after it opened (or after the last response) is
    answered 408 (if it sent part of a head) and closed. The same deadline ends a refused body's draining."""

    head_seconds = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def _arm(self):
        self._armed_cycle, self._got, self._head = self.cycle, False, b""
        self._deadline = self.loop.call_later(self.head_seconds, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        self._got = True
        if self._head is not None:  # the next request's head, until its blank line: at most MAX_HEAD bytes
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if (end + 4 if end >= 0 else len(self._head)) > MAX_HEAD:
                return self._refuse(431, f"the request's head is over {MAX_HEAD // 1024} KiB")
            self._head = None if end >= 0 else self._head
        super().data_received(data)
        if self.cycle is not self._armed_cycle:  # a whole head arrived: the app's own limits take over
            self._deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._deadline.cancel()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()

    def connection_lost(self, exc) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        if self.transport.is_closing() or self.cycle is not self._armed_cycle:
            return
        if self._got and self.conn.our_state is h11.IDLE:
            return self._refuse(408, f"the request's head did not arrive within {self.head_seconds:g} s")
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with one line of JSON before any request reached the app, and close."""
        self._deadline.cancel()
        body = json.dumps({"error": message}).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()


class ViewerServer:
    """The viewer's server on a bound socket: :meth:`serve_forever` (in any thread; in the main thread SIGINT and
    SIGTERM stop it gracefully), :meth:`shutdown` from another thread, :meth:`server_close` when done."""

    def __init__(self, viewer: Viewer, sock: socket.socket, names: frozenset[str], allowed: tuple[str, ...] = ()):
        self.viewer, self.socket, self.names, self.allowed = viewer, sock, names, allowed
        self.server_address = sock.getsockname()
        limits = viewer.limits
        protocol = type("Protocol", (Protocol,), {"head_seconds": limits.head_seconds})
        config = Config(
            make_app(viewer, names),
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=max(1, round(limits.idle_seconds)),
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self.uvicorn = Server(config)
        self.serving, self.stopped = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        """The page's address, as the Host check accepts it: the bound address; for a wildcard (0.0.0.0, ::) the
        first ``allowed_hosts`` name, else 127.0.0.1 (every loopback name is answered)."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = self.allowed[0] if self.allowed else "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def serve_forever(self) -> None:
        self.serving.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stops :meth:`serve_forever` (running in another thread) and waits until it has returned."""
        self.uvicorn.should_exit = True
        if self.serving.is_set():
            self.stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.viewer.close()


def make_server(
    iv,
    host: str = "127.0.0.1",
    port: int = 8000,
    db: str | None = None,
    allow_remote: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    limits: Limits = Limits(),
) -> ViewerServer:
    """A viewer server for the loaded run ``iv``, listening but not serving yet (call ``serve_forever``). Port 0
    picks a free one. An address other than loopback needs ``allow_remote`` (anyone who reaches it can use the
    viewer: there is no authentication). Requests must be addressed to a loopback name, ``host`` (unless it is a
    wildcard such as 0.0.0.0) or one of ``allowed_hosts``."""
    if not 0 <= port <= 65535:
        raise UserError(f"port must be between 0 and 65535 (0 picks a free one), got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    family, _, _, _, addr = infos[0]
    loopback = all(_is_loopback(str(i[4][0])) for i in infos)  # an IPv4 or IPv6 address: its host is a str
    if not loopback and not allow_remote:
        raise UserError(
            f"--host {host} would let other machines use this viewer, which has no authentication: "
            "add --allow-remote to do so anyway (and --allowed-host NAME for the name they will use)"
        )
    names = frozenset(
        [
            *LOOPBACK,
            *(n.strip().lower() for n in allowed_hosts if n.strip()),
            *([] if host in ("0.0.0.0", "::", "") else [host.strip("[]").lower()]),
        ]
    )
    viewer = Viewer(iv, db=db, limits=limits)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        viewer.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if not loopback:
        log.warning(
            "warning: the viewer at %s:%d has no authentication: anyone who can reach it can use it; it "
            "answers requests addressed to %s",
            host,
            sock.getsockname()[1],
            ", ".join(sorted(names)),
        )
    return ViewerServer(viewer, sock, names, tuple(n.strip().lower() for n in allowed_hosts if n.strip()))


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False
