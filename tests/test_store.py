"""Stored readings (``inversionview.store``) and ``inversionview query-batch``: the full round trip, the key,
filters, refusals of foreign files, bad query lines, and real interruptions (SIGINT, SIGKILL) of a batch
running in a subprocess, resumed afterwards."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
import torch

from conftest import user_error
from inversionview.cli import main
from inversionview.errors import UserError
from inversionview.preimage import Preimage
from inversionview.run import InversionView
from inversionview.store import ReadingStore, query_batch, read_queries, reading_key, settings_of
from inversionview.tasks import get_task

SITES = ["x0.pre", "a0.1", "x1.mid"]  # the conftest run's sites


@pytest.fixture(scope="module")
def iv(run_dir):
    return InversionView.load(run_dir)


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [get_task("counting").sample(rng, "test") for _ in range(n)]


def _write_queries(path, queries) -> None:
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))


def _consistent(db) -> None:
    """SQLite's own checks, and every reading complete: as many sample rows as it says, and its sample data."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        bad = con.execute(
            "SELECT r.id FROM readings r WHERE r.n_samples != (SELECT count(*) FROM samples s WHERE "
            "s.reading_id = r.id) OR NOT EXISTS (SELECT 1 FROM sample_data d WHERE d.reading_id = r.id)"
        )
        assert bad.fetchall() == []
        dup = con.execute(
            "SELECT count(*) FROM readings GROUP BY fingerprint, text, site, position, settings HAVING count(*) > 1"
        ).fetchall()
        assert dup == []
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------- the store
def test_round_trip_is_exact(iv, tmp_path):
    pre = iv.query("vvzccvczvvvzvcvc|v:8", site="a0.1", position=":", samples=96, seed=3)
    assert pre.attention is not None and pre.annotation and pre.samples[0].delta  # every kind of field is filled
    key = reading_key(iv, "vvzccvczvvvzvcvc|v:8", "blocks.0.attn.hook_result.1", 19, samples=96, seed=3)
    assert key[1:4] == (pre.text, pre.site, pre.position) and key[4] == settings_of(pre)
    with ReadingStore(tmp_path / "r.sqlite", create=True) as store:
        assert not store.has(*key)
        rid = store.put(pre, iv.fingerprint)
        assert store.has(*key) and store.id_of(*key) == rid
        assert store.has(key[0], key[1], "a0.1", key[3], key[4])  # short name as well
        got = store.get(rid)
        assert isinstance(got, Preimage) and got == pre
        assert got.to_json() == pre.to_json()
        assert store.put(pre, iv.fingerprint) == rid and len(store) == 1  # never stored twice
    with ReadingStore(tmp_path / "r.sqlite") as store:  # reopened from the file
        assert store.get(rid) == pre
        (row,) = store.find()
    assert row["id"] == rid and row["text"] == pre.text and row["site"] == pre.site and row["site_short"] == "a0.1"
    assert row["position"] == 19 and row["token"] == ":" and row["fraction_inside"] == pre.fraction_inside
    assert row["n_samples"] == len(pre.samples) and row["n_candidates"] == 96
    assert row["n_inside"] == len(pre.inside) and row["settings"] == key[4] and row["fingerprint"] == iv.fingerprint


def test_round_trip_with_temperature_and_noise(iv, tmp_path):
    """A fixed temperature with noise and another epsilon; a non-finite distance survives."""
    pre = iv.query("abcab|a:2", site="x1.mid", position=-1, samples=40, temperature=1.5, noise=0.2, epsilon=0.3)
    pre.samples[-1].distance = float("inf")
    store = ReadingStore(tmp_path / "r.sqlite", create=True)
    rid = store.put(pre, iv.fingerprint)
    got = store.get(rid)
    assert got == pre and got.samples[-1].distance == float("inf")
    assert store.find()[0]["settings"] == {
        "samples": 40,
        "mix": [[1.5, 0.2]],
        "epsilon": 0.3,
        "metric": "euclidean",
        "seed": 0,
    }
    key = reading_key(iv, "abcab|a:2", "x1.mid", -1, samples=40, temperature=1.5, noise=0.2, epsilon=0.3)
    assert store.id_of(*key) == rid
    other = reading_key(iv, "abcab|a:2", "x1.mid", -1, samples=40, temperature=1.5, noise=0.2)  # epsilon 0.1
    assert not store.has(*other)


