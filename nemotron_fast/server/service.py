"""Server configuration and the shared state every route uses (store, files, worker, webhooks, URL building).

Roles: ``all`` (one process: HTTP API, model worker, webhooks), ``api`` (HTTP API only, no model) and ``worker``
(model worker and webhooks; HTTP only for ``/health``). ``api`` and ``worker`` need the shared PostgreSQL store:
any number of each, on any hosts. The webhook key and the storage-token secret then live in the store, so
every process signs with the same key and accepts the same tokens.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import Request

from ..params import validate_inputs
from .steps import STEP_LEVEL, StepLog
from .storage import FileStore, FileStoreBase
from .store import RequestRow, RequestStore, Store, open_store, parse_store_url
from .webhooks import WebhookDeliverer, WebhookSigner
from .worker import ModelWorker, PipelineLike

__all__ = ["ServerConfig", "Service", "default_data_dir", "sse_event", "ROLES"]

ROLES = ("all", "api", "worker")

_HOST_RE = re.compile(r"^[A-Za-z0-9._\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~\-]+)*$")


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/nemotron-fast/server`` (``~/.local/share/...`` by default)."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(root) / "nemotron-fast" / "server"


@dataclass
class ServerConfig:
    """Everything ``nemotron-fast serve`` can set; the defaults are the CLI's defaults."""

    data_dir: Path = field(default_factory=default_data_dir)
    app_id: str = "fal-ai/nemotron-diffusion-vlm"
    api_key: str | None = None
    allow_private_urls: bool = False
    max_batch: int = 8
    result_ttl: float = 24 * 3600.0
    public_url: str | None = None
    max_body_bytes: int = 128 * 1024 * 1024
    max_upload_bytes: int = 100 * 1024 * 1024
    max_attempts: int = 3
    webhook_max_attempts: int = 10
    webhook_backoff_base: float = 5.0
    webhook_user_id: str = "local"
    keepalive_interval: float = 10.0
    housekeeping_interval: float = 60.0
    store: str | None = None  # sqlite:///path or postgresql://...; None: SQLite in data_dir
    role: str = "all"
    lease_ttl: float = 30.0
    worker_id: str | None = None
    batching: str = "continuous"  # or "static": claimed requests run as one batched generation

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        kind = parse_store_url(self.store)[0] if self.store else "sqlite"
        if self.role != "all" and kind != "postgresql":
            raise ValueError(f"--role {self.role} needs a shared store (--store postgresql://...); the SQLite store "
                             "serves one process (--role all)")
        if not (0 < self.lease_ttl < float("inf")):
            raise ValueError(f"lease_ttl must be > 0 seconds, got {self.lease_ttl}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        parts = self.app_id.strip("/").split("/")
        if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z0-9._\-]+", p) for p in parts):
            raise ValueError(f"app id must look like 'owner/alias', got {self.app_id!r}")
        self.app_id = "/".join(parts)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {self.batching!r}")
        if self.result_ttl <= 0:
            raise ValueError(f"result_ttl must be > 0 seconds, got {self.result_ttl}")


def sse_event(data: str) -> bytes:
    """One server-sent event carrying ``data`` (a JSON document on one line)."""
    return f"data: {data}\n\n".encode()


