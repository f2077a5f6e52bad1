"""Overlay files on this host, shared by the drivers that cut with external qcow2 overlays.

Owns how an overlay is named (``<image stem>.ff-<snapshot id>.qcow2``, next to its image or in
an overlay directory), whether one can be created there, and removing one. No I/O with a VM.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from freezeframe.errors import CutError
from freezeframe.models import DiskInfo

__all__ = [
    "OVERLAY_SUFFIX",
    "image_stem",
    "is_block_device",
    "local_cut_problem",
    "overlay_path",
    "remove_file",
]

log = logging.getLogger(__name__)

#: The suffix every overlay's stem carries; stripped so that overlays of overlays keep one.
OVERLAY_SUFFIX = re.compile(r"\.ff-[A-Za-z0-9_-]+$")


def overlay_path(disk: DiskInfo, snapshot_id: str, overlay_dir: str | None) -> Path:
    """Where ``disk``'s overlay for ``snapshot_id`` goes. Raises CutError when the image is not
    a local absolute path and no ``overlay_dir`` is given."""
    local = os.path.isabs(disk.file)
    if overlay_dir is None and not local:
        raise CutError(
            f"disk {disk.device}: image {disk.file!r} is not a local absolute path",
            hint="pass an overlay directory",
        )
    stem = image_stem(Path(disk.file).name) if local else disk.device
    directory = Path(overlay_dir) if overlay_dir is not None else Path(disk.file).parent
    return directory / f"{stem}.ff-{snapshot_id}.qcow2"


def image_stem(name: str) -> str:
    """The part of an image's file name its overlays are named after: an image extension
    (``.qcow2``, ``.img``, ``.raw``) and an earlier overlay's ``.ff-<id>`` are dropped, any
    other dot is kept, so Nova's ``disk``, ``disk.eph0`` and ``disk.swap`` stay apart."""
    for ext in (".qcow2", ".img", ".raw"):
        if name.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return OVERLAY_SUFFIX.sub("", name) or name


def is_block_device(path: str) -> bool:
    """True when ``path`` is a block device; False otherwise or when it cannot be told."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def local_cut_problem(disk: DiskInfo, overlay_dir: str | None) -> str | None:
    """Why an overlay for ``disk`` cannot be created (in ``overlay_dir``, or next to its image
    when None) on this host; None when nothing stands in the way. Never raises."""
    if overlay_dir is None:
        if not os.path.isabs(disk.file):
            return (
                f"disk {disk.device}: image {disk.file!r} is not a local file "
                f"(network or protocol image, format {disk.format}): an overlay cannot go "
                "next to it; use overlay_dir"
            )
        if is_block_device(disk.file) or disk.file.startswith("/dev/"):
            return (
                f"disk {disk.device}: image {disk.file} is a block device: an overlay "
                "cannot go next to it; use overlay_dir"
            )
        directory = os.path.dirname(disk.file)
    else:
        directory = overlay_dir
    if not os.path.isdir(directory):
        return f"disk {disk.device}: overlay directory {directory} does not exist on this host"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"disk {disk.device}: overlay directory {directory} is not writable"
    return None


def remove_file(path: str | Path, label: str) -> None:
    """Delete ``path`` if it exists; only logs when it cannot. Never raises."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove %s: %s", label, path, exc)
