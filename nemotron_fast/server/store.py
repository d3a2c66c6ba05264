"""The durable request store: the queue, statuses, logs, results, leases and pending webhook deliveries.

``Store`` holds every rule once, in SQL both backends run; ``RequestStore`` is the embedded SQLite backend (one
process per data dir, the default) and ``store_pg.PostgresStore`` the shared one (any number of API and worker
processes on any hosts). ``open_store(url)`` picks one from ``sqlite:///path`` or ``postgresql://...``.

Every state change is one transaction, so a ``kill -9`` at any point leaves either the old or the new state.
A claim records the worker and a lease (``lease_owner``, one token per claim); the worker renews it while it
runs the request. On SQLite the process is the only worker, so a restart puts every running request back
(``recover``); on PostgreSQL a lease that was not renewed for ``lease_ttl`` seconds expires and the request is
queued again. Either way an attempt is counted and a request interrupted ``max_attempts`` times is failed, so a
request that kills its worker cannot loop forever. A result, its status and its webhook are written in one
transaction, once: ``finish`` of a request that is already done, or whose claim is no longer the caller's,
writes nothing.

Request states: ``queued`` -> ``running`` -> ``done`` (a cancel of a queued request goes straight to ``done``).
The wire statuses IN_QUEUE / IN_PROGRESS / COMPLETED map one to one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Store", "RequestStore", "RequestRow", "Outcome", "WIRE_STATUS", "webhook_payload", "cancelled_outcome",
           "open_store", "parse_store_url"]

WIRE_STATUS = {"queued": "IN_QUEUE", "running": "IN_PROGRESS", "done": "COMPLETED"}

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    input TEXT NOT NULL,
    webhook_url TEXT,
    created_at REAL NOT NULL,
    start_deadline REAL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    body TEXT,
    error TEXT,
    error_type TEXT,
    inference_time REAL
);
CREATE INDEX IF NOT EXISTS requests_queue ON requests(state, priority, seq);
CREATE INDEX IF NOT EXISTS requests_finished ON requests(state, finished_at);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_request ON logs(request_id, id);
CREATE TABLE IF NOT EXISTS webhooks (
    request_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(state, next_at);
"""

# Version 2: leases (worker, claim token, expiry), the cancel flag and partial output in the row, webhook claims.
_SQLITE_V2 = [
    "ALTER TABLE requests ADD COLUMN worker_id TEXT",
    "ALTER TABLE requests ADD COLUMN lease_owner TEXT",
    "ALTER TABLE requests ADD COLUMN lease_until REAL",
    "ALTER TABLE requests ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE requests ADD COLUMN partial TEXT",
    "ALTER TABLE webhooks ADD COLUMN lease_until REAL",
]
SQLITE_SCHEMA_VERSION = 2

_ROW_COLUMNS = ("id, seq, kind, state, priority, input, webhook_url, created_at, started_at, finished_at, attempts, "
                "status_code, body, error, error_type, inference_time, worker_id, lease_owner")


@dataclass(frozen=True)
class RequestRow:
    """One request as stored; ``body`` is the JSON text of the result (success or error). ``lease_owner`` is the
    token of the current claim (``None`` unless running): ``finish`` and ``requeue`` take it back."""

    id: str
    seq: int
    kind: str
    state: str
    priority: int
    input: dict[str, Any]
    webhook_url: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    status_code: int | None
    body: str | None
    error: str | None
    error_type: str | None
    inference_time: float | None
    worker_id: str | None = None
    lease_owner: str | None = None

    @property
    def wire_status(self) -> str:
        return WIRE_STATUS[self.state]


@dataclass(frozen=True)
class Outcome:
    """How a request ended: the HTTP status and JSON body its result endpoint returns."""

    status_code: int
    body: Any
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


class Tx:
    """One open transaction: ``execute`` (``?`` placeholders, rows readable by column name) and ``note``, a change
    other threads and processes hear about once the transaction commits."""

    def __init__(self, execute: Callable[[str, tuple[Any, ...]], Any]) -> None:
        self._execute = execute
        self.notes: list[tuple[str, str]] = []

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._execute(sql, params)

    def note(self, kind: str, request_id: str = "") -> None:
        """``"s"``: the request's status, logs or output changed; ``"q"``: the queue changed; ``"c"``: a cancel of
        the running request was asked for."""
        self.notes.append((kind, request_id))


