"""libvirt for the lab: a lab VM run as a transient libvirt domain (``lab up NAME --libvirt``).

The domain (:func:`domain_xml`) is named ``ff-lab-NAME``
(:func:`~freezeframe.lab._model.domain_name`) and boots what the QMP lab boots: the lab's kernel,
initramfs and kernel command line (:func:`~freezeframe.lab._qemu.kernel_cmdline`), its memory and
one vCPU, the qcow2 data disks as virtio disks ``vda``, ``vdb``, ... (serial ``ffdiskN``, the PCI
slots the QMP lab gives them), the serial console in ``console.log`` and, with an agent, the
``org.qemu.guest_agent.0`` channel bound to ``qga.sock`` (libvirtd is its client). Its
``<metadata>`` holds ``<fflab:lab name=... dir=...>`` (namespace :data:`NAMESPACE`): a domain of
that name is this lab VM's only if ``dir`` is its directory (another ``FREEZEFRAME_HOME`` on the
same libvirtd may use the same lab name). Transient: ``destroy`` makes it disappear, and the next
``lab up`` creates it again with the same UUID.

libvirtd runs QEMU as its own user (``user``/``group`` in ``/etc/libvirt/qemu.conf``; Debian:
``libvirt-qemu``) and chowns the files it is given (back when the domain goes): every directory on
the way to them must be traversable by that user (:func:`check_traversable`). The kernel and
initramfs are linked (or copied) into the VM's directory (:func:`boot_files`), so the build cache
may live anywhere and is never chowned.

Whether the domain runs is told from /proc (a QEMU with ``-uuid UUID``, :func:`qemu_pid`), as
for the QMP lab, so ``lab list``/``status`` need no libvirtd. Every libvirt call blocks: each runs
in a thread (:func:`asyncio.to_thread`) on a connection of its own, bounded by a timeout; the
Python binding (``python3-libvirt``) is imported on first use, and ``libvirtError`` is
translated into LabError here. Nothing else of the lab imports ``libvirt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import pwd
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from freezeframe._aio import within
from freezeframe.errors import DependencyError, LabError
from freezeframe.lab import _qemu
from freezeframe.lab._build import BootArtifacts
from freezeframe.lab._model import LabDisk, domain_name
from freezeframe.models import GUEST_AGENT_PORT

__all__ = [
    "NAMESPACE",
    "Domain",
    "boot_files",
    "check_traversable",
    "create",
    "destroy",
    "destroy_now",
    "disk_files",
    "domain_xml",
    "find",
    "qemu_pid",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: XML namespace of the lab's element in a domain's ``<metadata>``.
NAMESPACE = "https://freezeframe.dev/xmlns/lab/1"
_PREFIX = "fflab"
_QEMU_CONF = Path("/etc/libvirt/qemu.conf")
_CONF_RE = re.compile(r'^\s*(user|group)\s*=\s*"([^"]*)"', re.MULTILINE)
#: libvirt's own default QEMU account (``user``/``group`` unset in qemu.conf) on Debian.
_DEFAULT_ACCOUNT = "libvirt-qemu"
#: Seconds a short libvirt call (lookup, XML, destroy) may take.
CALL_TIMEOUT = 30.0
_HINT_START = (
    "start libvirtd: bash scripts/libvirtd.sh start (in a freezeframe checkout), "
    "or virtlogd -d && libvirtd -d"
)


@dataclass(frozen=True, slots=True)
class Domain:
    """A libvirt domain found by a lab VM's domain name: its UUID and the VM directory its
    freezeframe metadata names (None: not a freezeframe lab domain)."""

    uuid: str
    lab_dir: Path | None


# ---------------------------------------------------------------------------- the domain


def _pci(parent: ET.Element, slot: int) -> None:
    ET.SubElement(
        parent, "address", type="pci", domain="0x0000", bus="0x00", slot=f"{slot:#04x}",
        function="0x0",
    )  # fmt: skip


def _target(index: int) -> str:
    return f"vd{chr(ord('a') + index)}"


def domain_xml(
    *,
    name: str,
    uuid: str,
    vmdir: Path,
    accel: str,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    console_log: Path,
    qga_path: Path | None,
    disks: Sequence[LabDisk],
) -> str:
    """The XML of the lab VM ``name``'s transient domain (see the module's docstring)."""
    sub = ET.SubElement
    dom = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    sub(dom, "name").text = domain_name(name)
    sub(dom, "uuid").text = uuid
    # Prefixed by hand: ElementTree would declare the namespace on <domain> as "ns0".
    sub(sub(dom, "metadata"), f"{_PREFIX}:lab", {f"xmlns:{_PREFIX}": NAMESPACE}, name=name,
        dir=str(vmdir))  # fmt: skip
    sub(dom, "memory", unit="MiB").text = str(_qemu.MEMORY_MB)
    sub(dom, "vcpu").text = "1"
    os_ = sub(dom, "os")
    sub(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    sub(os_, "kernel").text = str(kernel)
    sub(os_, "initrd").text = str(initrd)
    sub(os_, "cmdline").text = cmdline
    sub(sub(dom, "features"), "acpi")
    if accel == "tcg":
        sub(dom, "cpu", mode="maximum", migratable="off")  # QEMU's -cpu max; never host
    sub(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        sub(dom, event).text = "destroy"
    devices = sub(dom, "devices")
    sub(devices, "controller", type="usb", model="none")
    for i, disk in enumerate(disks):
        if disk.rbd is not None:  # lab up --rbd: the lab Ceph's monitor, auth none
            elem = sub(devices, "disk", type="network", device="disk")
            sub(elem, "driver", name="qemu", type="raw", cache="none")
            src = sub(elem, "source", protocol="rbd", name=disk.rbd)
            host, _, port = (disk.rbd_mon or "127.0.0.1:6789").rpartition(":")
            sub(src, "host", name=host, port=port)
        else:
            elem = sub(devices, "disk", type="file", device="disk")
            sub(elem, "driver", name="qemu", type=disk.format, cache="none")
            sub(elem, "source", file=str(disk.file))
        sub(elem, "target", dev=_target(i), bus="virtio")
        sub(elem, "serial").text = disk.serial
        _pci(elem, _qemu.DISK_SLOT0 + i)
    if qga_path is not None:
        _pci(sub(devices, "controller", type="virtio-serial", index="0"), _qemu.SERIAL_SLOT)
        channel = sub(devices, "channel", type="unix")
        sub(channel, "source", mode="bind", path=str(qga_path))
        sub(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
    serial = sub(devices, "serial", type="file")
    sub(serial, "source", path=str(console_log))
    sub(serial, "target", port="0")
    sub(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _parse(xml: str) -> ET.Element:
    """Parse XML that libvirtd returned (trusted: the host's own daemon)."""
    try:
        return ET.fromstring(xml)  # noqa: S314 - libvirtd's own output, not untrusted input
    except ET.ParseError as exc:
        raise LabError(f"libvirt returned XML that does not parse: {exc}") from exc


def boot_files(artifacts: BootArtifacts, vmdir: Path) -> tuple[Path, Path]:
    """The kernel and initramfs as files of ``vmdir`` (hard links to the build cache, copies
    when it is on another filesystem), replaced when the cache's differ. libvirtd chowns the
    files it boots: the cache's own files are never given to it."""
    out = []
    for src, dest in ((artifacts.kernel, vmdir / "kernel"), (artifacts.initrd, vmdir / "initrd")):
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(src, dest) or (
                dest.stat().st_size == src.stat().st_size
                and dest.stat().st_mtime_ns == src.stat().st_mtime_ns
            ):
                out.append(dest)
                continue
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
        out.append(dest)
    return out[0], out[1]


# ---------------------------------------------------------------------------- permissions


def _account_id(value: str, db: Callable[[str], Any], kind: str) -> tuple[str, int] | None:
    """``+N`` -> N; a name -> its id (libvirt also takes a number that is not a name)."""
    if value.startswith("+") and value[1:].isdigit():
        return value, int(value[1:])
    with contextlib.suppress(KeyError):
        entry = db(value)
        return value, int(entry.pw_uid if kind == "user" else entry.gr_gid)
    return (value, int(value)) if value.isdigit() else None


def qemu_account() -> tuple[str, int, frozenset[int]] | None:
    """The account libvirtd runs QEMU as: a description, its UID and its group IDs (primary
    and supplementary), from ``/etc/libvirt/qemu.conf``; None if it does not exist here."""
    conf: dict[str, str] = {}
    with contextlib.suppress(OSError):
        conf = dict(_CONF_RE.findall(_QEMU_CONF.read_text()))
    user = _account_id(conf.get("user", _DEFAULT_ACCOUNT), pwd.getpwnam, "user")
    group = _account_id(conf.get("group", _DEFAULT_ACCOUNT), grp.getgrnam, "group")
    if user is None or group is None:
        return None
    gids = {group[1]}
    with contextlib.suppress(KeyError):
        name = pwd.getpwuid(user[1]).pw_name
        gids.update(os.getgrouplist(name, group[1]))
    return f"{user[0]}:{group[0]}", user[1], frozenset(gids)


def _traversable(st: os.stat_result, uid: int, gids: frozenset[int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_traversable(path: Path) -> None:
    """Raise LabError naming the first directory on the way to ``path`` (itself included, as
    far as it exists) that libvirt's QEMU account cannot traverse (mode bits; ACLs are not
    read). Does nothing when that account is not known here."""
    account = qemu_account()
    if account is None:
        log.debug("lab: libvirt's QEMU account is unknown here: not checking %s", path)
        return
    who, uid, gids = account
    real = Path(os.path.realpath(path))
    for directory in [*reversed(real.parents), real]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return  # what is not there yet is made 0755
        if not _traversable(st, uid, gids):
            raise LabError(
                f"{directory} is not traversable by {who}, the account libvirt runs QEMU as "
                f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}): QEMU "
                f"could not open the lab VM's files under {path}",
                hint=f"chmod o+x {directory}, or set FREEZEFRAME_HOME to a directory every "
                "parent of which others may traverse (e.g. /var/lib/freezeframe)",
            )


# ---------------------------------------------------------------------------- /proc


def qemu_pid(uuid: str, hint: int = 0) -> int | None:
    """The PID of the live QEMU running the domain ``uuid`` (``-uuid UUID`` on its command
    line), or None; ``hint``, the PID it had, is checked first."""

    def runs(pid: int) -> bool:
        argv = _qemu.proc_argv(pid)
        if not argv or not _qemu.is_qemu(argv):
            return False
        return any(a == "-uuid" and b == uuid for a, b in itertools.pairwise(argv))

    if hint > 0 and runs(hint):
        return hint
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and runs(int(entry.name)):
            return int(entry.name)
    return None


# ---------------------------------------------------------------------------- libvirt calls


def _binding() -> ModuleType:
    """The ``libvirt`` module, its default error printer (to stderr) silenced."""
    try:
        import libvirt  # optional: imported on first use
    except ModuleNotFoundError as exc:
        raise DependencyError(
            "lab VMs under libvirt need the Python module 'libvirt'", package="python3-libvirt"
        ) from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc)


