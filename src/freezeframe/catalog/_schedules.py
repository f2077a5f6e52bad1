"""Snapshot schedules inside the catalog (private): the ``schedules`` table (revision 0008).

Owns the row <-> :class:`~freezeframe.models.ScheduleRecord` mapping and the claim of a run.
Every function takes an open SQLAlchemy session inside its caller's transaction
(:class:`~freezeframe.catalog.Catalog` runs them in its worker thread); nothing commits by
itself.

Claiming a run: a server that finds a schedule due (its ``last_run_at`` as it read it, plus
the interval, is past) moves ``last_run_at`` to now with ``UPDATE ... WHERE last_run_at =
<what it read>`` in a writing transaction (writers queue: SQLite ``BEGIN IMMEDIATE``,
PostgreSQL's advisory lock). Of several servers on one catalog exactly one sees a row
updated and runs the slot; the others read the new ``last_run_at`` and wait for the next.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from freezeframe.catalog._schema import ScheduleRow, VmRow
from freezeframe.errors import Action, CatalogError, NotFoundError, Remedy
from freezeframe.models import QuiescePolicy, ScheduleRecord

__all__ = [
    "claim_run",
    "get_schedule",
    "list_schedules",
    "record_run",
    "remove_schedule",
    "set_schedule",
]

_KEEPS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: ScheduleRow) -> ScheduleRecord:
    try:
        quiesce = None if row.quiesce is None else QuiescePolicy(row.quiesce)
    except ValueError as exc:
        raise CatalogError(f"the catalog holds an unknown quiesce policy {row.quiesce!r}") from exc
    return ScheduleRecord(
        vm=row.vm,
        every_s=row.every_s,
        **{k: getattr(row, k) for k in _KEEPS},
        quiesce=quiesce,
        enabled=row.enabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_run_at=row.last_run_at,
        run_owner=row.run_owner,
        last_snapshot=row.last_snapshot,
        last_outcome=row.last_outcome,
        last_error=row.last_error,
        last_prune=row.last_prune,
        last_finished_at=row.last_finished_at,
    )


def _not_found(vm: str) -> NotFoundError:
    return NotFoundError(
        f"VM {vm!r} has no schedule",
        hint="set one with `schedule set VM --every INTERVAL`",
        code="schedule-not-found",
        remedy=Remedy(Action.LIST_VMS),
    )


def set_schedule(s: Session, rec: ScheduleRecord) -> ScheduleRecord:
    """Create or replace the schedule of ``rec.vm`` (interval, rules, quiesce, enabled); the
    last run's fields of an existing schedule are kept, so replacing a schedule does not make
    it due at once. Raises NotFoundError (``vm-not-found``)."""
    if s.get(VmRow, rec.vm) is None:
        raise NotFoundError(
            f"no VM named {rec.vm!r}", code="vm-not-found", remedy=Remedy(Action.LIST_VMS)
        )
    now = _now()
    row = s.get(ScheduleRow, rec.vm)
    if row is None:
        row = ScheduleRow(vm=rec.vm, created_at=now)
        s.add(row)
    row.every_s = rec.every_s
    for k in _KEEPS:
        setattr(row, k, getattr(rec, k))
    row.quiesce = None if rec.quiesce is None else QuiescePolicy(rec.quiesce).value
    row.enabled = rec.enabled
    row.updated_at = now
    s.flush()
    return _record(row)


def get_schedule(s: Session, vm: str) -> ScheduleRecord:
    """The schedule of ``vm``. Raises NotFoundError (``schedule-not-found``)."""
    row = s.get(ScheduleRow, vm)
    if row is None:
        raise _not_found(vm)
    return _record(row)


def list_schedules(s: Session) -> list[ScheduleRecord]:
    """Every schedule, by VM name."""
    return [_record(r) for r in s.scalars(sa.select(ScheduleRow).order_by(ScheduleRow.vm))]


def remove_schedule(s: Session, vm: str) -> None:
    """Forget the schedule of ``vm`` (its snapshots stay). Raises NotFoundError
    (``schedule-not-found``)."""
    result = s.execute(sa.delete(ScheduleRow).where(ScheduleRow.vm == vm))
    if cast(CursorResult[Any], result).rowcount == 0:
        raise _not_found(vm)


def claim_run(
    s: Session, vm: str, seen: datetime | None, now: datetime, owner: str
) -> ScheduleRecord | None:
    """Claim the run due for ``vm``: move ``last_run_at`` from ``seen`` (what the caller read;
    None: never run) to ``now`` and name ``owner``, only if it still is ``seen`` and the
    schedule is enabled. Returns the claimed schedule, or None when another process claimed
    it first (or it was disabled or removed meanwhile)."""
    cond = ScheduleRow.last_run_at.is_(None) if seen is None else ScheduleRow.last_run_at == seen
    result = s.execute(
        sa.update(ScheduleRow)
        .where(ScheduleRow.vm == vm, ScheduleRow.enabled.is_(True), cond)
        .values(
            last_run_at=now,
            run_owner=owner,
            last_snapshot=None,
            last_outcome=None,
            last_error=None,
            last_prune=None,
            last_finished_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], result).rowcount != 1:
        return None
    row = s.get(ScheduleRow, vm, populate_existing=True)
    return None if row is None else _record(row)


def record_run(
    s: Session,
    vm: str,
    owner: str,
    claimed_at: datetime,
    *,
    snapshot_id: str | None,
    outcome: str,
    error: str | None,
    prune: str | None,
) -> bool:
    """How the run ``owner`` claimed at ``claimed_at`` ended: ``snapshot_id`` (None: none was
    made), ``outcome`` (a code), ``error`` (a message), ``prune`` (what the prune after it
    did). Only while that claim is the
    schedule's latest (a later claim, or a removed schedule, is left alone): returns whether
    it was recorded."""
    result = s.execute(
        sa.update(ScheduleRow)
        .where(
            ScheduleRow.vm == vm,
            ScheduleRow.run_owner == owner,
            ScheduleRow.last_run_at == claimed_at,
        )
        .values(
            last_snapshot=snapshot_id,
            last_outcome=outcome,
            last_error=error,
            last_prune=prune,
            last_finished_at=_now(),
        )
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1
