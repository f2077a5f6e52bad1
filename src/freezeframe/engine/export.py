"""``snapshot export``: a snapshot's disks as standalone images plus a metadata file.

Owns what may be exported and what the metadata says: only a ``done`` snapshot whose images at
the cut are still what the cut left (fingerprints), held for the whole copy
(``Catalog.hold_snapshot(id, purpose="export")``) so that a concurrent delete or merge is
refused with ``snapshot-in-use`` instead of moving the files under the copy. The copy itself
(one ``qemu-img convert`` per disk, all or nothing, never overwriting, never writing the
chain) is :func:`freezeframe.storage.export.export_snapshot_images`.

The metadata file (``metadata.json`` next to the images, written last: its presence marks a
complete export) carries the VM, the time of the cut, the consistency level and why, the
verification verdict (the recorded one, one run just before with ``verify``, or
``unverified`` said explicitly), the disk mapping (device -> exported file, source image) and
the guest filesystems; see README "Exporting a snapshot".
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from freezeframe import __version__
from freezeframe.catalog import Catalog
from freezeframe.engine.verify import changed_since_cut, readable_disks, verify_snapshot
from freezeframe.errors import Action, AlreadyExistsError, Remedy, UsageError
from freezeframe.models import SnapshotRecord, SnapshotStatus, Verification, VerifyVerdict
from freezeframe.storage.export import (
    FORMATS,
    ExportDisk,
    ExportedImage,
    ExportProgress,
    export_snapshot_images,
)

__all__ = [
    "FORMATS",
    "METADATA_NAME",
    "UNVERIFIED",
    "ExportOutcome",
    "ExportProgress",
    "ExportedImage",
    "check_export",
    "export_snapshot",
    "metadata_document",
]

log = logging.getLogger(__name__)

#: The metadata file's name in the export directory.
METADATA_NAME = "metadata.json"
#: The metadata's verdict of a snapshot that was never verified.
UNVERIFIED = "unverified"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """A finished export: one standalone image per disk (``images``: device, source, path,
    format, virtual and file size, seconds) and ``metadata_path`` in ``directory``.

    ``verdict``: the verification verdict the metadata carries (a
    :class:`~freezeframe.models.VerifyVerdict` value, or ``unverified``); ``verdict_source``:
    ``run`` (verified just before the export), ``recorded`` (the stored verdict) or ``none``.
    """

    snapshot_id: str
    vm: str
    directory: str
    format: str
    compressed: bool
    images: tuple[ExportedImage, ...]
    metadata_path: str
    verdict: str
    verdict_source: str
    virtual_bytes: int
    file_bytes: int
    duration_ms: float


def _file_names(rec: SnapshotRecord, fmt: str) -> list[str]:
    """``DEVICE.FMT`` per disk (characters a file name should not carry replaced; made unique
    with ``-N``)."""
    out: list[str] = []
    for i, d in enumerate(rec.disks):
        stem = _UNSAFE.sub("_", d.device).lstrip(".") or f"disk{i}"
        name = f"{stem}.{fmt}"
        if name in out or name == METADATA_NAME:
            name = f"{stem}-{i}.{fmt}"
        out.append(name)
    return out


def _check_options(to: str, fmt: str, compress: bool) -> None:
    if fmt not in FORMATS:
        raise UsageError(
            f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}",
            code="bad-export-format",
        )
    if compress and fmt != "qcow2":
        raise UsageError(
            "only a qcow2 export can be compressed",
            hint="drop the compression, or export as qcow2",
            code="compress-needs-qcow2",
        )
    if not os.path.isabs(to):
        raise UsageError(
            f"the export directory must be an absolute path, not {to!r}",
            code="export-path-not-absolute",
        )


def _check_record(rec: SnapshotRecord, to: str, fmt: str) -> None:
    if rec.status is not SnapshotStatus.DONE:
        raise UsageError(
            f"snapshot {rec.id} is {rec.status.value}, not done: only a done snapshot can be "
            "exported" + (f" ({rec.error})" if rec.error else ""),
            hint="export a done snapshot of the VM",
            code="snapshot-not-done",
            remedy=Remedy(Action.LIST_SNAPSHOTS, rec.vm),
        )
    if not rec.disks:
        raise UsageError(f"snapshot {rec.id} has no disk images", code="snapshot-not-done")
    remote = [d.device for d in rec.disks if not d.image.startswith("/") and d.backend != "rbd"]
    if remote:
        raise UsageError(
            f"snapshot {rec.id}: disk(s) {', '.join(remote)} are neither local image files nor "
            "RBD snapshots; exporting them is not supported",
            code="export-backend-unsupported",
        )
    for name in [*_file_names(rec, fmt), METADATA_NAME]:
        path = os.path.join(to, name)
        if os.path.lexists(path):
            raise AlreadyExistsError(
                f"{path} already exists: an export never overwrites a file",
                hint="export into a new or empty directory",
                code="export-target-exists",
            )


async def check_export(
    catalog: Catalog, snapshot_id: str, to: str, *, fmt: str = "qcow2", compress: bool = False
) -> SnapshotRecord:
    """What :func:`export_snapshot` refuses before it starts, without holding or copying
    anything (a server answers a bad request before it starts a job). Returns the record.

    Raises UsageError (``bad-export-format``, ``compress-needs-qcow2``,
    ``export-path-not-absolute``, ``snapshot-not-done``, ``export-backend-unsupported``: a
    disk that is no local file, e.g. an RBD snapshot), NotFoundError,
    AlreadyExistsError (``export-target-exists``), CatalogError.
    """
    _check_options(to, fmt, compress)
    rec = await catalog.get_snapshot(snapshot_id)
    _check_record(rec, to, fmt)
    return rec


def _verification_doc(v: Verification | None, source: str) -> dict[str, Any]:
    if v is None:
        return {"verdict": UNVERIFIED, "source": "none", "checked_at": None, "checks": []}
    return {
        "verdict": v.verdict.value,
        "source": source,
        "checked_at": v.checked_at,
        "checks": [
            {
                "device": c.device,
                "fstype": c.fstype,
                "partition": c.partition,
                "verdict": c.verdict.value,
                "log_replayed": c.log_replayed,
                "detail": c.detail,
            }
            for c in v.checks
        ],
    }


def metadata_document(
    rec: SnapshotRecord, names: list[str], verification: dict[str, Any]
) -> dict[str, Any]:
    """The metadata of an export of ``rec`` (``names``: the exported file of each disk); the
    storage layer adds its ``export`` section (format, compression, sizes)."""
    return {
        "producer": {"name": "freezeframe", "version": __version__},
        "snapshot": rec.id,
        "vm": rec.vm,
        "taken_at": rec.created_at,
        "policy": rec.policy,
        "level": rec.level,
        "level_reason": rec.level_reason,
        "freeze_window_ms": rec.freeze_window_ms,
        "parent_id": rec.parent_id,
        "verification": verification,
        "disks": [
            {
                "device": d.device,
                "file": name,
                "source": d.image,
                "source_format": d.format,
                "virtual_size": d.virtual_size,
                "quiesce_note": d.quiesce_note,
            }
            for d, name in zip(rec.disks, names, strict=True)
        ],
        "filesystems": [
            {
                "mountpoint": f.mountpoint,
                "fstype": f.fstype,
                "device": f.device,
                "frozen": f.frozen,
                "reason": f.reason,
            }
            for f in rec.filesystems
        ],
    }


async def export_snapshot(
    catalog: Catalog,
    snapshot_id: str,
    to: str,
    *,
    fmt: str = "qcow2",
    compress: bool = False,
    verify: bool = False,
    progress: Callable[[ExportProgress], None] | None = None,
) -> ExportOutcome:
    """Export snapshot ``snapshot_id`` (id or unique prefix) into directory ``to`` (absolute;
    created if missing): ``DEVICE.FMT`` per disk (``fmt`` qcow2 or raw, ``compress``: qcow2
    compressed clusters) and ``metadata.json``. With ``verify`` the snapshot is verified first
    (the verdict is stored, as ``snapshot verify`` does, and put in the metadata). While the
    images are copied the snapshot is held (purpose ``export``). ``progress`` gets the bytes
    done over all disks.

    Raises UsageError (see :func:`check_export`; ``snapshot-changed-since-cut``: an image at
    the cut was written to since the cut, recorded as that verdict; ``export-backend-unsupported``:
    a disk that is no local qcow2/raw file, e.g. an RBD snapshot), NotFoundError
    (``snapshot-not-found``, ``image-not-found``), AlreadyExistsError
    (``export-target-exists``), BusyError (``snapshot-in-use``: held by a delete or another
    operation), VerifyError (with ``verify``: the verification could not run), ToolError
    (``image-in-use``, ``no-space``, ``export-failed``, ``image-check-failed``,
    ``metadata-write-failed``), DependencyError (no qemu-img), CatalogError. A failed or
    cancelled export leaves nothing in ``to``.
    """
    started = time.monotonic()
    rec = await check_export(catalog, snapshot_id, to, fmt=fmt, compress=compress)
    source = "recorded"
    if verify:
        # before the hold: the verification is an operation of its own on the snapshot
        await verify_snapshot(catalog, rec.id)
        source = "run"
    async with catalog.hold_snapshot(rec.id, purpose="export"):
        rec = await catalog.get_snapshot(rec.id)  # as it is now that it is held
        _check_record(rec, to, fmt)
        changed = changed_since_cut(rec)
        if changed is not None or (
            rec.verification is not None and rec.verification.verdict is VerifyVerdict.CHANGED
        ):
            if changed is not None:
                await catalog.set_verification(rec.id, changed)
            raise UsageError(
                f"snapshot {rec.id}: an image at the cut was written to since the cut; the "
                "snapshot no longer holds the disks as they were, so it is not exported",
                hint="take a new snapshot and export that one",
                code="snapshot-changed-since-cut",
                remedy=Remedy(Action.SHOW_SNAPSHOT, rec.vm, {"id": rec.id}),
            )
        names = _file_names(rec, fmt)
        verification = _verification_doc(rec.verification, source)
        # an RBD snapshot is read as its backend names it: json:{"driver": "rbd", ...,
        # "snapshot": "ff-ID"} (read-only, raw), once the backend says it is there
        readable = await readable_disks(catalog, rec)
        res = await export_snapshot_images(
            [
                ExportDisk(
                    d.device, d.image, "raw" if d.image.startswith("json:") else d.format, name
                )
                for d, name in zip(readable, names, strict=True)
            ],
            to,
            fmt=fmt,
            compress=compress,
            progress=progress,
            metadata=metadata_document(rec, names, verification),
            metadata_name=METADATA_NAME,
        )
    out = ExportOutcome(
        snapshot_id=rec.id,
        vm=rec.vm,
        directory=res.directory,
        format=fmt,
        compressed=compress,
        images=res.images,
        metadata_path=res.metadata_path or os.path.join(res.directory, METADATA_NAME),
        verdict=str(verification["verdict"]),
        verdict_source=str(verification["source"]),
        virtual_bytes=res.virtual_bytes,
        file_bytes=sum(i.file_size for i in res.images),
        duration_ms=(time.monotonic() - started) * 1000.0,
    )
    log.info(
        "exported snapshot %s of %s to %s (%s, %d bytes) in %.0f ms",
        rec.id, rec.vm, out.directory, fmt, out.virtual_bytes, out.duration_ms,
    )  # fmt: skip
    return out
