"""The libvirt hypervisor driver: a domain run by libvirtd, which owns QEMU's monitor and the
guest agent's socket.

Owns everything freezeframe says to libvirt (through libvirt-python, Debian's
``python3-libvirt``): reading the live domain XML (disks with their sources, formats, targets,
serials, PCI addresses and backing chains; the agent channel and whether libvirt sees the agent
connected), the cut (ONE ``virDomainSnapshotCreateXML`` with ``DISK_ONLY | ATOMIC | REUSE_EXT |
NO_METADATA`` on overlays created before the freeze: libvirt switches the disks in one QEMU
``transaction`` and updates the domain's disk sources itself), the live merge of one layer
(``virDomainBlockCommit``, followed through libvirt's block job events, see
:meth:`LibvirtDriver.merge_layer`), and the guest agent through libvirt
(:class:`LibvirtAgent`). It never sends a raw monitor command (libvirt would taint the domain
``custom-monitor``).

libvirt-python blocks: every call runs in a worker thread (:func:`asyncio.to_thread`) inside
this module, and ``libvirtError`` is translated here, once, into
:class:`~freezeframe.errors.HypervisorError` / :class:`~freezeframe.errors.AgentError`
subclasses (the original kept as ``__cause__``).

Agent calls: the freeze, the thaw and the filesystem list use libvirt's typed calls
(``virDomainFSFreeze``, ``virDomainFSThaw``, ``virDomainGetFSInfo``), which taint nothing.
``guest-ping``, ``guest-info``, ``guest-fsfreeze-status``, the pre-flush's ``guest-exec`` and
the evidence's ``guest-file-*`` have no typed call and go through ``qemuAgentCommand``: libvirt
logs the domain as ``tainted: custom-ga-command`` for those (see :attr:`LibvirtAgent.taints`).
libvirt runs one agent job at a time per domain and, by default, may wait a long time for an
agent that does not answer; so before the freeze the domain's agent response timeout
(``virDomainAgentSetResponseTimeout``) is set to the freeze deadline, before a thaw to the
thaw's budget, and back to libvirt's default afterwards; each call is also bounded here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import libvirt
import libvirt_qemu

from freezeframe._aio import shielded, within
from freezeframe._tools import require, run
from freezeframe.agent.base import Agent
from freezeframe.errors import (
    Action,
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
    CutError,
    FreezeframeError,
    HypervisorError,
    HypervisorUnavailableError,
    Remedy,
    UsageError,
)
from freezeframe.hypervisor._files import flushing, local_cut_problem, overlay_path, remove_file
from freezeframe.hypervisor.base import (
    MERGE_FAILED,
    NOT_IN_CHAIN,
    CutState,
    DriverCapabilities,
    DriverCheck,
    DriverPolicy,
    HypervisorDriver,
    LayerMerge,
    MergeOutcome,
    MergeProgress,
    PreparedCut,
    PreparedDisk,
    ProgressCallback,
    locate_layer,
    merged,
)
from freezeframe.models import (
    GUEST_AGENT_PORT,
    AgentInfo,
    DiskInfo,
    ExecResult,
    FsFreezeState,
    GuestDisk,
    GuestFilesystem,
    PciAddress,
    QuiescePolicy,
    RbdSource,
    SnapshotDisk,
    VmConfig,
)

__all__ = [
    "DEFAULT_URI",
    "POLICY_NS",
    "DomainSummary",
    "LibvirtAgent",
    "LibvirtDriver",
    "agent_address",
    "list_domains",
    "parse_agent_address",
    "parse_domain_xml",
    "parse_policy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The connection freezeframe uses when a VM names none (``--connect``).
DEFAULT_URI = "qemu:///system"
#: libvirt 9.0 is what this driver is tested against; older ones lack nothing it uses, but
#: doctor names the version.
TESTED_VERSION = 9_000_000
_SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_ADDRESS = re.compile(r"^libvirt:([0-9a-fA-F-]{36})@(.+)$")
_CUT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)
_TAINTING = (
    "guest-ping",
    "guest-info",
    "guest-fsfreeze-status",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-read",
    "guest-file-seek",
    "guest-file-close",
)
_EXEC_POLL_FIRST = 0.005
_EXEC_POLL_MAX = 0.2


def agent_address(uuid: str, uri: str) -> str:
    """The agent address of domain ``uuid`` on connection ``uri``: ``libvirt:UUID@URI``."""
    return f"libvirt:{uuid}@{uri}"


def parse_agent_address(address: str) -> tuple[str, str]:
    """``(uuid, uri)`` of a ``libvirt:UUID@URI`` address. Raises UsageError when malformed."""
    m = _ADDRESS.match(address)
    if m is None:
        raise UsageError(f"not a libvirt agent address: {address!r} (want libvirt:UUID@URI)")
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- the edge


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default error handler prints every error to stderr; this driver raises
    them as freezeframe errors instead, so nothing is printed."""


libvirt.registerErrorHandler(_quiet, None)


def _code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


def _msg(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


_UNREACHABLE = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_OPERATION_INVALID,  # domain is not running
}


def _hypervisor_error(exc: libvirt.libvirtError, what: str) -> HypervisorError:
    """Translate a libvirtError of a driver call."""
    code = _code(exc)
    text = f"{what}: {_msg(exc)}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return HypervisorUnavailableError(
            text, hint="is the domain defined and running? (`virsh list --all`)"
        )
    if code in _UNREACHABLE:
        return HypervisorUnavailableError(
            text, hint="is libvirtd running, and is the domain running? (`virsh list`)"
        )
    return HypervisorError(text)


def _agent_error(exc: libvirt.libvirtError, what: str) -> AgentError:
    """Translate a libvirtError of an agent call into the AgentError the engine expects."""
    code, msg = _code(exc), _msg(exc)
    text = f"{what}: {msg}"
    low = msg.lower()
    if "not configured" in low:
        return AgentUnavailableError(
            text, hint="add the guest-agent channel to the domain (hw_qemu_guest_agent=yes)"
        )
    if "not connected" in low:
        return AgentUnavailableError(text, hint="install and start qemu-guest-agent in the guest")
    if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID) or code in (
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
    ):
        return AgentUnavailableError(text, hint="is the domain running? (`virsh list`)")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_TIMEOUT):
        return AgentTimeoutError(text)
    if code == libvirt.VIR_ERR_AGENT_UNSYNCED:
        return AgentProtocolError(text)
    # "unable to execute QEMU agent command 'X': <the agent's error>"
    return AgentCommandError(text, command=what, qga_class=_qga_class(msg))


def _qga_class(msg: str) -> str:
    if "has been disabled" in msg or "not found" in msg.lower():
        return "CommandNotFound"
    return "GenericError"


async def _thread(fn: Callable[[], T]) -> T:
    """Run a blocking libvirt call in a worker thread."""
    return await asyncio.to_thread(fn)