def test_find_filters_and_sites(iv, tmp_path):
    """The store's filters (readings of the decoder alone: the chains' record is stored as any field is, above)."""
    store = ReadingStore(tmp_path / "r.sqlite", create=True)
    texts = _texts(3)
    stored = []
    for t in texts:
        for site in reversed(SITES):
            for pos in (1, 2):
                stored.append(store.put(iv.query(t, site=site, position=pos, samples=8, chains=0), iv.fingerprint))
    assert len(store) == 18 and store.find(limit=None) == store.find(limit=100)
    assert [r["id"] for r in store.find(limit=None)] == sorted(stored)
    assert store.sites() == SITES  # forward order, whatever the order of storing
    by_short = store.find(site="a0.1")
    assert len(by_short) == 6 and {r["site_short"] for r in by_short} == {"a0.1"}
    assert store.find(site="blocks.0.attn.hook_result.1") == by_short
    rows = store.find(site="x1.mid", position=2)
    assert len(rows) == 3 and all(r["position"] == 2 for r in rows)
    sub = texts[1][2:7]
    rows = store.find(text=sub)
    assert rows and all(sub in r["text"] for r in rows)
    assert len(rows) == 6 * sum(sub in t for t in texts)
    assert len(store.find(limit=4)) == 4 and store.find(site="m0") == [] and store.find(text="no such text") == []
    assert store.decoders() == {iv.fingerprint: str(iv.run_dir)}
    for r in store.find(site="x0.pre", position=1):
        assert store.get(r["id"]).site_short == "x0.pre"


def test_a_failed_put_leaves_nothing(iv, tmp_path):
    """A reading is one transaction: when its samples cannot be written, its row is not kept either."""
    store = ReadingStore(tmp_path / "r.sqlite", create=True)
    good = iv.query("abcab|a:2", site="x0.pre", position=1, samples=8)
    store.put(good, iv.fingerprint)
    bad = iv.query("abcab|a:2", site="x0.pre", position=2, samples=8)
    bad.samples[-1].text = None  # violates samples.text NOT NULL after the reading's row is inserted
    with pytest.raises(sqlite3.IntegrityError):
        store.put(bad, "another-decoder")
    assert len(store) == 1 and store.decoders() == {iv.fingerprint: str(iv.run_dir)}
    bad.samples[-1].text = "abcab|a:2"
    assert store.put(bad, iv.fingerprint) == 2 and store.get(2) == bad  # the same connection goes on working
    _consistent(tmp_path / "r.sqlite")


def test_two_connections_store_a_key_once(iv, tmp_path):
    pre = iv.query("abcab|a:2", site="x0.pre", position=2, samples=8)
    a, b = ReadingStore(tmp_path / "r.sqlite", create=True), ReadingStore(tmp_path / "r.sqlite")
    assert a.put(pre, iv.fingerprint) == b.put(pre, iv.fingerprint)
    assert len(a) == len(b) == 1
    _consistent(tmp_path / "r.sqlite")


def test_threads_share_one_store(iv, tmp_path):
    """The viewer reads from server threads while readings are written."""
    store = ReadingStore(tmp_path / "r.sqlite", create=True)
    pres = [iv.query(t, site="a0.1", position=1, samples=8, chains=0) for t in _texts(12)]
    errors = []

    def browse():
        try:
            for _ in range(30):
                for r in store.find(site="a0.1"):
                    assert store.get(r["id"]).text == r["text"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=browse) for _ in range(3)]
    for t in threads:
        t.start()
    for p in pres:
        store.put(p, iv.fingerprint)
    for t in threads:
        t.join()
    assert errors == [] and len(store) == 12


