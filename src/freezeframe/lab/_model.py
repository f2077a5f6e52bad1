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
    "DRIVERS",
    "FILESYSTEMS",
    "LIBVIRT_URI",
    "MAX_DISKS",
    "LabDisk",
    "LabVm",
    "domain_name",
    "libvirt_agent_address",
    "parse_disks",
    "parse_size",
    "validate_accel",
    "validate_driver",
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
#: How a lab VM runs: QEMU started by the lab itself (``qmp``, registered with the QMP driver)
#: or a transient libvirt domain (``libvirt``, registered with the libvirt driver).
DRIVERS: tuple[str, ...] = ("qmp", "libvirt")
#: The libvirt connection of libvirt lab VMs.
LIBVIRT_URI = "qemu:///system"

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
    #: Set for a disk in the lab Ceph (``lab up --rbd``): ``pool/image``, the cluster's conf
    #: and its monitor ``host:port`` (``file`` is then unused: QEMU opens the RBD image).
    rbd: str | None = None
    rbd_conf: str | None = None
    rbd_mon: str | None = None

    @property
    def serial(self) -> str:
        """The disk's serial (``ffdiskN``): the guest finds it by this, and so does ``lab
        down`` in a libvirt domain's XML."""
        return f"ff{self.device}"

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
            **(
                {"rbd": self.rbd, "rbd_conf": self.rbd_conf, "rbd_mon": self.rbd_mon}
                if self.rbd
                else {}
            ),
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
            rbd=str(doc["rbd"]) if doc.get("rbd") else None,
            rbd_conf=str(doc["rbd_conf"]) if doc.get("rbd_conf") else None,
            rbd_mon=str(doc["rbd_mon"]) if doc.get("rbd_mon") else None,
        )


def domain_name(name: str) -> str:
    """The libvirt domain name of the lab VM ``name`` (a valid libvirt name for every valid
    lab name)."""
    return f"ff-lab-{name}"


def libvirt_agent_address(domain: str, connect_uri: str) -> str:
    """The agent address the libvirt driver gives the domain with UUID ``domain``."""
    return f"libvirt:{domain}@{connect_uri}"


@dataclass(frozen=True, slots=True)
class LabVm:
    """A lab VM as recorded in its directory; ``running`` is checked against /proc when read.

    ``driver`` says how it runs: ``qmp`` (QEMU started by the lab; ``qmp_path`` is its QMP
    socket) or ``libvirt`` (a transient libvirt domain named :func:`domain_name` with UUID
    ``domain`` on ``connect_uri``; ``qmp_path`` is None: libvirtd owns the monitor). ``pid`` is
    QEMU's. ``qga_path`` is the guest agent's socket (under libvirt, the channel libvirtd
    talks to), None when the VM was started without the guest agent. ``accel`` is the
    accelerator QEMU runs with (``kvm`` or ``tcg``).
    """

    name: str
    pid: int
    running: bool
    qmp_path: Path | None
    qga_path: Path | None
    console_log: Path
    accel: str
    disks: tuple[LabDisk, ...]
    driver: str = "qmp"
    domain: str | None = None
    connect_uri: str | None = None

    @property
    def domain_name(self) -> str | None:
        """The libvirt domain's name (None for a ``qmp`` lab VM)."""
        return domain_name(self.name) if self.driver == "libvirt" else None

    @property
    def agent_address(self) -> str | None:
        """Where :func:`freezeframe.hypervisor.open_agent` reaches its guest agent (None
        without one): the socket path (``qmp``) or ``libvirt:UUID@URI``."""
        if self.qga_path is None:
            return None
        if self.driver == "libvirt":
            return libvirt_agent_address(str(self.domain), str(self.connect_uri))
        return str(self.qga_path)

    def vm_config(self) -> VmConfig:
        """How freezeframe registers this lab VM: its driver's address (sockets, or the libvirt
        connection and domain UUID), agent yes/no, the agent's log file as evidence, policy
        ``preferred``."""
        if self.driver == "libvirt":
            where: dict[str, Any] = {"connect_uri": self.connect_uri, "domain": self.domain}
        else:
            where = {
                "qmp_path": str(self.qmp_path),
                "qga_path": str(self.qga_path) if self.qga_path else None,
            }
        return VmConfig(
            name=self.name,
            driver=self.driver,
            **where,
            agent=self.qga_path is not None,
            quiesce=QuiescePolicy.PREFERRED,
            agent_log_path=GUEST_AGENT_LOG if self.qga_path else None,
            lab=True,
            ceph_conf=next((d.rbd_conf for d in self.disks if d.rbd_conf), None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "driver": self.driver,
            "pid": self.pid,
            "running": self.running,
            "qmp_path": str(self.qmp_path) if self.qmp_path else None,
            "qga_path": str(self.qga_path) if self.qga_path else None,
            "domain": self.domain,
            "domain_name": self.domain_name,
            "connect_uri": self.connect_uri,
            "console_log": str(self.console_log),
            "accel": self.accel,
            "disks": [d.to_json() for d in self.disks],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, running: bool) -> LabVm:
        qmp, qga = doc.get("qmp_path"), doc.get("qga_path")
        driver = str(doc.get("driver") or "qmp")
        if driver not in DRIVERS or (driver == "qmp" and not qmp):
            raise ValueError(f"driver {driver!r} with QMP socket {qmp!r}")
        if driver == "libvirt" and not (doc.get("domain") and doc.get("connect_uri")):
            raise ValueError("a libvirt lab VM without a domain UUID or connection URI")
        return cls(
            name=str(doc["name"]),
            pid=int(doc["pid"]),
            running=running,
            qmp_path=Path(qmp) if qmp else None,
            qga_path=Path(qga) if qga else None,
            console_log=Path(doc["console_log"]),
            accel=str(doc["accel"]),
            disks=tuple(LabDisk.from_json(d) for d in doc["disks"]),
            driver=driver,
            domain=str(doc["domain"]) if doc.get("domain") else None,
            connect_uri=str(doc["connect_uri"]) if doc.get("connect_uri") else None,
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


def validate_driver(driver: str | None) -> str | None:
    """Return ``driver`` if it is None (not chosen), ``qmp`` or ``libvirt``; else UsageError."""
    if driver is not None and driver not in DRIVERS:
        raise UsageError(f"unknown lab driver {driver!r}", hint=f"choose from {', '.join(DRIVERS)}")
    return driver


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
