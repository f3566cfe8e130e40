"""Fixtures for the store contract suite: a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def _load_pg_helper() -> ModuleType:
    """tests/pg.py, loaded by path: tests/ is not a package, and sys.path is left alone."""
    path = Path(__file__).resolve().parents[3] / "pg.py"
    spec = importlib.util.spec_from_file_location("freemark_tests_pg", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pg = _load_pg_helper()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """Superuser URL of a database on a throwaway PostgreSQL server, stopped at the end.

    Where no server can be provided the PostgreSQL cases are skipped, except in CI, where
    scripts/pg-setup.sh has run first and a missing server is a broken build, not a skip.
    """
    server = pg.PostgresServer()
    try:
        server.start()
    except pg.PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {e}")
        pytest.skip(f"no PostgreSQL server on this machine: {e}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for one test: a file path or a ``postgresql://`` URL."""
    if request.param == "sqlite":
        return str(tmp_path / "freemark.db")
    admin_url: str = request.getfixturevalue("pg_url")
    return str(pg.create_database(admin_url, f"test_{uuid.uuid4().hex}"))