class Store:
    """The store's rules over an abstract connection; subclasses provide ``_tx``, ``_read`` and ``close``.

    ``shared`` is true when other processes use the same database (leases expire, secrets live in the database);
    ``lease_ttl`` is how long a claim lasts without renewal (``None``: never expires, the process is the only
    worker); ``idle_wait`` is how long an idle worker waits for a queue change before it looks again.
    """

    shared = False
    _lock_rows = ""  # SQL suffix that locks selected rows (PostgreSQL: FOR UPDATE)
    _skip_locked = ""  # ... and skips rows other transactions locked (PostgreSQL: FOR UPDATE SKIP LOCKED)

    def __init__(self, *, max_attempts: int = 3, lease_ttl: float | None = None, webhook_lease: float = 60.0,
                 idle_wait: float = 0.5) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if lease_ttl is not None and lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0 seconds, got {lease_ttl}")
        self.max_attempts = max_attempts
        self.lease_ttl = lease_ttl
        self.webhook_lease = webhook_lease
        self.idle_wait = idle_wait
        self._versions: dict[str, int] = {}
        self._epoch = 0
        self._partials: dict[str, str] = {}
        self._cancels: set[str] = set()
        self._queue_changed = threading.Event()

    # --- backend hooks ---------------------------------------------------------------------------------------
    def _tx(self, *, durable: bool = True) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Tx]:
        """A connection for reads outside a write transaction."""
        raise NotImplementedError

    def _lease_clock(self, db: Tx) -> float:
        """The clock leases are measured on (one clock for every process that shares the database)."""
        return time.time()

    def close(self) -> None:
        raise NotImplementedError

    def _apply(self, notes: list[tuple[str, str]]) -> None:
        """Apply committed changes to this process's in-memory state (versions, cancels, wake-ups)."""
        for kind, request_id in notes:
            if kind == "q":
                self._queue_changed.set()
                continue
            if kind == "c":
                self._cancels.add(request_id)
            self._touch(request_id)

    def _touch(self, request_id: str) -> None:
        self._versions[request_id] = self._versions.get(request_id, 0) + 1
        if len(self._versions) > 100_000:  # other processes' requests too: forget the oldest (reads then refresh)
            for key in list(self._versions)[:10_000]:
                self._versions.pop(key, None)

    def version(self, request_id: str) -> int:
        """A counter that changes whenever the request's status, logs or partial output change."""
        return self._versions.get(request_id, 0) + self._epoch

    @property
    def queue_changed(self) -> threading.Event:
        """Set when a request is queued (the worker waits on it)."""
        return self._queue_changed

    # --- lifecycle -------------------------------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """Startup of the only worker: requeue what was running when the process died; fail sync requests
        nobody waits for any more. Returns ``(requeued, failed)``."""
        now = time.time()
        requeued = failed = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, kind, attempts FROM requests WHERE state IN ('running', 'queued')"
                              ).fetchall()
            for row in rows:
                if row["kind"] != "queue":
                    outcome = Outcome(503, {"detail": "The server restarted before this request finished"},
                                      "Server restarted", "runner_disconnected")
                elif row["attempts"] >= self.max_attempts:
                    outcome = _crashed_outcome(row["attempts"], "server crash")
                else:
                    continue
                self._finish_locked(db, row["id"], outcome, now, None)
                failed += 1
            cur = db.execute("UPDATE requests SET state = 'queued', started_at = NULL, worker_id = NULL, "
                             "lease_owner = NULL, lease_until = NULL, partial = NULL WHERE state = 'running'")
            requeued = cur.rowcount
            for row in db.execute("SELECT id FROM requests WHERE state = 'queued'").fetchall():
                self._log_locked(db, row["id"], "WARN", "Server restarted; the request is queued again", now)
            db.execute("UPDATE webhooks SET lease_until = NULL WHERE state = 'pending'")
            if requeued:
                db.note("q")
        return requeued, failed

    def expire_leases(self) -> tuple[int, int]:
        """Requeue running requests whose lease expired (their worker died or lost the database); fail those
        interrupted ``max_attempts`` times. Returns ``(requeued, failed)``; a no-op without ``lease_ttl``."""
        if self.lease_ttl is None:
            return 0, 0
        with self._tx() as db:
            return self._expire_locked(db, time.time())

    def _expire_locked(self, db: Tx, now: float) -> tuple[int, int]:
        rows = db.execute("SELECT id, attempts, worker_id FROM requests WHERE state = 'running' AND lease_until < ?"
                          + self._skip_locked, (self._lease_clock(db),)).fetchall()
        requeued = failed = 0
        for row in rows:
            if row["attempts"] >= self.max_attempts:
                self._finish_locked(db, row["id"], _crashed_outcome(row["attempts"], "lost worker"), now, None)
                failed += 1
                continue
            db.execute("UPDATE requests SET state = 'queued', started_at = NULL, worker_id = NULL, lease_owner = NULL,"
                       " lease_until = NULL, partial = NULL WHERE id = ?", (row["id"],))
            self._log_locked(db, row["id"], "WARN", f"Worker {row['worker_id']} stopped renewing its lease; the "
                                                    "request is queued again", now)
            db.note("s", row["id"])
            requeued += 1
        if requeued:
            db.note("q")
        return requeued, failed

    def submit(self, inputs: dict[str, Any], *, kind: str = "queue", webhook_url: str | None = None,
               priority: int = 0, start_timeout: float | None = None,
               outcome: Outcome | None = None) -> tuple[str, int]:
        """Queue a request; returns ``(request_id, queue_position)``. With ``outcome`` (an input refused at the
        door) the request is completed with it in the same transaction, webhook included, and never runs."""
        request_id = str(uuid.uuid4())
        now = time.time()
        deadline = now + start_timeout if start_timeout else None
        with self._tx() as db:
            db.execute(
                "INSERT INTO requests (id, kind, state, priority, input, webhook_url, created_at, start_deadline)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (request_id, kind, priority, json.dumps(inputs), webhook_url, now, deadline),
            )
            position = self._position_locked(db, request_id)
            db.note("s", request_id)
            if outcome is not None:
                self._finish_locked(db, request_id, outcome, now, None)
            else:
                db.note("q")
        return request_id, position

    def claim_batch(self, max_batch: int, *, worker_id: str = "local") -> list[RequestRow]:
        """Move up to ``max_batch`` queued requests to running for ``worker_id``, oldest first (priority first),
        each with a fresh lease (expired leases are taken back first).

        A streamed request runs alone (it needs per-block progress); requests whose start timeout passed are
        completed with a 504 instead of being claimed.
        """
        now = time.time()
        # Cleared before the read: a submit committed after the read sets it again, so no wake-up is lost.
        self._queue_changed.clear()
        with self._tx() as db:
            if self.lease_ttl is not None:
                # Same transaction, same time stamp: a request taken back here may be claimed again at once
                # (it is then never seen queued).
                self._expire_locked(db, now)
            lease_until = self._lease_clock(db) + self.lease_ttl if self.lease_ttl is not None else None
            rows = db.execute(f"SELECT id, kind, start_deadline FROM requests WHERE state = 'queued' "
                              f"ORDER BY priority, seq LIMIT ?{self._skip_locked}", (max_batch * 4,)).fetchall()
            chosen: list[str] = []
            for row in rows:
                if row["start_deadline"] is not None and row["start_deadline"] < now:
                    self._finish_locked(db, row["id"], Outcome(
                        504, {"detail": "Request timed out", "error_type": "request_timeout"},
                        "Request timed out before it started", "request_timeout"), now, None)
                    continue
                if row["kind"] == "stream":
                    if not chosen:
                        chosen.append(row["id"])
                    break
                chosen.append(row["id"])
                if len(chosen) >= max_batch:
                    break
            for request_id in chosen:
                db.execute("UPDATE requests SET state = 'running', started_at = ?, attempts = attempts + 1, "
                           "worker_id = ?, lease_owner = ?, lease_until = ?, cancel_requested = 0 WHERE id = ?",
                           (now, worker_id, uuid.uuid4().hex, lease_until, request_id))
                self._log_locked(db, request_id, "INFO", f"Started (batch of {len(chosen)})", now)
                db.note("s", request_id)
            if len(rows) > len(chosen):
                db.note("q")  # rows this claim locked but left: another idle worker may take them
        return [row for row in map(self.get, chosen) if row is not None]

    def renew_leases(self, held: dict[str, str]) -> set[str]:
        """Extend the leases of ``{request_id: lease_owner}``; returns the ids still held (a lost one was
        expired and claimed again, or finished by someone else: its worker must stop and write nothing)."""
        if not held or self.lease_ttl is None:
            return set(held)
        kept: set[str] = set()
        with self._tx(durable=False) as db:
            until = self._lease_clock(db) + self.lease_ttl
            for request_id, owner in held.items():
                cur = db.execute("UPDATE requests SET lease_until = ? WHERE id = ? AND lease_owner = ? AND "
                                 "state = 'running'", (until, request_id, owner))
                if cur.rowcount:
                    kept.add(request_id)
            # Cancels asked for while this process missed the notification (a reconnect): the flag is the truth.
            for request_id in kept:
                row = db.execute("SELECT cancel_requested FROM requests WHERE id = ?", (request_id,)).fetchone()
                if row is not None and row["cancel_requested"]:
                    self._cancels.add(request_id)
        return kept

    def requeue(self, request_id: str, owner: str | None = None) -> None:
        """Put a running request back in the queue (its worker shutting down mid-generation); no attempt counted.
        With ``owner``, only while that claim still holds it."""
        with self._tx() as db:
            cur = db.execute("UPDATE requests SET state = 'queued', started_at = NULL, worker_id = NULL, "
                             "lease_owner = NULL, lease_until = NULL, partial = NULL, "
                             "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
                             "WHERE id = ? AND state = 'running'" + (" AND lease_owner = ?" if owner else ""),
                             (request_id, owner) if owner else (request_id,))
            if cur.rowcount:
                db.note("s", request_id)
                db.note("q")
        self._partials.pop(request_id, None)

    def finish(self, request_id: str, outcome: Outcome, *, inference_time: float | None = None,
               owner: str | None = None) -> bool:
        """Store the result and, in the same transaction, the webhook delivery (if the request asked for one).

        Returns ``False`` (and writes nothing) when the request is already done or, with ``owner``, when that
        claim no longer holds it.
        """
        with self._tx() as db:
            written = self._finish_locked(db, request_id, outcome, time.time(), inference_time, owner)
        self._partials.pop(request_id, None)
        self._cancels.discard(request_id)
        return written

    def _finish_locked(self, db: Tx, request_id: str, outcome: Outcome, now: float, inference_time: float | None,
                       owner: str | None = None) -> bool:
        cur = db.execute(
            "UPDATE requests SET state = 'done', finished_at = ?, status_code = ?, body = ?, error = ?, "
            "error_type = ?, inference_time = ?, lease_owner = NULL, lease_until = NULL, partial = NULL "
            "WHERE id = ? AND state != 'done'" + (" AND lease_owner = ?" if owner else ""),
            (now, outcome.status_code, json.dumps(outcome.body, default=str), outcome.error, outcome.error_type,
             inference_time, request_id) + ((owner,) if owner else ()),
        )
        if not cur.rowcount:
            return False
        level = "INFO" if outcome.ok else "ERROR"
        message = "Completed" if outcome.ok else f"Failed: {outcome.error or outcome.status_code}"
        self._log_locked(db, request_id, level, message, now)
        row = db.execute("SELECT webhook_url FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is not None and row["webhook_url"]:
            db.execute("INSERT INTO webhooks (request_id, url, body, attempts, next_at, state) "
                       "VALUES (?, ?, ?, 0, ?, 'pending') ON CONFLICT (request_id) DO NOTHING",
                       (request_id, row["webhook_url"], webhook_payload(request_id, outcome), now))
        db.note("s", request_id)
        return True

    # --- cancel ----------------------------------------------------------------------------------------------
    def cancel(self, request_id: str) -> str:
        """Cancel: ``"cancelled"`` (was queued, will never run), ``"requested"`` (running, stops at the next
        block), ``"already_completed"`` or ``"not_found"``."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM requests WHERE id = ?" + self._lock_rows, (request_id,)).fetchone()
            if row is None:
                return "not_found"
            if row["state"] == "done":
                return "already_completed"
            if row["state"] == "queued":
                self._finish_locked(db, request_id, cancelled_outcome(), time.time(), None)
                return "cancelled"
            self._log_locked(db, request_id, "WARN", "Cancellation requested", time.time())
            db.execute("UPDATE requests SET cancel_requested = 1 WHERE id = ?", (request_id,))
            db.note("c", request_id)
        return "requested"

    def cancel_requested(self, request_id: str) -> bool:
        """Cheap check the worker polls after every block (no database access)."""
        return request_id in self._cancels

    # --- reads -----------------------------------------------------------------------------------------------
    def get(self, request_id: str) -> RequestRow | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_ROW_COLUMNS} FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        data = {key: row[key] for key in _ROW_COLUMNS.split(", ")}
        data["input"] = json.loads(data["input"])
        return RequestRow(**data)

    def queue_position(self, request_id: str) -> int:
        with self._read() as db:
            return self._position_locked(db, request_id)

    def _position_locked(self, db: Tx, request_id: str) -> int:
        row = db.execute(
            "SELECT COUNT(*) AS n FROM requests r, requests me WHERE me.id = ? AND r.state = 'queued' AND "
            "(r.priority < me.priority OR (r.priority = me.priority AND r.seq < me.seq))", (request_id,)
        ).fetchone()
        return int(row["n"])

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM requests GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    # --- logs and partial output -----------------------------------------------------------------------------
    def log(self, request_id: str, level: str, message: str) -> None:
        """Append a log line (not synced to disk on its own; the next durable commit carries it)."""
        with self._tx(durable=False) as db:
            self._log_locked(db, request_id, level, message, time.time())
            db.note("s", request_id)

    def _log_locked(self, db: Tx, request_id: str, level: str, message: str, now: float) -> None:
        db.execute("INSERT INTO logs (request_id, ts, level, message) VALUES (?, ?, ?, ?)",
                   (request_id, now, level, message))

    def logs(self, request_id: str, after_id: int = 0) -> list[tuple[int, float, str, str]]:
        """``(log_id, unix_time, level, message)`` of the request's logs with id > ``after_id``, in order."""
        with self._read() as db:
            rows = db.execute("SELECT id, ts, level, message FROM logs WHERE request_id = ? AND id > ? "
                              "ORDER BY id", (request_id, after_id)).fetchall()
        return [(int(r["id"]), r["ts"], r["level"], r["message"]) for r in rows]

    def set_partial(self, request_id: str, text: str) -> None:
        """The output so far of a running request (memory only here: live connections reach this process)."""
        self._partials[request_id] = text
        self._touch(request_id)

    def partial(self, request_id: str) -> str | None:
        return self._partials.get(request_id)

    # --- shared settings -------------------------------------------------------------------------------------
    def setting(self, name: str, make: Callable[[], bytes]) -> bytes:
        """A value every process sharing the database agrees on, created by ``make()`` on first use."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared settings")

    # --- webhooks --------------------------------------------------------------------------------------------
    def due_webhooks(self, limit: int = 16) -> list[tuple[str, str, bytes, int]]:
        """Claim pending deliveries whose time has come: ``(request_id, url, body, attempts)``. A claim lasts
        ``webhook_lease`` seconds; a delivery whose deliverer died is claimed again after it."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT request_id, url, body, attempts FROM webhooks WHERE state = 'pending' AND "
                              "next_at <= ? AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_at LIMIT ?"
                              + self._skip_locked, (now, now, limit)).fetchall()
            for r in rows:
                db.execute("UPDATE webhooks SET lease_until = ? WHERE request_id = ?",
                           (now + self.webhook_lease, r["request_id"]))
        return [(r["request_id"], r["url"], bytes(r["body"]), int(r["attempts"])) for r in rows]

    def webhook_result(self, request_id: str, *, delivered: bool, error: str | None = None,
                       retry_in: float | None = None) -> None:
        """Record a delivery attempt: delivered, retried after ``retry_in`` seconds, or given up (no retry)."""
        state = "delivered" if delivered else ("pending" if retry_in is not None else "failed")
        with self._tx() as db:
            db.execute("UPDATE webhooks SET attempts = attempts + 1, state = ?, last_error = ?, next_at = ?, "
                       "lease_until = NULL WHERE request_id = ? AND state = 'pending'",
                       (state, error, time.time() + (retry_in or 0.0), request_id))

    def webhook_state(self, request_id: str) -> tuple[str, int] | None:
        with self._read() as db:
            row = db.execute("SELECT state, attempts FROM webhooks WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else (row["state"], int(row["attempts"]))

    # --- retention -------------------------------------------------------------------------------------------
    def purge(self, ttl: float) -> int:
        """Delete completed requests (with logs and finished webhooks) older than ``ttl`` seconds."""
        cutoff = time.time() - ttl
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM requests WHERE state = 'done' AND finished_at < ?"
                                               + self._skip_locked, (cutoff,)).fetchall()]
            for request_id in ids:
                db.execute("DELETE FROM logs WHERE request_id = ?", (request_id,))
                db.execute("DELETE FROM webhooks WHERE request_id = ? AND state != 'pending'", (request_id,))
                db.execute("DELETE FROM requests WHERE id = ?", (request_id,))
        for request_id in ids:
            self._versions.pop(request_id, None)
            self._cancels.discard(request_id)
        return len(ids)


