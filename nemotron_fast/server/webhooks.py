"""Signed webhook delivery (spec section 6), the JWKS that publishes the key, and outbound URL checks.

Every delivery is signed with the server's own ED25519 key (created once in the data dir): the hex signature
covers ``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(raw_body)}"`` and the public key is served at
``/.well-known/jwks.json`` as an OKP/Ed25519 JWK. Deliveries are stored with the result (same transaction),
claimed by one deliverer at a time (any worker process), never follow redirects, and connect to the address that
was checked (:mod:`nemotron_fast.netguard`). A failed delivery is retried with jittered exponential backoff, except
after a 4xx other than 408 and 429: the receiver refused that body, and sending it again will not change its
answer. Every attempt carries ``Idempotency-Key``: one request has one result and one delivery, so the key is the
same on every retry, from whichever worker, and a receiver drops a repeat after a crash by it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..netguard import AddressNotAllowed, PinnedTransport, is_public_address
from .store import Store

__all__ = ["WebhookSigner", "WebhookDeliverer", "signature_message", "verify_signature", "check_outbound_url",
           "is_public_address", "idempotency_key"]

logger = logging.getLogger("nemotron_fast.server")


def signature_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes a webhook signature covers."""
    return f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


class WebhookSigner:
    """The server's ED25519 webhook key: loaded from (or created in) ``key_path``, or given as ``pem``."""

    def __init__(self, key_path: str | Path | None = None, *, user_id: str = "local", pem: bytes | None = None) -> None:
        self.user_id = user_id
        if pem is not None:  # a key shared by every process of a deployment (kept in the store)
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("the shared webhook key is not an ED25519 private key")
            self._key = key
        elif key_path is None:
            raise ValueError("WebhookSigner needs a key_path or a pem")
        elif (path := Path(key_path)).exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an ED25519 private key")
            self._key = key
        else:
            self._key = Ed25519PrivateKey.generate()
            pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, path)
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_raw = raw
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS document (RFC 8037 OKP key)."""
        x = base64.urlsafe_b64encode(self.public_raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}

    @staticmethod
    def new_pem() -> bytes:
        """A fresh ED25519 private key as PKCS#8 PEM."""
        return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The ``X-Fal-Webhook-*`` headers of one delivery of ``body``, and its ``Idempotency-Key``."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self._key.sign(signature_message(request_id, self.user_id, ts, body)).hex()
        return {"Content-Type": "application/json", "X-Fal-Webhook-Request-Id": request_id,
                "X-Fal-Webhook-User-Id": self.user_id, "X-Fal-Webhook-Timestamp": ts,
                "X-Fal-Webhook-Signature": signature, "Idempotency-Key": idempotency_key(request_id)}


def idempotency_key(request_id: str) -> str:
    """The ``Idempotency-Key`` of a request's webhook: the same on every attempt (one result, one delivery)."""
    return f"nemotron-fast-webhook-{request_id}"


def verify_signature(jwks: dict[str, Any], headers: dict[str, str], body: bytes, *, max_skew: float = 300.0) -> bool:
    """Check a delivery the way a receiver should: a key from the JWKS, a fresh timestamp, the body hash."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        ts = lower["x-fal-webhook-timestamp"]
        if abs(time.time() - int(ts)) > max_skew:
            return False
        message = signature_message(lower["x-fal-webhook-request-id"], lower["x-fal-webhook-user-id"], ts, body)
        signature = bytes.fromhex(lower["x-fal-webhook-signature"])
    except (KeyError, ValueError):
        return False
    for jwk in jwks.get("keys", []):
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except Exception:
            continue
    return False


def check_outbound_url(url: str, *, allow_private: bool, resolve: bool = True) -> str | None:
    """Why ``url`` may not be called by this server, or ``None`` when it may.

    Only http(s) URLs with a host are allowed; unless ``allow_private``, every address the host resolves to must
    be public (``resolve=False`` checks only literal addresses and ``localhost``, for a cheap check at submit).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL with a host"
    if allow_private:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "refusing a loopback address (start the server with --allow-private-urls to allow it)"
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if literal or resolve:
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                       type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return f"cannot resolve host {host!r}: {exc}"
        for info in infos:
            if not is_public_address(str(info[4][0])):
                return (f"refusing non-public address {info[4][0]} of {host!r} "
                        "(start the server with --allow-private-urls to allow it)")
    return None


class WebhookDeliverer:
    """Background thread: delivers due webhooks with retries and runs periodic housekeeping."""

    def __init__(self, store: Store, signer: WebhookSigner, *, allow_private_urls: bool = False,
                 max_attempts: int = 10, backoff_base: float = 5.0, backoff_max: float = 1800.0,
                 timeout: float = 15.0, housekeeping: Callable[[], None] | None = None,
                 housekeeping_interval: float = 60.0) -> None:
        self.store = store
        self.signer = signer
        self.allow_private_urls = allow_private_urls
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.housekeeping = housekeeping
        self.housekeeping_interval = housekeeping_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nemotron-fast-webhook")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nemotron-fast-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        last_housekeeping = 0.0
        while not self._stop.is_set():
            due: list[tuple[str, str, bytes, int]] = []
            try:
                due = self.store.due_webhooks()
                if due:
                    list(self._pool.map(lambda item: self.deliver(*item), due))
                if self.housekeeping is not None and time.monotonic() - last_housekeeping > self.housekeeping_interval:
                    last_housekeeping = time.monotonic()
                    self.housekeeping()
            except Exception:
                logger.exception("webhook/housekeeping loop")
            self._stop.wait(0.05 if due else 0.25)

    def deliver(self, request_id: str, url: str, body: bytes, attempts: int) -> bool:
        """One delivery attempt; records success, a retry time, or giving up."""
        # Literal addresses and localhost here; names are resolved once, by the pinned transport, and vetted there.
        error: str | None = check_outbound_url(url, allow_private=self.allow_private_urls, resolve=False)
        retry = error is None
        if error is None:
            try:
                with httpx.Client(timeout=self.timeout, follow_redirects=False, trust_env=False,
                                  transport=PinnedTransport(allow_private=self.allow_private_urls)) as client:
                    response = client.post(url, content=body, headers=self.signer.headers(request_id, body))
                if 200 <= response.status_code < 300:
                    self.store.webhook_result(request_id, delivered=True)
                    return True
                error, retry = f"HTTP {response.status_code}", retryable_status(response.status_code)
            except AddressNotAllowed as exc:
                error, retry = f"refusing {exc} (start the server with --allow-private-urls to allow it)", False
            except httpx.HTTPError as exc:  # connection, DNS and timeout failures may be transient
                error = f"{type(exc).__name__}: {exc}"
        if not retry or attempts + 1 >= self.max_attempts:
            logger.warning("webhook for %s not delivered after %d attempt(s), giving up: %s", request_id,
                           attempts + 1, error)
            self.store.webhook_result(request_id, delivered=False, error=error)
        else:
            delay = retry_delay(attempts, self.backoff_base, self.backoff_max)
            self.store.webhook_result(request_id, delivered=False, error=error, retry_in=delay)
        return False


def retryable_status(status: int) -> bool:
    """Whether a delivery answered with HTTP ``status`` is worth retrying: 5xx, 408 and 429, not other 4xx."""
    return status >= 500 or status in (408, 429) or status < 400


def retry_delay(attempts: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry ``attempts + 1``: exponential (``base * 2**attempts``, at most ``cap``) with equal
    jitter (the upper half drawn uniformly), so receivers that failed together are not hit again together."""
    delay = min(cap, base * 2 ** attempts)
    return delay / 2 + rand() * delay / 2
