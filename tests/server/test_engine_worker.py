"""The server on the Engine (``--batching continuous``, the default): concurrent requests equal their direct runs,
a failing input fails alone, /health says which worker runs, and a fatal device error ends the process so the
queue re-runs its requests after a restart, the one that crashed it with no neighbour."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import free_port
from .test_acceptance_fal_client import APP, request

HERE = Path(__file__).parent


def _wait_done(c: httpx.Client, rid: str, log: Path | None = None, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while c.get(f"/queue/{APP}/requests/{rid}/status").status_code != 200:
        assert time.monotonic() < deadline, log.read_text() if log else rid
        time.sleep(0.05)
    return c.get(f"/queue/{APP}/requests/{rid}/status", params={"logs": 1}).json()


def test_health_says_which_worker_runs(start_server: Any, real_pipeline: Any, tmp_path: Path) -> None:
    cont = start_server(real_pipeline, data_dir=tmp_path / "continuous")
    static = start_server(real_pipeline, batching="static", data_dir=tmp_path / "static")
    assert httpx.get(f"{cont.url}/health").json()["batching"] == "continuous"
    assert httpx.get(f"{static.url}/health").json()["batching"] == "static"
    assert hasattr(cont.service.worker, "engine") and not hasattr(static.service.worker, "engine")


def test_concurrent_requests_equal_direct_runs_and_a_bad_image_fails_alone(start_server: Any,
                                                                            real_pipeline: Any) -> None:
    server = start_server(real_pipeline, max_batch=3)
    inputs = [request(i, max_tokens=6 + 5 * (i % 4), block_length=(4, 8)[i % 2]) for i in range(8)]
    bad = dict(request(9), image_url=f"{server.url}/files/{'0' * 32}/missing.png")
    expected = [real_pipeline.run(args) for args in inputs]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        ids = [c.post(f"/queue/{APP}", json=args).json()["request_id"] for args in inputs[:4]]
        bad_id = c.post(f"/queue/{APP}", json=bad).json()["request_id"]
        ids += [c.post(f"/queue/{APP}", json=args).json()["request_id"] for args in inputs[4:]]
        statuses = {rid: _wait_done(c, rid) for rid in ids + [bad_id]}
        assert statuses[bad_id]["error"], statuses[bad_id]
        assert c.get(f"/queue/{APP}/requests/{bad_id}").status_code >= 400
        for rid, exp in zip(ids, expected):
            assert statuses[rid]["error"] is None
            got = c.get(f"/queue/{APP}/requests/{rid}").json()
            assert (got["output"], got["usage"]) == (exp["output"], exp["usage"])
        # requests that ran past one block streamed their blocks as partial outputs and log lines
        long = [rid for rid, args, exp in zip(ids, inputs, expected)
                if exp["usage"]["completion_tokens"] > args["block_length"]]
        assert long and all(any(e["message"].startswith("Block 1 committed") for e in statuses[rid]["logs"])
                            for rid in long)
    engine = server.service.worker.engine
    assert engine.max_rows_per_forward > 1, "requests must have shared forwards"


@pytest.mark.slow
def test_a_fatal_device_error_exits_and_the_queue_reruns_its_requests(model_dir: Path, real_pipeline: Any,
                                                                       tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--data-dir",
            str(data_dir), "--max-batch", "4", "--allow-private-urls", "--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}

    def start(script: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *script, *args], env=env, stdout=log.open("ab"),
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None or script[-1] == str(HERE / "poisoned_server.py"), log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    inputs = [request(i, max_tokens=24, block_length=4) for i in range(3)]
    poison = request(3, max_tokens=8, block_length=4, prompt="POISON: what is this?")
    proc = start([str(HERE / "poisoned_server.py")])
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            ids = [c.post(f"/queue/{APP}", json=a).json()["request_id"] for a in inputs]
            poison_id = c.post(f"/queue/{APP}", json=poison).json()["request_id"]
        assert proc.wait(120) == 70, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = [real_pipeline.run(a)["output"] for a in [*inputs, poison]]
    proc = start(["-m", "nemotron_fast.server"])
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            done = {rid: _wait_done(c, rid, log) for rid in [*ids, poison_id]}
            outputs = [c.get(f"/queue/{APP}/requests/{rid}").json()["output"] for rid in [*ids, poison_id]]
    finally:
        proc.terminate()
        proc.wait(20)
    assert outputs == expected
    assert "illegal memory access" in log.read_text()
    messages = [e["message"] for e in done[poison_id]["logs"]]
    assert any("runs with no neighbour" in m for m in messages), messages


def test_a_request_whose_output_step_raises_fails_alone(start_server: Any, real_pipeline: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Turning one finished request into its result raises (the worker's output step, after the engine): that
    request completes with a 500 alone; the requests running beside it equal their direct runs."""
    inputs = [request(i, max_tokens=6 + 5 * (i % 3)) for i in range(4)]
    poison = request(4, max_tokens=8, prompt="POISON: what is this?")
    expected = [real_pipeline.run(args) for args in inputs]
    real = type(real_pipeline).engine_output

    def engine_output(self, prep, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "POISON" in prep.params.prompt:
            raise RuntimeError("output step failed")
        return real(self, prep, *args, **kwargs)

    monkeypatch.setattr(type(real_pipeline), "engine_output", engine_output)
    server = start_server(real_pipeline, max_batch=3)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        ids = [c.post(f"/queue/{APP}", json=args).json()["request_id"] for args in inputs[:2]]
        poison_id = c.post(f"/queue/{APP}", json=poison).json()["request_id"]
        ids += [c.post(f"/queue/{APP}", json=args).json()["request_id"] for args in inputs[2:]]
        statuses = {rid: _wait_done(c, rid) for rid in [*ids, poison_id]}
        assert statuses[poison_id]["error"], statuses[poison_id]
        assert c.get(f"/queue/{APP}/requests/{poison_id}").status_code == 500
        for rid, exp in zip(ids, expected):
            assert statuses[rid]["error"] is None, statuses[rid]
            got = c.get(f"/queue/{APP}/requests/{rid}").json()
            assert (got["output"], got["usage"]) == (exp["output"], exp["usage"])
    assert server.service.worker.alive and not server.service.worker._jobs
