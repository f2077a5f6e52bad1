"""The catalog behaves the same on SQLite and on PostgreSQL (issue 8 item 4).

Each test runs on both backends (``catalog_db``, ids ``sqlite`` and ``postgresql``) unless it
is about one of them. What differs between the two engines and is made the same by the
catalog: writers that read then write (serialized on both), multi-statement reads (one
snapshot on both), strings longer than their column (refused on both), timestamps (instants,
whatever the server's time zone), an unreachable server (a CatalogError). Also the throw-away
server itself (``freezeframe.testing.postgres`` and ``scripts/postgres.sh``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pwd
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog, make_owner
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.errors import BusyError, CatalogError
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
    VmConfig,
)
from freezeframe.testing import FakeHost, FakeVm
from freezeframe.testing.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _record(sid: str, *, at: datetime = T0, disks: int = 0) -> SnapshotRecord:
    return SnapshotRecord(
        id=sid,
        vm="web",
        created_at=at,
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.PREFERRED,
        level=ConsistencyLevel.NONE,
        disks=tuple(
            SnapshotDisk(f"disk{i}", f"#n{i}", f"/img/{i}.qcow2", "qcow2", None, "qcow2", 1)
            for i in range(disks)
        ),
        timeline=tuple(TimelineEvent(f"step{i}", at, i) for i in range(disks)),
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
async def two(catalog_db: CatalogDb) -> AsyncIterator[tuple[Catalog, Catalog]]:
    """Two Catalogs on one database: two processes' worth of connections, in threads."""
    a = await Catalog.open(catalog_db.url)
    b = await Catalog.open(catalog_db.url)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_concurrent_read_then_write_of_one_snapshot_does_not_collide(
    two: tuple[Catalog, Catalog], catalog_db: CatalogDb
) -> None:
    # append_timeline reads the last ordinal then inserts after it. On PostgreSQL (READ
    # COMMITTED) two of them at once read the same ordinal and the second INSERT fails on the
    # primary key, unless writers are serialized as SQLite's are (BEGIN IMMEDIATE there, an
    # advisory lock here).
    a, b = two
    await a.begin_snapshot(_record("s1"))

    async def append(cat: Catalog, tag: str) -> None:
        for i in range(40):
            await cat.append_timeline("s1", [TimelineEvent(f"{tag}{i}", T0, i)])

    await asyncio.gather(append(a, "a"), append(b, "b"))
    timeline = (await a.get_snapshot("s1")).timeline
    assert len(timeline) == 80
    assert [e.name for e in timeline if e.name[0] == "a"] == [f"a{i}" for i in range(40)]
    assert catalog_db.execute(
        "SELECT min(ordinal), max(ordinal), count(*) FROM timeline_events"
    ) == [(0, 79, 80)]


async def test_a_record_is_read_whole_while_another_process_replaces_it(
    two: tuple[Catalog, Catalog],
) -> None:
    # get_snapshot reads a record and its children with several SELECTs; finish_snapshot
    # replaces all of them. A reader must see one version or the other, never a mix (disks of
    # one, timeline of the other): one snapshot per read transaction on both backends.
    writer, reader = two
    await writer.begin_snapshot(_record("s1"))
    stop = asyncio.Event()
    mixed: list[tuple[int, int]] = []

    async def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await writer.finish_snapshot(_record("s1", disks=1 + (n % 2) * 6))

    async def read() -> None:
        for _ in range(150):
            rec = await reader.get_snapshot("s1")
            if len(rec.disks) != len(rec.timeline):
                mixed.append((len(rec.disks), len(rec.timeline)))
        stop.set()

    await asyncio.gather(write(), read())
    assert mixed == []