def test_fingerprint(run_dir, iv):
    again = InversionView.load(run_dir)
    assert again.fingerprint == iv.fingerprint and len(iv.fingerprint) == 16
    with torch.no_grad():
        next(again.decoder.parameters()).add_(1e-3)
    changed = InversionView(again.spec, again.decoder, again.probed, run_dir)
    assert changed.fingerprint != iv.fingerprint


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_files_that_are_not_readings_dbs(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, not a database\n" * 200)
    with pytest.raises(UserError, match="not a readings DB .not an SQLite file"):
        ReadingStore(text)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE things (x)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="SQLite file but not a readings DB .it has tables things"):
        ReadingStore(other, create=True)
    with pytest.raises(UserError, match="no readings DB at .*query-batch"):
        ReadingStore(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    with pytest.raises(UserError, match="is a directory"):
        ReadingStore(tmp_path)
    with pytest.raises(UserError, match="directory .* does not exist"):
        ReadingStore(tmp_path / "no" / "r.sqlite", create=True)


def _edit_meta(path, sql: str) -> None:
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()


def test_refuses_another_schema_version(tmp_path):
    path = tmp_path / "r.sqlite"
    ReadingStore(path, create=True).close()
    _edit_meta(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UserError) as e:
        ReadingStore(path)
    assert re.fullmatch(
        r".* is a readings DB of schema version 99, newer than this inversionview \(.*\) reads \(1\): "
        r"upgrade inversionview to read it, or use a new --db",
        str(e.value),
    ), str(e.value)
    _edit_meta(path, "UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(
        UserError,
        match="schema version 0, but this inversionview reads version 1: use the version that wrote it, or a new --db",
    ):
        ReadingStore(path)
    _edit_meta(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    ReadingStore(path).close()
    _edit_meta(path, "INSERT INTO meta VALUES ('compression', 'zstd')")  # something this version does not know
    with pytest.raises(UserError, match=r"\(meta table\) has unknown field 'compression'"):
        ReadingStore(path)


def test_get_unknown_id(tmp_path):
    with pytest.raises(UserError, match=r"no reading with id 7 in .* \(0 readings stored\)"):
        ReadingStore(tmp_path / "r.sqlite", create=True).get(7)
    with pytest.raises(UserError, match=r"no reading with id of 16,610 bits \(beyond SQLite's integers\)"):
        ReadingStore(tmp_path / "r.sqlite").get(10**5000)  # str() of it would pass int's digit limit


CORRUPTIONS = [  # (SQL run on reading 1, what the one-line refusal says)
    ("UPDATE readings SET body = '{\"text\": ' WHERE id = 1", "Expecting value"),
    ("UPDATE readings SET body = '[1, 2]' WHERE id = 1", "its body is not a JSON object"),
    ("UPDATE sample_data SET data = x'00ff' WHERE reading_id = 1", "Error -3 while decompressing"),
    ("DELETE FROM sample_data WHERE reading_id = 1", "its sample data does not match"),
    ("DELETE FROM samples WHERE reading_id = 1 AND rank = 0", "its sample data does not match"),
    ("UPDATE samples SET count = -5 WHERE reading_id = 1 AND rank = 0", "samples[0].count must be a whole number"),
    ("UPDATE samples SET position = 999 WHERE reading_id = 1 AND rank = 1", "samples[1].position must be a token"),
    ("UPDATE samples SET text = x'41' WHERE reading_id = 1 AND rank = 0", "samples[0].text must be a string"),
    ("UPDATE readings SET body = json_set(body, '$.chains', json('[1]')) WHERE id = 1", "chains must be an object"),
]


@pytest.mark.parametrize("sql, words", CORRUPTIONS)
def test_a_corrupt_row_is_one_line_naming_the_reading(iv, tmp_path, sql, words):
    """A row edited or damaged by hand (#30): a UserError naming the reading and what is wrong, not a traceback."""
    pre = iv.query("abcab|a:2", site="x1.mid", position=-1, samples=16)
    with ReadingStore(tmp_path / "r.sqlite", create=True) as store:
        rid = store.put(pre, iv.fingerprint)
        assert rid == 1 and store.get(rid) == pre
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        db.execute(sql)
    with ReadingStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(UserError) as e:
            store.get(1)
    msg = str(e.value)
    assert msg.startswith(f"reading 1 in {tmp_path / 'r.sqlite'} is corrupt (") and "\n" not in msg, msg
    assert words in msg and msg.endswith("read the query again into a new --db"), msg


def test_cli_refuses_foreign_db_and_another_decoder(iv, run_dir, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    _write_queries(queries, [{"text": "abcab|a:2", "site": "a0.1", "position": 1}])
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(4096))
    assert "is not a readings DB" in user_error(capsys, "query-batch", run_dir, queries, "--db", junk, "--samples", 8)
    db = tmp_path / "r.sqlite"
    with ReadingStore(db, create=True) as store:  # a reading of some other decoder
        store.put(iv.query("abcab|a:2", site="a0.1", position=2, samples=8), "0123456789abcdef")
    err = user_error(capsys, "query-batch", run_dir, queries, "--db", db, "--samples", 8)
    assert "holds readings of another decoder (fingerprint 0123456789abcdef" in err and "another --db" in err
    assert len(ReadingStore(db)) == 1


BAD_LINES = [
    ('{"text": "abcab|a:2", "site": "a0.1"', "is not valid JSON"),
    ('["abcab|a:2", "a0.1", 1]', "is a JSON list, not an object"),
    ('{"text": "abcab|a:2", "site": "a0.1"}', "has no 'position'"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 1, "temp": 1}', "unknown field 'temp'"),
    ('{"text": "abcab|a:2", "site": "a7.0", "position": 1}', "unknown site 'a7.0'"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 30}', "position 30 is out of range"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 1.5}', "position must be an integer or a token"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 1, "samples": 0}', "samples must be between 1"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 1, "noise": 0.1}', "noise applies to one sampling temperature"),
    ('{"text": "abcab|a:2", "site": "a0.1", "position": 1, "seed": "x"}', "field 'seed' must be an int, got 'x'"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m.replace(" ", "-")[:24] for _, m in BAD_LINES])
