"""Fixtures of the API's unit tests: the app over a service on a catalog of the test's own
(SQLite and PostgreSQL) and the fake hypervisor (:mod:`freezeframe.testing`), reached through
httpx's ASGITransport, or served by a real uvicorn on a loopback port (``live_url``) where a
test needs real streaming and real disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from freezeframe.api import create_app
from freezeframe.service import Config, Service
from freezeframe.testing import FakeHost, FakeVm
from tests.conftest import CatalogDb

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def host() -> Iterator[FakeHost]:
    with FakeHost() as h:
        yield h


@pytest.fixture
def web1(host: FakeHost) -> FakeVm:
    """A fake VM like the lab's (ext4 + xfs, agent running), not registered yet."""
    return host.add(FakeVm.simple("web1"))


@pytest.fixture
async def svc(tmp_path: Path, web1: FakeVm, catalog_db: CatalogDb) -> AsyncIterator[Service]:
    """The service over a fresh catalog (SQLite and PostgreSQL: ``catalog_db`` is
    parametrized over both), with ``web1`` registered."""
    config = Config(state_dir=tmp_path / "home", database_url=catalog_db.url, followup=True)
    service = await Service.open(config)
    await (await service.catalog()).add_vm(web1.config())
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
def app(svc: Service, tmp_path: Path) -> FastAPI:
    return create_app(svc, token=TOKEN, token_path=tmp_path / "home" / "api-token")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app without credentials (tests add ``AUTH`` where they mean to)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ff.test") as c:
        yield c


@pytest.fixture
async def live_url(app: FastAPI) -> AsyncIterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) for the test's duration."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        sock.close()
