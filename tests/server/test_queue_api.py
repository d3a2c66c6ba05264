"""Queue protocol semantics (spec fal-api.md sections 2-5) against the fake pipeline, over real HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from .fakes import FakePipeline

APP = "fal-ai/nemotron-diffusion-vlm"
IMG = "data:image/png;base64,iVBORw0KGgo="
BODY = {"image_url": IMG, "prompt": "hello", "max_tokens": 8, "block_length": 4}


def wait_done(client: httpx.Client, status_url: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(status_url)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, r.text
        time.sleep(0.02)
    raise AssertionError("request did not complete")


def wait_running(client: httpx.Client, status_url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get(status_url).json()["status"] == "IN_QUEUE":
        assert time.monotonic() < deadline, "request did not start"
        time.sleep(0.02)


def test_submit_status_result_cycle(fake_server: Any) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        r = c.post(f"/queue/{APP}", json=BODY)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        sub = r.json()
        rid = sub["request_id"]
        assert r.headers["x-fal-request-id"] == rid == sub["gateway_request_id"]
        assert sub["status"] == "IN_QUEUE" and isinstance(sub["queue_position"], int)
        base = f"{fake_server.url}/queue/{APP}/requests/{rid}"
        assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (base, f"{base}/status",
                                                                               f"{base}/cancel")
        done = wait_done(c, sub["status_url"])
        assert done["status"] == "COMPLETED" and done["logs"] is None and done["error"] is None
        assert done["metrics"]["inference_time"] > 0
        with_logs = c.get(sub["status_url"], params={"logs": "1"}).json()
        messages = [entry["message"] for entry in with_logs["logs"]]
        assert messages[0].startswith("Started") and messages[-1] == "Completed"
        assert any(m.startswith("Block 2 committed") for m in messages)
        assert all(e["source"] == "USER" and e["timestamp"].endswith("Z") for e in with_logs["logs"])
        res = c.get(sub["response_url"])
        assert res.status_code == 200 and res.headers["x-fal-request-id"] == rid
        assert res.json()["output"] == "echo: he"
        # the same request without the /queue prefix and with the trailing slash the fal SDK uses
        assert c.get(f"/{APP}/requests/{rid}/status/", params={"logs": "false"}).json()["logs"] is None
        assert c.get(f"/{APP}/requests/{rid}").json() == res.json()


def test_urls_follow_host_and_forwarded_headers(fake_server: Any) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        sub = c.post(f"/queue/{APP}", json=BODY, headers={"Host": "example.test:9000"}).json()
        assert sub["status_url"].startswith(f"http://example.test:9000/queue/{APP}/requests/")
        sub = c.post(f"/queue/{APP}", json=BODY, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host":
                     "api.example.com", "X-Forwarded-Prefix": "/nf"}).json()
        assert sub["response_url"] == f"https://api.example.com/nf/queue/{APP}/requests/{sub['request_id']}"
        bad = c.post(f"/queue/{APP}", json=BODY, headers={"X-Forwarded-Host": "evil.com/<script>"}).json()
        assert bad["status_url"].startswith(fake_server.url)


def test_queue_positions_and_in_progress(start_server: Any) -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    server = start_server(pipe, max_batch=1)
    with httpx.Client(base_url=server.url) as c:
        subs = [c.post(f"/queue/{APP}", json={**BODY, "prompt": f"p{i}"}).json() for i in range(3)]
        wait_running(c, subs[0]["status_url"])
        first = c.get(subs[0]["status_url"])
        assert first.status_code == 202 and first.json()["status"] == "IN_PROGRESS" and first.json()["logs"] is None
        positions = [c.get(s["status_url"]).json() for s in subs[1:]]
        assert [(p["status"], p["queue_position"]) for p in positions] == [("IN_QUEUE", 0), ("IN_QUEUE", 1)]
        assert c.get(subs[0]["response_url"]).status_code == 400
        pipe.gate.set()
        for s in subs:
            assert wait_done(c, s["status_url"])["error"] is None
        assert pipe.started == ["p0", "p1", "p2"]


def test_cancel_queued_running_done_unknown(start_server: Any) -> None:
    pipe = FakePipeline(block_delay=0.05)
    pipe.gate.clear()
    server = start_server(pipe, max_batch=1)
    with httpx.Client(base_url=server.url) as c:
        running = c.post(f"/queue/{APP}", json={**BODY, "prompt": "running", "max_tokens": 400,
                                                "block_length": 4}).json()
        queued = c.post(f"/queue/{APP}", json={**BODY, "prompt": "queued"}).json()
        wait_running(c, running["status_url"])
        r = c.put(queued["cancel_url"])
        assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        pipe.gate.set()
        deadline = time.monotonic() + 20
        while not any(e["message"].startswith("Block") for e in
                      c.get(running["status_url"], params={"logs": "true"}).json()["logs"]):
            assert time.monotonic() < deadline, "no block was committed"
            time.sleep(0.02)
        r = c.put(running["cancel_url"])
        assert r.status_code == 202
        done = wait_done(c, running["status_url"])
        assert done["status"] == "COMPLETED" and done["error"] == "Request was cancelled"
        logs = c.get(running["status_url"], params={"logs": "true"}).json()["logs"]
        blocks = [e for e in logs if e["message"].startswith("Block")]
        assert 0 < len(blocks) < 100  # stopped at a block boundary, long before its 100 blocks
        res = c.get(running["response_url"])
        assert res.status_code == 400 and res.json()["detail"] == "Request was cancelled"
        qdone = c.get(queued["status_url"]).json()
        assert qdone["status"] == "COMPLETED" and qdone["error"] == "Request was cancelled"
        assert "queued" not in pipe.started  # a cancelled queued request never runs
        r = c.put(queued["cancel_url"])
        assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})
        r = c.put(f"/queue/{APP}/requests/nope/cancel")
        assert (r.status_code, r.json()["status"]) == (404, "NOT_FOUND")
        assert c.get(f"/queue/{APP}/requests/nope/status").status_code == 404
        assert c.get(f"/queue/{APP}/requests/nope").status_code == 404


def test_batches_up_to_max_batch(start_server: Any) -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    server = start_server(pipe, max_batch=4)
    with httpx.Client(base_url=server.url) as c:
        first = c.post(f"/queue/{APP}", json=BODY).json()
        wait_running(c, first["status_url"])  # the first one runs alone; the next 9 queue up behind it
        subs = [c.post(f"/queue/{APP}", json={**BODY, "prompt": f"b{i}"}).json() for i in range(9)]
        pipe.gate.set()
        outputs = [c.get(wait_done(c, s["status_url"]) and s["response_url"]).json()["output"] for s in subs]
        wait_done(c, first["status_url"])
    assert outputs == [f"echo: b{i} "[:8] for i in range(9)]
    assert server.service.worker.batch_sizes == [1, 4, 4, 1]  # the last one runs alone, through run()
    assert pipe.batches == [4, 4]


@pytest.mark.parametrize("body,field,type_", [
    ({"image_url": IMG}, "prompt", "missing"),
    ({"prompt": "x"}, "image_url", "missing"),
    ({**BODY, "max_tokens": 0}, "max_tokens", "greater_than_equal"),
    ({**BODY, "block_length": 0}, "block_length", "greater_than_equal"),
    ({**BODY, "threshold": 1.5}, "threshold", "less_than_equal"),
    ({**BODY, "threshold": "high"}, "threshold", "float_parsing"),
    ({**BODY, "image_url": "file:///etc/passwd"}, "image_url", "value_error"),
    ({**BODY, "image_url": "/etc/passwd"}, "image_url", "value_error"),
    ({**BODY, "max_tokens": 8, "block_length": 4, "num_inference_steps": 3}, "num_inference_steps", "value_error"),
])
def test_schema_rules_are_422_naming_the_field(fake_server: Any, body: dict, field: str, type_: str) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        for path in (f"/{APP}", f"/{APP}/stream"):
            r = c.post(path, json=body)
            assert r.status_code == 422 and r.headers["content-type"] == "application/json", (path, r.text)
            detail = r.json()["detail"]
            assert any(d["loc"] == ["body", field] and d["type"] == type_ for d in detail), detail
        # the queue accepts it, as the hosted queue does, and completes it with the same 422
        sub = c.post(f"/queue/{APP}", json=body)
        assert sub.status_code == 200 and sub.json()["status"] == "IN_QUEUE", sub.text
        done = wait_done(c, sub.json()["status_url"])
        assert done["status"] == "COMPLETED" and done["error_type"] == "validation_error" and done["error"]
        r = c.get(sub.json()["response_url"])
        assert r.status_code == 422 and r.headers["x-fal-request-id"] == sub.json()["request_id"]
        assert r.json()["detail"] == detail


@pytest.mark.parametrize("content,loc,type_", [(b"{not json", ["body", 1], "json_invalid"),
                                                (b"[1, 2]", ["body"], "model_type")])
def test_queue_accepts_an_unreadable_body_and_fails_it(fake_server: Any, content: bytes, loc: list,
                                                        type_: str) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        sub = c.post(f"/queue/{APP}", content=content, headers={"content-type": "application/json"}).json()
        assert wait_done(c, sub["status_url"])["error_type"] == "validation_error"
        r = c.get(sub["response_url"])
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc and r.json()["detail"][0]["type"] == type_
        assert c.post(f"/{APP}", content=content, headers={"content-type": "application/json"}).status_code == 422
    assert fake_server.service.store.get(sub["request_id"]).attempts == 0  # completed at the door, never ran


def test_caller_mistakes_are_4xx_json(fake_server: Any) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        cases = [
            c.post(f"/{APP}", content=b"{not json", headers={"content-type": "application/json"}),
            c.post(f"/{APP}", json=[1, 2]),
            c.post(f"/queue/{APP}", json=BODY, params={"fal_webhook": "ftp://x"}),
            c.post(f"/queue/{APP}", json=BODY, headers={"X-Fal-Queue-Priority": "urgent"}),
            c.post("/queue/other/app", json=BODY),
            c.delete(f"/queue/{APP}"),
            c.get("/nothing/here"),
        ]
        for r in cases:
            assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json", r.text


def test_failed_request_keeps_its_status_and_body(fake_server: Any) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        sub = c.post(f"/queue/{APP}", json={**BODY, "image_url": "data:image/png;base64,@@@"}).json()
        done = wait_done(c, sub["status_url"])
        assert done["status"] == "COMPLETED" and done["error"] and done["error_type"] == "validation_error"
        r = c.get(sub["response_url"])
        assert r.status_code == 422 and r.headers["x-fal-request-id"] == sub["request_id"]
        assert r.json()["detail"][0]["loc"] == ["body", "image_url"]
        run = c.post(f"/{APP}", json={**BODY, "image_url": "data:image/png;base64,@@@"})
        assert run.status_code == 422 and run.json()["detail"][0]["loc"] == ["body", "image_url"]


def _sse(lines: list[str]) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def test_status_stream_sends_new_logs_and_closes(start_server: Any) -> None:
    pipe = FakePipeline()
    pipe.gate.clear()  # the request stops before its first block until the stream has sent a keep-alive
    server = start_server(pipe, keepalive_interval=0.1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sub = c.post(f"/queue/{APP}", json=BODY).json()
        with c.stream("GET", f"{sub['status_url']}/stream", params={"logs": "1"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = []
            for line in r.iter_lines():  # ends only because the server closes the stream
                lines.append(line)
                if line == ": keep-alive":
                    pipe.gate.set()
    events = _sse(lines)
    assert events[-1]["status"] == "COMPLETED" and events[0]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert ": keep-alive" in lines
    streamed = [e["message"] for ev in events for e in ev["logs"]]
    with httpx.Client(base_url=server.url) as c:
        polled = [e["message"] for e in c.get(sub["status_url"], params={"logs": 1}).json()["logs"]]
    assert streamed == polled  # each line exactly once across the events
    assert all(ev["logs"] for ev in events[1:-1])


def test_sync_run_and_output_stream(start_server: Any) -> None:
    server = start_server(FakePipeline(block_delay=0.1))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(f"/{APP}", json=BODY)
        assert r.status_code == 200 and r.json()["output"] == "echo: he" and r.headers["x-fal-request-id"]
        with c.stream("POST", f"/{APP}/stream", json={**BODY, "max_tokens": 12, "block_length": 2}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = _sse(list(s.iter_lines()))
    assert events[-1]["partial"] is False and events[-1]["output"] == "echo: hello "[:12]
    assert events[-1]["usage"]["completion_tokens"] == 12
    partials = [e["output"] for e in events if e["partial"]]
    assert len(partials) >= 3 and len(set(partials)) == len(partials)  # one event per new block, in order
    assert all(events[-1]["output"].startswith(p) for p in partials)


def test_restart_requeues_and_keeps_results(start_server: Any, tmp_path: Any) -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    server = start_server(pipe, data_dir=tmp_path / "d", max_batch=1)
    with httpx.Client(base_url=server.url) as c:
        subs = [c.post(f"/queue/{APP}", json={**BODY, "prompt": f"r{i}"}).json() for i in range(3)]
        wait_running(c, subs[0]["status_url"])
    # a graceful stop puts the running request back in the queue (it is cancelled at its next block)
    server.service.worker.stop(timeout=0.1)
    pipe.gate.set()
    server.stop()
    server2 = start_server(FakePipeline(), data_dir=tmp_path / "d")
    with httpx.Client(base_url=server2.url) as c:
        outs = [c.get(wait_done(c, s["status_url"].replace(server.url, server2.url)) and
                      s["response_url"].replace(server.url, server2.url)).json()["output"] for s in subs]
    assert outs == ["echo: r0", "echo: r1", "echo: r2"]
