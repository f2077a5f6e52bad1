"""The live merge of one layer (``HypervisorDriver.merge_layer``), run unchanged against every
driver (one rig each, see :mod:`tests.contract.rigs`): after three snapshots, an intermediate
merge drops exactly that layer and an active merge makes each disk write to the layer below,
as the driver's own ``disks()`` and the rig's view say; on real VMs ``qemu-img info -U
--backing-chain`` names the same chain, ``qemu-img check`` passes on every image of it and the
guest's workload keeps writing. Each rig's lab VM is shared by the tests of this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from freezeframe.engine import SnapshotRequest, Snapshotter, open_driver
from freezeframe.errors import HypervisorError
from freezeframe.hypervisor import HypervisorDriver, LayerMerge, MergeProgress
from freezeframe.hypervisor.libvirt import LibvirtDriver
from freezeframe.hypervisor.qmp import QmpDriver, merge_job_id
from freezeframe.models import DiskInfo, QuiescePolicy, SnapshotStatus
from freezeframe.testing import FakeVm, MergeFault
from tests.contract.rigs import Rig, RigVm
from tests.integration.libvirt_helpers import virsh

REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)


async def _snapshots(rig: Rig, vm: RigVm) -> None:
    for _ in range(3):
        rec = await Snapshotter(rig.catalog).snapshot(vm.name, REQUIRED)
        assert rec.status is SnapshotStatus.DONE


def _chain(disk: DiskInfo) -> list[str]:
    return [disk.file, *disk.backing]


async def _disk(drv: HypervisorDriver, device: str) -> DiskInfo:
    return next(d for d in await drv.disks() if d.device == device)


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


async def _files_agree(rig: Rig, chain: list[str]) -> None:
    """On real VMs: the image headers make up ``chain`` (top first) and every image of it
    passes ``qemu-img check`` (the active one, written meanwhile, may show leaked clusters)."""
    if not rig.needs_lab:
        return
    info = await asyncio.to_thread(
        _qemu_img, "info", "-U", "--backing-chain", "--output=json", chain[0]
    )
    assert info.returncode == 0, info.stderr
    assert [i["filename"] for i in json.loads(info.stdout)] == chain
    for i, image in enumerate(chain):
        check = await asyncio.to_thread(_qemu_img, "check", "-U", image)
        assert check.returncode in ((0, 3) if i == 0 else (0,)), (image, check.stdout)


def _open_by_qemu(image: str) -> list[int]:
    """The QEMU processes of this host that hold ``image`` open."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "comm").read_text().startswith("qemu"):
                continue
            if any(os.readlink(fd) == image for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


async def _closed(rig: Rig, image: str) -> None:
    """On real VMs: no QEMU holds the merged layer open (the caller may delete it)."""
    if rig.needs_lab:
        assert await asyncio.to_thread(_open_by_qemu, image) == []


async def _snapshot_after_merge(rig: Rig, vm: RigVm, drv: HypervisorDriver, device: str) -> None:
    """A cut of ``device`` right after its merge is accepted (QEMU keeps no node busy)."""
    disks = [d for d in await drv.disks() if d.device == device]
    prepared = await drv.prepare_cut(f"m{uuid.uuid4().hex[:10]}", disks)
    await drv.cut(prepared)
    await drv.verify_cut(prepared)


async def _still_writes(rig: Rig, vm: RigVm) -> None:
    before = await rig.workload_round(vm)
    if before is None:
        return
    for _ in range(50):
        await asyncio.sleep(0.2)
        now = await rig.workload_round(vm)
        if now is not None and now > before:
            return
    raise AssertionError(f"the guest's workload is stuck at round {before}")


async def test_intermediate_merge_drops_the_layer_and_repoints_the_one_above(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    await _snapshots(rig, vm)
    active = await rig.images(vm)  # (a QMP socket serves one client: ask before the driver)
    async with open_driver(await rig.catalog.get_vm(vm.name)) as drv:
        for disk in await drv.disks():
            chain = _chain(disk)
            assert len(chain) >= 4
            merge = LayerMerge(disk.device, chain[1], chain[2])
            await rig.writable(merge.base)
            seen: list[MergeProgress] = []
            out = await drv.merge_layer(merge, seen.append)
            assert (out.device, out.active, out.already) == (disk.device, False, False)
            assert seen
            assert seen[-1].done == seen[-1].total == out.bytes
            want = [chain[0], *chain[2:]]
            assert _chain(await _disk(drv, disk.device)) == want
            again = await drv.merge_layer(merge)
            assert (again.already, again.bytes) == (True, 0)
            await _files_agree(rig, want)
            await _closed(rig, merge.top)
    assert await rig.images(vm) == active
    await _still_writes(rig, vm)


async def test_active_merge_makes_each_disk_write_to_the_layer_below(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    await _snapshots(rig, vm)
    bases: dict[str, str] = {}
    async with open_driver(await rig.catalog.get_vm(vm.name)) as drv:
        for disk in await drv.disks():
            chain = _chain(disk)
            merge = LayerMerge(disk.device, chain[0], chain[1])
            bases[disk.device] = merge.base
            await rig.writable(merge.base)
            out = await drv.merge_layer(merge)
            assert (out.device, out.active, out.already) == (disk.device, True, False)
            after = await _disk(drv, disk.device)
            assert _chain(after) == chain[1:]
            again = await drv.merge_layer(merge)
            assert (again.already, again.active) == (True, True)
            await _files_agree(rig, chain[1:])
            await _closed(rig, merge.top)
    assert await rig.images(vm) == bases
    await _still_writes(rig, vm)


async def _leave_active_merge(rig: Rig, vm: RigVm, drv: HypervisorDriver, disk: DiskInfo) -> None:
    """Start an active merge of ``disk``'s top into the layer below and leave it running (its
    job ready, nothing completes it), as a freezeframe killed during a merge does."""
    chain = _chain(disk)
    if isinstance(drv, QmpDriver):
        await drv._execute(
            "block-commit",
            {"job-id": merge_job_id(disk.device), "device": disk.node, "base": chain[1],
             "auto-finalize": True, "auto-dismiss": False},
        )  # fmt: skip
    elif isinstance(drv, LibvirtDriver):
        assert drv.domain_name is not None
        await asyncio.to_thread(
            virsh, "blockcommit", drv.domain_name, disk.device, "--active", "--base", chain[1]
        )
    else:
        assert isinstance(vm.handle, FakeVm)
        vm.handle.leave_merge(disk.device, chain[0])


async def test_a_merge_left_running_is_attached_to_and_finished(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    await _snapshots(rig, vm)
    async with open_driver(await rig.catalog.get_vm(vm.name)) as drv:
        disk = (await drv.disks())[0]
        chain = _chain(disk)
        merge = LayerMerge(disk.device, chain[0], chain[1])
        await rig.writable(merge.base)
        await _leave_active_merge(rig, vm, drv, disk)
        out = await drv.merge_layer(merge)
        assert (out.active, out.already) == (True, False)
        assert _chain(await _disk(drv, disk.device)) == chain[1:]
        await _files_agree(rig, chain[1:])
        await _closed(rig, merge.top)
        # a snapshot on the shortened chain works (nothing holds the new top busy)
        await _snapshot_after_merge(rig, vm, drv, disk.device)
    await _still_writes(rig, vm)


async def test_refused_merges_leave_the_chain_as_it_was(rig: Rig) -> None:
    vm = await rig.vm_with_agent()
    await _snapshots(rig, vm)
    async with open_driver(await rig.catalog.get_vm(vm.name)) as drv:
        disk = (await drv.disks())[0]
        chain = _chain(disk)
        for merge in (
            LayerMerge(disk.device, chain[0], chain[2]),  # not adjacent
            LayerMerge(disk.device, f"{chain[1]}.nope", f"{chain[2]}.nope"),  # not in the chain
        ):
            with pytest.raises(HypervisorError) as ei:
                await drv.merge_layer(merge)
            assert ei.value.code == "not-in-chain"
        # the base cannot be written (immutable on the host; a scripted job error on the fake)
        merge = LayerMerge(disk.device, chain[1], chain[2])
        if rig.needs_lab:
            subprocess.run(["chattr", "+i", merge.base], check=True)
        else:
            assert isinstance(vm.handle, FakeVm)
            vm.handle.merge_fault = MergeFault.FAIL
        try:
            with pytest.raises(HypervisorError) as ei:
                await drv.merge_layer(merge)
            assert ei.value.code == "merge-failed"
        finally:
            if rig.needs_lab:
                subprocess.run(["chattr", "-i", merge.base], check=True)
        assert _chain(await _disk(drv, disk.device)) == chain
        await _files_agree(rig, chain)
        # and once the cause is gone, the same merge goes through
        await rig.writable(merge.base)
        out = await drv.merge_layer(merge)
        assert not out.already
    await _still_writes(rig, vm)
