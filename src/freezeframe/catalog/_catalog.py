"""The :class:`Catalog` itself: engine set-up, migrations on open, and every query.

See the package docstring (:mod:`freezeframe.catalog`) for the tables and the multi-process
story. Rows of :mod:`freezeframe.catalog._schema` are converted to and from the frozen
dataclasses of :mod:`freezeframe.models` here and never returned.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, CursorResult, Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool, StaticPool

from freezeframe import paths
from freezeframe._aio import AsyncClosing, shielded
from freezeframe._owner import holder_is_dead, make_owner
from freezeframe.catalog import _images, _schedules
from freezeframe.catalog._full import filesystem_full_error
from freezeframe.catalog._schema import (
    FreezeIntentRow,
    FsCheckRow,
    ScheduleRow,
    SnapshotDiskRow,
    SnapshotFilesystemRow,
    SnapshotRow,
    TimelineEventRow,
    VerificationRow,
    VmLockRow,
    VmRow,
)
from freezeframe.errors import (
    Action,
    AlreadyExistsError,
    BusyError,
    CatalogError,
    DependencyError,
    FreezeframeError,
    NotFoundError,
    Remedy,
    UsageError,
)
from freezeframe.models import (
    ChainImage,
    ConsistencyLevel,
    FreezeIntent,
    FsCheck,
    ImageFingerprint,
    MergeIntent,
    QuiescePolicy,
    ScheduleRecord,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    SnapshotSummary,
    TimelineEvent,
    Verification,
    VerifyVerdict,
    VmConfig,
)

__all__ = ["BUSY_TIMEOUT_MS", "MIN_PREFIX", "Catalog", "redact_url"]


_QUERY_SECRET = re.compile(r"(?i)((?:password|passwd|sslpassword)=)[^&#\s]*")


def redact_url(text: str) -> str:
    """``text`` (a database URL, well-formed or not) with any password replaced by ``***``.

    Works on malformed URLs too (a missing ``:`` after the scheme, a bad port): everything
    between the last ``:`` of the user part and the ``@`` before the host is hidden, and so is
    a ``password=`` query parameter. Raises nothing.
    """
    head, sep, rest = text.partition("//")
    if not sep:
        head, rest = "", text
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{hostpart}"
    return _QUERY_SECRET.sub(r"\1***", f"{head}{sep}{rest}")


log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

#: How long a SQLite connection waits for another process's write transaction.
BUSY_TIMEOUT_MS = 30_000
#: Shortest snapshot id prefix :meth:`Catalog.get_snapshot` resolves.
MIN_PREFIX = 4
#: Execution option marking the engine whose transactions write (``BEGIN IMMEDIATE``).
_WRITE = "freezeframe_write"
#: PostgreSQL advisory lock (per database) every writing transaction takes first ("ffca").
_PG_WRITE_LOCK = 0x66666361
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_VM_REMEDY = Remedy(Action.LIST_VMS)
_SNAPSHOT_REMEDY = Remedy(Action.LIST_SNAPSHOTS)
_LOCK_STEAL_ATTEMPTS = 5
#: Tables every freezeframe catalog has had since revision 0001: a SQLite file without them is
#: not a catalog (an emptied or foreign file), and is refused rather than initialised.
_CATALOG_TABLES = frozenset({"alembic_version", "vms", "snapshots", "freeze_intents", "vm_locks"})


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise CatalogError(f"{what} is a naive datetime; the catalog stores aware UTC times")
    return value


def _enum(cls: type[E], value: str, what: str) -> E:
    try:
        return cls(value)
    except ValueError as exc:
        raise CatalogError(f"the catalog holds an unknown {what} {value!r}") from exc


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"the catalog holds a malformed {what}: {value!r}")
    return tuple(value)


# ---------------------------------------------------------------------------- conversions


def _vm_row(cfg: VmConfig) -> VmRow:
    return VmRow(
        name=cfg.name,
        driver=cfg.driver,
        qmp_path=cfg.qmp_path,
        qga_path=cfg.qga_path,
        connect_uri=cfg.connect_uri,
        domain=cfg.domain,
        agent=cfg.agent,
        quiesce=QuiescePolicy(cfg.quiesce).value,
        freeze_timeout=cfg.freeze_timeout,
        agent_log_path=cfg.agent_log_path,
        exclude_mounts=list(cfg.exclude_mounts),
        lab=cfg.lab,
        overlay_dir=cfg.overlay_dir,
        ceph_conf=cfg.ceph_conf,
        ceph_id=cfg.ceph_id,
        ceph_keyring=cfg.ceph_keyring,
    )


def _vm(row: VmRow) -> VmConfig:
    return VmConfig(
        name=row.name,
        driver=row.driver,
        qmp_path=row.qmp_path,
        qga_path=row.qga_path,
        connect_uri=row.connect_uri,
        domain=row.domain,
        agent=row.agent,
        quiesce=_enum(QuiescePolicy, row.quiesce, "quiesce policy"),
        freeze_timeout=row.freeze_timeout,
        agent_log_path=row.agent_log_path,
        exclude_mounts=_strings(row.exclude_mounts, f"exclude_mounts of VM {row.name}"),
        lab=row.lab,
        overlay_dir=row.overlay_dir,
        ceph_conf=row.ceph_conf,
        ceph_id=row.ceph_id,
        ceph_keyring=row.ceph_keyring,
    )


def _verification_row(snapshot_id: str, v: Verification) -> VerificationRow:
    return VerificationRow(
        snapshot_id=snapshot_id,
        verdict=VerifyVerdict(v.verdict).value,
        checked_at=_aware(v.checked_at, "verification.checked_at"),
        bytes_read=v.bytes_read,
        duration_ms=v.duration_ms,
        checks=[
            FsCheckRow(
                ordinal=i,
                device=c.device,
                fstype=c.fstype,
                verdict=VerifyVerdict(c.verdict).value,
                detail=c.detail,
                log_replayed=c.log_replayed,
                partition=c.partition,
            )
            for i, c in enumerate(v.checks)
        ],
    )


def _verification(row: VerificationRow) -> Verification:
    return Verification(
        verdict=_enum(VerifyVerdict, row.verdict, "verdict"),
        checked_at=row.checked_at,
        checks=tuple(
            FsCheck(
                device=c.device,
                fstype=c.fstype,
                verdict=_enum(VerifyVerdict, c.verdict, "verdict"),
                detail=c.detail,
                log_replayed=c.log_replayed,
                partition=c.partition,
            )
            for c in row.checks
        ),
        bytes_read=row.bytes_read,
        duration_ms=row.duration_ms,
    )


def _snapshot_row(rec: SnapshotRecord) -> SnapshotRow:
    return SnapshotRow(
        id=rec.id,
        vm=rec.vm,
        created_at=_aware(rec.created_at, "snapshot.created_at"),
        status=SnapshotStatus(rec.status).value,
        policy=QuiescePolicy(rec.policy).value,
        level=ConsistencyLevel(rec.level).value,
        level_reason=rec.level_reason,
        error=rec.error or "",
        parent_id=rec.parent_id,
        freeze_window_ms=rec.freeze_window_ms,
        evidence=list(rec.evidence),
        disks=[
            SnapshotDiskRow(
                ordinal=i,
                device=d.device,
                node=d.node,
                image=d.image,
                format=d.format,
                overlay=d.overlay,
                backend=d.backend,
                virtual_size=d.virtual_size,
                fp_size=d.fingerprint.size if d.fingerprint else None,
                fp_mtime_ns=d.fingerprint.mtime_ns if d.fingerprint else None,
                fp_inode=d.fingerprint.inode if d.fingerprint else None,
                image_mode=d.image_mode,
                quiesce_note=d.quiesce_note,
            )
            for i, d in enumerate(rec.disks)
        ],
        filesystems=[
            SnapshotFilesystemRow(
                ordinal=i,
                mountpoint=f.mountpoint,
                fstype=f.fstype,
                device=f.device,
                frozen=f.frozen,
                reason=f.reason,
            )
            for i, f in enumerate(rec.filesystems)
        ],
        timeline=[_timeline_row(i, e) for i, e in enumerate(rec.timeline)],
        verification=(
            None if rec.verification is None else _verification_row(rec.id, rec.verification)
        ),
    )


def _timeline_row(ordinal: int, e: TimelineEvent) -> TimelineEventRow:
    return TimelineEventRow(
        ordinal=ordinal,
        name=e.name,
        t=_aware(e.t, f"timeline event {e.name!r}"),
        mono_ns=e.mono_ns,
        detail=e.detail,
    )


def _snapshot(row: SnapshotRow) -> SnapshotRecord:
    return SnapshotRecord(
        id=row.id,
        vm=row.vm,
        created_at=row.created_at,
        status=_enum(SnapshotStatus, row.status, "snapshot status"),
        policy=_enum(QuiescePolicy, row.policy, "quiesce policy"),
        level=_enum(ConsistencyLevel, row.level, "consistency level"),
        level_reason=row.level_reason,
        error=row.error or None,
        parent_id=row.parent_id,
        disks=tuple(
            SnapshotDisk(
                device=d.device,
                node=d.node,
                image=d.image if d.image_row is None else d.image_row.location,
                format=d.format,
                overlay=d.overlay,
                backend=d.backend,
                virtual_size=d.virtual_size,
                fingerprint=_fingerprint(d),
                image_mode=d.image_mode,
                quiesce_note=d.quiesce_note,
            )
            for d in row.disks
        ),
        filesystems=tuple(
            SnapshotFilesystem(
                mountpoint=f.mountpoint,
                fstype=f.fstype,
                device=f.device,
                frozen=f.frozen,
                reason=f.reason,
            )
            for f in row.filesystems
        ),
        timeline=tuple(
            TimelineEvent(name=e.name, t=e.t, mono_ns=e.mono_ns, detail=e.detail)
            for e in row.timeline
        ),
        freeze_window_ms=row.freeze_window_ms,
        evidence=_strings(row.evidence, f"evidence of snapshot {row.id}"),
        verification=None if row.verification is None else _verification(row.verification),
    )


def _fingerprint(row: SnapshotDiskRow) -> ImageFingerprint | None:
    if row.fp_size is None or row.fp_mtime_ns is None or row.fp_inode is None:
        return None
    return ImageFingerprint(size=row.fp_size, mtime_ns=row.fp_mtime_ns, inode=row.fp_inode)


def _intent(row: FreezeIntentRow) -> FreezeIntent:
    return FreezeIntent(
        id=row.id,
        vm=row.vm,
        snapshot_id=row.snapshot_id,
        agent_address=row.qga_path,
        opened_at=row.opened_at,
        owner=row.owner,
        closed_at=row.closed_at,
        closed_by=row.closed_by,
    )


_LOAD_SNAPSHOT = (
    selectinload(SnapshotRow.disks),
    selectinload(SnapshotRow.filesystems),
    selectinload(SnapshotRow.timeline),
    selectinload(SnapshotRow.verification).selectinload(VerificationRow.checks),
)


def _filtered(query: Any, vm: str | None, status: SnapshotStatus | None) -> Any:
    """``query`` over snapshots, narrowed to ``vm``'s and to ``status`` when given."""
    if vm is not None:
        query = query.where(SnapshotRow.vm == vm)
    if status is not None:
        query = query.where(SnapshotRow.status == SnapshotStatus(status).value)
    return query


