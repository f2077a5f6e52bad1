"""Rigs: one per hypervisor driver, each giving the contract scenarios the same VMs and the same
ways to look at them, independently of the driver under test.

A rig is one :class:`Rig` subclass plus one entry in :data:`RIG_PARAMS` (and :data:`RIGS`).
The scenarios in ``test_engine_contract.py`` only use what :class:`Rig` declares:

- a fresh catalog per test (:attr:`Rig.catalog`) in which each ``vm_*`` method registers the
  VM it returns (``vm_with_agent``: ext4 + xfs data disks and a working guest agent;
  ``vm_without_agent_channel``: no guest-agent channel at all, registered with ``agent=True`` so
  the driver's channel check decides; ``vm_with_hung_agent``: a freeze that does not answer,
  with the Snapshotter hooks that make it so, if any);
- ground truth read around the driver: which image each disk writes to (:meth:`Rig.images`),
  which images exist (:meth:`Rig.image_files`), whether the guest is frozen
  (:meth:`Rig.is_frozen`), how many freeze requests reached the guest's agent
  (:meth:`Rig.freeze_requests`), and a way to freeze the guest out of band (:meth:`Rig.freeze`).

Rigs may reuse a VM across the tests of a module (real VMs cost seconds to boot); every
scenario leaves its VM thawed and running, and :meth:`Rig.stop` heals what a failed test left.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypedDict, TypeVar

import pytest
from qemu.qmp import QMPClient

from freezeframe.agent import Agent, GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine.snapshot import Hook
from freezeframe.hypervisor import HypervisorDriver, open_agent
from freezeframe.hypervisor.libvirt import LibvirtDriver
from freezeframe.lab import LabVm, lab_down, lab_up
from freezeframe.lab.workload import SEQ_PATH
from freezeframe.models import FsFreezeState
from freezeframe.testing import AgentFault, FakeHost, FakeVm
from tests.integration.libvirt_helpers import domblklist, virsh

__all__ = [
    "PAUSE_HOOKS",
    "RIGS",
    "RIG_PARAMS",
    "FakeRig",
    "Hooks",
    "LabPool",
    "QmpRig",
    "Rig",
    "RigVm",
    "dead_owner",
]

T = TypeVar("T")


class Hooks(TypedDict, total=False):
    """The Snapshotter hooks a VM needs (its keyword arguments of the same names)."""

    before_freeze: Hook
    after_thaw: Hook


@dataclass(frozen=True)
class RigVm:
    """A VM a rig registered in its catalog under ``name``; ``hooks`` are the Snapshotter
    keyword arguments a scenario must pass for this VM (``before_freeze`` / ``after_thaw``)."""

    name: str
    hooks: Hooks = field(default_factory=lambda: Hooks())
    #: Rig-private handle (a FakeVm, a LabVm, ...).
    handle: Any = None


async def _pause(_vm: str, driver: HypervisorDriver) -> None:
    await driver.pause()


async def _resume(_vm: str, driver: HypervisorDriver) -> None:
    await driver.resume()


#: A hung agent on a real guest: the vCPUs stop right before the freeze is sent (it cannot
#: answer) and run again after the thaw attempt (test_snapshot.py's "late freeze" pattern).
PAUSE_HOOKS = Hooks(before_freeze=_pause, after_thaw=_resume)


def dead_owner() -> str:
    """An owner string (host:pid:token) of a process of this host that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


