"""Durable request store on SQLite: the queue, statuses, logs, results and pending webhook deliveries.

Every state change is one transaction, so a ``kill -9`` at any point leaves either the old or the new state:
queued requests stay queued, a request that was running is put back in the queue at the next start (and failed
after ``max_attempts`` starts, so a request that crashes the process cannot loop forever), and a result and its
webhook are written together. Partial outputs of streamed requests and the per-request change counters live in
memory only: they serve live connections, which do not survive a restart anyway.

Request states: ``queued`` -> ``running`` -> ``done`` (a cancel of a queued request goes straight to ``done``).
The wire statuses IN_QUEUE / IN_PROGRESS / COMPLETED map one to one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RequestStore", "RequestRow", "Outcome", "WIRE_STATUS", "webhook_payload", "cancelled_outcome"]

WIRE_STATUS = {"queued": "IN_QUEUE", "running": "IN_PROGRESS", "done": "COMPLETED"}

_SCHEMA = """
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


@dataclass(frozen=True)
class RequestRow:
    """One request as stored; ``body`` is the JSON text of the result (success or error)."""

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


class RequestStore:
    """Thread-safe access to the server's SQLite database (one connection, one lock, short transactions)."""

    def __init__(self, path: str | Path, *, max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut too, not only a killed process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._versions: dict[str, int] = {}
        self._partials: dict[str, str] = {}
        self._cancels: set[str] = set()
        self._queue_changed = threading.Event()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False`` skips the fsync (progress logs written after every block): the
        next durable commit syncs the WAL, earlier frames included, and a killed process loses nothing either
        way; only a power cut could drop such lines."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _touch(self, request_id: str) -> None:
        self._versions[request_id] = self._versions.get(request_id, 0) + 1

    def version(self, request_id: str) -> int:
        """A counter that changes whenever the request's status, logs or partial output change."""
        return self._versions.get(request_id, 0)

    @property
    def queue_changed(self) -> threading.Event:
        """Set when a request is queued (the worker waits on it)."""
        return self._queue_changed

    # --- lifecycle -------------------------------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """Startup: requeue what was running when the process died; fail sync requests nobody waits for.

        Returns ``(requeued, failed)``.
        """
        now = time.time()
        requeued = failed = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, kind, attempts FROM requests WHERE state IN ('running', 'queued')").fetchall()
            for row in rows:
                if row["kind"] != "queue":
                    outcome = Outcome(503, {"detail": "The server restarted before this request finished"},
                                      "Server restarted", "runner_disconnected")
                elif row["attempts"] >= self.max_attempts:
                    outcome = Outcome(500, {"detail": f"The request was interrupted {row['attempts']} times by a "
                                                      "server crash and is not retried again",
                                            "error_type": "internal_error"},
                                      "Request crashed the server repeatedly", "internal_error")
                else:
                    continue
                self._finish_locked(db, row["id"], outcome, now, None)
                failed += 1
            cur = db.execute("UPDATE requests SET state = 'queued', started_at = NULL WHERE state = 'running'")
            requeued = cur.rowcount
            for row in db.execute("SELECT id FROM requests WHERE state = 'queued'").fetchall():
                self._log_locked(db, row["id"], "WARN", "Server restarted; the request is queued again", now)
        if requeued:
            self._queue_changed.set()
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
            if outcome is not None:
                self._finish_locked(db, request_id, outcome, now, None)
        self._touch(request_id)
        if outcome is None:
            self._queue_changed.set()
        return request_id, position

    def claim_batch(self, max_batch: int) -> list[RequestRow]:
        """Move up to ``max_batch`` queued requests to running, oldest first (priority first).

        A streamed request runs alone (it needs per-block progress); requests whose start timeout passed are
        completed with a 504 instead of being claimed.
        """
        now = time.time()
        # Cleared before the read: a submit committed after the read sets it again, so no wake-up is lost.
        self._queue_changed.clear()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM requests WHERE state = 'queued' ORDER BY priority, seq LIMIT ?", (max_batch * 4,)
            ).fetchall()
            chosen: list[sqlite3.Row] = []
            for row in rows:
                if row["start_deadline"] is not None and row["start_deadline"] < now:
                    self._finish_locked(db, row["id"], Outcome(
                        504, {"detail": "Request timed out", "error_type": "request_timeout"},
                        "Request timed out before it started", "request_timeout"), now, None)
                    continue
                if row["kind"] == "stream":
                    if not chosen:
                        chosen.append(row)
                    break
                chosen.append(row)
                if len(chosen) >= max_batch:
                    break
            for row in chosen:
                db.execute("UPDATE requests SET state = 'running', started_at = ?, attempts = attempts + 1 "
                           "WHERE id = ?", (now, row["id"]))
                self._log_locked(db, row["id"], "INFO", f"Started (batch of {len(chosen)})", now)
                self._touch(row["id"])
        return [self.get(row["id"]) for row in chosen]  # type: ignore[misc]

    def requeue(self, request_id: str) -> None:
        """Put a running request back in the queue (server shutting down mid-generation); no attempt counted."""
        with self._tx() as db:
            db.execute("UPDATE requests SET state = 'queued', started_at = NULL, attempts = MAX(attempts - 1, 0) "
                       "WHERE id = ? AND state = 'running'", (request_id,))
        self._partials.pop(request_id, None)
        self._touch(request_id)

    def finish(self, request_id: str, outcome: Outcome, *, inference_time: float | None = None) -> None:
        """Store the result and, in the same transaction, the webhook delivery (if the request asked for one)."""
        with self._tx() as db:
            self._finish_locked(db, request_id, outcome, time.time(), inference_time)
        self._partials.pop(request_id, None)
        self._cancels.discard(request_id)

    def _finish_locked(self, db: sqlite3.Connection, request_id: str, outcome: Outcome, now: float,
                       inference_time: float | None) -> None:
        db.execute(
            "UPDATE requests SET state = 'done', finished_at = ?, status_code = ?, body = ?, error = ?, "
            "error_type = ?, inference_time = ? WHERE id = ?",
            (now, outcome.status_code, json.dumps(outcome.body, default=str), outcome.error, outcome.error_type,
             inference_time, request_id),
        )
        level = "INFO" if outcome.ok else "ERROR"
        message = "Completed" if outcome.ok else f"Failed: {outcome.error or outcome.status_code}"
        self._log_locked(db, request_id, level, message, now)
        row = db.execute("SELECT webhook_url FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is not None and row["webhook_url"]:
            db.execute("INSERT OR REPLACE INTO webhooks (request_id, url, body, attempts, next_at, state) "
                       "VALUES (?, ?, ?, 0, ?, 'pending')",
                       (request_id, row["webhook_url"], webhook_payload(request_id, outcome), now))
        self._touch(request_id)

    # --- cancel ----------------------------------------------------------------------------------------------
    def cancel(self, request_id: str) -> str:
        """Cancel: ``"cancelled"`` (was queued, will never run), ``"requested"`` (running, stops at the next
        block), ``"already_completed"`` or ``"not_found"``."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return "not_found"
            if row["state"] == "done":
                return "already_completed"
            if row["state"] == "queued":
                self._finish_locked(db, request_id, cancelled_outcome(), time.time(), None)
                return "cancelled"
            self._log_locked(db, request_id, "WARN", "Cancellation requested", time.time())
        self._cancels.add(request_id)
        self._touch(request_id)
        return "requested"

    def cancel_requested(self, request_id: str) -> bool:
        """Cheap check the worker polls after every block."""
        return request_id in self._cancels

    # --- reads -----------------------------------------------------------------------------------------------
    def get(self, request_id: str) -> RequestRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        data = dict(row)
        data.pop("start_deadline")
        data["input"] = json.loads(data["input"])
        return RequestRow(**data)

    def queue_position(self, request_id: str) -> int:
        with self._lock:
            return self._position_locked(self._db, request_id)

    def _position_locked(self, db: sqlite3.Connection, request_id: str) -> int:
        row = db.execute(
            "SELECT COUNT(*) FROM requests r, requests me WHERE me.id = ? AND r.state = 'queued' AND "
            "(r.priority < me.priority OR (r.priority = me.priority AND r.seq < me.seq))", (request_id,)
        ).fetchone()
        return int(row[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # --- logs and partial output -----------------------------------------------------------------------------
    def log(self, request_id: str, level: str, message: str) -> None:
        """Append a log line (not fsynced on its own; see ``_tx``)."""
        with self._tx(durable=False) as db:
            self._log_locked(db, request_id, level, message, time.time())
        self._touch(request_id)

    def _log_locked(self, db: sqlite3.Connection, request_id: str, level: str, message: str, now: float) -> None:
        db.execute("INSERT INTO logs (request_id, ts, level, message) VALUES (?, ?, ?, ?)",
                   (request_id, now, level, message))

    def logs(self, request_id: str, after_id: int = 0) -> list[tuple[int, float, str, str]]:
        """``(log_id, unix_time, level, message)`` of the request's logs with id > ``after_id``, in order."""
        with self._lock:
            rows = self._db.execute("SELECT id, ts, level, message FROM logs WHERE request_id = ? AND id > ? "
                                    "ORDER BY id", (request_id, after_id)).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def set_partial(self, request_id: str, text: str) -> None:
        self._partials[request_id] = text
        self._touch(request_id)

    def partial(self, request_id: str) -> str | None:
        return self._partials.get(request_id)

    # --- webhooks --------------------------------------------------------------------------------------------
    def due_webhooks(self, limit: int = 16) -> list[tuple[str, str, bytes, int]]:
        """``(request_id, url, body, attempts)`` of pending deliveries whose time has come."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, url, body, attempts FROM webhooks WHERE state = 'pending' "
                                    "AND next_at <= ? ORDER BY next_at LIMIT ?", (time.time(), limit)).fetchall()
        return [(r[0], r[1], bytes(r[2]), int(r[3])) for r in rows]

    def webhook_result(self, request_id: str, *, delivered: bool, error: str | None = None,
                       retry_in: float | None = None) -> None:
        """Record a delivery attempt: delivered, retried after ``retry_in`` seconds, or given up (no retry)."""
        state = "delivered" if delivered else ("pending" if retry_in is not None else "failed")
        with self._tx() as db:
            db.execute("UPDATE webhooks SET attempts = attempts + 1, state = ?, last_error = ?, next_at = ? "
                       "WHERE request_id = ?", (state, error, time.time() + (retry_in or 0.0), request_id))

    def webhook_state(self, request_id: str) -> tuple[str, int] | None:
        with self._lock:
            row = self._db.execute("SELECT state, attempts FROM webhooks WHERE request_id = ?",
                                   (request_id,)).fetchone()
        return None if row is None else (row[0], int(row[1]))

    # --- retention -------------------------------------------------------------------------------------------
    def purge(self, ttl: float) -> int:
        """Delete completed requests (with logs and finished webhooks) older than ``ttl`` seconds."""
        cutoff = time.time() - ttl
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM requests WHERE state = 'done' AND finished_at < ?",
                                            (cutoff,)).fetchall()]
            for request_id in ids:
                db.execute("DELETE FROM logs WHERE request_id = ?", (request_id,))
                db.execute("DELETE FROM webhooks WHERE request_id = ? AND state != 'pending'", (request_id,))
                db.execute("DELETE FROM requests WHERE id = ?", (request_id,))
        for request_id in ids:
            self._versions.pop(request_id, None)
        return len(ids)


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
