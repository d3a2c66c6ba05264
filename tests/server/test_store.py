"""The SQLite store on its own: recovery after a crash, poison requests, retention, queue order, cancel races."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemotron_fast.server import store as store_mod
from nemotron_fast.server.store import Outcome, RequestStore


def test_recover_requeues_running_and_fails_sync(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "db.sqlite3", max_attempts=3)
    a, _ = store.submit({"prompt": "a"})
    b, _ = store.submit({"prompt": "b"})
    s, _ = store.submit({"prompt": "s"}, kind="sync")
    claimed = store.claim_batch(8)
    assert [r.id for r in claimed] == [a, b, s] and all(r.state == "running" for r in claimed)
    store.close()  # the process "dies" here: nothing was finished

    store = RequestStore(tmp_path / "db.sqlite3", max_attempts=3)
    requeued, failed = store.recover()
    assert (requeued, failed) == (2, 1)
    assert store.get(a).state == "queued" and store.get(a).attempts == 1
    sync = store.get(s)
    assert sync.state == "done" and sync.status_code == 503
    assert any("restarted" in m for _, _, _, m in store.logs(a))
    assert [r.id for r in store.claim_batch(8)] == [a, b]


def test_request_that_keeps_crashing_the_server_is_failed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = RequestStore(path, max_attempts=2)
    rid, _ = store.submit({"prompt": "poison"})
    for _ in range(2):
        store.claim_batch(1)
        store.close()
        store = RequestStore(path, max_attempts=2)
        store.recover()
    row = store.get(rid)
    assert row.state == "done" and row.status_code == 500 and row.error_type == "internal_error"


def test_priority_then_fifo_and_positions(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "db.sqlite3")
    low, _ = store.submit({"p": 0}, priority=1)
    n1, _ = store.submit({"p": 1})
    n2, pos = store.submit({"p": 2})
    assert pos == 1 and store.queue_position(low) == 2 and store.queue_position(n1) == 0
    assert [r.id for r in store.claim_batch(2)] == [n1, n2]
    assert store.queue_position(low) == 0


def test_stream_requests_run_alone(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "db.sqlite3")
    q1, _ = store.submit({})
    st, _ = store.submit({}, kind="stream")
    q2, _ = store.submit({})
    assert [r.id for r in store.claim_batch(8)] == [q1]
    assert [r.id for r in store.claim_batch(8)] == [st]
    assert [r.id for r in store.claim_batch(8)] == [q2]


def test_start_timeout_expires_queued_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RequestStore(tmp_path / "db.sqlite3")
    rid, _ = store.submit({}, start_timeout=10.0)
    kept, _ = store.submit({}, start_timeout=30.0)
    now = time.time()
    monkeypatch.setattr(store_mod, "time", SimpleNamespace(time=lambda: now + 20.0))  # the store's clock, 20 s on
    assert [r.id for r in store.claim_batch(8)] == [kept]
    row = store.get(rid)
    assert row.state == "done" and row.status_code == 504 and row.error_type == "request_timeout"


def test_cancel_states(tmp_path: Path) -> None:
    store = RequestStore(tmp_path / "db.sqlite3")
    queued, _ = store.submit({})
    running, _ = store.submit({})
    assert store.cancel(queued) == "cancelled"
    assert [r.id for r in store.claim_batch(8)] == [running]  # the cancelled one is never claimed
    assert store.cancel(running) == "requested" and store.cancel_requested(running)
    store.finish(running, Outcome(200, {"output": "x"}))
    assert store.cancel(running) == "already_completed" and store.cancel("missing") == "not_found"
    assert not store.cancel_requested(running)


def test_result_and_webhook_written_together_and_purged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RequestStore(tmp_path / "db.sqlite3")
    rid, _ = store.submit({}, webhook_url="http://127.0.0.1/hook")
    store.claim_batch(1)
    store.finish(rid, Outcome(200, {"output": "hi"}), inference_time=0.5)
    due = store.due_webhooks()
    assert [(d[0], d[1]) for d in due] == [(rid, "http://127.0.0.1/hook")]
    assert json.loads(due[0][2])["payload"] == {"output": "hi"}
    store.webhook_result(rid, delivered=True)
    assert store.purge(ttl=3600) == 0 and store.get(rid) is not None
    now = time.time()
    monkeypatch.setattr(store_mod, "time", SimpleNamespace(time=lambda: now + 3601.0))
    assert store.purge(ttl=3600) == 1
    assert store.get(rid) is None and store.logs(rid) == [] and store.webhook_state(rid) is None
