"""The catalog's tables as typed SQLAlchemy 2 ORM classes (private to :mod:`freezeframe.catalog`).

Rows never leave the package: :mod:`freezeframe.catalog._catalog` converts them to and from the
frozen dataclasses of :mod:`freezeframe.models`. The schema is portable (no SQLite-only
types): enums are stored as their string values, sequences that are only ever read whole
(``exclude_mounts``, ``evidence``) as JSON, everything else in normalized child tables keyed by
``(parent id, ordinal)``. Every change here needs a migration in ``migrations/versions``; a unit
test checks that the migrated schema equals this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "FreezeIntentRow",
    "FsCheckRow",
    "ImageRow",
    "MergeRow",
    "ScheduleRow",
    "SnapshotDiskRow",
    "SnapshotFilesystemRow",
    "SnapshotHoldRow",
    "SnapshotRow",
    "TimelineEventRow",
    "UtcDateTime",
    "VerificationRow",
    "VmLockRow",
    "VmRow",
]

#: Constraint names are fixed so that migrations on every backend agree with the models.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    Binds an aware ``datetime`` converted to UTC (SQLite stores it without an offset; backends
    with ``TIMESTAMP WITH TIME ZONE`` keep it aware) and always returns an aware UTC value.
    Naive values are refused by the catalog before they get here.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


_NAME = sa.String(255)
_ENUM = sa.String(32)


class VmRow(Base):
    __tablename__ = "vms"

    name: Mapped[str] = mapped_column(_NAME, primary_key=True)
    driver: Mapped[str] = mapped_column(sa.String(64))
    qmp_path: Mapped[str | None] = mapped_column(sa.Text)
    qga_path: Mapped[str | None] = mapped_column(sa.Text)
    connect_uri: Mapped[str | None] = mapped_column(sa.Text)  # libvirt (revision 0002)
    domain: Mapped[str | None] = mapped_column(sa.Text)  # libvirt domain UUID (revision 0002)
    agent: Mapped[bool] = mapped_column(sa.Boolean)
    quiesce: Mapped[str] = mapped_column(_ENUM)
    freeze_timeout: Mapped[float] = mapped_column(sa.Double)
    agent_log_path: Mapped[str | None] = mapped_column(sa.Text)
    exclude_mounts: Mapped[list[str]] = mapped_column(sa.JSON)
    lab: Mapped[bool] = mapped_column(sa.Boolean)
    overlay_dir: Mapped[str | None] = mapped_column(sa.Text)  # revision 0004
    ceph_conf: Mapped[str | None] = mapped_column(sa.Text)  # revision 0006
    ceph_id: Mapped[str | None] = mapped_column(sa.Text)  # revision 0006
    ceph_keyring: Mapped[str | None] = mapped_column(sa.Text)  # revision 0006


class SnapshotRow(Base):
    __tablename__ = "snapshots"
    # Keyset pages of a list, all snapshots or one VM's, in (created_at, id) order (rev. 0007).
    __table_args__ = (
        sa.Index("ix_snapshots_created_at_id", "created_at", "id"),
        sa.Index("ix_snapshots_vm_created_at", "vm", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(_NAME, primary_key=True)
    vm: Mapped[str] = mapped_column(_NAME)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(_ENUM)
    policy: Mapped[str] = mapped_column(_ENUM)
    level: Mapped[str] = mapped_column(_ENUM)
    level_reason: Mapped[str] = mapped_column(sa.Text)
    error: Mapped[str] = mapped_column(sa.Text)
    parent_id: Mapped[str | None] = mapped_column(_NAME)
    freeze_window_ms: Mapped[float | None] = mapped_column(sa.Double)
    evidence: Mapped[list[str]] = mapped_column(sa.JSON)

    disks: Mapped[list[SnapshotDiskRow]] = relationship(
        order_by="SnapshotDiskRow.ordinal", cascade="all, delete-orphan", passive_deletes=True
    )
    filesystems: Mapped[list[SnapshotFilesystemRow]] = relationship(
        order_by="SnapshotFilesystemRow.ordinal", cascade="all, delete-orphan", passive_deletes=True
    )
    timeline: Mapped[list[TimelineEventRow]] = relationship(
        order_by="TimelineEventRow.ordinal", cascade="all, delete-orphan", passive_deletes=True
    )
    verification: Mapped[VerificationRow | None] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )


def _snapshot_fk() -> sa.ForeignKey:
    return sa.ForeignKey("snapshots.id", ondelete="CASCADE")


class SnapshotDiskRow(Base):
    __tablename__ = "snapshot_disks"

    snapshot_id: Mapped[str] = mapped_column(_NAME, _snapshot_fk(), primary_key=True)
    ordinal: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    device: Mapped[str] = mapped_column(_NAME)
    node: Mapped[str] = mapped_column(_NAME)
    image: Mapped[str] = mapped_column(sa.Text)
    format: Mapped[str] = mapped_column(sa.String(64))
    overlay: Mapped[str | None] = mapped_column(sa.Text)
    backend: Mapped[str] = mapped_column(sa.String(64))
    virtual_size: Mapped[int] = mapped_column(sa.BigInteger)
    # revision 0005: the image at the cut as it was right after the cut (size, mtime, inode),
    # its mode before freezeframe took its write bits away, a per-disk quiesce note (code)
    fp_size: Mapped[int | None] = mapped_column(sa.BigInteger)
    fp_mtime_ns: Mapped[int | None] = mapped_column(sa.BigInteger)
    fp_inode: Mapped[int | None] = mapped_column(sa.BigInteger)
    image_mode: Mapped[int | None] = mapped_column(sa.Integer)
    quiesce_note: Mapped[str | None] = mapped_column(sa.String(64))
    # revision 0009: the image row holding this disk's data at the cut; the record's image is
    # that row's location (a merge moves the data and updates the row, not the record)
    image_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL")
    )
    image_row: Mapped[ImageRow | None] = relationship(lazy="joined")


class SnapshotFilesystemRow(Base):
    __tablename__ = "snapshot_filesystems"

    snapshot_id: Mapped[str] = mapped_column(_NAME, _snapshot_fk(), primary_key=True)
    ordinal: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    mountpoint: Mapped[str] = mapped_column(sa.Text)
    fstype: Mapped[str] = mapped_column(sa.String(64))
    device: Mapped[str | None] = mapped_column(_NAME)
    frozen: Mapped[bool] = mapped_column(sa.Boolean)
    reason: Mapped[str] = mapped_column(sa.Text)


class TimelineEventRow(Base):
    __tablename__ = "timeline_events"

    snapshot_id: Mapped[str] = mapped_column(_NAME, _snapshot_fk(), primary_key=True)
    ordinal: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(_NAME)
    t: Mapped[datetime] = mapped_column(UtcDateTime)
    mono_ns: Mapped[int] = mapped_column(sa.BigInteger)
    detail: Mapped[str] = mapped_column(sa.Text)


class VerificationRow(Base):
    __tablename__ = "verifications"

    snapshot_id: Mapped[str] = mapped_column(_NAME, _snapshot_fk(), primary_key=True)
    verdict: Mapped[str] = mapped_column(_ENUM)
    checked_at: Mapped[datetime] = mapped_column(UtcDateTime)
    bytes_read: Mapped[int] = mapped_column(sa.BigInteger)
    duration_ms: Mapped[float] = mapped_column(sa.Double)

    checks: Mapped[list[FsCheckRow]] = relationship(
        order_by="FsCheckRow.ordinal", cascade="all, delete-orphan", passive_deletes=True
    )


class FsCheckRow(Base):
    __tablename__ = "fs_checks"

    snapshot_id: Mapped[str] = mapped_column(
        _NAME,
        sa.ForeignKey("verifications.snapshot_id", ondelete="CASCADE"),
        primary_key=True,
    )
    ordinal: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    device: Mapped[str] = mapped_column(_NAME)
    fstype: Mapped[str] = mapped_column(sa.String(64))
    verdict: Mapped[str] = mapped_column(_ENUM)
    detail: Mapped[str] = mapped_column(sa.Text)
    log_replayed: Mapped[bool] = mapped_column(sa.Boolean)
    partition: Mapped[str | None] = mapped_column(_NAME)


class FreezeIntentRow(Base):
    __tablename__ = "freeze_intents"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(_NAME, index=True)
    snapshot_id: Mapped[str] = mapped_column(_NAME)
    #: FreezeIntent.agent_address (the column keeps its first name: a socket path then).
    qga_path: Mapped[str] = mapped_column(sa.Text)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime)
    owner: Mapped[str] = mapped_column(_NAME)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    closed_by: Mapped[str] = mapped_column(sa.String(64))


class VmLockRow(Base):
    __tablename__ = "vm_locks"

    # The primary key is the lock: a second INSERT for the same VM fails on every backend.
    vm: Mapped[str] = mapped_column(_NAME, primary_key=True)
    owner: Mapped[str] = mapped_column(_NAME)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)
    #: What the lock is held for (revision 0003); None: a snapshot (older freezeframe).
    purpose: Mapped[str | None] = mapped_column(sa.String(32))


class ScheduleRow(Base):
    """A VM's snapshot schedule (revision 0008): one per VM. ``last_run_at`` is the claim of
    a run: a process runs a due slot only if it moved ``last_run_at`` from the value it read
    (compare-and-set in one writing transaction), so two servers never run the same slot."""

    __tablename__ = "schedules"

    vm: Mapped[str] = mapped_column(_NAME, primary_key=True)
    every_s: Mapped[int] = mapped_column(sa.Integer)
    keep_last: Mapped[int | None] = mapped_column(sa.Integer)
    keep_hourly: Mapped[int | None] = mapped_column(sa.Integer)
    keep_daily: Mapped[int | None] = mapped_column(sa.Integer)
    keep_weekly: Mapped[int | None] = mapped_column(sa.Integer)
    keep_monthly: Mapped[int | None] = mapped_column(sa.Integer)
    keep_yearly: Mapped[int | None] = mapped_column(sa.Integer)
    quiesce: Mapped[str | None] = mapped_column(_ENUM)
    enabled: Mapped[bool] = mapped_column(sa.Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    run_owner: Mapped[str | None] = mapped_column(_NAME)
    last_snapshot: Mapped[str | None] = mapped_column(_NAME)
    last_outcome: Mapped[str | None] = mapped_column(sa.String(64))
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_prune: Mapped[str | None] = mapped_column(sa.Text)
    last_finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ImageRow(Base):
    """One image of a VM disk's chain (revision 0009): a file layer or an RBD snapshot.

    ``snapshot_id``: the snapshot whose cut this image holds (None: no snapshot's, e.g. the
    layer a disk writes to). ``active``: the disk writes to it (as freezeframe last made it).
    ``backing_id``: the image below it in the chain, when freezeframe knows it (None: the
    bottom of what freezeframe manages). ``mode``: the file's mode before freezeframe took its
    write bits away (given back to a merge)."""

    __tablename__ = "images"
    __table_args__ = (
        sa.UniqueConstraint("vm", "location", name="uq_images_vm_location"),
        sa.Index("ix_images_vm_device", "vm", "device"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(_NAME)
    device: Mapped[str] = mapped_column(_NAME)
    location: Mapped[str] = mapped_column(sa.String(1024))
    kind: Mapped[str] = mapped_column(sa.String(32))
    format: Mapped[str] = mapped_column(sa.String(64))
    backing_id: Mapped[int | None] = mapped_column(
        sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL")
    )
    snapshot_id: Mapped[str | None] = mapped_column(_NAME)
    active: Mapped[bool] = mapped_column(sa.Boolean)
    mode: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SnapshotHoldRow(Base):
    """A snapshot being read (verify, export) by ``owner`` (revision 0009): a delete refuses it."""

    __tablename__ = "snapshot_holds"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    snapshot_id: Mapped[str] = mapped_column(_NAME, _snapshot_fk(), index=True)
    purpose: Mapped[str] = mapped_column(sa.String(32))
    owner: Mapped[str] = mapped_column(_NAME)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)


class MergeRow(Base):
    """Write-ahead record of one layer merge of a snapshot delete (revision 0009): ``top``'s
    data goes into ``base`` (its backing file), then ``top`` is removed. ``state``: ``open``
    (maybe under way: recover finishes it), ``merged`` (the data is in ``base`` and the
    catalog says so; ``top``'s file may still exist), ``done``."""

    __tablename__ = "merges"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(_NAME, index=True)
    snapshot_id: Mapped[str] = mapped_column(_NAME)
    device: Mapped[str] = mapped_column(_NAME)
    top: Mapped[str] = mapped_column(sa.String(1024))
    base: Mapped[str] = mapped_column(sa.String(1024))
    live: Mapped[bool] = mapped_column(sa.Boolean)
    state: Mapped[str] = mapped_column(sa.String(16))
    owner: Mapped[str] = mapped_column(_NAME)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