def _open(uri: str) -> libvirt.virConnect:
    conn = libvirt.open(uri)
    if conn is None:  # older bindings return None instead of raising
        raise libvirt.libvirtError(f"cannot connect to {uri}")
    return conn


def _lookup(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
    """A domain by UUID, name or numeric id."""
    if re.fullmatch(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", ref):
        return conn.lookupByUUIDString(ref)
    if ref.isdigit():
        with contextlib.suppress(libvirt.libvirtError):
            return conn.lookupByID(int(ref))
    return conn.lookupByName(ref)


# --------------------------------------------------------------------------- block job events

#: How often a merge reads ``virDomainGetBlockJobInfo`` for its progress between events (s).
MERGE_POLL = 0.25
_COMMIT_JOBS = (
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT,
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT,
)
_JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
_events_lock = threading.Lock()
_events_thread: threading.Thread | None = None


def _run_events() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # keep serving the other connections
            log.debug("libvirt event loop: %s", _msg(exc))
            time.sleep(0.1)


def _event_loop() -> None:
    """libvirt's default event loop implementation, registered once per process and run by a
    daemon thread: a connection delivers domain events only when it was opened after that
    (the driver's own connection may predate it, so events get a connection of their own)."""
    global _events_thread
    with _events_lock:
        if _events_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _events_thread = threading.Thread(target=_run_events, name="libvirt-events", daemon=True)
        _events_thread.start()


class _JobEvents:
    """A connection of its own that receives ``VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2`` of one domain
    and disk, handed to the asyncio ``loop`` as status names (``ready``, ``completed``,
    ``failed``, ``cancelled``) in :attr:`queue`. Opened and closed in a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, uri: str, uuid: str, target: str) -> None:
        self.loop = loop
        self.uri = uri
        self.uuid = uuid
        self.target = target
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._conn: libvirt.virConnect | None = None
        self._id: int | None = None

    def _event(self, _c: object, _d: object, disk: str, _t: int, status: int, _o: object) -> None:
        if disk == self.target:
            name = _JOB_STATUS.get(status, str(status))
            self.loop.call_soon_threadsafe(self.queue.put_nowait, name)

    def open(self) -> None:
        _event_loop()
        conn = _open(self.uri)
        try:
            dom = conn.lookupByUUIDString(self.uuid)
            self._id = conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._event, None
            )
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if self._id is not None:
                conn.domainEventDeregisterAny(self._id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# --------------------------------------------------------------------------- the domain XML


def _pci(addr: ET.Element | None) -> PciAddress | None:
    if addr is None or addr.get("type") != "pci":
        return None
    try:
        return PciAddress(
            int(addr.get("domain", "0"), 0),
            int(addr.get("bus", "0"), 0),
            int(addr.get("slot", "0"), 0),
            int(addr.get("function", "0"), 0),
        )
    except ValueError:
        return None


def _source_of(disk: ET.Element) -> str | None:
    """A disk's (or backingStore's) source: file, block device, or ``protocol:name``."""
    src = disk.find("source")
    if src is None:
        return None
    kind = disk.get("type", "file")
    if kind == "file":
        return src.get("file")
    if kind == "block":
        return src.get("dev")
    if kind == "network":
        return f"{src.get('protocol', 'network')}:{src.get('name', '')}"
    if kind == "volume":
        return f"volume:{src.get('pool', '')}/{src.get('volume', '')}"
    return None


def _rbd_source(disk: ET.Element) -> RbdSource | None:
    """The RBD image of a ``<disk type='network'><source protocol='rbd' name='pool/image'>``
    (its ``<config file=...>`` and ``<auth username=...>`` when given; the secret a ``<auth>``
    refers to is never read); None for any other disk."""
    src = disk.find("source")
    if disk.get("type") != "network" or src is None or src.get("protocol") != "rbd":
        return None
    parts = (src.get("name") or "").split("@", 1)[0].split("/")
    if len(parts) not in (2, 3) or not all(parts):
        return None
    config = src.find("config")
    auth = src.find("auth")
    if auth is None:
        auth = disk.find("auth")
    return RbdSource(
        parts[0],
        parts[-1],
        parts[1] if len(parts) == 3 else "",
        conf=config.get("file") if config is not None else None,
        user=auth.get("username") if auth is not None else None,
    )


def _chain(disk: ET.Element) -> tuple[str, ...]:
    out: list[str] = []
    node = disk.find("backingStore")
    while node is not None and node.find("source") is not None:
        src = _source_of(node)
        if src:
            out.append(src)
        node = node.find("backingStore")
    return tuple(out)


def parse_domain_xml(xml: str) -> tuple[list[DiskInfo], ET.Element | None]:
    """The writable disks of a live domain XML and its guest-agent ``<channel>`` (or None).

    CD-ROMs, floppies, read-only and shareable disks and empty drives are left out. A disk's
    ``node`` is libvirt's node name (``libvirt-N-format``) when the XML gives the source's
    index, else its target. ``virtual_size`` is 0 here (see :meth:`LibvirtDriver.disks`).
    Raises HypervisorError when the XML cannot be parsed.
    """
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output, not user input
    except ET.ParseError as exc:
        raise HypervisorError(f"cannot parse the domain XML: {exc}") from exc
    disks: list[DiskInfo] = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") not in ("disk", "lun"):
            continue
        if d.find("readonly") is not None or d.find("shareable") is not None:
            continue
        target = d.find("target")
        src = _source_of(d)
        if target is None or not target.get("dev") or not src:
            continue
        dev = target.get("dev", "")
        drv = d.find("driver")
        fmt = drv.get("type", "raw") if drv is not None else "raw"
        source = d.find("source")
        index = source.get("index") if source is not None else None
        serial = d.findtext("serial")
        rbd = _rbd_source(d)
        disks.append(
            DiskInfo(
                device=dev,
                node=f"libvirt-{index}-format" if index else dev,
                file=rbd.name if rbd is not None else src,
                format=fmt,
                virtual_size=0,
                backing=_chain(d),
                pci=_pci(d.find("address")),
                serial=serial.strip() if serial else None,
                rbd=rbd,
            )
        )
    channel = None
    for ch in root.findall("./devices/channel"):
        t = ch.find("target")
        if t is not None and t.get("type") == "virtio" and t.get("name") == GUEST_AGENT_PORT:
            channel = ch
            break
    return disks, channel


def _disk_sources(xml: str) -> dict[str, str]:
    """target -> the source file (or device / protocol:name) each disk writes to now."""
    disks, _ = parse_domain_xml(xml)
    return {d.device: d.file for d in disks}


#: The namespace of freezeframe's policy element in a domain's ``<metadata>``:
#: ``<ff:policy xmlns:ff="POLICY_NS" agent="yes|no" quiesce="required|preferred|off"
#: freeze-timeout="SECONDS"/>``.
POLICY_NS = "https://freezeframe.dev/xmlns/policy/1"


def parse_policy(xml: str) -> DriverPolicy | None:
    """The ``<policy>`` element of namespace :data:`POLICY_NS` in a domain XML's
    ``<metadata>``, or None. Raises UsageError for an attribute freezeframe cannot accept
    (the operator's XML is wrong: better said than ignored)."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
    except ET.ParseError as exc:
        raise HypervisorError(f"cannot parse the domain XML: {exc}") from exc
    el = root.find(f"./metadata/{{{POLICY_NS}}}policy")
    if el is None:
        return None
    agent = el.get("agent")
    quiesce = el.get("quiesce")
    timeout = el.get("freeze-timeout")
    try:
        return DriverPolicy(
            agent=None if agent is None else {"yes": True, "no": False}[agent],
            quiesce=None if quiesce is None else QuiescePolicy(quiesce),
            freeze_timeout=None if timeout is None else float(timeout),
        )
    except (KeyError, ValueError) as exc:
        raise UsageError(
            f"bad <freezeframe:policy> in the domain's metadata: {ET.tostring(el).decode()}",
            hint="agent='yes|no' quiesce='required|preferred|off' freeze-timeout='SECONDS'",
        ) from exc


@dataclass(frozen=True, slots=True)
class DomainSummary:
    """A domain as ``vm import`` sees it."""

    name: str
    uuid: str
    running: bool
    agent_channel: bool
    policy: DriverPolicy | None
    nova_instance: bool


async def list_domains(uri: str = DEFAULT_URI, ref: str | None = None) -> list[DomainSummary]:
    """Every domain of ``uri`` (running or not; one that vanishes while being read is left
    out), or only ``ref`` (UUID, name or id). Raises
    HypervisorUnavailableError (libvirtd unreachable, no such domain), UsageError (bad
    policy metadata)."""

    def op() -> list[tuple[str, str, bool, str]]:
        conn = _open(uri)
        try:
            doms = [_lookup(conn, ref)] if ref is not None else conn.listAllDomains(0)
            rows = []
            for d in doms:
                try:
                    rows.append((d.name(), d.UUIDString(), bool(d.isActive()), d.XMLDesc(0)))
                except libvirt.libvirtError as exc:
                    # a transient domain that stopped between the list and its reading (on a
                    # busy host instances come and go): not there any more, not an error
                    if ref is not None or _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return rows
        finally:
            conn.close()

    try:
        async with asyncio.timeout(30):
            rows = await _thread(op)
    except libvirt.libvirtError as exc:
        err = _hypervisor_error(exc, f"libvirt at {uri}")
        raise HypervisorUnavailableError(err.message, hint=err.hint) from exc
    except TimeoutError as exc:
        raise HypervisorUnavailableError(f"libvirt at {uri} did not answer in time") from exc
    out = []
    for name, uuid, running, xml in rows:
        _, channel = parse_domain_xml(xml)
        out.append(
            DomainSummary(
                name,
                uuid,
                running,
                channel is not None,
                parse_policy(xml),
                "http://openstack.org/xmlns/libvirt/nova/" in xml,
            )
        )
    return out


# --------------------------------------------------------------------------- the driver


class LibvirtDriver(HypervisorDriver):
    """One running libvirt domain, reached through one libvirt connection.

    ``uri`` is the connection (default ``qemu:///system``); ``domain`` the domain's UUID, name
    or id (the catalog stores the UUID). Every method bounds its libvirt calls by
    ``timeout``; a call libvirt does not answer in time raises HypervisorError (the worker
    thread finishes on its own).
    """

    name = "libvirt"
    capabilities = DriverCapabilities(
        atomic_multi_disk=True,
        prepare_outside_freeze=True,
        agent_channel_check=True,
        pause_resume=True,
    )

    def __init__(
        self,
        domain: str,
        uri: str = DEFAULT_URI,
        *,
        timeout: float = 30.0,
        overlay_dir: str | None = None,
    ) -> None:
        self.domain_ref = domain
        self.uri = uri
        self.timeout = timeout
        #: Where overlays go when a call names no directory (the VM's ``--overlay-dir``);
        #: None: next to each disk's image.
        self.overlay_dir = overlay_dir
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self.uuid: str | None = None
        self.domain_name: str | None = None
        #: The <domainsnapshot> of each prepared cut, built outside the freeze.
        self._cut_xml: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg: VmConfig) -> Self:
        """Raises UsageError when ``cfg`` names no domain."""
        if not cfg.domain:
            raise UsageError(
                f"VM {cfg.name} has no libvirt domain",
                hint="register it again with its libvirt domain",
                code="no-libvirt-domain",
                remedy=Remedy(Action.ADD_VM, cfg.name, {"replace": "yes", "libvirt": "DOMAIN"}),
            )
        return cls(cfg.domain, cfg.connect_uri or DEFAULT_URI, overlay_dir=cfg.overlay_dir)

    @property
    def _label(self) -> str:
        return f"libvirt {self.domain_name or self.domain_ref}"

    async def _call(self, what: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` in a thread within ``timeout``; translate libvirtError."""
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await _thread(fn)
        except libvirt.libvirtError as exc:
            raise _hypervisor_error(exc, what) from exc
        except TimeoutError as exc:
            raise HypervisorError(f"{what}: libvirt did not answer in time") from exc

    def _domain(self) -> libvirt.virDomain:
        if self._dom is None:
            raise HypervisorUnavailableError(f"{self._label}: not connected")
        return self._dom

    async def connect(self) -> None:
        """Open the connection and find the running domain. Raises
        HypervisorUnavailableError (libvirtd unreachable, no such domain, not running)."""
        if self._dom is not None:
            return

        def op() -> tuple[libvirt.virConnect, libvirt.virDomain, bool]:
            conn = _open(self.uri)
            try:
                dom = _lookup(conn, self.domain_ref)
                return conn, dom, bool(dom.isActive())
            except BaseException:
                conn.close()
                raise

        try:
            conn, dom, active = await self._call(f"connect {self.uri}", op)
        except HypervisorError as exc:
            raise HypervisorUnavailableError(exc.message, hint=exc.hint) from exc
        self._conn, self._dom = conn, dom
        self.uuid, self.domain_name = dom.UUIDString(), dom.name()
        if not active:
            await self.close()
            raise HypervisorUnavailableError(
                f"libvirt domain {self.domain_name} is not running",
                hint=f"start it (`virsh start {self.domain_name}`)",
            )

    async def close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.close)

    async def is_gone(self) -> bool:
        """True only when libvirt answers that the domain does not exist or is not running."""

        def op() -> bool:
            conn = _open(self.uri)
            try:
                try:
                    dom = _lookup(conn, self.domain_ref)
                except libvirt.libvirtError as exc:
                    return bool(_code(exc) == libvirt.VIR_ERR_NO_DOMAIN)
                return not bool(dom.isActive())
            finally:
                conn.close()

        try:
            async with asyncio.timeout(10):
                return await _thread(op)
        except (libvirt.libvirtError, TimeoutError):
            return False

    async def _xml(self) -> str:
        dom = self._domain()
        return await self._call("read the domain XML", lambda: str(dom.XMLDesc(0)))

    async def disks(self) -> list[DiskInfo]:
        """The domain's writable disks from its live XML, each with its size
        (``virDomainGetBlockInfo``). Raises HypervisorError."""
        dom = self._domain()
        disks, _ = parse_domain_xml(await self._xml())
        out = []
        for d in disks:
            target = d.device

            def block_info(t: str = target) -> list[int]:
                return [int(x) for x in dom.blockInfo(t)]

            info = await self._call(f"block info {target}", block_info)
            out.append(
                DiskInfo(
                    d.device,
                    d.node,
                    d.file,
                    d.format,
                    int(info[0]),
                    d.backing,
                    d.pci,
                    d.serial,
                    rbd=d.rbd,
                )
            )
        return out

    async def agent_channel(self) -> str | None:
        """The agent channel's host-side socket path (or the port name when it has none);
        None when the domain XML has no ``org.qemu.guest_agent.0`` channel."""
        _, channel = parse_domain_xml(await self._xml())
        if channel is None:
            return None
        src = channel.find("source")
        path = src.get("path") if src is not None else None
        return path or GUEST_AGENT_PORT

    def agent_address(self, cfg: VmConfig, channel: str | None) -> str | None:
        """``libvirt:UUID@URI`` when the domain has an agent channel (libvirt owns its
        socket: nothing else may connect to it)."""
        if channel is None or self.uuid is None:
            return None
        return agent_address(self.uuid, self.uri)

    @classmethod
    def agent_at(cls, address: str, *, timeout: float) -> Agent:
        """A :class:`LibvirtAgent` for a ``libvirt:UUID@URI`` address. Raises UsageError for
        another kind of address."""
        uuid, uri = parse_agent_address(address)
        return LibvirtAgent(uuid, uri, timeout=timeout)

    async def policy(self) -> DriverPolicy | None:
        """The ``<freezeframe:policy>`` of the domain's metadata (see :func:`parse_policy`);
        None when there is none or the XML cannot be read. Raises UsageError for a malformed
        one."""
        try:
            xml = await self._xml()
        except HypervisorError:
            return None
        return parse_policy(xml)

    async def checks(self) -> list[DriverCheck]:
        """libvirt's version, the agent channel as the live XML describes it (and whether
        libvirt sees the agent connected), which agent commands taint the domain, and disks
        the cut cannot take. Never raises."""
        out: list[DriverCheck] = []
        try:
            conn = self._conn
            assert conn is not None
            version = await self._call("libvirt version", conn.getLibVersion)
            xml = await self._xml()
        except (HypervisorError, AssertionError) as exc:
            return [DriverCheck("libvirt", False, str(exc))]
        major, minor = version // 1_000_000, version // 1000 % 1000
        out.append(
            DriverCheck(
                "libvirt",
                True if version >= TESTED_VERSION else None,
                f"libvirt {major}.{minor} at {self.uri}, domain {self.domain_name} ({self.uuid})",
                "" if version >= TESTED_VERSION else "freezeframe is tested with libvirt 9.0",
            )
        )
        _, channel = parse_domain_xml(xml)
        if channel is None:
            out.append(
                DriverCheck(
                    "agent channel",
                    False,
                    "the domain XML has no <channel> with target org.qemu.guest_agent.0",
                    "add <channel type='unix'><target type='virtio' "
                    "name='org.qemu.guest_agent.0'/></channel> (Nova: hw_qemu_guest_agent=yes)",
                )
            )
        else:
            target = channel.find("target")
            state = target.get("state") if target is not None else None
            out.append(
                DriverCheck(
                    "agent channel",
                    state != "disconnected",
                    f"<channel> org.qemu.guest_agent.0 in the domain XML; libvirt sees the agent "
                    f"{state or 'in an unknown state'}",
                    "start qemu-guest-agent in the guest" if state == "disconnected" else "",
                )
            )
            out.append(
                DriverCheck(
                    "libvirt taint",
                    None,
                    "freeze, thaw and the filesystem list use libvirt's typed calls (no taint); "
                    "ping, info, freeze status, the pre-flush (guest-exec sync) and the agent "
                    "log go through qemuAgentCommand, which libvirt logs as "
                    "'tainted: custom-ga-command'; freezeframe never causes custom-monitor",
                )
            )
        return out

    # ------------------------------------------------------------------ the cut

    async def prepare_cut(
        self, snapshot_id: str, disks: list[DiskInfo], overlay_dir: str | None = None
    ) -> PreparedCut:
        """Create ``<image stem>.ff-<snapshot_id>.qcow2`` per disk, backed by its current
        image (libvirt labels and chowns it for QEMU at the cut). Nothing the guest sees
        changes. Raises CutError; on any failure every file created so far is removed."""
        if not _SNAPSHOT_ID.match(snapshot_id):
            raise CutError(f"invalid snapshot id {snapshot_id!r} (letters, digits, - and _)")
        if not disks:
            raise CutError(f"{self._label}: no disks to prepare")
        devices = [d.device for d in disks]
        if len(set(devices)) != len(devices):
            raise CutError(f"{self._label}: a disk is listed twice: {devices}")
        if overlay_dir is None:
            overlay_dir = self.overlay_dir
        problems = [p for d in disks if (p := self.cut_problem(d, overlay_dir)) is not None]
        if problems:
            raise CutError(f"{self._label}: cannot prepare the cut: {'; '.join(problems)}")
        files: list[Path] = []
        prepared: list[PreparedDisk] = []
        try:
            require("qemu-img")
            for disk in disks:
                overlay = overlay_path(disk, snapshot_id, overlay_dir)
                if overlay.exists():
                    raise CutError(f"{self._label}: overlay {overlay} already exists")
                files.append(overlay)
                await run(
                    "qemu-img", "create", "-q", "-f", "qcow2", "-u",
                    "-b", disk.file, "-F", disk.format,
                    str(overlay), str(disk.virtual_size),
                    timeout=self.timeout, what=f"qemu-img create {overlay.name}",
                )  # fmt: skip
                _same_owner(overlay, disk.file)
                prepared.append(PreparedDisk(disk, str(overlay), disk.device, disk.file))
        except BaseException as exc:
            for f in files:
                remove_file(f, self._label)
            if isinstance(exc, CutError) or not isinstance(exc, Exception):
                raise
            hint = exc.hint if isinstance(exc, FreezeframeError) else None
            raise CutError(
                f"{self._label}: preparing the cut failed: {exc or type(exc).__name__}",
                hint=hint,
            ) from exc
        cut = PreparedCut(snapshot_id, tuple(prepared))
        try:
            self._cut_xml[snapshot_id] = self.snapshot_xml(cut, await self._other_disks(cut))
        except BaseException:
            for f in files:
                remove_file(f, self._label)
            raise
        return cut

    def cut_problem(self, disk: DiskInfo, overlay_dir: str | None = None) -> str | None:
        """Only local file images (qcow2 or raw) can get an external overlay here; network
        disks (rbd, iscsi) and block devices cannot. Never raises."""
        if disk.file.startswith(("rbd:", "iscsi:", "nbd:", "gluster:", "volume:")):
            return (
                f"disk {disk.device}: {disk.file} is a network disk: libvirt cannot take a "
                "disk-only external snapshot of it"
            )
        return local_cut_problem(disk, overlay_dir if overlay_dir is not None else self.overlay_dir)

    def snapshot_xml(self, prepared: PreparedCut, others: Sequence[str] = ()) -> str:
        """The ``<domainsnapshot>`` that switches every prepared disk to its overlay and leaves
        the disks named in ``others`` alone."""
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = f"ff-{prepared.snapshot_id}"
        ET.SubElement(root, "description").text = f"freezeframe snapshot {prepared.snapshot_id}"
        disks = ET.SubElement(root, "disks")
        for p in prepared.disks:
            el = ET.SubElement(disks, "disk", name=p.disk.device, snapshot="external", type="file")
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=p.overlay_file)
        for name in others:
            ET.SubElement(disks, "disk", name=name, snapshot="no")
        return ET.tostring(root, encoding="unicode")

    async def cut(self, prepared: PreparedCut) -> None:
        """ONE ``virDomainSnapshotCreateXML(DISK_ONLY|ATOMIC|REUSE_EXT|NO_METADATA)``: libvirt
        adds the overlays and switches every disk in one QEMU transaction (all or nothing),
        updating the domain's disk sources. Disks not prepared are left out (snapshot='no').
        Raises CutError (nothing switched) or HypervisorError (no answer: ask cut_state)."""
        dom = self._domain()
        # Built before the freeze (prepare_cut); rebuilt only for a preparation made elsewhere.
        xml = self._cut_xml.get(prepared.snapshot_id)
        if xml is None:
            xml = self.snapshot_xml(prepared, await self._other_disks(prepared))
        try:
            await _thread(lambda: dom.snapshotCreateXML(xml, _CUT_FLAGS))
        except libvirt.libvirtError as exc:
            err = _hypervisor_error(exc, "snapshotCreateXML")
            if type(err) is HypervisorError:
                raise CutError(err.message) from exc
            raise err from exc

    async def _other_disks(self, prepared: PreparedCut) -> list[str]:
        """The domain's disks that ``prepared`` leaves out (libvirt must be told: 'no')."""
        mine = {p.disk.device for p in prepared.disks}
        disks, _ = parse_domain_xml(await self._xml())
        return [d.device for d in disks if d.device not in mine]

    async def verify_cut(self, prepared: PreparedCut) -> None:
        """Every prepared disk's source in the live XML is its overlay. Raises CutError naming
        the disks that did not switch, HypervisorError when libvirt cannot be asked."""
        sources = _disk_sources(await self._xml())
        wrong = [
            f"{p.disk.device} writes to {sources.get(p.disk.device)!r}"
            for p in prepared.disks
            if sources.get(p.disk.device) != p.overlay_file
        ]
        if wrong:
            raise CutError("not every disk switched: " + "; ".join(wrong))

    async def cut_state(self, prepared: PreparedCut) -> CutState:
        """From the live XML: ``switched`` when every disk writes to its overlay,
        ``not-switched`` when every disk still writes to its image at the cut, else
        ``unknown``. Never raises."""
        try:
            await self.connect()
            sources = _disk_sources(await self._xml())
        except HypervisorError as exc:
            log.warning("%s: cannot tell whether the cut happened: %s", self._label, exc)
            return "unknown"
        now = [sources.get(p.disk.device) for p in prepared.disks]
        if now and all(s == p.overlay_file for s, p in zip(now, prepared.disks, strict=True)):
            return "switched"
        if all(s == p.image_at_cut for s, p in zip(now, prepared.disks, strict=True)):
            return "not-switched"
        return "unknown"

    async def abort(self, prepared: PreparedCut) -> None:
        """Delete the overlay files of a cut that did not happen; a file a disk of the domain
        writes to (or has in its chain) is kept. Without libvirt everything is kept. Never
        raises."""
        if not prepared.disks:
            return
        try:
            await self.connect()
            disks, _ = parse_domain_xml(await self._xml())
        except Exception as exc:
            log.warning(
                "%s: keeping every overlay of %s: cannot ask libvirt: %s",
                self._label,
                prepared.snapshot_id,
                exc,
            )
            return
        in_use = {d.file for d in disks} | {f for d in disks for f in d.backing}
        for p in prepared.disks:
            if p.overlay_file in in_use:
                log.warning(
                    "%s: keeping overlay %s: the domain uses it", self._label, p.overlay_file
                )
                continue
            remove_file(p.overlay_file, self._label)

    def prepared_for(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> PreparedCut:
        """The overlays :meth:`prepare_cut` makes for ``disks`` (without ``overlay_dir``: the
        driver's :attr:`overlay_dir`, else next to each image). Raises CutError for a disk
        whose image is not a local file."""
        return PreparedCut(
            snapshot_id,
            tuple(
                PreparedDisk(
                    d, str(overlay_path(d, snapshot_id, self.overlay_dir)), d.device, d.file
                )
                for d in disks
            ),
        )

    def prepared_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> PreparedCut:
        """The preparation of ``snapshot_id`` from its record. Raises UsageError for a disk
        without an overlay."""
        out = []
        for d in disks:
            if d.overlay is None:
                raise UsageError(f"snapshot {snapshot_id}: disk {d.device} has no overlay")
            info = DiskInfo(d.device, d.node, d.image, d.format, d.virtual_size)
            out.append(PreparedDisk(info, d.overlay, d.device, d.image))
        return PreparedCut(snapshot_id, tuple(out))

    # ------------------------------------------------------------------ live merge

    async def merge_layer(
        self, merge: LayerMerge, progress: ProgressCallback | None = None
    ) -> MergeOutcome:
        """Merge ``merge.top`` into ``merge.base`` with ``virDomainBlockCommit`` (top and base
        by path, bandwidth ``merge.speed`` bytes/s): for the active layer with
        ``VIR_DOMAIN_BLOCK_COMMIT_ACTIVE`` and, once the job is ready,
        ``virDomainBlockJobAbort(PIVOT)`` (libvirt then points the disk's source at ``base``);
        for a layer below it a plain commit (libvirt re-points the layer above).

        Followed through libvirt's block job events (``VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2`` on a
        connection of its own, opened after libvirt's default event loop was registered and
        started in a daemon thread): READY, COMPLETED, FAILED, CANCELED wake the follower; the
        progress (``cur``/``end``) and whether the job still runs come from
        ``virDomainGetBlockJobInfo``, read after each event and every :data:`MERGE_POLL` s.
        libvirt gives no reason for a failed job (the events carry a status only); the chain
        afterwards (the live XML) decides.

        While the job runs, ``base`` is fsync'ed from the host every 0.1 s (as the QMP driver
        does: shorter write stalls for the guest). Idempotent: a commit job on the disk that a
        killed run left is attached to (a ready active one pivoted); ``top`` gone with ``base``
        in the chain: ``already=True``. Cancelling this call leaves the job running in
        libvirt. Raises HypervisorError (``not-in-chain``, ``merge-failed``;
        HypervisorUnavailableError without libvirt).
        """
        start = time.perf_counter_ns()
        dom = self._domain()
        target = merge.device
        events = _JobEvents(asyncio.get_running_loop(), self.uri, str(self.uuid), target)
        await self._call("open a connection for block job events", events.open)
        try:
            info = await self._job_info(target)
            if info is not None:
                if info.get("type") not in _COMMIT_JOBS:
                    raise HypervisorError(
                        f"{self._label}: disk {target} runs another block job "
                        f"(type {info.get('type')}), not a merge",
                        hint="wait for it to end, or abort it (virsh blockjob --abort)",
                        code=MERGE_FAILED,
                    )
                active = info.get("type") == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
                log.info("%s: attaching to the merge job of %s left running", self._label, target)
                async with flushing(merge.base):
                    total = await self._follow_merge(dom, target, active, events, progress)
                if merged(await self._merge_disk(target), merge, active):
                    return MergeOutcome(target, active, False, total, _ms(start))
            disk = await self._merge_disk(target)
            where = locate_layer(disk, merge, self._label)
            if where is None:
                return MergeOutcome(target, disk.file == merge.base, True, 0, _ms(start))
            active = where
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
            if active:
                flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            try:
                await self._call(
                    f"block commit {target}",
                    lambda: dom.blockCommit(target, merge.base, merge.top, merge.speed, flags),
                )
            except HypervisorUnavailableError:
                raise
            except HypervisorError as exc:
                raise HypervisorError(
                    f"{self._label}: disk {target}: libvirt refused to merge {merge.top} into "
                    f"{merge.base}: {exc}",
                    code=MERGE_FAILED,
                ) from exc
            async with flushing(merge.base):
                total = await self._follow_merge(dom, target, active, events, progress)
        finally:
            await asyncio.to_thread(events.close)
        if not merged(await self._merge_disk(target), merge, active):
            raise HypervisorError(
                f"{self._label}: disk {target}: the merge job ended but the running chain "
                f"still holds {merge.top} (or lost {merge.base}): the job failed",
                hint="see the domain's log in /var/log/libvirt/qemu/; the chain is unchanged",
                code=MERGE_FAILED,
            )
        return MergeOutcome(target, active, False, total, _ms(start))

    async def _merge_disk(self, target: str) -> DiskInfo:
        disks, _ = parse_domain_xml(await self._xml())
        for d in disks:
            if d.device == target:
                return d
        raise HypervisorError(f"{self._label}: no disk {target!r}", code=NOT_IN_CHAIN)

    async def _job_info(self, target: str) -> dict[str, int] | None:
        """``virDomainGetBlockJobInfo`` of disk ``target``: None when no job runs."""
        dom = self._domain()
        info = await self._call(f"block job info {target}", lambda: dom.blockJobInfo(target, 0))
        if not isinstance(info, dict) or not info:
            return None
        return {k: int(v) for k, v in info.items()}

    async def _follow_merge(
        self,
        dom: libvirt.virDomain,
        target: str,
        active: bool,
        events: _JobEvents,
        progress: ProgressCallback | None,
    ) -> int:
        """Follow the commit job of ``target`` until it is gone (pivoting an ``active`` one
        once ready); its last total bytes. Raises HypervisorError ``merge-failed`` when an
        event said it failed or was cancelled."""
        last: tuple[int, int] | None = None
        ready = False
        status: str | None = None
        total = 0
        while True:
            info = await self._job_info(target)
            if info is None:
                break
            done, total = info.get("cur", 0), info.get("end", 0)
            if progress is not None and (done, total) != last:
                progress(MergeProgress(target, done, total))
            last = (done, total)
            if active and ready:
                try:
                    await self._call(
                        f"pivot {target}",
                        lambda: dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
                    )
                except HypervisorUnavailableError:
                    raise
                except HypervisorError as exc:  # e.g. not ready after all: look again
                    log.debug("%s: pivot %s: %s", self._label, target, exc)
                    ready = False
                continue
            try:
                got = [await within(events.queue.get(), MERGE_POLL)]
            except TimeoutError:
                got = []
            while not events.queue.empty():
                got.append(events.queue.get_nowait())
            for name in got:
                log.debug("%s: block job event on %s: %s", self._label, target, name)
                status = name
                ready = ready or name == "ready"
            if active and not ready and done == total and total > 0:
                # no event seen (e.g. attached after it was sent): libvirt marks a ready
                # mirror in the live XML
                ready = await self._mirror_ready(target)
        if status in ("failed", "cancelled"):
            raise HypervisorError(
                f"{self._label}: disk {target}: the merge job {status}",
                hint="see the domain's log in /var/log/libvirt/qemu/; the chain is unchanged",
                code=MERGE_FAILED,
            )
        if progress is not None and last is not None and last[0] != last[1]:
            progress(MergeProgress(target, total, total))
        return total

    async def _mirror_ready(self, target: str) -> bool:
        """Whether the live XML marks ``target``'s block job mirror ``ready="yes"``."""
        try:
            root = ET.fromstring(await self._xml())  # noqa: S314 - libvirtd's own output
        except ET.ParseError:
            return False
        for d in root.findall("./devices/disk"):
            t = d.find("target")
            mirror = d.find("mirror")
            if t is not None and t.get("dev") == target and mirror is not None:
                return mirror.get("ready") == "yes"
        return False

    async def run_state(self) -> str | None:
        """``virDomainGetState``: ``running``, ``paused`` (``io-error`` when libvirt paused it
        on an I/O error), ``shutoff``, ...; None when libvirt cannot be asked. Never raises."""
        dom = self._dom
        if dom is None:
            return None
        try:
            state, reason = await self._call("domain state", lambda: list(dom.state())[:2])
        except HypervisorError:
            return None
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return "io-error" if reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR else "paused"
        names = {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
            libvirt.VIR_DOMAIN_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
        }
        return names.get(state, "unknown")

    async def restart_on(self, images: dict[str, str], *, stop_timeout: float = 60.0) -> None:
        """Shut the (persistent) domain down — the agent's or ACPI's clean shutdown, then
        ``virDomainDestroy`` after ``stop_timeout`` s —, redefine its disks' sources
        (:func:`_redefined`) and start it. Raises HypervisorError (``restore-transient-domain``
        before anything changes, ``restore-unknown-disk``, libvirt's errors)."""
        uri, ref = self.uri, self.domain_ref
        await self._call(
            f"restart {self._label}",
            lambda: _restart_on(uri, ref, images, stop_timeout),
            timeout=stop_timeout + 120,
        )

    async def pause(self) -> None:
        """``virDomainSuspend``. Raises HypervisorError."""
        dom = self._domain()
        await self._call("suspend", dom.suspend)

    async def resume(self) -> None:
        """``virDomainResume``. Raises HypervisorError."""
        dom = self._domain()
        await self._call("resume", dom.resume)


def _redefined(xml: str, images: dict[str, str]) -> str:
    """The inactive domain XML ``xml`` with each disk whose target is a key of ``images``
    starting on that image (``<source file>``, ``<driver type='qcow2'>``, its
    ``<backingStore>`` dropped: libvirt reads the chain from the image). Raises
    HypervisorError (``restore-unknown-disk``: a target the domain lacks, or not a file)."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
    seen: set[str] = set()
    for disk in root.iter("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in images or disk.get("device", "disk") != "disk":
            continue
        if disk.get("type") != "file":
            raise HypervisorError(
                f"disk {dev} is a {disk.get('type')} disk, not a file: it cannot be restored "
                "onto a local overlay",
                code="restore-unknown-disk",
            )
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.set("file", images[dev])
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", "qcow2")
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
        seen.add(dev)
    missing = sorted(set(images) - seen)
    if missing:
        raise HypervisorError(
            f"the domain has no file disk {', '.join(missing)}", code="restore-unknown-disk"
        )
    return ET.tostring(root, encoding="unicode")


def _restart_on(uri: str, ref: str, images: dict[str, str], stop_timeout: float) -> None:
    """Blocking part of :meth:`LibvirtDriver.restart_on` (runs in a thread)."""
    conn = _open(uri)
    try:
        dom = _lookup(conn, ref)
        if not dom.isPersistent():
            raise HypervisorError(
                f"libvirt domain {dom.name()} is transient: stopping it would remove it",
                hint="define it (virsh define) to restore it in place",
                code="restore-transient-domain",
            )
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        new = _redefined(str(dom.XMLDesc(flags)), images)  # before the VM is stopped
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdownFlags(
                    libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                    | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
                )
            end = time.monotonic() + stop_timeout
            while dom.isActive() and time.monotonic() < end:
                time.sleep(0.25)
            if dom.isActive():
                log.info(
                    "libvirt %s did not shut down in %gs: destroying it", dom.name(), stop_timeout
                )
                dom.destroy()
        conn.defineXML(new)
        _lookup(conn, ref).create()
    finally:
        conn.close()


def _ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6


def _same_owner(path: Path, like: str) -> None:
    """Give the new overlay its image's owner and mode (libvirt relabels it at the cut; this
    keeps it right when dynamic ownership is off). Best effort."""
    try:
        st = os.stat(like)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, st.st_mode & 0o777)
    except OSError as exc:
        log.debug("cannot copy the owner of %s to %s: %s", like, path, exc)


# --------------------------------------------------------------------------- the agent


class LibvirtAgent(Agent):
    """The guest agent of one libvirt domain, through libvirtd (which owns its socket).

    Typed calls for the freeze, thaw and filesystem list; ``qemuAgentCommand`` for the rest
    (see :attr:`taints`). Every call is bounded by its ``timeout`` and also passes it to
    libvirt, so libvirt's agent job ends about when the call gives up.
    """

    taints = _TAINTING

    def __init__(self, uuid: str, uri: str = DEFAULT_URI, *, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.uuid = uuid
        self.uri = uri
        self.address = agent_address(uuid, uri)
        self.timeout = timeout
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self._lock = asyncio.Lock()
        #: The agent response timeout this client set on the domain (None: libvirt's default).
        self._timeout_set: int | None = None

    async def connect(self, timeout: float | None = None) -> None:
        """Open a libvirt connection and find the domain. Raises AgentUnavailableError."""
        if self._dom is not None:
            return

        def op() -> tuple[libvirt.virConnect, libvirt.virDomain]:
            conn = _open(self.uri)
            try:
                dom = conn.lookupByUUIDString(self.uuid)
                if not dom.isActive():
                    raise libvirt.libvirtError("domain is not running")
                return conn, dom
            except BaseException:
                conn.close()
                raise

        try:
            async with asyncio.timeout(timeout or self.timeout):
                self._conn, self._dom = await _thread(op)
        except libvirt.libvirtError as exc:
            raise AgentUnavailableError(
                f"libvirt domain {self.uuid}: {_msg(exc)}",
                hint="is libvirtd running, and is the domain running? (`virsh list`)",
            ) from exc
        except TimeoutError as exc:
            raise AgentUnavailableError(f"libvirt at {self.uri} did not answer in time") from exc

    async def close(self) -> None:
        """Give the domain libvirt's default agent timeout back (if changed), disconnect.
        Never raises."""
        if self._timeout_set is not None and self._dom is not None:
            await shielded(self._set_agent_timeout(None))
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.close)

    async def _run(self, what: str, fn: Callable[[libvirt.virDomain], T], timeout: float) -> T:
        """One agent call through libvirt, one at a time, within ``timeout``."""
        await self.connect(timeout)
        dom = self._dom
        assert dom is not None
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    return await _thread(lambda: fn(dom))
        except libvirt.libvirtError as exc:
            raise _agent_error(exc, what) from exc
        except TimeoutError as exc:
            raise AgentTimeoutError(f"{what}: no answer within {timeout:g} s") from exc

    async def _command(self, command: str, args: dict[str, object] | None, timeout: float) -> Any:
        """``qemuAgentCommand`` (taints the domain ``custom-ga-command``): the ``return``."""
        doc: dict[str, object] = {"execute": command}
        if args:
            doc["arguments"] = args
        text = json.dumps(doc)
        secs = max(1, math.ceil(timeout))
        raw = await self._run(
            command, lambda dom: libvirt_qemu.qemuAgentCommand(dom, text, secs, 0), timeout
        )
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise AgentProtocolError(f"{command}: the reply is not JSON") from exc
        if not isinstance(reply, dict) or "return" not in reply:
            raise AgentProtocolError(f"{command}: the reply has no 'return'")
        return reply["return"]

    async def _set_agent_timeout(self, seconds: float | None) -> None:
        """Set the domain's agent response timeout (None: libvirt's default). Best effort."""
        value = None if seconds is None else max(1, math.ceil(seconds))
        if value == self._timeout_set:
            return
        raw = libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT if value is None else value
        try:
            await self.connect()
            dom = self._dom
            assert dom is not None
            async with asyncio.timeout(2):
                await _thread(lambda: dom.agentSetResponseTimeout(raw, 0))
            self._timeout_set = value
        except (AgentError, libvirt.libvirtError, TimeoutError) as exc:
            log.debug("libvirt %s: cannot set the agent timeout: %s", self.uuid, exc)

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def ping(self, timeout: float | None = None) -> None:
        await self._command("guest-ping", None, self._t(timeout))

    async def info(self, timeout: float | None = None) -> AgentInfo:
        ret = await self._command("guest-info", None, self._t(timeout))
        if not isinstance(ret, dict):
            raise AgentProtocolError("guest-info: 'return' is not an object")
        cmds: dict[str, bool] = {}
        for c in ret.get("supported_commands") or []:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                cmds[c["name"]] = bool(c.get("enabled", False))
        return AgentInfo(str(ret.get("version", "")), cmds)

    async def get_fsinfo(self, timeout: float | None = None) -> list[GuestFilesystem]:
        """``virDomainGetFSInfo``: each filesystem with the targets (``vda``) of its disks."""
        rows = await self._run("virDomainGetFSInfo", lambda dom: dom.fsInfo(0), self._t(timeout))
        out = []
        for row in rows or []:
            mountpoint, name, fstype, targets = row[0], row[1], row[2], row[3]
            disks = tuple(
                GuestDisk(dev=None, bus_type="", pci=None, target=str(t)) for t in targets or ()
            )
            out.append(GuestFilesystem(str(mountpoint), str(fstype), str(name), disks))
        return out

    async def fsfreeze_status(self, timeout: float | None = None) -> FsFreezeState:
        ret = await self._command("guest-fsfreeze-status", None, self._t(timeout))
        try:
            return FsFreezeState(ret)
        except ValueError as exc:
            raise AgentProtocolError(f"guest-fsfreeze-status: unknown state {ret!r}") from exc

    async def ready_for_freeze(self, deadline: float) -> None:
        """Set the domain's agent response timeout to the freeze deadline now, so that the
        freeze itself costs no extra call and libvirt's agent job ends with the deadline."""
        await self._set_agent_timeout(deadline)

    async def _freeze(self, mountpoints: list[str] | None, timeout: float | None) -> int:
        t = self._t(timeout)
        await self._set_agent_timeout(t)  # a no-op after ready_for_freeze(t)
        return int(
            await self._run("virDomainFSFreeze", lambda dom: dom.fsFreeze(mountpoints, 0), t + 1.0)
        )

    async def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """``virDomainFSFreeze`` of everything; the domain's agent timeout is set to
        ``timeout`` first so libvirt's agent job ends with the deadline."""
        return await self._freeze(None, timeout)

    async def fsfreeze_freeze_list(
        self, mountpoints: Sequence[str], timeout: float | None = None
    ) -> int:
        if isinstance(mountpoints, str):
            raise TypeError("mountpoints must be a sequence of strings, not a string")
        return await self._freeze(list(mountpoints), timeout)

    async def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """``virDomainFSThaw``, bounded by ``timeout`` here. Right after a freeze that answered,
        the agent answers a thaw at once: no extra call to change libvirt's agent timeout is
        made inside the window (:meth:`fsfreeze_thaw_urgent` does, after a hung freeze)."""
        t = self._t(timeout)
        return int(await self._run("virDomainFSThaw", lambda dom: dom.fsThaw(None, 0), t))

    async def fsfreeze_thaw_urgent(self, timeout: float | None = None) -> int | None:
        """Thaw after a freeze that did not answer: libvirt has no queue to put a thaw in, so
        the thaw is retried until ``timeout`` (the freeze's agent job must end first). None
        when no thaw was answered in time."""
        t = self._t(timeout)
        end = time.monotonic() + t
        while True:
            left = end - time.monotonic()
            if left <= 0.05:
                return None
            await self._set_agent_timeout(left)  # libvirt's agent job must end with us
            try:
                return await self.fsfreeze_thaw(timeout=left)
            except (AgentTimeoutError, AgentUnavailableError, AgentProtocolError) as exc:
                log.debug("libvirt %s: urgent thaw: %s", self.uuid, exc)
            await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))

    async def file_read(
        self,
        path: str,
        *,
        max_bytes: int = 1 << 20,
        tail: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """Read a guest file with ``guest-file-*`` (through qemuAgentCommand). Raises
        AgentError when larger than ``max_bytes`` (without ``tail``)."""
        t = self._t(timeout)
        end = time.monotonic() + t

        def left() -> float:
            rest = end - time.monotonic()
            if rest <= 0:
                raise AgentTimeoutError(f"reading {path}: timed out")
            return rest

        handle = await self._command("guest-file-open", {"path": path, "mode": "r"}, left())
        if not isinstance(handle, int):
            raise AgentProtocolError("guest-file-open: the handle is not a number")
        try:
            if tail:
                pos = await self._command(
                    "guest-file-seek", {"handle": handle, "offset": 0, "whence": "end"}, left()
                )
                size = int(pos.get("position", 0)) if isinstance(pos, dict) else 0
                await self._command(
                    "guest-file-seek",
                    {"handle": handle, "offset": max(0, size - max_bytes), "whence": "set"},
                    left(),
                )
            data = bytearray()
            while True:
                want = min(48 << 10, max_bytes + 1 - len(data))
                ret = await self._command(
                    "guest-file-read", {"handle": handle, "count": want}, left()
                )
                if not isinstance(ret, dict):
                    raise AgentProtocolError("guest-file-read: 'return' is not an object")
                chunk = base64.b64decode(str(ret.get("buf-b64", "")))
                data += chunk
                if tail and len(data) >= max_bytes:
                    return bytes(data[:max_bytes])
                if len(data) > max_bytes:
                    raise AgentError(f"guest file {path} is larger than max_bytes={max_bytes}")
                if ret.get("eof") or not chunk:
                    return bytes(data)
        finally:
            with contextlib.suppress(AgentError):
                await shielded(
                    self._command("guest-file-close", {"handle": handle}, max(1.0, _left(end)))
                )

    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        timeout: float | None = None,
        capture: bool = True,
    ) -> ExecResult:
        """``guest-exec`` + ``guest-exec-status`` polls (through qemuAgentCommand)."""
        if isinstance(args, str):
            raise TypeError("args must be a sequence of strings, not a string")
        t = self._t(timeout)
        end = time.monotonic() + t
        ret = await self._command(
            "guest-exec", {"path": path, "arg": list(args), "capture-output": capture}, t
        )
        if not isinstance(ret, dict) or not isinstance(ret.get("pid"), int):
            raise AgentProtocolError("guest-exec: no pid in the reply")
        pid = ret["pid"]
        pause = _EXEC_POLL_FIRST
        while True:
            rest = end - time.monotonic()
            if rest <= 0:
                raise AgentTimeoutError(
                    f"guest-exec {path}: pid {pid} still running after {t:g}s "
                    "(left running in the guest)"
                )
            st = await self._command("guest-exec-status", {"pid": pid}, rest)
            if isinstance(st, dict) and st.get("exited"):
                return ExecResult(
                    exitcode=st.get("exitcode"),
                    signal=st.get("signal"),
                    stdout=base64.b64decode(str(st.get("out-data", ""))),
                    stderr=base64.b64decode(str(st.get("err-data", ""))),
                )
            await asyncio.sleep(max(0.0, min(pause, end - time.monotonic())))
            pause = min(pause * 2, _EXEC_POLL_MAX)


def _left(end: float) -> float:
    """Seconds left until ``end`` (monotonic), at least 0."""
    return max(0.0, end - time.monotonic())