def _keyset(query: Any, after: tuple[datetime, str] | None, newest_first: bool) -> Any:
    """``query`` ordered by ``(created_at, id)`` (descending with ``newest_first``) from just
    after the record keyed ``after``. The condition is written as a range on ``created_at``
    (``<=`` / ``>=``, then the exact order) so that its index serves it on every backend."""
    if after is not None:
        at, sid = after
        if newest_first:
            query = query.where(
                SnapshotRow.created_at <= at,
                sa.or_(SnapshotRow.created_at < at, SnapshotRow.id < sid),
            )
        else:
            query = query.where(
                SnapshotRow.created_at >= at,
                sa.or_(SnapshotRow.created_at > at, SnapshotRow.id > sid),
            )
    if newest_first:
        return query.order_by(SnapshotRow.created_at.desc(), SnapshotRow.id.desc())
    return query.order_by(SnapshotRow.created_at, SnapshotRow.id)


def _count_of(table: type[SnapshotDiskRow | SnapshotFilesystemRow], *where: Any) -> Any:
    """How many child rows of ``table`` the outer snapshot row has (a correlated subquery on
    the child's primary key ``(snapshot_id, ordinal)``)."""
    return (
        sa.select(sa.func.count())
        .select_from(table)
        .where(table.snapshot_id == SnapshotRow.id, *where)
        .scalar_subquery()
    )


def _last_step(name: str) -> Any:
    """The ordinal of the outer snapshot's last timeline step called ``name`` (NULL: none)."""
    return (
        sa.select(sa.func.max(TimelineEventRow.ordinal))
        .where(TimelineEventRow.snapshot_id == SnapshotRow.id, TimelineEventRow.name == name)
        .scalar_subquery()
    )


#: The columns of a summary: the record's own, the verification's (outer join), counts of the
#: child rows and the last ordinals of the timeline steps that decide its flags.
_SUMMARY_COLUMNS = (
    SnapshotRow.id,
    SnapshotRow.vm,
    SnapshotRow.created_at,
    SnapshotRow.status,
    SnapshotRow.policy,
    SnapshotRow.level,
    SnapshotRow.error,
    SnapshotRow.parent_id,
    SnapshotRow.freeze_window_ms,
    VerificationRow.verdict,
    VerificationRow.checked_at,
    _count_of(SnapshotDiskRow).label("disk_count"),
    _count_of(SnapshotFilesystemRow).label("filesystem_count"),
    _count_of(SnapshotFilesystemRow, SnapshotFilesystemRow.frozen.is_(True)).label("frozen"),
    _last_step("thaw_unconfirmed").label("last_thaw_unconfirmed"),
    _last_step("intent_left_open").label("last_intent_left_open"),
    _last_step("thaw_confirmed").label("last_thaw_confirmed"),
)


