"""Outbound requests connect to the address that was vetted: DNS rebinding, mixed answers, redirects, TLS names.

The network is real (HTTP servers on loopback, the real httpx client); only the resolver is scripted, by
replacing ``socket.getaddrinfo``, which the guard and httpx's own connection both call. ``127.0.0.2`` plays a
public host: the vetting is told it is public, and a server listens there; ``127.0.0.1`` stays loopback.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from PIL import Image

from nemotron_fast import netguard
from nemotron_fast.errors import ImageError
from nemotron_fast.processing import fetch_url_bytes
from nemotron_fast.server.store import Outcome, RequestStore
from nemotron_fast.server.webhooks import WebhookDeliverer, WebhookSigner, retry_delay, retryable_status

from .certs import self_signed

PUBLIC, LOOPBACK = "127.0.0.2", "127.0.0.1"


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, "PNG")
    return buf.getvalue()


class Site:
    """A threaded HTTP server on ``address``; records each request's path, Host header and POST body."""

    def __init__(self, address: str, port: int, image: bytes) -> None:
        site = self
        self.hits: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                site.hits.append((self.path, self.headers.get("host", "")))
                port = self.server.server_address[1]
                targets = {"/to-loopback": f"http://{LOOPBACK}:{port}/img.png",
                           "/to-metadata": "http://169.254.169.254/latest/meta-data/",
                           "/to-internal-name": f"http://internal.test:{port}/img.png"}
                if self.path in targets:
                    self._send(302, headers={"Location": targets[self.path]})
                else:
                    self._send(200, image, {"Content-Type": "image/png"})

            def do_POST(self) -> None:
                site.hits.append((self.path, self.headers.get("host", "")))
                site.bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
                self._send(int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/status/") else 200)

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sites() -> Iterator[tuple[Site, Site]]:
    """A "public" site on 127.0.0.2 and an internal one on 127.0.0.1, on the same port number."""
    for _ in range(20):
        public = Site(PUBLIC, 0, _png("green"))
        try:
            internal = Site(LOOPBACK, public.port, _png("red"))
        except OSError:  # that port is taken on 127.0.0.1: try another
            public.close()
            continue
        yield public, internal
        public.close()
        internal.close()
        return
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


class Resolver:
    """Scripted answers for some names (one list per lookup, the last one repeated); the rest resolve normally."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        self.lookups.append(name)
        script = self.answers[name]
        ips = script.pop(0) if len(script) > 1 else script[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0))) for ip in ips]


@pytest.fixture
def resolve(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[list[str]]]], Resolver]:
    real_public = netguard.is_public_address
    monkeypatch.setattr(netguard, "is_public_address", lambda ip: ip == PUBLIC or real_public(ip))

    def install(answers: dict[str, list[list[str]]]) -> Resolver:
        resolver = Resolver(answers)
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        return resolver

    return install


def test_rebinding_resolver_cannot_reach_loopback(sites: tuple[Site, Site], resolve: Callable) -> None:
    public, internal = sites
    resolver = resolve({"rebind.test": [[PUBLIC], [LOOPBACK]]})  # public to the first lookup, loopback after
    fetched = fetch_url_bytes(f"http://rebind.test:{public.port}/img.png", timeout=5, allow_private=False)
    assert internal.hits == []
    assert fetched.data == _png("green") and public.hits == [("/img.png", f"rebind.test:{public.port}")]
    assert resolver.lookups == ["rebind.test"]  # one lookup: the address vetted is the address connected to


def test_rebinding_resolver_loopback_first_is_refused(sites: tuple[Site, Site], resolve: Callable) -> None:
    public, internal = sites
    resolve({"rebind.test": [[LOOPBACK], [PUBLIC]]})
    with pytest.raises(ImageError) as info:
        fetch_url_bytes(f"http://rebind.test:{public.port}/img.png", timeout=5, allow_private=False)
    assert info.value.errors[0]["type"] == "image_url_forbidden" and "127.0.0.1" in str(info.value)
    assert public.hits == [] and internal.hits == []


def test_any_non_public_answer_refuses_the_host(sites: tuple[Site, Site], resolve: Callable) -> None:
    public, internal = sites
    resolve({"mixed.test": [[PUBLIC, LOOPBACK]]})
    with pytest.raises(ImageError) as info:
        fetch_url_bytes(f"http://mixed.test:{public.port}/img.png", timeout=5, allow_private=False)
    assert info.value.errors[0]["type"] == "image_url_forbidden"
    assert public.hits == [] and internal.hits == []


@pytest.mark.parametrize("path,address", [("/to-loopback", "127.0.0.1"), ("/to-metadata", "169.254.169.254"),
                                          ("/to-internal-name", "127.0.0.1")])
def test_every_redirect_hop_is_vetted(sites: tuple[Site, Site], resolve: Callable, path: str, address: str) -> None:
    public, internal = sites
    resolve({"public.test": [[PUBLIC]], "internal.test": [[LOOPBACK]]})
    with pytest.raises(ImageError) as info:
        fetch_url_bytes(f"http://public.test:{public.port}{path}", timeout=5, allow_private=False)
    assert info.value.errors[0]["type"] == "image_url_forbidden" and address in str(info.value)
    assert [p for p, _ in public.hits] == [path] and internal.hits == []


def test_private_allowed_still_pins_one_lookup(sites: tuple[Site, Site], resolve: Callable) -> None:
    public, internal = sites
    resolver = resolve({"public.test": [[PUBLIC]], "internal.test": [[LOOPBACK], [PUBLIC]]})
    fetched = fetch_url_bytes(f"http://public.test:{public.port}/to-internal-name", timeout=5, allow_private=True)
    assert fetched.data == _png("red") and internal.hits == [("/img.png", f"internal.test:{internal.port}")]
    assert resolver.lookups == ["public.test", "internal.test"]


# --- TLS: connected by IP, verified and introduced by name -------------------------------------------------------

def _cert_for(name: str, tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, name, x509.DNSName(name))


def test_https_by_ip_keeps_the_name_for_sni_and_certificate(tmp_path: Path, resolve: Callable) -> None:
    cert, key = _cert_for("tls.test", tmp_path)
    site = Site(PUBLIC, 0, _png("blue"))
    names: list[str | None] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    site.server.socket = server_ctx.wrap_socket(site.server.socket, server_side=True)
    resolve({"tls.test": [[PUBLIC], [LOOPBACK]]})
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(transport=netguard.PinnedTransport(allow_private=False, verify=client_ctx),
                          trust_env=False, timeout=5) as client:
            r = client.get(f"https://tls.test:{site.port}/img.png")
        assert r.status_code == 200 and r.content == _png("blue")
        assert names == ["tls.test"] and site.hits == [("/img.png", f"tls.test:{site.port}")]
    finally:
        site.close()


# --- webhooks ----------------------------------------------------------------------------------------------------

def _deliverer(tmp_path: Path, url: str, *, allow_private: bool) -> tuple[WebhookDeliverer, RequestStore, str]:
    store = RequestStore(tmp_path / "db.sqlite3")
    rid, _ = store.submit({}, webhook_url=url)
    store.claim_batch(1)
    store.finish(rid, Outcome(200, {"output": "hi"}))
    signer = WebhookSigner(tmp_path / "key.pem")
    return WebhookDeliverer(store, signer, allow_private_urls=allow_private, timeout=5), store, rid


def test_webhook_rebinding_resolver_cannot_reach_loopback(tmp_path: Path, sites: tuple[Site, Site],
                                                          resolve: Callable) -> None:
    public, internal = sites
    resolver = resolve({"hook.test": [[PUBLIC], [LOOPBACK]]})
    deliverer, store, rid = _deliverer(tmp_path, f"http://hook.test:{public.port}/hook", allow_private=False)
    assert deliverer.deliver(*store.due_webhooks()[0]) is True
    assert internal.hits == [] and public.hits == [("/hook", f"hook.test:{public.port}")]
    assert json.loads(public.bodies[0])["payload"] == {"output": "hi"} and resolver.lookups == ["hook.test"]
    assert store.webhook_state(rid) == ("delivered", 1)


def test_webhook_to_non_public_answer_is_refused_without_retry(tmp_path: Path, sites: tuple[Site, Site],
                                                               resolve: Callable) -> None:
    public, internal = sites
    resolve({"hook.test": [[LOOPBACK]]})
    deliverer, store, rid = _deliverer(tmp_path, f"http://hook.test:{public.port}/hook", allow_private=False)
    assert deliverer.deliver(*store.due_webhooks()[0]) is False
    assert store.webhook_state(rid) == ("failed", 1) and internal.hits == [] and public.hits == []


@pytest.mark.parametrize("status,state", [(400, "failed"), (404, "failed"), (410, "failed"), (408, "pending"),
                                          (429, "pending"), (500, "pending"), (503, "pending")])
def test_webhook_retry_policy(tmp_path: Path, sites: tuple[Site, Site], status: int, state: str) -> None:
    _, internal = sites
    deliverer, store, rid = _deliverer(tmp_path, f"http://{LOOPBACK}:{internal.port}/status/{status}",
                                       allow_private=True)
    assert deliverer.deliver(*store.due_webhooks()[0]) is False
    assert store.webhook_state(rid) == (state, 1) and len(internal.hits) == 1
    assert retryable_status(status) is (state == "pending")


def test_retry_delay_is_jittered_exponential_backoff() -> None:
    assert [retry_delay(a, 5.0, 1800.0, rand=lambda: 1.0) for a in range(4)] == [5.0, 10.0, 20.0, 40.0]
    assert [retry_delay(a, 5.0, 1800.0, rand=lambda: 0.0) for a in range(4)] == [2.5, 5.0, 10.0, 20.0]
    assert retry_delay(20, 5.0, 1800.0, rand=lambda: 0.5) == 1350.0  # capped, then jittered
    draws = {retry_delay(3, 5.0, 1800.0) for _ in range(50)}
    assert len(draws) > 1 and all(20.0 <= d <= 40.0 for d in draws)
