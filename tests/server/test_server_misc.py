"""CLI arguments, TLS, body limits, result retention, cancel on client disconnect."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from nemotron_fast.server.cli import add_serve_parser, build_config, run_serve
from nemotron_fast.server.service import ServerConfig

from ..certs import self_signed
from .fakes import FakePipeline
from .test_queue_api import APP, BODY, wait_done


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_arguments_build_the_config(tmp_path: Path) -> None:
    args = _parse(["--data-dir", str(tmp_path), "--api-key", "k", "--max-batch", "3", "--result-ttl", "60",
                   "--allow-private-urls", "--app-id", "me/my-app", "--port", "9001"])
    config = build_config(args)
    assert isinstance(config, ServerConfig) and args.func is run_serve and args.port == 9001
    assert (config.data_dir, config.api_key, config.max_batch, config.result_ttl, config.allow_private_urls,
            config.app_id) == (tmp_path, "k", 3, 60.0, True, "me/my-app")
    defaults = _parse([])
    assert (defaults.host, defaults.port, defaults.app_id, defaults.max_batch) == (
        "127.0.0.1", 8000, "fal-ai/nemotron-diffusion-vlm", 8)
    with pytest.raises(SystemExit):
        run_serve(_parse(["--tls-cert", "c.pem"]))
    for bad in ({"app_id": "no-slash"}, {"max_batch": 0}, {"result_ttl": 0}):
        with pytest.raises(ValueError):
            ServerConfig(data_dir=tmp_path, **bad)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def test_tls_and_https_urls(start_server: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = start_server(FakePipeline(), uvicorn_options={"ssl_certfile": str(cert), "ssl_keyfile": str(key)})
    assert server.url.startswith("https://")
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(cert))) as c:
        sub = c.post(f"/queue/{APP}", json=BODY).json()
        assert sub["status_url"].startswith(f"{server.url}/queue/")
        wait_done(c, sub["status_url"])
        assert c.get(sub["response_url"]).json()["output"] == "echo: he"


def test_oversized_body_is_413(start_server: Any) -> None:
    server = start_server(FakePipeline(), max_body_bytes=2000)
    r = httpx.post(f"{server.url}/queue/{APP}", json={**BODY, "prompt": "x" * 3000})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert httpx.post(f"{server.url}/queue/{APP}", json=BODY).status_code == 200


def test_chunked_body_over_the_cap_is_413(start_server: Any) -> None:
    server = start_server(FakePipeline(), max_body_bytes=2000)
    big = json.dumps({**BODY, "prompt": "x" * 3000}).encode()
    def chunks(data: bytes):  # no Content-Length: httpx sends a generator with Transfer-Encoding: chunked
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    for path in (f"/queue/{APP}", f"/{APP}", "/files/upload", "/v1/chat/completions"):
        r = httpx.post(f"{server.url}{path}", content=chunks(big), headers={"content-type": "application/json"})
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and r.headers["content-type"] == "application/json", (path, r.text)
        assert r.json()["detail"] == "Request body larger than 2000 bytes"
    small = json.dumps(BODY).encode()
    r = httpx.post(f"{server.url}/queue/{APP}", content=chunks(small), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE"


def test_results_expire_after_ttl(start_server: Any) -> None:
    server = start_server(FakePipeline(), result_ttl=0.5, housekeeping_interval=0.1)
    with httpx.Client(base_url=server.url) as c:
        sub = c.post(f"/queue/{APP}", json=BODY).json()
        wait_done(c, sub["status_url"])
        assert c.get(sub["response_url"]).status_code == 200
        deadline = time.monotonic() + 10
        while c.get(sub["response_url"]).status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_sync_client_disconnect_cancels_generation(start_server: Any) -> None:
    pipe = FakePipeline()
    pipe.gate.clear()  # generation waits at its first block until the client is gone
    server = start_server(pipe)
    store = server.service.store

    def wait_for(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    body = json.dumps({**BODY, "max_tokens": 400, "block_length": 4}).encode()
    head = (f"POST /{APP} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        wait_for(lambda: store.counts().get("running", 0) == 1, "the request did not start")
    with sqlite3.connect(store.path) as db:
        (request_id,), = db.execute("SELECT id FROM requests").fetchall()
    # the client is gone while its request runs: the server cancels it at the next block
    wait_for(lambda: store.cancel_requested(request_id), "the disconnect was not noticed")
    pipe.gate.set()
    wait_for(lambda: store.counts().get("done", 0) == 1, "the request did not finish")
    with sqlite3.connect(store.path) as db:
        rows = db.execute("SELECT kind, error_type FROM requests").fetchall()
    assert rows == [("sync", "request_cancelled")]


def test_fal_client_env_vars_only_over_tls(start_server: Any, tmp_path: Path) -> None:
    """Spec 8.2 option 1: no code changes, only FAL_RUN_HOST / FAL_QUEUE_RUN_HOST / SSL_CERT_FILE."""
    cert, key = _self_signed(tmp_path)
    server = start_server(FakePipeline(), uvicorn_options={"ssl_certfile": str(cert), "ssl_keyfile": str(key)})
    host = f"127.0.0.1:{server.port}"
    script = ("import fal_client, json; args = json.loads(input());"
              f"print(fal_client.subscribe('{APP}', args)['output']); print(fal_client.run('{APP}', args)['output'])")
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue", "SSL_CERT_FILE": str(cert),
           "FAL_KEY": "anything"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(BODY), env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["echo: he", "echo: he"]