@contextlib.contextmanager
def _connection(uri: str) -> Iterator[Any]:
    lv = _binding()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise LabError(
            f"cannot connect to libvirt at {uri}: {_message(exc)}", hint=_HINT_START
        ) from exc
    try:
        yield conn
    finally:
        with contextlib.suppress(lv.libvirtError):
            conn.close()


def _call(what: str, uri: str, fn: Callable[[Any, ModuleType], T]) -> T:
    """``fn(connection, libvirt)`` on a fresh connection to ``uri``; blocking. A libvirtError
    becomes LabError('``what``: ...')."""
    lv = _binding()
    with _connection(uri) as conn:
        try:
            return fn(conn, lv)
        except lv.libvirtError as exc:
            raise LabError(f"{what}: {_message(exc)}") from exc


async def _call_async(
    what: str, uri: str, fn: Callable[[Any, ModuleType], T], timeout: float = CALL_TIMEOUT
) -> T:
    """:func:`_call` in a thread, bounded by ``timeout`` (the thread itself cannot be
    stopped: libvirt finishes the call in the background)."""
    try:
        return await within(asyncio.to_thread(_call, what, uri, fn), timeout)
    except TimeoutError as exc:
        raise LabError(f"{what}: libvirtd did not answer within {timeout:g}s") from exc


