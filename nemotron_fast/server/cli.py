"""``nemotron-fast serve``: the argument parser hook and the entry point the package CLI calls.

The package CLI adds the subcommand with ``add_serve_parser(subparsers)`` and dispatches to ``run_serve(args)``;
``python -m nemotron_fast.server serve ...`` does the same without the package CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

__all__ = ["add_serve_parser", "build_config", "run_serve"]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (its handler is ``run_serve``, also set as ``func``)."""
    p = subparsers.add_parser(
        "serve", help="serve the hosted endpoint's API (fal queue/run/storage, OpenAI chat) locally",
        description="Serve the fal-ai/nemotron-diffusion-vlm API on this machine: the official fal clients and the "
                    "OpenAI client work against it unchanged (see the README's 'Serving' section).")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--app-id", default="fal-ai/nemotron-diffusion-vlm", help="owner/alias the API is served under")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="queue database, results, uploads and the webhook key (default: "
                        "$XDG_DATA_HOME/nemotron-fast/server)")
    p.add_argument("--api-key", default=os.environ.get("NEMOTRON_FAST_API_KEY"),
                   help="require 'Authorization: Key <key>' (default: $NEMOTRON_FAST_API_KEY; unset = any or none)")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM); serve HTTPS with --tls-key")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image_url and webhooks reach private, loopback and link-local addresses")
    p.add_argument("--max-batch", type=int, default=8,
                   help="batch slots: requests generated together (default: 8)")
    p.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="continuous: requests join and leave the running batch at block boundaries (the Engine); "
                        "static: claimed requests run as one batch until its longest row ends (default: continuous)")
    p.add_argument("--result-ttl", type=float, default=86400.0,
                   help="seconds results and uploaded files are kept (default: 86400)")
    p.add_argument("--public-url", default=None,
                   help="origin used in returned URLs (default: the request's scheme/Host/X-Forwarded-*)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: the pipeline's choice for the device)")
    p.add_argument("--sampler", default="fast", choices=["fast", "reference"], help="sampler (default: fast)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the queue and results: sqlite:///path (default: SQLite in --data-dir; one process) or "
                        "postgresql://user:pass@host:port/db (shared by any number of processes, see README "
                        "'Deployment')")
    p.add_argument("--role", default="all", choices=["all", "api", "worker"],
                   help="all: API and model in this process (default); api: HTTP API only, no model loaded; "
                        "worker: runs requests and webhooks, serves only /health on --port (api/worker need a "
                        "postgresql:// store)")
    p.add_argument("--lease-ttl", type=float, default=30.0,
                   help="seconds a worker's claim on a request lasts without renewal (renewed every third); a "
                        "request of a dead worker runs again after this (PostgreSQL store; default: 30)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="runs a request may be interrupted (crash, lost worker) before it is failed (default: 3)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)
    return p


def build_config(args: argparse.Namespace) -> object:
    """The ``ServerConfig`` the arguments describe."""
    from .service import ServerConfig, default_data_dir

    return ServerConfig(data_dir=args.data_dir or default_data_dir(), app_id=args.app_id, api_key=args.api_key or None,
                        allow_private_urls=args.allow_private_urls, max_batch=args.max_batch,
                        result_ttl=args.result_ttl, public_url=args.public_url,
                        store=args.store, role=args.role,
                        lease_ttl=args.lease_ttl, max_attempts=args.max_attempts, batching=args.batching)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model (not for ``--role api``), build the app and serve it with uvicorn until interrupted;
    returns the exit code."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    pipeline = None
    if config.role != "api":  # type: ignore[attr-defined]
        import torch

        from ..pipeline import Pipeline

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        pipeline = Pipeline.from_pretrained(args.model, device=device, dtype=dtype, sampler=args.sampler)
    app = create_app(pipeline, config)  # type: ignore[arg-type]
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
