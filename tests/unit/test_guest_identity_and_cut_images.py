"""Issue 11, items 1, 2, 8 and 9 on the fakes of :mod:`freezeframe.testing`: the agent frozen is
provably this VM's (``agent-wrong-vm`` under every policy), a VM writing to an image a snapshot
holds is refused (``image-held-by-snapshot``), images at the cut are protected and
fingerprinted (``changed-since-cut``), a disk the guest mounts nothing from is raw data
(``no-mounted-filesystem``), and what records and doctor say about it all."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, verify_snapshot
from freezeframe.engine.doctor import CheckStatus, DoctorReport
from freezeframe.engine.images import (
    IMAGE_HELD,
    boot_images,
    fingerprint,
    fingerprint_changes,
    protect_image,
)
from freezeframe.engine.snapshot import AGENT_WRONG_VM
from freezeframe.errors import Action, Remedy, SnapshotFailedError
from freezeframe.hypervisor.base import DriverCheck, same_socket
from freezeframe.models import (
    NO_MOUNTED_FILESYSTEM,
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    Verification,
    VerifyVerdict,
)
from freezeframe.testing import FakeDisk, FakeFilesystem, FakeGuest, FakeHost, FakeVm

POLICIES = [QuiescePolicy.REQUIRED, QuiescePolicy.PREFERRED, QuiescePolicy.OFF]


def _check(rep: DoctorReport, name: str) -> list[str | None]:
    return [c.code for c in rep.checks if c.name == name]


def _fails(rep: DoctorReport) -> list[str | None]:
    return [c.code for c in rep.checks if c.status is CheckStatus.FAIL]


# ---------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_vm_registered_with_another_vms_agent_is_refused_freezing_nothing(
    host: FakeHost, catalog: Catalog, policy: QuiescePolicy
) -> None:
    a, b = host.add(FakeVm.simple("a")), host.add(FakeVm.simple("b"))
    await catalog.add_vm(a.config())
    a.registered_agent = b.address  # a's registration names b's agent
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(catalog).snapshot("a", SnapshotRequest(quiesce=policy))
    err = ei.value
    assert err.code == AGENT_WRONG_VM
    assert err.exit_code == 10
    assert b.address in err.message  # the registered agent
    assert a.address in err.message  # the one QEMU serves
    assert err.hint is not None
    for vm in (a, b):
        assert vm.guest is not None
        assert vm.guest.sent("guest-fsfreeze-freeze") == 0
        assert not vm.guest.frozen
    assert b.guest is not None
    assert b.guest.connections == 0
    assert "prepare" not in a.ops
    assert "cut" not in a.ops
    [rec] = await catalog.list_snapshots("a")
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert await catalog.list_snapshots("a", status=SnapshotStatus.DONE) == []

    rep = await doctor(catalog, "a", quiesce=policy)
    assert AGENT_WRONG_VM in _fails(rep)
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert "refused" in rep.verdict
    assert not rep.ok

    a.registered_agent = None  # the right agent: snapshots again
    rec = await Snapshotter(catalog).snapshot("a", SnapshotRequest(quiesce=policy))
    assert rec.status is SnapshotStatus.DONE


def test_sockets_are_compared_by_inode_and_path(tmp_path: Path) -> None:
    import socket

    real = tmp_path / "qga.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(real))
    try:
        link = tmp_path / "link.sock"
        link.symlink_to(real)
        assert same_socket(str(link), str(real))
        assert same_socket(str(tmp_path / "x" / ".." / "qga.sock"), str(real))
        other = tmp_path / "other.sock"
        assert not same_socket(str(other), str(real))  # missing: by path
    finally:
        s.close()


# ---------------------------------------------------------------------------- item 2


async def test_a_vm_restarted_on_an_image_a_snapshot_holds_is_refused(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = host.add(FakeVm.simple("r"))
    await catalog.add_vm(vm.config())
    first = await Snapshotter(catalog).snapshot("r")
    [d0] = [d for d in first.disks if d.device == "disk0"]
    assert d0.overlay is not None
    [row] = [b for b in await boot_images(catalog, "r") if b.device == "disk0"]
    assert (row.boot_from, row.snapshot_id, row.on_it) == (d0.overlay, first.id, True)

    vm.boot_from("disk0", d0.image)  # restarted by hand on the original image
    prepared = vm.ops.count("prepare")
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(catalog).snapshot("r", SnapshotRequest(quiesce=QuiescePolicy.OFF))
    err = ei.value
    assert err.code == IMAGE_HELD
    assert first.id in err.message
    assert d0.image in err.message
    assert d0.overlay in err.message  # the image to boot from
    assert err.hint is not None
    assert vm.ops.count("prepare") == prepared  # nothing prepared
    assert vm.guest is not None
    assert not vm.guest.frozen

    rep = await doctor(catalog, "r")
    assert _check(rep, "disk disk0 image") == [IMAGE_HELD]
    assert IMAGE_HELD in _fails(rep)
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert first.id in rep.verdict

    [row] = [b for b in await boot_images(catalog, "r") if b.device == "disk0"]
    assert row.boot_from == d0.overlay
    assert row.running_on == d0.image
    assert row.on_it is False
    assert row.held_by == (first.id,)

    # Given up: a snapshot verified changed-since-cut holds nothing any more.
    changed = Verification(VerifyVerdict.CHANGED, datetime.now(UTC))
    await catalog.set_verification(first.id, changed)
    rec = await Snapshotter(catalog).snapshot("r")
    assert rec.status is SnapshotStatus.DONE


def test_protect_and_fingerprint_an_image_at_the_cut(tmp_path: Path) -> None:
    image = tmp_path / "d0.qcow2"
    image.write_bytes(b"x" * 4096)
    os.chmod(image, 0o664)
    mode, problem = protect_image(str(image))
    assert (mode, problem) == (0o664, None)
    assert stat.S_IMODE(image.stat().st_mode) == 0o444
    assert protect_image(str(image)) == (None, None)  # already protected: nothing to give back
    assert protect_image("rbd:pool/img") == (None, None)
    assert protect_image(str(tmp_path / "gone"))[1] is not None

    fp = fingerprint(str(image))
    assert fp is not None
    disk = SnapshotDisk("disk0", "n0", str(image), "qcow2", None, fingerprint=fp)
    assert fingerprint_changes(disk) == []
    with image.open("r+b") as f:  # root writes through a missing write bit, as root QEMU does
        f.seek(100)
        f.write(b"guest data")
    os.utime(image, ns=(fp.mtime_ns + 10**9, fp.mtime_ns + 10**9))
    assert fingerprint_changes(disk) == ["mtime changed"]
    assert fingerprint_changes(replace(disk, fingerprint=None)) is None
    image.unlink()
    assert fingerprint_changes(disk) is None  # gone: verify's own check says so


async def test_verify_reports_a_changed_snapshot_as_changed(
    catalog: Catalog, tmp_path: Path
) -> None:
    image = tmp_path / "d0.qcow2"
    image.write_bytes(b"\0" * 8192)
    fp = fingerprint(str(image))
    assert fp is not None
    rec = SnapshotRecord(
        id="c0ffee000001",
        vm="v",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
    )
    await catalog.begin_snapshot(rec)
    disk = SnapshotDisk(
        "disk0",
        "n0",
        str(image),
        "raw",
        str(tmp_path / "d0.ff.qcow2"),
        fingerprint=fp,
        image_mode=0o644,
        quiesce_note=NO_MOUNTED_FILESYSTEM,
    )
    done = replace(
        rec, status=SnapshotStatus.DONE, level=ConsistencyLevel.FILESYSTEM, disks=(disk,)
    )
    await catalog.finish_snapshot(done)
    got = await catalog.get_snapshot(rec.id)
    assert got.disks == (disk,)  # fingerprint, mode and note survive the catalog
    assert got.error is None

    image.write_bytes(b"\1" * 16384)  # the guest wrote into it (size and mtime change)
    v = await verify_snapshot(catalog, rec.id)
    assert v.verdict is VerifyVerdict.CHANGED
    [check] = v.checks
    assert check.device == "disk0"
    assert "size 8192 -> 16384" in check.detail
    stored = await catalog.get_snapshot(rec.id)
    assert stored.verification is not None
    assert stored.verification.verdict is VerifyVerdict.CHANGED


# ---------------------------------------------------------------------------- item 8


def _with_raw_disk(name: str) -> FakeVm:
    guest = FakeGuest([FakeFilesystem("/mnt/disk0", "ext4", disks=("disk0",))])
    return FakeVm(name, [FakeDisk("disk0"), FakeDisk("swap")], guest=guest)


async def test_required_snapshots_a_disk_with_no_filesystem_as_raw_data(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = host.add(_with_raw_disk("n"))
    await catalog.add_vm(vm.config())
    rec = await Snapshotter(catalog).snapshot("n", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM
    notes = {d.device: d.quiesce_note for d in rec.disks}
    assert notes == {"disk0": None, "swap": NO_MOUNTED_FILESYSTEM}
    assert NO_MOUNTED_FILESYSTEM in rec.level_reason
    assert "exclude it from the snapshot" in rec.level_reason
    assert "--" not in rec.level_reason
    assert rec.error is None

    rep = await doctor(catalog, "n", quiesce=QuiescePolicy.REQUIRED)
    [line] = [c for c in rep.checks if c.code == NO_MOUNTED_FILESYSTEM]
    assert line.name == "disk swap filesystems"
    assert line.status is CheckStatus.WARN
    assert line.remedy == Remedy(Action.EXCLUDE_DISK, "n", {"disk": "swap"})
    assert "--" not in line.fix
    assert rep.predicted_level is ConsistencyLevel.FILESYSTEM
    assert rep.ok


async def test_required_with_only_raw_disks_fails_with_a_hint(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = host.add(FakeVm("o", [FakeDisk("scsi1")], guest=FakeGuest([])))
    await catalog.add_vm(vm.config())
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(catalog).snapshot("o", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert ei.value.hint  # never null
    assert ei.value.code == "disk-without-filesystem"
    assert ei.value.remedy == Remedy(Action.SET_QUIESCE, "o", {"quiesce": "preferred"})
    assert "exclude that disk from the snapshot" in ei.value.message
    rep = await doctor(catalog, "o")  # preferred: crash, and a line says why
    assert rep.predicted_level is ConsistencyLevel.CRASH
    [why] = [c for c in rep.checks if c.name == "policy outcome"]
    assert why.status is CheckStatus.WARN
    assert "no guest filesystem to freeze" in why.detail


# ---------------------------------------------------------------------------- item 9


async def test_doctor_verdict_follows_a_disk_fail(host: FakeHost, catalog: Catalog) -> None:
    vm = host.add(
        FakeVm(
            "d",
            [FakeDisk("disk0"), FakeDisk("disk1", cut_problem="an rbd image: not supported")],
            guest=FakeGuest([FakeFilesystem("/mnt/disk0", "ext4", disks=("disk0",))]),
        )
    )
    await catalog.add_vm(vm.config())
    rep = await doctor(catalog, "d")
    assert "disk-not-cuttable" in _fails(rep)
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert "refused" in rep.verdict
    assert "disk1" in rep.verdict


async def test_doctor_verdict_follows_a_refusing_driver_check_but_not_a_plain_fail(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = host.add(FakeVm.simple("r"))
    await catalog.add_vm(vm.config())
    vm.checks = [DriverCheck("agent channel", False, "disconnected")]
    plain = await doctor(catalog, "r", quiesce=QuiescePolicy.PREFERRED)
    assert "refused" not in plain.verdict
    assert plain.predicted_level is not ConsistencyLevel.NONE

    vm.checks = [
        DriverCheck("overlay dir /srv/vm", False, "QEMU cannot search it", refuses=True),
        DriverCheck("overlay dir /srv/ok", True, "fine", refuses=False),
    ]
    rep = await doctor(catalog, "r", quiesce=QuiescePolicy.PREFERRED)
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert "overlay dir /srv/vm" in rep.verdict
    assert "/srv/ok" not in rep.verdict


async def test_records_say_error_none_status_filter_and_unreadable_evidence(
    host: FakeHost, catalog: Catalog
) -> None:
    vm = host.add(FakeVm.simple("e"))
    assert vm.guest is not None
    await catalog.add_vm(vm.config(agent_log_path="/var/log/missing.log"))
    rec = await Snapshotter(catalog).snapshot("e")
    assert rec.error is None
    assert rec.evidence == ()
    assert rec.evidence_unavailable is not None
    assert "/var/log/missing.log" in rec.evidence_unavailable
    assert (await catalog.get_snapshot(rec.id)).evidence_unavailable == rec.evidence_unavailable

    vm.registered_agent = "fake:nobody"
    with pytest.raises(SnapshotFailedError):
        await Snapshotter(catalog).snapshot("e")
    failed = await catalog.list_snapshots("e", status=SnapshotStatus.FAILED)
    assert [r.status for r in failed] == [SnapshotStatus.FAILED]
    assert failed[0].error
    assert [r.id for r in await catalog.list_snapshots("e", status=SnapshotStatus.DONE)] == [rec.id]
    assert await catalog.list_snapshots(status=SnapshotStatus.RUNNING) == []


async def test_show_does_not_claim_the_overlay_when_qemu_runs_on_another_image(
    host: FakeHost, catalog: Catalog
) -> None:
    from freezeframe.cli._common import console
    from freezeframe.cli._render import print_boot_images, print_record

    vm = host.add(FakeVm.simple("s"))
    await catalog.add_vm(vm.config())
    rec = await Snapshotter(catalog).snapshot("s")
    [d0] = [d for d in rec.disks if d.device == "disk0"]
    vm.boot_from("disk0", d0.image)
    live = await boot_images(catalog, "s")
    with console.capture() as cap:
        print_record(rec, live)
        print_boot_images("s", live)
    text = cap.get()
    assert f"QEMU runs on now  {d0.image} (not this snapshot's overlay)" in text
    assert "now writing to" not in text
    assert f"boot from  {d0.overlay}" in text
    assert f"at risk    it writes to the image at the cut of snapshot {rec.id}" in text
