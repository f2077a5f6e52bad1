"""The data freezeframe talks about: frozen dataclasses and enums, no behaviour beyond helpers.

Owns the vocabulary shared by every layer (agent, hypervisor, storage, catalog, engine, cli).
Nothing here does I/O. Replies from QMP and QGA are narrowed into these types at the edge of
the module that receives them; the rest of the code never sees raw JSON.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "GUEST_AGENT_PORT",
    "NO_MOUNTED_FILESYSTEM",
    "AgentInfo",
    "ChainImage",
    "ConsistencyLevel",
    "DiskInfo",
    "ExecResult",
    "FreezeIntent",
    "FsCheck",
    "FsFreezeState",
    "GuestDisk",
    "GuestFilesystem",
    "ImageFingerprint",
    "MergeIntent",
    "PciAddress",
    "QuiescePolicy",
    "RbdSource",
    "ScheduleRecord",
    "SnapshotDisk",
    "SnapshotFilesystem",
    "SnapshotRecord",
    "SnapshotStatus",
    "SnapshotSummary",
    "TimelineEvent",
    "Verification",
    "VerifyVerdict",
    "VmConfig",
]


#: Name of the virtio-serial port qemu-ga listens on (``hw_qemu_guest_agent=yes`` adds it).
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"


class QuiescePolicy(enum.StrEnum):
    """What to do about the guest freeze; mirrors the cloud's ``os_require_quiesce``.

    - ``required``: any freeze problem fails the snapshot and leaves nothing behind.
    - ``preferred``: try to freeze; on a problem, still cut atomically, record ``crash``.
    - ``off``: do not freeze; the snapshot is crash-consistent.
    """

    REQUIRED = "required"
    PREFERRED = "preferred"
    OFF = "off"


class ConsistencyLevel(enum.StrEnum):
    """How consistent a snapshot is; ordered: application > filesystem > crash > none."""

    APPLICATION = "application"
    FILESYSTEM = "filesystem"
    CRASH = "crash"
    NONE = "none"

    @property
    def rank(self) -> int:
        """Higher is stronger."""
        return _LEVEL_RANK[self]

    @staticmethod
    def weakest(levels: list[ConsistencyLevel]) -> ConsistencyLevel:
        """The weakest of ``levels``; ``NONE`` for an empty list."""
        if not levels:
            return ConsistencyLevel.NONE
        return min(levels, key=lambda lv: lv.rank)


_LEVEL_RANK = {
    ConsistencyLevel.APPLICATION: 3,
    ConsistencyLevel.FILESYSTEM: 2,
    ConsistencyLevel.CRASH: 1,
    ConsistencyLevel.NONE: 0,
}


class SnapshotStatus(enum.StrEnum):
    """Lifecycle of a snapshot record."""

    RUNNING = "running"  # write-ahead record exists, work in progress (or the process died)
    DONE = "done"
    FAILED = "failed"
    #: ``snapshot delete`` began: its data is being merged away (or the process died: recover
    #: finishes it). Never readable again as the snapshot it was.
    DELETING = "deleting"


class FsFreezeState(enum.StrEnum):
    """``guest-fsfreeze-status``."""

    THAWED = "thawed"
    FROZEN = "frozen"


class VerifyVerdict(enum.StrEnum):
    """Offline verdict for one filesystem or a whole snapshot (worst wins for the whole)."""

    CONSISTENT = "verified-consistent"
    NEEDS_RECOVERY = "needs-recovery"
    CHECK_FAILED = "check-failed"  # the filesystem checks pass, a user (application) check fails
    CORRUPT = "corrupt"
    UNCHECKED = "unchecked"  # no checker for that filesystem type
    #: An image the snapshot holds at its cut is no longer what was recorded at the cut (its
    #: size, mtime or inode changed: written to, e.g. by a VM restarted on it): the snapshot
    #: is lost, whatever its filesystems look like now.
    CHANGED = "changed-since-cut"

    @property
    def badness(self) -> int:
        return {
            "verified-consistent": 0,
            "unchecked": 1,
            "needs-recovery": 2,
            "check-failed": 3,
            "corrupt": 4,
            "changed-since-cut": 5,
        }[self.value]


# ---------------------------------------------------------------------------- VM configuration


@dataclass(frozen=True, slots=True)
class VmConfig:
    """A VM known to freezeframe (``vm add`` or registered by ``lab up``).

    ``agent`` mirrors ``hw_qemu_guest_agent``: when False, no agent is contacted at all.
    ``agent_log_path`` is a path *inside the guest* of qemu-ga's log file, read as evidence.

    The driver's address: ``qmp_path``/``qga_path`` (driver ``qmp``: QEMU's QMP socket and the
    agent's socket) or ``connect_uri``/``domain`` (driver ``libvirt``: the connection URI and
    the domain's UUID, which survives renames and restarts).

    ``overlay_dir``: where the overlays of this VM's snapshots are created (default: next to the
    image each one covers).
    """

    name: str
    driver: str = "qmp"
    qmp_path: str | None = None
    qga_path: str | None = None
    connect_uri: str | None = None
    domain: str | None = None
    agent: bool = True
    quiesce: QuiescePolicy = QuiescePolicy.PREFERRED
    freeze_timeout: float = 10.0
    agent_log_path: str | None = None
    exclude_mounts: tuple[str, ...] = ()
    lab: bool = False
    overlay_dir: str | None = None
    #: Ceph connection settings for the VM's RBD disks (``vm add --ceph-conf/--ceph-id/
    #: --ceph-keyring``): paths and a client id only, never a secret. None: what QEMU/libvirt
    #: say for the disk, else the global defaults (see :mod:`freezeframe.storage.rbd_backend`).
    ceph_conf: str | None = None
    ceph_id: str | None = None
    ceph_keyring: str | None = None

    def problems(self) -> list[str]:
        """What is wrong with this configuration (empty when it can be stored). The settings a
        driver needs are checked by the driver (``HypervisorDriver.from_config``)."""
        out = []
        if not VM_NAME_RE.fullmatch(self.name):
            out.append(
                f"bad VM name {self.name!r}: 1-128 of letters, digits and . _ : @ + -, "
                "starting with a letter or digit"
            )
        if not 0 < self.freeze_timeout <= MAX_FREEZE_TIMEOUT:  # also false for NaN
            out.append(
                f"freeze timeout must be in (0, {MAX_FREEZE_TIMEOUT:g}] seconds, "
                f"got {self.freeze_timeout:g}"
            )
        for what, path in (
            ("QMP socket", self.qmp_path),
            ("guest-agent socket", self.qga_path),
            ("overlay directory", self.overlay_dir),
            ("ceph.conf", self.ceph_conf),
            ("Ceph keyring", self.ceph_keyring),
        ):
            if path is not None and not path.startswith("/"):
                out.append(f"the {what} path must be absolute, got {path!r}")
        if self.ceph_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.ceph_id):
            out.append(f"invalid Ceph client id {self.ceph_id!r}")
        return out


#: Names of VMs in the catalog (libvirt domain names such as ``instance-0000002a`` fit).
VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")

#: The longest freeze deadline accepted, in seconds.
MAX_FREEZE_TIMEOUT = 3600.0


# ---------------------------------------------------------------------------- guest agent


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """``guest-info``: the agent's version and which commands it supports and has enabled."""

    version: str
    commands: dict[str, bool] = field(default_factory=dict)  # name -> enabled

    def enabled(self, command: str) -> bool:
        return self.commands.get(command, False)


