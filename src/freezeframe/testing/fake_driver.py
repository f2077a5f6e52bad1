"""An in-memory hypervisor for tests: :class:`FakeDriver` over a :class:`FakeHost` of
:class:`FakeVm`.

Owns the host side of the fake world. A :class:`FakeVm` has disks (:class:`FakeDisk`: target
name, format, size; each with an image chain held in memory, no files), an optional guest agent
(:class:`~freezeframe.testing.FakeGuest`; None: no agent channel) and scripted faults
(:class:`CutFault`, a failing preparation, a hung or stopped QEMU). :class:`FakeDriver` is a
complete :class:`~freezeframe.hypervisor.HypervisorDriver` on it: ``prepare_cut`` adds an
overlay image and node per disk, ``cut`` switches every disk to its overlay at once (or none),
``cut_state`` / ``verify_cut`` / ``abort`` look at which image each disk writes to, like the QMP
driver does with ``query-block``; ``merge_layer`` merges a layer of a disk's chain into the one
below it as a job (:attr:`FakeVm.merge_jobs`) that advances in steps and can be scripted to fail
midway or to be left running (:class:`MergeFault`), like a QEMU block-commit job.

Registered as driver ``fake`` (entry point group ``freezeframe.drivers``), for tests only:
``VmConfig(driver="fake")`` finds its VM by ``domain`` or ``name`` in the current host
(:meth:`FakeHost.current`, a module-level registry; install one with ``with FakeHost() as
host:``), and its agent address is ``fake:<vm>``, so the engine, ``recover`` and ``doctor``
reach the fakes through the ordinary driver lookup.

Every driver method raises only :class:`~freezeframe.errors.HypervisorError` and its
subclasses (CutError, HypervisorUnavailableError) or UsageError where the driver contract says
so; the host's own helpers raise ValueError / KeyError for a mistake in the test's setup.
Everything belongs to one event loop at a time.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

from freezeframe.agent.base import Agent
from freezeframe.errors import CutError, HypervisorError, HypervisorUnavailableError, UsageError
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
from freezeframe.models import DiskInfo, PciAddress, QuiescePolicy, SnapshotDisk, VmConfig
from freezeframe.testing.fake_agent import FakeAgent, FakeFilesystem, FakeGuest

__all__ = [
    "ADDRESS_PREFIX",
    "CutFault",
    "FakeDisk",
    "FakeDriver",
    "FakeHost",
    "FakeVm",
    "MergeFault",
    "MergeJob",
]

#: Agent addresses of fake VMs are ``fake:<vm>``.
ADDRESS_PREFIX = "fake:"

_OVERLAY_SUFFIX = re.compile(r"\.ff-[A-Za-z0-9_-]+$")


class CutFault(enum.Enum):
    """A scripted misbehaviour of :meth:`FakeDriver.cut` (see :attr:`FakeVm.cut_fault`)."""

    #: Refused: CutError, nothing switched.
    FAIL = "fail"
    #: No answer until cancelled, nothing switched (the engine's deadline ends it).
    HANG = "hang"
    #: Every disk switched, then CutError as if the reply was lost (outcome unknown).
    LOST_REPLY = "lost-reply"
    #: Every disk switched, then no answer until cancelled.
    HANG_AFTER_SWITCH = "hang-after-switch"


class MergeFault(enum.Enum):
    """A scripted misbehaviour of :meth:`FakeDriver.merge_layer` (see :attr:`FakeVm.merge_fault`),
    consumed by the merge job it hits."""

    #: The job fails halfway (an I/O error): HypervisorError ``merge-failed``, chain unchanged.
    FAIL = "fail"
    #: The job starts, then the connection breaks (HypervisorUnavailableError): the job stays
    #: running in the fake hypervisor, as one a killed freezeframe left; the next call attaches.
    LOST = "lost"
    #: The job gets halfway and then waits until the call is cancelled; it stays running.
    HANG = "hang"


@dataclass(slots=True)
class MergeJob:
    """A merge job of a fake disk: ``top`` into ``base``, ``done`` of ``total`` bytes."""

    top: str
    base: str
    active: bool
    total: int
    done: int = 0


#: Steps a fake merge job takes from 0 to ``total``.
MERGE_STEPS = 4


@dataclass(frozen=True, slots=True)
class FakeDisk:
    """A disk of a fake VM. ``image`` is its base image's name (default
    ``fake:<vm>/<device>.qcow2``); ``cut_problem`` makes :meth:`FakeDriver.cut_problem` report
    it (a disk that cannot be cut); ``read_only`` disks are not listed by ``disks()``."""

    device: str
    format: str = "qcow2"
    virtual_size: int = 1 << 30
    image: str | None = None
    pci: PciAddress | None = None
    serial: str | None = None
    read_only: bool = False
    cut_problem: str | None = None


@dataclass(slots=True)
class _Disk:
    """A disk's live state: its image chain, top first, and the node of its top image."""

    spec: FakeDisk
    chain: list[str]
    node: str

    def info(self) -> DiskInfo:
        return DiskInfo(
            device=self.spec.device,
            node=self.node,
            file=self.chain[0],
            format="qcow2" if len(self.chain) > 1 else self.spec.format,
            virtual_size=self.spec.virtual_size,
            backing=tuple(self.chain[1:]),
            pci=self.spec.pci,
            serial=self.spec.serial,
            read_only=self.spec.read_only,
        )


