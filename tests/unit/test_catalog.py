"""Tests of freezeframe.catalog on real databases (and real OS processes for the races).

Every test taking ``catalog_db`` (or ``cat``) runs twice: on a SQLite file (id ``sqlite``) and
on a fresh database of the session's throw-away PostgreSQL 15 server (id ``postgresql``; see
tests/conftest.py). Tests marked ``sqlite_only`` are about the SQLite file itself (WAL, a
missing, empty or foreign file, ``:memory:``) and have no PostgreSQL counterpart.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog, make_owner
from freezeframe.catalog._catalog import _alembic_config
from freezeframe.catalog._schema import Base
from freezeframe.errors import (
    Action,
    AlreadyExistsError,
    BusyError,
    CatalogError,
    DependencyError,
    NotFoundError,
    Remedy,
    UsageError,
)
from freezeframe.models import (
    ConsistencyLevel,
    FsCheck,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
    Verification,
    VerifyVerdict,
    VmConfig,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
CEST = timezone(timedelta(hours=2))


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.sqlite"


@pytest.fixture
async def cat(catalog_db: CatalogDb) -> AsyncIterator[Catalog]:
    catalog = await Catalog.open(catalog_db.url)
    try:
        yield catalog
    finally:
        await catalog.close()


def _record(sid: str, *, vm: str = "web", at: datetime = T0, **kw: Any) -> SnapshotRecord:
    base = SnapshotRecord(
        id=sid,
        vm=vm,
        created_at=at,
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.PREFERRED,
        level=ConsistencyLevel.NONE,
    )
    return replace(base, **kw)


def _full_record(sid: str) -> SnapshotRecord:
    """A record with every field set to a non-default value."""
    return SnapshotRecord(
        id=sid,
        vm="db",
        created_at=datetime(2026, 3, 1, 14, 0, 0, 1, tzinfo=CEST),  # stored as UTC
        status=SnapshotStatus.DONE,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.FILESYSTEM,
        level_reason="all 2 filesystems frozen",
        error="warning: agent log unreadable",
        parent_id="parent-0001",
        disks=(
            SnapshotDisk(
                device="disk0",
                node="#block123",
                image="/var/lib/ff/db/disk0.qcow2",
                format="qcow2",
                overlay="/var/lib/ff/db/disk0.s1.qcow2",
                backend="qcow2-external",
                virtual_size=2**40 + 7,
            ),
            SnapshotDisk(
                device="disk1",
                node="#block456",
                image="rbd:pool/img@snap",
                format="raw",
                overlay=None,
                backend="rbd",
                virtual_size=1,
            ),
        ),
        filesystems=(
            SnapshotFilesystem(
                mountpoint="/", fstype="ext4", device="disk0", frozen=True, reason=""
            ),
            SnapshotFilesystem(
                mountpoint="/boot/efi",
                fstype="vfat",
                device=None,
                frozen=False,
                reason="FIFREEZE unsupported",
            ),
        ),
        timeline=(
            TimelineEvent("freeze-sent", T0, 2**62 + 3, "fs=2"),
            TimelineEvent("frozen", T0 + timedelta(microseconds=89_001), 2**62 + 89_001_000, ""),
            TimelineEvent("thawed", T0 + timedelta(milliseconds=106), 2**62 + 106_000_000, "ok"),
        ),
        freeze_window_ms=106.123456789,
        evidence=("1700000000.1: guest-fsfreeze called", "ünïcödé line"),
        verification=Verification(
            verdict=VerifyVerdict.NEEDS_RECOVERY,
            checked_at=datetime(2026, 3, 2, 1, 2, 3, 999999, tzinfo=CEST),
            checks=(
                FsCheck("disk0", "ext4", VerifyVerdict.CONSISTENT, "clean", False, "p1"),
                FsCheck("disk1", "xfs", VerifyVerdict.NEEDS_RECOVERY, "dirty log", True, None),
            ),
            bytes_read=3 * 2**33,
            duration_ms=1234.5,
        ),
    )


# ---------------------------------------------------------------------------- open & migrations


@pytest.mark.sqlite_only
async def test_open_default_url_creates_state_dir_in_wal_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "state" / "deeper"
    monkeypatch.setenv("FREEZEFRAME_HOME", str(home))
    monkeypatch.delenv("FREEZEFRAME_DATABASE_URL", raising=False)
    async with await Catalog.open() as catalog:
        assert catalog.url == f"sqlite:///{home / 'catalog.sqlite'}"
        assert await catalog.list_vms() == []
    with sqlite3.connect(home / "catalog.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0009",)
    with pytest.raises(CatalogError, match="closed"):
        await catalog.list_vms()
    await catalog.close()  # idempotent


async def test_migrated_schema_equals_models(cat: Catalog, catalog_db: CatalogDb) -> None:
    engine = sa.create_engine(catalog_db.url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        # Tables the models do not know would show up too: prove the check can fail.
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE stray (x INTEGER)")
            conn.exec_driver_sql("ALTER TABLE vms ADD COLUMN extra TEXT")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert {d[0] for d in diff} == {"remove_table", "remove_column"}
    finally:
        engine.dispose()


def test_migrations_downgrade_and_upgrade_again(catalog_db: CatalogDb) -> None:
    engine = sa.create_engine(catalog_db.url)
    try:
        cfg = _alembic_config()
        for target, step in (("head", command.upgrade), ("base", command.downgrade)):
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                step(cfg, target)
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        assert set(sa.inspect(engine).get_table_names()) == set(Base.metadata.tables) | {
            "alembic_version"
        }
    finally:
        engine.dispose()


@pytest.mark.sqlite_only
async def test_open_waits_for_a_writer_holding_the_file_while_switching_to_wal(
    db_path: Path,
) -> None:
    # Another process writing the catalog while it is in rollback-journal mode (as while it
    # switches to WAL itself) blocks our switch; SQLite says "locked" at once, without its busy
    # handler. Opening must wait for it, not fail (this failed CI once, as a race of two
    # processes; a new catalog is now made whole before it appears, so a catalog taken out of
    # WAL mode by hand stands in for it here).
    await (await Catalog.open(_url(db_path))).close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    reader = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        reader.execute("BEGIN IMMEDIATE")  # holds the RESERVED lock
        reader.execute("CREATE TABLE early (x INTEGER)")
        loop = asyncio.get_running_loop()
        loop.call_later(0.4, reader.execute, "COMMIT")
        started = loop.time()
        async with await Catalog.open(_url(db_path)) as catalog:
            assert await catalog.list_vms() == []
        assert loop.time() - started >= 0.3
    finally:
        reader.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_database_from_a_newer_freezeframe_is_refused(catalog_db: CatalogDb) -> None:
    await (await Catalog.open(catalog_db.url)).close()
    catalog_db.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(CatalogError, match="cannot migrate") as err:
        await Catalog.open(catalog_db.url)
    assert err.value.hint is not None
    assert "newer" in err.value.hint


@pytest.mark.sqlite_only
async def test_foreign_errors_become_catalog_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CatalogError) as err:
        await Catalog.open(_url(garbage))
    assert isinstance(err.value.__cause__, sa.exc.SQLAlchemyError)
    with pytest.raises(UsageError, match="not a database URL"):
        await Catalog.open("no such url")


def _assert_refused(err: pytest.ExceptionInfo[CatalogError], path: Path, what: str) -> None:
    assert type(err.value) is CatalogError
    assert err.value.exit_code == 8
    assert str(path) in err.value.message
    assert what in err.value.message
    assert err.value.hint is not None
    assert "backup" in err.value.hint
    assert "move it away" in err.value.hint


@pytest.mark.sqlite_only
async def test_an_empty_catalog_file_is_refused_not_reinitialised(db_path: Path) -> None:
    # Issue 12 item 5: a 0-byte catalog was silently made a new, empty one (every record and
    # freeze intent forgotten). Refused, naming the file, and nothing is written to it.
    db_path.touch()
    with pytest.raises(CatalogError) as err:
        await Catalog.open(_url(db_path))
    _assert_refused(err, db_path, "is empty (0 bytes)")
    assert db_path.stat().st_size == 0
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]


@pytest.mark.sqlite_only
async def test_a_file_that_is_not_a_catalog_is_refused_untouched(tmp_path: Path) -> None:
    text = tmp_path / "text.sqlite"
    text.write_text("an operator's notes, not a database\n" * 50)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.close()
    partial = tmp_path / "partial.sqlite"
    await (await Catalog.open(_url(partial))).close()
    with sqlite3.connect(partial) as conn:
        conn.execute("DROP TABLE freeze_intents")
    conn.close()
    cases = [
        (text, "cannot be read as SQLite"),
        (foreign, "without freezeframe's tables"),
        (partial, "lacks the tables freeze_intents"),
    ]
    for path, what in cases:
        before = path.read_bytes()
        with pytest.raises(CatalogError) as err:
            await Catalog.open(_url(path))
        _assert_refused(err, path, what)
        assert path.read_bytes() == before
    assert not (tmp_path / "text.sqlite-wal").exists()
    with sqlite3.connect(foreign) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]
    conn.close()


@pytest.mark.sqlite_only
async def test_a_missing_catalog_is_created_whole_without_leftovers(db_path: Path) -> None:
    async with await Catalog.open(_url(db_path)) as catalog:
        await catalog.add_vm(VmConfig(name="kept"))
    async with await Catalog.open(_url(db_path)) as catalog:  # opened again, not re-created
        assert [v.name for v in await catalog.list_vms()] == ["kept"]
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_a_missing_database_driver_names_its_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The URL selects psycopg (PostgreSQL), made unimportable here: exit 3, like any missing
    # package, naming the Debian package.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(DependencyError) as err:
        await Catalog.open("postgresql+psycopg://ff@localhost/ff")
    assert err.value.package == "python3-psycopg"
    assert err.value.exit_code == 3


@pytest.mark.sqlite_only
async def test_in_memory_database_works() -> None:
    async with await Catalog.open("sqlite://") as catalog:
        await catalog.add_vm(VmConfig(name="m"))
        assert [v.name for v in await catalog.list_vms()] == ["m"]


# ---------------------------------------------------------------------------- VMs


async def test_vm_roundtrip_replace_list_remove(cat: Catalog) -> None:
    full = VmConfig(
        name="db",
        driver="libvirt",
        qmp_path="/run/db.qmp",
        qga_path="/run/db.qga",
        agent=False,
        quiesce=QuiescePolicy.REQUIRED,
        freeze_timeout=2.5,
        agent_log_path="/var/log/qemu-ga.log",
        exclude_mounts=("/boot/efi", "/mnt/scratch"),
        lab=True,
    )
    await cat.add_vm(full)
    got = await cat.get_vm("db")
    assert got == full
    assert isinstance(got.exclude_mounts, tuple)
    assert type(got.quiesce) is QuiescePolicy

    await cat.add_vm(VmConfig(name="app"))
    with pytest.raises(AlreadyExistsError, match="db"):
        await cat.add_vm(VmConfig(name="db"))
    await cat.add_vm(VmConfig(name="db", freeze_timeout=1.0), replace=True)
    assert await cat.get_vm("db") == VmConfig(name="db", freeze_timeout=1.0)
    assert [v.name for v in await cat.list_vms()] == ["app", "db"]

    await cat.remove_vm("db")
    with pytest.raises(NotFoundError) as err:
        await cat.get_vm("db")
    assert err.value.code == "vm-not-found"
    assert err.value.remedy == Remedy(Action.LIST_VMS)
    with pytest.raises(NotFoundError):
        await cat.remove_vm("db")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (VmConfig(name="a b"), "bad VM name"),
        (VmConfig(name="../x"), "bad VM name"),
        (VmConfig(name=""), "bad VM name"),
        (VmConfig(name="x", freeze_timeout=float("nan")), "freeze timeout"),
        (VmConfig(name="x", freeze_timeout=float("inf")), "freeze timeout"),
        (VmConfig(name="x", freeze_timeout=0), "freeze timeout"),
        (VmConfig(name="x", qmp_path="run/x.qmp"), "QMP socket path must be absolute"),
        (VmConfig(name="x", qga_path="x.qga"), "guest-agent socket path must be absolute"),
    ],
)
async def test_invalid_vm_is_refused_before_storing(
    cat: Catalog, cfg: VmConfig, match: str
) -> None:
    # A NaN freeze timeout once reached the database and came back as "already registered".
    with pytest.raises(UsageError, match=match):
        await cat.add_vm(cfg)
    assert await cat.list_vms() == []


async def test_libvirt_style_names_are_accepted(cat: Catalog) -> None:
    await cat.add_vm(VmConfig(name="instance-0000002a"))
    await cat.add_vm(VmConfig(name="web_1.prod@rack:3+b"))
    assert len(await cat.list_vms()) == 2


# ---------------------------------------------------------------------------- snapshots


async def test_full_snapshot_record_roundtrip(cat: Catalog) -> None:
    rec = _full_record("0123456789abcdef")
    await cat.begin_snapshot(_record(rec.id, vm=rec.vm, at=rec.created_at))
    await cat.finish_snapshot(rec)
    got = await cat.get_snapshot(rec.id)
    assert got == rec
    # Aware UTC datetimes, tuples and enums come back (== alone would not show these).
    for dt in (got.created_at, *(e.t for e in got.timeline)):
        assert dt.tzinfo is UTC
    assert got.verification is not None
    assert got.verification.checked_at.tzinfo is UTC
    assert got.created_at.hour == 12  # 14:00+02:00
    for value in (got.disks, got.filesystems, got.timeline, got.evidence):
        assert isinstance(value, tuple)
    assert isinstance(got.verification.checks, tuple)
    assert type(got.status) is SnapshotStatus
    assert type(got.level) is ConsistencyLevel
    assert type(got.verification.checks[1].verdict) is VerifyVerdict
    assert await cat.list_snapshots() == [rec]


async def test_begin_and_finish_rules(cat: Catalog, catalog_db: CatalogDb) -> None:
    with pytest.raises(CatalogError, match="running"):
        await cat.begin_snapshot(_record("s-done", status=SnapshotStatus.DONE))
    with pytest.raises(CatalogError, match="naive"):
        await cat.begin_snapshot(_record("s-naive", at=datetime(2026, 1, 1)))
    with pytest.raises(NotFoundError):
        await cat.finish_snapshot(_record("never-begun", status=SnapshotStatus.FAILED))

    full = _full_record("s-1")
    await cat.begin_snapshot(_record("s-1"))
    with pytest.raises(AlreadyExistsError):
        await cat.begin_snapshot(_record("s-1"))
    await cat.finish_snapshot(full)
    assert catalog_db.rows("snapshot_disks") == 2
    # finish replaces everything: fewer children, no verification.
    failed = _record(
        "s-1",
        status=SnapshotStatus.FAILED,
        error="cut failed",
        disks=full.disks[:1],
        timeline=full.timeline[:1],
    )
    await cat.finish_snapshot(failed)
    assert await cat.get_snapshot("s-1") == failed
    assert (catalog_db.rows("snapshot_disks"), catalog_db.rows("snapshot_filesystems")) == (1, 0)
    assert (catalog_db.rows("verifications"), catalog_db.rows("fs_checks")) == (0, 0)


async def test_append_timeline_adds_without_rewriting(cat: Catalog) -> None:
    await cat.begin_snapshot(_record("app-1"))
    first = TimelineEvent("started", T0, 1)
    await cat.finish_snapshot(replace(_record("app-1"), timeline=(first,)))
    late = TimelineEvent("thaw_confirmed", T0 + timedelta(seconds=1), 2, "by recover")
    await cat.append_timeline("app-1", [late])
    await cat.append_timeline("app-1", [])
    assert (await cat.get_snapshot("app-1")).timeline == (first, late)
    with pytest.raises(NotFoundError):
        await cat.append_timeline("nope", [late])


async def test_get_snapshot_by_prefix(cat: Catalog) -> None:
    for sid in ("abcdef01", "abcdef02", "abcxyz99", "a%c_0000"):
        await cat.begin_snapshot(_record(sid))
    assert (await cat.get_snapshot("abcdef01")).id == "abcdef01"  # exact
    assert (await cat.get_snapshot("abcx")).id == "abcxyz99"  # unique prefix
    assert (await cat.get_snapshot("a%c_")).id == "a%c_0000"  # no wildcards
    with pytest.raises(UsageError, match="ambiguous: abcdef01, abcdef02") as err:
        await cat.get_snapshot("abcdef")
    assert not isinstance(err.value, NotFoundError)
    with pytest.raises(NotFoundError) as short:
        await cat.get_snapshot("abc")  # unique, but shorter than 4 characters
    assert short.value.hint is not None
    assert "4 characters" in short.value.hint
    for missing in ("ABCX", "zzzz", "a%c_1", "abcdef011"):
        with pytest.raises(NotFoundError):
            await cat.get_snapshot(missing)


async def test_list_latest_verification_delete(cat: Catalog, catalog_db: CatalogDb) -> None:
    # Inserted out of order: listing goes by created_at.
    plan = [
        ("s3", "web", 3, SnapshotStatus.RUNNING),
        ("s1", "web", 1, SnapshotStatus.DONE),
        ("s2", "web", 2, SnapshotStatus.DONE),
        ("s4", "web", 4, SnapshotStatus.FAILED),
        ("o1", "other", 5, SnapshotStatus.DONE),
    ]
    for sid, vm, minute, status in plan:
        rec = _record(sid, vm=vm, at=T0 + timedelta(minutes=minute))
        await cat.begin_snapshot(rec)
        await cat.finish_snapshot(replace(rec, status=status))
    assert [r.id for r in await cat.list_snapshots("web")] == ["s1", "s2", "s3", "s4"]
    assert [r.id for r in await cat.list_snapshots()] == ["s1", "s2", "s3", "s4", "o1"]
    latest = await cat.latest_snapshot("web")
    assert latest is not None
    assert latest.id == "s2"
    assert await cat.latest_snapshot("nobody") is None

    first = Verification(
        VerifyVerdict.CORRUPT,
        T0,
        (FsCheck("disk0", "ext4", VerifyVerdict.CORRUPT, "bad", False, None),) * 3,
    )
    second = Verification(VerifyVerdict.CONSISTENT, T0 + timedelta(hours=1), bytes_read=10)
    await cat.set_verification("s2", first)
    assert (await cat.get_snapshot("s2")).verification == first
    await cat.set_verification("s2", second)
    assert (await cat.get_snapshot("s2")).verification == second
    assert catalog_db.rows("fs_checks") == 0
    with pytest.raises(NotFoundError):
        await cat.set_verification("nope", second)

    full = _full_record("s-full")
    await cat.begin_snapshot(_record("s-full"))
    await cat.finish_snapshot(full)
    await cat.delete_snapshot("s-full")
    await cat.delete_snapshot("s2")
    with pytest.raises(NotFoundError):
        await cat.get_snapshot("s-full")
    with pytest.raises(NotFoundError):
        await cat.delete_snapshot("s-full")
    for table in ("snapshot_disks", "snapshot_filesystems", "timeline_events", "verifications"):
        assert catalog_db.rows(table) == 0, table
    assert [r.id for r in await cat.list_snapshots()] == ["s1", "s3", "s4", "o1"]


# ---------------------------------------------------------------------------- freeze intents


async def test_freeze_intents(cat: Catalog) -> None:
    before = datetime.now(UTC)
    a = await cat.open_intent("web", "s1", "/run/web.qga", "h:1:a")
    b = await cat.open_intent("db", "s2", "/run/db.qga", "h:2:b")
    c = await cat.open_intent("web", "s3", "/run/web.qga", "h:3:c")
    assert len({a.id, b.id, c.id}) == 3
    assert (a.vm, a.snapshot_id, a.agent_address, a.owner, a.closed_at, a.closed_by) == (
        "web",
        "s1",
        "/run/web.qga",
        "h:1:a",
        None,
        "",
    )
    assert a.opened_at.tzinfo is UTC
    assert before <= a.opened_at <= datetime.now(UTC)
    assert await cat.open_intents() == [a, b, c]
    assert await cat.open_intents("web") == [a, c]

    await cat.close_intent(a.id, "engine")
    await cat.close_intent(a.id, "recover")  # already closed: first closer stays
    assert await cat.open_intents("web") == [c]
    assert await cat.open_intents() == [b, c]
    with pytest.raises(NotFoundError):
        await cat.close_intent(10_000, "engine")


# ---------------------------------------------------------------------------- VM locks


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(proc.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.fixture
def young_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def test_lock_acquire_busy_release(cat: Catalog) -> None:
    me = make_owner()
    assert me == make_owner()
    host, pid, token = me.split(":")
    assert (host, int(pid), len(token)) == (socket.gethostname(), os.getpid(), 8)

    await cat.acquire_vm_lock("web", me)
    with pytest.raises(BusyError, match=rf"snapshot of VM web in progress by {me} since 20"):
        await cat.acquire_vm_lock("web", "otherhost:1:x")
    with pytest.raises(BusyError):
        await cat.acquire_vm_lock("web", me)  # not re-entrant
    await cat.acquire_vm_lock("db", "otherhost:1:x")  # per VM

    await cat.release_vm_lock("web", "otherhost:1:x")  # not the holder: left alone
    with pytest.raises(BusyError):
        await cat.acquire_vm_lock("web", "otherhost:1:x")
    await cat.release_vm_lock("web", me)
    await cat.acquire_vm_lock("web", "otherhost:1:x")
    await cat.release_vm_lock("web", "otherhost:1:x")
    await cat.release_vm_lock("web", "otherhost:1:x")  # not held: only a warning


async def test_lock_of_dead_process_on_this_host_is_stolen(cat: Catalog, dead_pid: int) -> None:
    dead = f"{socket.gethostname()}:{dead_pid}:deadbeef"
    await cat.acquire_vm_lock("web", dead)
    me = make_owner()
    await cat.acquire_vm_lock("web", me)
    with pytest.raises(BusyError, match=me):
        await cat.acquire_vm_lock("web", "h:1:x")
    # The same pid on another host cannot be judged: never stolen.
    await cat.acquire_vm_lock("db", f"elsewhere-{socket.gethostname()}:{dead_pid}:x")
    with pytest.raises(BusyError, match="elsewhere"):
        await cat.acquire_vm_lock("db", me)


async def test_lock_of_reused_pid_is_stolen_but_live_holder_is_not(
    cat: Catalog, catalog_db: CatalogDb, young_process: subprocess.Popen[bytes]
) -> None:
    holder = f"{socket.gethostname()}:{young_process.pid}:cafe"
    await cat.acquire_vm_lock("web", holder)
    with pytest.raises(BusyError, match=holder):
        await cat.acquire_vm_lock("web", make_owner())  # live, started before the lock
    # Pretend the lock was taken an hour before that process started: the pid was reused.
    catalog_db.execute("UPDATE vm_locks SET acquired_at = '2000-01-01 00:00:00.000000'")
    await cat.acquire_vm_lock("web", make_owner())
    with pytest.raises(BusyError, match=make_owner()):
        await cat.acquire_vm_lock("web", holder)


# ---------------------------------------------------------------------------- several processes


#: Rounds of the lock race: each is a fresh chance for two racers to both win.
RACE_ROUNDS = 50


def _race_for_lock(url: str, rounds: int, barrier: Any, results: Any) -> None:
    """Child: open the catalog together with the others (a fresh one: one of them migrates it),
    then ``rounds`` times: wait for every racer, try the lock snapshot create takes
    (``acquire_vm_lock``) of VM ``web``, report, wait until every racer has tried, and the
    winner releases it for the next round."""

    async def main() -> None:
        try:
            await asyncio.to_thread(barrier.wait, 60)  # all open (and migrate) at once
            catalog = await Catalog.open(url)
        except Exception as exc:
            results.put((-1, "error", make_owner(), f"open: {exc!r}"))
            barrier.abort()  # the others stop too (BrokenBarrierError)
            return
        owner = make_owner()
        try:
            for rnd in range(rounds):
                await asyncio.to_thread(barrier.wait, 60)
                try:
                    await catalog.acquire_vm_lock("web", owner)
                    verdict, detail = "won", ""
                except BusyError as exc:
                    verdict, detail = "busy", f"{exc.code} {exc}"
                except Exception as exc:
                    verdict, detail = "error", repr(exc)
                results.put((rnd, verdict, owner, detail))
                await asyncio.to_thread(barrier.wait, 60)  # every racer has looked at the lock
                if verdict == "won":
                    await catalog.release_vm_lock("web", owner)
        finally:
            await catalog.close()

    try:
        asyncio.run(main())
    except threading.BrokenBarrierError:
        results.put((-1, "error", make_owner(), "another racer failed"))


def _write_snapshots(url: str, tag: str, count: int, ready: Any, results: Any) -> None:
    """Child: write ``count`` complete snapshots with intents and a lock, as fast as it can."""

    async def main() -> None:
        catalog = await Catalog.open(url)
        try:
            owner = make_owner()
            await asyncio.to_thread(ready.wait, 30)
            for i in range(count):
                sid = f"{tag}-{i:03d}"
                await catalog.acquire_vm_lock(tag, owner)
                await catalog.begin_snapshot(_record(sid, vm=tag, at=T0 + timedelta(seconds=i)))
                intent = await catalog.open_intent(tag, sid, "/run/x.qga", owner)
                await catalog.close_intent(intent.id, "engine")
                await catalog.finish_snapshot(
                    replace(_full_record(sid), vm=tag, created_at=T0 + timedelta(seconds=i))
                )
                await catalog.set_verification(sid, Verification(VerifyVerdict.CONSISTENT, T0))
                assert len(await catalog.list_snapshots(tag)) == i + 1
                await catalog.release_vm_lock(tag, owner)
        finally:
            await catalog.close()

    try:
        asyncio.run(main())
        results.put((tag, "ok"))
    except Exception as exc:
        results.put((tag, repr(exc)))


def _run_children(
    target: Any, argsets: list[tuple[Any, ...]], results: Any, expect: int = 0
) -> list[Any]:
    """Run ``target(*args)`` in a spawned process per argset; ``expect`` results (default:
    one per process) from ``results``."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in argsets]
    try:
        for p in procs:
            p.start()
        out = []
        for _ in range(expect or len(procs)):
            out.append(results.get(timeout=120))
            if out[-1][1] == "error":  # no use waiting for the rest
                return out
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def test_processes_racing_for_a_lock_exactly_one_wins(catalog_db: CatalogDb) -> None:
    # Issue 8: several processes (serve, CLI calls) on one catalog, SQLite or PostgreSQL:
    # exactly one snapshot of a VM at a time, the others get vm-busy. Four OS processes race
    # RACE_ROUNDS times for the same VM's lock, released between rounds.
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    args = [(catalog_db.url, RACE_ROUNDS, barrier, results)] * n
    out = _run_children(_race_for_lock, args, results, expect=n * RACE_ROUNDS)
    assert not [o for o in out if o[1] == "error"], out
    for rnd in range(RACE_ROUNDS):
        this = [o for o in out if o[0] == rnd]
        winners = [owner for _, verdict, owner, _ in this if verdict == "won"]
        losers = [detail for _, verdict, _, detail in this if verdict == "busy"]
        assert len(winners) == 1, (rnd, this)
        assert len(losers) == n - 1, (rnd, this)
        assert all(d.startswith("vm-busy ") for d in losers), losers
        assert all(f"in progress by {winners[0]}" in d for d in losers), losers
    assert len({o[2] for o in out}) == n  # four distinct owners took part
    assert catalog_db.rows("vm_locks") == 0
    assert catalog_db.execute("SELECT count(*) FROM alembic_version") == [(1,)]
    if catalog_db.path is not None:
        # Each created the file under a name of its own; one was linked into place, none left.
        assert not [p.name for p in catalog_db.path.parent.iterdir() if ".new-" in p.name]


