"""The PostgreSQL the tests use: ``$NEMOTRON_FAST_TEST_PG`` (``.ci/postgres.sh start`` sets it), one fresh database
per test. Without the variable the PostgreSQL tests are skipped, except in CI (``CI=true``), where that is a
failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_ENV = "NEMOTRON_FAST_TEST_PG"


def pg_server_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"${PG_ENV} is not set in CI: .ci/run starts PostgreSQL and exports it")
        pytest.skip(f"${PG_ENV} not set (eval \"$(.ci/postgres.sh start)\" starts a local PostgreSQL)")
    return url


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database on the test server (dropped afterwards)."""
    import psycopg

    url = pg_server_url()
    name = f"nf_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