class RequestStore(Store):
    """The SQLite backend: one connection, one lock, short transactions; one process per database file."""

    def __init__(self, path: str | Path, *, max_attempts: int = 3) -> None:
        super().__init__(max_attempts=max_attempts)
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut too, not only a killed process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SQLITE_SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {version}; this nemotron-fast knows up to "
                               f"{SQLITE_SCHEMA_VERSION} (upgrade it)")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # one statement at a time: executescript would commit on its own
                for statement in filter(str.strip, _SCHEMA_V1.split(";")):
                    self._db.execute(statement)
                if version < 2:
                    for statement in _SQLITE_V2:
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[Tx]:
        """One transaction. ``durable=False`` skips the fsync (progress logs written after every block): the
        next durable commit syncs the WAL, earlier frames included, and a killed process loses nothing either
        way; only a power cut could drop such lines."""
        tx = Tx(self._db.execute)
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
        self._apply(tx.notes)

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._lock:
            yield Tx(self._db.execute)


def _crashed_outcome(attempts: int, cause: str) -> Outcome:
    return Outcome(500, {"detail": f"The request was interrupted {attempts} times by a {cause} and is not retried "
                                   "again", "error_type": "internal_error"},
                   "Request crashed the server repeatedly", "internal_error")


def webhook_payload(request_id: str, outcome: Outcome) -> bytes:
    """The webhook body of spec section 6 (``payload_error`` when the output is not JSON-serialisable)."""
    doc: dict[str, Any] = {"request_id": request_id, "gateway_request_id": request_id,
                           "status": "OK" if outcome.ok else "ERROR",
                           "error": None if outcome.ok else f"Invalid status code: {outcome.status_code}"}
    try:
        doc["payload"] = json.loads(json.dumps(outcome.body))
    except (TypeError, ValueError) as exc:
        doc["payload"], doc["payload_error"] = None, str(exc)
    return json.dumps(doc).encode()