class Service:
    """The server's shared state; created by ``create_app``, started and stopped by its lifespan."""

    def __init__(self, pipeline: PipelineLike | None, config: ServerConfig) -> None:
        if pipeline is None and config.role != "api":
            raise ValueError(f"role {config.role!r} runs the model: it needs a pipeline")
        self.pipeline = pipeline
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store: Store
        self.files: FileStoreBase
        if config.store is None:
            self.store = RequestStore(config.data_dir / "requests.sqlite3", max_attempts=config.max_attempts)
        else:
            self.store = open_store(config.store, max_attempts=config.max_attempts, lease_ttl=config.lease_ttl)
        if self.store.shared:
            from .store_pg import PostgresFileStore, PostgresStore

            assert isinstance(self.store, PostgresStore)
            self.files = PostgresFileStore(self.store, config.data_dir / "files-cache",
                                           max_bytes=config.max_upload_bytes)
            self.signer = WebhookSigner(pem=self.store.setting("webhook_ed25519_pem", WebhookSigner.new_pem),
                                        user_id=config.webhook_user_id)
            secret = self.store.setting("secret", lambda: secrets.token_hex(32).encode()).decode()
        else:
            self.files = FileStore(config.data_dir / "files", max_bytes=config.max_upload_bytes)
            self.signer = WebhookSigner(config.data_dir / "webhook_ed25519.pem", user_id=config.webhook_user_id)
            secret_path = config.data_dir / "secret"
            if not secret_path.exists():
                secret_path.write_text(secrets.token_hex(32))
                secret_path.chmod(0o600)
            secret = secret_path.read_text().strip()
        # The storage token: derived from the API key when one is set, so it changes with the key.
        self.cdn_token = hmac.new(secret.encode(), (config.api_key or "").encode(), hashlib.sha256).hexdigest()
        self.steps = StepLog(self.store)  # the playground's opt-in step events, in the store
        self.worker: ModelWorker | None = None
        if pipeline is not None:
            # the Engine needs a real fast-sampler pipeline; the reference sampler (and test fakes) run static batches
            continuous = config.batching == "continuous" and getattr(pipeline, "sampler", None) == "fast" and \
                hasattr(pipeline, "engine_request")
            kind = ModelWorker
            if continuous:
                from .engine_worker import EngineWorker  # imports torch: only where a model runs

                kind = EngineWorker
            self.worker = kind(pipeline, self.store, max_batch=config.max_batch,
                               allow_private_urls=config.allow_private_urls, resolve_local=self.files.resolve_url,
                               worker_id=config.worker_id, steps=self.steps)
        self.deliverer = WebhookDeliverer(self.store, self.signer, allow_private_urls=config.allow_private_urls,
                                          max_attempts=config.webhook_max_attempts,
                                          backoff_base=config.webhook_backoff_base, housekeeping=self.housekeeping,
                                          housekeeping_interval=config.housekeeping_interval)
        self._lock_file: Any = None
        self.started_at = time.time()

    # --- lifecycle -------------------------------------------------------------------------------------------
    @property
    def runs_model(self) -> bool:
        return self.worker is not None

    def start(self) -> None:
        """Recover what a previous process left (SQLite: lock the data dir first, this process is the only one;
        PostgreSQL: take back expired leases), then start the worker and the webhook thread (not in ``api``)."""
        if not self.store.shared:
            self._lock_file = open(self.config.data_dir / "server.lock", "w")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._lock_file.close()
                self._lock_file = None
                raise RuntimeError(f"another server is using the data dir {self.config.data_dir}") from exc
        self.store.recover()
        if self.worker is not None:
            self.housekeeping()
            self.worker.start()
            self.deliverer.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.deliverer.stop()
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        if self.store.shared:
            self.store.close()

    def housekeeping(self) -> None:
        """Drop results and files older than the result TTL."""
        self.store.purge(self.config.result_ttl)
        self.files.purge(self.config.result_ttl)

    # --- URLs ------------------------------------------------------------------------------------------------
    def base_url(self, request: Request) -> str:
        """Public origin (and path prefix) as the caller sees it: ``--public-url``, else X-Forwarded-*/Host."""
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        headers = request.headers
        proto = (headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
        if proto not in ("http", "https"):
            proto = request.url.scheme
        host = (headers.get("x-forwarded-host") or "").split(",")[0].strip() or headers.get("host", "")
        if not _HOST_RE.match(host):
            host = request.url.netloc
        prefix = (headers.get("x-forwarded-prefix") or "").split(",")[0].strip().rstrip("/")
        if not _PREFIX_RE.match(prefix):
            prefix = ""
        prefix = prefix or str(request.scope.get("root_path", "")).rstrip("/")
        return f"{proto}://{host}{prefix}"

    def request_urls(self, request: Request, request_id: str) -> dict[str, str]:
        base = f"{self.base_url(request)}/queue/{self.config.app_id}/requests/{request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    # --- validation and status -------------------------------------------------------------------------------
    def validate(self, inputs: dict[str, Any]) -> None:
        """The pipeline's schema rules (cheap, no image fetch, no model needed); raises ``InputValidationError``."""
        if self.pipeline is not None:
            self.pipeline.validate(dict(inputs))
        else:
            validate_inputs(dict(inputs))

    def status_body(self, request: Request, row: RequestRow, *, with_logs: bool,
                    logs: list[tuple[int, float, str, str]] | None = None) -> dict[str, Any]:
        """The status document of spec section 2.2 (``logs`` given: exactly those lines, for SSE events)."""
        body: dict[str, Any] = {"status": row.wire_status, "request_id": row.id, **self.request_urls(request, row.id)}
        if with_logs:
            entries = self.store.logs(row.id) if logs is None else logs
            body["logs"] = [format_log(entry) for entry in entries if entry[2] != STEP_LEVEL]
        else:
            body["logs"] = None
        if row.state == "queued":
            body["queue_position"] = self.store.queue_position(row.id)
        if row.state == "done":
            body["metrics"] = {} if row.inference_time is None else {"inference_time": row.inference_time}
            body["error"] = row.error
            body["error_type"] = row.error_type
        return body

    async def wait_done(self, request: Request, request_id: str, *, until_partial: bool = False) -> RequestRow | None:
        """Wait until the request completes (or, with ``until_partial``, produces its first partial output).

        A client that disconnects cancels its request; ``None`` is returned then.
        """
        seen = -1
        while True:
            version = self.store.version(request_id)
            if version != seen:
                seen = version
                row = await to_thread.run_sync(self.store.get, request_id)
                if row is None or row.state == "done" or (until_partial and self.store.partial(request_id)):
                    return row
            if await request.is_disconnected():
                await to_thread.run_sync(self.store.cancel, request_id)
                return None
            await asyncio.sleep(0.05)

    async def partials(self, request_id: str) -> AsyncIterator[str | RequestRow]:
        """Yield each new partial text, then the finished row; keep-alive ticks yield ``""``."""
        seen, last_text, last_beat = -1, None, time.monotonic()
        while True:
            version = self.store.version(request_id)
            if version != seen:
                seen = version
                text = self.store.partial(request_id)
                if text is not None and text != last_text:
                    last_text = text
                    last_beat = time.monotonic()
                    yield text
                row = await to_thread.run_sync(self.store.get, request_id)
                if row is None or row.state == "done":
                    if row is not None:
                        yield row
                    return
            if time.monotonic() - last_beat >= self.config.keepalive_interval:
                last_beat = time.monotonic()
                yield ""
            await asyncio.sleep(0.05)


def format_log(entry: tuple[int, float, str, str]) -> dict[str, str]:
    """A stored log line as the wire's ``{message, level, source, timestamp}``."""
    _, ts, level, message = entry
    stamp = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"message": message, "level": level, "source": "USER", "timestamp": stamp}

