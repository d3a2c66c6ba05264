"""Acceptance: a server process killed with SIGKILL while requests are queued or running, then restarted on
the same data dir, completes every request (the running one is retried, the queued ones run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import free_port
from .test_acceptance_fal_client import APP, request

pytestmark = pytest.mark.slow


def _start(model_dir: Path, data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemotron_fast.server", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(data_dir), "--max-batch", "1", "--allow-private-urls",
         "--device", "cpu", "--log-level", "warning"],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start:\n" + log.read_text())


def test_sigkill_then_restart_completes_all(model_dir: Path, real_pipeline: Any, tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    inputs = [request(i, max_tokens=160, block_length=8) for i in range(10)]
    proc = _start(model_dir, data_dir, port, log)
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            ids = [c.post(f"/queue/{APP}", json=args).json()["request_id"] for args in inputs]
            # kill once the first request is mid-generation: it has committed a block and is not done
            deadline = time.monotonic() + 120
            while True:
                status = c.get(f"/queue/{APP}/requests/{ids[0]}/status", params={"logs": 1}).json()
                if status["status"] == "IN_PROGRESS" and any(e["message"].startswith("Block")
                                                             for e in status["logs"]):
                    break
                assert status["status"] != "COMPLETED", "the first request finished before the kill"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = [real_pipeline.run(args)["output"] for args in inputs]
    proc = _start(model_dir, data_dir, port, log)
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            states = {rid: c.get(f"/queue/{APP}/requests/{rid}/status").json()["status"] for rid in ids}
            # the kill really interrupted work: not everything had completed
            assert list(states.values()).count("COMPLETED") < 10
            outputs = []
            for rid in ids:
                deadline = time.monotonic() + 120
                while c.get(f"/queue/{APP}/requests/{rid}/status").status_code != 200:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                result = c.get(f"/queue/{APP}/requests/{rid}")
                assert result.status_code == 200, result.text
                outputs.append(result.json()["output"])
            assert outputs == expected
            logs = [e["message"] for rid in ids
                    for e in c.get(f"/queue/{APP}/requests/{rid}/status", params={"logs": 1}).json()["logs"]]
            assert any("Server restarted" in m for m in logs)
    finally:
        proc.terminate()
        proc.wait(20)
