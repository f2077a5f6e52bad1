"""Restoring a VM's disks to a snapshot: new overlays on top of the snapshot's images.

Owns the order of a restore and what it changes in the chain model; how a VM is stopped and
started is the caller's (the service: a lab VM is stopped and restarted on the new overlays, a
QEMU VM registered by sockets must be stopped by its operator and booted on what this returns).

For each qcow2 disk of the snapshot a new qcow2 overlay ``N`` backed by the snapshot's image at
the cut ``I`` is created (owner, mode and SELinux label of the layer the disk wrote to, so the
QEMU user can open it); the disk writes to ``N`` from then on. ``I`` is never written: it still
holds the snapshot, and every other snapshot's image is untouched, so later snapshots stay
usable and restorable (their chain now branches at ``I``). The layer the disk wrote to before
the restore (what changed since the newest snapshot, held by no snapshot) is discarded when the
restore is into the same VM; ``into`` another VM leaves the original VM's chain as it is.

Refused before anything changes, with a code: ``snapshot-not-done``, ``restore-unsupported``
(an RBD disk: rolling an RBD image back is not built), ``snapshot-not-linked`` (a record the
chain model does not know), ``snapshot-in-use`` / ``snapshot-being-deleted`` (a hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from freezeframe.catalog import Catalog
from freezeframe.errors import UsageError
from freezeframe.hypervisor._files import apply_image_access
from freezeframe.models import ChainImage, SnapshotRecord, SnapshotStatus
from freezeframe.storage._qemu_img import run_qemu_img
from freezeframe.storage.backends import backend_of_record

__all__ = [
    "RestoredDisk",
    "check_restorable",
    "discard_old_layers",
    "make_restore_overlays",
    "record_restore",
    "remove_overlays",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestoredDisk:
    """Disk ``device`` boots from ``boot_from`` (a new overlay backed by ``image``, the
    snapshot's image at the cut); ``discarded``: the layer it wrote to before, removed (None:
    kept, e.g. restored into another VM)."""

    device: str
    boot_from: str
    image: str
    discarded: str | None = None


def check_restorable(rec: SnapshotRecord, images: list[ChainImage]) -> dict[str, ChainImage]:
    """The image row of each disk of ``rec`` (by device). Raises UsageError
    (``snapshot-not-done``, ``restore-unsupported``, ``snapshot-not-linked``). No I/O."""
    if rec.status is not SnapshotStatus.DONE:
        raise UsageError(
            f"snapshot {rec.id} is {rec.status.value}, not done: nothing to restore",
            code="snapshot-not-done",
        )
    rbd = [d.device for d in rec.disks if backend_of_record(d) != "qcow2"]
    if rbd:
        raise UsageError(
            f"snapshot {rec.id}: disk(s) {', '.join(rbd)} are RBD snapshots; restoring RBD "
            "disks is not built",
            hint="export the snapshot (snapshot export) and import the images instead",
            code="restore-unsupported",
        )
    rows = {(i.device, i.location): i for i in images if i.snapshot_id == rec.id}
    out: dict[str, ChainImage] = {}
    for d in rec.disks:
        row = rows.get((d.device, d.image))
        if row is None:
            raise UsageError(
                f"snapshot {rec.id}: the catalog's chain model does not know disk {d.device}'s "
                f"image {d.image}",
                code="snapshot-not-linked",
            )
        out[d.device] = row
    if not out:
        raise UsageError(f"snapshot {rec.id} has no disks to restore", code="snapshot-not-done")
    return out


def _overlay_path(image: str, near: str | None, token: str) -> Path:
    """Where the new overlay of ``image`` goes: next to ``near`` (the layer the disk wrote
    to) or else next to the image; named after the image's whole name (Nova's ``disk``,
    ``disk.eph0`` stay apart)."""
    directory = Path(near).parent if near and near.startswith("/") else Path(image).parent
    return directory / f"{Path(image).name}.ff-restore-{token}.qcow2"


async def make_restore_overlays(
    catalog: Catalog, rec: SnapshotRecord, rows: dict[str, ChainImage]
) -> list[RestoredDisk]:
    """Create the new overlays of a restore of ``rec`` (files only: nothing uses them until
    :func:`record_restore` and a start on them). Raises ToolError (qemu-img), CutError
    (``overlay-owner``), CatalogError; the overlays made so far are removed on an error."""
    token = secrets.token_hex(4)
    images = await catalog.chain_images(rec.vm)
    active = {i.device: i for i in images if i.active and i.vm == rec.vm}
    made: list[RestoredDisk] = []
    try:
        for device, row in rows.items():
            old = active.get(device)
            path = _overlay_path(row.location, old.location if old else None, token)
            await run_qemu_img(
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                row.location,
                "-F",
                row.format,
                str(path),
                what=f"qemu-img create {path}",
                code="overlay-create-failed",
            )
            made.append(RestoredDisk(device, str(path), row.location))
            like = old.location if old is not None and await _exists(old.location) else None
            await asyncio.to_thread(apply_image_access, path, like or row.location, None)
    except BaseException:
        await remove_overlays(made)
        raise
    return made


async def remove_overlays(made: list[RestoredDisk]) -> None:
    """Remove the overlays of a restore that did not happen. Never raises."""
    for m in made:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.unlink, m.boot_from)


async def record_restore(
    catalog: Catalog, made: list[RestoredDisk], rows: dict[str, ChainImage], *, into: str
) -> None:
    """The disks of VM ``into`` write to the restore's overlays from now on (the chain
    model's active rows, backed by the snapshot's images). Raises CatalogError."""
    for m in made:
        await catalog.set_active_image(into, m.device, m.boot_from, backing_id=rows[m.device].id)


async def _exists(path: str) -> bool:
    return await asyncio.to_thread(os.path.exists, path)


async def discard_old_layers(
    catalog: Catalog, vm: str, restored: list[RestoredDisk], before: list[ChainImage]
) -> list[RestoredDisk]:
    """After a restore of ``vm`` onto ``restored``: remove the layers its disks wrote to
    before (``before``: the catalog's rows then) when no snapshot holds them. Returns
    ``restored`` with ``discarded`` set. Raises CatalogError."""
    out = []
    for r in restored:
        old = [
            i
            for i in before
            if i.vm == vm and i.device == r.device and i.active and i.snapshot_id is None
        ]
        gone = None
        for i in old:
            if i.location in (r.boot_from, r.image):
                continue
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, i.location)
            await catalog.drop_image(i.id)
            gone = i.location
            log.info("restore of %s: discarded %s (written after the newest snapshot)", vm, gone)
        out.append(RestoredDisk(r.device, r.boot_from, r.image, gone))
    return out
