"""The hypervisor driver contract: what the engine needs from QMP, libvirt, ...

Owns the abstract :class:`HypervisorDriver` and :class:`PreparedCut`. A driver knows how to list
a running VM's disks, prepare everything for a cut *before* the guest is frozen, switch all disks
at one point in time (:meth:`HypervisorDriver.cut`), and undo a preparation. It never talks to
the guest agent and never decides when to freeze: only :mod:`freezeframe.engine` sequences
freeze -> cut -> thaw.

The driver supplies the guest agent (:meth:`HypervisorDriver.agent_address`,
:meth:`HypervisorDriver.agent_at`): QMP a client on the agent's unix socket, libvirt one that
goes through libvirtd. The agent's *address* is a string in the driver's terms, stored in freeze
intents so that ``freezeframe recover`` reaches the same agent again.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Self

from freezeframe.agent.base import Agent
from freezeframe.errors import UsageError
from freezeframe.models import DiskInfo, QuiescePolicy, SnapshotDisk, VmConfig

__all__ = [
    "CutState",
    "DriverCapabilities",
    "DriverCheck",
    "DriverPolicy",
    "HypervisorDriver",
    "PreparedCut",
    "PreparedDisk",
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