class Rig(abc.ABC):
    """The VMs and the ground truth of one driver, for one test. See the module docstring."""

    #: The driver's name (``VmConfig.driver``).
    driver: ClassVar[str]
    #: Whether the rig boots lab VMs (it then gets the module's :class:`LabPool`).
    needs_lab: ClassVar[bool] = False

    def __init__(self, catalog: Catalog, pool: LabPool | None) -> None:
        self.catalog = catalog
        self.pool = pool

    async def start(self) -> None:
        """Set up what the rig needs for one test (before any ``vm_*`` call)."""
        return None

    async def stop(self) -> None:
        """Undo :meth:`start`; leave reused VMs thawed and running. Never raises."""
        return None

    @abc.abstractmethod
    async def vm_with_agent(self) -> RigVm:
        """Disks ext4 + xfs, each one filesystem, and a working guest agent."""

    @abc.abstractmethod
    async def vm_without_agent_channel(self) -> RigVm:
        """A VM without any guest-agent channel, registered with ``agent=True``."""

    @abc.abstractmethod
    async def vm_with_hung_agent(self) -> RigVm:
        """A VM whose agent answers everything but the freeze (with ``hooks``, if needed)."""

    @abc.abstractmethod
    async def images(self, vm: RigVm) -> dict[str, str]:
        """Disk (``DiskInfo.device``) -> the image it writes to now, read around the driver."""

    @abc.abstractmethod
    async def image_files(self, vm: RigVm) -> set[str]:
        """Every image of the VM that exists (overlays prepared and not removed included)."""

    @abc.abstractmethod
    async def is_frozen(self, vm: RigVm) -> bool:
        """Whether the guest's filesystems are frozen now (False without an agent)."""

    @abc.abstractmethod
    async def freeze(self, vm: RigVm) -> None:
        """Freeze the guest out of band, as a snapshot process killed while frozen leaves it."""

    @abc.abstractmethod
    async def freeze_requests(self, vm: RigVm) -> int | None:
        """How many freeze requests the guest's agent received so far; None if unknown."""

    async def workload_round(self, vm: RigVm) -> int | None:
        """The last round the guest's workload completed (``/run/ffwork/seq``); None when the
        VM runs no workload (the fakes)."""
        return None

    async def writable(self, image: str) -> None:
        """Give ``image`` its owner's write bit back (a snapshot takes it away from the images
        at its cut; a merge into it needs it): nothing for images that are no files."""
        return None


# ---------------------------------------------------------------------------- fake


class FakeRig(Rig):
    """In-memory VMs of :mod:`freezeframe.testing`, through the ``fake`` driver entry point."""

    driver = "fake"
    _names = itertools.count()

    async def start(self) -> None:
        self.host = FakeHost().install()

    async def stop(self) -> None:
        self.host.uninstall()

    async def _add(self, vm: FakeVm, **cfg: Any) -> RigVm:
        self.host.add(vm)
        await self.catalog.add_vm(vm.config(**cfg))
        return RigVm(vm.name, handle=vm)

    def _name(self, what: str) -> str:
        return f"{what}{next(self._names)}"

    async def vm_with_agent(self) -> RigVm:
        return await self._add(FakeVm.simple(self._name("agent"), ("ext4", "xfs")))

    async def vm_without_agent_channel(self) -> RigVm:
        return await self._add(FakeVm.simple(self._name("mute"), ("ext4",), agent_channel=False))

    async def vm_with_hung_agent(self) -> RigVm:
        vm = FakeVm.simple(self._name("hung"), ("ext4", "xfs"))
        assert vm.guest is not None
        vm.guest.script("guest-fsfreeze-freeze", AgentFault.HANG)
        return await self._add(vm)

    @staticmethod
    def _vm(vm: RigVm) -> FakeVm:
        assert isinstance(vm.handle, FakeVm)
        return vm.handle

    async def images(self, vm: RigVm) -> dict[str, str]:
        return self._vm(vm).active_images()

    async def image_files(self, vm: RigVm) -> set[str]:
        return set(self._vm(vm).images)

    async def is_frozen(self, vm: RigVm) -> bool:
        guest = self._vm(vm).guest
        return guest is not None and guest.frozen

    async def freeze(self, vm: RigVm) -> None:
        guest = self._vm(vm).guest
        assert guest is not None
        assert guest.freeze() > 0

    async def freeze_requests(self, vm: RigVm) -> int | None:
        guest = self._vm(vm).guest
        return guest.sent("guest-fsfreeze-freeze") if guest is not None else 0


# ---------------------------------------------------------------------------- lab VMs


class LabPool:
    """Real VMs shared by the tests of one module: booted on first use, stopped and purged when
    the module is done (:meth:`close`), so each costs one boot per module."""

    def __init__(self) -> None:
        self._handles: dict[str, object] = {}
        self._stops: list[Callable[[], Awaitable[None]]] = []

    async def get(
        self,
        key: str,
        start: Callable[[str], Awaitable[T]],
        stop: Callable[[str], Awaitable[None]],
    ) -> T:
        """The VM ``key`` of this module, started with ``start(name)`` the first time (and
        stopped with ``stop(name)`` at the end)."""
        if key not in self._handles:
            name = f"ct{os.getpid() % 1000}-{key}"
            self._stops.append(lambda: stop(name))
            self._handles[key] = await start(name)
        return self._handles[key]  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every VM (in its own event loop: no test's loop runs any more)."""

        async def stop_all() -> None:
            for stop in reversed(self._stops):
                with contextlib.suppress(Exception):
                    await stop()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(stop_all())
            return
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, stop_all()).result()


