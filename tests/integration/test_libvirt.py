"""Snapshots of lab guests run as libvirt domains (``lab up --libvirt``), on a real libvirtd.

What issue 7 asks to see: a quiesced ext4 + xfs snapshot verifies consistent and keeps the lab
workload's cross-disk order at the cut; libvirt's live XML (``virsh domblklist``) then names the
new overlays and the domain's log holds no ``custom-monitor`` taint; no agent under required /
preferred / off; a hung agent (``virsh suspend`` during the freeze) returns within the deadline
and the guest ends thawed after ``virsh resume``; ``recover`` after a killed ``snapshot create``
thaws it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, recover, verify_snapshot
from freezeframe.errors import SnapshotFailedError
from freezeframe.hypervisor import HypervisorDriver, open_agent
from freezeframe.lab import LabVm
from freezeframe.lab.workload import check_invariant, last_sequence
from freezeframe.models import (
    ConsistencyLevel,
    FsFreezeState,
    QuiescePolicy,
    SnapshotRecord,
    SnapshotStatus,
    VerifyVerdict,
)
from freezeframe.storage import mounted, open_image
from tests.integration.conftest import LabVmFactory, kill_create_while_frozen
from tests.integration.libvirt_helpers import domain_log, domblklist, virsh

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]
FF = [sys.executable, "-m", "freezeframe.cli.main"]


async def libvirt_vm(
    lab_vm: LabVmFactory, catalog: Catalog, *, disks: tuple[str, ...], agent: bool
) -> LabVm:
    vm = await lab_vm(disks=disks, agent=agent, driver="libvirt", timeout=240)
    assert vm.driver == "libvirt"
    cfg = vm.vm_config()
    assert cfg.driver == "libvirt"
    await catalog.add_vm(cfg, replace=True)
    return vm


def address(vm: LabVm) -> str:
    cfg = vm.vm_config()
    assert cfg.domain is not None
    return f"libvirt:{cfg.domain}@{cfg.connect_uri}"


async def guest_state(vm: LabVm) -> FsFreezeState:
    async with open_agent(address(vm), timeout=10) as agent:
        return await agent.fsfreeze_status()


async def guest_seq(vm: LabVm) -> int:
    async with open_agent(address(vm), timeout=10) as agent:
        return int((await agent.file_read("/run/ffwork/seq")).strip() or b"0")


async def keeps_writing(vm: LabVm) -> None:
    first = await guest_seq(vm)
    for _ in range(100):
        await asyncio.sleep(0.2)
        if await guest_seq(vm) > first:
            return
    raise AssertionError("the guest's workload does not write any more")


async def seqs_at_cut(rec: SnapshotRecord) -> list[int]:
    seqs = []
    for d in sorted(rec.disks, key=lambda d: d.device):
        async with open_image(d.image, d.format) as view, mounted(view) as mnt:
            seq = last_sequence((mnt / "ffwork.log").read_bytes())
        assert seq is not None, d
        seqs.append(seq)
    return seqs


async def test_quiesced_snapshot_through_libvirt(lab_vm: LabVmFactory, catalog: Catalog) -> None:
    vm = await libvirt_vm(lab_vm, catalog, disks=("ext4", "xfs"), agent=True)
    domain = vm.domain_name
    assert domain is not None
    before = domblklist(domain)
    snap = Snapshotter(catalog)
    rec = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM, rec.level_reason
    assert {f.mountpoint for f in rec.filesystems if f.frozen} == {"/mnt/disk0", "/mnt/disk1"}
    assert rec.evidence, "the agent's own log lines of the freeze window"
    # libvirt's own view of the domain names the new overlays: it switched them itself.
    after = domblklist(domain)
    for d in rec.disks:
        assert before[d.device] == d.image
        assert after[d.device] == d.overlay
    v = await verify_snapshot(catalog, rec.id)
    assert v.verdict is VerifyVerdict.CONSISTENT, v.checks
    assert check_invariant(await seqs_at_cut(rec))
    # A second one continues the chain.
    second = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert second.parent_id == rec.id
    assert check_invariant(await seqs_at_cut(second))
    log = domain_log(domain)
    assert "custom-monitor" not in log
    await keeps_writing(vm)


async def test_no_agent_under_each_policy(lab_vm: LabVmFactory, catalog: Catalog) -> None:
    vm = await libvirt_vm(lab_vm, catalog, disks=("ext4",), agent=False)
    domain = vm.domain_name
    assert domain is not None
    snap = Snapshotter(catalog)
    files = sorted(p.name for p in Path(vm.disks[0].file).parent.glob("*.qcow2"))
    before = domblklist(domain)
    with pytest.raises(SnapshotFailedError) as ei:
        await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert ei.value.exit_code == 10
    assert domblklist(domain) == before  # nothing switched
    assert sorted(p.name for p in Path(vm.disks[0].file).parent.glob("*.qcow2")) == files
    pref = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED))
    assert pref.level is ConsistencyLevel.CRASH
    off = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.OFF))
    assert off.level is ConsistencyLevel.CRASH
    assert off.parent_id == pref.id
    assert domblklist(domain)["vda"] == off.disks[0].overlay

    # The domain's own policy (<ff:policy> in its <metadata>) wins over the registration
    # (preferred for a lab VM): with quiesce required there, the call without --quiesce fails.
    virsh(
        "metadata", domain, "--live", "--uri", "https://freezeframe.dev/xmlns/policy/1",
        "--key", "ff", "--set", '<policy quiesce="required" freeze-timeout="4"/>',
    )  # fmt: skip
    before = domblklist(domain)
    with pytest.raises(SnapshotFailedError) as ei:
        await snap.snapshot(vm.name)
    failed = await catalog.get_snapshot(ei.value.snapshot_id)
    assert failed.policy is QuiescePolicy.REQUIRED
    assert "policy" in [e.name for e in failed.timeline]
    assert domblklist(domain) == before
    # The call's own --quiesce still wins over both.
    assert (await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.OFF))).level is (
        ConsistencyLevel.CRASH
    )


async def test_hung_agent_returns_within_deadline_and_ends_thawed(
    lab_vm: LabVmFactory, catalog: Catalog
) -> None:
    vm = await libvirt_vm(lab_vm, catalog, disks=("ext4", "xfs"), agent=True)
    domain = vm.domain_name
    assert domain is not None
    suspended: list[asyncio.Task[None]] = []

    async def suspend_soon() -> None:
        # libvirt refuses agent calls on a paused domain: suspend once the freeze is sent.
        await asyncio.sleep(0.03)
        await asyncio.to_thread(virsh, "suspend", domain)

    async def before_freeze(name: str, driver: HypervisorDriver) -> None:
        suspended.append(asyncio.create_task(suspend_soon()))

    snap = Snapshotter(catalog, before_freeze=before_freeze, followup=True, followup_for=60)
    deadline = 2.0
    t0 = time.monotonic()
    try:
        rec = await snap.snapshot(
            vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED, freeze_timeout=deadline)
        )
        took = time.monotonic() - t0
        await suspended[0]
        assert took < deadline + 3.0, took  # the freeze deadline, the urgent thaw's 1.5 s
        assert rec.level is ConsistencyLevel.CRASH  # the freeze never answered in time
        assert rec.thaw_unconfirmed
    finally:
        if suspended:
            await asyncio.gather(*suspended, return_exceptions=True)
        virsh("resume", domain, check=False)
    # After `virsh resume` the follow-up's thaws get through (the late freeze is undone).
    assert await snap.wait_followups(timeout=60)
    assert await guest_state(vm) is FsFreezeState.THAWED
    assert await catalog.open_intents(vm.name) == []
    await keeps_writing(vm)


async def test_recover_thaws_after_a_killed_create(lab_vm: LabVmFactory, catalog: Catalog) -> None:
    vm = await libvirt_vm(lab_vm, catalog, disks=("ext4", "xfs"), agent=True)
    domain = vm.domain_name
    assert domain is not None
    before = domblklist(domain)
    await kill_create_while_frozen(catalog, vm.name, "--freeze-timeout", "120")
    assert await guest_state(vm) is FsFreezeState.FROZEN  # the killed process left it frozen
    (intent,) = await catalog.open_intents(vm.name)
    assert intent.agent_address == address(vm)
    out = await recover(catalog)
    assert [(o.snapshot_id, o.thawed) for o in out] == [(intent.snapshot_id, True)]
    assert await guest_state(vm) is FsFreezeState.THAWED
    rec = await catalog.get_snapshot(intent.snapshot_id)
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()  # never switched: its overlays were removed
    assert domblklist(domain) == before
    await keeps_writing(vm)
