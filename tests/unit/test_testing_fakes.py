"""The fakes of :mod:`freezeframe.testing` themselves: each scripted fault does what it says,
through the engine where that is what it is for (the contract suite in ``tests/contract`` runs
the shared scenarios on them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from tests.contract.rigs import PAUSE_HOOKS, dead_owner

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, recover
from freezeframe.engine.snapshot import _snapshot_disks
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentTimeoutError,
    AgentUnavailableError,
    CutError,
    HypervisorUnavailableError,
    SnapshotFailedError,
)
from freezeframe.hypervisor import load_driver, open_agent
from freezeframe.models import (
    ConsistencyLevel,
    FsFreezeState,
    QuiescePolicy,
    SnapshotRecord,
    SnapshotStatus,
    VmConfig,
)
from freezeframe.testing import (
    AgentFault,
    CutFault,
    FakeAgent,
    FakeDriver,
    FakeFilesystem,
    FakeGuest,
    FakeHost,
    FakeProgram,
    FakeVm,
)

REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
PREFERRED = SnapshotRequest(quiesce=QuiescePolicy.PREFERRED)


async def _vm(host: FakeHost, catalog: Catalog, vm: FakeVm) -> FakeGuest:
    host.add(vm)
    await catalog.add_vm(vm.config())
    assert vm.guest is not None
    return vm.guest


# ---------------------------------------------------------------------------- registry


def test_the_fake_driver_is_registered_and_reaches_the_current_host(host: FakeHost) -> None:
    assert load_driver("fake") is FakeDriver
    vm = host.add(FakeVm.simple("a"))
    agent = open_agent(vm.address, timeout=1.0)
    assert isinstance(agent, FakeAgent)
    assert agent.guest is vm.guest
    assert FakeDriver.from_config(vm.config()).host is host


async def test_a_vm_is_found_by_domain_then_by_name(host: FakeHost) -> None:
    vm = host.add(FakeVm("b", domain="0b7e2c3a"))
    driver = FakeDriver.from_config(VmConfig(name="web", driver="fake", domain="0b7e2c3a"))
    async with driver:
        assert [d.device for d in await driver.disks()] == ["disk0"]
        assert await driver.agent_channel() is None  # no guest: no agent channel
    assert FakeDriver.from_config(vm.config()).vm_name == "0b7e2c3a"
    assert FakeDriver.from_config(VmConfig(name="b", driver="fake", domain="x")).vm_name == "b"


async def test_a_missing_or_stopped_vm_cannot_be_reached(host: FakeHost) -> None:
    with pytest.raises(HypervisorUnavailableError):
        await FakeDriver("nobody").connect()
    assert await FakeDriver("nobody").is_gone()
    vm = host.add(FakeVm.simple("a"))
    vm.reachable = False
    assert not await FakeDriver("a").is_gone()
    with pytest.raises(HypervisorUnavailableError):
        await FakeDriver("a").connect()
    vm.running = False
    assert await FakeDriver("a").is_gone()


# ---------------------------------------------------------------------------- the agent


async def test_an_absent_agent_is_unavailable() -> None:
    with pytest.raises(AgentUnavailableError):
        await FakeAgent(FakeGuest(agent_running=False)).connect()
    with pytest.raises(AgentUnavailableError):
        await FakeAgent(None).ping()


async def test_while_frozen_only_the_freeze_safe_commands_run() -> None:
    guest = FakeGuest([FakeFilesystem("/data", disks=("vda",))])
    async with FakeAgent(guest) as agent:
        assert await agent.fsfreeze_freeze() == 1
        assert await agent.fsfreeze_status() is FsFreezeState.FROZEN
        info = await agent.info()
        assert not info.enabled("guest-get-fsinfo")
        assert info.enabled("guest-fsfreeze-thaw")
        with pytest.raises(AgentCommandError) as ei:
            await agent.get_fsinfo()
        assert ei.value.qga_class == "CommandNotFound"
        with pytest.raises(AgentCommandError):
            await agent.fsfreeze_freeze()
        assert await agent.fsfreeze_thaw() == 1
        assert await agent.fsfreeze_thaw() == 0
    assert guest.commands[0] == "guest-fsfreeze-freeze"
    assert guest.sent("guest-fsfreeze-thaw") == 2


async def test_disabled_commands_are_reported_and_refused() -> None:
    guest = FakeGuest(disabled={"guest-exec"})
    async with FakeAgent(guest) as agent:
        assert not (await agent.info()).enabled("guest-exec")
        with pytest.raises(AgentCommandError) as ei:
            await agent.exec("sync")
        assert ei.value.qga_class == "CommandNotFound"


async def test_files_and_programs() -> None:
    guest = FakeGuest(files={"/f": b"abcdef"}, programs={"slow": FakeProgram(duration=5)})
    async with FakeAgent(guest, timeout=0.2) as agent:
        assert await agent.file_read("/f", max_bytes=2, tail=True) == b"ef"
        with pytest.raises(AgentError):
            await agent.file_read("/f", max_bytes=2)
        with pytest.raises(AgentCommandError):
            await agent.file_read("/missing")
        with pytest.raises(AgentCommandError):
            await agent.exec("nothing")
        with pytest.raises(AgentTimeoutError):
            await agent.exec("slow")


async def test_one_client_at_a_time() -> None:
    guest = FakeGuest()
    first = FakeAgent(guest)
    await first.connect()
    with pytest.raises(AgentTimeoutError):
        await FakeAgent(guest).connect(timeout=0.1)
    second = FakeAgent(guest)
    waiting = asyncio.create_task(second.connect(timeout=5))
    await asyncio.sleep(0.05)
    await first.close()
    await waiting
    await second.ping()
    await second.close()
    assert guest.connections == 2


async def test_paused_commands_run_in_order_on_resume_or_are_dropped_on_hangup() -> None:
    guest = FakeGuest([FakeFilesystem("/data", disks=("vda",))])
    agent = FakeAgent(guest)
    await agent.connect()
    guest.pause()
    with pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=0.1)
    assert await agent.fsfreeze_thaw_urgent(timeout=0.1) is None  # queued behind it
    guest.resume()
    await asyncio.sleep(0.05)
    assert not guest.frozen  # freeze, then thaw, in that order
    assert guest.files[str(guest.log_path)].count(b"unfreeze") == 1

    guest.pause()
    with pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=0.1)
    await agent.close()  # QEMU drops what it had not passed on
    guest.resume()
    await asyncio.sleep(0.05)
    assert not guest.frozen


async def test_a_silent_freeze_takes_effect_and_a_hung_one_does_not() -> None:
    guest = FakeGuest([FakeFilesystem("/data", disks=("vda",))])
    async with FakeAgent(guest) as agent:
        guest.script("guest-fsfreeze-freeze", AgentFault.SILENT, times=1)
        with pytest.raises(AgentTimeoutError):
            await agent.fsfreeze_freeze(timeout=0.1)
        assert guest.frozen
        assert await agent.fsfreeze_thaw_urgent(timeout=1) == 1
        guest.script("guest-fsfreeze-freeze", AgentFault.HANG)
        with pytest.raises(AgentTimeoutError):
            await agent.fsfreeze_freeze(timeout=0.1)
        assert not guest.frozen
        assert await agent.fsfreeze_thaw_urgent(timeout=1) == 0


# ---------------------------------------------------------------------------- through the engine


async def test_a_partial_freeze_fails_required_and_is_crash_under_preferred(
    host: FakeHost, catalog: Catalog
) -> None:
    # The agent silently skips a filesystem the plan expected to freeze.
    vm = FakeVm.simple("p", ("ext4", "xfs"))
    assert vm.guest is not None
    vm.guest.filesystems[1] = FakeFilesystem("/mnt/disk1", "xfs", ("disk1",), freezable=False)
    guest = await _vm(host, catalog, vm)
    before = vm.active_images()
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(catalog).snapshot("p", REQUIRED)
    assert ei.value.exit_code == 10
    assert vm.active_images() == before
    assert not guest.frozen
    rec = await Snapshotter(catalog).snapshot("p", PREFERRED)
    assert rec.level is ConsistencyLevel.CRASH
    assert vm.active_images() != before


async def test_a_vfat_disk_is_planned_out_under_required(host: FakeHost, catalog: Catalog) -> None:
    guest = await _vm(host, catalog, FakeVm.simple("v", ("ext4", "vfat")))
    with pytest.raises(SnapshotFailedError):
        await Snapshotter(catalog).snapshot("v", REQUIRED)
    assert guest.sent("guest-fsfreeze-freeze") == 0
    rec = await Snapshotter(catalog).snapshot("v", PREFERRED)
    assert rec.level is ConsistencyLevel.CRASH
    assert {f.mountpoint: f.frozen for f in rec.filesystems} == {
        "/mnt/disk0": True,
        "/mnt/disk1": False,
    }
    assert guest.calls[guest.commands.index("guest-fsfreeze-freeze-list")].args == {
        "mountpoints": ["/mnt/disk0"]
    }


async def test_a_refused_freeze_sends_no_thaw(host: FakeHost, catalog: Catalog) -> None:
    guest = await _vm(host, catalog, FakeVm.simple("r"))
    guest.script("guest-fsfreeze-freeze", AgentFault.REFUSE)
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(catalog).snapshot("r", REQUIRED)
    assert ei.value.exit_code == 10
    assert guest.sent("guest-fsfreeze-freeze") == 1
    assert guest.sent("guest-fsfreeze-thaw") == 0
    assert await catalog.open_intents("r") == []


async def test_disabled_freeze_commands_mean_no_freeze(host: FakeHost, catalog: Catalog) -> None:
    vm = FakeVm.simple("d")
    assert vm.guest is not None
    vm.guest.disabled.add("guest-fsfreeze-freeze")
    await _vm(host, catalog, vm)
    with pytest.raises(SnapshotFailedError):
        await Snapshotter(catalog).snapshot("d", REQUIRED)
    assert vm.guest.sent("guest-fsfreeze-freeze") == 0
    assert (await Snapshotter(catalog).snapshot("d", PREFERRED)).level is ConsistencyLevel.CRASH


async def test_a_slow_preflush_fails_required_before_any_freeze(
    host: FakeHost, catalog: Catalog
) -> None:
    guest = await _vm(host, catalog, FakeVm.simple("s"))
    guest.programs["sync"] = FakeProgram(duration=10)
    with pytest.raises(SnapshotFailedError):
        await Snapshotter(catalog).snapshot(
            "s", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=0.2)
        )
    assert guest.sent("guest-fsfreeze-freeze") == 0


async def test_a_paused_vm_freezes_late_and_is_thawed(host: FakeHost, catalog: Catalog) -> None:
    # The qmp rig's hung agent, on the fake: the hooks pause and resume the fake vCPUs.
    vm = FakeVm.simple("z")
    guest = await _vm(host, catalog, vm)
    snap = Snapshotter(catalog, thaw_timeout=2.0, **PAUSE_HOOKS)
    with pytest.raises(SnapshotFailedError):
        await snap.snapshot(
            "z", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=0.3)
        )
    assert vm.ops[-2:] == ["resume", "abort"]
    assert not guest.frozen  # the thaw queued behind the late freeze undid it...
    # ...and the engine kept thawing after the resume until it was confirmed (issue 12 item 1)
    assert await catalog.open_intents("z") == []
    log = guest.files[str(guest.log_path)]
    assert b"disabling logging" in log  # the late freeze did reach the guest...
    assert log.rindex(b"unfreeze") > log.rindex(b"disabling logging")  # ...and was undone


async def test_the_agent_log_is_the_snapshot_evidence(host: FakeHost, catalog: Catalog) -> None:
    await _vm(host, catalog, FakeVm.simple("e"))
    rec = await Snapshotter(catalog).snapshot("e", REQUIRED)
    assert any("disabling logging due to filesystem freeze" in ln for ln in rec.evidence)
    assert any("re-enabled due to filesystem unfreeze" in ln for ln in rec.evidence)


@pytest.mark.parametrize(
    ("fault", "switched"),
    [(CutFault.FAIL, False), (CutFault.HANG, False), (CutFault.LOST_REPLY, True)],
)
async def test_cut_faults(
    host: FakeHost, catalog: Catalog, fault: CutFault, switched: bool
) -> None:
    vm = FakeVm.simple("c")
    guest = await _vm(host, catalog, vm)
    vm.cut_fault = fault
    before, files = vm.active_images(), set(vm.images)
    req = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=0.5)
    if switched:
        rec = await Snapshotter(catalog).snapshot("c", req)
        assert rec.status is SnapshotStatus.DONE
        assert {d.device: d.overlay for d in rec.disks} == vm.active_images()
    else:
        with pytest.raises(SnapshotFailedError) as ei:
            await Snapshotter(catalog).snapshot("c", req)
        assert ei.value.exit_code == 10
        assert vm.active_images() == before
        assert set(vm.images) == files
    assert not guest.frozen


async def test_recover_settles_what_a_dead_process_prepared(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = FakeVm.simple("k")
    await _vm(host, catalog, vm)
    files = set(vm.images)
    async with FakeDriver("k") as driver:
        prepared = await driver.prepare_cut("dead01", await driver.disks())
        with pytest.raises(CutError):
            await driver.prepare_cut("dead01", await driver.disks())  # the overlays exist
    await catalog.begin_snapshot(
        SnapshotRecord(
            id="dead01",
            vm="k",
            created_at=datetime.now(UTC),
            status=SnapshotStatus.RUNNING,
            policy=QuiescePolicy.REQUIRED,
            level=ConsistencyLevel.NONE,
            disks=_snapshot_disks(prepared),
        )
    )
    await catalog.acquire_vm_lock("k", dead_owner())
    assert set(vm.images) != files
    (out,) = await recover(catalog)
    assert (out.snapshot_id, out.failed) == ("dead01", False)
    assert set(vm.images) == files
    assert (await catalog.get_snapshot("dead01")).status is SnapshotStatus.FAILED