async def _lab_purge(name: str) -> None:
    await lab_down(name, purge=True)


class LabRig(Rig):
    """The built-in lab guest (real kernel, real qemu-ga) through a real driver: one VM with an
    agent (ext4 + xfs) and one without per module, shared through the module's :class:`LabPool`.
    Subclasses say how the lab runs it (``lab_driver``), how to reach its agent from outside the
    driver under test (:meth:`_agent`), which disk writes to which image (:meth:`images`), how
    to hang its agent (:meth:`_hung_hooks`) and how to resume it (:meth:`_resume_vm`)."""

    needs_lab = True
    #: ``lab_up(driver=...)``.
    lab_driver: ClassVar[str]

    def __init__(self, catalog: Catalog, pool: LabPool | None) -> None:
        super().__init__(catalog, pool)
        self._used: dict[str, LabVm] = {}

    async def _lab(self, key: str, *, agent: bool) -> LabVm:
        assert self.pool is not None

        async def start(name: str) -> LabVm:
            disks = ("ext4", "xfs") if agent else ("ext4",)
            return await lab_up(name, disks=disks, agent=agent, driver=self.lab_driver, timeout=240)

        vm = await self.pool.get(f"{self.lab_driver}-{key}", start, _lab_purge)
        self._used[vm.name] = vm
        return vm

    async def _register(self, vm: LabVm, **changes: Any) -> RigVm:
        await self.catalog.add_vm(replace(vm.vm_config(), **changes), replace=True)
        return RigVm(vm.name, handle=vm)

    async def vm_with_agent(self) -> RigVm:
        return await self._register(await self._lab("agent", agent=True))

    async def vm_without_agent_channel(self) -> RigVm:
        return await self._register(await self._lab("mute", agent=False), agent=True)

    async def vm_with_hung_agent(self) -> RigVm:
        vm = await self.vm_with_agent()
        return RigVm(vm.name, hooks=self._hung_hooks(), handle=vm.handle)

    @abc.abstractmethod
    def _hung_hooks(self) -> Hooks:
        """The Snapshotter hooks that hang the agent during the freeze and free it after."""

    @abc.abstractmethod
    def _agent(self, vm: LabVm) -> Agent | None:
        """A client of ``vm``'s agent (None without one), not through the driver under test."""

    @abc.abstractmethod
    async def _resume_vm(self, vm: LabVm) -> None:
        """Let a paused ``vm`` run again (nothing when it runs)."""

    @staticmethod
    def _vm(vm: RigVm) -> LabVm:
        assert isinstance(vm.handle, LabVm)
        return vm.handle

    async def image_files(self, vm: RigVm) -> set[str]:
        return {str(p) for p in self._vm(vm).console_log.parent.glob("*.qcow2")}

    async def is_frozen(self, vm: RigVm) -> bool:
        agent = self._agent(self._vm(vm))
        if agent is None:
            return False
        async with agent:
            return await agent.fsfreeze_status() is FsFreezeState.FROZEN

    async def freeze(self, vm: RigVm) -> None:
        agent = self._agent(self._vm(vm))
        assert agent is not None
        async with agent:
            assert await agent.fsfreeze_freeze() > 0

    async def freeze_requests(self, vm: RigVm) -> int | None:
        lab = self._vm(vm)
        agent = self._agent(lab)
        if agent is None:
            return 0
        log_path = lab.vm_config().agent_log_path
        assert log_path is not None
        async with agent:
            text = (await agent.file_read(log_path, tail=True)).decode(errors="replace")
        return sum(
            1
            for line in text.splitlines()
            if "read data" in line and "guest-fsfreeze-freeze" in line
        )

    async def workload_round(self, vm: RigVm) -> int | None:
        agent = self._agent(self._vm(vm))
        if agent is None:
            return None
        async with agent:
            return int((await agent.file_read(SEQ_PATH)).split()[0])

    async def writable(self, image: str) -> None:
        mode = os.stat(image).st_mode
        os.chmod(image, mode | 0o200)

    async def stop(self) -> None:
        """Leave the shared VMs running and thawed, whatever the test did."""
        for vm in self._used.values():
            with contextlib.suppress(Exception):
                await self._resume_vm(vm)
            agent = self._agent(vm)
            if agent is not None:
                with contextlib.suppress(Exception):
                    async with agent:
                        if await agent.fsfreeze_status() is FsFreezeState.FROZEN:
                            await agent.fsfreeze_thaw()


