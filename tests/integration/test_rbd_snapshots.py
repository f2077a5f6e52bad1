"""Snapshots of VMs whose disks live in Ceph RBD (issue 9), against the real lab Ceph.

One lab VM per driver (QMP, libvirt), mixed: ``disk0`` ext4 on a local qcow2 image, ``disk1``
ext4 and ``disk2`` xfs as RBD images opened by QEMU's rbd driver (libvirt: ``<disk
type='network'>``), all under the lab workload. Several scenarios on each VM, in order:

- the two RBD disks alone, quiesced: filesystem level, ``ff-<id>`` visible with ``rbd snap
  ls``, ``snapshot verify`` consistent through QEMU's rbd driver (``snapshot=``), the
  workload's cross-disk order holds at the cut;
- all three disks in one cut (RBD snapshots, then the qcow2 transaction, one freeze);
- no agent under ``required``: fails, nothing new in Ceph; under ``preferred``: a crash cut
  with the vCPUs paused around it, the pause recorded;
- the monitor stopped inside the freeze: a clear code, the guest thawed, the record failed,
  no snapshot left in Ceph, the qcow2 overlay removed;
- an image renamed away (QEMU keeps it open): ``rbd-image-not-found``, thawed, nothing left;
- ``recover`` of an attempt killed while frozen, after its RBD snapshots were made and before
  the qcow2 transaction, removes them;
- ``snapshot delete`` (CLI) of the RBD-only snapshot removes ``ff-<id>`` and the record; of
  the mixed one merges its qcow2 layer away live and removes its RBD snapshots.

Plus an image that does not exist: the backend's prepare says ``rbd-image-not-found``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, recover, verify_snapshot
from freezeframe.engine.doctor import CheckStatus
from freezeframe.engine.export import export_snapshot
from freezeframe.engine.snapshot import open_driver
from freezeframe.errors import SnapshotFailedError, StorageError
from freezeframe.hypervisor import HypervisorDriver
from freezeframe.lab import LabVm
from freezeframe.lab.workload import check_invariant, last_sequence
from freezeframe.models import (
    ConsistencyLevel,
    DiskInfo,
    FsFreezeState,
    QuiescePolicy,
    RbdSource,
    SnapshotRecord,
    SnapshotStatus,
    VerifyVerdict,
)
from freezeframe.storage import mounted, open_image
from freezeframe.storage.rbd_backend import RbdBackend
from tests.integration.ceph_helpers import CephHandle, ff
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration


def snaps(ceph: CephHandle, spec: str) -> list[str]:
    """``rbd snap ls`` of ``spec``: the snapshot names, Ceph's own tool."""
    out = ceph.rbd("snap", "ls", spec, "--format", "json").stdout
    return [s["name"] for s in json.loads(out)]


def rbd_specs(vm: LabVm) -> list[str]:
    return [d.rbd for d in vm.disks if d.rbd is not None]


def all_snaps(ceph: CephHandle, vm: LabVm) -> dict[str, list[str]]:
    return {spec: snaps(ceph, spec) for spec in rbd_specs(vm)}


async def guest_state(catalog: Catalog, name: str) -> FsFreezeState:
    cfg = await catalog.get_vm(name)
    async with open_driver(cfg) as driver:
        address = driver.agent_address(cfg, await driver.agent_channel())
        assert address is not None
        agent = driver.agent_at(address, timeout=5)
        await agent.connect()
        try:
            return await agent.fsfreeze_status()
        finally:
            await agent.close()


async def run_state(catalog: Catalog, name: str) -> str | None:
    async with open_driver(await catalog.get_vm(name)) as driver:
        return await driver.run_state()


async def seqs_at_cut(catalog: Catalog, rec: SnapshotRecord) -> list[int]:
    """The workload's last record on every disk at the cut, in disk order (an RBD disk read
    through its snapshot, read-only)."""
    backend = RbdBackend(await catalog.get_vm(rec.vm))
    out = []
    for d in sorted(rec.disks, key=lambda d: d.device):
        image = backend.verify_source(d) if d.backend == "rbd" else d.image
        async with open_image(image, d.format) as view, mounted(view) as mnt:
            seq = last_sequence((mnt / "ffwork.log").read_bytes())
        assert seq is not None, d
        out.append(seq)
    return out


