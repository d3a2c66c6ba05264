"""The store's rules on both backends (SQLite and PostgreSQL), and what only a shared store does: leases that
expire, claims two processes race for, notifications between processes, files in the database, the schema."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from nemotron_fast.server.store import (
    _SCHEMA_V1,
    Outcome,
    RequestStore,
    Store,
    open_store,
    parse_store_url,
)

from .pg import fresh_database


@contextmanager
def _stores(kind: str, tmp_path: Path) -> Iterator[Any]:
    """``open(**options)`` -> a store on one database; every call opens another handle on the same one."""
    stores: list[Store] = []
    with ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        else:
            url = stack.enter_context(fresh_database())

        def open_(**options: Any) -> Store:
            store = open_store(url, **options)
            stores.append(store)
            return store

        open_.kind = kind  # type: ignore[attr-defined]
        try:
            yield open_
        finally:
            for store in stores:
                store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The same rules on both backends."""
    with _stores(request.param, tmp_path) as open_:
        yield open_


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Any]:
    """What only the shared store does."""
    with _stores("postgresql", tmp_path) as open_:
        yield open_


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    """Wait for a state; the deadline is only a failure bound."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_priority_then_fifo_positions_and_stream_alone(backend: Any) -> None:
    store = backend()
    low, _ = store.submit({"p": 0}, priority=1)
    n1, _ = store.submit({"p": 1})
    st, _ = store.submit({}, kind="stream")
    n2, pos = store.submit({"p": 2})
    assert pos == 2 and store.queue_position(low) == 3 and store.queue_position(n1) == 0
    assert [r.id for r in store.claim_batch(8)] == [n1]  # the stream runs alone: the batch stops before it
    assert [r.id for r in store.claim_batch(8)] == [st]
    assert [r.id for r in store.claim_batch(8)] == [n2, low]
    assert store.counts() == {"running": 4}


def test_start_timeout_and_cancel_states(backend: Any) -> None:
    store = backend()
    late, _ = store.submit({}, start_timeout=1e-9)
    queued, _ = store.submit({})
    running, _ = store.submit({})
    assert store.cancel(queued) == "cancelled"
    assert [r.id for r in store.claim_batch(8)] == [running]  # the expired and the cancelled one never run
    row = store.get(late)
    assert row.state == "done" and row.status_code == 504 and row.error_type == "request_timeout"
    assert store.get(queued).error_type == "request_cancelled"
    assert store.cancel(running) == "requested" and store.cancel_requested(running)
    assert store.finish(running, Outcome(200, {"output": "x"}))
    assert store.cancel(running) == "already_completed" and store.cancel("missing") == "not_found"
    assert not store.cancel_requested(running)


def test_one_outcome_per_request(backend: Any) -> None:
    store = backend()
    rid, _ = store.submit({}, webhook_url="http://127.0.0.1/hook")
    (row,) = store.claim_batch(1, worker_id="w1")
    assert row.worker_id == "w1" and row.lease_owner
    assert not store.finish(rid, Outcome(200, {"output": "stale"}), owner="not-the-claim")
    assert store.finish(rid, Outcome(200, {"output": "first"}), owner=row.lease_owner)
    assert not store.finish(rid, Outcome(500, {"detail": "second"}))
    done = store.get(rid)
    assert json.loads(done.body) == {"output": "first"} and done.status_code == 200
    assert [m for _, _, _, m in store.logs(rid)].count("Completed") == 1
    due = store.due_webhooks()
    assert [(d[0], json.loads(d[2])["payload"]) for d in due] == [(rid, {"output": "first"})]


def test_webhook_claimed_once_then_retried_and_purged(backend: Any) -> None:
    a, b = backend(), backend()
    rid, _ = a.submit({}, webhook_url="http://127.0.0.1/hook")
    a.claim_batch(1)
    a.finish(rid, Outcome(200, {"output": "hi"}), inference_time=0.5)
    assert [d[0] for d in a.due_webhooks()] == [rid]
    assert b.due_webhooks() == [] and a.due_webhooks() == []  # claimed: nobody else delivers it meanwhile
    a.webhook_result(rid, delivered=False, error="HTTP 503", retry_in=0.0)
    assert a.webhook_state(rid) == ("pending", 1)
    assert [(d[0], d[3]) for d in b.due_webhooks()] == [(rid, 1)]
    b.webhook_result(rid, delivered=True)
    assert a.webhook_state(rid) == ("delivered", 2)
    a.webhook_result(rid, delivered=False, error="late", retry_in=1.0)  # a stale deliverer changes nothing
    assert b.webhook_state(rid) == ("delivered", 2)
    assert a.purge(ttl=3600) == 0 and a.get(rid) is not None
    wait_for(lambda: a.purge(ttl=1e-6) == 1, "the purge")
    assert b.get(rid) is None and b.logs(rid) == [] and b.webhook_state(rid) is None


def test_requeue_by_the_claim_only(backend: Any) -> None:
    store = backend()
    rid, _ = store.submit({})
    (row,) = store.claim_batch(1)
    store.requeue(rid, owner="someone-else")
    assert store.get(rid).state == "running"
    store.requeue(rid, owner=row.lease_owner)
    again = store.get(rid)
    assert again.state == "queued" and again.attempts == 0 and again.lease_owner is None


def test_expired_lease_requeues_then_fails_after_max_attempts(pg: Any) -> None:
    store = pg(max_attempts=2, lease_ttl=30.0)
    other = pg(max_attempts=2, lease_ttl=30.0)
    rid, _ = store.submit({})
    (first,) = store.claim_batch(1, worker_id="dead")
    assert store.renew_leases({rid: first.lease_owner}) == {rid}
    assert other.expire_leases() == (0, 0)  # a renewed lease is not taken

    def kill_worker() -> None:  # the worker stops renewing and its lease runs out (set on the database's clock)
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute("UPDATE requests SET lease_until = EXTRACT(EPOCH FROM clock_timestamp()) - 1 "
                         "WHERE id = %s", (rid,))

    kill_worker()
    (second,) = other.claim_batch(1, worker_id="alive")  # the claim takes expired leases back first
    assert second.id == rid and second.attempts == 2 and second.worker_id == "alive"
    assert any("stopped renewing its lease" in m for _, _, _, m in other.logs(rid))
    assert store.renew_leases({rid: first.lease_owner}) == set()  # the dead worker learns it lost the request
    assert not store.finish(rid, Outcome(200, {"output": "late"}), owner=first.lease_owner)
    kill_worker()
    assert other.expire_leases() == (0, 1)  # interrupted max_attempts times: failed, not retried
    row = store.get(rid)
    assert row.state == "done" and row.status_code == 500 and "interrupted 2 times" in row.body
    assert not other.finish(rid, Outcome(200, {"output": "late"}), owner=second.lease_owner)


def test_two_workers_never_claim_the_same_request(pg: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a, b = pg(), pg()
    ids = [a.submit({"i": i})[0] for i in range(40)]
    claimed: list[str] = []

    def drain(store: Store, worker: str) -> list[str]:
        got: list[str] = []
        while rows := store.claim_batch(3, worker_id=worker):
            got += [r.id for r in rows]
        return got

    with ThreadPoolExecutor(4) as pool:
        for part in pool.map(lambda args: drain(*args), [(a, "a1"), (b, "b1"), (a, "a2"), (b, "b2")]):
            claimed += part
    assert sorted(claimed) == sorted(ids)


def test_changes_reach_other_processes(pg: Any) -> None:
    api, worker = pg(), pg()
    worker.queue_changed.clear()
    rid, _ = api.submit({})
    wait_for(worker.queue_changed.is_set, "the queue notification")
    (row,) = worker.claim_batch(1)
    seen = api.version(rid)
    worker.set_partial(rid, "par")
    wait_for(lambda: api.version(rid) != seen, "the partial-output notification")
    assert api.partial(rid) == "par"
    assert api.cancel(rid) == "requested"
    wait_for(lambda: worker.cancel_requested(rid), "the cancel notification")
    seen = api.version(rid)
    worker.finish(rid, Outcome(200, {"output": "done"}), owner=row.lease_owner)
    wait_for(lambda: api.version(rid) != seen, "the completion notification")
    assert api.get(rid).state == "done" and api.partial(rid) is None


def test_files_in_the_database(pg: Any, tmp_path: Path) -> None:
    from nemotron_fast.server.store_pg import PostgresFileStore

    up = PostgresFileStore(pg(), tmp_path / "api-cache", max_bytes=1000)
    down = PostgresFileStore(pg(), tmp_path / "worker-cache", max_bytes=1000)
    file_id, name = up.create("../a b.png", "image/png", origin="http://api.example")
    assert down.local_path(file_id) is None and down.meta(file_id)["state"] == "pending"
    up.write(file_id, b"PNG-bytes")
    url = f"http://api.example/files/{file_id}/{name}"
    assert Path(down.resolve_url(url)).read_bytes() == b"PNG-bytes"
    # only URLs on the origin the file was handed out on are read by path on any host
    assert down.resolve_url(f"http://other.example/files/{file_id}/{name}") is None
    assert down.meta(file_id)["content_type"] == "image/png" and name == "a_b.png"
    with pytest.raises(KeyError):
        up.write("0" * 32, b"x")
    assert up.resolve_url("http://x/files/not-an-id/x") is None and up.meta("../../etc") is None
    assert up.purge(ttl=3600) == 0
    wait_for(lambda: up.purge(ttl=1e-6) == 1, "the purge")
    assert down.meta(file_id) is None and down.local_path(file_id) is None


def test_shared_settings_agree(pg: Any) -> None:
    a, b = pg(), pg()
    made = iter([b"first", b"second"])
    assert a.setting("k", lambda: next(made)) == b"first" == b.setting("k", lambda: next(made))


def test_schema_versions(backend: Any, tmp_path: Path) -> None:
    store = backend()
    if backend.kind == "sqlite":
        old = tmp_path / "v1.sqlite3"  # a database an older release wrote
        with sqlite3.connect(old) as db:
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO requests (id, kind, state, input, created_at) VALUES ('r', 'queue', 'queued', "
                       "'{}', 0)")
        migrated = RequestStore(old)
        assert [r.id for r in migrated.claim_batch(1)] == ["r"] and migrated.get("r").lease_owner
        migrated.close()
        with sqlite3.connect(old) as db:
            db.execute("PRAGMA user_version = 99")
        with pytest.raises(RuntimeError, match="schema version 99"):
            RequestStore(old)
        return
    import psycopg

    backend()  # a second process starting on the migrated database changes nothing
    with psycopg.connect(store.url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM nemotron_fast_schema").fetchall() == [(1,)]
        conn.execute("UPDATE nemotron_fast_schema SET version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        backend()


@pytest.mark.parametrize("url,expected", [("sqlite:///rel/db.sqlite3", ("sqlite", "rel/db.sqlite3")),
                                          ("sqlite:////abs/db", ("sqlite", "/abs/db")),
                                          ("postgresql://u@h:5/db", ("postgresql", "postgresql://u@h:5/db")),
                                          ("postgres://h/db", ("postgresql", "postgres://h/db"))])
def test_store_urls(url: str, expected: tuple[str, str]) -> None:
    assert parse_store_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://h/db", "sqlite:///", "sqlite://db", "/some/path", "postgresql:///db"])
def test_bad_store_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(ValueError, match="store URL"):
        parse_store_url(url)


def test_roles_need_a_shared_store(tmp_path: Path) -> None:
    from nemotron_fast.server.service import ServerConfig

    for role in ("api", "worker"):
        with pytest.raises(ValueError, match="needs a shared store"):
            ServerConfig(data_dir=tmp_path, role=role)
        with pytest.raises(ValueError, match="needs a shared store"):
            ServerConfig(data_dir=tmp_path, role=role, store=f"sqlite:///{tmp_path}/db")
    assert ServerConfig(data_dir=tmp_path, role="api", store="postgresql://h/db").role == "api"
    for bad in ({"role": "gpu"}, {"lease_ttl": 0}, {"max_attempts": 0}, {"store": "redis://h"}):
        with pytest.raises(ValueError):
            ServerConfig(data_dir=tmp_path, **bad)
