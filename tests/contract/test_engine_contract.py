"""The engine's scenarios, run unchanged against every hypervisor driver (one rig each, see
:mod:`tests.contract.rigs`): what a snapshot, a failure, a hung agent and ``recover`` leave
behind must not depend on the driver.

Outcomes are asserted as stable values only: record status and level, error classes and exit
codes, which image each disk writes to, open freeze intents, the guest's freeze state.
"""

from __future__ import annotations

import time

import pytest

from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, open_driver, recover
from freezeframe.engine.doctor import CheckStatus
from freezeframe.errors import SnapshotFailedError, ThawUnconfirmedError
from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotStatus
from tests.contract.rigs import Rig, RigVm, dead_owner

REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)


async def _switched(rig: Rig, vm: RigVm, before: dict[str, str], rec_id: str) -> None:
    """Every disk writes to the new overlay of snapshot ``rec_id``; its image at the cut is the
    one the disk wrote to before."""
    rec = await rig.catalog.get_snapshot(rec_id)
    after = await rig.images(vm)
    assert set(after) == set(before)
    assert {d.device: d.image for d in rec.disks} == before
    assert {d.device: d.overlay for d in rec.disks} == after
    assert all(after[dev] != before[dev] for dev in before)


async def test_quiesced_snapshot_switches_every_disk_and_thaws(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    before = await rig.images(vm)
    freezes = await rig.freeze_requests(vm)
    rec = await Snapshotter(rig.catalog).snapshot(vm.name, REQUIRED)
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM
    if freezes is not None:
        assert await rig.freeze_requests(vm) == freezes + 1
    assert rec.filesystems
    assert all(f.frozen for f in rec.filesystems)
    await _switched(rig, vm, before, rec.id)
    assert (await rig.catalog.get_snapshot(rec.id)).status is SnapshotStatus.DONE
    assert await rig.catalog.open_intents(vm.name) == []
    assert not await rig.is_frozen(vm)
    names = [e.name for e in rec.timeline]
    for step in ("prepared", "freeze_sent", "frozen", "cut", "thaw_confirmed", "cut_verified"):
        assert step in names
    assert names.index("freeze_sent") < names.index("cut") < names.index("thaw_confirmed")


async def test_required_without_agent_channel_fails_and_touches_nothing(rig: Rig) -> None:
    vm = await rig.vm_without_agent_channel()
    before, files = await rig.images(vm), await rig.image_files(vm)
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(rig.catalog).snapshot(vm.name, REQUIRED)
    err = ei.value
    assert not isinstance(err, ThawUnconfirmedError)
    assert err.exit_code == 10
    assert await rig.images(vm) == before
    assert await rig.image_files(vm) == files
    assert not await rig.is_frozen(vm)
    rec = await rig.catalog.get_snapshot(err.snapshot_id)
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert await rig.catalog.open_intents(vm.name) == []


async def test_preferred_without_agent_channel_is_crash_consistent(rig: Rig) -> None:
    vm = await rig.vm_without_agent_channel()
    before = await rig.images(vm)
    rec = await Snapshotter(rig.catalog).snapshot(
        vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED)
    )
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.CRASH
    await _switched(rig, vm, before, rec.id)
    assert await rig.catalog.open_intents(vm.name) == []


async def test_quiesce_off_cuts_without_a_freeze(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    before = await rig.images(vm)
    freezes = await rig.freeze_requests(vm)
    rec = await Snapshotter(rig.catalog).snapshot(
        vm.name, SnapshotRequest(quiesce=QuiescePolicy.OFF)
    )
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.CRASH
    assert not any(f.frozen for f in rec.filesystems)
    await _switched(rig, vm, before, rec.id)
    assert "freeze_sent" not in [e.name for e in rec.timeline]
    if freezes is not None:
        assert await rig.freeze_requests(vm) == freezes
    assert await rig.catalog.open_intents(vm.name) == []
    assert not await rig.is_frozen(vm)


async def test_hung_freeze_is_bounded_and_ends_thawed(rig: Rig) -> None:
    vm = await rig.vm_with_hung_agent()
    before, files = await rig.images(vm), await rig.image_files(vm)
    snap = Snapshotter(rig.catalog, thaw_timeout=2.0, followup=True, followup_for=30, **vm.hooks)
    deadline = 1.0
    t0 = time.monotonic()
    with pytest.raises(SnapshotFailedError) as ei:
        await snap.snapshot(
            vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=deadline)
        )
    err = ei.value
    # The freeze deadline, the urgent thaw's 1.5 s, at most thaw_timeout of late thaws.
    assert time.monotonic() - t0 < deadline + 1.5 + 2.0 + 1.5
    assert err.exit_code in (10, 12)  # 12 only while the thaw is not confirmed yet
    assert await snap.wait_followups(timeout=30)
    assert await rig.catalog.open_intents(vm.name) == []
    assert not await rig.is_frozen(vm)
    assert await rig.images(vm) == before  # nothing switched
    assert await rig.image_files(vm) == files  # the prepared overlays are gone
    rec = await rig.catalog.get_snapshot(err.snapshot_id)
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert "freeze_timeout" in [e.name for e in rec.timeline]


async def test_recover_thaws_a_guest_a_dead_snapshot_left_frozen(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    cfg = await rig.catalog.get_vm(vm.name)
    async with open_driver(cfg) as driver:
        address = driver.agent_address(cfg, await driver.agent_channel())
    assert address is not None
    await rig.freeze(vm)
    assert await rig.is_frozen(vm)
    intent = await rig.catalog.open_intent(vm.name, "deaddeadbeef", address, dead_owner())

    out = await recover(rig.catalog, vm.name)
    assert [(o.intent_id, o.thawed, o.failed, o.skipped) for o in out] == [
        (intent.id, True, False, False)
    ]
    assert not await rig.is_frozen(vm)
    assert await rig.catalog.open_intents(vm.name) == []
    # The VM's lock is free again: the next snapshot quiesces as usual.
    rec = await Snapshotter(rig.catalog).snapshot(vm.name, REQUIRED)
    assert rec.level is ConsistencyLevel.FILESYSTEM


async def test_doctor_predicts_the_level_a_snapshot_reaches(rig: Rig) -> None:
    good = await doctor(
        rig.catalog, (await rig.vm_with_agent()).name, quiesce=QuiescePolicy.REQUIRED
    )
    assert good.ok
    assert good.predicted_level is ConsistencyLevel.FILESYSTEM

    mute = await rig.vm_without_agent_channel()
    required = await doctor(rig.catalog, mute.name, quiesce=QuiescePolicy.REQUIRED)
    assert not required.ok
    assert required.predicted_level is ConsistencyLevel.NONE
    assert any(c.status is CheckStatus.FAIL for c in required.checks)
    preferred = await doctor(rig.catalog, mute.name, quiesce=QuiescePolicy.PREFERRED)
    assert preferred.predicted_level is ConsistencyLevel.CRASH


async def test_a_paused_vm_is_named_paused_not_a_missing_agent(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    cfg = await rig.catalog.get_vm(vm.name)
    snap = Snapshotter(rig.catalog, ping_timeout=1.0, thaw_timeout=1.0)
    async with open_driver(cfg) as driver:
        await driver.pause()
        try:
            probe = await snap.probe_agent(cfg, driver)
        finally:
            await driver.resume()
    assert probe.info is None
    assert probe.vm_state == "paused"  # not "install qemu-guest-agent"
    assert probe.code == "vm-not-running"
    rec = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED))
    assert rec.level is ConsistencyLevel.FILESYSTEM  # running again: the agent answers
