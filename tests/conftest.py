"""Fixtures of every suite: the catalog's database backends.

- ``postgres`` (session): ONE throw-away PostgreSQL 15 server for the whole test session
  (:class:`freezeframe.testing.postgres.PostgresServer`: initdb in a temporary directory, run as
  an unprivileged account, unix socket only, stopped by its PID at the end). Started on first
  use only; when PostgreSQL or psycopg is not installed, the tests that need it are skipped with
  the Debian package to install.
- ``catalog_db``: a fresh, empty database of this test's own, as a :class:`CatalogDb` (URL plus
  raw-SQL helpers), parametrized over the backends: ids ``sqlite`` (a file in ``tmp_path``, not
  created yet) and ``postgresql`` (a database of the session's server, made by ``CREATE
  DATABASE`` and emptied after the test for the next one: its schema ``public`` dropped and made
  again, every connection to it closed). A test marked ``@pytest.mark.sqlite_only`` (what it
  tests exists only for a SQLite file: the file itself, WAL, its filesystem) gets the
  ``sqlite`` one only.

Any fixture or test that takes ``catalog_db`` (directly or through another fixture such as the
unit suite's ``catalog``) runs once per backend.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from freezeframe.testing.postgres import PostgresError, PostgresServer, available

#: The ids of the ``catalog_db`` parameters.
BACKENDS = ("sqlite", "postgresql")
_databases = itertools.count()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "catalog_backend" not in metafunc.fixturenames:
        return
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
    backends = ["sqlite"] if sqlite_only else list(BACKENDS)
    metafunc.parametrize("catalog_backend", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module's docstring)."""
    why = available()
    if why is not None:
        pytest.skip(why)
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _postgres_free() -> list[str]:
    """Databases of the session's server that tests have used and were emptied again."""
    return []


@dataclass(frozen=True)
class CatalogDb:
    """One test's database: ``url`` for :meth:`Catalog.open`, ``backend`` (``sqlite`` or
    ``postgresql``), ``path`` (the SQLite file; None for PostgreSQL), and raw SQL on it for
    checks a Catalog cannot make (row counts, tampering)."""

    backend: str
    url: str
    path: Path | None

    def execute(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Run ``sql`` in its own committed transaction; the rows it returns (if any)."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(sql), params)
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def rows(self, table: str) -> int:
        """How many rows ``table`` has."""
        ((count,),) = self.execute(f"SELECT count(*) FROM {table}")
        return int(count)


@pytest.fixture
def catalog_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql`` (parametrized by ``pytest_generate_tests``)."""
    return str(request.param)


@pytest.fixture
def catalog_db(
    catalog_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[CatalogDb]:
    """A fresh, empty database for one test on ``catalog_backend``."""
    if catalog_backend == "sqlite":
        path = tmp_path / "catalog.sqlite"
        yield CatalogDb("sqlite", f"sqlite:///{path}", path)
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    free: list[str] = request.getfixturevalue("_postgres_free")
    if free:
        name = free.pop()
    else:
        name = f"t{os.getpid()}_{next(_databases)}"
        server.create_database(name)
    try:
        yield CatalogDb("postgresql", server.url(name), None)
    finally:
        try:
            server.reset_database(name)  # ~20 ms; CREATE DATABASE takes 50-400 ms here
            free.append(name)
        except PostgresError:
            server.drop_database(name)
