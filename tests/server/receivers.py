"""A loopback HTTP listener that records webhook deliveries (and can fail the first few on purpose)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes, float]] = []
        self.refused: list[tuple[dict[str, str], bytes, float]] = []  # the attempts answered with a 503
        self.attempts = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    receiver.refused.append((dict(self.headers.items()), body, time.time()))
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.deliveries.append((dict(self.headers.items()), body, time.time()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int = 1, timeout: float = 20.0) -> list[tuple[dict[str, str], bytes, float]]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.deliveries) >= n, f"{len(self.deliveries)} deliveries after {timeout} s"
        return self.deliveries

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
