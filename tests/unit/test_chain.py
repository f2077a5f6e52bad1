"""A disk chain with a file deleted while QEMU keeps it open (issue 12, item 2): found before
anything is prepared or frozen; create refuses (BrokenChainError, exit 10), doctor FAILs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor
from freezeframe.engine.chain import (
    broken_chain_hint,
    chain_files,
    deleted_open_files,
    missing_chain_files,
    open_copies,
)
from freezeframe.engine.doctor import CheckStatus
from freezeframe.errors import BrokenChainError, SnapshotFailedError
from freezeframe.models import ConsistencyLevel, DiskInfo, QuiescePolicy, SnapshotStatus
from freezeframe.testing import FakeDisk, FakeFilesystem, FakeGuest, FakeHost, FakeVm


def disk(device: str, file: str, *backing: str) -> DiskInfo:
    return DiskInfo(device, f"n-{device}", file, "qcow2", 1 << 20, backing=backing)


def test_missing_files_are_named_per_disk_top_first(tmp_path: Path) -> None:
    base, mid = tmp_path / "base.qcow2", tmp_path / "mid.qcow2"
    base.touch()
    gone_top, gone_mid = str(tmp_path / "top.qcow2"), str(mid)
    disks = [
        disk("vda", gone_top, gone_mid, str(base)),
        disk("vdb", str(base)),
        disk("vdc", str(base), gone_mid),
    ]
    assert missing_chain_files(disks) == {"vda": (gone_top, gone_mid), "vdc": (gone_mid,)}
    mid.touch()
    assert missing_chain_files(disks) == {"vda": (gone_top,)}


def test_only_local_absolute_paths_are_checked() -> None:
    disks = [
        disk("vda", "rbd:pool/img", "nbd://host/x"),
        disk("vdb", 'json:{"file": {"driver": "file", "filename": "/nowhere"}}'),
        disk("vdc", "relative.qcow2", "iscsi://t/1"),
    ]
    assert missing_chain_files(disks, exists=lambda _: False) == {}
    assert missing_chain_files([disk("vdd", "/a", "/b")], exists=lambda f: f == "/a") == {
        "vdd": ("/b",)
    }


def test_chain_files_name_each_file_once() -> None:
    assert chain_files(disk("vda", "/a", "/b", "/a", "/c")) == ("/a", "/b", "/c")


def test_an_unlinked_file_still_open_is_found_in_proc(tmp_path: Path) -> None:
    path = tmp_path / "image.qcow2"
    path.write_bytes(b"data")
    with path.open("rb") as held:
        path.unlink()
        fd = f"/proc/{os.getpid()}/fd/{held.fileno()}"
        assert open_copies([str(path)], pids=[os.getpid()]) == {str(path): fd}
        assert deleted_open_files(os.getpid())[str(path)] == fd
        assert open_copies([str(tmp_path / "other")], pids=[os.getpid()]) == {}
        assert Path(fd).read_bytes() == b"data"  # what the hint tells the operator to copy
        assert fd in broken_chain_hint({str(path): fd})
    assert str(path) not in deleted_open_files(os.getpid())
    assert open_copies([]) == {}
    assert open_copies([str(path)], pids=[2**22 + 7]) == {}  # no such process: skipped


# ------------------------------------------------------------------ engine, on the fakes


async def _vm_on_files(host: FakeHost, catalog: Catalog, tmp_path: Path) -> tuple[FakeVm, Path]:
    images = [tmp_path / "disk0.qcow2", tmp_path / "disk1.qcow2"]
    for image in images:
        image.touch()
    fs = [
        FakeFilesystem(f"/mnt/disk{i}", "ext4", disks=(f"disk{i}",), name=f"vd{chr(98 + i)}")
        for i in range(2)
    ]
    vm = FakeVm(
        "w",
        [FakeDisk(f"disk{i}", image=str(image)) for i, image in enumerate(images)],
        guest=FakeGuest(fs),
    )
    host.add(vm)
    await catalog.add_vm(vm.config())
    return vm, images[1]


@pytest.mark.parametrize("policy", [QuiescePolicy.REQUIRED, QuiescePolicy.OFF])
async def test_create_refuses_before_preparing_or_freezing(
    host: FakeHost, catalog: Catalog, tmp_path: Path, policy: QuiescePolicy
) -> None:
    vm, image = await _vm_on_files(host, catalog, tmp_path)
    image.unlink()
    with pytest.raises(BrokenChainError) as ei:
        await Snapshotter(catalog).snapshot("w", SnapshotRequest(quiesce=policy))
    err = ei.value
    assert isinstance(err, SnapshotFailedError)
    assert err.exit_code == 10
    assert err.missing == {"disk1": (str(image),)}
    assert err.hint
    assert not any(op.startswith(("prepare", "cut")) for op in vm.ops)
    assert vm.guest is not None
    assert vm.guest.sent("guest-fsfreeze-freeze") == 0
    assert vm.guest.sent("guest-exec") == 0
    (rec,) = await catalog.list_snapshots("w")
    assert rec.id == err.snapshot_id
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert await catalog.open_intents("w") == []


async def test_a_broken_disk_left_out_does_not_block(
    host: FakeHost, catalog: Catalog, tmp_path: Path
) -> None:
    _, image = await _vm_on_files(host, catalog, tmp_path)
    image.unlink()
    rec = await Snapshotter(catalog).snapshot(
        "w", SnapshotRequest(quiesce=QuiescePolicy.PREFERRED, exclude_disks=("disk1",))
    )
    assert rec.status is SnapshotStatus.DONE
    assert [d.device for d in rec.disks] == ["disk0"]


async def test_doctor_fails_the_disk_and_predicts_none(
    host: FakeHost, catalog: Catalog, tmp_path: Path
) -> None:
    _, image = await _vm_on_files(host, catalog, tmp_path)
    rep = await doctor(catalog, "w")
    assert rep.ok
    assert rep.predicted_level is ConsistencyLevel.FILESYSTEM
    image.unlink()
    rep = await doctor(catalog, "w")
    assert not rep.ok
    assert rep.predicted_level is ConsistencyLevel.NONE
    (chain,) = [c for c in rep.checks if c.name == "disk disk1 chain"]
    assert chain.status is CheckStatus.FAIL
    assert str(image) in chain.detail
    assert chain.fix
    assert not [c for c in rep.checks if c.name == "disk disk0 chain"]


async def test_parent_is_a_snapshot_of_the_same_disks_only(
    host: FakeHost, catalog: Catalog
) -> None:
    """Issue 11 item 9: the parent of a snapshot is the one snapshot every disk it cuts
    continues from; a snapshot taken with --exclude-disk is nobody's parent for the disks it
    left out, and gets none that covered other disks."""
    vm = host.add(FakeVm.simple("p"))
    await catalog.add_vm(vm.config())
    snap = Snapshotter(catalog)
    first = await snap.snapshot("p")
    assert first.parent_id is None
    second = await snap.snapshot("p")
    assert second.parent_id == first.id  # same disks, continued
    only0 = await snap.snapshot("p", SnapshotRequest(exclude_disks=("disk1",)))
    assert [d.device for d in only0.disks] == ["disk0"]
    assert only0.parent_id is None  # second covered disk1 too
    again0 = await snap.snapshot("p", SnapshotRequest(exclude_disks=("disk1",)))
    assert again0.parent_id == only0.id  # same single disk, continued
    both = await snap.snapshot("p")
    assert both.parent_id is None  # disk0 continues again0, disk1 continues second
    images = {d.device: d.image for d in both.disks}
    assert images["disk0"] == next(d.overlay for d in again0.disks if d.device == "disk0")
    assert images["disk1"] == next(d.overlay for d in second.disks if d.device == "disk1")
