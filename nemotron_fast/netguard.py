"""Outbound HTTP that connects only to addresses it has vetted: no DNS-rebinding window.

A check that resolves a host name and then lets the HTTP client resolve it again can be fooled: a hostile
name server answers a public address to the check and a loopback one to the connection. Here the name is
resolved once, every address it gave is vetted, and the connection goes to one of those addresses (the URL's
host is replaced by the IP; the ``Host`` header and, for https, the TLS server name and certificate check keep
the original name, through httpcore's ``sni_hostname`` request extension). Used for image URLs
(:func:`nemotron_fast.processing.fetch_url_bytes`) and webhook deliveries.

``PinnedTransport(allow_private=False)`` refuses any host with a private, loopback, link-local, multicast,
reserved or otherwise non-global address (:class:`AddressNotAllowed`); ``allow_private=True`` still pins the
connection to the single resolution, so the address a caller logged is the one connected to.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import httpx

__all__ = ["AddressNotAllowed", "PinnedTransport", "is_public_address", "resolve_host"]


class AddressNotAllowed(httpx.ConnectError):
    """The host resolves to an address outside the public internet (and private addresses were not allowed)."""


def is_public_address(ip: str) -> bool:
    """True for globally routable unicast addresses (not private, loopback, link-local, multicast, reserved...)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def resolve_host(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve ``host`` once (an IP literal is not looked up) and vet every address it gives.

    Returns the addresses in resolver order. Raises :class:`AddressNotAllowed` when one of them is not public
    and ``allow_private`` is false, ``httpx.ConnectError`` when the name does not resolve.
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        literal = True
    except ValueError:
        literal = False
    if literal:
        addresses = [name]
    else:
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise httpx.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise httpx.ConnectError(f"cannot resolve host {host!r}: no addresses")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise AddressNotAllowed(f"{host!r} resolves to the non-public address {address}")
    return addresses


class PinnedTransport(httpx.HTTPTransport):
    """An ``httpx`` transport that resolves each request's host once, vets it, and connects to that address.

    The addresses are tried in resolver order until one connects. Connections are not kept alive: a pooled
    connection is keyed by IP and must not carry one host's TLS session into another host's request.
    """

    def __init__(self, *, allow_private: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("limits", httpx.Limits(max_keepalive_connections=0))
        super().__init__(**kwargs)
        self.allow_private = allow_private
        self.connected: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        addresses = resolve_host(host, port, allow_private=self.allow_private)
        literal = addresses == [host]
        error: httpx.ConnectError | None = None
        for address in addresses:
            extensions = dict(request.extensions)
            if request.url.scheme == "https" and not literal:
                extensions["sni_hostname"] = host
            pinned = httpx.Request(request.method, request.url.copy_with(host=address), headers=request.headers,
                                   stream=request.stream, extensions=extensions)
            try:
                response = super().handle_request(pinned)
            except httpx.ConnectError as exc:
                error = exc
                continue
            self.connected.append(address)
            return response
        assert error is not None
        raise error
