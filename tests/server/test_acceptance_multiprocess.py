"""Acceptance: two API processes and two worker processes on one PostgreSQL store. 40 requests go in through
both front ends (queued, streamed, with webhooks); one worker is killed with SIGKILL while it runs requests.
Every request completes once, with the output of a direct run; every webhook arrives with one idempotency key
across its retries; a client of the other API process sees every status change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nemotron_fast.server.webhooks import idempotency_key, verify_signature

from .conftest import free_port
from .pg import fresh_database
from .receivers import WebhookReceiver
from .test_acceptance_fal_client import APP, request

pytestmark = pytest.mark.slow
LEASE_TTL = 3.0  # short, so the killed worker's requests come back quickly; the test waits on states only


def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> Any:
    """Poll a state; the deadline is only a failure bound."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


class Fleet:
    """Server processes on one store; each one's output goes to a log file in ``root``."""

    def __init__(self, root: Path, store: str, model_dir: Path) -> None:
        self.root, self.store, self.model_dir = root, store, model_dir
        self.procs: dict[str, tuple[subprocess.Popen, str, Path]] = {}

    def spawn(self, name: str, role: str) -> None:
        port = free_port()
        log = self.root / f"{name}.log"
        args = [sys.executable, "-m", "nemotron_fast.server", "serve", "--role", role, "--store", self.store,
                "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(self.root / name),
                "--allow-private-urls", "--lease-ttl", str(LEASE_TTL), "--log-level", "warning"]
        if role == "worker":
            args += ["--model", str(self.model_dir), "--device", "cpu", "--max-batch", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self.procs[name] = (proc, f"http://127.0.0.1:{port}", log)

    def wait_healthy(self) -> None:
        for name, (proc, url, log) in self.procs.items():
            def up(proc: subprocess.Popen = proc, url: str = url, log: Path = log) -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(up, f"{name} to start")

    def url(self, name: str) -> str:
        return self.procs[name][1]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{log.read_text()[-4000:]}" for name, (_, _, log) in self.procs.items())

    def stop(self) -> None:
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def fleet(tmp_path: Path, model_dir: Path) -> Iterator[Fleet]:
    with fresh_database() as url:
        fleet = Fleet(tmp_path, url, model_dir)
        try:
            yield fleet
        finally:
            fleet.stop()


def watch_status(url: str, request_id: str, seen: list[str]) -> None:
    """Follow the status stream (with logs) of another API process; record each event's status and logs."""
    with httpx.stream("GET", f"{url}/queue/{APP}/requests/{request_id}/status/stream", params={"logs": 1},
                      timeout=httpx.Timeout(10, read=300)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                doc = json.loads(line[6:])
                seen.append(doc["status"])
                seen.extend(f"log:{entry['timestamp']}|{entry['message']}" for entry in doc["logs"])


def expected_statuses(events: list[str]) -> list[str]:
    """The status sequence the log lines imply, from the first status the watcher saw. A request taken back from
    a dead worker and claimed again in one transaction (same time stamp) was never committed as queued."""
    lines = [e[4:].split("|", 1) for e in events if e.startswith("log:")]
    statuses = [events[0]]
    for n, (stamp, message) in enumerate(lines):
        if message.startswith("Started"):
            statuses.append("IN_PROGRESS")
        elif message.endswith("the request is queued again"):
            reclaimed = n + 1 < len(lines) and lines[n + 1][0] == stamp and lines[n + 1][1].startswith("Started")
            if not reclaimed:
                statuses.append("IN_QUEUE")
        elif message == "Completed" or message.startswith("Failed"):
            statuses.append("COMPLETED")
    return [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]


def test_two_apis_two_workers_survive_a_killed_worker(fleet: Fleet, real_pipeline: Any) -> None:
    import psycopg

    receiver = WebhookReceiver(fail_first=3)
    fleet.spawn("api1", "api")
    fleet.spawn("api2", "api")
    fleet.spawn("worker1", "worker")
    fleet.spawn("worker2", "worker")
    inputs = [request(i, max_tokens=32, block_length=4) for i in range(40)]
    expected = [real_pipeline.run(args)["output"] for args in inputs]  # while the workers load their model
    fleet.wait_healthy()
    apis = [fleet.url("api1"), fleet.url("api2")]
    victim = fleet.procs["worker1"][0]
    victim_id = httpx.get(f"{fleet.url('worker1')}/health").json()["worker_id"]
    kinds = ["queue", "webhook", "stream", "queue"]  # by i % 4; request i goes in through apis[i % 2]
    ids: dict[int, str] = {}
    watched: dict[str, list[str]] = {}
    stream_events: dict[int, list[dict[str, Any]]] = {}
    threads: list[threading.Thread] = []

    def stream(i: int) -> None:
        events = []
        with httpx.stream("POST", f"{apis[i % 2]}/{APP}/stream", json=inputs[i],
                          timeout=httpx.Timeout(10, read=300)) as response:
            assert response.status_code == 200, response.read()
            ids[i] = response.headers["x-fal-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        stream_events[i] = events

    try:
        with httpx.Client(timeout=30) as c:
            for i, args in enumerate(inputs):
                if kinds[i % 4] == "stream":
                    threads.append(threading.Thread(target=stream, args=(i,)))
                    threads[-1].start()
                    continue
                params = {"fal_webhook": receiver.url} if kinds[i % 4] == "webhook" else {}
                r = c.post(f"{apis[i % 2]}/queue/{APP}", json=args, params=params)
                assert r.status_code == 200, r.text
                ids[i] = r.json()["request_id"]
                seen = watched[ids[i]] = []
                threads.append(threading.Thread(target=watch_status, args=(apis[(i + 1) % 2], ids[i], seen)))
                threads[-1].start()

            with psycopg.connect(fleet.store, autocommit=True) as db:
                def victim_running() -> list[str]:
                    return [r[0] for r in db.execute("SELECT id FROM requests WHERE state = 'running' AND "
                                                     "worker_id = %s", (victim_id,)).fetchall()]
                interrupted = wait_for(victim_running, "worker1 to run requests")
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                wait_for(lambda: len(ids) == 40 and all(
                    c.get(f"{apis[(i + 1) % 2]}/queue/{APP}/requests/{rid}/status").status_code == 200
                    for i, rid in ids.items()), "every request to complete\n" + fleet.logs(), timeout=300)
                for thread in threads:
                    thread.join(60)
                    assert not thread.is_alive()
                rows = {r[0]: r[1:] for r in db.execute("SELECT id, state, status_code, attempts FROM requests")}
                outcomes = {rid: [m for (m,) in db.execute(
                    "SELECT message FROM logs WHERE request_id = %s AND (message = 'Completed' OR message LIKE "
                    "'Failed%%') ORDER BY id", (rid,))] for rid in ids.values()}

            # every output equals its direct run, through either front end
            for i, rid in ids.items():
                if kinds[i % 4] == "stream":
                    final = stream_events[i][-1]
                    assert final["partial"] is False and final["output"] == expected[i]
                    assert all(e["partial"] and expected[i].startswith(e["output"]) or
                               e["output"] == expected[i] for e in stream_events[i][:-1])
                result = c.get(f"{apis[i % 2]}/queue/{APP}/requests/{rid}")
                assert result.status_code == 200 and result.json()["output"] == expected[i], result.text
        # exactly one outcome each, and the killed worker's requests ran again elsewhere
        assert sorted(rows) == sorted(ids.values())
        assert all(rows[rid][:2] == ("done", 200) for rid in ids.values())
        assert all(outcome == ["Completed"] for outcome in outcomes.values()), outcomes
        assert interrupted and all(rows[rid][2] >= 2 for rid in interrupted)
        # webhooks: every one delivered, signed with the key both API processes publish, one key per request
        jwks = httpx.get(f"{apis[1]}/.well-known/jwks.json").json()
        assert jwks == httpx.get(f"{apis[0]}/.well-known/jwks.json").json()
        hooked = {ids[i]: expected[i] for i in ids if kinds[i % 4] == "webhook"}
        receiver.wait(len(hooked), timeout=120)
        keys: dict[str, set[str]] = {}
        for headers, body, _ in receiver.deliveries + receiver.refused:
            doc = json.loads(body)
            assert verify_signature(jwks, headers, body) and doc["payload"]["output"] == hooked[doc["request_id"]]
            keys.setdefault(doc["request_id"], set()).add(headers["Idempotency-Key"])
        assert {json.loads(body)["request_id"] for _, body, _ in receiver.deliveries} == set(hooked)
        assert keys == {rid: {idempotency_key(rid)} for rid in hooked}
        assert len(receiver.refused) == 3  # so some keys were seen on a retry too
        # the other API process's status stream saw every status change
        for rid, events in watched.items():
            statuses = [e for e in events if not e.startswith("log:")]
            assert [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]] == \
                expected_statuses(events), (rid, events)
            assert statuses[-1] == "COMPLETED"
    finally:
        receiver.close()
