"""Fixtures of every suite: the catalog's database backends.

- ``postgres`` (session): ONE throw-away PostgreSQL 15 server for the whole test session
  (:class:`freezeframe.testing.postgres.PostgresServer`: initdb in a temporary directory, run as
  an unprivileged account, unix socket only, stopped by its PID at the end). Started on first
  use only; when PostgreSQL or psycopg is not installed, the tests that need it are skipped with
  the Debian package to install. Under pytest-xdist it is one server for the whole run, shared
  by the workers (tests/shared_daemons.py), which also groups tests onto workers.
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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from freezeframe.testing.postgres import PostgresError, PostgresServer, available
from tests import shared_daemons

#: The ids of the ``catalog_db`` parameters.
BACKENDS = ("sqlite", "postgresql")
_databases = itertools.count()


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.has_plugin("xdist"):
        shared_daemons.group_items(config, items)


@pytest.hookimpl(trylast=True)  # after xdist has shut its workers down
def pytest_sessionfinish(session: pytest.Session) -> None:
    if shared_daemons.is_controller(session.config):
        factory: pytest.TempPathFactory = getattr(session.config, "_tmp_path_factory")  # noqa: B009
        left = shared_daemons.stop_recorded(factory.getbasetemp())
        if left:
            warnings.warn(f"shared test daemons not stopped: {left}", stacklevel=1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "catalog_backend" not in metafunc.fixturenames:
        return
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
    backends = ["sqlite"] if sqlite_only else list(BACKENDS)
    metafunc.parametrize("catalog_backend", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module's docstring). Under xdist one server
    for the whole run, started by the first worker that needs it and stopped by the
    controller (tests/shared_daemons.py)."""
    why = available()
    if why is not None:
        pytest.skip(why)
    if shared_daemons.worker_id(request.config) is not None:
        run = shared_daemons.run_dir(tmp_path_factory)
        doc = shared_daemons.start_once(run, "postgres", shared_daemons.start_postgres)
        yield shared_daemons.attach_postgres(doc)
        return
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