class QmpRig(LabRig):
    """The lab VM as QEMU started by the lab, through the ``qmp`` driver; the hung agent is the
    VM paused during the freeze (:data:`PAUSE_HOOKS`)."""

    driver = "qmp"
    lab_driver = "qmp"

    def _hung_hooks(self) -> Hooks:
        return PAUSE_HOOKS

    @staticmethod
    async def _qmp(vm: LabVm, command: str) -> object:
        assert vm.qmp_path is not None
        client = QMPClient("contract")
        await asyncio.wait_for(client.connect(str(vm.qmp_path)), 10)
        try:
            return await asyncio.wait_for(client.execute(command), 10)
        finally:
            await client.disconnect()

    async def images(self, vm: RigVm) -> dict[str, str]:
        blocks = await self._qmp(self._vm(vm), "query-block")
        assert isinstance(blocks, list)
        return {
            str(b["qdev"]).split("/")[3]: str(b["inserted"]["file"])
            for b in blocks
            if "inserted" in b and str(b.get("qdev", "")).startswith("/machine/peripheral/")
        }

    def _agent(self, vm: LabVm) -> Agent | None:
        return GuestAgent(str(vm.qga_path), timeout=5) if vm.qga_path is not None else None

    async def _resume_vm(self, vm: LabVm) -> None:
        status = await self._qmp(vm, "query-status")
        if isinstance(status, dict) and status.get("status") == "paused":
            await self._qmp(vm, "cont")


# ---------------------------------------------------------------------------- libvirt


def _suspend_during_freeze() -> Hooks:
    """A hung agent on a libvirt domain: libvirt refuses agent calls on a paused domain, so the
    domain is suspended (``virsh suspend``) a moment *after* the freeze was sent, and resumed
    after the thaw attempt (``virsh resume``)."""
    tasks: list[asyncio.Task[None]] = []

    async def suspend_soon(domain: str) -> None:
        await asyncio.sleep(0.03)
        await asyncio.to_thread(virsh, "suspend", domain)

    async def before_freeze(_vm: str, driver: HypervisorDriver) -> None:
        assert isinstance(driver, LibvirtDriver)
        assert driver.domain_name is not None
        tasks.append(asyncio.create_task(suspend_soon(driver.domain_name)))

    async def after_thaw(_vm: str, driver: HypervisorDriver) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(driver, LibvirtDriver)
        assert driver.domain_name is not None
        await asyncio.to_thread(virsh, "resume", driver.domain_name)

    return Hooks(before_freeze=before_freeze, after_thaw=after_thaw)


class LibvirtRig(LabRig):
    """The lab guest as a transient libvirt domain (``lab up --libvirt``) through the
    ``libvirt`` driver. Images are read from libvirt's live view (``virsh domblklist``), the
    guest through libvirt's agent calls; the hung agent is :func:`_suspend_during_freeze`."""

    driver = "libvirt"
    lab_driver = "libvirt"

    def _hung_hooks(self) -> Hooks:
        return _suspend_during_freeze()

    @staticmethod
    def _domain(vm: LabVm) -> str:
        assert vm.domain_name is not None
        return vm.domain_name

    async def images(self, vm: RigVm) -> dict[str, str]:
        return await asyncio.to_thread(domblklist, self._domain(self._vm(vm)))

    def _agent(self, vm: LabVm) -> Agent | None:
        cfg = vm.vm_config()
        if not cfg.agent or cfg.domain is None:
            return None
        return open_agent(f"libvirt:{cfg.domain}@{cfg.connect_uri}", timeout=5)

    async def _resume_vm(self, vm: LabVm) -> None:
        await asyncio.to_thread(virsh, "resume", self._domain(vm), check=False)


#: Rig classes by driver name.
RIGS: dict[str, type[Rig]] = {"fake": FakeRig, "qmp": QmpRig, "libvirt": LibvirtRig}

#: The ``rig`` fixture's parameters: one per driver (real VMs are integration tests).
RIG_PARAMS = [
    pytest.param("fake", id="fake"),
    pytest.param("qmp", id="qmp", marks=[pytest.mark.integration]),
    pytest.param("libvirt", id="libvirt", marks=[pytest.mark.integration, pytest.mark.libvirt]),
]