def _no_domain(lv: ModuleType, exc: Exception) -> bool:
    code = exc.get_error_code() if isinstance(exc, lv.libvirtError) else None
    return bool(code == lv.VIR_ERR_NO_DOMAIN)


def _lookup(lv: ModuleType, by: Callable[[], Any]) -> Any | None:
    """``by()`` (a domain lookup), None when there is no such domain."""
    try:
        return by()
    except lv.libvirtError as exc:
        if _no_domain(lv, exc):
            return None
        raise


async def find(name: str, uri: str) -> Domain | None:
    """The domain named after the lab VM ``name``, or None. Raises LabError (libvirtd
    unreachable or failing), DependencyError (no Python binding)."""

    def work(conn: Any, lv: ModuleType) -> Domain | None:
        dom = _lookup(lv, lambda: conn.lookupByName(domain_name(name)))
        if dom is None:
            return None
        try:
            meta = _parse(dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0))
            lab_dir = meta.get("dir")
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN_METADATA:
                raise
            lab_dir = None
        return Domain(uuid=str(dom.UUIDString()), lab_dir=Path(lab_dir) if lab_dir else None)

    return await _call_async(f"libvirt: looking up domain {domain_name(name)}", uri, work)


async def create(xml: str, uri: str, timeout: float) -> None:
    """Create and start the transient domain ``xml`` describes (``virDomainCreateXML``),
    within ``timeout`` seconds. Raises LabError with libvirt's reason."""
    await _call_async(
        "libvirt could not start the lab VM", uri, lambda conn, _lv: conn.createXML(xml, 0), timeout
    )


