"""The hypervisor driver contract: what the engine needs from QMP, libvirt, ...

Owns the abstract :class:`HypervisorDriver` and :class:`PreparedCut`. A driver knows how to list
a running VM's disks, prepare everything for a cut *before* the guest is frozen, switch all disks
at one point in time (:meth:`HypervisorDriver.cut`), and undo a preparation. It never talks to
the guest agent and never decides when to freeze: only :mod:`freezeframe.engine` sequences
freeze -> cut -> thaw.

A driver may also merge one qcow2 layer of a running disk's chain into the layer below it
(:meth:`HypervisorDriver.merge_layer`: :class:`LayerMerge` in, :class:`MergeProgress` while it
runs, :class:`MergeOutcome` out); the engine decides which layer and removes files afterwards.

The driver supplies the guest agent (:meth:`HypervisorDriver.agent_address`,
:meth:`HypervisorDriver.agent_at`): QMP a client on the agent's unix socket, libvirt one that
goes through libvirtd. The agent's *address* is a string in the driver's terms, stored in freeze
intents so that ``freezeframe recover`` reaches the same agent again.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Self

from freezeframe.agent.base import Agent
from freezeframe.errors import HypervisorError, UsageError
from freezeframe.models import DiskInfo, QuiescePolicy, SnapshotDisk, VmConfig

__all__ = [
    "LIVE_MERGE_UNSUPPORTED",
    "MERGE_FAILED",
    "NOT_IN_CHAIN",
    "CutState",
    "DriverCapabilities",
    "DriverCheck",
    "DriverPolicy",
    "HypervisorDriver",
    "LayerMerge",
    "MergeOutcome",
    "MergeProgress",
    "PreparedCut",
    "PreparedDisk",
    "ProgressCallback",
    "locate_layer",
    "merged",
    "same_socket",
]

#: What :meth:`HypervisorDriver.cut_state` found: every disk switched, none, or cannot tell.
CutState = Literal["switched", "not-switched", "unknown"]


@dataclass(frozen=True, slots=True)
class DriverCapabilities:
    """What the planner checks before freezing."""

    atomic_multi_disk: bool  # all disks switch in one atomic operation
    prepare_outside_freeze: bool  # overlays/targets can be created before the freeze
    agent_channel_check: bool  # can tell whether the VM has a guest-agent channel
    pause_resume: bool = False  # can stop/cont the vCPUs (tests, diagnostics)


@dataclass(frozen=True, slots=True)
class DriverCheck:
    """A driver-specific finding for ``freezeframe doctor``: ``ok`` True (pass), False (fail)
    or None (warning), with a fix when there is one. ``refuses``: a snapshot would be refused
    because of it whatever the policy (doctor's verdict then predicts no snapshot at all)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    refuses: bool = False


@dataclass(frozen=True, slots=True)
class DriverPolicy:
    """A policy the hypervisor keeps with the VM itself (libvirt: ``<freezeframe:policy>`` in
    the domain's ``<metadata>``); None fields fall back to freezeframe's registration."""

    agent: bool | None = None
    quiesce: QuiescePolicy | None = None
    freeze_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class PreparedDisk:
    """One disk ready to be cut: ``overlay_node`` is already known to the hypervisor and
    ``overlay_file`` exists; after the cut the VM writes to it and ``image_at_cut``
    (today's top image) holds the disk as it was at the cut."""

    disk: DiskInfo
    overlay_file: str
    overlay_node: str
    image_at_cut: str


@dataclass(frozen=True, slots=True)
class PreparedCut:
    """All disks prepared for one cut (opaque to the engine except for reporting)."""

    snapshot_id: str
    disks: tuple[PreparedDisk, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class LayerMerge:
    """Merge ``top``'s data into ``base`` in disk ``device``'s running chain.

    ``device`` is a :attr:`DiskInfo.device`; ``top`` the file of a layer of that disk's chain
    (its active image or one below); ``base`` the file directly below ``top``, which receives
    ``top``'s data (the caller has given it its write bits back). ``speed``: the most bytes
    per second the job may copy (0: no limit); a limit trades merge time for shorter stalls
    of the guest's writes (bench/merge_bench.py)."""

    device: str
    top: str
    base: str
    speed: int = 0


@dataclass(frozen=True, slots=True)
class MergeProgress:
    """How far a running merge of ``device`` is: ``done`` of ``total`` bytes (the hypervisor's
    job counters; ``total`` may grow while the guest writes to an active layer)."""

    device: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """A finished merge of ``device``. ``active``: ``top`` was the active layer and the disk
    now writes to ``base``; ``already``: nothing was done, ``top`` was already out of the chain
    with ``base`` in it (a previous run finished); ``bytes`` the job's final byte counter (0
    when already): QEMU counts the whole range it walked, so for a layer below the active one
    it is the disk's virtual size, not the data moved (an active commit counts what it
    copied); ``duration_ms`` the wall time of the call."""

    device: str
    active: bool
    already: bool
    bytes: int
    duration_ms: float


#: Called with each progress report of a running merge (must not block).
ProgressCallback = Callable[[MergeProgress], None]

#: HypervisorError codes of :meth:`HypervisorDriver.merge_layer`.
MERGE_FAILED = "merge-failed"
NOT_IN_CHAIN = "not-in-chain"
LIVE_MERGE_UNSUPPORTED = "live-merge-unsupported"


def locate_layer(disk: DiskInfo, merge: LayerMerge, label: str) -> bool | None:
    """Where ``merge.top`` is in ``disk``'s running chain: True when it is the active layer,
    False when below it, None when it is gone and ``merge.base`` is in the chain (a previous
    merge finished). No I/O.

    Raises:
        HypervisorError: code ``not-in-chain``: neither is in the chain, or ``base`` is not
            directly below ``top``.
    """
    chain = [disk.file, *disk.backing]
    if merge.top not in chain:
        if merge.base in chain:
            return None
        raise HypervisorError(
            f"{label}: disk {merge.device}: neither {merge.top} nor {merge.base} is in its "
            "running chain",
            code=NOT_IN_CHAIN,
        )
    i = chain.index(merge.top)
    if chain[i + 1 : i + 2] != [merge.base]:
        raise HypervisorError(
            f"{label}: disk {merge.device}: {merge.base} is not directly below {merge.top} in "
            f"its running chain ({' <- '.join(reversed(chain))})",
            code=NOT_IN_CHAIN,
        )
    return i == 0


def merged(disk: DiskInfo, merge: LayerMerge, active: bool) -> bool:
    """Whether ``disk``'s running chain shows ``merge`` done: ``top`` gone, ``base`` in it (its
    active image after an ``active`` merge). No I/O, never raises."""
    chain = [disk.file, *disk.backing]
    if merge.top in chain or merge.base not in chain:
        return False
    return not active or disk.file == merge.base


def same_socket(a: str, b: str) -> bool:
    """Whether the unix socket paths ``a`` and ``b`` name the same socket: the same device and
    inode when both can be stat'ed, else the same resolved path. Never raises."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class HypervisorDriver(abc.ABC):
    """One connection to one running VM's hypervisor. Use as ``async with``.

    Every method raises :class:`~freezeframe.errors.HypervisorError` (or a subclass) and never
    a foreign error such as ``QMPError`` or ``libvirtError``.
    """

    name: str = "abstract"
    capabilities: DriverCapabilities

    @classmethod
    def from_config(cls, cfg: VmConfig) -> Self:
        """An unconnected driver for the VM ``cfg`` describes. Raises UsageError when ``cfg``
        lacks a setting this driver needs."""
        raise UsageError(f"driver {cls.name!r} cannot be built from a VM configuration")

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect. Raises HypervisorUnavailableError when the VM cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; never raises."""

    @abc.abstractmethod
    async def disks(self) -> list[DiskInfo]:
        """The VM's writable disks with their top node, image file, format and PCI address.
        Excludes CD-ROMs and empty drives."""

    @abc.abstractmethod
    async def agent_channel(self) -> str | None:
        """The guest-agent channel's host-side path (or id) if the VM has a virtio-serial port
        named ``org.qemu.guest_agent.0``; None when it has none."""

    @abc.abstractmethod
    async def prepare_cut(
        self, snapshot_id: str, disks: list[DiskInfo], overlay_dir: str | None = None
    ) -> PreparedCut:
        """Create one overlay per disk (next to its image unless ``overlay_dir``) and make it
        known to the hypervisor, without switching anything. On failure everything already
        prepared is removed and CutError is raised."""

    @abc.abstractmethod
    async def cut(self, prepared: PreparedCut) -> None:
        """Switch every prepared disk to its overlay in ONE atomic operation. On failure
        nothing is switched (the operation is all-or-nothing) and CutError is raised; the
        preparation is still in place, call :meth:`abort`."""

    @abc.abstractmethod
    async def abort(self, prepared: PreparedCut) -> None:
        """Remove a preparation that was not cut: forget the overlay nodes, delete the files.
        Best effort, never raises; logs what it could not remove."""

    async def verify_cut(self, prepared: PreparedCut) -> None:
        """Confirm after the fact that every disk now writes to its overlay (called after the
        thaw, outside the freeze window). Raises CutError naming the disks that did not switch.
        Drivers that cannot tell do nothing."""
        return None

    async def is_gone(self) -> bool:
        """True only when it is certain that the VM is not running (so its guest cannot be
        frozen), without connecting; False when it runs or when that cannot be told. Never
        raises. The default cannot tell."""
        return False

    async def cut_state(self, prepared: PreparedCut) -> CutState:
        """Whether a cut of ``prepared`` is in effect, asked after :meth:`cut` raised (timeout,
        lost connection, cancellation): ``"switched"`` when every disk writes to its overlay,
        ``"not-switched"`` when none does, ``"unknown"`` when the driver cannot tell (or sees
        a state a cut cannot leave). Never raises. Drivers that cannot ask say ``"unknown"``."""
        return "unknown"

    def prepared_for(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> PreparedCut:
        """What :meth:`prepare_cut` would create for ``disks`` (names only, no I/O), so that
        ``freezeframe recover`` can :meth:`abort` leftovers of an attempt whose process died
        before it could record them. Files or nodes that do not exist are fine for abort.

        Raises:
            UsageError: this driver cannot name its preparation in advance.
        """
        raise UsageError(f"driver {self.name!r} cannot name a prepared cut in advance")

    def prepared_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> PreparedCut:
        """Rebuild the preparation of attempt ``snapshot_id`` from the disks its record holds
        (written before the freeze), so that ``freezeframe recover`` can ask :meth:`cut_state`
        and :meth:`abort` it after the process that prepared it died. No I/O.

        Raises:
            UsageError: this driver cannot rebuild a preparation from a record.
        """
        raise UsageError(f"driver {self.name!r} cannot rebuild a prepared cut from its record")

    def cut_problem(self, disk: DiskInfo, overlay_dir: str | None = None) -> str | None:
        """Why ``disk`` cannot be prepared for a cut (with ``overlay_dir``, or next to its
        image when None), for the planner and doctor to report before freezing; None when
        nothing is known to stand in the way. Never raises, does no I/O with the VM."""
        return None

    # ------------------------------------------------------------------ live merge

    async def merge_layer(
        self, merge: LayerMerge, progress: ProgressCallback | None = None
    ) -> MergeOutcome:
        """Merge ``merge.top`` into ``merge.base`` while the VM runs (called while connected),
        calling ``progress`` as the job advances, and return once the chain no longer holds
        ``top``. ``top`` the active layer: an active commit, after which the disk writes to
        ``base``; ``top`` below it: the layer above ``top`` is re-pointed at ``base``. Never
        deletes a file (the caller removes ``top``'s file afterwards).

        Idempotent: a merge job of the device left running (by a process that died) is
        attached to and followed; a chain without ``top`` but with ``base`` gives
        ``already=True``. Cancelling the call leaves a started job running in the hypervisor
        (the next call attaches to it).

        Raises:
            HypervisorError: code ``not-in-chain`` (no such disk, or ``top`` and ``base`` are
                not adjacent in its running chain), ``merge-failed`` (the job failed or was
                cancelled; the chain still holds ``top``), ``live-merge-unsupported`` (this
                driver cannot merge while the VM runs: the default); a subclass when the
                hypervisor cannot be reached.
        """
        raise HypervisorError(
            f"driver {self.name!r} cannot merge a layer while the VM runs",
            hint="stop the VM and merge its images offline",
            code=LIVE_MERGE_UNSUPPORTED,
        )

    # ------------------------------------------------------------------ the agent

    def agent_address(self, cfg: VmConfig, channel: str | None) -> str | None:
        """The address of ``cfg``'s guest agent, given the channel :meth:`agent_channel`
        reported (None when the driver cannot check channels, or found none); None when no
        address is known. No I/O, never raises. The default: the registered socket path, else
        the channel when it is a socket path."""
        if cfg.qga_path:
            return cfg.qga_path
        return channel if channel and channel.startswith("/") else None

    def agent_elsewhere(self, address: str, channel: str | None) -> str | None:
        """When the agent at ``address`` (from :meth:`agent_address`) is provably not the one
        behind this VM's own agent port ``channel`` (from :meth:`agent_channel`): that port as
        the hypervisor serves it (its socket path, or its chardev when that is no unix socket),
        for the refusal to name. None when they are the same, or cannot be compared (no
        channel known, or an address that is no socket path: a driver that supplies the agent
        itself, as libvirt does). Only ``stat``; never raises.

        The default compares unix socket paths by device and inode (a symlink or another name
        of the same socket is the same), by their resolved paths when one cannot be stat'ed.
        """
        if not address.startswith("/") or channel is None:
            return None
        if not channel.startswith("/"):
            return f"chardev {channel} (not a unix socket)"
        return None if same_socket(address, channel) else channel

    @classmethod
    def agent_at(cls, address: str, *, timeout: float) -> Agent:
        """An unconnected agent client for ``address`` (from :meth:`agent_address` or a freeze
        intent); usable without connecting the driver (``recover`` after a crash). The
        default: a :class:`~freezeframe.agent.GuestAgent` on the unix socket ``address``."""
        from freezeframe.agent.client import GuestAgent

        return GuestAgent(address, timeout=timeout)

    async def policy(self) -> DriverPolicy | None:
        """The policy kept with the VM by the hypervisor, if any (called while connected).
        Never raises; the default has none."""
        return None

    async def checks(self) -> list[DriverCheck]:
        """Driver-specific findings for ``doctor`` (called while connected). Never raises;
        the default has none."""
        return []

    async def run_state(self) -> str | None:
        """The VM's run state as the hypervisor says it (``running``, ``paused``,
        ``io-error``, ...), asked when the agent does not answer, to name the real reason;
        None when it cannot be told. Never raises. The default cannot tell."""
        return None

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``). Optional capability."""
        raise NotImplementedError

    async def resume(self) -> None:
        """Resume the vCPUs (QMP ``cont``). Optional capability."""
        raise NotImplementedError

    async def restart_on(self, images: dict[str, str], *, stop_timeout: float = 60.0) -> None:
        """Stop the VM (a clean shutdown, then a hard stop after ``stop_timeout`` seconds),
        make each disk ``device`` of ``images`` start on ``images[device]`` (a qcow2 image
        whose backing chain it keeps), and start the VM again (a restore). Called without
        :meth:`connect`. Optional capability: a driver that cannot start its VM (QEMU known by
        its sockets) raises UsageError with code ``restart-unsupported``; errors:
        HypervisorError (``restore-transient-domain``, ``restore-unknown-disk``, ...)."""
        raise UsageError(
            "this hypervisor driver cannot stop and start its VM",
            code="restart-unsupported",
        )
