"""Fixtures of the unit tests: ``ff`` (the CLI as a process), ``host`` (a
:class:`freezeframe.testing.FakeHost` installed for the test) and ``catalog`` (a fresh catalog
of the test's own, once on SQLite and once on PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog
from freezeframe.testing import FakeHost

#: The CLI, run as a separate process (exit codes and output as an operator sees them).
FF = [sys.executable, "-m", "freezeframe.cli.main"]

Ff = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def ff(tmp_path: Path) -> Ff:
    """Run ``freezeframe ARGS...`` with a state directory of this test's own."""
    env = {**os.environ, "FREEZEFRAME_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FF, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    return run


@pytest.fixture
def host() -> Iterator[FakeHost]:
    """The fake hypervisor world of this test (its VMs are found by the ``fake`` driver)."""
    with FakeHost() as h:
        yield h


@pytest.fixture
async def catalog(catalog_db: CatalogDb) -> AsyncIterator[Catalog]:
    """A fresh catalog of this test's own, on each backend (ids ``sqlite``, ``postgresql``:
    see ``catalog_db`` in tests/conftest.py)."""
    cat = await Catalog.open(catalog_db.url)
    try:
        yield cat
    finally:
        await cat.close()