def mon_pid(ceph: CephHandle) -> int:
    return next(int(d["pid"]) for d in ceph.doc["daemons"] if d["name"].startswith("mon"))


@pytest.mark.parametrize("driver", ["qmp", "libvirt"])
async def test_rbd_and_mixed_vm(
    driver: str, lab_vm: LabVmFactory, catalog: Catalog, ceph_lab: CephHandle
) -> None:
    vm = await lab_vm(disks=("ext4", "ext4", "xfs"), driver=driver, rbd=[1, 2])
    await catalog.add_vm(vm.vm_config(), replace=True)
    assert vm.vm_config().ceph_conf == str(ceph_lab.conf)
    qcow2_dev = "disk0" if driver == "qmp" else "vda"
    vmdir = vm.console_log.parent
    await asyncio.sleep(1.0)  # let the workload dirty some pages
    snap = Snapshotter(catalog)

    # doctor names, per disk, the backend that cuts it; nothing stands in the way.
    rep = await doctor(catalog, vm.name)
    disk_checks = {c.name: c for c in rep.checks if c.name.startswith("disk ") and
                   " " not in c.name[5:]}  # fmt: skip
    assert len(disk_checks) == 3, rep.checks
    assert all(c.status is CheckStatus.PASS for c in disk_checks.values()), rep.checks
    assert "backend qcow2" in disk_checks[f"disk {qcow2_dev}"].detail
    assert sum("backend rbd" in c.detail for c in disk_checks.values()) == 2
    assert rep.predicted_level is ConsistencyLevel.FILESYSTEM

    # 1. The two RBD disks (ext4 + xfs) alone, quiesced.
    rbd_only = await snap.snapshot(
        vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, exclude_disks=(qcow2_dev,))
    )
    assert rbd_only.level is ConsistencyLevel.FILESYSTEM, rbd_only.level_reason
    assert [d.backend for d in rbd_only.disks] == ["rbd", "rbd"]
    name = f"ff-{rbd_only.id}"
    for d, spec in zip(rbd_only.disks, rbd_specs(vm), strict=True):
        assert d.image == f"rbd:{spec}@{name}"
        assert d.overlay is None
        assert snaps(ceph_lab, spec) == [name]  # Ceph's own tool names the snapshot
    cut = next(e for e in rbd_only.timeline if e.name == "cut")
    assert "2 RBD snapshot(s) at once" in cut.detail
    assert rbd_only.freeze_window_ms is not None
    assert rbd_only.freeze_window_ms < 10_000
    v = await verify_snapshot(catalog, rbd_only.id)
    assert v.verdict is VerifyVerdict.CONSISTENT, v.checks
    assert {c.fstype for c in v.checks} == {"ext4", "xfs"}
    seqs = await seqs_at_cut(catalog, rbd_only)
    assert check_invariant(seqs), seqs

    # 2. Mixed: the qcow2 disk and both RBD disks in one cut under one freeze.
    mixed = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert mixed.level is ConsistencyLevel.FILESYSTEM, mixed.level_reason
    assert sorted(d.backend for d in mixed.disks) == ["qcow2-external", "rbd", "rbd"]
    cut = next(e for e in mixed.timeline if e.name == "cut")
    assert "2 RBD snapshot(s) at once, then 1 disk(s) in one transaction" in cut.detail
    assert [e.name for e in mixed.timeline].count("freeze_sent") == 1
    for spec in rbd_specs(vm):
        assert snaps(ceph_lab, spec) == [name, f"ff-{mixed.id}"]
    v = await verify_snapshot(catalog, mixed.id)
    assert v.verdict is VerifyVerdict.CONSISTENT, v.checks
    seqs = await seqs_at_cut(catalog, mixed)
    assert len(seqs) == 3
    assert check_invariant(seqs), seqs
    assert await guest_state(catalog, vm.name) is FsFreezeState.THAWED
    if driver == "qmp":  # export reads the RBD snapshots through QEMU's rbd driver
        out = await export_snapshot(catalog, mixed.id, str(vmdir.parent / f"x-{mixed.id}"))
        exported = []
        for img in sorted(out.images, key=lambda i: i.device):
            info = json.loads(
                subprocess.run(
                    ["qemu-img", "info", "--output=json", img.path],
                    capture_output=True, text=True, check=True,
                ).stdout
            )  # fmt: skip
            assert "backing-filename" not in info, info  # standalone
            async with open_image(img.path, "qcow2") as view, mounted(view) as mnt:
                exported.append(last_sequence((mnt / "ffwork.log").read_bytes()))
        assert exported == seqs  # every disk as it was at the cut, RBD ones included
        meta = json.loads(Path(out.metadata_path).read_text())
        assert meta["level"] == "filesystem", meta

    # 3. No agent: required fails and leaves nothing in Ceph; preferred pauses the vCPUs.
    cfg = await catalog.get_vm(vm.name)
    await catalog.add_vm(replace(cfg, agent=False), replace=True)
    before = all_snaps(ceph_lab, vm)
    files_before = set(vmdir.iterdir())
    with pytest.raises(SnapshotFailedError) as err:
        await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert err.value.code == "agent-unreachable", err.value
    assert all_snaps(ceph_lab, vm) == before
    assert set(vmdir.iterdir()) == files_before
    crash = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED))
    assert crash.level is ConsistencyLevel.CRASH
    names = [e.name for e in crash.timeline]
    assert names.index("paused") < names.index("cut_sent") < names.index("resumed")
    window = next(e for e in crash.timeline if e.name == "pause_window")
    assert 0 < float(window.detail.split()[0]) < 5_000
    assert "vCPUs were paused for" in crash.level_reason
    assert await run_state(catalog, vm.name) == "running"
    seqs = await seqs_at_cut(catalog, crash)  # still atomic: the cross-disk order holds
    assert len(seqs) == 3
    assert check_invariant(seqs), seqs
    for spec in rbd_specs(vm):
        assert snaps(ceph_lab, spec)[-1] == f"ff-{crash.id}"
    await catalog.add_vm(cfg, replace=True)

    # 4. The monitor stops inside the freeze: a clear code, thawed, nothing left made.
    mon = mon_pid(ceph_lab)

    async def stop_mon(_vm: str, _driver: HypervisorDriver) -> None:
        os.kill(mon, signal.SIGSTOP)

    async def cont_mon(_vm: str, _driver: HypervisorDriver) -> None:
        os.kill(mon, signal.SIGCONT)

    before = all_snaps(ceph_lab, vm)
    files_before = set(vmdir.iterdir())
    broken = Snapshotter(catalog, before_freeze=stop_mon, after_thaw=cont_mon)
    try:
        with pytest.raises(SnapshotFailedError) as err:
            await broken.snapshot(
                vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=20)
            )
    finally:
        os.kill(mon, signal.SIGCONT)
    assert err.value.code in ("ceph-timeout", "ceph-unreachable"), err.value
    failed = await catalog.get_snapshot(err.value.snapshot_id or "")
    assert failed.status is SnapshotStatus.FAILED
    assert failed.disks == ()  # nothing switched, nothing kept
    assert "thaw_confirmed" in [e.name for e in failed.timeline]
    assert await guest_state(catalog, vm.name) is FsFreezeState.THAWED
    assert all_snaps(ceph_lab, vm) == before
    assert set(vmdir.iterdir()) == files_before  # the qcow2 overlay was removed too

    # 4b. Verifying an RBD snapshot while the monitor does not answer: a Ceph code within the
    # backend's bound, not a reader (qemu-img) waiting minutes on it; the verdict is unchanged.
    os.kill(mon, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(StorageError) as down:
            await verify_snapshot(catalog, rbd_only.id)
        took = time.monotonic() - start
    finally:
        os.kill(mon, signal.SIGCONT)
    assert down.value.code in ("ceph-timeout", "ceph-unreachable"), down.value
    assert took < 60, took
    kept = await catalog.get_snapshot(rbd_only.id)
    assert kept.verification is not None
    assert kept.verification.verdict is VerifyVerdict.CONSISTENT

    # 5. An image gone (renamed away while QEMU keeps it open): named, nothing made.
    gone = rbd_specs(vm)[1]
    before = all_snaps(ceph_lab, vm)
    ceph_lab.rbd("mv", gone, f"{gone}-away")
    try:
        with pytest.raises(SnapshotFailedError) as err:
            await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    finally:
        ceph_lab.rbd("mv", f"{gone}-away", gone)
    assert err.value.code == "rbd-image-not-found", err.value
    assert gone.split("/", 1)[1] in err.value.message
    failed = await catalog.get_snapshot(err.value.snapshot_id or "")
    assert failed.status is SnapshotStatus.FAILED
    assert await guest_state(catalog, vm.name) is FsFreezeState.THAWED
    assert all_snaps(ceph_lab, vm) == before
    assert not any(f"ff-{failed.id}" in n for names in before.values() for n in names)

    # 6. recover removes the RBD snapshots of an attempt killed after making them, while
    # frozen, before the qcow2 transaction (and before anything was recorded done).
    dead = await kill_create_after_rbd_cut(catalog, ceph_lab, vm)
    assert dead.status is SnapshotStatus.RUNNING
    assert sorted(d.backend for d in dead.disks) == ["qcow2-external", "rbd", "rbd"]
    for spec in rbd_specs(vm):
        assert f"ff-{dead.id}" in snaps(ceph_lab, spec)  # made by the killed process
    outcomes = await recover(catalog, vm.name)
    assert not any(o.failed for o in outcomes), outcomes
    assert await guest_state(catalog, vm.name) is FsFreezeState.THAWED
    settled = await catalog.get_snapshot(dead.id)
    assert settled.status is SnapshotStatus.FAILED
    assert settled.disks == ()
    for spec in rbd_specs(vm):
        assert f"ff-{dead.id}" not in snaps(ceph_lab, spec)
    assert not any(Path(d.overlay).exists() for d in dead.disks if d.overlay)

    # 7. Delete: an RBD-only snapshot goes from Ceph, then from the catalog; a mixed one gets
    # its qcow2 layer merged away live and its RBD snapshots removed.
    res = ff("snapshot", "delete", rbd_only.id, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["record"]["id"] == rbd_only.id
    for spec in rbd_specs(vm):
        assert f"ff-{rbd_only.id}" not in snaps(ceph_lab, spec)
        assert f"ff-{mixed.id}" in snaps(ceph_lab, spec)
    shown = ff("snapshot", "show", rbd_only.id, "--json")
    assert json.loads(shown.stdout)["code"] == "snapshot-not-found", shown.stdout
    res = ff("snapshot", "delete", mixed.id, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    hows = {d["how"] for d in json.loads(res.stdout)["disks"]}
    assert hows == {"live", "removed"}, res.stdout
    for spec in rbd_specs(vm):
        assert f"ff-{mixed.id}" not in snaps(ceph_lab, spec)


#: ``snapshot create`` whose qcow2 transaction waits (after the RBD snapshots, inside the
#: freeze): a test-side patch of the qcow2 backend's cut, nothing in the engine.
_SLOW_QCOW2_CUT = """
import asyncio, sys
from freezeframe.storage.backends import Qcow2Backend
real = Qcow2Backend.cut
async def slow(self, handle):
    await asyncio.sleep(120)
    await real(self, handle)
Qcow2Backend.cut = slow
from freezeframe.cli.main import main
sys.argv = ["freezeframe", "snapshot", "create", sys.argv[1], "--freeze-timeout", "120"]
main()
"""


async def kill_create_after_rbd_cut(
    catalog: Catalog, ceph: CephHandle, vm: LabVm
) -> SnapshotRecord:
    """Run ``snapshot create`` as a process, SIGKILL it once its RBD snapshots exist (it is
    then frozen, waiting in the qcow2 transaction) and return its record."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_QCOW2_CUT, vm.name],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            running = [r for r in await catalog.list_snapshots(vm.name)
                       if r.status is SnapshotStatus.RUNNING]  # fmt: skip
            if running and all(f"ff-{running[0].id}" in snaps(ceph, s) for s in rbd_specs(vm)):
                break
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return await catalog.get_snapshot(running[0].id)


async def test_missing_image_is_named(ceph_lab: CephHandle, catalog: Catalog) -> None:
    from freezeframe.models import VmConfig

    backend = RbdBackend(VmConfig("x", ceph_conf=str(ceph_lab.conf)))
    src = RbdSource(ceph_lab.pool, "no-such-image")
    disk = DiskInfo("vdb", "vdb", src.name, "raw", 0, rbd=src)
    assert backend.cut_problem(disk) is None
    with pytest.raises(StorageError) as err:
        await backend.prepare("abc123", [disk])
    assert err.value.code == "rbd-image-not-found"
    assert "no-such-image" in err.value.message
    listed = subprocess.run(
        ["rbd", "-c", str(ceph_lab.conf), "ls", ceph_lab.pool],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert "no-such-image" not in listed