class FakeVm:
    """One fake VM: disks, an optional guest (None: no guest-agent channel), faults.

    Mutable test knobs: ``running`` (False: stopped, ``is_gone``), ``reachable`` (False: QEMU
    hangs: connect fails, ``is_gone`` cannot tell), ``cut_fault``, ``prepare_fails`` (the next
    preparations raise CutError), ``merge_fault`` (:class:`MergeFault`), ``layer_bytes`` (what
    a merge job counts per layer), ``checks`` (what ``doctor`` gets from the driver), ``policy``
    (a policy kept with the VM by the hypervisor, like libvirt's domain metadata). ``ops``
    records every driver operation (``prepare``, ``cut``, ``abort``, ``merge``, ``pause``,
    ``resume``); ``merge_jobs`` the merge jobs running, by device.
    """

    def __init__(
        self,
        name: str,
        disks: Iterable[FakeDisk] = (FakeDisk("disk0"),),
        *,
        guest: FakeGuest | None = None,
        domain: str | None = None,
    ) -> None:
        self.name = name
        self.domain = domain
        self.guest = guest
        self.running = True
        self.reachable = True
        self.paused = False
        self.cut_fault: CutFault | None = None
        self.prepare_fails = False
        self.merge_fault: MergeFault | None = None
        self.layer_bytes = 4 << 20
        self.merge_jobs: dict[str, MergeJob] = {}
        self.checks: list[DriverCheck] = []
        self.policy: DriverPolicy | None = None
        #: The agent address the VM's registration names, when it is not its own (another
        #: fake VM's ``fake:<name>``, as ``vm add --qga`` with a neighbour's socket): what
        #: :meth:`FakeDriver.agent_address` returns then.
        self.registered_agent: str | None = None
        self.ops: list[str] = []
        self._disks: dict[str, _Disk] = {}
        #: Every image that exists: name -> the node that has it open (None: no node).
        self.images: dict[str, str | None] = {}
        for spec in disks:
            if spec.device in self._disks:
                raise ValueError(f"disk {spec.device} is listed twice")
            image = spec.image or f"{ADDRESS_PREFIX}{name}/{spec.device}.qcow2"
            node = f"node-{spec.device}"
            self._disks[spec.device] = _Disk(spec, [image], node)
            self.images[image] = node

    @classmethod
    def simple(
        cls,
        name: str,
        fstypes: Sequence[str] = ("ext4", "xfs"),
        *,
        agent_channel: bool = True,
        agent_running: bool = True,
    ) -> FakeVm:
        """A VM like the lab's: disk ``diskN`` carrying a ``fstypes[N]`` filesystem mounted at
        ``/mnt/diskN``; a guest agent (``agent_running``) behind a channel (``agent_channel``)."""
        disks = [FakeDisk(f"disk{i}") for i in range(len(fstypes))]
        fs = [
            FakeFilesystem(f"/mnt/disk{i}", fstype, disks=(f"disk{i}",), name=f"vd{chr(98 + i)}")
            for i, fstype in enumerate(fstypes)
        ]
        guest = FakeGuest(fs, agent_running=agent_running) if agent_channel else None
        return cls(name, disks, guest=guest)

    def config(self, **changes: Any) -> VmConfig:
        """The VM's registration (driver ``fake``), with ``changes`` applied."""
        cfg = VmConfig(
            name=self.name,
            driver="fake",
            domain=self.domain,
            agent=True,
            quiesce=QuiescePolicy.PREFERRED,
            agent_log_path=self.guest.log_path if self.guest is not None else None,
        )
        return replace(cfg, **changes)

    @property
    def address(self) -> str:
        """The agent address of this VM (``fake:<name>``)."""
        return f"{ADDRESS_PREFIX}{self.name}"

    def active_images(self) -> dict[str, str]:
        """Device -> the image the disk writes to now."""
        return {dev: d.chain[0] for dev, d in self._disks.items()}

    def boot_from(self, device: str, image: str) -> None:
        """Restart ``device`` on ``image`` alone (as an operator restarting QEMU on the disk's
        original image does): the disk writes to it from now on. Raises KeyError for an
        unknown disk."""
        disk = self._disks[device]
        disk.chain = [image]
        self.images.setdefault(image, disk.node)

    def leave_merge(self, device: str, top: str, *, done: int = 0) -> MergeJob:
        """Start a merge job of ``top`` into the layer below it on ``device`` and leave it
        running, as a freezeframe killed during a merge does. Raises KeyError (unknown disk),
        ValueError (``top`` is no layer with one below it)."""
        chain = self._disks[device].chain
        i = chain.index(top)
        if i + 1 >= len(chain):
            raise ValueError(f"{top} has no layer below it")
        job = MergeJob(top, chain[i + 1], i == 0, self.layer_bytes, done)
        self.merge_jobs[device] = job
        return job

    def chain(self, device: str) -> list[str]:
        """The image chain of ``device``, top first. Raises KeyError for an unknown disk."""
        return list(self._disks[device].chain)

    def disk_infos(self) -> list[DiskInfo]:
        return [d.info() for d in self._disks.values() if not d.spec.read_only]

    def spec(self, device: str) -> FakeDisk | None:
        disk = self._disks.get(device)
        return disk.spec if disk is not None else None

    def close(self) -> None:
        """End what its guest has in flight (test teardown). Never raises."""
        if self.guest is not None:
            self.guest.close()