def _still(last: int | None, confirmed: int | None) -> bool:
    """A step at ordinal ``last`` not followed by a ``thaw_confirmed`` (last at ``confirmed``)."""
    return last is not None and (confirmed is None or confirmed < last)


def _summary(row: sa.Row[Any]) -> SnapshotSummary:
    (sid, vm, created, status, policy, level, error, parent, window, verdict, checked,
     disks, fss, frozen, unconfirmed, left_open, confirmed) = tuple(row)  # fmt: skip
    return SnapshotSummary(
        id=sid,
        vm=vm,
        created_at=created,
        status=_enum(SnapshotStatus, status, "snapshot status"),
        policy=_enum(QuiescePolicy, policy, "quiesce policy"),
        level=_enum(ConsistencyLevel, level, "consistency level"),
        error=error or None,
        parent_id=parent,
        freeze_window_ms=window,
        disk_count=int(disks),
        filesystem_count=int(fss),
        frozen_count=int(frozen),
        verdict=None if verdict is None else _enum(VerifyVerdict, verdict, "verdict"),
        verified_at=checked,
        thaw_unconfirmed=_still(unconfirmed, confirmed),
        intent_left_open=_still(left_open, confirmed),
    )


class _WriteSession(Session):
    """The Session of writing transactions: strings longer than their column are refused
    before the flush (:func:`_check_lengths`)."""


@sa.event.listens_for(_WriteSession, "before_flush")
def _check_lengths(session: Session, _context: object, _instances: object) -> None:
    """Refuse a string longer than its ``VARCHAR(n)`` column on every backend alike: SQLite
    would store it whole, PostgreSQL refuses the statement.

    Raises:
        CatalogError: names the table, the column and both lengths.
    """
    for row in (*session.new, *session.dirty):
        for attr in sa.inspect(row).mapper.column_attrs:
            column = attr.columns[0]
            limit = getattr(column.type, "length", None)
            value = getattr(row, attr.key, None)
            if isinstance(limit, int) and isinstance(value, str) and len(value) > limit:
                raise CatalogError(
                    f"{column.table.name}.{column.name} is {len(value)} characters long, "
                    f"the catalog stores at most {limit}: {value[:40]!r}..."
                )