async def disk_files(uuid: str, uri: str) -> dict[str, str]:
    """The running domain's disks: serial -> the file on top of the disk now (its live XML's
    ``<source file>``; a snapshot moves a disk to a new overlay). Raises LabError."""

    def work(conn: Any, lv: ModuleType) -> str:
        dom = _lookup(lv, lambda: conn.lookupByUUIDString(uuid))
        if dom is None:
            raise LabError(f"libvirt: no domain with UUID {uuid}")
        return str(dom.XMLDesc(0))

    root = _parse(await _call_async(f"libvirt: reading domain {uuid}", uri, work))
    out: dict[str, str] = {}
    for disk in root.iterfind("./devices/disk[@device='disk']"):
        source = disk.find("source")
        file = source.get("file") if source is not None else None
        serial = disk.findtext("serial")
        if serial and file:
            out[serial] = file
    return out


def _destroyer(uuid: str) -> Callable[[Any, ModuleType], str]:
    def work(conn: Any, lv: ModuleType) -> str:
        dom = _lookup(lv, lambda: conn.lookupByUUIDString(uuid))
        if dom is None:
            return "gone"
        try:
            dom.destroy()
        except lv.libvirtError as exc:
            if _no_domain(lv, exc) or exc.get_error_code() == lv.VIR_ERR_OPERATION_INVALID:
                return "gone"  # went meanwhile
            raise
        return "destroyed"

    return work


async def destroy(uuid: str, uri: str) -> str:
    """Stop the domain ``uuid`` at once (``virDomainDestroy``: SIGTERM, then SIGKILL; a
    transient domain then disappears). Returns ``destroyed`` or ``gone`` (it was not there).
    Raises LabError."""
    return await _call_async(f"libvirt could not destroy domain {uuid}", uri, _destroyer(uuid))


def destroy_now(uuid: str, uri: str) -> None:
    """:func:`destroy`, synchronously, for failure and cancellation paths; never raises."""
    try:
        how = _call(f"libvirt could not destroy domain {uuid}", uri, _destroyer(uuid))
        log.info("lab: domain %s %s", uuid, how)
    except (LabError, DependencyError) as exc:
        log.error("lab: could not destroy domain %s: %s", uuid, exc)
