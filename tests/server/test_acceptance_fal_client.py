"""Acceptance: the official python ``fal-client`` (1.0.3) against a live server running the real pipeline.

The client is pointed at the server with the four assignments of spec section 8.2 (the ``fal`` fixture).
Expected outputs come from running the same pipeline directly (while the server is idle).
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from nemotron_fast.server.webhooks import verify_signature

from .receivers import WebhookReceiver

APP = "fal-ai/nemotron-diffusion-vlm"
pytestmark = pytest.mark.slow


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    img = Image.new("RGB", size)
    img.putdata([((x * 7 + seed * 31) % 256, (y * 11 + seed * 17) % 256, (x * y + seed) % 256)
                 for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def request(i: int, **extra: Any) -> dict[str, Any]:
    import fal_client

    return {"image_url": fal_client.encode(png(i % 5), "image/png"), "prompt": f"What is in picture {i}?",
            "max_tokens": 8 if i % 2 else 12, "block_length": 4, **extra}


def test_subscribe_with_logs(real_server: Any, real_pipeline: Any, fal: Any) -> None:
    client = fal(real_server)
    args = request(1)
    expected = real_pipeline.run(args)
    updates: list[Any] = []
    result = client.subscribe(APP, args, with_logs=True, on_queue_update=updates.append)
    assert result["output"] == expected["output"] and result["usage"] == expected["usage"]
    assert set(result["timings"]) == set(expected["timings"])
    completed = updates[-1]
    assert isinstance(completed, client.Completed) and completed.error is None
    assert completed.metrics["inference_time"] > 0
    assert any("committed" in entry["message"] for entry in completed.logs)


def test_submit_status_result(real_server: Any, real_pipeline: Any, fal: Any) -> None:
    client = fal(real_server)
    args = request(2)
    expected = real_pipeline.run(args)["output"]
    handle = client.submit(APP, args)
    first = handle.status()
    assert isinstance(first, (client.Queued, client.InProgress, client.Completed))
    assert handle.get()["output"] == expected
    status = client.status(APP, handle.request_id, with_logs=True)
    assert isinstance(status, client.Completed) and status.logs
    assert client.result(APP, handle.request_id)["output"] == expected


def test_run_and_stream(real_server: Any, real_pipeline: Any, fal: Any) -> None:
    client = fal(real_server)
    args = request(3, max_tokens=16)
    expected = real_pipeline.run(args)["output"]
    assert client.run(APP, args)["output"] == expected
    events = list(client.stream(APP, args))
    assert events[-1]["partial"] is False and events[-1]["output"] == expected
    assert all(e["partial"] for e in events[:-1])


def test_cancel_queued_and_running(real_server: Any, fal: Any) -> None:
    client = fal(real_server)
    long_args = request(4, max_tokens=4096, block_length=8)
    running = client.submit(APP, long_args)
    queued = client.submit(APP, request(5))
    deadline = time.monotonic() + 30
    while not isinstance(running.status(), client.InProgress):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queued.cancel()
    running.cancel()
    for handle in (running, queued):
        deadline = time.monotonic() + 30
        while not isinstance(status := handle.status(with_logs=True), client.Completed):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status.error == "Request was cancelled"
        with pytest.raises(client.FalClientHTTPError) as info:
            handle.get()
        assert info.value.status_code == 400
    blocks = [e for e in running.status(with_logs=True).logs if "committed" in e["message"]]
    assert len(blocks) < 512  # stopped long before its 512 blocks
    # (with continuous batching, the default, the second request joins the running one at the next block boundary
    # instead of waiting behind it, so it may have committed a block before its cancel; a request cancelled while
    # still queued is covered by tests/server/test_queue_api.py)
    with pytest.raises(client.FalClientHTTPError) as info:
        queued.cancel()
    assert info.value.status_code == 400


def test_upload_and_data_uri_give_the_same_answer(real_server: Any, fal: Any) -> None:
    client = fal(real_server)
    data = png(9, (56, 42))
    url = client.upload(data, "image/png", file_name="pic.png")
    assert url.startswith(real_server.url) and httpx.get(url).content == data
    # lossless, so all three carry the same pixels (upload_image defaults to JPEG, which changes them)
    image_url = client.upload_image(Image.open(io.BytesIO(data)), format="png")
    by_url = client.run(APP, {"image_url": url, "prompt": "Describe.", "max_tokens": 8, "block_length": 4})
    by_pil = client.run(APP, {"image_url": image_url, "prompt": "Describe.", "max_tokens": 8, "block_length": 4})
    by_uri = client.run(APP, {"image_url": client.encode(data, "image/png"), "prompt": "Describe.",
                              "max_tokens": 8, "block_length": 4})
    assert by_url["output"] == by_uri["output"] == by_pil["output"]
    assert by_url["usage"] == by_uri["usage"]


def test_webhook_on_loopback_listener(real_server: Any, real_pipeline: Any, fal: Any) -> None:
    client = fal(real_server)
    receiver = WebhookReceiver()
    try:
        args = request(6)
        expected = real_pipeline.run(args)["output"]
        handle = client.submit(APP, args, webhook_url=receiver.url)
        headers, body, _ = receiver.wait(1)[0]
        jwks = httpx.get(f"{real_server.url}/.well-known/jwks.json").json()
        assert verify_signature(jwks, headers, body)
        doc = json.loads(body)
        assert doc["request_id"] == handle.request_id and doc["status"] == "OK"
        assert doc["payload"]["output"] == expected
    finally:
        receiver.close()


def test_missing_prompt_is_422(real_server: Any, fal: Any) -> None:
    client = fal(real_server)
    args = request(7)
    del args["prompt"]
    handle = client.submit(APP, args)  # the queue accepts it, as the hosted one does, and fails it with a 422
    for call in (lambda: client.run(APP, args), handle.get, lambda: client.subscribe(APP, args)):
        with pytest.raises(client.FalClientHTTPError) as info:
            call()
        assert info.value.status_code == 422
        assert any(d["loc"] == ["body", "prompt"] and d["type"] == "missing" for d in info.value.message)


def test_50_concurrent_submissions(real_server: Any, real_pipeline: Any, fal: Any) -> None:
    client = fal(real_server)
    inputs = [request(i) for i in range(50)]
    expected = [{k: v for k, v in real_pipeline.run(args).items() if k != "timings"} for args in inputs]
    assert len({e["output"] for e in expected}) > 1
    sizes_before = len(real_server.service.worker.batch_sizes)
    barrier = threading.Barrier(50)

    def one(args: dict[str, Any]) -> dict[str, Any]:
        barrier.wait()
        result = client.submit(APP, args).get()
        return {"output": result["output"], "usage": result["usage"]}

    with ThreadPoolExecutor(50) as pool:
        outputs = list(pool.map(one, inputs))
    assert outputs == expected
    sizes = real_server.service.worker.batch_sizes[sizes_before:]
    assert sum(sizes) == 50 and max(sizes) > 1  # really batched