async def test_stored_times_are_instants_whatever_the_server_zone(
    cat_on: Catalog, catalog_db: CatalogDb
) -> None:
    cest = timezone(timedelta(hours=2))
    at = datetime(2026, 3, 1, 14, 0, 0, 1, tzinfo=cest)
    await cat_on.begin_snapshot(_record("tz", at=at))
    assert (await cat_on.get_snapshot("tz")).created_at == at
    assert (await cat_on.get_snapshot("tz")).created_at.tzinfo is UTC
    ((raw,),) = catalog_db.execute("SELECT created_at FROM snapshots")
    if catalog_db.backend == "postgresql":
        # The test server's zone is not UTC on purpose (freezeframe.testing.postgres).
        assert catalog_db.execute("SHOW timezone") == [("Asia/Kolkata",)]
        assert raw == at  # timestamptz: the instant, shown in the session's zone
        assert raw.utcoffset() == timedelta(hours=5, minutes=30)
    else:
        assert str(raw) == "2026-03-01 12:00:00.000001"  # UTC, without an offset


async def test_strings_longer_than_their_column_are_refused_on_every_backend(
    cat_on: Catalog,
) -> None:
    # SQLite would keep 300 characters in a VARCHAR(255); PostgreSQL refuses the statement.
    # The catalog refuses it before either sees it, naming the column; nothing is stored.
    with pytest.raises(CatalogError, match=r"snapshots\.id is 300 characters long.* at most 255"):
        await cat_on.begin_snapshot(_record("x" * 300))
    rec = _record("s1", disks=1)
    rec = replace(rec, disks=(replace(rec.disks[0], format="q" * 65),))
    with pytest.raises(CatalogError, match=r"snapshot_disks\.format is 65 characters long"):
        await cat_on.begin_snapshot(rec)
    assert await cat_on.list_snapshots() == []
    with pytest.raises(CatalogError, match=r"vm_locks\.purpose is 33"):
        await cat_on.acquire_vm_lock("web", "h:1:x", purpose="p" * 33)
    assert await cat_on.vm_lock_holder("web") is None
    await cat_on.begin_snapshot(_record("y" * 255))  # the limit itself fits
    await cat_on.add_vm(VmConfig(name="v" * 128))


async def test_a_lock_taken_over_from_a_dead_process_keeps_its_purpose(cat_on: Catalog) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True)  # fmt: skip
    await cat_on.acquire_vm_lock("web", f"{socket.gethostname()}:{int(done.stdout)}:dead")
    await cat_on.acquire_vm_lock("web", make_owner(), purpose="doctor")  # taken over
    with pytest.raises(BusyError) as err:
        await cat_on.acquire_vm_lock("web", "elsewhere:1:y")
    assert err.value.code == "vm-busy"
    assert err.value.holder_purpose == "doctor"  # was lost (None: "snapshot") on a takeover


@pytest.fixture
async def cat_on(catalog_db: CatalogDb) -> AsyncIterator[Catalog]:
    cat = await Catalog.open(catalog_db.url)
    try:
        yield cat
    finally:
        await cat.close()


# ---------------------------------------------------------------------------- several processes

#: Rounds of the snapshot race; VM ``web{round}`` in each (every process has its own fake VMs,
#: so a VM's chain must not continue in another process).
SNAPSHOT_ROUNDS = 4


def _create_snapshots(url: str, rounds: int, barrier: Any, results: Any) -> None:
    """Child: ``rounds`` times, wait for every racer, then snapshot create VM ``web{round}``
    (the engine's Snapshotter on fake VMs of this process, held frozen 0.5 s so the others
    try while it runs); report ("done", level) or ("busy", code, holder_purpose)."""

    async def main() -> None:
        with FakeHost() as host:
            for rnd in range(rounds):
                host.add(FakeVm.simple(f"web{rnd}"))
            catalog = await Catalog.open(url)
            try:
                for rnd in range(rounds):
                    await asyncio.to_thread(barrier.wait, 60)
                    req = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, hold_frozen=0.5)
                    try:
                        rec = await Snapshotter(catalog).snapshot(f"web{rnd}", req)
                        results.put((rnd, "done", rec.level.value))
                    except BusyError as exc:
                        results.put((rnd, "busy", f"{exc.code} {exc.holder_purpose}"))
                    except Exception as exc:
                        results.put((rnd, "error", repr(exc)))
            finally:
                await catalog.close()

    try:
        asyncio.run(main())
    except Exception as exc:
        results.put((-1, "error", repr(exc)))
        barrier.abort()


