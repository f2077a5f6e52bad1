"""A snapshot record over real qcow2 chains (tests/unit/_chains.py), for the export tests of
the service and the API: two disks ``vda``, ``vdb`` whose images at the cut are the ``l2``
layers of their chains (``top`` is the overlay the VM writes to), fingerprinted."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path

from tests.unit._chains import MIB, SIZE_MIB, make_chain

from freezeframe.models import (
    ConsistencyLevel,
    ImageFingerprint,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
)
from freezeframe.service import Service

__all__ = ["recorded"]


def fingerprint(path: str) -> ImageFingerprint:
    st = os.stat(path)
    return ImageFingerprint(st.st_size, st.st_mtime_ns, st.st_ino)


async def recorded(
    svc: Service, tmp_path: Path, *, status: SnapshotStatus = SnapshotStatus.DONE
) -> SnapshotRecord:
    """A snapshot of two disks whose images at the cut are the ``l2`` layers of two real
    chains (``top`` is the overlay the VM writes to)."""
    disks = []
    for dev in ("vda", "vdb"):
        d = tmp_path / "chains" / dev
        d.mkdir(parents=True)
        c = make_chain(d)
        disks.append(
            SnapshotDisk(
                device=dev,
                node=f"node-{dev}",
                image=c.path("l2"),
                format="qcow2",
                overlay=c.path("top"),
                virtual_size=SIZE_MIB * MIB,
                fingerprint=fingerprint(c.path("l2")),
            )
        )
    rec = SnapshotRecord(
        id="e0a5e0000001",
        vm="web1",
        created_at=datetime(2026, 12, 6, 10, 0, tzinfo=UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
    )
    cat = await svc.catalog()
    await cat.begin_snapshot(rec)
    done = dataclasses.replace(
        rec,
        status=status,
        level=ConsistencyLevel.FILESYSTEM if status is SnapshotStatus.DONE else rec.level,
        level_reason="every filesystem frozen",
        error=None if status is SnapshotStatus.DONE else "freeze failed",
        disks=tuple(disks),
        filesystems=(
            SnapshotFilesystem("/mnt/a", "ext4", "vda", True),
            SnapshotFilesystem("/mnt/b", "xfs", "vdb", True),
        ),
        freeze_window_ms=90.0,
    )
    await cat.finish_snapshot(done)
    return await cat.get_snapshot(rec.id)
