"""Making the lab's data disks: a filesystem made on the host in a sparse raw file, then
converted to qcow2 (``qemu-img convert -O qcow2``). Nothing is mounted on the host.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from freezeframe._tools import run
from freezeframe.errors import LabError

__all__ = ["XFS_MIN_SIZE", "make_disk"]

log = logging.getLogger(__name__)

#: mkfs.xfs (xfsprogs >= 5.19) refuses filesystems of 300 MB or less.
XFS_MIN_SIZE = 320 << 20


def _mkfs_argv(fstype: str, raw: Path, label: str) -> tuple[str, ...]:
    if fstype == "ext4":
        # Initialise inode tables and journal here, not lazily in the (slow, emulated) guest.
        return (
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(raw),
        )
    if fstype == "xfs":
        return ("mkfs.xfs", "-q", "-f", "-L", label, str(raw))
    if fstype == "vfat":
        return ("mkfs.vfat", "-n", label.upper()[:11], str(raw))  # mkfs.vfat has no -q
    raise LabError(f"no mkfs for {fstype!r}")


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        os.truncate(f.fileno(), size)


async def make_disk(path: Path, fstype: str, size: int, label: str) -> int:
    """Create the qcow2 image ``path`` holding an empty ``fstype`` filesystem.

    Returns the virtual size used (xfs is raised to :data:`XFS_MIN_SIZE`). Raises
    ToolError if mkfs or qemu-img fails, DependencyError if one is missing, LabError for
    an unknown filesystem. The raw scratch file is removed in every case.
    """
    if fstype == "xfs" and size < XFS_MIN_SIZE:
        log.info("lab: xfs disk %s raised from %d to %d bytes", path.name, size, XFS_MIN_SIZE)
        size = XFS_MIN_SIZE
    raw = path.with_name(f".{path.name}.raw")
    try:
        _sparse_file(raw, size)
        await run(*_mkfs_argv(fstype, raw, label), timeout=120, what=f"mkfs {fstype}")
        await run(
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            str(raw),
            str(path),
            timeout=120,
            what="qemu-img convert",
        )
    finally:
        raw.unlink(missing_ok=True)
    return size