def cancelled_outcome() -> Outcome:
    """What a cancelled request reports: COMPLETED with an error, and a 400 from its result endpoint."""
    return Outcome(400, {"detail": "Request was cancelled", "error_type": "request_cancelled"},
                   "Request was cancelled", "request_cancelled")


def parse_store_url(url: str) -> tuple[str, str]:
    """``("sqlite", path)`` for ``sqlite:///path`` (``sqlite:////abs`` or ``sqlite:///rel``), or
    ``("postgresql", url)`` for ``postgresql://`` / ``postgres://`` URLs; anything else is a ``ValueError``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        if not urlsplit(url).netloc and "host=" not in url:
            raise ValueError(f"store URL {url!r} names no host (postgresql://user@host:port/dbname)")
        return "postgresql", url
    if scheme == "sqlite":
        if not url.lower().startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise ValueError(f"store URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path")
        return "sqlite", unquote(url[len("sqlite:///"):])
    raise ValueError(f"store URL {url!r}: expected sqlite:///path or postgresql://user@host:port/dbname")


def open_store(url: str, *, max_attempts: int = 3, lease_ttl: float = 30.0) -> Store:
    """The store a URL names; ``lease_ttl`` applies to the shared (PostgreSQL) backend."""
    kind, target = parse_store_url(url)
    if kind == "sqlite":
        return RequestStore(target, max_attempts=max_attempts)
    from .store_pg import PostgresStore

    return PostgresStore(target, max_attempts=max_attempts, lease_ttl=lease_ttl)
