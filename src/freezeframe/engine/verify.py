"""``snapshot verify``: check every disk image of a snapshot offline and store the verdict.

The checks themselves (throw-away overlay, export, loop device, fsck) live in
:mod:`freezeframe.storage`; this module picks the images from the record, passes what the
record knows about the filesystems, and stores the result. The cut images are never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from freezeframe.catalog import Catalog
from freezeframe.engine.images import fingerprint_changes
from freezeframe.errors import VerifyError
from freezeframe.models import (
    ConsistencyLevel,
    FsCheck,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    Verification,
    VerifyVerdict,
)
from freezeframe.storage import parse_user_checks, verify_disks
from freezeframe.storage.backends import backend_of_record, load_backend

__all__ = [
    "DEFAULT_CHECK_TIMEOUT",
    "changed_since_cut",
    "parse_user_checks",
    "readable_disks",
    "verify_snapshot",
]

#: Seconds a user check may run (per filesystem) before its process group is killed.
DEFAULT_CHECK_TIMEOUT = 300.0


async def verify_snapshot(
    catalog: Catalog,
    snapshot_id: str,
    *,
    checks: Sequence[str] = (),
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
) -> Verification:
    """Verify snapshot ``snapshot_id`` (id or unique prefix) and store the verdict.

    ``checks`` are user check command lines, each run in every mountable filesystem for at
    most ``check_timeout`` seconds (see :func:`freezeframe.storage.verify_disks`); a failing
    one makes the verdict ``check-failed``, the filesystems' own checks keep theirs. The new
    verification replaces a stored one.

    Raises NotFoundError / UsageError (unknown or ambiguous id, ``check_timeout`` not > 0, a
    check that cannot be parsed or whose program is not on this host's PATH: found before
    anything is read), VerifyError (a running snapshot, a failed one without images at the cut,
    or an image that cannot be read: the catalog is left unchanged).

    An image at the cut that is no longer what its fingerprint recorded right after the cut
    (written to or replaced since: a VM restarted on it) makes the verdict ``changed-since-cut``
    without checking anything (what the image holds now is not the snapshot).
    """
    parse_user_checks(checks)  # bad input is refused before anything is exported
    rec = await catalog.get_snapshot(snapshot_id)
    # Held while read: a delete refuses it meanwhile (snapshot-in-use), and one that is being
    # deleted is refused here (snapshot-being-deleted).
    async with catalog.hold_snapshot(rec.id, "verify"):
        return await _verify_held(
            catalog, await catalog.get_snapshot(rec.id), checks, check_timeout
        )


async def _verify_held(
    catalog: Catalog, rec: SnapshotRecord, checks: Sequence[str], check_timeout: float
) -> Verification:
    # A failed attempt whose cut happened (it was interrupted afterwards) keeps its images at
    # the cut: they can be verified like any others. A running one is not finished yet.
    if rec.status is SnapshotStatus.RUNNING or not rec.disks:
        raise VerifyError(
            f"snapshot {rec.id} is {rec.status.value} and has no images to verify"
            + (f" ({rec.error})" if rec.error else "")
        )
    changed = changed_since_cut(rec)
    if changed is not None:
        await catalog.set_verification(rec.id, changed)
        return changed
    expect = {f.device: f.fstype for f in rec.filesystems if f.device}
    # disks whose filesystems were not frozen at the cut: named by the record, or every disk
    # without a frozen filesystem when the snapshot as a whole is only crash-consistent
    frozen = {f.device for f in rec.filesystems if f.device and f.frozen}
    unfrozen = {f.device for f in rec.filesystems if f.device and not f.frozen}
    if rec.level.rank < ConsistencyLevel.FILESYSTEM.rank:
        unfrozen |= {d.device for d in rec.disks if d.device not in frozen}
    result = await verify_disks(
        await readable_disks(catalog, rec),
        user_checks=tuple(checks),
        expect=expect,
        user_check_timeout=check_timeout,
        unfrozen=unfrozen,
    )
    await catalog.set_verification(rec.id, result)
    return result


async def readable_disks(catalog: Catalog, rec: SnapshotRecord) -> tuple[SnapshotDisk, ...]:
    """``rec``'s disks with each image named as its backend reads it at the cut (an RBD
    snapshot: ``json:{"driver": "rbd", ..., "snapshot": "ff-ID"}``, read-only), once each
    backend has said what it made is there (bounded). Raises NotFoundError (the VM is gone:
    its Ceph settings with it), DependencyError, StorageError (Ceph does not answer, a
    snapshot is gone)."""
    if all(backend_of_record(d) == "qcow2" for d in rec.disks):
        return rec.disks
    cfg = await catalog.get_vm(rec.vm)
    backends = {
        name: load_backend(name).for_vm(cfg, None)
        for name in dict.fromkeys(backend_of_record(d) for d in rec.disks)
        if name != "qcow2"
    }
    for name, backend in backends.items():
        await backend.check_readable(rec.id, [d for d in rec.disks if backend_of_record(d) == name])
    return tuple(
        d if name == "qcow2" else replace(d, image=backends[name].verify_source(d))
        for d in rec.disks
        for name in (backend_of_record(d),)
    )


def changed_since_cut(rec: SnapshotRecord) -> Verification | None:
    """The ``changed-since-cut`` verification of ``rec`` when an image at its cut changed since
    its fingerprint was taken (one check per changed disk, naming what changed); None when none
    did or none was fingerprinted. Only ``stat``; raises nothing."""
    checks = []
    for disk in rec.disks:
        diff = fingerprint_changes(disk)
        if diff:
            checks.append(
                FsCheck(
                    device=disk.device,
                    fstype="-",
                    verdict=VerifyVerdict.CHANGED,
                    detail=f"{disk.image} changed since the cut ({', '.join(diff)}): written to "
                    "after the cut (a VM restarted on it?); this snapshot no longer holds the "
                    "disk as it was",
                )
            )
    if not checks:
        return None
    return Verification(
        verdict=VerifyVerdict.CHANGED, checked_at=datetime.now(UTC), checks=tuple(checks)
    )
