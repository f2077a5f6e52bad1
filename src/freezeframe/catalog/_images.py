"""The chain model inside the catalog (private): image rows, snapshot holds, merge intents.

Owns how a snapshot's disks are tied to the ``images`` table and how a merge moves a
snapshot's data from one file to another in ONE transaction. Every function here takes an
open SQLAlchemy session inside its caller's transaction (:class:`~freezeframe.catalog.Catalog`
runs them in its worker thread); nothing commits by itself.

The rules:
- a ``done`` record links each disk to the image row holding its data at the cut
  (``snapshot_disks.image_id``); the record's ``image`` is read from that row, so a merge that
  moves the data updates the row and every record still names where its data lives;
- a qcow2 disk's overlay (the layer the VM writes to after the cut) gets a row marked
  ``active``, backed by the image at the cut; the next snapshot's cut turns that row into its
  image (``snapshot_id`` set, ``active`` cleared);
- merging ``top`` into its backing ``base``: the ``top`` row takes ``base``'s location,
  backing, format and mode, the ``base`` row goes (it held the deleted snapshot's data);
- a hold is a reader's claim on a snapshot (verify, export); a delete refuses a held snapshot
  and nobody can take a hold on a snapshot being deleted.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from freezeframe._owner import holder_is_dead
from freezeframe.catalog._schema import (
    ImageRow,
    MergeRow,
    SnapshotDiskRow,
    SnapshotHoldRow,
    SnapshotRow,
)
from freezeframe.errors import BusyError, NotFoundError, UsageError
from freezeframe.models import (
    ChainImage,
    ImageFingerprint,
    MergeIntent,
    SnapshotRecord,
    SnapshotStatus,
)

__all__ = [
    "MERGE_DONE",
    "MERGE_MERGED",
    "MERGE_OPEN",
    "begin_delete",
    "chain_image",
    "chain_images",
    "close_merge",
    "drop_image",
    "finish_delete",
    "forget_rows",
    "link_images",
    "merge_done",
    "merge_intent",
    "open_merge",
    "open_merges",
    "refingerprint",
    "release_hold",
    "set_active_image",
    "take_hold",
]

log = logging.getLogger(__name__)

MERGE_OPEN = "open"
MERGE_MERGED = "merged"
MERGE_DONE = "done"

#: How a hold's purpose reads in a refusal.
_HOLD_WORDS = {"export": "an export", "verify": "a verification", "restore": "a restore"}


def _now() -> datetime:
    return datetime.now(UTC)


def _find(s: Session, vm: str, location: str) -> ImageRow | None:
    return s.scalars(
        sa.select(ImageRow).where(ImageRow.vm == vm, ImageRow.location == location)
    ).one_or_none()


def _new(s: Session, vm: str, device: str, location: str, kind: str, fmt: str) -> ImageRow:
    row = ImageRow(
        vm=vm,
        device=device,
        location=location,
        kind=kind,
        format=fmt,
        backing_id=None,
        snapshot_id=None,
        active=False,
        mode=None,
        created_at=_now(),
    )
    s.add(row)
    s.flush()
    return row


def to_chain_image(row: ImageRow) -> ChainImage:
    return ChainImage(
        id=row.id,
        vm=row.vm,
        device=row.device,
        location=row.location,
        kind=row.kind,
        format=row.format,
        backing_id=row.backing_id,
        snapshot_id=row.snapshot_id,
        active=row.active,
        mode=row.mode,
    )


def link_images(s: Session, rec: SnapshotRecord, disks: list[SnapshotDiskRow]) -> None:
    """Tie the disks of ``rec`` (status done, rows flushed) to image rows, creating the rows
    it needs: the image at the cut (``snapshot_id`` = ``rec.id``) and, for a qcow2 disk, the
    overlay the VM writes to since (``active``). Idempotent (a record finished again finds its
    rows by location)."""
    for row, d in zip(disks, rec.disks, strict=True):
        rbd = d.backend == "rbd"
        img = _find(s, rec.vm, d.image) or _new(
            s, rec.vm, d.device, d.image, "rbd-snap" if rbd else "file", d.format
        )
        if img.snapshot_id not in (None, rec.id):
            log.warning(
                "image %s of %s already holds snapshot %s; %s not linked to it",
                d.image,
                rec.vm,
                img.snapshot_id,
                rec.id,
            )
            continue
        img.snapshot_id = rec.id
        img.active = False
        if d.image_mode is not None:
            img.mode = d.image_mode
        row.image_id = img.id
        if rbd or not d.overlay:
            continue
        top = _find(s, rec.vm, d.overlay)
        if top is None:
            top = _new(s, rec.vm, d.device, d.overlay, "file", "qcow2")
            top.active = True
        if top.backing_id is None and top.id != img.id:
            top.backing_id = img.id


def chain_images(s: Session, vm: str, device: str | None = None) -> list[ChainImage]:
    """The image rows of ``vm`` (of one disk if given), oldest first, and the rows of other
    VMs backed by one of them (a restore into a new VM branches from ``vm``'s images)."""
    own = sa.select(ImageRow.id).where(ImageRow.vm == vm).scalar_subquery()
    query = sa.select(ImageRow).where(sa.or_(ImageRow.vm == vm, ImageRow.backing_id.in_(own)))
    if device is not None:
        query = query.where(ImageRow.device == device)
    return [to_chain_image(r) for r in s.scalars(query.order_by(ImageRow.id))]


def chain_image(s: Session, image_id: int) -> ChainImage:
    """One image row. Raises NotFoundError (``image-not-found``)."""
    row = s.get(ImageRow, image_id)
    if row is None:
        raise NotFoundError(f"no image {image_id} in the catalog", code="image-not-found")
    return to_chain_image(row)


# ---------------------------------------------------------------------------- holds


def take_hold(s: Session, snapshot_id: str, purpose: str, owner: str) -> int:
    """Hold ``snapshot_id`` (exact id) for ``purpose`` by ``owner``; returns the hold's id.
    Raises NotFoundError (``snapshot-not-found``), BusyError (``snapshot-being-deleted``)."""
    row = s.get(SnapshotRow, snapshot_id)
    if row is None:
        raise NotFoundError(f"no snapshot {snapshot_id}", code="snapshot-not-found")
    if row.status == SnapshotStatus.DELETING.value:
        raise BusyError(
            f"snapshot {snapshot_id} is being deleted",
            hint="it cannot be read any more; a delete interrupted is finished by recover",
            code="snapshot-being-deleted",
        )
    hold = SnapshotHoldRow(
        snapshot_id=snapshot_id, purpose=purpose, owner=owner, acquired_at=_now()
    )
    s.add(hold)
    s.flush()
    return hold.id


def release_hold(s: Session, hold_id: int) -> None:
    s.execute(sa.delete(SnapshotHoldRow).where(SnapshotHoldRow.id == hold_id))


def begin_delete(s: Session, row: SnapshotRow) -> None:
    """Mark ``row`` ``deleting`` unless a live reader holds it (holds of dead processes of
    this host are dropped). Raises UsageError (``snapshot-running``), BusyError
    (``snapshot-in-use``)."""
    if row.status == SnapshotStatus.RUNNING.value:
        raise UsageError(
            f"snapshot {row.id} is still running (or its process died)",
            hint="wait for it to finish, or recover the VM to settle it",
            code="snapshot-running",
        )
    holds = s.scalars(sa.select(SnapshotHoldRow).where(SnapshotHoldRow.snapshot_id == row.id))
    for hold in list(holds):
        if holder_is_dead(hold.owner, hold.acquired_at):
            log.warning("dropped the %s hold of dead process %s", hold.purpose, hold.owner)
            s.delete(hold)
            continue
        since = hold.acquired_at.isoformat(timespec="seconds")
        raise BusyError(
            f"snapshot {row.id}: {_HOLD_WORDS.get(hold.purpose, hold.purpose)} of it is in "
            f"progress by {hold.owner} since {since}",
            hint="wait for it to finish, then delete",
            code="snapshot-in-use",
        )
    row.status = SnapshotStatus.DELETING.value


def finish_delete(s: Session, row: SnapshotRow) -> None:
    """Remove the record ``row`` (whose parts are gone): snapshots that named it as parent name
    its parent instead; image rows still naming it (RBD snapshots removed, leaf layers) go."""
    children = sa.update(SnapshotRow).where(SnapshotRow.parent_id == row.id)
    s.execute(children.values(parent_id=row.parent_id))
    s.execute(sa.delete(ImageRow).where(ImageRow.snapshot_id == row.id))
    s.delete(row)


def forget_rows(
    s: Session, vm: str, *, snapshot_id: str | None = None, inside: str | None = None
) -> int:
    """Forget rows of ``vm``: those holding snapshot ``snapshot_id``'s data (its record is
    removed without a delete: a purge, a cancelled attempt), or those whose files are under
    directory ``inside`` (ending with ``/``). Rows backed by them lose the link."""
    rows = s.scalars(sa.select(ImageRow).where(ImageRow.vm == vm)).all()
    gone = [
        r.id
        for r in rows
        if (snapshot_id is not None and r.snapshot_id == snapshot_id)
        or (inside is not None and r.location.startswith(inside))
    ]
    for image_id in gone:
        drop_image(s, image_id)
    return len(gone)


def drop_image(s: Session, image_id: int) -> None:
    """Forget image row ``image_id`` (its file was removed); rows backed by it lose the link."""
    s.execute(sa.update(ImageRow).where(ImageRow.backing_id == image_id).values(backing_id=None))
    s.execute(sa.delete(ImageRow).where(ImageRow.id == image_id))


# ---------------------------------------------------------------------------- merges


def _merge(row: MergeRow) -> MergeIntent:
    return MergeIntent(
        id=row.id,
        vm=row.vm,
        snapshot_id=row.snapshot_id,
        device=row.device,
        top=row.top,
        base=row.base,
        live=row.live,
        state=row.state,
        owner=row.owner,
        opened_at=row.opened_at,
    )


def open_merge(
    s: Session,
    *,
    vm: str,
    snapshot_id: str,
    device: str,
    top: str,
    base: str,
    live: bool,
    owner: str,
) -> MergeIntent:
    """Write-ahead: ``top`` of ``device`` is about to be merged into ``base``."""
    row = MergeRow(
        vm=vm,
        snapshot_id=snapshot_id,
        device=device,
        top=top,
        base=base,
        live=live,
        state=MERGE_OPEN,
        owner=owner,
        opened_at=_now(),
        closed_at=None,
    )
    s.add(row)
    s.flush()
    return _merge(row)


def merge_intent(s: Session, merge_id: int) -> MergeIntent:
    row = s.get(MergeRow, merge_id)
    if row is None:
        raise NotFoundError(f"no merge {merge_id}", code="merge-not-found")
    return _merge(row)


def open_merges(s: Session, vm: str | None) -> list[MergeIntent]:
    """Merges not done yet (of ``vm`` if given), oldest first."""
    query = sa.select(MergeRow).where(MergeRow.state != MERGE_DONE)
    if vm is not None:
        query = query.where(MergeRow.vm == vm)
    return [_merge(r) for r in s.scalars(query.order_by(MergeRow.id))]


def merge_done(
    s: Session,
    merge_id: int,
    *,
    fingerprint: ImageFingerprint | None,
    mode: int | None,
) -> None:
    """``top``'s data now lives in ``base``: the ``top`` row takes ``base``'s location, backing
    and format (and ``mode``, the file's mode to give back to the next merge), the ``base`` row
    goes, the disks of the snapshot ``top`` held get ``fingerprint`` (``base`` as it is now),
    and the merge becomes ``merged``. Idempotent (a second call finds it merged)."""
    merge = s.get(MergeRow, merge_id)
    if merge is None:
        raise NotFoundError(f"no merge {merge_id}", code="merge-not-found")
    if merge.state != MERGE_OPEN:
        return
    top = _find(s, merge.vm, merge.top)
    base = _find(s, merge.vm, merge.base)
    if top is not None:
        backing, fmt = (base.backing_id, base.format) if base is not None else (None, "qcow2")
        if base is not None:
            s.execute(
                sa.update(SnapshotDiskRow)
                .where(SnapshotDiskRow.image_id == base.id)
                .values(image_id=None)
            )
            s.execute(
                sa.update(ImageRow).where(ImageRow.backing_id == base.id).values(backing_id=top.id)
            )
            s.delete(base)
            s.flush()
        top.location = merge.base
        top.backing_id = backing if backing != top.id else None
        top.format = fmt
        top.mode = mode
        if top.snapshot_id is not None:
            s.execute(
                sa.update(SnapshotDiskRow)
                .where(SnapshotDiskRow.image_id == top.id)
                .values(
                    fp_size=fingerprint.size if fingerprint else None,
                    fp_mtime_ns=fingerprint.mtime_ns if fingerprint else None,
                    fp_inode=fingerprint.inode if fingerprint else None,
                    image_mode=mode,
                )
            )
    merge.state = MERGE_MERGED


def refingerprint(
    s: Session, vm: str, location: str, fingerprint: ImageFingerprint | None, mode: int | None
) -> None:
    """The image ``location`` of ``vm`` was rewritten in place (its backing pointer moved by
    a merge below it): the disks of the snapshot it holds get ``fingerprint`` and ``mode``."""
    row = _find(s, vm, location)
    if row is None:
        return
    row.mode = mode
    s.execute(
        sa.update(SnapshotDiskRow)
        .where(SnapshotDiskRow.image_id == row.id)
        .values(
            fp_size=fingerprint.size if fingerprint else None,
            fp_mtime_ns=fingerprint.mtime_ns if fingerprint else None,
            fp_inode=fingerprint.inode if fingerprint else None,
            image_mode=mode,
        )
    )


def close_merge(s: Session, merge_id: int) -> None:
    """The merge is over (``top``'s file removed, or nothing to do)."""
    merge = s.get(MergeRow, merge_id)
    if merge is not None:
        merge.state = MERGE_DONE
        merge.closed_at = _now()


def set_active_image(
    s: Session, vm: str, device: str, location: str, *, backing_id: int | None, fmt: str
) -> None:
    """Disk ``device`` of ``vm`` writes to ``location`` now, backed by image row
    ``backing_id`` (which may belong to another VM: a restore into a new VM); no other row of
    that disk is active."""
    s.execute(
        sa.update(ImageRow)
        .where(ImageRow.vm == vm, ImageRow.device == device, ImageRow.location != location)
        .values(active=False)
    )
    row = _find(s, vm, location) or _new(s, vm, device, location, "file", fmt)
    row.active = True
    if backing_id is not None:
        row.backing_id = backing_id