def test_bad_line_stops_with_its_number_and_keeps_earlier_readings(run_dir, tmp_path, capsys, line, message):
    queries, db = tmp_path / "q.jsonl", tmp_path / "r.sqlite"
    good = [{"text": t, "site": "x0.pre", "position": 1} for t in _texts(2)]
    _write_queries(queries, good)
    assert main(["query-batch", str(run_dir), str(queries), "--db", str(db), "--samples", "8"]) == 0
    capsys.readouterr()
    queries.write_text(queries.read_text() + "\n" + line + "\n")  # line 3 is blank, the bad line is line 4
    err = user_error(capsys, "query-batch", run_dir, queries, "--db", db, "--samples", 8)
    assert "q.jsonl line 4" in err and message in err, err
    with ReadingStore(db) as store:
        assert len(store) == 2 and {r["text"] for r in store.find()} == {q["text"] for q in good}
    _consistent(db)


def test_empty_or_missing_queries_file(iv, tmp_path):
    (tmp_path / "q.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no queries"):
        read_queries(tmp_path / "q.jsonl", iv)
    with pytest.raises(UserError, match="does not exist"):
        read_queries(tmp_path / "none.jsonl", iv)


# ---------------------------------------------------------------------------------------------- batches
def test_batch_resumes_and_skips(iv, tmp_path, caplog):
    texts = _texts(4, seed=1)
    qs = [{"text": t, "site": s, "position": p} for t in texts[:2] for s, p in (("a0.1", 1), ("x1.mid", -1))]
    qs.append({**qs[0], "samples": 12, "temperature": 0.7, "seed": 5})  # per-line settings: another key
    qs.append(dict(qs[1]))  # a repeated line
    path = tmp_path / "q.jsonl"
    _write_queries(path, qs)
    store = ReadingStore(tmp_path / "r.sqlite", create=True)
    with caplog.at_level("INFO", logger="inversionview.store"):
        s = query_batch(iv, store, read_queries(path, iv, samples=16), progress=False)
    assert (s.queries, s.read, s.skipped, s.stored) == (6, 5, 1, 5)
    assert "6 queries: 0 already stored, 1 repeat an earlier line, 5 to read" in caplog.text
    assert "read 5, skipped 1 already stored" in caplog.text
    assert {r["settings"]["samples"] for r in store.find()} == {16, 12}
    (own,) = [r for r in store.find() if r["settings"]["samples"] == 12]
    assert own["settings"]["mix"] == [[0.7, 0.0]] and own["settings"]["seed"] == 5
    # the stored reading is the one the query gives
    assert store.get(own["id"]) == iv.query(qs[0]["text"], "a0.1", 1, samples=12, temperature=0.7, seed=5)

    _write_queries(path, qs + [{"text": texts[3], "site": "x0.pre", "position": ":"}])
    s = query_batch(iv, store, read_queries(path, iv, samples=16), progress=False)
    assert (s.read, s.skipped, s.stored) == (1, 6, 6)
    s = query_batch(iv, store, read_queries(path, iv, samples=16), progress=False)
    assert (s.read, s.skipped, s.stored) == (0, 7, 6)
    s = query_batch(iv, store, read_queries(path, iv, samples=20), progress=False)  # other settings: read again
    assert (s.read, s.stored) == (5, 11)
    _consistent(tmp_path / "r.sqlite")


