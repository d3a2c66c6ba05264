"""The FastAPI application: middleware (auth, body size, CORS), error handlers, lifespan and route wiring.

``create_app(pipeline, config)`` is the whole server; ``nemotron-fast serve`` wraps it in uvicorn. With
``config.role == "api"`` the pipeline may be ``None`` (no model: requests run on worker processes); with
``"worker"`` the app serves only ``/health``. Every error
is JSON: 422 ``{"detail": [...]}`` for schema rules, 4xx for caller mistakes, 401 when ``api_key`` is set and
the caller does not send it; a 500 only for a bug (then as JSON too).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from .. import __version__, errors
from .openai_compat import build_openai_router
from .playground import build_playground_router
from .routes import build_queue_router, error_detail
from .service import ServerConfig, Service
from .storage import build_storage_router
from .worker import PipelineLike

__all__ = ["create_app"]

logger = logging.getLogger("nemotron_fast.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def _public_path(method: str, path: str) -> bool:
    """Routes that never need the API key: preflight, file reads, upload PUTs (capability URL), key + docs, and
    the playground's static page (it sends the key the user types with its API calls)."""
    if method == "OPTIONS":
        return True
    if method in ("GET", "HEAD") and (path in ("/", "/playground") or path.startswith("/playground/")):
        return True
    if method in ("GET", "HEAD") and (path.startswith("/files/") or path in (
            "/.well-known/jwks.json", "/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")):
        return True
    return method == "PUT" and path.startswith("/storage/upload/")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body (declared or chunked) has passed the cap; answered with a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"Request body larger than {limit} bytes")


class GuardMiddleware:
    """Pure ASGI middleware: rejects oversized bodies (413) and, with an API key, unauthenticated calls (401).

    A declared ``Content-Length`` over the cap is refused before the app runs; a body without one (chunked) is
    counted as it streams in, and the read that passes the cap raises :class:`BodyTooLarge` (FastAPI re-raises
    an ``HTTPException`` from body parsing, and routes that stream the body see it too), so the app never holds
    more than the cap."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, cdn_token: str, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.accepted: list[bytes] = []
        if api_key:
            self.accepted = [f"Key {api_key}".encode(), f"Bearer {api_key}".encode()]
        self.cdn = f"Bearer {cdn_token}".encode()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_json(send, 413, {"detail": f"Request body larger than {self.max_body_bytes} bytes"})
            return
        if self.accepted and not _public_path(scope["method"], scope["path"]):
            given = headers.get(b"authorization", b"").strip()
            ok = any(hmac.compare_digest(given, key) for key in self.accepted)
            if not ok and scope["path"] == "/files/upload":
                ok = hmac.compare_digest(given, self.cdn)
            if not ok:
                await _send_json(send, 401, {"detail": "Invalid or missing API key: send 'Authorization: Key <key>'"},
                                 extra=[(b"www-authenticate", b'Key realm="nemotron-fast"')])
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_json(send, 413, {"detail": exc.detail})


async def _send_json(send: Callable[[Message], Awaitable[None]], status: int, body: dict[str, Any],
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})


def create_app(pipeline: PipelineLike | None, config: ServerConfig | None = None) -> FastAPI:
    """The server as an ASGI app. Threads (model worker, webhooks) run while its lifespan is active."""
    config = config or ServerConfig()
    svc = Service(pipeline, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(
        title="nemotron-fast server",
        version=__version__,
        description=f"Local drop-in for the hosted `{config.app_id}` endpoint: fal queue API, sync run, "
                    "output streaming, storage, webhooks and an OpenAI-compatible chat endpoint.",
        lifespan=lifespan,
    )
    app.state.service = svc

    @app.exception_handler(errors.InputValidationError)
    async def _input_error(request: Request, exc: errors.InputValidationError) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": error_detail(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal server error", "error_type": "internal_error"}, status_code=500)

    @app.get("/health", tags=["server"])
    def health() -> dict[str, Any]:
        """Liveness: the worker thread is alive (roles that run the model), the role, requests per state."""
        alive = svc.worker is None or svc.worker.alive
        body: dict[str, Any] = {"status": "ok" if alive else "worker_stopped", "app_id": config.app_id,
                                "role": config.role, "requests": svc.store.counts()}
        if svc.worker is not None:
            body["worker_id"] = svc.worker.worker_id
            body["batching"] = "continuous" if hasattr(svc.worker, "engine") else "static"
        return body

    if config.role == "worker":
        return app

    @app.get("/.well-known/jwks.json", tags=["webhooks"])
    def jwks() -> dict[str, Any]:
        """Public key (OKP/Ed25519 JWKS) that verifies this server's webhook signatures."""
        return svc.signer.jwks()

    app.include_router(build_queue_router(svc))
    app.include_router(build_storage_router(svc.files, svc.base_url, svc.cdn_token))
    app.include_router(build_openai_router(svc))
    app.include_router(build_playground_router(svc))
    app.add_middleware(GuardMiddleware, api_key=config.api_key, cdn_token=svc.cdn_token,  # type: ignore[arg-type]
                       max_body_bytes=config.max_body_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],  # type: ignore[arg-type]
                       allow_headers=["*"], expose_headers=["x-fal-request-id"])
    return app
