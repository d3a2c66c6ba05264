"""``python -m nemotron_fast.server serve ...``: the ``serve`` subcommand without the package CLI."""

from __future__ import annotations

import argparse
import sys

from .cli import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemotron_fast.server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
