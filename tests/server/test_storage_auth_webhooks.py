"""Uploads and stored files, API-key auth, signed webhooks with retries, outbound URL checks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nemotron_fast.server.webhooks import check_outbound_url, is_public_address, verify_signature

from .fakes import FakePipeline
from .receivers import WebhookReceiver
from .test_queue_api import APP, BODY, wait_done
from .test_store_backends import wait_for


def test_js_style_upload_initiate_put_get(fake_server: Any) -> None:
    with httpx.Client(base_url=fake_server.url) as c:
        init = c.post("/storage/upload/initiate", params={"storage_type": "fal-cdn-v3"},
                      json={"content_type": "image/png", "file_name": "../../etc/cat photo.png"})
        assert init.status_code == 200
        urls = init.json()
        assert urls["file_url"].startswith(f"{fake_server.url}/files/") and urls["file_url"].endswith("/cat_photo.png")
        assert c.get(urls["file_url"]).status_code == 404  # not uploaded yet
        put = httpx.put(urls["upload_url"], content=b"PNGDATA", headers={"Content-Type": "image/png"})
        assert put.status_code == 200
        got = c.get(urls["file_url"])
        assert got.content == b"PNGDATA" and got.headers["content-type"] == "image/png"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert httpx.put(urls["upload_url"], content=b"again").status_code == 409
        assert httpx.put(f"{fake_server.url}/storage/upload/{'0' * 32}", content=b"x").status_code == 404


def test_upload_size_limit(start_server: Any) -> None:
    server = start_server(FakePipeline(), max_upload_bytes=1000)
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/files/upload", content=b"x" * 1001, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        assert c.post("/files/upload", content=b"x" * 1000).status_code == 200


def test_api_key_required_when_set(start_server: Any, fal: Any) -> None:
    server = start_server(FakePipeline(), api_key="s3cret")
    with httpx.Client(base_url=server.url) as c:
        for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": "s3cret"}):
            r = c.post(f"/queue/{APP}", json=BODY, headers=headers)
            assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        ok = c.post(f"/queue/{APP}", json=BODY, headers={"Authorization": "Key s3cret"})
        assert ok.status_code == 200
        assert c.get(ok.json()["status_url"]).status_code == 401
        assert c.get("/.well-known/jwks.json").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.post("/files/upload", content=b"x", headers={"Authorization": "Bearer guess"}).status_code == 401
    client = fal(server).SyncClient(key="s3cret")
    url = client.upload(b"bytes", "image/png")  # token + /files/upload, the token authorizes the upload
    assert httpx.get(url).content == b"bytes"  # stored files are public, like fal's CDN
    assert client.run(APP, {**BODY, "image_url": url})["output"] == "echo: he"
    with pytest.raises(Exception) as info:
        fal(server).SyncClient(key="nope").run(APP, BODY)
    assert info.value.status_code == 401


def test_own_uploads_bypass_private_url_check(start_server: Any, fal: Any) -> None:
    server = start_server(FakePipeline(), allow_private_urls=False)
    client = fal(server).SyncClient(key="k")
    url = client.upload(b"image-bytes", "image/png", file_name="x.png")
    assert url.startswith("http://127.0.0.1:")
    assert client.run(APP, {**BODY, "image_url": url, "max_tokens": 20})["output"] == "echo: hello [11]"
    with pytest.raises(Exception) as info:  # any other loopback URL is refused
        client.run(APP, {**BODY, "image_url": f"{server.url}/health"})
    assert info.value.status_code == 422


def test_own_upload_is_read_from_disk_only_on_its_own_origin(start_server: Any) -> None:
    server = start_server(FakePipeline(), allow_private_urls=False)
    with httpx.Client(base_url=server.url) as c:
        url = c.post("/files/upload", content=b"image-bytes", headers={"Content-Type": "image/png"}).json()
        url = url["access_url"]
        assert url.startswith(f"{server.url}/files/")
        files = server.service.files
        path = files.resolve_url(url)
        assert path is not None and Path(path).read_bytes() == b"image-bytes"
        assert files.resolve_url(url.replace("http://", "HTTP://")) == path  # scheme and host are case-free
        suffix = url[len(server.url):]
        for other in (f"http://localhost:{server.port}{suffix}", f"https://127.0.0.1:{server.port}{suffix}",
                      f"http://example.com{suffix}", f"http://127.0.0.1:{server.port}/prefix{suffix}"):
            assert files.resolve_url(other) is None, other
        # the same file under another host is fetched like any URL, and loopback is refused without the flag
        r = c.post(f"/{APP}", json={**BODY, "image_url": f"http://localhost:{server.port}{suffix}"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_url"]
        assert c.post(f"/{APP}", json={**BODY, "image_url": url, "max_tokens": 20}).json()["output"] == \
            "echo: hello [11]"


def test_uploads_are_written_off_the_event_loop(fake_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_server.service.files
    threads: list[threading.Thread] = []
    real_write = type(files).write

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(type(files), "write", spy)
    with httpx.Client(base_url=fake_server.url) as c:
        assert c.post("/files/upload", content=b"raw").status_code == 200
        init = c.post("/storage/upload/initiate", json={"content_type": "image/png"}).json()
        assert c.put(init["upload_url"], content=b"put").status_code == 200
    assert len(threads) == 2 and all(t is not fake_server.thread for t in threads)  # the loop's thread


def test_signed_webhook_with_retries(start_server: Any) -> None:
    receiver = WebhookReceiver(fail_first=2)
    try:
        server = start_server(FakePipeline())
        with httpx.Client(base_url=server.url) as c:
            sub = c.post(f"/queue/{APP}", json=BODY, params={"fal_webhook": receiver.url}).json()
            bad = c.post(f"/queue/{APP}", json={**BODY, "image_url": "data:image/png;base64,@@"},
                         params={"fal_webhook": receiver.url}).json()
            invalid = c.post(f"/queue/{APP}", json={"image_url": BODY["image_url"]},
                             params={"fal_webhook": receiver.url})
            assert invalid.status_code == 200  # accepted as on the hosted queue; it fails with a 422
            invalid = invalid.json()
            jwks = c.get("/.well-known/jwks.json").json()
        deliveries = receiver.wait(3)
        assert receiver.attempts == 5  # two refused, both retried
        by_id = {json.loads(body)["request_id"]: (headers, body) for headers, body, _ in deliveries}
        headers, body = by_id[sub["request_id"]]
        doc = json.loads(body)
        assert doc["status"] == "OK" and doc["error"] is None and doc["payload"]["output"] == "echo: he"
        assert doc["gateway_request_id"] == sub["request_id"]
        assert verify_signature(jwks, headers, body)
        assert not verify_signature(jwks, headers, body.replace(b"echo", b"ECHO"))
        assert not verify_signature(jwks, {**headers, "X-Fal-Webhook-Timestamp": str(int(time.time()) - 1000)}, body)
        headers, body = by_id[bad["request_id"]]
        doc = json.loads(body)
        assert doc["status"] == "ERROR" and doc["error"] == "Invalid status code: 422"
        assert doc["payload"]["detail"][0]["loc"] == ["body", "image_url"] and verify_signature(jwks, headers, body)
        headers, body = by_id[invalid["request_id"]]
        doc = json.loads(body)
        assert doc["status"] == "ERROR" and doc["error"] == "Invalid status code: 422"
        assert doc["payload"]["detail"][0]["loc"] == ["body", "prompt"] and doc["payload"]["detail"][0]["type"] == \
            "missing" and verify_signature(jwks, headers, body)
        assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"
        # the deliverer records the delivery after the receiver has answered: wait for that state
        wait_for(lambda: server.service.store.webhook_state(sub["request_id"])[0] == "delivered",
                 "the delivery to be recorded")
    finally:
        receiver.close()


def test_webhook_gives_up_after_max_attempts(start_server: Any) -> None:
    receiver = WebhookReceiver(fail_first=100)
    try:
        server = start_server(FakePipeline(), webhook_max_attempts=3)
        with httpx.Client(base_url=server.url) as c:
            sub = c.post(f"/queue/{APP}", json=BODY, params={"fal_webhook": receiver.url}).json()
            wait_done(c, sub["status_url"])
        deadline = time.monotonic() + 10
        while server.service.store.webhook_state(sub["request_id"])[0] == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.service.store.webhook_state(sub["request_id"]) == ("failed", 3) and receiver.attempts == 3
    finally:
        receiver.close()


def test_private_webhook_refused_without_flag(start_server: Any) -> None:
    server = start_server(FakePipeline(), allow_private_urls=False)
    with httpx.Client(base_url=server.url) as c:
        for hook in ("http://127.0.0.1:9/hook", "http://localhost/x", "http://[::1]/x", "http://169.254.169.254/"):
            r = c.post(f"/queue/{APP}", json=BODY, params={"fal_webhook": hook})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "fal_webhook"], hook


@pytest.mark.parametrize("ip,public", [("8.8.8.8", True), ("10.0.0.1", False), ("127.0.0.1", False),
                                       ("169.254.1.1", False), ("::1", False), ("::ffff:127.0.0.1", False),
                                       ("fe80::1", False), ("192.168.1.1", False), ("100.64.0.1", False),
                                       ("2001:4860:4860::8888", True), ("224.0.0.1", False), ("nonsense", False)])
def test_public_address_classification(ip: str, public: bool) -> None:
    assert is_public_address(ip) is public


def test_outbound_url_check() -> None:
    assert check_outbound_url("http://127.0.0.1/x", allow_private=True) is None
    assert check_outbound_url("gopher://example.com/", allow_private=True) is not None
    assert check_outbound_url("http://127.0.0.1/x", allow_private=False) is not None
    assert check_outbound_url("http://10.1.2.3/x", allow_private=False, resolve=False) is not None
    assert check_outbound_url("http://[::ffff:10.0.0.1]/", allow_private=False, resolve=False) is not None
    assert check_outbound_url("http://example.com:99999/", allow_private=True) is not None