class FakeHost:
    """The fake VMs drivers can reach. ``with FakeHost() as host:`` makes it the current one
    (:meth:`current`) and, on exit, closes its guests and restores the previous one."""

    _current: FakeHost | None = None

    def __init__(self, vms: Iterable[FakeVm] = ()) -> None:
        self.vms: dict[str, FakeVm] = {}
        self._previous: list[FakeHost | None] = []
        for vm in vms:
            self.add(vm)

    @classmethod
    def current(cls) -> FakeHost:
        """The host :class:`FakeDriver` looks VMs up in (an empty one if none was installed)."""
        if cls._current is None:
            cls._current = FakeHost()
        return cls._current

    def install(self) -> Self:
        """Make this the current host (until :meth:`uninstall`)."""
        self._previous.append(FakeHost._current)
        FakeHost._current = self
        return self

    def uninstall(self) -> None:
        """Restore the host that was current before :meth:`install`; close the guests."""
        for vm in self.vms.values():
            vm.close()
        if self._previous:
            FakeHost._current = self._previous.pop()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def add(self, vm: FakeVm) -> FakeVm:
        """Add ``vm``. Raises ValueError when its name (or domain) is taken."""
        for key in {vm.name, vm.domain} - {None}:
            if self.find(str(key)) is not None:
                raise ValueError(f"a fake VM {key!r} exists already")
        self.vms[vm.name] = vm
        return vm

    def remove(self, name: str) -> None:
        """Forget VM ``name`` (as if it was undefined). Raises KeyError if unknown."""
        self.vms.pop(name).close()

    def find(self, key: str) -> FakeVm | None:
        """The VM named ``key``, or whose domain is ``key``."""
        vm = self.vms.get(key)
        if vm is not None:
            return vm
        return next((v for v in self.vms.values() if v.domain == key), None)


