"""The lab's data: :class:`LabVm`, :class:`LabDisk`, and validation of names, sizes, filesystems.

Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.errors import UsageError
from freezeframe.models import QuiescePolicy, VmConfig

__all__ = [
    "ACCELS",
    "FILESYSTEMS",
    "MAX_DISKS",
    "LabDisk",
    "LabVm",
    "parse_disks",
    "parse_size",
    "validate_accel",
    "validate_fstypes",
    "validate_name",
    "validate_timeout",
]

#: qemu-ga's --logfile inside the lab guest (see guest/init).
GUEST_AGENT_LOG = "/var/log/qemu-ga.log"
#: Filesystems a lab data disk can carry.
FILESYSTEMS: tuple[str, ...] = ("ext4", "xfs", "vfat")
#: Accepted values of ``accel``.
ACCELS: tuple[str, ...] = ("auto", "kvm", "tcg")
#: At most this many data disks (they get PCI slots 0x08 .. 0x17).
MAX_DISKS = 16

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_SIZE_RE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MIN_SIZE = 64 << 20
_MAX_SIZE = 64 << 30
#: Longest ``timeout`` (seconds) ``lab_up`` accepts.
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class LabDisk:
    """One data disk of a lab VM.

    ``device`` is the QEMU device id (``disk0``; its serial is ``ffdisk0``), ``node`` the
    qcow2 format node name (its file node is ``<node>-file``), ``file`` the qcow2 image the
    disk booted from (the top of its chain at ``lab_up``: ``diskN.qcow2`` at first, a
    snapshot's overlay ``diskN.ff-<id>.qcow2`` later; a snapshot of the running VM moves the
    disk to a newer overlay without changing this), ``base`` the image at the bottom of that
    chain (None: the same as ``file``), ``mountpoint`` where the guest mounts it.
    """

    device: str
    node: str
    file: Path
    format: str
    fstype: str
    mountpoint: str
    base: Path | None = None

    @property
    def base_image(self) -> Path:
        """The disk's base image ``diskN.qcow2``, the bottom of its chain."""
        return self.base if self.base is not None else self.file

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "node": self.node,
            "file": str(self.file),
            "base": str(self.base_image),
            "format": self.format,
            "fstype": self.fstype,
            "mountpoint": self.mountpoint,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LabDisk:
        file = Path(doc["file"])
        base = Path(doc["base"]) if doc.get("base") else None
        return cls(
            device=str(doc["device"]),
            node=str(doc["node"]),
            file=file,
            format=str(doc["format"]),
            fstype=str(doc["fstype"]),
            mountpoint=str(doc["mountpoint"]),
            base=None if base == file else base,
        )


@dataclass(frozen=True, slots=True)
class LabVm:
    """A lab VM as recorded in its directory; ``running`` is checked against /proc when read.

    ``qga_path`` is None when the VM was started without the guest agent. ``accel`` is the
    accelerator QEMU runs with (``kvm`` or ``tcg``).
    """

    name: str
    pid: int
    running: bool
    qmp_path: Path
    qga_path: Path | None
    console_log: Path
    accel: str
    disks: tuple[LabDisk, ...]

    def vm_config(self) -> VmConfig:
        """How freezeframe registers this lab VM: its sockets, agent yes/no, the agent's log
        file as evidence, policy ``preferred``."""
        return VmConfig(
            name=self.name,
            driver="qmp",
            qmp_path=str(self.qmp_path),
            qga_path=str(self.qga_path) if self.qga_path else None,
            agent=self.qga_path is not None,
            quiesce=QuiescePolicy.PREFERRED,
            agent_log_path=GUEST_AGENT_LOG if self.qga_path else None,
            lab=True,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "running": self.running,
            "qmp_path": str(self.qmp_path),
            "qga_path": str(self.qga_path) if self.qga_path else None,
            "console_log": str(self.console_log),
            "accel": self.accel,
            "disks": [d.to_json() for d in self.disks],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, running: bool) -> LabVm:
        qga = doc.get("qga_path")
        return cls(
            name=str(doc["name"]),
            pid=int(doc["pid"]),
            running=running,
            qmp_path=Path(doc["qmp_path"]),
            qga_path=Path(qga) if qga else None,
            console_log=Path(doc["console_log"]),
            accel=str(doc["accel"]),
            disks=tuple(LabDisk.from_json(d) for d in doc["disks"]),
        )


def validate_name(name: str) -> str:
    """Return ``name`` if it matches ``[a-z0-9][a-z0-9-]{0,31}``; else raise UsageError."""
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid lab VM name {name!r}",
            hint="use 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit",
        )
    return name


def validate_fstypes(disks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Normalise the requested disk filesystems; raise UsageError on an unknown one."""
    out = tuple(d.strip().lower() for d in disks)
    for fstype in out:
        if fstype not in FILESYSTEMS:
            raise UsageError(
                f"unknown filesystem {fstype!r} for a lab disk",
                hint=f"choose from {', '.join(FILESYSTEMS)}",
            )
    if len(out) > MAX_DISKS:
        raise UsageError(f"too many lab disks ({len(out)}); at most {MAX_DISKS}")
    return out


def parse_disks(text: str) -> tuple[str, ...]:
    """``"ext4,xfs"`` -> ``("ext4", "xfs")``; raise UsageError for an empty list, an empty
    entry (``"ext4,,xfs"``) or an unknown filesystem."""
    parts = tuple(p.strip() for p in text.split(","))
    if not any(parts):
        raise UsageError(
            "no data disk given",
            hint=f"e.g. --disks ext4,xfs (choose from {', '.join(FILESYSTEMS)})",
        )
    if not all(parts):
        raise UsageError(
            f"empty entry in the disk list {text!r}", hint="separate filesystems by one comma"
        )
    return validate_fstypes(parts)


def validate_timeout(timeout: float) -> float:
    """Return ``timeout`` if it is a number of seconds in (0, :data:`MAX_TIMEOUT`]; else raise
    UsageError."""
    if not isinstance(timeout, int | float) or not math.isfinite(timeout):
        raise UsageError(f"invalid timeout {timeout!r}", hint="a number of seconds, e.g. 60")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise UsageError(
            f"timeout {timeout:g}s out of range", hint=f"more than 0 and at most {MAX_TIMEOUT:g}"
        )
    return float(timeout)


def validate_accel(accel: str) -> str:
    """Return ``accel`` if it is auto, kvm or tcg; else raise UsageError."""
    if accel not in ACCELS:
        raise UsageError(f"unknown accelerator {accel!r}", hint=f"choose from {', '.join(ACCELS)}")
    return accel


def parse_size(size: str | int) -> int:
    """``256M``, ``1G``, ``1GiB``, ``268435456`` -> bytes (64 MiB .. 64 GiB); else UsageError."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.fullmatch(size.strip())
        if not m:
            raise UsageError(f"invalid disk size {size!r}", hint="e.g. 256M or 1G")
        value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if not _MIN_SIZE <= value <= _MAX_SIZE:
        raise UsageError(f"disk size {size!r} out of range", hint="between 64M and 64G")
    return value
