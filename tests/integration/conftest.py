"""Shared fixtures for the scale-out tests: one throwaway PostgreSQL server per session, a fresh
database per test, and a set of independent hosts built once."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pg import PostgresServer, PostgresUnavailable, create_database
from ttp_fleet import Host, build_hosts


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Superuser URL of a throwaway PostgreSQL server on loopback, stopped at the end.

    Skipped where no server can be provided, except in CI, where scripts/pg-setup.sh has run
    first and a missing server is a broken build.
    """
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {e}")
        pytest.skip(f"no PostgreSQL server on this machine: {e}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_db(pg_server: str) -> str:
    """A fresh, empty database on the session's server, as a ``postgresql://`` URL."""
    return create_database(pg_server, f"it_{uuid.uuid4().hex}")


@pytest.fixture(scope="session")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> list[Host]:
    return build_hosts(tmp_path_factory.mktemp("fleet"))