def _overlay_file(disk: DiskInfo, snapshot_id: str, overlay_dir: str | None) -> str:
    """``<image stem>.ff-<id>.qcow2`` next to the image (or in ``overlay_dir``), like QMP."""
    stem = disk.file.removesuffix(".qcow2")
    stem = _OVERLAY_SUFFIX.sub("", stem)
    if overlay_dir is not None:
        stem = f"{overlay_dir.rstrip('/')}/{stem.rsplit('/', 1)[-1]}"
    return f"{stem}.ff-{snapshot_id}.qcow2"


def _overlay_node(snapshot_id: str, device: str) -> str:
    return f"ff-{snapshot_id}-{device}"


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


class FakeDriver(HypervisorDriver):
    """The ``fake`` driver, FOR TESTS ONLY: reaches :class:`FakeVm` ``vm`` of ``host`` (default:
    the current :class:`FakeHost`, looked up when connecting). See the module docstring."""

    name = "fake"
    capabilities = DriverCapabilities(
        atomic_multi_disk=True,
        prepare_outside_freeze=True,
        agent_channel_check=True,
        pause_resume=True,
    )

    def __init__(self, vm: str, *, host: FakeHost | None = None) -> None:
        self.vm_name = vm
        self._host = host
        self._vm: FakeVm | None = None

    @classmethod
    def from_config(cls, cfg: VmConfig) -> Self:
        """A driver for the fake VM of the current host named (or with the domain)
        ``cfg.domain``, else ``cfg.name``. Raises nothing: a VM that does not exist fails at
        :meth:`connect`."""
        if cfg.domain and FakeHost.current().find(cfg.domain) is not None:
            return cls(cfg.domain)
        return cls(cfg.name)

    @property
    def host(self) -> FakeHost:
        return self._host or FakeHost.current()

    def _find(self) -> FakeVm | None:
        return self.host.find(self.vm_name)

    def _need(self) -> FakeVm:
        vm = self._vm
        if vm is None:
            raise HypervisorUnavailableError(f"fake VM {self.vm_name!r}: not connected")
        if not vm.running or not vm.reachable or self._find() is not vm:
            self._vm = None
            raise HypervisorUnavailableError(f"fake VM {self.vm_name!r}: the connection broke")
        return vm

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Raises HypervisorUnavailableError when the VM does not exist, is stopped or hangs."""
        vm = self._find()
        if vm is None or not vm.running:
            raise HypervisorUnavailableError(
                f"fake VM {self.vm_name!r} is not running", hint="is the VM running?"
            )
        if not vm.reachable:
            raise HypervisorUnavailableError(f"fake VM {self.vm_name!r} does not answer")
        self._vm = vm

    async def close(self) -> None:
        """Disconnect; never raises."""
        self._vm = None

    async def is_gone(self) -> bool:
        """True when the VM does not exist on the host or is stopped."""
        vm = self._find()
        return vm is None or not vm.running

    async def disks(self) -> list[DiskInfo]:
        """The writable disks, each with its top image and chain. Raises
        HypervisorUnavailableError when not connected or the VM stopped meanwhile (as every
        method that needs the connection does)."""
        return self._need().disk_infos()

    async def agent_channel(self) -> str | None:
        """``fake:<vm>`` when the VM has a guest (agent channel), else None."""
        vm = self._need()
        return vm.address if vm.guest is not None else None

    def agent_address(self, cfg: VmConfig, channel: str | None) -> str | None:
        """``fake:<vm>`` (or :attr:`FakeVm.registered_agent`) when the VM has an agent channel,
        else None."""
        if channel is None:
            return None
        vm = self._find()
        if vm is not None and vm.registered_agent is not None:
            return vm.registered_agent
        return f"{ADDRESS_PREFIX}{self.vm_name}"

    def agent_elsewhere(self, address: str, channel: str | None) -> str | None:
        """``channel`` when ``address`` is another fake VM's agent
        (:attr:`FakeVm.registered_agent`)."""
        if channel is None or not address.startswith(ADDRESS_PREFIX):
            return None
        return None if address == channel else channel

    @classmethod
    def agent_at(cls, address: str, *, timeout: float) -> Agent:
        """A :class:`~freezeframe.testing.FakeAgent` on the guest of the VM ``address`` names
        in the current host (one that cannot connect when there is no such VM or guest)."""
        vm = FakeHost.current().find(address.removeprefix(ADDRESS_PREFIX))
        guest = vm.guest if vm is not None else None
        return FakeAgent(guest, address=address, timeout=timeout)

    async def policy(self) -> DriverPolicy | None:
        """:attr:`FakeVm.policy`; never raises."""
        vm = self._find()
        return vm.policy if vm is not None else None

    async def checks(self) -> list[DriverCheck]:
        """:attr:`FakeVm.checks`; never raises."""
        vm = self._find()
        return list(vm.checks) if vm is not None else []

    # ------------------------------------------------------------------ the cut

    def cut_problem(self, disk: DiskInfo, overlay_dir: str | None = None) -> str | None:
        """:attr:`FakeDisk.cut_problem` of the disk; never raises."""
        vm = self._find()
        spec = vm.spec(disk.device) if vm is not None else None
        return spec.cut_problem if spec is not None else None

    async def prepare_cut(
        self, snapshot_id: str, disks: list[DiskInfo], overlay_dir: str | None = None
    ) -> PreparedCut:
        """Add an overlay image and node per disk. Raises CutError (nothing left behind) for
        no disks, a disk listed twice or unknown, an overlay that exists, ``prepare_fails``."""
        vm = self._need()
        vm.ops.append("prepare")
        devices = [d.device for d in disks]
        if not disks:
            raise CutError(f"fake VM {vm.name}: no disks to prepare")
        if len(set(devices)) != len(devices):
            raise CutError(f"fake VM {vm.name}: a disk is listed twice: {devices}")
        if vm.prepare_fails:
            raise CutError(f"fake VM {vm.name}: preparing the cut failed (scripted)")
        prepared = self.prepared_for(snapshot_id, disks, overlay_dir)
        for p in prepared.disks:
            if p.disk.device not in vm.active_images():
                raise CutError(f"fake VM {vm.name}: no disk {p.disk.device}")
            if p.overlay_file in vm.images:
                raise CutError(f"fake VM {vm.name}: overlay {p.overlay_file} already exists")
        for p in prepared.disks:
            vm.images[p.overlay_file] = p.overlay_node
        return prepared

    async def cut(self, prepared: PreparedCut) -> None:
        """Switch every disk to its overlay at once. Raises CutError (nothing switched) when a
        disk's top is not the prepared ``image_at_cut`` or an overlay is not prepared, or as
        :attr:`FakeVm.cut_fault` says."""
        vm = self._need()
        vm.ops.append("cut")
        if not prepared.disks:
            raise CutError(f"fake VM {vm.name}: nothing to cut")
        fault = vm.cut_fault
        if fault is CutFault.FAIL:
            raise CutError(f"fake VM {vm.name}: the cut was refused (scripted), no disk switched")
        if fault is CutFault.HANG:
            await _forever()
        wrong = []
        for p in prepared.disks:
            disk = vm._disks.get(p.disk.device)
            if disk is None or disk.chain[0] != p.image_at_cut:
                wrong.append(f"{p.disk.device}: its top is not {p.image_at_cut}")
            elif vm.images.get(p.overlay_file, "") != p.overlay_node:
                wrong.append(f"{p.disk.device}: overlay {p.overlay_node} is not prepared")
        if wrong:
            raise CutError(f"fake VM {vm.name}: the cut was refused: {'; '.join(wrong)}")
        for p in prepared.disks:
            disk = vm._disks[p.disk.device]
            disk.chain.insert(0, p.overlay_file)
            disk.node = p.overlay_node
        if fault is CutFault.LOST_REPLY:
            raise CutError(f"fake VM {vm.name}: the cut's outcome is unknown (scripted)")
        if fault is CutFault.HANG_AFTER_SWITCH:
            await _forever()

    def _states(self, vm: FakeVm, prepared: PreparedCut) -> list[str]:
        out = []
        for p in prepared.disks:
            disk = vm._disks.get(p.disk.device)
            if disk is None:
                out.append("gone")
            elif disk.chain[0] == p.overlay_file and disk.chain[1:2] == [p.image_at_cut]:
                out.append("switched")
            elif p.overlay_file not in disk.chain:
                out.append("not-switched")
            else:
                out.append("other")
        return out

    async def verify_cut(self, prepared: PreparedCut) -> None:
        """Raises CutError naming the disks that do not write to their overlay."""
        vm = self._need()
        states = self._states(vm, prepared)
        wrong = [
            p.disk.device for p, s in zip(prepared.disks, states, strict=True) if s != "switched"
        ]
        if wrong:
            raise CutError(f"fake VM {vm.name}: cut not in effect on {', '.join(wrong)}")

    async def cut_state(self, prepared: PreparedCut) -> CutState:
        """``switched`` / ``not-switched`` from the disks' chains; ``unknown`` when the VM
        cannot be asked or a disk is in a state no cut leaves. Never raises."""
        vm = self._find()
        if vm is None or not vm.running or not vm.reachable:
            return "unknown"
        states = set(self._states(vm, prepared))
        if states == {"switched"}:
            return "switched"
        if states <= {"not-switched"}:
            return "not-switched"
        return "unknown"

    async def abort(self, prepared: PreparedCut) -> None:
        """Forget each overlay no disk uses; keeps everything when the VM cannot be asked."""
        vm = self._find()
        if vm is None or not vm.running or not vm.reachable:
            return
        vm.ops.append("abort")
        in_use = {image for d in vm._disks.values() for image in d.chain}
        for p in prepared.disks:
            if p.overlay_file not in in_use:
                vm.images.pop(p.overlay_file, None)

    def prepared_for(
        self, snapshot_id: str, disks: Sequence[DiskInfo], overlay_dir: str | None = None
    ) -> PreparedCut:
        """What :meth:`prepare_cut` makes for ``disks`` (names only). Raises nothing."""
        return PreparedCut(
            snapshot_id,
            tuple(
                PreparedDisk(
                    d,
                    _overlay_file(d, snapshot_id, overlay_dir),
                    _overlay_node(snapshot_id, d.device),
                    d.file,
                )
                for d in disks
            ),
        )

    def prepared_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> PreparedCut:
        """Raises UsageError when a disk of the record has no overlay."""
        out = []
        for d in disks:
            if d.overlay is None:
                raise UsageError(f"snapshot {snapshot_id}: disk {d.device} has no overlay")
            info = DiskInfo(d.device, d.node, d.image, d.format, d.virtual_size)
            out.append(PreparedDisk(info, d.overlay, _overlay_node(snapshot_id, d.device), d.image))
        return PreparedCut(snapshot_id, tuple(out))

    # ------------------------------------------------------------------ live merge

    async def merge_layer(
        self, merge: LayerMerge, progress: ProgressCallback | None = None
    ) -> MergeOutcome:
        """Merge ``top`` into ``base`` as a job of :data:`MERGE_STEPS` steps, reporting each.
        Attaches to a job of the device left running (:meth:`FakeVm.leave_merge`,
        :attr:`MergeFault.LOST`, :attr:`MergeFault.HANG`); ``already=True`` when ``top`` is
        out of the chain and ``base`` in it. Raises HypervisorError ``not-in-chain`` /
        ``merge-failed``, HypervisorUnavailableError (not connected; :attr:`MergeFault.LOST`)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        vm = self._need()
        vm.ops.append("merge")
        disk = vm._disks.get(merge.device)
        if disk is None:
            raise HypervisorError(f"fake VM {vm.name}: no disk {merge.device}", code=NOT_IN_CHAIN)
        job = vm.merge_jobs.get(merge.device)
        if job is not None:
            await self._follow(vm, disk, job, progress)
            if merged(disk.info(), merge, job.active):
                ms = (loop.time() - start) * 1000
                return MergeOutcome(merge.device, job.active, False, job.total, ms)
        where = locate_layer(disk.info(), merge, f"fake VM {vm.name}")
        if where is None:
            ms = (loop.time() - start) * 1000
            return MergeOutcome(merge.device, disk.chain[0] == merge.base, True, 0, ms)
        job = MergeJob(merge.top, merge.base, where, vm.layer_bytes)
        vm.merge_jobs[merge.device] = job
        if vm.merge_fault is MergeFault.LOST:
            vm.merge_fault = None
            job.done = job.total // 2
            self._vm = None
            raise HypervisorUnavailableError(
                f"fake VM {vm.name}: the connection broke during the merge (scripted)"
            )
        await self._follow(vm, disk, job, progress)
        return MergeOutcome(
            merge.device, job.active, False, job.total, (loop.time() - start) * 1000
        )

    async def _follow(
        self, vm: FakeVm, disk: _Disk, job: MergeJob, progress: ProgressCallback | None
    ) -> None:
        """Run ``job`` to its end: the chain loses ``top`` (an active job: the disk writes to
        ``base``), the job goes. Raises HypervisorError ``merge-failed`` (MergeFault.FAIL)."""
        step = max(1, job.total // MERGE_STEPS)
        while True:
            if progress is not None:
                progress(MergeProgress(disk.spec.device, job.done, job.total))
            if job.done >= job.total:
                break
            await asyncio.sleep(0)
            job.done = min(job.total, job.done + step)
            if job.done * 2 >= job.total and vm.merge_fault is not None:
                fault, vm.merge_fault = vm.merge_fault, None
                if fault is MergeFault.FAIL:
                    del vm.merge_jobs[disk.spec.device]
                    raise HypervisorError(
                        f"fake VM {vm.name}: disk {disk.spec.device}: the merge failed "
                        "(scripted I/O error)",
                        code=MERGE_FAILED,
                    )
                if fault is MergeFault.HANG:
                    await _forever()
        del vm.merge_jobs[disk.spec.device]
        if job.top in disk.chain:
            disk.chain.remove(job.top)
        vm.images[job.top] = None
        if job.active:
            disk.node = vm.images.get(job.base) or f"node-{disk.spec.device}"

    # ------------------------------------------------------------------ vCPUs

    async def run_state(self) -> str | None:
        """``paused`` while :meth:`pause` holds the fake vCPUs, else ``running``."""
        vm = self._vm
        if vm is None:
            return None
        return "paused" if vm.paused else "running"

    async def pause(self) -> None:
        """Pause the vCPUs: the guest agent stops running commands (they queue up)."""
        vm = self._need()
        vm.ops.append("pause")
        vm.paused = True
        if vm.guest is not None:
            vm.guest.pause()

    async def resume(self) -> None:
        """Resume the vCPUs: the guest runs the queued commands in order."""
        vm = self._need()
        vm.ops.append("resume")
        vm.paused = False
        if vm.guest is not None:
            vm.guest.resume()