# The real `inversionview query-batch`, in a child process whose readings DB holds the transaction of its n-th new
# reading open just before COMMIT: it says so on stdout and waits there until a signal stops it. So the test
# signals a batch that is certainly in the middle of writing (no race with the batch finishing first, however
# loaded the machine), and knows exactly how many readings it had committed.
HOLD_AT_COMMIT = """
import sys, time
import inversionview.store as store
from inversionview.cli import main

n = int(sys.argv[1])


class Held:
    def __init__(self, db):
        self.db, self.commits = db, 0

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.commits += 1
            if self.commits == n:
                print("holding", flush=True)
                while True:
                    time.sleep(1)
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


opened = store.ReadingStore.__init__


def init(self, *args, **kw):
    opened(self, *args, **kw)
    self._db = Held(self._db)


store.ReadingStore.__init__ = init
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_interrupted_batch_resumes_without_loss_or_duplicates(iv, run_dir, tmp_path, caplog):
    """query-batch in a subprocess, stopped with SIGINT and then SIGKILL while it writes its third new reading,
    then resumed."""
    texts = _texts(12, seed=2)
    qs = [{"text": t, "site": SITES[i % 3], "position": 1 + i % 4} for i, t in enumerate(texts)]
    queries, db = tmp_path / "q.jsonl", tmp_path / "r.sqlite"
    _write_queries(queries, qs)
    ReadingStore(db, create=True).close()
    args = ["query-batch", str(run_dir), str(queries), "--db", str(db), "--samples", "24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    counts = []
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_AT_COMMIT, "3", *args],
            env=env,
            # a background shell starts pytest with SIGINT ignored, and a child would inherit that and never stop
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()  # the third new reading is being committed
        assert line == "holding\n", (line, proc.communicate())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
            assert "run the same command again" in err
        else:
            assert proc.returncode == -signal.SIGKILL
        _consistent(db)
        counts.append(len(ReadingStore(db)))
    assert counts == [2, 4]  # each stop kept the readings it had committed, and lost the one it was writing

    with caplog.at_level("INFO", logger="inversionview.store"):
        assert main(args) == 0
    assert f"{len(qs)} queries: 4 already stored, 0 repeat an earlier line" in caplog.text
    _consistent(db)
    store = ReadingStore(db)
    assert len(store) == len(qs)
    for q in qs:
        assert store.has(*reading_key(iv, q["text"], q["site"], q["position"], samples=24))
    # a reading written by the killed process is whole and equals the same query read here
    first = store.find(limit=1)[0]
    assert store.get(first["id"]) == iv.query(first["text"], first["site"], first["position"], samples=24)


@pytest.mark.slow
def test_query_batch_on_the_shipped_model(tmp_path, caplog):
    queries, db = tmp_path / "q.jsonl", tmp_path / "r.sqlite"
    _write_queries(
        queries,
        [
            {"text": "vvzccvczvvvzvcvc|v:8", "site": "a1.0", "position": ":"},
            {"text": "vvzccvczvvvzvcvc|v:8", "site": "blocks.0.hook_resid_post", "position": 18},
        ],
    )
    with caplog.at_level("INFO", logger="inversionview.store"):
        rc = main(["query-batch", "shipped:counting", str(queries), "--db", str(db), "--samples", "256"])
    assert rc == 0 and "read 2, skipped 0 already stored" in caplog.text
    iv = InversionView.load("shipped:counting")
    store = ReadingStore(db)
    assert store.sites() == ["x0.post", "a1.0"]
    (row,) = store.find(site="a1.0")
    assert store.get(row["id"]) == iv.query("vvzccvczvvvzvcvc|v:8", "a1.0", ":", samples=256)