def _rowcount(result: sa.Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


# ---------------------------------------------------------------------------- engine


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def _enable_wal(cur: sqlite3.Cursor) -> None:
    """Put the database in WAL mode (persistent), waiting for other processes up to the timeout.

    Switching the journal mode needs an exclusive lock and SQLite answers "database is locked"
    at once, without the busy handler, while another connection (say a second process opening
    the same new file) holds a shared lock. So the switch is retried with a short backoff until
    :data:`BUSY_TIMEOUT_MS`; a file already in WAL mode is only read.

    Raises:
        sqlite3.OperationalError: still locked after the timeout, or another database error.
    """
    row = cur.execute("PRAGMA journal_mode").fetchone()
    if row is not None and str(row[0]).lower() == "wal":
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            row = cur.execute("PRAGMA journal_mode = WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    if row is None or str(row[0]).lower() != "wal":
        log.warning("SQLite refused WAL mode (journal_mode=%s)", row)


def _create_postgresql_engine(url: URL) -> Engine:
    """An engine for a PostgreSQL ``url`` whose transactions behave as SQLite's do here.

    A writing transaction (engine option ``_WRITE``) runs in READ COMMITTED and first takes the
    transaction-scoped advisory lock :data:`_PG_WRITE_LOCK` of the database: writers queue for
    it as SQLite writers queue for ``BEGIN IMMEDIATE``, so every read-then-write of the catalog
    (and ``alembic upgrade`` of processes opening a new database at once) runs alone, and each
    of its statements sees what the previous writer committed. A reading transaction is
    REPEATABLE READ, READ ONLY: one consistent snapshot for all its statements (a record and
    its child rows), as a SQLite WAL reader has; it never waits for writers.
    """
    engine = sa.create_engine(url, pool_pre_ping=True)

    def on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get(_WRITE):
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
        else:
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    sa.event.listen(engine, "begin", on_begin)
    return engine


def _create_engine(url: URL) -> Engine:
    """An engine for ``url``; for SQLite with WAL, a busy timeout and our own BEGINs; for
    PostgreSQL see :func:`_create_postgresql_engine`."""
    if url.get_backend_name() == "postgresql":
        return _create_postgresql_engine(url)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)

    memory = _is_memory(url)
    if memory:
        engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        engine = sa.create_engine(url)

    def on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # SQLAlchemy, not the sqlite3 module, decides when a transaction starts (on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
            cur.execute("PRAGMA foreign_keys = ON")
            if not memory:
                _enable_wal(cur)
        finally:
            cur.close()

    def on_begin(conn: sa.Connection) -> None:
        # A writer takes SQLite's write lock up front (waiting up to the busy timeout), so it
        # never upgrades a read snapshot that another writer made stale (SQLITE_BUSY at once).
        immediate = bool(conn.get_execution_options().get(_WRITE))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    return engine


def _sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL opens, resolved as the driver resolves it; None when the URL is
    not a SQLite file (another backend, in memory, a ``uri=true`` SQLite URI)."""
    if url.get_backend_name() != "sqlite" or _is_memory(url) or not url.database:
        return None
    if "uri" in url.query:
        return None
    return Path(os.path.abspath(url.database))


def _bad_catalog(path: Path, what: str) -> CatalogError:
    return CatalogError(
        f"catalog {path} {what}: it is not a freezeframe catalog; refused, nothing was written "
        "to it",
        hint=f"restore {path} from a backup, or move it away (mv {path} {path}.bad) to start "
        "afresh with an empty catalog",
    )


def _check_catalog_file(url: URL, path: Path) -> None:
    """Refuse an existing ``path`` that is not a freezeframe catalog — empty, not SQLite, or
    SQLite without the catalog's tables — without writing anything to it.

    Only a missing file is ever created (:func:`_create_catalog_file`, which puts a whole catalog
    in place atomically), so a file another process is creating right now is never seen half
    made, and anything else at the path is a damaged or foreign file: initialising it would
    silently forget every record and freeze intent.

    Raises:
        CatalogError: the file is refused (the message names it, the hint says what to do).
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _bad_catalog(path, "is not a regular file")
    if st.st_size == 0:
        raise _bad_catalog(path, "is empty (0 bytes)")

    def connect() -> sqlite3.Connection:
        # mode=rw: never create the file (it may have been removed since the stat).
        return sqlite3.connect(
            f"{path.as_uri()}?mode=rw",
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )

    engine = sa.create_engine(url, poolclass=NullPool, creator=connect)
    try:
        with engine.connect() as conn:
            tables = set(
                conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")
                .scalars()
                .all()
            )
    except SQLAlchemyError as exc:
        code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            raise _bad_catalog(path, f"cannot be read as SQLite ({_describe(exc)})") from exc
        # Not the file's content (permissions, locked, I/O): not a reason to move it away.
        what = f"cannot open catalog {path}"
        raise filesystem_full_error(what, exc, path) or CatalogError(
            f"{what}: {_describe(exc)}"
        ) from exc
    finally:
        engine.dispose()
    missing = sorted(_CATALOG_TABLES - tables)
    if len(missing) == len(_CATALOG_TABLES):
        raise _bad_catalog(path, "is a SQLite database without freezeframe's tables")
    if missing:
        raise _bad_catalog(path, f"lacks the tables {', '.join(missing)}")


def _create_catalog_file(url: URL, path: Path) -> None:
    """Create a new catalog at ``path`` if nothing is there, atomically.

    It is built and migrated under a temporary name in the same directory, closed (WAL
    checkpointed), then hard-linked into place, which fails if a file appeared meanwhile: of
    processes creating it at the same time one wins and the others use its file. So the path
    never holds a half-made catalog, and :func:`_check_catalog_file` can refuse at once what is
    not a whole one. (On a filesystem without hard links it is renamed into place, if the path
    is still free.)

    Raises:
        CatalogError: the catalog cannot be created.
    """
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
    side = [tmp.with_name(tmp.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
    try:
        engine = _create_engine(url.set(database=str(tmp)))
        try:
            _migrate(engine.execution_options(**{_WRITE: True}))
        finally:
            engine.dispose()
        if side[0].exists() and side[0].stat().st_size > 0:  # never expected: not checkpointed
            raise CatalogError(f"cannot create catalog {path}: {side[0]} was not checkpointed")
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.debug("catalog %s was created by another process meanwhile", path)
        except OSError:
            if not os.path.lexists(path):  # no hard links here (vfat, some FUSE)
                os.replace(tmp, path)
    except (SQLAlchemyError, sqlite3.Error) as exc:
        what = f"cannot create catalog {path}"
        raise filesystem_full_error(what, exc, path) or CatalogError(
            f"{what}: {_describe(exc)}"
        ) from exc
    except OSError as exc:
        what = f"cannot create catalog {path}"
        raise filesystem_full_error(what, exc, path) or CatalogError(f"{what}: {exc}") from exc
    finally:
        for leftover in (tmp, *side):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", leftover, exc)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    return cfg


def _migrate(write_engine: Engine) -> None:
    """``alembic upgrade head`` inside one write transaction (serialized between processes)."""
    cfg = _alembic_config()
    with write_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        return f"{type(orig).__name__}: {orig}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


# ---------------------------------------------------------------------------- the catalog


#: How a lock's purpose reads in a refusal ("a snapshot of VM x in progress by ...").
_LOCK_WORDS = {
    "snapshot": "a snapshot",
    "doctor": "a doctor check",
    "recover": "a recover",
    "lab-down": "a lab down",
    "delete": "a snapshot delete",
}


class Catalog(AsyncClosing):
    """The freezeframe catalog: VMs, snapshots, freeze intents and per-VM locks.

    Get one with :meth:`open` (or ``async with await Catalog.open() as cat``). Every public
    method runs its database work in a worker thread (``asyncio.to_thread``); calls of one
    Catalog are serialized, and a cancelled call still waits for its thread, so it has either
    fully taken effect or not at all when CancelledError reaches the caller. Every method raises
    :class:`CatalogError` when the database fails (the SQLAlchemy error is its ``__cause__``) or
    the catalog is closed, plus what it lists.
    """

    def __init__(self, engine: Engine, display_url: str) -> None:
        """Private: use :meth:`open`."""
        self._engine: Engine | None = engine
        self._write_engine = engine.execution_options(**{_WRITE: True})
        self._display = display_url
        self._serial = threading.Lock()

    # -------------------------------------------------------------- life cycle

    @classmethod
    async def open(cls, url: str | None = None) -> Catalog:
        """Open the catalog at ``url`` (default :func:`freezeframe.paths.default_database_url`).

        Creates the directory of a SQLite file and migrates the schema to the newest revision.
        A missing SQLite file is created (atomically, see :func:`_create_catalog_file`); an
        existing one that is empty, not SQLite, or SQLite without the catalog's tables is
        refused, never re-initialised: that would forget every record and freeze intent.

        Raises:
            UsageError: (code ``bad-database-url``) ``url`` is not a database URL, or one of
                its parameters cannot be parsed. No message names the URL's password.
            DependencyError: the URL's database driver (a Python module) is not installed.
            CatalogError: the database cannot be opened or migrated, or an existing SQLite file
                is not a freezeframe catalog (the message names it, the hint says what to do).
        """
        return await asyncio.to_thread(cls._open_sync, url or paths.default_database_url())

    @classmethod
    def _open_sync(cls, url_text: str) -> Catalog:
        try:
            url = sa.make_url(url_text)
        except (ArgumentError, ValueError, TypeError):
            # Never from the error: its text may quote the URL, password and all.
            raise UsageError(
                f"not a database URL: {redact_url(url_text)!r}",
                hint="a SQLAlchemy URL such as postgresql+psycopg://user:password@host:5432/db",
                code="bad-database-url",
            ) from None
        display = redact_url(url.render_as_string(hide_password=True))
        try:
            return cls._open_url(url, display)
        except ValueError as exc:  # a query parameter the dialect or driver cannot parse
            raise UsageError(
                f"the database URL {display} has a bad parameter: {exc}",
                code="bad-database-url",
            ) from exc

    @classmethod
    def _open_url(cls, url: URL, display: str) -> Catalog:
        file = _sqlite_file(url)
        if file is not None:
            try:
                paths.ensure_dir(file.parent)
            except OSError as exc:
                raise CatalogError(f"cannot create the directory of {display}: {exc}") from exc
            if not os.path.lexists(file):  # only a missing catalog is created
                _create_catalog_file(url, file)
            _check_catalog_file(url, file)
        try:
            engine = _create_engine(url)
        except ImportError as exc:  # the URL's database driver (psycopg, pymysql, ...)
            module = (exc.name or "the database driver").split(".")[0]
            raise DependencyError(
                f"cannot open catalog {display}: Python module {module!r} is not installed",
                package=f"python3-{module}",
            ) from exc
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot open catalog {display}: {_describe(exc)}") from exc
        catalog = cls(engine, display)
        try:
            _migrate(catalog._write_engine)
        except CommandError as exc:
            engine.dispose()
            raise CatalogError(
                f"cannot migrate catalog {display}: {exc}",
                hint="the database may have been written by a newer freezeframe",
            ) from exc
        except (SQLAlchemyError, sqlite3.Error) as exc:
            engine.dispose()
            what = f"cannot open catalog {display}"
            raise filesystem_full_error(what, exc, file) or CatalogError(
                f"{what}: {_describe(exc)}"
            ) from exc
        log.debug("catalog %s open", display)
        return catalog

    async def close(self) -> None:
        """Release the database connections. Idempotent; later calls raise CatalogError."""
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._serial:
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.dispose()

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._display

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # Cancelling the caller cannot stop a thread: wait for the database work to end, so that
        # once CancelledError arrives the call has either taken effect or not, and a later
        # call (a compensating release, say) runs after it.
        return await shielded(asyncio.to_thread(self._guarded, fn, *args))

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        with self._serial:
            if self._engine is None:
                raise CatalogError(f"catalog {self._display} is closed")
            try:
                return fn(*args)
            except FreezeframeError:
                raise
            except (SQLAlchemyError, sqlite3.Error) as exc:
                what = f"catalog {self._display}"
                file = _sqlite_file(self._engine.url)
                raise filesystem_full_error(what, exc, file) or CatalogError(
                    f"{what}: {_describe(exc)}"
                ) from exc

    def _reader(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def _writer(self) -> Session:
        return _WriteSession(self._write_engine, expire_on_commit=False)

    # -------------------------------------------------------------- VMs

    async def add_vm(self, cfg: VmConfig, *, replace: bool = False) -> None:
        """Register ``cfg`` (or overwrite the VM of that name when ``replace``).

        Raises:
            UsageError: ``cfg`` is not valid (see :meth:`VmConfig.problems`).
            AlreadyExistsError: a VM of that name exists and ``replace`` is false.
        """
        problems = cfg.problems()
        if problems:
            raise UsageError("; ".join(problems))
        await self._run(self._add_vm, cfg, replace)

    def _add_vm(self, cfg: VmConfig, replace: bool) -> None:
        try:
            with self._writer() as s, s.begin():
                old = s.get(VmRow, cfg.name)
                if old is not None:
                    if not replace:
                        raise AlreadyExistsError(
                            f"VM {cfg.name!r} is already registered",
                            hint="replace it to overwrite the registration",
                            code="vm-exists",
                        )
                    s.delete(old)
                    s.flush()
                s.add(_vm_row(cfg))
        except IntegrityError as exc:
            # A concurrent add on a backend without write locks; any other constraint is ours.
            with self._reader() as s, s.begin():
                exists = s.get(VmRow, cfg.name) is not None
            if exists:
                raise AlreadyExistsError(
                    f"VM {cfg.name!r} is already registered", code="vm-exists"
                ) from exc
            raise CatalogError(
                f"catalog {self._display}: cannot store VM {cfg.name!r}: {_describe(exc)}"
            ) from exc

    async def get_vm(self, name: str) -> VmConfig:
        """The VM registered as ``name``.

        Raises:
            NotFoundError: no such VM.
        """
        return await self._run(self._get_vm, name)

    def _get_vm(self, name: str) -> VmConfig:
        with self._reader() as s, s.begin():
            row = s.get(VmRow, name)
            if row is None:
                raise NotFoundError(f"no VM named {name!r}", code="vm-not-found", remedy=_VM_REMEDY)
            return _vm(row)

    async def list_vms(self) -> list[VmConfig]:
        """All registered VMs, by name."""
        return await self._run(self._list_vms)

    def _list_vms(self) -> list[VmConfig]:
        with self._reader() as s, s.begin():
            return [_vm(r) for r in s.scalars(sa.select(VmRow).order_by(VmRow.name))]

    async def remove_vm(self, name: str) -> None:
        """Forget the VM ``name`` and its schedule (its snapshots stay in the catalog).

        Raises:
            NotFoundError: no such VM.
        """
        await self._run(self._remove_vm, name)

    def _remove_vm(self, name: str) -> None:
        with self._writer() as s, s.begin():
            result = s.execute(sa.delete(VmRow).where(VmRow.name == name))
            if _rowcount(result) == 0:
                raise NotFoundError(f"no VM named {name!r}", code="vm-not-found", remedy=_VM_REMEDY)
            s.execute(sa.delete(ScheduleRow).where(ScheduleRow.vm == name))  # its schedule too

    # -------------------------------------------------------------- snapshots

    async def begin_snapshot(self, rec: SnapshotRecord) -> None:
        """Write-ahead: record ``rec`` (status RUNNING) before anything touches the VM.

        Raises:
            CatalogError: ``rec.status`` is not RUNNING or a datetime is naive.
            AlreadyExistsError: a snapshot with that id exists.
        """
        await self._run(self._begin_snapshot, rec)

    def _begin_snapshot(self, rec: SnapshotRecord) -> None:
        if rec.status is not SnapshotStatus.RUNNING:
            raise CatalogError(
                f"begin_snapshot needs status {SnapshotStatus.RUNNING.value}, "
                f"got {rec.status.value} for {rec.id}"
            )
        row = _snapshot_row(rec)
        try:
            with self._writer() as s, s.begin():
                if s.get(SnapshotRow, rec.id) is not None:
                    raise AlreadyExistsError(f"snapshot {rec.id} already exists")
                s.add(row)
        except IntegrityError as exc:
            # A concurrent begin on a backend whose writers are not serialized; any other
            # constraint (a NOT NULL, say) is a CatalogError naming it, not "already exists".
            with self._reader() as s, s.begin():
                exists = s.get(SnapshotRow, rec.id) is not None
            if exists:
                raise AlreadyExistsError(f"snapshot {rec.id} already exists") from exc
            raise CatalogError(
                f"catalog {self._display}: cannot store snapshot {rec.id}: {_describe(exc)}"
            ) from exc

    async def finish_snapshot(self, rec: SnapshotRecord) -> None:
        """Replace the stored record ``rec.id`` with ``rec``, entirely.

        Disks, filesystems, timeline, evidence and also the verification become those of
        ``rec`` (a verification stored earlier is dropped if ``rec.verification`` is None).

        Raises:
            NotFoundError: :meth:`begin_snapshot` was never called for ``rec.id``.
            CatalogError: a datetime is naive.
        """
        await self._run(self._finish_snapshot, rec)

    def _finish_snapshot(self, rec: SnapshotRecord) -> None:
        new = _snapshot_row(rec)
        with self._writer() as s, s.begin():
            old = s.scalars(
                sa.select(SnapshotRow).where(SnapshotRow.id == rec.id).options(*_LOAD_SNAPSHOT)
            ).one_or_none()
            if old is None:
                raise NotFoundError(
                    f"no snapshot {rec.id} to finish",
                    code="snapshot-not-found",
                    remedy=_SNAPSHOT_REMEDY,
                )
            s.delete(old)
            s.flush()
            s.add(new)
            if rec.status is SnapshotStatus.DONE:
                s.flush()
                _images.link_images(s, rec, new.disks)

    async def append_timeline(self, snapshot_id: str, events: Sequence[TimelineEvent]) -> None:
        """Add ``events`` to the end of the stored timeline of ``snapshot_id`` (exact id), in
        one transaction and without rewriting the record: a note from another process (recover,
        a follow-up) never replaces a record its owner wrote meanwhile.

        Raises:
            NotFoundError: no such snapshot.
            CatalogError: a datetime is naive.
        """
        await self._run(self._append_timeline, snapshot_id, tuple(events))

    def _append_timeline(self, snapshot_id: str, events: tuple[TimelineEvent, ...]) -> None:
        with self._writer() as s, s.begin():
            if s.get(SnapshotRow, snapshot_id) is None:
                raise NotFoundError(
                    f"no snapshot {snapshot_id}", code="snapshot-not-found", remedy=_SNAPSHOT_REMEDY
                )
            last = s.scalar(
                sa.select(sa.func.max(TimelineEventRow.ordinal)).where(
                    TimelineEventRow.snapshot_id == snapshot_id
                )
            )
            start = -1 if last is None else int(last)
            for i, e in enumerate(events, start + 1):
                row = _timeline_row(i, e)
                row.snapshot_id = snapshot_id
                s.add(row)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        """The snapshot ``snapshot_id``, or the only one whose id starts with it.

        A prefix must have at least :data:`MIN_PREFIX` (4) characters.

        Raises:
            NotFoundError: no snapshot matches.
            UsageError: the prefix matches several snapshots (they are named).
        """
        return await self._run(self._get_snapshot, snapshot_id)

    def _get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        with self._reader() as s, s.begin():
            return _snapshot(self._resolve(s, snapshot_id, prefix=True))

    def _resolve(self, s: Session, snapshot_id: str, *, prefix: bool) -> SnapshotRow:
        query = sa.select(SnapshotRow).options(*_LOAD_SNAPSHOT)
        row = s.scalars(query.where(SnapshotRow.id == snapshot_id)).one_or_none()
        if row is not None:
            return row
        if not prefix or len(snapshot_id) < MIN_PREFIX:
            hint = f"give the full id or at least {MIN_PREFIX} characters" if prefix else None
            raise NotFoundError(
                f"no snapshot {snapshot_id!r}",
                hint=hint,
                code="snapshot-not-found",
                remedy=_SNAPSHOT_REMEDY,
            )
        # substr, not LIKE: case-sensitive everywhere and no wildcard escaping.
        ids = list(
            s.scalars(
                sa.select(SnapshotRow.id)
                .where(sa.func.substr(SnapshotRow.id, 1, len(snapshot_id)) == snapshot_id)
                .order_by(SnapshotRow.id)
                .limit(11)
            )
        )
        if not ids:
            raise NotFoundError(
                f"no snapshot id starts with {snapshot_id!r}",
                code="snapshot-not-found",
                remedy=_SNAPSHOT_REMEDY,
            )
        if len(ids) > 1:
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            raise UsageError(
                f"snapshot id prefix {snapshot_id!r} is ambiguous: {shown}",
                hint="give more characters of the id",
                code="ambiguous-id",
            )
        return s.scalars(query.where(SnapshotRow.id == ids[0])).one()

    async def list_snapshots(
        self, vm: str | None = None, *, status: SnapshotStatus | None = None
    ) -> list[SnapshotRecord]:
        """All snapshots (of ``vm`` if given; with ``status`` only those), oldest first."""
        return await self._run(self._list_snapshots, vm, status)

    def _list_snapshots(
        self, vm: str | None, status: SnapshotStatus | None = None
    ) -> list[SnapshotRecord]:
        return self._list_snapshots_page(vm, None, None, False, status)

    async def list_snapshots_page(
        self,
        vm: str | None = None,
        *,
        limit: int | None = None,
        after: tuple[datetime, str] | None = None,
        newest_first: bool = False,
        status: SnapshotStatus | None = None,
    ) -> list[SnapshotRecord]:
        """At most ``limit`` snapshots (of ``vm`` if given; with ``status`` only those) ordered
        by ``(created_at, id)`` (descending with ``newest_first``), starting after the record
        keyed ``after`` (keyset paging: a page stays correct while records are added)."""
        return await self._run(self._list_snapshots_page, vm, limit, after, newest_first, status)

    def _list_snapshots_page(
        self,
        vm: str | None,
        limit: int | None,
        after: tuple[datetime, str] | None,
        newest_first: bool,
        status: SnapshotStatus | None = None,
    ) -> list[SnapshotRecord]:
        query = _filtered(sa.select(SnapshotRow).options(*_LOAD_SNAPSHOT), vm, status)
        query = _keyset(query, after, newest_first)
        if limit is not None:
            query = query.limit(limit)
        with self._reader() as s, s.begin():
            return [_snapshot(r) for r in s.scalars(query)]

    async def list_snapshot_summaries(
        self,
        vm: str | None = None,
        *,
        limit: int | None = None,
        after: tuple[datetime, str] | None = None,
        newest_first: bool = False,
        status: SnapshotStatus | None = None,
    ) -> list[SnapshotSummary]:
        """What a list shows of the snapshots :meth:`list_snapshots_page` would return (same
        filters, order and keyset paging): one query of the record's columns, the
        verification's verdict and counts computed by the database, no child rows loaded."""
        return await self._run(
            self._list_snapshot_summaries, vm, limit, after, newest_first, status
        )

    def _list_snapshot_summaries(
        self,
        vm: str | None,
        limit: int | None,
        after: tuple[datetime, str] | None,
        newest_first: bool,
        status: SnapshotStatus | None,
    ) -> list[SnapshotSummary]:
        # First the page's ids (the keyset on the snapshots table alone: an index scan, or a
        # sort of two columns), then the counts and flags for those rows only.
        keys = sa.select(SnapshotRow.id)
        keys = _filtered(keys, vm, status)
        keys = _keyset(keys, after, newest_first)
        if limit is not None:
            keys = keys.limit(limit)
        page = keys.subquery("page")
        query = _keyset(
            sa.select(*_SUMMARY_COLUMNS)
            .join(page, page.c.id == SnapshotRow.id)
            .outerjoin(VerificationRow, VerificationRow.snapshot_id == SnapshotRow.id),
            None,
            newest_first,
        )
        with self._reader() as s, s.begin():
            return [_summary(r) for r in s.execute(query)]

    async def latest_snapshot(self, vm: str) -> SnapshotRecord | None:
        """The newest snapshot of ``vm`` with status DONE, or None."""
        return await self._run(self._latest_snapshot, vm)

    def _latest_snapshot(self, vm: str) -> SnapshotRecord | None:
        query = (
            sa.select(SnapshotRow)
            .options(*_LOAD_SNAPSHOT)
            .where(SnapshotRow.vm == vm, SnapshotRow.status == SnapshotStatus.DONE.value)
            .order_by(SnapshotRow.created_at.desc(), SnapshotRow.id.desc())
            .limit(1)
        )
        with self._reader() as s, s.begin():
            row = s.scalars(query).one_or_none()
            return None if row is None else _snapshot(row)

    async def set_verification(self, snapshot_id: str, v: Verification) -> None:
        """Store ``v`` as the verification of ``snapshot_id`` (exact id), replacing any earlier.

        Raises:
            NotFoundError: no such snapshot.
            CatalogError: ``v.checked_at`` is naive.
        """
        await self._run(self._set_verification, snapshot_id, v)

    def _set_verification(self, snapshot_id: str, v: Verification) -> None:
        new = _verification_row(snapshot_id, v)
        with self._writer() as s, s.begin():
            row = self._resolve(s, snapshot_id, prefix=False)
            if row.verification is not None:
                s.delete(row.verification)
                s.flush()
            row.verification = new

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete the record ``snapshot_id`` (exact id) and everything under it.

        Only the record: image files are the storage layer's business.

        Raises:
            NotFoundError: no such snapshot.
        """
        await self._run(self._delete_snapshot, snapshot_id)

    def _delete_snapshot(self, snapshot_id: str) -> None:
        with self._writer() as s, s.begin():
            row = self._resolve(s, snapshot_id, prefix=False)
            _images.forget_rows(s, row.vm, snapshot_id=row.id)
            s.delete(row)

    # -------------------------------------------------------------- freeze intents

    async def open_intent(
        self, vm: str, snapshot_id: str, agent_address: str, owner: str
    ) -> FreezeIntent:
        """Write-ahead: a freeze of ``vm`` may be in effect from now on. Committed on return.
        ``agent_address`` is the driver's address of the agent (FreezeIntent.agent_address)."""
        return await self._run(self._open_intent, vm, snapshot_id, agent_address, owner)

    def _open_intent(
        self, vm: str, snapshot_id: str, agent_address: str, owner: str
    ) -> FreezeIntent:
        row = FreezeIntentRow(
            vm=vm,
            snapshot_id=snapshot_id,
            qga_path=agent_address,
            opened_at=_now(),
            owner=owner,
            closed_at=None,
            closed_by="",
        )
        with self._writer() as s, s.begin():
            s.add(row)
            s.flush()
            return _intent(row)

    async def close_intent(self, intent_id: int, closed_by: str) -> None:
        """Mark intent ``intent_id`` closed (a thaw was confirmed) by ``closed_by``.

        Closing an already closed intent keeps the first closer and is not an error.

        Raises:
            NotFoundError: no such intent.
        """
        await self._run(self._close_intent, intent_id, closed_by)

    def _close_intent(self, intent_id: int, closed_by: str) -> None:
        with self._writer() as s, s.begin():
            row = s.get(FreezeIntentRow, intent_id)
            if row is None:
                raise NotFoundError(f"no freeze intent {intent_id}")
            if row.closed_at is not None:
                log.debug("freeze intent %d already closed by %s", intent_id, row.closed_by)
                return
            row.closed_at = _now()
            row.closed_by = closed_by

    async def open_intents(self, vm: str | None = None) -> list[FreezeIntent]:
        """Intents not closed yet (of ``vm`` if given), oldest first."""
        return await self._run(self._open_intents, vm)

    def _open_intents(self, vm: str | None) -> list[FreezeIntent]:
        query = sa.select(FreezeIntentRow).where(FreezeIntentRow.closed_at.is_(None))
        if vm is not None:
            query = query.where(FreezeIntentRow.vm == vm)
        with self._reader() as s, s.begin():
            return [_intent(r) for r in s.scalars(query.order_by(FreezeIntentRow.id))]

    # -------------------------------------------------------------- VM locks

    async def acquire_vm_lock(self, vm: str, owner: str, *, purpose: str = "snapshot") -> None:
        """Take the lock of ``vm`` for ``owner`` (see :func:`make_owner`). Not re-entrant.

        A lock held by a process of this host that is gone is taken over (logged).

        Raises:
            BusyError: the lock is held by a live (or unjudgeable) owner; the message names it.
        """
        await self._run(self._acquire_vm_lock, vm, owner, purpose)

    def _acquire_vm_lock(self, vm: str, owner: str, purpose: str) -> None:
        for _ in range(_LOCK_STEAL_ATTEMPTS):
            try:
                with self._writer() as s, s.begin():
                    s.add(VmLockRow(vm=vm, owner=owner, acquired_at=_now(), purpose=purpose))
                return
            except IntegrityError:
                pass
            with self._reader() as s, s.begin():
                holder = s.get(VmLockRow, vm)
                if holder is None:
                    continue  # released in between: try again
                held_by, since = holder.owner, holder.acquired_at
                held_for = holder.purpose or "snapshot"
            if not holder_is_dead(held_by, since):
                raise BusyError(
                    f"{_LOCK_WORDS.get(held_for, held_for)} of VM {vm} in progress by "
                    f"{held_by} since {since.isoformat(timespec='seconds')}",
                    hint="wait for it to finish; a lock of a dead process on this host "
                    "is taken over automatically",
                    holder_purpose=held_for,
                )
            with self._writer() as s, s.begin():
                # Conditional on the old owner: of several racing stealers only one deletes.
                gone = s.execute(
                    sa.delete(VmLockRow).where(VmLockRow.vm == vm, VmLockRow.owner == held_by)
                )
                if _rowcount(gone) != 1:
                    continue
                s.add(VmLockRow(vm=vm, owner=owner, acquired_at=_now(), purpose=purpose))
            log.warning("took over the lock of VM %s from dead process %s", vm, held_by)
            return
        raise BusyError(f"the lock of VM {vm} keeps changing hands; try again")

    async def release_vm_lock(self, vm: str, owner: str) -> None:
        """Release the lock of ``vm`` if ``owner`` holds it; otherwise log a warning only."""
        await self._run(self._release_vm_lock, vm, owner)

    def _release_vm_lock(self, vm: str, owner: str) -> None:
        with self._writer() as s, s.begin():
            gone = s.execute(
                sa.delete(VmLockRow).where(VmLockRow.vm == vm, VmLockRow.owner == owner)
            )
            if _rowcount(gone) == 1:
                return
            holder = s.get(VmLockRow, vm)
        if holder is None:
            log.warning("lock of VM %s was not held (release by %s)", vm, owner)
        else:
            log.warning("lock of VM %s is held by %s, not %s: left alone", vm, holder.owner, owner)

    async def vm_lock_holder(self, vm: str) -> tuple[str, datetime] | None:
        """Who holds the lock of ``vm`` and since when (aware UTC); None when it is free.
        Read-only: a lock of a dead process is reported as it is (see ``holder_is_dead``).
        Raises CatalogError."""
        return await self._run(self._vm_lock_holder, vm)

    def _vm_lock_holder(self, vm: str) -> tuple[str, datetime] | None:
        with self._reader() as s, s.begin():
            holder = s.get(VmLockRow, vm)
            return None if holder is None else (holder.owner, holder.acquired_at)

    # -------------------------------------------------------------- schedules (rev. 0008)

    async def set_schedule(self, rec: ScheduleRecord) -> ScheduleRecord:
        """Create or replace the schedule of ``rec.vm`` (its last run is kept); returns it as
        stored. Raises NotFoundError (``vm-not-found``), CatalogError."""
        return await self._run(self._write, _schedules.set_schedule, rec)

    async def get_schedule(self, vm: str) -> ScheduleRecord:
        """The schedule of ``vm``. Raises NotFoundError (``schedule-not-found``), CatalogError."""
        return await self._run(self._read, _schedules.get_schedule, vm)

    async def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule, by VM name. Raises CatalogError."""
        return await self._run(self._read, _schedules.list_schedules)

    async def remove_schedule(self, vm: str) -> None:
        """Forget the schedule of ``vm``. Raises NotFoundError (``schedule-not-found``),
        CatalogError."""
        await self._run(self._write, _schedules.remove_schedule, vm)

    async def claim_schedule_run(
        self, vm: str, seen: datetime | None, now: datetime, owner: str
    ) -> ScheduleRecord | None:
        """Claim the due run of ``vm``'s schedule (compare-and-set of ``last_run_at`` from
        ``seen`` to ``now``, one transaction): the claimed schedule, or None when another
        process claimed it first. See :mod:`freezeframe.catalog._schedules`. Raises
        CatalogError (naive times too)."""
        _aware(now, "now")
        if seen is not None:
            _aware(seen, "seen")
        return await self._run(self._write, _schedules.claim_run, vm, seen, now, owner)

    async def record_schedule_run(
        self,
        vm: str,
        owner: str,
        claimed_at: datetime,
        *,
        snapshot_id: str | None,
        outcome: str,
        error: str | None = None,
        prune: str | None = None,
    ) -> bool:
        """How the run claimed by ``owner`` at ``claimed_at`` ended; False when that claim is
        no longer the schedule's latest (nothing written). Raises CatalogError."""
        return await self._run(
            lambda: self._write(
                _schedules.record_run,
                vm,
                owner,
                claimed_at,
                snapshot_id=snapshot_id,
                outcome=outcome,
                error=error,
                prune=prune,
            )
        )

    # -------------------------------------------------------------- chain model (rev. 0009)

    async def chain_images(self, vm: str, device: str | None = None) -> list[ChainImage]:
        """The image rows of ``vm``'s chains (of disk ``device`` if given), oldest first: see
        :mod:`freezeframe.catalog._images`. Raises CatalogError."""
        return await self._run(self._read, _images.chain_images, vm, device)

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        with self._reader() as s, s.begin():
            return fn(s, *args)

    def _write(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        with self._writer() as s, s.begin():
            return fn(s, *args, **kw)

    @asynccontextmanager
    async def hold_snapshot(self, snapshot_id: str, purpose: str) -> AsyncIterator[None]:
        """Hold snapshot ``snapshot_id`` (exact id) while reading it (``verify``, ``export``):
        a delete refuses it meanwhile (``snapshot-in-use``); several readers may hold it.

        Raises NotFoundError (``snapshot-not-found``), BusyError (``snapshot-being-deleted``),
        CatalogError."""
        hold = await self._run(self._write, _images.take_hold, snapshot_id, purpose, make_owner())
        try:
            yield
        finally:
            await self._run(self._write, _images.release_hold, hold)

    async def begin_delete(self, snapshot_id: str) -> SnapshotRecord:
        """Write-ahead of a delete: mark ``snapshot_id`` (exact id) ``deleting`` and return it.
        A record already ``deleting`` (an interrupted delete) is returned as it is.

        Raises NotFoundError, UsageError (``snapshot-running``), BusyError
        (``snapshot-in-use``: a verify or export holds it), CatalogError."""
        return await self._run(self._begin_delete, snapshot_id)

    def _begin_delete(self, snapshot_id: str) -> SnapshotRecord:
        with self._writer() as s, s.begin():
            row = self._resolve(s, snapshot_id, prefix=False)
            _images.begin_delete(s, row)
            s.flush()
            return _snapshot(row)

    async def finish_delete(self, snapshot_id: str) -> None:
        """Remove the record of a deleted snapshot (exact id): see
        :func:`freezeframe.catalog._images.finish_delete`. Raises NotFoundError, CatalogError."""
        await self._run(self._finish_delete, snapshot_id)

    def _finish_delete(self, snapshot_id: str) -> None:
        with self._writer() as s, s.begin():
            _images.finish_delete(s, self._resolve(s, snapshot_id, prefix=False))

    async def forget_images(self, vm: str, inside: str) -> int:
        """Forget the image rows of ``vm`` whose files are under directory ``inside`` (a lab
        VM's directory, purged). Returns how many went. Raises CatalogError."""
        return await self._run(
            lambda: self._write(_images.forget_rows, vm, inside=inside.rstrip("/") + "/")
        )

    async def drop_image(self, image_id: int) -> None:
        """Forget image row ``image_id`` (its file is gone). Raises CatalogError."""
        await self._run(self._write, _images.drop_image, image_id)

    async def open_merge(
        self, *, vm: str, snapshot_id: str, device: str, top: str, base: str, live: bool
    ) -> MergeIntent:
        """Write-ahead: ``top`` of disk ``device`` is about to be merged into ``base``.
        Raises CatalogError."""
        return await self._run(
            lambda: self._write(
                _images.open_merge,
                vm=vm,
                snapshot_id=snapshot_id,
                device=device,
                top=top,
                base=base,
                live=live,
                owner=make_owner(),
            )
        )

    async def open_merges(self, vm: str | None = None) -> list[MergeIntent]:
        """Merges not done yet (of ``vm`` if given), oldest first. Raises CatalogError."""
        return await self._run(self._read, _images.open_merges, vm)

    async def merge_done(
        self, merge_id: int, *, fingerprint: ImageFingerprint | None, mode: int | None
    ) -> None:
        """Record that merge ``merge_id`` moved ``top``'s data into ``base`` (one transaction:
        see :func:`freezeframe.catalog._images.merge_done`). Raises NotFoundError,
        CatalogError."""
        await self._run(
            lambda: self._write(_images.merge_done, merge_id, fingerprint=fingerprint, mode=mode)
        )

    async def refingerprint(
        self, vm: str, location: str, fingerprint: ImageFingerprint | None, mode: int | None
    ) -> None:
        """Image ``location`` of ``vm`` was rewritten in place by a merge below it: the disks
        of the snapshot it holds get ``fingerprint`` and ``mode``. Raises CatalogError."""
        await self._run(lambda: self._write(_images.refingerprint, vm, location, fingerprint, mode))

    async def close_merge(self, merge_id: int) -> None:
        """Merge ``merge_id`` is over. Raises CatalogError."""
        await self._run(self._write, _images.close_merge, merge_id)

    async def set_active_image(
        self, vm: str, device: str, location: str, *, backing_id: int | None, fmt: str = "qcow2"
    ) -> None:
        """Disk ``device`` of ``vm`` writes to ``location`` now, backed by image row
        ``backing_id``: the row is created or updated, every other row of that disk stops
        being active. Raises CatalogError."""
        await self._run(
            lambda: self._write(
                _images.set_active_image, vm, device, location, backing_id=backing_id, fmt=fmt
            )
        )