@dataclass(frozen=True, slots=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True, slots=True)
class GuestDisk:
    """One backing device of a guest filesystem as the agent reports it."""

    dev: str | None  # e.g. /dev/vdb
    bus_type: str  # virtio, scsi, ide, ...
    pci: PciAddress | None
    serial: str | None = None
    #: The hypervisor's name of the disk (libvirt's ``virDomainGetFSInfo`` gives the target,
    #: e.g. ``vda``, and nothing else), matched against :attr:`DiskInfo.device`.
    target: str | None = None


@dataclass(frozen=True, slots=True)
class GuestFilesystem:
    """``guest-get-fsinfo`` entry."""

    mountpoint: str
    fstype: str
    name: str  # kernel device name, e.g. vdb
    disks: tuple[GuestDisk, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecResult:
    """``guest-exec`` + ``guest-exec-status`` once exited."""

    exitcode: int | None
    signal: int | None
    stdout: bytes = b""
    stderr: bytes = b""


# ---------------------------------------------------------------------------- hypervisor


@dataclass(frozen=True, slots=True)
class RbdSource:
    """A disk the hypervisor opens from Ceph RBD: ``pool``/``image`` (and ``namespace``), with
    the ``conf`` path and client ``user`` the hypervisor was given, when it says (never a key).
    """

    pool: str
    image: str
    namespace: str = ""
    conf: str | None = None
    user: str | None = None

    @property
    def spec(self) -> str:
        """``pool/image`` (``pool/namespace/image``)."""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.pool}/{ns}{self.image}"

    @property
    def name(self) -> str:
        """The disk's image name in freezeframe's records: ``rbd:pool/image``."""
        return f"rbd:{self.spec}"


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a running VM, from the hypervisor.

    ``node`` is the top block node (the one an overlay goes on), ``file`` its image file,
    ``format`` its driver (qcow2, raw, rbd), ``backing`` the chain below it (top first).
    ``pci`` lets the engine map guest filesystems to disks.
    """

    device: str  # qdev id / libvirt target, e.g. disk0 / vda
    node: str
    file: str
    format: str
    virtual_size: int
    backing: tuple[str, ...] = ()
    pci: PciAddress | None = None
    serial: str | None = None
    read_only: bool = False
    #: Set for a disk opened from Ceph RBD (``file`` is then ``rbd:pool/image``): it is cut
    #: by the ``rbd`` storage backend, not with an overlay.
    rbd: RbdSource | None = None


# ---------------------------------------------------------------------------- snapshot records


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One step of a snapshot. ``t`` is wall-clock time (UTC); ``mono_ns`` a monotonic clock
    (``time.monotonic_ns``) for exact intervals inside one process."""

    name: str
    t: datetime
    mono_ns: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ImageFingerprint:
    """What a local image file looked like right after the cut settled: enough to tell that
    it was written to or replaced since (``snapshot verify`` compares it)."""

    size: int
    mtime_ns: int
    inode: int

    def differences(self, other: ImageFingerprint) -> list[str]:
        """What differs from ``other`` (``size``, ``mtime``, ``inode``), empty when nothing."""
        out = []
        if self.size != other.size:
            out.append(f"size {self.size} -> {other.size}")
        if self.mtime_ns != other.mtime_ns:
            out.append("mtime changed")
        if self.inode != other.inode:
            out.append(f"inode {self.inode} -> {other.inode} (the file was replaced)")
        return out


