"""Deleting a snapshot: what its storage backends made, then its record.

Owns which snapshots can be deleted now and the order that never loses a byte: every part a
backend made (RBD snapshots ``ff-<id>``) is removed first, the record only after all of them
are gone. A part of a qcow2 external overlay is a layer of the disk's running chain: deleting
it needs a live merge (not built), so such a snapshot is refused before anything is touched.
The caller (the service) holds the VM's lock.
"""

from __future__ import annotations

import logging

from freezeframe.catalog import Catalog
from freezeframe.errors import Action, NotFoundError, Remedy, UsageError
from freezeframe.models import SnapshotRecord, SnapshotStatus, VmConfig
from freezeframe.storage.backends import backend_of_record, load_backend

__all__ = ["DELETABLE_BACKENDS", "check_deletable", "delete_snapshot"]

log = logging.getLogger(__name__)

#: Backends whose parts can be removed without touching a disk's running chain.
DELETABLE_BACKENDS = frozenset({"rbd"})


def check_deletable(rec: SnapshotRecord) -> None:
    """Raise UsageError unless ``rec`` can be deleted now: code ``snapshot-running`` (its
    attempt is in progress or died: recover settles it), ``delete-needs-merge`` (a disk is a
    qcow2 external overlay: its layer can only go by a merge, not built yet). No I/O."""
    if rec.status == SnapshotStatus.RUNNING:
        raise UsageError(
            f"snapshot {rec.id} is still running (or its process died)",
            hint="wait for it to finish, or recover the VM to settle it",
            code="snapshot-running",
            remedy=Remedy(Action.RECOVER, rec.vm),
        )
    layered = [d.device for d in rec.disks if backend_of_record(d) not in DELETABLE_BACKENDS]
    if layered:
        raise UsageError(
            f"snapshot {rec.id}: disk(s) {', '.join(layered)} are qcow2 layers of the running "
            "chain; deleting one needs a merge of the layers",
            hint="merging qcow2 layers is not built yet; only snapshots whose disks are all "
            "RBD can be deleted",
            code="delete-needs-merge",
        )


async def delete_snapshot(catalog: Catalog, rec: SnapshotRecord) -> None:
    """Delete snapshot ``rec``: every backend's parts, then the record.

    Raises UsageError (see :func:`check_deletable`), DependencyError (a backend's module is
    missing), StorageError (a part could not be removed: the record stays, with every part
    that is left; deleting again finishes, removed parts count as gone), CatalogError.
    """
    check_deletable(rec)
    try:
        cfg = await catalog.get_vm(rec.vm)
    except NotFoundError:
        cfg = VmConfig(name=rec.vm)  # the VM was forgotten: the global Ceph settings apply
    for name in dict.fromkeys(backend_of_record(d) for d in rec.disks):
        backend = load_backend(name).for_vm(cfg, None)
        try:
            await backend.delete(rec.id, [d for d in rec.disks if backend_of_record(d) == name])
        finally:
            await backend.close()
    await catalog.delete_snapshot(rec.id)
    log.info("deleted snapshot %s of %s", rec.id, rec.vm)
