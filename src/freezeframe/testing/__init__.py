"""Fakes of the guest agent and of a hypervisor, shipped for tests of freezeframe and of the
code built on it (as httpx ships its MockTransport).

- :mod:`freezeframe.testing.fake_agent` owns the guest: :class:`FakeGuest` (filesystems,
  freeze state, enabled commands, files, programs, the commands received, scripted
  :class:`AgentFault`) and :class:`FakeAgent`, a complete :class:`~freezeframe.agent.Agent` on
  it. Its methods raise only :class:`~freezeframe.errors.AgentError` subclasses.
- :mod:`freezeframe.testing.fake_driver` owns the host: :class:`FakeHost` (the registry the
  driver looks VMs up in), :class:`FakeVm` / :class:`FakeDisk` (disks with in-memory image
  chains, merge jobs, faults such as :class:`CutFault` and :class:`MergeFault`) and
  :class:`FakeDriver`, a complete :class:`~freezeframe.hypervisor.HypervisorDriver` registered
  as driver ``fake``. Its methods raise only :class:`~freezeframe.errors.HypervisorError`
  subclasses (and UsageError where the driver contract says so).

Typical use, through the ordinary driver lookup (``VmConfig(driver="fake")``)::

    with FakeHost() as host:
        vm = host.add(FakeVm.simple("web1", ("ext4", "vfat")))
        await catalog.add_vm(vm.config(quiesce=QuiescePolicy.PREFERRED))
        vm.guest.script("guest-fsfreeze-freeze", AgentFault.HANG)
        rec = await Snapshotter(catalog).snapshot("web1", SnapshotRequest(freeze_timeout=1))
        assert vm.guest.sent("guest-fsfreeze-thaw")

Not for production use: nothing here touches a real VM.
"""

from __future__ import annotations

from freezeframe.testing.fake_agent import (
    FREEZE_ALLOWED_COMMANDS,
    QGA_COMMANDS,
    AgentCall,
    AgentFault,
    FakeAgent,
    FakeFilesystem,
    FakeGuest,
    FakeProgram,
)
from freezeframe.testing.fake_driver import (
    ADDRESS_PREFIX,
    CutFault,
    FakeDisk,
    FakeDriver,
    FakeHost,
    FakeVm,
    MergeFault,
    MergeJob,
)

__all__ = [
    "ADDRESS_PREFIX",
    "FREEZE_ALLOWED_COMMANDS",
    "QGA_COMMANDS",
    "AgentCall",
    "AgentFault",
    "CutFault",
    "FakeAgent",
    "FakeDisk",
    "FakeDriver",
    "FakeFilesystem",
    "FakeGuest",
    "FakeHost",
    "FakeProgram",
    "FakeVm",
    "MergeFault",
    "MergeJob",
]