#: Per-disk quiesce note: the guest mounts nothing from this disk; it was cut as raw data
#: (crash-consistent for that disk) while every mounted filesystem was frozen.
NO_MOUNTED_FILESYSTEM = "no-mounted-filesystem"


@dataclass(frozen=True, slots=True)
class SnapshotDisk:
    """A disk in a snapshot: ``image`` is the file holding the disk *at the cut* (read-only
    from then on), ``overlay`` the new active image the VM writes to after the cut.

    ``fingerprint``: the image right after the cut (None when it is no local file or was not
    taken: older records, records settled by ``recover``). ``image_mode``: the file's mode
    before freezeframe took its write bits away at the cut (None when it did not), to be given
    back to a merge. ``quiesce_note``: a per-disk code saying why the disk is weaker than the
    snapshot's level (:data:`NO_MOUNTED_FILESYSTEM`), None when nothing is to be said.
    """

    device: str
    node: str
    image: str
    format: str
    overlay: str | None
    backend: str = "qcow2-external"
    virtual_size: int = 0
    fingerprint: ImageFingerprint | None = None
    image_mode: int | None = None
    quiesce_note: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotFilesystem:
    """A guest filesystem and what happened to it at the freeze."""

    mountpoint: str
    fstype: str
    device: str | None  # the snapshot disk it lives on (DiskInfo.device), None if unknown
    frozen: bool
    reason: str = ""  # why not frozen (unsupported type, excluded, no agent, ...)


@dataclass(frozen=True, slots=True)
class FsCheck:
    """Offline check of one filesystem of one disk image at the cut."""

    device: str
    fstype: str
    verdict: VerifyVerdict
    detail: str = ""
    log_replayed: bool = False
    partition: str | None = None


@dataclass(frozen=True, slots=True)
class Verification:
    """Result of ``snapshot verify``."""

    verdict: VerifyVerdict
    checked_at: datetime
    checks: tuple[FsCheck, ...] = ()
    bytes_read: int = 0
    duration_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One snapshot set of one VM, successful or failed.

    ``disks`` of a done record are the disks at the cut; of a failed one, those of a cut that
    happened (or may have); of a running one, the overlays prepared so far (not yet switched).
    """

    id: str
    vm: str
    created_at: datetime
    status: SnapshotStatus
    policy: QuiescePolicy
    level: ConsistencyLevel
    level_reason: str = ""
    error: str | None = None  # why it failed; None for a snapshot that did not fail
    parent_id: str | None = None
    disks: tuple[SnapshotDisk, ...] = ()
    filesystems: tuple[SnapshotFilesystem, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()
    freeze_window_ms: float | None = None
    evidence: tuple[str, ...] = ()  # agent log lines from the freeze window
    verification: Verification | None = None

    @property
    def intent_left_open(self) -> bool:
        """True while this snapshot's freeze intent is open although its thaw was confirmed:
        the catalog could not close it (locked, full; timeline ``intent_left_open``) and
        ``freezeframe recover`` has not closed it since (``thaw_confirmed`` after it)."""
        names = [e.name for e in self.timeline]
        if "intent_left_open" not in names:
            return False
        last = len(names) - 1 - names[::-1].index("intent_left_open")
        return "thaw_confirmed" not in names[last + 1 :]

    @property
    def evidence_unavailable(self) -> str | None:
        """Why the agent's log could not be read as evidence (timeline ``evidence_unavailable``),
        None when it was read or not asked for: an empty ``evidence`` is then not "the agent
        logged nothing"."""
        for e in reversed(self.timeline):
            if e.name == "evidence_unavailable":
                return e.detail or "the agent's log could not be read"
        return None

    @property
    def thaw_unconfirmed(self) -> bool:
        """True while the guest may still be frozen by this snapshot: the engine could not
        confirm its thaw (timeline ``thaw_unconfirmed``) and nobody confirmed one since
        (``thaw_confirmed`` by the follow-up or ``freezeframe recover``)."""
        names = [e.name for e in self.timeline]
        if "thaw_unconfirmed" not in names:
            return False
        last = len(names) - 1 - names[::-1].index("thaw_unconfirmed")
        return "thaw_confirmed" not in names[last + 1 :]


