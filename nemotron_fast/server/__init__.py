"""Local server for the hosted endpoint's API: fal queue/run/storage protocol, webhooks, OpenAI chat.

Optional part of the package (``pip install nemotron-fast[serve]``); imported lazily.

- ``app``: ``create_app(pipeline, config)``, middleware and route wiring.
- ``routes``: queue submit/status/result/cancel, sync run and output stream.
- ``storage``: uploads and stored files; ``webhooks``: signed deliveries and the JWKS.
- ``store``: the SQLite queue; ``worker``: the model worker; ``openai_compat``: ``/v1/chat/completions``.
- ``cli``: the ``serve`` subcommand.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["create_app", "ServerConfig", "add_serve_parser", "run_serve"]

_LAZY = {
    "create_app": ("nemotron_fast.server.app", "create_app"),
    "ServerConfig": ("nemotron_fast.server.service", "ServerConfig"),
    "add_serve_parser": ("nemotron_fast.server.cli", "add_serve_parser"),
    "run_serve": ("nemotron_fast.server.cli", "run_serve"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'nemotron_fast.server' has no attribute {name!r}")
