"""Fixtures of the server tests: live uvicorn servers on 127.0.0.1, the fal client pointed at them, the model.

The model the acceptance tests use is chosen in one place, ``model_dir``: a tiny random checkpoint written by
``nemotron_fast.testing.write_tiny_checkpoint``.

``start_server`` runs each test of the modules in ``BOTH_STORES`` twice: on the embedded SQLite store and on a
fresh PostgreSQL database (see ``pg.py``); tests in ``SQLITE_ONLY`` look into the SQLite file itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemotron_fast.server.app import create_app  # noqa: E402
from nemotron_fast.server.service import ServerConfig  # noqa: E402

from .fakes import FakePipeline  # noqa: E402
from .pg import fresh_database  # noqa: E402

BOTH_STORES = {"test_queue_api", "test_storage_auth_webhooks", "test_server_misc"}
SQLITE_ONLY = {"test_sync_client_disconnect_cancels_generation"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames:
        both = (metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_STORES
                and metafunc.function.__name__ not in SQLITE_ONLY)
        metafunc.parametrize("store_backend", ["sqlite", "postgresql"] if both else ["sqlite"], indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` (SQLite in the data dir) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_database() as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A uvicorn server in a thread, bound to 127.0.0.1."""

    def __init__(self, pipeline: Any, config: ServerConfig, **uvicorn_options: Any) -> None:
        import uvicorn

        self.app = create_app(pipeline, config)
        self.service = self.app.state.service
        self.port = free_port()
        scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2, **uvicorn_options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def start_server(tmp_path: Path, store_backend: str | None) -> Iterator[Any]:
    """``start_server(pipeline, **config)`` -> a started ``LiveServer`` (stopped at teardown)."""
    servers: list[LiveServer] = []

    def start(pipeline: Any, uvicorn_options: dict[str, Any] | None = None, **overrides: Any) -> LiveServer:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("store", store_backend)
        overrides.setdefault("allow_private_urls", True)
        overrides.setdefault("webhook_backoff_base", 0.05)
        server = LiveServer(pipeline, ServerConfig(**overrides), **(uvicorn_options or {})).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fake_server(start_server: Any) -> LiveServer:
    return start_server(FakePipeline())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """THE model of the acceptance tests (one place to change it)."""
    from nemotron_fast.testing import write_tiny_checkpoint

    return Path(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def real_pipeline(model_dir: Path) -> Any:
    """The real pipeline on CPU with the default (fast) sampler, one torch thread (CI boxes are small)."""
    import torch

    from nemotron_fast.pipeline import Pipeline

    torch.set_num_threads(1)
    return Pipeline.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def real_server(request: pytest.FixtureRequest, real_pipeline: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server per test module and store backend over the real pipeline (loopback image URLs allowed, fast
    webhook retries): the acceptance suites run on SQLite and on a fresh PostgreSQL database."""
    with ExitStack() as stack:
        store = stack.enter_context(fresh_database()) if request.param == "postgresql" else None
        server = LiveServer(real_pipeline, ServerConfig(data_dir=tmp_path_factory.mktemp("server-data"), store=store,
                                                        allow_private_urls=True, webhook_backoff_base=0.05)).start()
        yield server
        server.stop()


@pytest.fixture
def fal(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``fal(server)`` -> the ``fal_client`` module pointed at ``server`` (the 4 assignments of spec 8.2)."""
    import fal_client
    import fal_client.client as fc

    monkeypatch.setenv("FAL_KEY", "anything")

    def point(server: LiveServer) -> Any:
        monkeypatch.setattr(fc, "RUN_URL_FORMAT", f"{server.url}/")
        monkeypatch.setattr(fc, "QUEUE_URL_FORMAT", f"{server.url}/queue/")
        monkeypatch.setattr(fc, "REST_URL", server.url)
        monkeypatch.setattr(fc, "CDN_URL", server.url)
        return fal_client

    return point