@dataclass(frozen=True, slots=True)
class SnapshotSummary:
    """What a list of snapshots shows of one record (the whole record: :class:`SnapshotRecord`).

    The record's own columns, then counts and flags computed by the catalog's query instead of
    loading the child rows: ``disk_count``; ``filesystem_count`` and how many of them were
    ``frozen_count``; the verification's ``verdict`` and ``verified_at`` (None: unverified);
    ``thaw_unconfirmed`` and ``intent_left_open`` as :class:`SnapshotRecord` defines them.
    """

    id: str
    vm: str
    created_at: datetime
    status: SnapshotStatus
    policy: QuiescePolicy
    level: ConsistencyLevel
    error: str | None = None
    parent_id: str | None = None
    freeze_window_ms: float | None = None
    disk_count: int = 0
    filesystem_count: int = 0
    frozen_count: int = 0
    verdict: VerifyVerdict | None = None
    verified_at: datetime | None = None
    thaw_unconfirmed: bool = False
    intent_left_open: bool = False


@dataclass(frozen=True, slots=True)
class ChainImage:
    """One image of a VM disk's chain as the catalog knows it: a file layer (``kind`` ``file``)
    or an RBD snapshot (``rbd-snap``, ``location`` ``rbd:pool/image@snap``).

    ``snapshot_id``: the snapshot whose cut this image holds now (None: nobody's, e.g. the
    layer the disk writes to). ``active``: the disk writes to it. ``backing_id``: the image
    below, when freezeframe manages it (None: the bottom freezeframe knows). ``mode``: the
    file's mode before freezeframe took its write bits away."""

    id: int
    vm: str
    device: str
    location: str
    kind: str
    format: str
    backing_id: int | None = None
    snapshot_id: str | None = None
    active: bool = False
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class MergeIntent:
    """Write-ahead record of one layer merge of ``snapshot delete``: ``top``'s data goes into
    ``base`` (its backing file) of disk ``device``, live (QEMU's block job) or offline
    (qemu-img). ``state``: ``open`` (maybe under way), ``merged`` (the data is in ``base`` and
    the catalog says so; ``top``'s file may still exist), ``done``."""

    id: int
    vm: str
    snapshot_id: str
    device: str
    top: str
    base: str
    live: bool
    state: str
    owner: str
    opened_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A VM's snapshot schedule as the catalog keeps it: a snapshot every ``every_s`` seconds
    (``quiesce``: the policy asked, None: the VM's own), then a prune by the keep rules
    (``keep_*``: slots each rule keeps, None: the rule is off; all None keeps everything).

    ``last_run_at``: when the last run was claimed (the next is due ``every_s`` after it);
    ``run_owner``: the process that claimed it; ``last_snapshot``, ``last_outcome`` (the
    snapshot's outcome code or the error's code), ``last_error``, ``last_prune`` (what the
    prune after it did) and ``last_finished_at``: how that run ended (None while it runs or
    before the first)."""

    vm: str
    every_s: int
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    quiesce: QuiescePolicy | None = None
    enabled: bool = True
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_run_at: datetime | None = None
    run_owner: str | None = None
    last_snapshot: str | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_prune: str | None = None
    last_finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FreezeIntent:
    """Write-ahead record: a freeze may be in effect in ``vm`` until ``closed_at`` is set.

    ``agent_address`` says how to reach the agent that froze it, in the driver's own terms (a
    socket path for ``qmp``, ``libvirt:UUID@URI`` for ``libvirt``; see
    :func:`freezeframe.hypervisor.open_agent`)."""

    id: int
    vm: str
    snapshot_id: str
    agent_address: str
    opened_at: datetime
    owner: str  # host:pid of the process that froze
    closed_at: datetime | None = None
    closed_by: str = ""  # "engine", "engine-followup", "recover"
