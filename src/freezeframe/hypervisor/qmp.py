"""The QMP hypervisor driver: one QEMU process, reached through its QMP unix socket.

Owns everything freezeframe says to QEMU over QMP (via :mod:`qemu.qmp`): listing the VM's
writable disks (``query-block``, ``query-pci``, ``qom-get``), finding the guest-agent port
(``qom-list``/``qom-get``/``query-chardev``), preparing external qcow2 overlays before the
freeze (``qemu-img create`` + ``blockdev-add``), the atomic cut (ONE ``transaction`` of
``blockdev-snapshot`` actions), finding out afterwards whether a cut whose reply was lost
happened (``query-block``), undoing a preparation (``blockdev-del`` + file removal),
the live merge of one layer (``block-commit`` followed through QMP events, see
:meth:`QmpDriver.merge_layer`) and ``stop``/``cont``.

Errors of the layers underneath (``QMPError``, ``ExecuteError``, ``ConnectError``,
``OSError``, a timeout) are translated here, once, into :class:`~freezeframe.errors.HypervisorError`
and its subclasses, keeping the original as ``__cause__``. Every QMP command is bounded by the
driver's ``timeout``; a caller may also cancel any call (e.g. ``asyncio.timeout`` around
:meth:`QmpDriver.cut`): the connection stays usable, a reply that arrives late is dropped.

One client at a time: a QEMU QMP socket started as ``-qmp unix:PATH,server=on,wait=off``
serves ONE client; a second client's ``connect()`` is accepted by the kernel but never gets a
greeting until the first disconnects; neither does a socket that is no QMP monitor (e.g. the
guest agent's). :meth:`QmpDriver.connect` therefore waits only ``greeting_timeout`` (a few
seconds: QEMU greets at once) and raises :class:`~freezeframe.errors.HypervisorUnavailableError`
saying so. Give QEMU a second ``-qmp`` (or a ``-chardev socket ... -mon chardev=...``) if another
tool must stay connected.

The :mod:`qemu.qmp` library logs its own errors (e.g. "Failed to establish session:
CancelledError") before raising them; this driver translates every one of them into an error of
ours, so each client gets a logger that passes those records on at DEBUG level only (see
:class:`_LibraryLog`): an operator sees them at ``-v``, never as raw lines on a normal run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    Runstate,
)
from qemu.qmp.message import Message
from qemu.qmp.protocol import StateError

from freezeframe._aio import shielded, within
from freezeframe._tools import require, run
from freezeframe.errors import (
    CutError,
    FreezeframeError,
    HypervisorError,
    HypervisorUnavailableError,
    UsageError,
)
from freezeframe.hypervisor._files import (
    HostProcess,
    apply_image_access,
    flushing,
    local_cut_problem,
    read_process,
    security_modules,
    unreachable_for,
)
from freezeframe.hypervisor._files import overlay_path as _overlay_path
from freezeframe.hypervisor._files import remove_file as _remove_file
from freezeframe.hypervisor.base import (
    MERGE_FAILED,
    NOT_IN_CHAIN,
    CutState,
    DriverCapabilities,
    DriverCheck,
    HypervisorDriver,
    LayerMerge,
    MergeOutcome,
    MergeProgress,
    PreparedCut,
    PreparedDisk,
    locate_layer,
    merged,
)
from freezeframe.models import (
    GUEST_AGENT_PORT,
    DiskInfo,
    PciAddress,
    RbdSource,
    SnapshotDisk,
    VmConfig,
)

__all__ = [
    "GUEST_AGENT_PORT",
    "OVERLAY_DIR_UNREACHABLE",
    "OVERLAY_OPEN_REFUSED",
    "CmdlineBlockOptions",
    "OverlaySettings",
    "QemuStoppedError",
    "QmpCommandError",
    "QmpDriver",
    "chardev_unix_path",
    "merge_job_id",
    "overlay_node_name",
    "overlay_settings",
    "rbd_source",
    "real_file",
]

log = logging.getLogger(__name__)


_SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")  # QEMU: < 32 chars, id_wellformed
#: What QEMU appends to a unix socket chardev's ``query-chardev`` filename (7.2: ``,server=on``
#: when it listens; before 6.0: ``,server``).
_CHARDEV_SUFFIXES = (",server=on", ",server")
#: CutError codes: QEMU's user may not search the overlay directory (found before anything is
#: created); QEMU refused to open a prepared overlay (``blockdev-add``).
OVERLAY_DIR_UNREACHABLE = "overlay-dir-unreachable"
OVERLAY_OPEN_REFUSED = "overlay-open-refused"
_START_HINT = "start QEMU with -qmp unix:PATH,server=on,wait=off and pass that PATH"
#: How long :meth:`QmpDriver.connect` waits for QEMU's greeting. QEMU sends it as soon as it
#: accepts a client, so a short wait tells a busy or wrong socket apart promptly.
GREETING_TIMEOUT = 3.0
_ONE_CLIENT_HINT = (
    "a QEMU QMP socket serves one client at a time: is another client (libvirt, another "
    "freezeframe, qmp-shell) connected? Otherwise the socket is not a QMP monitor"
)


class _LibraryLog(logging.LoggerAdapter[logging.Logger]):
    """The logger given to each :class:`QMPClient`: every record, whatever its level, goes on at
    DEBUG under the library's own logger name.

    Why this and not a global setting: the library logs an error and then raises it, and the
    driver turns each such exception into a HypervisorError the caller reports, so at ERROR the
    same failure would reach the operator twice, once as a raw ``CancelledError`` line. A
    library must not configure logging for the application (setting the level of the
    ``qemu.qmp`` logger, or adding a filter to it, would also change what other users of
    qemu.qmp in the same process see); giving our own client instances a logger of ours only
    changes the records of connections this driver owns. At ``-v`` (DEBUG) they still show.
    """

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


def _new_client(name: str) -> QMPClient:
    client = QMPClient(name or None)
    # QMPClient only ever calls debug/info/warning/error/critical/log on ``logger``, which a
    # LoggerAdapter provides; the attribute is typed as Logger, hence the ignore.
    client.logger = _LibraryLog(client.logger, {})  # type: ignore[assignment]
    return client


class QmpCommandError(HypervisorError):
    """QEMU answered a QMP command with an error object.

    ``command`` is the QMP command, ``qmp_class`` the error's ``class`` (e.g.
    ``GenericError``, ``DeviceNotFound``).
    """

    default_code = "qmp-command-failed"

    def __init__(
        self, message: str, *, command: str, qmp_class: str, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.command = command
        self.qmp_class = qmp_class


class QemuStoppedError(HypervisorUnavailableError):
    """The QEMU process behind the QMP socket is stopped (SIGSTOP, or held by a debugger): it
    runs no code, so it can neither greet nor answer. ``pid`` is that process, ``state`` its
    state letter in ``/proc/PID/stat`` (``T`` or ``t``). The hint says how to continue it."""

    default_code = "qemu-stopped"

    def __init__(self, message: str, *, pid: int, state: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or f"continue it (kill -CONT {pid}) and retry")
        self.pid = pid
        self.state = state


def overlay_node_name(snapshot_id: str, device: str) -> str:
    """The QEMU node name of ``device``'s overlay for ``snapshot_id``.

    ``ff-<id>-<device>`` when that is a valid node name (letters, digits, ``-._``, at most 31
    characters), else ``ff-`` and a 16-hex-digit hash of both.
    """
    dev = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
    name = f"ff-{snapshot_id}-{dev}"
    if _NODE_NAME.match(name):
        return name
    digest = hashlib.blake2s(f"{snapshot_id}\0{device}".encode(), digest_size=8).hexdigest()
    return f"ff-{digest}"


def merge_job_id(device: str) -> str:
    """The QEMU job id of the live merge of ``device``: ``ff-merge-<device>`` when that is a
    valid id (letters, digits, ``-._``, at most 31 characters), else ``ff-merge-`` and a
    12-hex-digit hash. Deterministic, so that a later run finds a job a killed one left."""
    dev = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
    name = f"ff-merge-{dev}"
    if _NODE_NAME.match(name):
        return name
    return f"ff-merge-{hashlib.blake2s(device.encode(), digest_size=6).hexdigest()}"


#: The QMP events a merge is followed by (each wakes the follower, which then asks
#: ``query-jobs``); the job's progress is read by ``query-jobs`` every :data:`MERGE_POLL` s.
MERGE_EVENTS = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_CANCELLED",
)
MERGE_POLL = 0.25
#: Block drivers that are filters (never the format node of a layer).
_FILTERS = frozenset(
    {"throttle", "copy-on-read", "preallocate", "compress", "commit_top", "mirror_top",
     "blkdebug", "blkverify", "blklogwrites", "snapshot-access", "copy-before-write"}
)  # fmt: skip


def _event_job(event: Message) -> str | None:
    """The job id a job event is about (``data.id``, or ``data.device`` for BLOCK_JOB_*)."""
    data = event.get("data")
    if not isinstance(data, dict):
        return None
    job = data.get("id", data.get("device"))
    return job if isinstance(job, str) else None


# ------------------------------------------------------------------ narrowing QMP replies


def _dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise HypervisorError(f"unexpected QMP reply: {what} is not an object")
    return value


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise HypervisorError(f"unexpected QMP reply: {what} is not a list")
    return value


def _str(obj: dict[str, object], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise HypervisorError(f"unexpected QMP reply: {what}.{key} is not a string")
    return value


def _int(obj: dict[str, object], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HypervisorError(f"unexpected QMP reply: {what}.{key} is not an integer")
    return value


def _qdev_root(qdev: str) -> str:
    """The QOM path of the frontend device of a block backend's ``qdev``: ``query-block`` gives
    the device's id when it has one (``scsi0-0-0-1`` for ``-device scsi-hd,id=scsi0-0-0-1``)
    and its QOM path otherwise (virtio's ``/virtio-backend`` child belongs to the PCI proxy
    device above it)."""
    if not qdev.startswith("/"):
        return f"/machine/peripheral/{qdev}"
    return qdev.removesuffix("/virtio-backend")


def chardev_unix_path(filename: str) -> str | None:
    """The socket path of a unix socket chardev from its ``query-chardev`` ``filename``
    (``[disconnected:]unix:PATH[,server=on]``); None for any other kind of chardev.

    QEMU 7.2 writes PATH as it is (a comma or a space in it stays as it is); a QEMU that
    doubles a comma (``,,``, its option syntax) is understood too: when only the unescaped
    name exists on this host, that one is returned.
    """
    rest = filename.removeprefix("disconnected:")
    if not rest.startswith("unix:"):
        return None
    path = rest.removeprefix("unix:")
    for suffix in _CHARDEV_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if ",," in path:
        unescaped = path.replace(",,", ",")
        if not _exists(path) and _exists(unescaped):
            return unescaped
    return path or None


#: Block drivers that are a file of this host's (the protocol node under a format node).
_LOCAL_PROTOCOLS = frozenset({"file", "host_device", "host_cdrom"})


def real_file(name: str) -> str:
    """The file a QEMU image name stands for: ``name`` itself, or for ``json:{...}`` (what QEMU
    names an image opened with an explicit backing node, or options its header does not hold)
    the ``filename`` of its protocol child, followed down ``file`` children (filters included).
    ``name`` unchanged when no local file can be told (a network image)."""
    if not name.startswith("json:"):
        return name
    try:
        spec = json.loads(name.removeprefix("json:"))
    except ValueError:
        return name
    found = _spec_file(spec, 0)
    return found if found is not None else name


def rbd_source(name: str) -> RbdSource | None:
    """The Ceph RBD image a QEMU image name opens (``json:{"driver": "rbd", "pool": ...,
    "image": ..., "conf": ..., "user": ...}``, also below a format node's ``file``, or the
    legacy ``rbd:pool/image[@snap][:opt=val...]``); None for anything else. A key in the name
    is never taken."""
    if name.startswith("rbd:"):
        head = name.removeprefix("rbd:").split(":", 1)
        opts = dict(
            kv.split("=", 1) for kv in (head[1].split(":") if len(head) > 1 else ()) if "=" in kv
        )
        parts = head[0].split("@", 1)[0].split("/")
        if len(parts) not in (2, 3) or not all(parts):
            return None
        return RbdSource(
            parts[0], parts[-1], parts[1] if len(parts) == 3 else "",
            conf=opts.get("conf"), user=opts.get("id"),
        )  # fmt: skip
    if not name.startswith("json:"):
        return None
    try:
        spec: object = json.loads(name.removeprefix("json:"))
    except ValueError:
        return None
    for _ in range(8):
        if not isinstance(spec, dict):
            return None
        if spec.get("driver") == "rbd":
            pool, image = spec.get("pool"), spec.get("image")
            if not isinstance(pool, str) or not isinstance(image, str):
                return None
            ns, conf, user = spec.get("namespace"), spec.get("conf"), spec.get("user")
            return RbdSource(
                pool,
                image,
                ns if isinstance(ns, str) else "",
                conf=conf if isinstance(conf, str) else None,
                user=user if isinstance(user, str) else None,
            )
        if spec.get("file.driver") == "rbd":
            spec = {k.removeprefix("file."): v for k, v in spec.items() if k.startswith("file.")}
            continue
        spec = spec.get("file")
    return None


def _spec_file(spec: object, depth: int) -> str | None:
    if not isinstance(spec, dict) or depth > 8:
        return None
    driver, filename = spec.get("driver"), spec.get("filename")
    if driver in _LOCAL_PROTOCOLS and isinstance(filename, str):
        return filename
    dotted = spec.get("file.filename")
    if isinstance(dotted, str) and spec.get("file.driver", "file") in _LOCAL_PROTOCOLS:
        return dotted
    child = spec.get("file")
    if isinstance(child, str):
        return real_file(child) if child.startswith("/") or child.startswith("json:") else None
    return _spec_file(child, depth + 1)


def _peripheral_id(path: str) -> str | None:
    """``disk0`` for ``/machine/peripheral/disk0``; None for anonymous devices."""
    prefix = "/machine/peripheral/"
    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
        return path[len(prefix) :] or None
    return None


def _collect_pci(buses: list[object], into: dict[str, PciAddress]) -> None:
    for bus_obj in buses:
        bus = _dict(bus_obj, "query-pci bus")
        for dev_obj in _list(bus.get("devices", []), "query-pci devices"):
            dev = _dict(dev_obj, "query-pci device")
            qdev_id = dev.get("qdev_id")
            if isinstance(qdev_id, str) and qdev_id:
                into[qdev_id] = PciAddress(
                    domain=0,
                    bus=_int(dev, "bus", "query-pci device"),
                    slot=_int(dev, "slot", "query-pci device"),
                    function=_int(dev, "function", "query-pci device"),
                )
            bridge = dev.get("pci_bridge")
            if isinstance(bridge, dict):
                sub = bridge.get("devices")
                if isinstance(sub, list):
                    _collect_pci([{"devices": sub}], into)


#: ``/proc/net/unix`` flag of a listening socket (``__SO_ACCEPTCON``).
_ACCEPTCON = 0x10000
#: Process states (``/proc/PID/stat``) in which a process runs no code at all.
_STOPPED_STATES = {"T": "stopped (SIGSTOP)", "t": "stopped by a debugger (tracing stop)"}


def _listening_inodes(path: str) -> set[int]:
    """The socket inodes of the unix sockets listening on ``path`` (``/proc/net/unix``, this
    network namespace). A socket bound under a relative name is matched by that name only."""
    names = {path, os.path.abspath(path), os.path.realpath(path)}
    inodes: set[int] = set()
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces)
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[7] in names and int(fields[3], 16) & _ACCEPTCON:
            inodes.add(int(fields[6]))
    return inodes


def _socket_holders(inodes: set[int]) -> list[int]:
    """The PIDs of the processes that hold one of the socket ``inodes`` open (``/proc/*/fd``;
    processes whose descriptors this user may not read are skipped)."""
    links = {f"socket:[{inode}]" for inode in inodes}
    pids: list[int] = []
    if not links:
        return pids
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") in links for fd in fds):
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return sorted(pids)


def _peer_pid(path: str) -> int | None:
    """The PID of the listener on ``path`` by SO_PEERCRED: the kernel names it even when it
    does not accept, as long as its listen backlog still has room (else connect fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.close()
    pid = int(struct.unpack("3i", creds)[0])
    return pid if pid > 0 else None


def _process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` ...), None when it is gone."""
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return proc_stat[proc_stat.rindex(")") + 2 :].split(maxsplit=1)[0]


def _stopped_listener(path: str) -> tuple[int, str] | None:
    """``(pid, state letter)`` of the process listening on unix socket ``path`` when it is
    stopped (state ``T``: SIGSTOP; ``t``: a debugger), else None. Never raises.

    Works whatever a connect to it returned. Found first from ``/proc`` (the listening socket's
    inode in ``/proc/net/unix``, the process holding it in ``/proc/*/fd``), which needs no
    connection: a stopped QEMU accepts nothing, so its listen backlog fills after a couple of
    connects and every later connect fails (EAGAIN, or EINVAL from asyncio), with no peer to ask.
    Only when ``/proc`` names no holder (another user's process, a relative bind name): a
    connect and SO_PEERCRED. With several holders (an inherited descriptor) all must be
    stopped, since any of them could accept.
    """
    try:
        pids = _socket_holders(_listening_inodes(path))
        if not pids:
            peer = _peer_pid(path)
            pids = [peer] if peer is not None else []
        states = [(pid, _process_state(pid)) for pid in pids]
    except (OSError, ValueError):  # /proc unreadable, or a line of it not as documented
        return None
    stopped = [
        (pid, state) for pid, state in states if state is not None and state in _STOPPED_STATES
    ]
    if not stopped or len(stopped) != len(states):
        return None
    return stopped[0]


def _socket_dead(path: str) -> bool:
    """True when nothing can ever answer on unix socket ``path``: missing or refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return False


def _exists(path: str | Path) -> bool:
    return os.path.exists(path)


def _backing_of(inserted: dict[str, object]) -> object:
    """The file of the image right below a ``query-block`` ``inserted`` node's top
    (:func:`real_file` of its name)."""
    image = _dict(inserted.get("image"), "inserted.image")
    below = image.get("backing-image")
    name = below.get("filename") if isinstance(below, dict) else None
    return real_file(name) if isinstance(name, str) else name


def _scan_blocks(blocks: list[object]) -> tuple[dict[str, dict[str, object]], set[str]]:
    """From ``query-block``: each device's top node name -> its ``inserted`` object, and the
    file names of every image in use (tops and their backing chains)."""
    tops: dict[str, dict[str, object]] = {}
    files: set[str] = set()
    for block_obj in blocks:
        inserted = _dict(block_obj, "query-block entry").get("inserted")
        if not isinstance(inserted, dict):
            continue
        node = inserted.get("node-name")
        if isinstance(node, str):
            tops[node] = inserted
        image = inserted.get("image")
        while isinstance(image, dict):
            name = image.get("filename")
            if isinstance(name, str):
                files.add(real_file(name))
            image = image.get("backing-image")
    return tops, files


def _is_image(file: str | None, path: Path) -> bool:
    """Whether a node's ``file`` (``query-named-block-nodes``) is the image ``path``: either the
    plain name or, for an overlay added without a backing, ``json:{..."file": {"filename":
    PATH}}``."""
    return file is not None and real_file(file) == str(path)


def _ms_since(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6


# ------------------------------------------------------------------ what an overlay inherits


def _split_opts(value: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` option syntax (``,,`` is a comma in a value; a bare key
    is ``on``), as ``-drive`` and dotted ``-blockdev`` take it."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "," and value[i + 1 : i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for part in parts:
        key, eq, val = part.partition("=")
        if key:
            out[key] = val if eq else "on"
    return out


def _flatten(obj: object, prefix: str, into: dict[str, str]) -> None:
    """A ``-blockdev`` JSON object as dotted keys (``file.aio``), values as QEMU's strings."""
    if isinstance(obj, dict):
        for key, val in obj.items():
            _flatten(val, f"{prefix}{key}.", into)
    elif isinstance(obj, bool):
        into[prefix[:-1]] = "on" if obj else "off"
    elif isinstance(obj, str | int | float):
        into[prefix[:-1]] = str(obj)


def _discard(value: str | None) -> str | None:
    """``-drive``'s ``discard=on/off`` as ``blockdev-add``'s ``unmap``/``ignore``."""
    return {"on": "unmap", "off": "ignore"}.get(value, value) if value else None


@dataclass(frozen=True, slots=True)
class CmdlineBlockOptions:
    """What QEMU's command line says of its block nodes that QMP does not tell (QEMU 7.2's
    ``query-named-block-nodes`` has no ``aio``, ``discard`` or ``locking``): per image file
    (the protocol node's ``filename``) its ``aio``, ``locking`` and ``discard``; per node name
    (``-blockdev ...,node-name=``) its ``discard``."""

    by_file: dict[str, dict[str, str]] = field(default_factory=dict)
    by_node: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> CmdlineBlockOptions:
        """Read every ``-drive`` and ``-blockdev`` (``key=value`` or JSON) of ``argv``; options
        that cannot be read are skipped. Never raises."""
        by_file: dict[str, dict[str, str]] = {}
        by_node: dict[str, dict[str, str]] = {}
        args = list(argv[1:])
        for i, arg in enumerate(args):
            opt, eq, inline = arg.lstrip("-").partition("=")
            if not arg.startswith("-") or opt not in ("drive", "blockdev"):
                continue
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            spec: dict[str, str] = {}
            if value.lstrip().startswith("{"):
                try:
                    _flatten(json.loads(value), "", spec)
                except ValueError:
                    continue
            else:
                spec = _split_opts(value)
            _collect(spec, opt == "drive", by_file, by_node)
        return cls(by_file, by_node)

    def for_chain(self, files: Sequence[str]) -> dict[str, str]:
        """The options of the first of ``files`` (a disk's chain, top first) the command line
        names: an overlay added later (by freezeframe, with these same options) is not on it."""
        for f in files:
            if f in self.by_file:
                return self.by_file[f]
        return {}


def _collect(
    spec: dict[str, str],
    drive: bool,
    by_file: dict[str, dict[str, str]],
    by_node: dict[str, dict[str, str]],
) -> None:
    for key, val in spec.items():
        if key == "node-name" or key.endswith(".node-name"):
            at = key.removesuffix("node-name")
            if at + "discard" in spec:
                by_node.setdefault(val, {})["discard"] = spec[at + "discard"]
        prefix = key.removesuffix("filename") if key.endswith("filename") else None
        if drive and key == "file" and not val.startswith("json:"):
            prefix = ""  # -drive file=PATH: the protocol's filename; options on it or file.*
        if prefix is None or (prefix and not prefix.endswith(".")):
            continue
        found = {
            name: spec[k]
            for name in ("aio", "locking", "discard")
            for k in (prefix + name, *((f"file.{name}",) if drive and not prefix else ()))
            if k in spec
        }
        if found:
            by_file.setdefault(val, {}).update(found)


@dataclass(frozen=True, slots=True)
class OverlaySettings:
    """What an overlay inherits from the top node of the disk it covers: the format node's
    ``cache`` (``direct``, ``no_flush``), ``discard``, ``detect_zeroes``, ``read_only``; its
    protocol node's cache (``file_direct``, ``file_no_flush``), ``aio``, ``locking``,
    ``file_discard``. None: not known, QEMU's default."""

    direct: bool | None = None
    no_flush: bool | None = None
    discard: str | None = None
    detect_zeroes: str | None = None
    read_only: bool = False
    file_direct: bool | None = None
    file_no_flush: bool | None = None
    aio: str | None = None
    locking: str | None = None
    file_discard: str | None = None

    def blockdev(self, node: str, overlay: str) -> dict[str, object]:
        """The ``blockdev-add`` arguments of the overlay ``overlay`` as node ``node`` (a qcow2
        node over a ``file`` node, no backing yet: ``blockdev-snapshot`` attaches it)."""
        file: dict[str, object] = {"driver": "file", "filename": overlay}
        cache = _cache(self.file_direct, self.file_no_flush)
        if cache:
            file["cache"] = cache
        for key, value in (
            ("aio", self.aio),
            ("locking", self.locking),
            ("discard", self.file_discard),
        ):
            if value is not None:
                file[key] = value
        spec: dict[str, object] = {
            "driver": "qcow2",
            "node-name": node,
            "file": file,
            "backing": None,
            "read-only": self.read_only,
        }
        cache = _cache(self.direct, self.no_flush)
        if cache:
            spec["cache"] = cache
        if self.discard is not None:
            spec["discard"] = self.discard
        if self.detect_zeroes is not None:
            spec["detect-zeroes"] = self.detect_zeroes
        return spec

    def describe(self) -> str:
        """``cache.direct=on aio=native ...`` (what is set), for logs and timelines."""
        pairs = [
            ("cache.direct", self.direct),
            ("cache.no-flush", self.no_flush),
            ("discard", self.discard),
            ("detect-zeroes", self.detect_zeroes),
            ("aio", self.aio),
            ("locking", self.locking),
        ]
        return " ".join(
            f"{k}={'on' if v is True else 'off' if v is False else v}"
            for k, v in pairs
            if v is not None
        )


def _cache(direct: bool | None, no_flush: bool | None) -> dict[str, object]:
    out: dict[str, object] = {}
    if direct is not None:
        out["direct"] = direct
    if no_flush is not None:
        out["no-flush"] = no_flush
    return out


def _node_cache(node: dict[str, object]) -> tuple[bool | None, bool | None]:
    cache = node.get("cache")
    if not isinstance(cache, dict):
        return None, None
    direct, no_flush = cache.get("direct"), cache.get("no-flush")
    return (
        direct if isinstance(direct, bool) else None,
        no_flush if isinstance(no_flush, bool) else None,
    )


def overlay_settings(
    disk: DiskInfo, named: Sequence[object], cmdline: CmdlineBlockOptions
) -> OverlaySettings:
    """What ``disk``'s overlay inherits, from ``query-named-block-nodes`` (``named``: the top
    node's cache, detect-zeroes, read-only; the protocol node beneath it, the one whose file is
    the image, its cache) and from QEMU's command line (aio, locking, discard). ``discard``
    becomes ``unmap`` when detect-zeroes is ``unmap`` (QEMU refuses one without the other).
    Never raises."""
    nodes = [n for n in named if isinstance(n, dict)]
    top = next((n for n in nodes if n.get("node-name") == disk.node), None)
    if top is None:
        return OverlaySettings()
    direct, no_flush = _node_cache(top)
    dz = top.get("detect_zeroes")
    detect_zeroes = dz if isinstance(dz, str) else None
    if top.get("drv") in _LOCAL_PROTOCOLS:
        proto: dict[str, object] | None = top
    else:
        proto = next(
            (
                n
                for n in nodes
                if n.get("drv") in _LOCAL_PROTOCOLS
                and isinstance(n.get("file"), str)
                and real_file(str(n.get("file"))) == disk.file
            ),
            None,
        )
    file_direct, file_no_flush = _node_cache(proto) if proto is not None else (direct, no_flush)
    opts = cmdline.for_chain((disk.file, *disk.backing))
    node_discard = cmdline.by_node.get(disk.node, {}).get("discard")
    discard = _discard(node_discard or opts.get("discard"))
    file_discard = _discard(opts.get("discard"))
    if detect_zeroes == "unmap":
        discard = "unmap"
    aio = opts.get("aio")
    if aio == "native" and file_direct is False:
        aio = None  # QEMU refuses aio=native without cache.direct
    return OverlaySettings(
        direct=direct,
        no_flush=no_flush,
        discard=discard,
        detect_zeroes=detect_zeroes,
        read_only=top.get("ro") is True,
        file_direct=file_direct,
        file_no_flush=file_no_flush,
        aio=aio,
        locking=opts.get("locking"),
        file_discard=file_discard,
    )


def direct_reopen(
    image: str,
    direct: bool,
    named: Sequence[object],
    cmdline: CmdlineBlockOptions,
    chain: Sequence[str],
) -> dict[str, object] | None:
    """``blockdev-reopen``'s options that set ``cache.direct`` of the local protocol node of
    the qcow2 image ``image`` to ``direct``, nothing else changed; None when it has that value
    already, or no format node over a local file holds ``image``, or its cache is not reported.

    A protocol node with a name of its own (``-blockdev driver=file,node-name=...``) is
    reopened itself; one QEMU named (``#block...``: opened inline with its format node, as an
    overlay's) cannot be, so its format node is reopened with the protocol node's options
    inline and its ``backing`` node by name (QEMU refuses a reopen without it). Options QEMU
    would otherwise reset to their defaults are given as they are: ``read-only``,
    ``cache.no-flush``, ``detect-zeroes`` (``named``: ``query-named-block-nodes``), ``aio``,
    ``locking``, ``discard`` (the command line's options of ``image``, else of ``chain``, the
    disk's images: what every overlay inherits). Any other option set explicitly makes QEMU
    refuse the reopen ("cannot be reset to its default value"): nothing changes then.
    Never raises."""
    nodes = [n for n in named if isinstance(n, dict)]

    def local(node: dict[str, object]) -> str | None:
        file = node.get("file")
        return real_file(file) if isinstance(file, str) else None

    fmt = next(
        (
            n
            for n in nodes
            if n.get("drv") == "qcow2" and isinstance(n.get("node-name"), str) and local(n) == image
        ),
        None,
    )
    proto = next(
        (
            n
            for n in nodes
            if n.get("drv") in _LOCAL_PROTOCOLS
            and isinstance(n.get("node-name"), str)
            and isinstance(n.get("file"), str)
            and not str(n.get("file")).startswith("json:")
            and local(n) == image
        ),
        None,
    )
    if fmt is None or proto is None:
        return None
    now, no_flush = _node_cache(proto)
    if now is None or now == direct:
        return None
    opts = cmdline.by_file.get(image) or cmdline.for_chain(chain)
    file: dict[str, object] = {
        "driver": proto.get("drv"),
        "filename": proto.get("file"),
        "cache": _cache(direct, no_flush),
    }
    for key in ("aio", "locking"):
        if key in opts:
            file[key] = opts[key]
    discard = _discard(opts.get("discard"))
    if discard is not None:
        file["discard"] = discard
    file_name = str(proto.get("node-name"))
    if not file_name.startswith("#"):
        return {"node-name": file_name, "read-only": proto.get("ro") is True, **file}
    spec: dict[str, object] = {
        "driver": "qcow2",
        "node-name": fmt.get("node-name"),
        "read-only": fmt.get("ro") is True,
        "file": file,
    }
    fmt_direct, fmt_no_flush = _node_cache(fmt)
    cache = _cache(fmt_direct, fmt_no_flush)
    if cache:
        spec["cache"] = cache
    dz = fmt.get("detect_zeroes")
    if isinstance(dz, str) and dz != "off":
        spec["detect-zeroes"] = dz
    fmt_discard = _discard(cmdline.by_node.get(str(fmt.get("node-name")), {}).get("discard"))
    if fmt_discard is not None or dz == "unmap":
        spec["discard"] = "unmap" if dz == "unmap" else fmt_discard
    info = fmt.get("image")
    full = info.get("full-backing-filename") if isinstance(info, dict) else None
    backing = full if isinstance(full, str) else fmt.get("backing_file")
    if isinstance(backing, str):
        below = next(
            (
                n.get("node-name")
                for n in nodes
                if n is not fmt
                and n.get("drv") not in _LOCAL_PROTOCOLS
                and n.get("drv") not in _FILTERS
                and isinstance(n.get("node-name"), str)
                and local(n) == real_file(backing)
            ),
            None,
        )
        if below is None:
            return None
        spec["backing"] = below
    return spec


def _find_qemu(qmp_path: str) -> HostProcess | None:
    """The QEMU process serving ``qmp_path``: the process holding its listening socket
    (``/proc/net/unix`` and ``/proc/*/fd``; a ``qemu*`` program preferred), else the socket's
    SO_PEERCRED pid; its user and groups as ``/proc/PID/status`` says now (after ``-runas``).
    None when it cannot be told. Never raises."""
    try:
        pids = _socket_holders(_listening_inodes(qmp_path))
        procs = [p for p in (read_process(pid) for pid in pids) if p is not None]
        qemus = [p for p in procs if p.argv and os.path.basename(p.argv[0]).startswith("qemu")]
        if qemus or procs:
            return (qemus or procs)[0]
        peer = _peer_pid(qmp_path)
        return read_process(peer) if peer is not None else None
    except (OSError, ValueError):
        return None


def _open_hint(qemu: HostProcess | None) -> str:
    """What to check when QEMU refuses to open an overlay."""
    who = f"QEMU runs as {qemu.who}" if qemu is not None else "check which user QEMU runs as"
    label = f"; its security label is {qemu.label}" if qemu and qemu.label else ""
    return (
        f"{who}{label}: the overlay directory must be reachable by that user and allowed by "
        "AppArmor/SELinux (the VM's doctor report checks both), or give the VM an overlay "
        "directory that user can reach"
    )


def _security_check(qemu: HostProcess | None, dirs: list[str]) -> DriverCheck:
    """The doctor line on AppArmor/SELinux: whether one confines QEMU and could keep it from
    opening a new overlay in ``dirs``."""
    modules = security_modules(qemu)
    if not modules:
        return DriverCheck(
            "security labels",
            True,
            "neither AppArmor nor SELinux is active on this host: file modes alone decide "
            "what QEMU may open",
        )
    where = ", ".join(dirs) or "the overlay directory"
    said: list[str] = []
    blocking = False
    fixes: list[str] = []
    for m in modules:
        if not m.confines:
            said.append(f"{m.name}: QEMU is not confined ({m.label or 'no label'})")
        elif m.name == "apparmor":
            blocking = blocking or m.enforces
            said.append(
                f"AppArmor profile {m.label} ({'enforce' if m.enforces else 'complain'}) "
                f"confines QEMU: it opens only files the profile allows, and an overlay in "
                f"{where} needs a rule (libvirt's virt-aa-helper adds the files libvirt "
                "creates, not freezeframe's)"
            )
            fixes.append(
                f"allow `{where}/*.ff-*.qcow2 rwk,` in QEMU's profile (a local override), or "
                "give the VM an overlay directory it allows"
            )
        else:
            blocking = blocking or m.enforces
            said.append(
                f"SELinux context {m.label} ({'enforcing' if m.enforces else 'permissive'}) "
                "confines QEMU: overlays get the label of the image they cover "
                "(security.selinux is copied), so QEMU opens them as it opens the image"
            )
            fixes.append(
                "if blockdev-add is denied (an AVC in the audit log), label the overlay "
                "directory svirt_image_t (chcon -t svirt_image_t DIR)"
            )
    return DriverCheck(
        "security labels", None if blocking else True, "; ".join(said), "; ".join(fixes)
    )


# --------------------------------------------------------------------------- the driver


class QmpDriver(HypervisorDriver):
    """Driver for one QEMU process reached through its QMP unix socket ``qmp_path``.

    ``vm_name`` only labels messages and logs; ``timeout`` bounds every QMP command (seconds),
    ``greeting_timeout`` the wait for QEMU's greeting when connecting (at most ``timeout``).
    ``overlay_dir`` (the VM's ``--overlay-dir``) is where overlays go when a call names no
    directory (default: next to each image). :attr:`last_timings` holds the durations measured
    by the last :meth:`prepare_cut` / :meth:`cut` (milliseconds).

    Overlays are made for the QEMU process as it runs: owned by its user and group (``-runas``,
    libvirt's ``libvirt-qemu``), with the mode of the image they cover, and added with the
    cache, aio, discard, detect-zeroes, locking and read-only settings of that image's nodes
    (:func:`overlay_settings`).
    """

    name = "qmp"
    capabilities = DriverCapabilities(
        atomic_multi_disk=True,
        prepare_outside_freeze=True,
        agent_channel_check=True,
        pause_resume=True,
    )

    def __init__(
        self,
        qmp_path: str,
        *,
        vm_name: str = "",
        timeout: float = 10.0,
        greeting_timeout: float = GREETING_TIMEOUT,
        overlay_dir: str | None = None,
    ) -> None:
        self.qmp_path = qmp_path
        self.vm_name = vm_name
        self.timeout = timeout
        self.greeting_timeout = min(greeting_timeout, timeout)
        self.overlay_dir = overlay_dir
        self._client: QMPClient | None = None
        self._timings: dict[str, float] = {}
        self._qemu: HostProcess | None = None  # the QEMU process, once found (per connection)
        self._last_settings: dict[str, OverlaySettings] = {}

    @classmethod
    def from_config(cls, cfg: VmConfig) -> Self:
        """An unconnected driver for ``cfg.qmp_path`` (with ``cfg.overlay_dir``). Raises
        UsageError when it is unset."""
        if not cfg.qmp_path:
            raise UsageError(
                f"VM {cfg.name!r} has no QMP socket path", hint="register it with its QMP path"
            )
        return cls(cfg.qmp_path, vm_name=cfg.name, overlay_dir=cfg.overlay_dir)

    @property
    def _label(self) -> str:
        return f"VM {self.vm_name!r}" if self.vm_name else f"QMP {self.qmp_path}"

    async def is_gone(self) -> bool:
        """QEMU is not running: its QMP socket file is missing or refuses connections (a
        socket that accepts, even one that never greets, is not proof)."""
        return await asyncio.to_thread(_socket_dead, self.qmp_path)

    @property
    def last_timings(self) -> dict[str, float]:
        """Copy of the last measured durations in ms: ``prepare.<device>.create_ms`` (qemu-img),
        ``prepare.<device>.add_ms`` (blockdev-add), ``cut.transaction_ms``."""
        return dict(self._timings)

    @property
    def last_settings(self) -> dict[str, OverlaySettings]:
        """Device -> what its overlay inherited, for the last :meth:`prepare_cut`."""
        return dict(self._last_settings)

    async def qemu_process(self) -> HostProcess | None:
        """The QEMU process behind the QMP socket (pid, the user and groups it runs as, its
        command line and security label), found once per connection; None when it cannot be
        told (another user's process, another PID namespace). Never raises."""
        if self._qemu is None or read_process(self._qemu.pid) is None:
            self._qemu = await asyncio.to_thread(_find_qemu, self.qmp_path)
        return self._qemu

    # ----------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Connect and negotiate capabilities; a no-op when connected, a reconnect when the
        connection broke.

        Raises HypervisorUnavailableError (with a hint) when the socket is missing, refuses
        the connection, does not greet within ``greeting_timeout`` (another client holds it, or
        it is not a QMP monitor) or does not speak QMP; QemuStoppedError (one of those) when
        the process listening on the socket is stopped, whatever the connect got (no greeting,
        or EAGAIN/EINVAL once the stopped QEMU's listen backlog is full). The driver stays
        disconnected on failure.
        """
        if self._client is not None:
            if self._client.runstate == Runstate.RUNNING:
                return
            await self.close()  # the connection broke: start over
        if not _exists(self.qmp_path):
            raise HypervisorUnavailableError(
                f"{self._label}: QMP socket {self.qmp_path} does not exist",
                hint=f"is the VM running? {_START_HINT}",
            )
        client = _new_client(self.vm_name)
        try:
            await within(client.connect(self.qmp_path), self.greeting_timeout)
        except (TimeoutError, QMPError, OSError) as exc:
            # A stopped QEMU first lets connects queue (no greeting: a timeout), then, its
            # listen backlog full, refuses them with EAGAIN/EINVAL: ask who listens, every time.
            stopped = await asyncio.to_thread(_stopped_listener, self.qmp_path)
            if stopped is not None:
                raise QemuStoppedError(
                    f"{self._label}: QEMU (pid {stopped[0]}) behind {self.qmp_path} is "
                    f"{_STOPPED_STATES[stopped[1]]}: it cannot answer",
                    pid=stopped[0],
                    state=stopped[1],
                ) from exc
            raise self._connect_failed(exc) from exc
        self._client = client
        log.debug("%s: connected", self._label)

    def _connect_failed(self, exc: BaseException) -> HypervisorUnavailableError:
        """The error for a failed connect to a socket whose listener is not stopped."""
        if isinstance(exc, TimeoutError):
            return HypervisorUnavailableError(
                f"{self._label}: {self.qmp_path} answered but sent no QMP greeting within "
                f"{self.greeting_timeout:g} s: is it QEMU's QMP socket "
                f"(-qmp unix:{self.qmp_path},server=on)?",
                hint=_ONE_CLIENT_HINT,
            )
        if isinstance(exc, ConnectError):
            root = exc.exc
            if isinstance(root, ConnectionRefusedError):
                msg, hint = "connection refused", f"stale socket? is the VM running? {_START_HINT}"
            elif isinstance(root, OSError):
                msg, hint = str(root), _START_HINT
            elif isinstance(root, EOFError):
                msg, hint = "the server hung up during the QMP handshake", _ONE_CLIENT_HINT
            else:
                msg, hint = f"not a QMP server ({root})", _START_HINT
            return HypervisorUnavailableError(
                f"{self._label}: cannot connect to {self.qmp_path}: {msg}", hint=hint
            )
        return HypervisorUnavailableError(
            f"{self._label}: cannot connect to {self.qmp_path}: {exc}", hint=_START_HINT
        )

    async def close(self) -> None:
        """Disconnect; never raises (a broken connection is only logged)."""
        client, self._client = self._client, None
        self._qemu = None
        if client is None:
            return
        try:
            await within(client.disconnect(), self.timeout)
        except Exception as exc:  # close() never raises: the connection is gone either way
            log.debug("%s: disconnect: %r", self._label, exc)

    async def _execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command within ``timeout``.

        Raises QmpCommandError when QEMU answers with an error, HypervisorError on timeout,
        HypervisorUnavailableError when not connected or the connection broke.
        """
        client = self._client
        if client is None:
            raise HypervisorUnavailableError(f"{self._label}: not connected (call connect())")
        if client.runstate != Runstate.RUNNING:  # QEMU hung up since the last command
            raise self._lost(command)
        try:
            return await within(client.execute(command, arguments), self.timeout)
        except ExecuteError as exc:
            raise QmpCommandError(
                f"{self._label}: QMP {command} failed: {exc}",
                command=command,
                qmp_class=exc.error_class,
            ) from exc
        except TimeoutError as exc:
            raise HypervisorError(
                f"{self._label}: QMP {command}: no reply within {self.timeout:g}s"
            ) from exc
        except (ExecInterruptedError, StateError, OSError, EOFError) as exc:
            # The connection went away during the command (or just before it): the library's
            # own words ("QMPClient is disconnecting. Call disconnect() ...") mean nothing to
            # an operator.
            raise self._lost(command) from exc
        except QMPError as exc:  # a reply the library could not read: the session is over
            log.debug("%s: QMP %s: %r", self._label, command, exc)
            raise self._lost(command) from exc

    def _lost(self, command: str) -> HypervisorUnavailableError:
        return HypervisorUnavailableError(
            f"{self._label}: the QMP connection to {self.qmp_path} was lost (during {command}): "
            "is QEMU still running?",
            hint="check the VM's QEMU process; once it runs again, retry",
        )

    # ----------------------------------------------------------------- inspection

    async def disks(self) -> list[DiskInfo]:
        """The VM's writable disks (``query-block``), in QEMU's order.

        Skips empty drives, removable drives (CD-ROM, floppy) and read-only drives. ``device``
        is the frontend's qdev id (``-device ...,id=disk0``; ``scsi0-0-0-1`` for a scsi-hd),
        else the legacy drive id, else the node name; ``file`` the image file (:func:`real_file`
        of a ``json:{...}`` name QEMU gives an image opened with an explicit backing node);
        ``pci`` comes from ``query-pci`` (for a disk on a SCSI/other bus: its controller's
        address); ``serial`` from the frontend's ``serial`` property.
        Raises HypervisorError (a subclass when the connection is gone).
        """
        blocks = _list(await self._execute("query-block"), "query-block")
        pci = await self._pci_addresses()
        result: list[DiskInfo] = []
        for block_obj in blocks:
            block = _dict(block_obj, "query-block entry")
            inserted = block.get("inserted")
            if not isinstance(inserted, dict):
                continue  # empty drive
            if block.get("removable") is True or inserted.get("ro") is True:
                continue
            node = _str(inserted, "node-name", "inserted")
            image = _dict(inserted.get("image"), "inserted.image")
            backing: list[str] = []
            below = image.get("backing-image")
            while isinstance(below, dict):
                backing.append(real_file(_str(below, "filename", "backing-image")))
                below = below.get("backing-image")
            qdev = block.get("qdev")
            root = _qdev_root(qdev) if isinstance(qdev, str) and qdev else ""
            legacy = block.get("device")
            device = _peripheral_id(root) or (legacy if isinstance(legacy, str) else "") or node
            filename = _str(image, "filename", "inserted.image")
            rbd = rbd_source(filename) if not backing else None
            result.append(
                DiskInfo(
                    device=device,
                    node=node,
                    file=rbd.name if rbd is not None else real_file(filename),
                    rbd=rbd,
                    format=_str(inserted, "drv", "inserted"),
                    virtual_size=_int(image, "virtual-size", "inserted.image"),
                    backing=tuple(backing),
                    pci=await self._pci_of(root, pci) if root else None,
                    serial=await self._serial_of(root) if root else None,
                    read_only=False,
                )
            )
        return result

    async def _pci_addresses(self) -> dict[str, PciAddress]:
        addresses: dict[str, PciAddress] = {}
        _collect_pci(_list(await self._execute("query-pci"), "query-pci"), addresses)
        return addresses

    async def _qom_get(self, path: str, prop: str) -> object | None:
        """``qom-get``; None when the object or property does not exist."""
        try:
            return await self._execute("qom-get", {"path": path, "property": prop})
        except QmpCommandError:
            return None

    async def _pci_of(self, qdev_path: str, pci: dict[str, PciAddress]) -> PciAddress | None:
        own = _peripheral_id(qdev_path)
        if own is not None and own in pci:
            return pci[own]
        # Not a PCI device itself (scsi-hd, ide-hd, ...): the guest sees its controller.
        bus = await self._qom_get(qdev_path, "parent_bus")
        if isinstance(bus, str) and bus:
            controller = _peripheral_id(_qdev_root(bus.rsplit("/", 1)[0]))
            if controller is not None:
                return pci.get(controller)
        return None

    async def _serial_of(self, qdev_path: str) -> str | None:
        serial = await self._qom_get(qdev_path, "serial")
        return serial if isinstance(serial, str) and serial else None

    async def agent_channel(self) -> str | None:
        """The host side of the VM's ``org.qemu.guest_agent.0`` virtio-serial port: the unix
        socket path of its chardev, or the chardev id when it is not a unix socket. None when
        the VM has no such port. Raises HypervisorError."""
        chardev: str | None = None
        for container in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                children = _list(await self._execute("qom-list", {"path": container}), "qom-list")
            except QmpCommandError:
                continue  # container absent: no device of that kind
            for child_obj in children:
                child = _dict(child_obj, "qom-list entry")
                if child.get("type") != "child<virtserialport>":
                    continue
                path = f"{container}/{_str(child, 'name', 'qom-list entry')}"
                if await self._qom_get(path, "name") == GUEST_AGENT_PORT:
                    found = await self._qom_get(path, "chardev")
                    chardev = found if isinstance(found, str) else ""
                    break
            if chardev is not None:
                break
        if chardev is None:
            return None
        for entry_obj in _list(await self._execute("query-chardev"), "query-chardev"):
            entry = _dict(entry_obj, "query-chardev entry")
            if entry.get("label") == chardev:
                found_path = chardev_unix_path(_str(entry, "filename", "query-chardev entry"))
                if found_path is not None:
                    return found_path
        return chardev

    # ----------------------------------------------------------------- the cut

    async def prepare_cut(
        self, snapshot_id: str, disks: list[DiskInfo], overlay_dir: str | None = None
    ) -> PreparedCut:
        """Create ``<image stem>.ff-<snapshot_id>.qcow2`` per disk (next to its image, or in
        ``overlay_dir``, else the driver's :attr:`overlay_dir`) backed by the disk's current
        top image, and ``blockdev-add`` it as node :func:`overlay_node_name` without attaching
        it. Nothing the guest sees changes.

        Each overlay is owned by the QEMU process's user and group, has its image's mode
        (:func:`~freezeframe.hypervisor._files.apply_image_access`) and is added with the
        settings of the disk's nodes (:func:`overlay_settings`: cache, aio, discard,
        detect-zeroes, locking, read-only); :attr:`last_settings` says which.

        Raises CutError (cause kept) if the id is malformed, a device repeats, a disk has a
        :meth:`cut_problem`, QEMU's user may not reach the overlay directory, an overlay file
        already exists, ``qemu-img`` fails, the overlay cannot be given QEMU's user or QEMU
        refuses a node. On any failure, cancellation included, everything created so far has
        been removed again (a cancellation is re-raised as it is; any other foreign error
        becomes a CutError).
        """
        if overlay_dir is None:
            overlay_dir = self.overlay_dir
        if not _SNAPSHOT_ID.match(snapshot_id):
            raise CutError(f"invalid snapshot id {snapshot_id!r} (letters, digits, - and _)")
        if not disks:
            raise CutError(f"{self._label}: no disks to prepare")
        devices = [d.device for d in disks]
        if len(set(devices)) != len(devices):
            raise CutError(f"{self._label}: a disk is listed twice: {devices}")
        problems = [p for d in disks if (p := self.cut_problem(d, overlay_dir)) is not None]
        if problems:
            raise CutError(
                f"{self._label}: cannot prepare the cut: {'; '.join(problems)}",
                hint="pass an overlay directory (overlay_dir) on a local, writable filesystem",
            )
        self._timings = {}
        self._last_settings = {}
        files: list[Path] = []
        nodes: list[str] = []
        prepared: list[PreparedDisk] = []
        try:
            require("qemu-img")
            qemu = await self.qemu_process()
            cmdline = CmdlineBlockOptions.from_argv(qemu.argv if qemu is not None else ())
            named = _list(
                await self._execute("query-named-block-nodes", {"flat": True}),
                "query-named-block-nodes",
            )
            for disk in disks:
                overlay = _overlay_path(disk, snapshot_id, overlay_dir)
                node = overlay_node_name(snapshot_id, disk.device)
                if _exists(overlay):
                    raise CutError(f"{self._label}: overlay {overlay} already exists")
                blocked = unreachable_for(str(overlay.parent), qemu) if qemu else None
                if blocked is not None:
                    raise CutError(
                        f"{self._label}: QEMU could not open the overlay of disk "
                        f"{disk.device}: {blocked}",
                        hint="let that user search the directory (chmod o+x), or give the VM "
                        "an overlay directory it can reach",
                        code=OVERLAY_DIR_UNREACHABLE,
                    )
                settings = overlay_settings(disk, named, cmdline)
                self._last_settings[disk.device] = settings
                start = time.perf_counter_ns()
                files.append(overlay)
                await run(
                    "qemu-img", "create", "-q", "-f", "qcow2", "-u",
                    "-b", disk.file, "-F", disk.format,
                    str(overlay), str(disk.virtual_size),
                    timeout=self.timeout, what=f"qemu-img create {overlay.name}",
                )  # fmt: skip
                apply_image_access(overlay, disk.file, qemu)
                created = time.perf_counter_ns()
                # Listed before the call: a blockdev-add cut short (cancelled, timed out) may
                # still have created the node; _undo asks QEMU which nodes exist.
                nodes.append(node)
                try:
                    await self._execute("blockdev-add", settings.blockdev(node, str(overlay)))
                except QmpCommandError as exc:
                    raise CutError(
                        f"{self._label}: QEMU cannot open overlay {overlay} of disk "
                        f"{disk.device} ({settings.describe() or 'default settings'}): {exc}",
                        hint=_open_hint(qemu),
                        code=OVERLAY_OPEN_REFUSED,
                    ) from exc
                self._timings[f"prepare.{disk.device}.create_ms"] = (created - start) / 1e6
                self._timings[f"prepare.{disk.device}.add_ms"] = _ms_since(created)
                prepared.append(PreparedDisk(disk, str(overlay), node, disk.file))
        except BaseException as exc:
            # Shielded: a second Ctrl-C (cancellation) during the rollback must not leave
            # overlays and ff-* nodes behind; it is re-raised once the rollback has finished.
            await shielded(self._undo(nodes, files))
            if isinstance(exc, CutError) or not isinstance(exc, Exception):
                raise  # ours already, or a cancellation / KeyboardInterrupt: as it is
            hint = exc.hint if isinstance(exc, FreezeframeError) else None
            raise CutError(
                f"{self._label}: preparing the cut failed: {exc or type(exc).__name__}",
                hint=hint,
            ) from exc
        log.debug(
            "%s: prepared %s: %s; settings %s",
            self._label,
            snapshot_id,
            self._timings,
            {dev: st.describe() for dev, st in self._last_settings.items()},
        )
        return PreparedCut(snapshot_id, tuple(prepared))

    def cut_problem(self, disk: DiskInfo, overlay_dir: str | None = None) -> str | None:
        """Why :meth:`prepare_cut` cannot create ``disk``'s overlay (in ``overlay_dir``, else
        the driver's :attr:`overlay_dir`, else next to its image); None when nothing stands in
        the way. Checks this host's filesystem only: an image that is not a local file (rbd,
        nbd, iscsi, a ``json:{...}`` name without a local file) or is a block device needs an
        overlay directory; the target directory must exist and be writable. Never raises."""
        return local_cut_problem(disk, overlay_dir if overlay_dir is not None else self.overlay_dir)

    async def checks(self) -> list[DriverCheck]:
        """For ``doctor``: who the QEMU process runs as (the owner its overlays get), whether
        that user can reach each overlay directory (next to each disk's image, or the VM's
        overlay directory), and which security module (AppArmor, SELinux) confines it and
        could keep it from opening a new overlay. Never raises."""
        try:
            return await self._checks()
        except Exception as exc:  # doctor's checks never raise
            log.debug("%s: driver checks: %r", self._label, exc)
            return [DriverCheck("qemu process", None, f"cannot examine QEMU: {exc}")]

    async def _checks(self) -> list[DriverCheck]:
        qemu = await self.qemu_process()
        out: list[DriverCheck] = []
        if qemu is None:
            out.append(
                DriverCheck(
                    "qemu process",
                    None,
                    f"cannot tell which process serves {self.qmp_path} (another user's, or in "
                    "another PID namespace): overlays get their image's owner and mode",
                    "run freezeframe as root on the VM's host",
                )
            )
        else:
            out.append(
                DriverCheck(
                    "qemu process",
                    True,
                    f"pid {qemu.pid} runs as {qemu.who}: overlays are created owned by it, "
                    "with the mode of the image they cover and its cache/aio/discard settings",
                )
            )
        try:
            disks = await self.disks()
        except HypervisorError:
            disks = []
        dirs: dict[str, list[str]] = {}
        for d in disks:
            if self.overlay_dir is not None:
                dirs.setdefault(self.overlay_dir, []).append(d.device)
            elif os.path.isabs(d.file):
                dirs.setdefault(os.path.dirname(d.file), []).append(d.device)
        if qemu is not None and qemu.uid != 0:
            for directory, devices in dirs.items():
                why = unreachable_for(directory, qemu)
                out.append(
                    DriverCheck(
                        f"overlay dir {directory}",
                        why is None,
                        f"QEMU ({qemu.who}) can reach overlays of {', '.join(devices)} there"
                        if why is None
                        else f"overlays of {', '.join(devices)}: {why}: QEMU could not open "
                        "them (blockdev-add: Permission denied)",
                        ""
                        if why is None
                        else "chmod o+x that directory, or give the VM an overlay "
                        "directory QEMU's user can reach",
                        refuses=why is not None,
                    )
                )
        out.append(_security_check(qemu, list(dirs)))
        return out

    async def _undo(self, nodes: list[str], files: list[Path]) -> None:
        """Roll back a failed prepare: ``nodes`` were never attached (the last one may not
        exist: its blockdev-add may have been cut short); ``files[i]`` belongs to ``nodes[i]``.
        A file is only deleted once QEMU does not know its node. Never raises (run it
        shielded: each QMP call is bounded by ``timeout``)."""
        removed = set()
        known: dict[str, str] | None
        try:
            known = await self._node_files() if nodes else {}
        except Exception as exc:  # e.g. the connection is gone: try each node anyway
            log.debug("%s: cannot list block nodes: %s", self._label, exc)
            known = None
        for node, path in zip(nodes, files, strict=False):
            if known is not None and not _is_image(known.get(node), path):
                removed.add(node)  # never created, or a node of that name that is not ours
                continue
            try:
                await self._execute("blockdev-del", {"node-name": node})
                removed.add(node)
            except HypervisorError as exc:
                log.warning("%s: cannot remove node %s: %s", self._label, node, exc)
            except Exception:  # the rollback must reach the files
                log.exception("%s: removing node %s", self._label, node)
        for i, path in enumerate(files):
            if i < len(nodes) and nodes[i] not in removed:
                log.warning("%s: keeping %s: its node is still open", self._label, path)
                continue
            _remove_file(path, self._label)

    async def cut(self, prepared: PreparedCut) -> None:
        """Switch every prepared disk to its overlay with ONE QMP ``transaction`` of
        ``blockdev-snapshot`` actions (all-or-nothing in QEMU). Does nothing else.

        Raises CutError when QEMU refuses the transaction (nothing was switched; call
        :meth:`abort`). If the reply did not arrive (timeout, connection lost) the CutError
        says the outcome is unknown; so is it when the caller cancels the call (the
        cancellation propagates as it is, the driver stays usable). Ask :meth:`cut_state`
        then; :meth:`abort` never deletes an overlay QEMU still uses.
        """
        if not prepared.disks:
            raise CutError(f"{self._label}: nothing to cut")
        actions: list[object] = [
            {"type": "blockdev-snapshot", "data": {"node": d.disk.node, "overlay": d.overlay_node}}
            for d in prepared.disks
        ]
        start = time.perf_counter_ns()
        try:
            await self._execute("transaction", {"actions": actions})
        except QmpCommandError as exc:
            raise CutError(
                f"{self._label}: the cut was refused, no disk switched: {exc}",
                hint="abort the preparation",
            ) from exc
        except HypervisorError as exc:
            raise CutError(
                f"{self._label}: the cut's outcome is unknown: {exc}",
                hint="ask cut_state() before aborting",
            ) from exc
        except asyncio.CancelledError:
            log.warning(
                "%s: cut of %s cancelled while QEMU ran it: outcome unknown until cut_state()",
                self._label,
                prepared.snapshot_id,
            )
            raise
        finally:
            self._timings["cut.transaction_ms"] = _ms_since(start)

    async def verify_cut(self, prepared: PreparedCut) -> None:
        """Check with ``query-block`` that each prepared overlay is now its device's top node
        and is backed by ``image_at_cut``. Raises CutError naming the disks that are not."""
        tops, _ = _scan_blocks(_list(await self._execute("query-block"), "query-block"))
        wrong: list[str] = []
        for d in prepared.disks:
            inserted = tops.get(d.overlay_node)
            if inserted is None:
                wrong.append(f"{d.disk.device}: {d.overlay_node} is not the active node")
                continue
            backing = _backing_of(inserted)
            if backing != d.image_at_cut:
                wrong.append(f"{d.disk.device}: backed by {backing!r}, not {d.image_at_cut!r}")
        if wrong:
            raise CutError(f"{self._label}: cut not in effect: {'; '.join(wrong)}")

    async def cut_state(self, prepared: PreparedCut) -> CutState:
        """Ask QEMU (``query-block``, reconnecting first if the connection broke, within
        ``timeout``) whether the cut of ``prepared`` is in effect.

        ``"switched"``: every overlay node is a device's top node, backed by ``image_at_cut``.
        ``"not-switched"``: no overlay node is a top and no overlay file is in any device's
        chain. ``"unknown"``: QEMU cannot be asked, or anything else (a mix, a wrong backing,
        an overlay already below a newer top), which a cut cannot leave and is logged as an
        error. Never raises (a cancellation propagates).
        """
        try:
            await self.connect()
            blocks = _list(await self._execute("query-block"), "query-block")
            tops, in_use = _scan_blocks(blocks)
            states: dict[str, str] = {}
            for d in prepared.disks:
                inserted = tops.get(d.overlay_node)
                if inserted is not None and _backing_of(inserted) == d.image_at_cut:
                    states[d.disk.device] = "switched"
                elif inserted is None and d.overlay_file not in in_use:
                    states[d.disk.device] = "not-switched"
                elif inserted is not None:
                    states[d.disk.device] = f"on top, backed by {_backing_of(inserted)!r}"
                else:
                    states[d.disk.device] = "overlay in use below another node"
        except HypervisorError as exc:
            log.warning(
                "%s: cannot tell whether the cut of %s happened: %s",
                self._label,
                prepared.snapshot_id,
                exc,
            )
            return "unknown"
        except Exception:  # never raises
            log.exception("%s: asking for the cut state of %s", self._label, prepared.snapshot_id)
            return "unknown"
        seen = set(states.values())
        if seen <= {"switched"} and states:
            return "switched"
        if seen <= {"not-switched"}:
            return "not-switched"
        log.error(
            "%s: cut of %s in a state no transaction leaves: %s",
            self._label,
            prepared.snapshot_id,
            ", ".join(f"{dev}: {state}" for dev, state in states.items()),
        )
        return "unknown"

    def prepared_for(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> PreparedCut:
        """The overlays :meth:`prepare_cut` (without ``overlay_dir``: the driver's
        :attr:`overlay_dir`, else next to each image) makes for ``disks`` now:
        ``<image stem>.ff-<id>.qcow2``, node :func:`overlay_node_name`.

        Raises:
            CutError: a disk's image is not a local file (no overlay path can be named).
        """
        out = tuple(
            PreparedDisk(
                d,
                str(_overlay_path(d, snapshot_id, self.overlay_dir)),
                overlay_node_name(snapshot_id, d.device),
                d.file,
            )
            for d in disks
        )
        return PreparedCut(snapshot_id, out)

    def prepared_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> PreparedCut:
        """The preparation of ``snapshot_id`` as :meth:`prepare_cut` made it: the overlay node
        names follow from the id and the device (:func:`overlay_node_name`). No I/O.

        Raises:
            UsageError: a disk of the record has no overlay file.
        """
        out = []
        for d in disks:
            if d.overlay is None:
                raise UsageError(f"snapshot {snapshot_id}: disk {d.device} has no overlay")
            info = DiskInfo(d.device, d.node, d.image, d.format, d.virtual_size)
            out.append(
                PreparedDisk(info, d.overlay, overlay_node_name(snapshot_id, d.device), d.image)
            )
        return PreparedCut(snapshot_id, tuple(out))

    async def abort(self, prepared: PreparedCut) -> None:
        """Remove a preparation that was not cut: reconnect first if the connection broke
        (within ``timeout``), then ``blockdev-del`` each overlay node and delete its file, but
        only once QEMU no longer knows the node (an overlay that is in use, e.g. after a cut
        whose reply was lost, is kept). Without a connection everything is kept. Never
        raises; logs what stays."""
        if not prepared.disks:
            return
        try:
            await self.connect()
            known = await self._node_names()
            # A file some device uses (a VM restarted on it, a cut whose reply was lost) stays,
            # whatever its node is called now.
            _, in_use = _scan_blocks(_list(await self._execute("query-block"), "query-block"))
        except Exception as exc:  # abort never raises: without QEMU nothing can be removed
            log.warning(
                "%s: keeping every overlay of %s (%s): cannot ask QEMU: %s",
                self._label,
                prepared.snapshot_id,
                ", ".join(d.overlay_file for d in prepared.disks),
                exc,
            )
            return
        for d in prepared.disks:
            if d.overlay_file in in_use:
                log.warning(
                    "%s: keeping overlay %s: a disk of the VM uses it", self._label, d.overlay_file
                )
                continue
            try:
                if d.overlay_node in known:
                    await self._execute("blockdev-del", {"node-name": d.overlay_node})
            except HypervisorError as exc:
                log.warning(
                    "%s: keeping overlay %s (node %s): %s",
                    self._label,
                    d.overlay_file,
                    d.overlay_node,
                    exc,
                )
                continue
            except Exception:  # abort never raises
                log.exception("%s: aborting %s", self._label, d.overlay_node)
                continue
            _remove_file(d.overlay_file, self._label)

    async def _node_names(self) -> set[str]:
        return set(await self._node_files())

    async def _node_files(self) -> dict[str, str]:
        """Every named block node -> the file name of its image."""
        nodes = _list(
            await self._execute("query-named-block-nodes", {"flat": True}),
            "query-named-block-nodes",
        )
        files: dict[str, str] = {}
        for node_obj in nodes:
            node = _dict(node_obj, "named block node")
            name, file = node.get("node-name"), node.get("file")
            if isinstance(name, str):
                files[name] = file if isinstance(file, str) else ""
        return files

    # ----------------------------------------------------------------- live merge

    async def merge_layer(
        self, merge: LayerMerge, progress: Callable[[MergeProgress], None] | None = None
    ) -> MergeOutcome:
        """Merge ``merge.top`` into ``merge.base`` with QMP ``block-commit`` (job id
        :func:`merge_job_id`, ``auto-finalize`` on, ``auto-dismiss`` off so that a job whose
        follower died keeps its outcome until the next call dismisses it).

        ``top`` the active layer: an active commit; once the job is READY (the base holds
        everything and QEMU mirrors new writes), ``job-complete`` pivots the disk to ``base``.
        ``merge.speed`` is the job's ``speed`` (bytes/s, 0: unlimited). While the job runs,
        ``base`` is written with ``cache.direct`` on (else fsync'ed from the host every 0.1 s):
        :meth:`_merge_writes`, which keeps the guest's write stalls short.
        ``top`` below the active layer: ``block-commit`` with ``top-node``/``base-node`` (file
        names when no node is found) and ``backing-file`` = ``base``, so QEMU writes the plain
        path into the header of the layer above ``top`` when it re-points it at ``base``.

        The job is followed through QMP events (an :class:`~qemu.qmp.EventListener` for
        :data:`MERGE_EVENTS` of this job, registered before anything is asked or started): each
        event wakes the follower, which reads the job's state with ``query-jobs``; between
        events ``query-jobs`` is read every :data:`MERGE_POLL` seconds for the progress
        (``current-progress``/``total-progress``, reported through ``progress`` when they
        change). Afterwards the chain is checked with ``query-block``.

        Once ``top`` is out of the chain, its node is closed in QEMU (``blockdev-del`` of a
        node that ``blockdev-add`` or ``-blockdev`` made, which QEMU would otherwise keep
        open): the caller may then delete the file.

        Idempotent: a job of this device that a killed run left is attached to (a READY
        active one is completed), one that concluded meanwhile is dismissed; if the chain
        still holds ``top`` after that, the merge asked for is started. A chain without
        ``top`` but with ``base``: ``already=True``. Cancelling this call leaves the job
        running in QEMU. Raises HypervisorError (codes ``not-in-chain``, ``merge-failed``;
        HypervisorUnavailableError when the connection is lost, the job going on in QEMU).
        """
        start = time.perf_counter_ns()
        client = self._client
        if client is None:
            raise HypervisorUnavailableError(f"{self._label}: not connected (call connect())")
        job_id = merge_job_id(merge.device)
        listener = EventListener(MERGE_EVENTS, lambda ev: _event_job(ev) == job_id)
        with client.listen(listener):
            job = await self._merge_job(job_id)
            if job is not None and job.get("status") == "concluded":
                log.info(
                    "%s: dismissing merge job %s a previous run left concluded (%s)",
                    self._label,
                    job_id,
                    job.get("error") or "no error",
                )
                await self._execute("job-dismiss", {"id": job_id})
                job = None
            if job is not None:
                if job.get("type") != "commit":
                    raise HypervisorError(
                        f"{self._label}: job {job_id} is a {job.get('type')} job, not a merge",
                        code=MERGE_FAILED,
                    )
                disk = await self._merge_disk(merge.device)
                active = disk.file == merge.top
                log.info("%s: attaching to merge job %s left running", self._label, job_id)
                async with self._merge_writes(merge.base, disk):
                    total = await self._follow_merge(job_id, merge.device, listener, progress)
                if merged(await self._merge_disk(merge.device), merge, active):
                    await self._release(merge.top)
                    return MergeOutcome(merge.device, active, False, total, _ms_since(start))
            disk = await self._merge_disk(merge.device)
            where = locate_layer(disk, merge, self._label)
            if where is None:
                await self._release(merge.top)
                return MergeOutcome(
                    merge.device, disk.file == merge.base, True, 0, _ms_since(start)
                )
            active = where
            args = await self._commit_args(job_id, disk, merge, active)
            async with self._merge_writes(merge.base, disk):
                try:
                    await self._execute("block-commit", args)
                except QmpCommandError as exc:
                    raise HypervisorError(
                        f"{self._label}: disk {merge.device}: QEMU refused to merge "
                        f"{merge.top} into {merge.base}: {exc}",
                        code=MERGE_FAILED,
                    ) from exc
                log.debug("%s: block-commit %s", self._label, args)
                total = await self._follow_merge(job_id, merge.device, listener, progress)
        if not merged(await self._merge_disk(merge.device), merge, active):
            raise HypervisorError(
                f"{self._label}: disk {merge.device}: the merge job ended but the running "
                f"chain still holds {merge.top} (or lost {merge.base})",
                code=MERGE_FAILED,
            )
        await self._release(merge.top)
        return MergeOutcome(merge.device, active, False, total, _ms_since(start))

    @contextlib.asynccontextmanager
    async def _merge_writes(self, base: str, disk: DiskInfo) -> AsyncIterator[None]:
        """While a merge job writes into ``base``: its protocol node reopened with
        ``cache.direct`` on (:func:`direct_reopen`; set back afterwards, also when the block
        fails), so the job's writes bypass the host's page cache; else (QEMU refused, the cache
        is direct already, not a local qcow2 file) ``base`` fsync'ed from the host every 0.1 s
        (:func:`~freezeframe.hypervisor._files.flushing`). Through the page cache, a job copies
        faster than the host's disk writes and the guest's next flush (its fsync, which QEMU
        passes on as ``fdatasync``) waits behind that backlog: bench/merge_bench.py measured
        the guest's longest write stall during a 256 MiB merge at 120-220 ms with the fsync,
        about as long as the same bytes copied by a plain host process (``hostio``), against
        a normal gap of ~64 ms; with the cache direct, <= 2 normal gaps at about the same
        merge speed. Never raises (a reopen that fails is logged)."""
        spec: dict[str, object] | None = None
        try:
            qemu = await self.qemu_process()
            cmdline = CmdlineBlockOptions.from_argv(qemu.argv if qemu is not None else ())
            named = _list(
                await self._execute("query-named-block-nodes", {"flat": True}),
                "query-named-block-nodes",
            )
            chain = (disk.file, *disk.backing)
            spec = direct_reopen(base, True, named, cmdline, chain)
            if spec is not None:
                await self._execute("blockdev-reopen", {"options": [spec]})
                log.debug("%s: %s reopened with cache.direct=on", self._label, base)
        except HypervisorError as exc:
            log.info("%s: %s stays cached while merging: %s", self._label, base, exc)
            spec = None
        if spec is None:
            async with flushing(base):
                yield
            return
        try:
            yield
        finally:
            await shielded(self._cached_again(base, cmdline, chain))

    async def _cached_again(
        self, base: str, cmdline: CmdlineBlockOptions, chain: Sequence[str]
    ) -> None:
        """Set ``base``'s cache back after :meth:`_merge_writes`; only logs a failure."""
        try:
            named = _list(
                await self._execute("query-named-block-nodes", {"flat": True}),
                "query-named-block-nodes",
            )
            spec = direct_reopen(base, False, named, cmdline, chain)
            if spec is not None:
                await self._execute("blockdev-reopen", {"options": [spec]})
        except HypervisorError as exc:
            log.warning(
                "%s: cannot set the cache of %s back (it stays cache.direct=on): %s",
                self._label,
                base,
                exc,
            )

    async def _release(self, image: str) -> None:
        """Close ``image`` in QEMU once it is out of every chain: a node added by
        ``blockdev-add`` (an overlay of a cut, a ``-blockdev`` of the command line) stays open,
        owned by the monitor, after a merge took it out of the chain; it would keep the file
        open (its space used after the caller deletes it) and keep its backing node busy (a
        later cut on it is refused). ``blockdev-del`` of its named format node, then of a named
        protocol node of the same file. Best effort: a failure is logged, never raised."""
        try:
            nodes = _list(
                await self._execute("query-named-block-nodes", {"flat": True}),
                "query-named-block-nodes",
            )
            _, in_use = _scan_blocks(_list(await self._execute("query-block"), "query-block"))
        except HypervisorError as exc:
            log.warning("%s: cannot close %s in QEMU: %s", self._label, image, exc)
            return
        if image in in_use:
            return
        found = [_dict(n, "named block node") for n in nodes]
        ours = [
            (str(n.get("node-name")), n.get("drv") in _LOCAL_PROTOCOLS)
            for n in found
            if isinstance(n.get("file"), str)
            and real_file(str(n.get("file"))) == image
            and isinstance(n.get("node-name"), str)
            and not str(n.get("node-name")).startswith("#")
            and n.get("drv") not in _FILTERS
        ]
        for name, _protocol in sorted(ours, key=lambda x: x[1]):  # format nodes first
            try:
                await self._execute("blockdev-del", {"node-name": name})
                log.debug("%s: closed node %s of %s", self._label, name, image)
            except QmpCommandError as exc:
                log.warning("%s: cannot close node %s of %s: %s", self._label, name, image, exc)

    async def _merge_disk(self, device: str) -> DiskInfo:
        for d in await self.disks():
            if d.device == device:
                return d
        raise HypervisorError(f"{self._label}: no disk {device!r}", code=NOT_IN_CHAIN)

    async def _merge_job(self, job_id: str) -> dict[str, object] | None:
        """Job ``job_id`` as ``query-jobs`` lists it, or None."""
        for job_obj in _list(await self._execute("query-jobs"), "query-jobs"):
            job = _dict(job_obj, "query-jobs entry")
            if job.get("id") == job_id:
                return job
        return None

    async def _commit_args(
        self, job_id: str, disk: DiskInfo, merge: LayerMerge, active: bool
    ) -> dict[str, object]:
        """``block-commit``'s arguments: node names of ``top`` and ``base`` when QEMU has a
        format node for each (``query-named-block-nodes``), else their file names."""
        files: dict[str, str] = {}
        for node_obj in _list(
            await self._execute("query-named-block-nodes", {"flat": True}),
            "query-named-block-nodes",
        ):
            node = _dict(node_obj, "named block node")
            name, file, drv = node.get("node-name"), node.get("file"), node.get("drv")
            if not isinstance(name, str) or not isinstance(file, str):
                continue
            if drv in _LOCAL_PROTOCOLS or drv in _FILTERS:
                continue
            files.setdefault(real_file(file), name)
        args: dict[str, object] = {
            "job-id": job_id,
            "device": disk.node,
            "auto-finalize": True,
            "speed": merge.speed,
            "auto-dismiss": False,
        }
        top_node = disk.node if active else files.get(merge.top)
        base_node = files.get(merge.base)
        if top_node is not None and base_node is not None:
            args["top-node"], args["base-node"] = top_node, base_node
        else:
            args["top"], args["base"] = merge.top, merge.base
        if not active:
            args["backing-file"] = merge.base
        return args

    async def _follow_merge(
        self,
        job_id: str,
        device: str,
        listener: EventListener,
        progress: Callable[[MergeProgress], None] | None,
    ) -> int:
        """Follow job ``job_id`` until it concludes (completing it once READY: only an active
        commit gets ready, whichever layer a job left by a killed run merges), dismiss it,
        return its total bytes. Raises HypervisorError code ``merge-failed`` when it
        concluded with an error or vanished with one."""
        last: tuple[int, int] | None = None
        completed = False
        event_error: str | None = None
        total = 0
        while True:
            job = await self._merge_job(job_id)
            if job is None:
                # Dismissed by someone else: its outcome is what its events said, else the
                # chain tells (the caller checks it).
                if event_error is not None:
                    raise HypervisorError(
                        f"{self._label}: disk {device}: the merge failed: {event_error}",
                        code=MERGE_FAILED,
                    )
                return total
            done, total = _int(job, "current-progress", "job"), _int(job, "total-progress", "job")
            if progress is not None and (done, total) != last:
                progress(MergeProgress(device, done, total))
            last = (done, total)
            status = job.get("status")
            if status == "concluded":
                await self._execute("job-dismiss", {"id": job_id})
                error = job.get("error")
                if error is not None:
                    raise HypervisorError(
                        f"{self._label}: disk {device}: the merge failed: {error}",
                        hint="the chain is unchanged; fix the cause (space, permissions) "
                        "and merge again",
                        code=MERGE_FAILED,
                    )
                return total
            if status == "ready" and not completed:  # only an active commit gets ready
                try:
                    await self._execute("job-complete", {"id": job_id})
                    completed = True
                except QmpCommandError as exc:  # e.g. no longer ready: look again
                    log.debug("%s: job-complete %s: %s", self._label, job_id, exc)
            try:
                event = await within(listener.get(), MERGE_POLL)
            except TimeoutError:
                continue
            for ev in (event, *listener.clear()):
                name, data = ev.get("event"), ev.get("data")
                if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and isinstance(
                    data, dict
                ):
                    err = data.get("error")
                    if name == "BLOCK_JOB_CANCELLED":
                        err = "the job was cancelled"
                    event_error = str(err) if err is not None else event_error
                elif name == "BLOCK_JOB_ERROR":
                    log.warning("%s: merge job %s: I/O error: %s", self._label, job_id, data)

    # ----------------------------------------------------------------- vCPUs

    async def run_state(self) -> str | None:
        """QMP ``query-status``'s ``status`` (``running``, ``paused``, ``io-error``, ...), or
        None when QEMU cannot be asked. Never raises."""
        try:
            status = await self._execute("query-status")
        except HypervisorError:
            return None
        value = status.get("status") if isinstance(status, dict) else None
        return value if isinstance(value, str) else None

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``). Raises HypervisorError."""
        await self._execute("stop")

    async def resume(self) -> None:
        """Resume the vCPUs (QMP ``cont``). Raises HypervisorError."""
        await self._execute("cont")