async def test_snapshot_creates_of_one_vm_from_several_processes_one_runs_others_get_vm_busy(
    catalog_db: CatalogDb,
) -> None:
    # Issue 8: several servers or CLI calls on one catalog. Three processes start snapshot
    # create of the same VM at the same moment: one snapshot runs, the others are refused with
    # vm-busy (never a second freeze of that guest), on SQLite and on PostgreSQL alike.
    async with await Catalog.open(catalog_db.url) as cat:
        for rnd in range(SNAPSHOT_ROUNDS):
            await cat.add_vm(FakeVm.simple(f"web{rnd}").config())
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_create_snapshots, args=(catalog_db.url, SNAPSHOT_ROUNDS, barrier,
                                                    results))
        for _ in range(n)
    ]  # fmt: skip
    try:
        for p in procs:
            p.start()
        out = []
        for _ in range(n * SNAPSHOT_ROUNDS):
            out.append(await asyncio.to_thread(results.get, True, 120))
            assert out[-1][1] != "error", out
        for p in procs:
            await asyncio.to_thread(p.join, 30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    for rnd in range(SNAPSHOT_ROUNDS):
        verdicts = sorted((v, d) for r, v, d in out if r == rnd)
        assert verdicts == [("busy", "vm-busy snapshot")] * (n - 1) + [("done", "filesystem")]
    async with await Catalog.open(catalog_db.url) as cat:
        records = await cat.list_snapshots()
        assert sorted(r.vm for r in records) == [f"web{r}" for r in range(SNAPSHOT_ROUNDS)]
        assert {r.status for r in records} == {SnapshotStatus.DONE}
        assert await cat.open_intents() == []
    assert catalog_db.rows("vm_locks") == 0


# ---------------------------------------------------------------------------- PostgreSQL only


async def test_an_unreachable_postgresql_is_a_catalog_error(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="apt-get install python3-psycopg")
    url = f"postgresql+psycopg://ff@/ff?host={tmp_path}&port=5432"  # no server there
    with pytest.raises(CatalogError) as err:
        await Catalog.open(url)
    assert err.value.exit_code == 8
    assert isinstance(err.value.__cause__, sa.exc.OperationalError)
    assert "cannot open catalog postgresql+psycopg://ff@/ff" in err.value.message


def test_the_session_server_runs_unprivileged_on_a_private_socket(
    postgres: PostgresServer,
) -> None:
    stat = os.stat(f"/proc/{postgres.pid}")
    assert stat.st_uid != 0
    if os.geteuid() == 0:
        assert pwd.getpwuid(stat.st_uid).pw_name in ("postgres", "nobody")
    assert (postgres.socket_dir / f".s.PGSQL.{postgres.port}").is_socket()
    assert not postgres.tcp
    # One server per session: every postgresql test of the session shares this pid.
    assert PostgresServer.attach(postgres.base).pid == postgres.pid


def test_the_script_starts_a_server_and_stops_it_by_its_pid(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    # (``postgres``: skipped where the session server cannot run either.)
    # Not under tmp_path (0700 root): the server's account must reach its directory.
    base = Path(tempfile.gettempdir()) / f"ffpg-script-{os.getpid()}"
    script = ["bash", str(REPO / "scripts" / "postgres.sh")]
    env = {**os.environ, "PYTHON": sys.executable}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    started = run("start", str(base), "--tcp")
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        pid = PostgresServer.attach(base).pid
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_database()").scalar() == "freezeframe"
        engine.dispose()
        port = sa.make_url(url).port
        assert run("url", str(base)).stdout.strip().endswith(f"?host={base}&port={port}")
    finally:
        stopped = run("stop", str(base))
    assert stopped.returncode == 0, stopped.stderr
    assert not base.exists()
    assert not _alive(pid)
    assert run("stop", str(tmp_path)).returncode == 1  # not a server's directory: left alone
    assert tmp_path.exists()
    assert run("bogus", "x").returncode == 2
