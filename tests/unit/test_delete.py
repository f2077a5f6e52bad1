"""``snapshot delete`` on the fake hypervisor: which layer is merged into which, what the chain
model says afterwards, refusals before anything changes, an interrupted merge finished by
``recover``. (Real images and a real QEMU: tests/integration/test_lifecycle.py.)"""

from __future__ import annotations

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, recover
from freezeframe.engine.delete import delete_snapshot
from freezeframe.errors import BusyError, HypervisorError, UsageError
from freezeframe.models import QuiescePolicy, SnapshotRecord, SnapshotStatus
from freezeframe.testing import FakeHost, FakeVm, MergeFault

REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)


async def _three(host: FakeHost, catalog: Catalog) -> tuple[FakeVm, list[SnapshotRecord]]:
    vm = host.add(FakeVm.simple("v", ("ext4",)))
    await catalog.add_vm(vm.config())
    recs = [await Snapshotter(catalog).snapshot("v", REQUIRED) for _ in range(3)]
    return vm, recs


async def _image_of(catalog: Catalog, snapshot_id: str) -> str:
    return (await catalog.get_snapshot(snapshot_id)).disks[0].image


async def test_middle_oldest_newest(host: FakeHost, catalog: Catalog) -> None:
    vm, (s1, s2, s3) = await _three(host, catalog)
    base, o1, o2 = (s.disks[0].image for s in (s1, s2, s3))
    o3 = s3.disks[0].overlay
    assert vm.chain("disk0") == [o3, o2, o1, base]

    # The middle one: o2 (S3's image) is committed into o1 (S2's); S3 now lives in o1.
    out = await delete_snapshot(catalog, await catalog.get_snapshot(s2.id))
    assert [(d.how, d.top, d.base) for d in out.disks] == [("live", o2, o1)]
    assert out.disks[0].writes_to is None
    assert vm.chain("disk0") == [o3, o1, base]
    assert await _image_of(catalog, s3.id) == o1
    assert await _image_of(catalog, s1.id) == base
    assert {r.id for r in await catalog.list_snapshots("v")} == {s1.id, s3.id}
    assert (await catalog.get_snapshot(s3.id)).parent_id == s1.id

    # The oldest: o1 (S3's data now) into base; S3 lives in the original image.
    await delete_snapshot(catalog, await catalog.get_snapshot(s1.id))
    assert vm.chain("disk0") == [o3, base]
    assert await _image_of(catalog, s3.id) == base

    # The newest: an active commit, the disk writes to base again.
    out = await delete_snapshot(catalog, await catalog.get_snapshot(s3.id))
    assert out.disks[0].writes_to == base
    assert vm.chain("disk0") == [base]
    assert await catalog.list_snapshots("v") == []
    rows = await catalog.chain_images("v")
    assert [(r.location, r.active, r.snapshot_id) for r in rows] == [(base, True, None)]


async def test_chain_depth_comes_back(host: FakeHost, catalog: Catalog) -> None:
    vm = host.add(FakeVm.simple("d", ("ext4",)))
    await catalog.add_vm(vm.config())
    recs = [await Snapshotter(catalog).snapshot("d", REQUIRED) for _ in range(8)]
    for r in recs[:-3]:
        await delete_snapshot(catalog, await catalog.get_snapshot(r.id))
    assert len(vm.chain("disk0")) == 4  # the 3 kept snapshots' images and the active layer
    kept = [await catalog.get_snapshot(r.id) for r in recs[-3:]]
    assert [k.disks[0].image for k in kept] == vm.chain("disk0")[1:][::-1]


async def test_refused_while_held_and_while_running(host: FakeHost, catalog: Catalog) -> None:
    vm, (s1, _, _) = await _three(host, catalog)
    chain = vm.chain("disk0")
    async with catalog.hold_snapshot(s1.id, "export"):
        with pytest.raises(BusyError) as err:
            await delete_snapshot(catalog, await catalog.get_snapshot(s1.id))
        assert err.value.code == "snapshot-in-use"
    assert vm.chain("disk0") == chain
    assert (await catalog.get_snapshot(s1.id)).status is SnapshotStatus.DONE


async def test_refused_when_the_vm_writes_to_the_image(host: FakeHost, catalog: Catalog) -> None:
    vm, (s1, _, _) = await _three(host, catalog)
    vm.boot_from("disk0", s1.disks[0].image)  # restarted on the original image
    with pytest.raises(UsageError) as err:
        await delete_snapshot(catalog, await catalog.get_snapshot(s1.id))
    assert err.value.code == "image-written-by-vm"
    assert (await catalog.get_snapshot(s1.id)).status is SnapshotStatus.DONE


async def test_a_failed_merge_is_finished_by_recover(host: FakeHost, catalog: Catalog) -> None:
    vm, (s1, s2, s3) = await _three(host, catalog)
    vm.merge_fault = MergeFault.FAIL
    with pytest.raises(HypervisorError):
        await delete_snapshot(catalog, await catalog.get_snapshot(s2.id))
    left = await catalog.get_snapshot(s2.id)
    assert left.status is SnapshotStatus.DELETING
    assert [m.snapshot_id for m in await catalog.open_merges("v")] == [s2.id]
    # nobody may read it any more
    with pytest.raises(BusyError) as err:
        async with catalog.hold_snapshot(s2.id, "verify"):
            pass
    assert err.value.code == "snapshot-being-deleted"
    await recover(catalog, "v")
    assert {r.id for r in await catalog.list_snapshots("v")} == {s1.id, s3.id}
    assert await catalog.open_merges("v") == []
    assert len(vm.chain("disk0")) == 3


async def test_a_merge_left_running_is_attached_to(host: FakeHost, catalog: Catalog) -> None:
    vm, (s1, s2, s3) = await _three(host, catalog)
    # a freezeframe killed during the merge of S2: its job keeps running in "QEMU"
    vm.leave_merge("disk0", s3.disks[0].image, done=1)
    await catalog.begin_delete(s2.id)
    await catalog.open_merge(
        vm="v",
        snapshot_id=s2.id,
        device="disk0",
        top=s3.disks[0].image,
        base=s2.disks[0].image,
        live=True,
    )
    await recover(catalog, "v")
    assert {r.id for r in await catalog.list_snapshots("v")} == {s1.id, s3.id}
    assert vm.chain("disk0") == [s3.disks[0].overlay, s2.disks[0].image, s1.disks[0].image]
    assert await _image_of(catalog, s3.id) == s2.disks[0].image
