"""The PostgreSQL backend of the store and of uploaded files: one database shared by any number of API and worker
processes on any hosts (psycopg 3 with a connection pool, installed by the ``serve`` extra).

- Claims use ``FOR UPDATE SKIP LOCKED``: two workers never claim the same request or webhook delivery.
- Leases are measured on the database's clock, so hosts' clocks need not agree.
- Every committed change sends ``NOTIFY nemotron_fast`` (``s:<id>`` request changed, ``q:`` queue changed,
  ``c:<id>`` cancel asked for); each process listens on one dedicated connection and wakes its waiters, so status
  streams and idle workers do not poll the database. Partial outputs live in the request row.
- The schema is created or migrated on start (version in ``nemotron_fast_schema``, under an advisory lock).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .storage import FileStoreBase, clean_content_type, clean_name
from .store import Store, Tx

__all__ = ["PostgresStore", "PostgresFileStore", "PG_SCHEMA_VERSION"]

logger = logging.getLogger("nemotron_fast.server")

CHANNEL = "nemotron_fast"
_MIGRATION_LOCK = 0x6E656D6F  # pg_advisory_xact_lock key: one migrating process at a time

_PG_V1 = [
    """CREATE TABLE IF NOT EXISTS requests (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        input TEXT NOT NULL,
        webhook_url TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        start_deadline DOUBLE PRECISION,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        status_code INTEGER,
        body TEXT,
        error TEXT,
        error_type TEXT,
        inference_time DOUBLE PRECISION,
        worker_id TEXT,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        partial TEXT)""",
    "CREATE INDEX IF NOT EXISTS requests_queue ON requests(state, priority, seq)",
    "CREATE INDEX IF NOT EXISTS requests_finished ON requests(state, finished_at)",
    "CREATE INDEX IF NOT EXISTS requests_lease ON requests(state, lease_until)",
    """CREATE TABLE IF NOT EXISTS logs (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS logs_request ON logs(request_id, id)",
    """CREATE TABLE IF NOT EXISTS webhooks (
        request_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        body BYTEA NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        last_error TEXT,
        lease_until DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(state, next_at)",
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
    """CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        origin TEXT,
        data BYTEA)""",
    "CREATE INDEX IF NOT EXISTS files_created ON files(created_at)",
]
_PG_MIGRATIONS: list[tuple[int, list[str]]] = [(1, _PG_V1)]
PG_SCHEMA_VERSION = _PG_MIGRATIONS[-1][0]


class PostgresStore(Store):
    """The store on a PostgreSQL database (see the module docstring); ``url`` is a libpq connection URL."""

    shared = True
    _lock_rows = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, max_attempts: int = 3, lease_ttl: float = 30.0, webhook_lease: float = 60.0,
                 pool_size: int = 8) -> None:
        super().__init__(max_attempts=max_attempts, lease_ttl=lease_ttl, webhook_lease=webhook_lease,
                         idle_wait=min(lease_ttl / 2, 5.0))
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - the serve extra installs them
            raise RuntimeError("a postgresql:// store needs psycopg 3 and psycopg_pool: "
                               "pip install 'nemotron-fast[serve]'") from exc
        self._psycopg = psycopg
        self.url = url
        self._sql_cache: dict[str, str] = {}
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, name="nemotron-fast",
                                    kwargs={"autocommit": True, "row_factory": dict_row})
        try:
            self._pool.open(wait=True, timeout=30)
        except Exception as exc:
            self._pool.close()
            raise RuntimeError(f"cannot connect to the store {_redact(url)}: {exc}") from exc
        self._migrate()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="nemotron-fast-listen", daemon=True)
        self._listener.start()
        if not self._listening.wait(30):
            raise RuntimeError(f"cannot LISTEN on the store {_redact(url)}")

    # --- connection ------------------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = sql.replace("?", "%s")
        return out

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[Tx]:
        """One transaction; ``durable=False`` commits without waiting for the WAL flush (progress logs)."""
        with self._pool.connection() as conn:
            tx = Tx(lambda sql, params: conn.execute(self._sql(sql), params))
            with conn.transaction():
                if not durable:
                    conn.execute("SET LOCAL synchronous_commit = off")
                yield tx
                for payload in dict.fromkeys(f"{kind}:{rid}" for kind, rid in tx.notes):
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        self._apply(tx.notes)

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._pool.connection() as conn:
            yield Tx(lambda sql, params: conn.execute(self._sql(sql), params))

    def _lease_clock(self, db: Tx) -> float:
        return float(db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS t").fetchone()["t"])

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS nemotron_fast_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM nemotron_fast_schema").fetchone()
            version = int(row["version"]) if row else 0
            if version > PG_SCHEMA_VERSION:
                raise RuntimeError(f"the store {_redact(self.url)} has schema version {version}; this nemotron-fast "
                                   f"knows up to {PG_SCHEMA_VERSION} (upgrade it)")
            for target, statements in _PG_MIGRATIONS:
                if target > version:
                    for statement in statements:
                        db.execute(statement)
            if row is None:
                db.execute("INSERT INTO nemotron_fast_schema (version) VALUES (?)", (PG_SCHEMA_VERSION,))
            elif version < PG_SCHEMA_VERSION:
                db.execute("UPDATE nemotron_fast_schema SET version = ?", (PG_SCHEMA_VERSION,))

    def _listen(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with self._psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not first:
                        # Notifications sent while disconnected are lost: make every waiter look again.
                        self._epoch += 1
                        self._queue_changed.set()
                    first = False
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            kind, _, request_id = note.payload.partition(":")
                            self._apply([(kind, request_id)])
            except Exception as exc:
                if self._stop.is_set():
                    return
                logger.warning("store notifications lost (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._listener.join(5)
        self._pool.close()

    # --- what lives in the database here ---------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """Startup: other processes may be running requests, so only expired leases are taken back."""
        with self._tx() as db:
            db.execute("UPDATE webhooks SET lease_until = NULL WHERE state = 'pending' AND lease_until < ?",
                       (time.time(),))
        return self.expire_leases()

    def set_partial(self, request_id: str, text: str) -> None:
        """The output so far, in the row: a stream reads it through whichever API process it reached."""
        with self._tx(durable=False) as db:
            db.execute("UPDATE requests SET partial = ? WHERE id = ? AND state = 'running'", (text, request_id))
            db.note("s", request_id)

    def partial(self, request_id: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT partial FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else row["partial"]

    def setting(self, name: str, make: Callable[[], bytes]) -> bytes:
        with self._tx() as db:
            db.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, make()))
            row = db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return bytes(row["value"])


class PostgresFileStore(FileStoreBase):
    """Uploaded files in the ``files`` table (bytes included), readable by every process sharing the store.

    ``local_path`` copies a file into ``cache_dir`` once per process (the pipeline and the file endpoint read
    paths); copies older than the TTL are removed with the rows.
    """

    def __init__(self, store: PostgresStore, cache_dir: str | Path, *, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.store = store
        self.root = Path(cache_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def meta(self, file_id: str) -> dict[str, Any] | None:
        if not self.valid_id(file_id):
            return None
        with self.store._read() as db:
            row = db.execute("SELECT name, content_type, size, created_at, state, origin FROM files WHERE id = ?",
                             (file_id,)).fetchone()
        return None if row is None else dict(row)

    def create(self, file_name: str | None, content_type: str | None, origin: str | None = None) -> tuple[str, str]:
        content_type = clean_content_type(content_type)
        file_id = uuid.uuid4().hex
        name = clean_name(file_name, content_type)
        with self.store._tx() as db:
            db.execute("INSERT INTO files (id, name, content_type, size, created_at, state, origin) "
                       "VALUES (?, ?, ?, 0, ?, 'pending', ?)", (file_id, name, content_type, time.time(), origin))
        return file_id, name

    def write(self, file_id: str, data: bytes, content_type: str | None = None) -> dict[str, Any]:
        with self.store._tx() as db:
            # The upload's own type replaces a reserved application/octet-stream (as on disk).
            new_type = clean_content_type(content_type) if content_type else "application/octet-stream"
            cur = db.execute(
                "UPDATE files SET data = ?, size = ?, state = 'ready', content_type = CASE WHEN content_type = "
                "'application/octet-stream' THEN ? ELSE content_type END WHERE id = ?",
                (data, len(data), new_type, file_id))
            if not cur.rowcount:
                raise KeyError(file_id)
        meta = self.meta(file_id)
        assert meta is not None
        return meta

    def local_path(self, file_id: str) -> Path | None:
        meta = self.meta(file_id)
        if meta is None or meta.get("state") != "ready":
            return None
        path = self.root / f"{file_id}.bin"
        if not path.exists():
            with self.store._read() as db:
                row = db.execute("SELECT data FROM files WHERE id = ? AND state = 'ready'", (file_id,)).fetchone()
            if row is None or row["data"] is None:
                return None
            tmp = self.root / f"{file_id}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(bytes(row["data"]))
            os.replace(tmp, path)
        return path

    def purge(self, ttl: float) -> int:
        cutoff = time.time() - ttl
        with self.store._tx() as db:
            removed = db.execute("DELETE FROM files WHERE created_at < ?", (cutoff,)).rowcount
        for path in self.root.glob("*.bin"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                continue
        return int(removed)


def _redact(url: str) -> str:
    """The URL without its password (for error messages)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