def test_concurrent_writers_do_not_hit_database_is_locked(catalog_db: CatalogDb) -> None:
    ctx = multiprocessing.get_context("spawn")
    count = 15
    ready, results = ctx.Barrier(2), ctx.Queue()
    url = catalog_db.url
    args = [(url, tag, count, ready, results) for tag in ("vm-a", "vm-b")]
    out = _run_children(_write_snapshots, args, results)
    assert sorted(out) == [("vm-a", "ok"), ("vm-b", "ok")]
    assert catalog_db.rows("snapshots") == 2 * count
    assert catalog_db.rows("snapshot_disks") == 2 * 2 * count
    assert catalog_db.rows("verifications") == 2 * count
    assert catalog_db.rows("vm_locks") == 0


async def test_a_busy_lock_names_what_holds_it(catalog_db: CatalogDb) -> None:
    # Issue 12 item 6: a create refused because doctor held the lock said "snapshot in progress".
    async with await Catalog.open(catalog_db.url) as cat:
        await cat.add_vm(VmConfig(name="web1"))
        await cat.acquire_vm_lock("web1", make_owner(), purpose="doctor")
        with pytest.raises(BusyError) as ei:
            await cat.acquire_vm_lock("web1", "otherhost:1:abcd")
        assert ei.value.holder_purpose == "doctor"
        assert ei.value.exit_code == 9
        await cat.release_vm_lock("web1", make_owner())
        await cat.acquire_vm_lock("web1", make_owner())  # a snapshot's (the default)
        with pytest.raises(BusyError) as ei:
            await cat.acquire_vm_lock("web1", "otherhost:1:abcd")
        assert ei.value.holder_purpose == "snapshot"
