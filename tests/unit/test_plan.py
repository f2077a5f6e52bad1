"""The planner decides what to freeze before anything touches the guest."""

from __future__ import annotations

from dataclasses import replace

import pytest

from freezeframe.engine.plan import (
    agent_of_other_disks,
    check_exclusions,
    level_of,
    make_plan,
    map_filesystem_to_disk,
    map_filesystem_to_disks,
)
from freezeframe.errors import UsageError
from freezeframe.models import (
    ConsistencyLevel,
    DiskInfo,
    GuestDisk,
    GuestFilesystem,
    PciAddress,
    QuiescePolicy,
    SnapshotFilesystem,
)


def disk(i: int) -> DiskInfo:
    return DiskInfo(
        device=f"disk{i}",
        node=f"disk{i}",
        file=f"/x/disk{i}.qcow2",
        format="qcow2",
        virtual_size=1 << 28,
        pci=PciAddress(0, 0, 4 + i, 0),
    )


def fs(i: int, fstype: str, mount: str | None = None) -> GuestFilesystem:
    return GuestFilesystem(
        mountpoint=mount or f"/mnt/disk{i}",
        fstype=fstype,
        name=f"vd{chr(97 + i)}",
        disks=(
            GuestDisk(
                dev=f"/dev/vd{chr(97 + i)}", bus_type="virtio", pci=PciAddress(0, 0, 4 + i, 0)
            ),
        ),
    )


DISKS = [disk(0), disk(1), disk(2)]


def test_maps_filesystems_to_disks_by_pci_address() -> None:
    assert map_filesystem_to_disk(fs(1, "xfs"), tuple(DISKS)) == DISKS[1]
    stray = GuestFilesystem(
        "/boot", "ext4", "sda1", (GuestDisk("/dev/sda", "scsi", PciAddress(0, 0, 9, 0)),)
    )
    assert map_filesystem_to_disk(stray, tuple(DISKS)) is None


def test_disks_sharing_a_controller_address_map_by_serial() -> None:
    scsi = PciAddress(0, 0, 7, 0)
    a = DiskInfo("sda", "sda", "/x/a.qcow2", "qcow2", 1 << 20, pci=scsi, serial="ffa")
    b = DiskInfo("sdb", "sdb", "/x/b.qcow2", "qcow2", 1 << 20, pci=scsi, serial="ffb")
    on_b = GuestFilesystem("/b", "ext4", "sdb", (GuestDisk("/dev/sdb", "scsi", scsi, "ffb"),))
    assert map_filesystem_to_disk(on_b, (a, b)) == b
    no_serial = GuestFilesystem("/b", "ext4", "sdb", (GuestDisk("/dev/sdb", "scsi", scsi),))
    assert map_filesystem_to_disk(no_serial, (a, b)) is None  # ambiguous: not guessed


def test_all_freezable_means_plain_freeze_and_filesystem_level() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS[:2],
        guest_fs=[fs(0, "ext4"), fs(1, "xfs")],
    )
    assert plan.quiesce
    assert plan.freeze_list is None
    assert plan.expected_frozen == 2
    assert plan.problems == ()
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM


def test_vfat_is_named_unfreezable_and_lowers_the_level() -> None:
    plan = make_plan(
        policy=QuiescePolicy.PREFERRED,
        disks=DISKS,
        guest_fs=[fs(0, "ext4"), fs(1, "xfs"), fs(2, "vfat")],
    )
    vfat = next(d for d in plan.filesystems if d.fs.fstype == "vfat")
    assert not vfat.freeze
    assert "FIFREEZE" in vfat.reason
    assert any("/mnt/disk2" in p and "cannot be frozen" in p for p in plan.problems)
    assert plan.freeze_list == ("/mnt/disk0", "/mnt/disk1")
    assert plan.predicted_level is ConsistencyLevel.CRASH


def test_excluding_the_vfat_disk_restores_filesystem_level() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS,
        guest_fs=[fs(0, "ext4"), fs(1, "xfs"), fs(2, "vfat")],
        exclude_disks=("disk2",),
    )
    assert [d.device for d in plan.disks] == ["disk0", "disk1"]
    assert plan.problems == ()
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM


def test_excluding_the_vfat_mount_clears_the_problem_but_not_the_truth() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS,
        guest_fs=[fs(0, "ext4"), fs(1, "xfs"), fs(2, "vfat")],
        exclude_mounts=("/mnt/disk2",),
    )
    assert plan.problems == ()
    # disk2 is still in the cut, unfrozen: it is crash-consistent, and so is the set.
    assert plan.predicted_level is ConsistencyLevel.CRASH


def test_no_agent_is_a_problem_and_no_quiesce() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED, disks=DISKS, guest_fs=None, agent_problem="no agent"
    )
    assert not plan.quiesce
    assert plan.problems == ("no agent",)
    assert plan.predicted_level is ConsistencyLevel.CRASH


def test_quiesce_off_never_freezes() -> None:
    plan = make_plan(policy=QuiescePolicy.OFF, disks=DISKS, guest_fs=[fs(0, "ext4")])
    assert not plan.quiesce
    assert plan.problems == ()
    assert plan.predicted_level is ConsistencyLevel.CRASH


def test_a_disk_the_guest_mounts_nothing_from_is_raw_data_not_a_problem() -> None:
    # Nova's semantics: freeze what is mounted, snapshot every disk.
    plan = make_plan(policy=QuiescePolicy.REQUIRED, disks=DISKS[:2], guest_fs=[fs(0, "ext4")])
    assert plan.problems == ()
    assert plan.raw_disks == ("disk1",)
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM
    frozen = [SnapshotFilesystem("/mnt/disk0", "ext4", "disk0", frozen=True)]
    assert level_of(DISKS[:2], frozen, raw=("disk1",)) is ConsistencyLevel.FILESYSTEM
    assert level_of(DISKS[:2], frozen) is ConsistencyLevel.CRASH  # without the plan's word
    assert level_of(DISKS[1:2], [], raw=("disk1",)) is ConsistencyLevel.CRASH  # nothing frozen


def test_a_disk_without_filesystem_stays_a_problem_when_an_unfrozen_fs_is_unplaced() -> None:
    # A vfat the agent reports on no known disk might lie on the disk that looks empty.
    stray = GuestFilesystem("/boot/efi", "vfat", "sdz", disks=())
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED, disks=DISKS[:2], guest_fs=[fs(0, "ext4"), stray]
    )
    assert plan.raw_disks == ()
    [problem] = [p for p in plan.problems if "disk1" in p]
    assert "exclude disk disk1 from the snapshot" in problem
    assert "--" not in problem  # neutral words: each face names its own option
    assert plan.predicted_level is ConsistencyLevel.CRASH


def test_only_raw_disks_is_nothing_to_freeze_and_names_the_exclusion() -> None:
    plan = make_plan(policy=QuiescePolicy.REQUIRED, disks=DISKS[:1], guest_fs=[])
    assert plan.raw_disks == ("disk0",)
    assert not plan.quiesce
    [problem] = plan.problems
    assert "exclude that disk from the snapshot" in problem
    assert "--" not in problem


def test_an_agent_whose_disks_have_none_of_the_vms_serials_is_another_vms() -> None:
    ours = [replace(d, serial=f"vm-a-{d.device}") for d in DISKS[:2]]

    def with_serial(serial: str) -> GuestFilesystem:
        gd = GuestDisk(dev="/dev/vda", bus_type="virtio", pci=None, serial=serial)
        return GuestFilesystem("/mnt/disk0", "ext4", "vda", disks=(gd,))

    found = agent_of_other_disks([with_serial("vm-b-disk0")], ours)
    assert found is not None
    assert "vm-b-disk0" in found
    assert "vm-a-disk0" in found
    assert agent_of_other_disks([with_serial("vm-a-disk1")], ours) is None
    long = [replace(DISKS[0], serial="a-serial-longer-than-twenty")]
    assert agent_of_other_disks([with_serial("a-serial-longer-than")], long) is None  # cut to 20
    assert agent_of_other_disks([fs(0, "ext4")], ours) is None  # no serial: cannot tell
    assert agent_of_other_disks([with_serial("x")], DISKS) is None  # VM disks without serials


def test_level_is_the_weakest_over_disks() -> None:
    recs = [
        SnapshotFilesystem("/mnt/disk0", "ext4", "disk0", frozen=True),
        SnapshotFilesystem("/mnt/disk1", "xfs", "disk1", frozen=False, reason="freeze failed"),
    ]
    assert level_of(DISKS[:2], recs) is ConsistencyLevel.CRASH
    assert level_of(DISKS[:1], recs) is ConsistencyLevel.FILESYSTEM
    assert ConsistencyLevel.weakest([]) is ConsistencyLevel.NONE


def test_exclusions_that_name_nothing_are_reported() -> None:
    bad = check_exclusions(DISKS, [fs(0, "ext4")], ("/nope",), ("disk9",))
    assert len(bad) == 2
    assert check_exclusions(DISKS, [fs(0, "ext4")], ("/mnt/disk0",), ("disk1",)) == []


# --- A filesystem spanning several disks (LVM, md) ------------------------------------------


def lvm_root() -> GuestFilesystem:
    """``/`` on a volume group over disk0 and disk1 (qemu-ga lists both in ``disk``); a second
    PV on disk0 appears twice, as qemu-ga reports for two partitions of one disk."""
    return GuestFilesystem(
        "/",
        "ext4",
        "dm-0",
        (
            GuestDisk("/dev/vda", "virtio", PciAddress(0, 0, 4, 0)),
            GuestDisk("/dev/vdb", "virtio", PciAddress(0, 0, 5, 0)),
            GuestDisk("/dev/vda", "virtio", PciAddress(0, 0, 4, 0)),
        ),
    )


def test_a_spanning_filesystem_maps_to_every_disk_once() -> None:
    assert map_filesystem_to_disks(lvm_root(), tuple(DISKS)) == (DISKS[0], DISKS[1])
    assert map_filesystem_to_disk(lvm_root(), tuple(DISKS)) == DISKS[0]


def test_lvm_over_two_disks_is_filesystem_level_on_both_and_frozen_once() -> None:
    plan = make_plan(policy=QuiescePolicy.REQUIRED, disks=DISKS[:2], guest_fs=[lvm_root()])
    assert plan.problems == ()  # neither disk "carries no guest filesystem"
    assert [(d.fs.mountpoint, d.device, d.freeze) for d in plan.filesystems] == [
        ("/", "disk0", True),
        ("/", "disk1", True),
    ]
    assert plan.freeze_list is None
    assert plan.expected_frozen == 1  # qemu-ga counts filesystems, not disks
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM
    recs = [d.as_record(frozen=True) for d in plan.filesystems]
    assert level_of(DISKS[:2], recs) is ConsistencyLevel.FILESYSTEM


def test_freeze_list_names_a_spanning_mount_once() -> None:
    plan = make_plan(
        policy=QuiescePolicy.PREFERRED,
        disks=DISKS,
        guest_fs=[lvm_root(), fs(2, "vfat")],
    )
    assert plan.freeze_list == ("/",)
    assert plan.expected_frozen == 1


def test_excluding_one_disk_of_a_spanning_filesystem_is_refused() -> None:
    with pytest.raises(UsageError) as ei:
        make_plan(
            policy=QuiescePolicy.PREFERRED,
            disks=DISKS[:2],
            guest_fs=[lvm_root()],
            exclude_disks=("disk1",),
        )
    msg = ei.value.message
    assert "/ spans disk0 and disk1" in msg
    assert "excluding disk1" in msg
    bad = check_exclusions(DISKS[:2], [lvm_root()], (), ("disk1",))
    assert bad == [msg]


def test_excluding_a_member_disk_and_the_mount_is_accepted() -> None:
    assert check_exclusions(DISKS[:2], [lvm_root()], ("/",), ("disk1",)) == []
    plan = make_plan(
        policy=QuiescePolicy.PREFERRED,
        disks=DISKS[:2],
        guest_fs=[lvm_root()],
        exclude_mounts=("/",),
        exclude_disks=("disk1",),
    )
    assert [d.device for d in plan.disks] == ["disk0"]
    assert [(d.device, d.excluded, d.freeze) for d in plan.filesystems] == [("disk0", True, False)]
    assert not plan.quiesce


def test_excluding_every_disk_of_a_spanning_filesystem_is_accepted() -> None:
    assert check_exclusions(DISKS, [lvm_root()], (), ("disk0", "disk1")) == []
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS,
        guest_fs=[lvm_root(), fs(2, "ext4")],
        exclude_disks=("disk0", "disk1"),
    )
    assert plan.problems == ()
    assert plan.freeze_list == ("/mnt/disk2",)
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM


# --- The level never pretends: an unfrozen filesystem, excluded or not, lowers its disk -----


def root_and_esp() -> list[GuestFilesystem]:
    return [fs(0, "ext4", "/"), fs(0, "vfat", "/boot/efi")]


def test_an_excluded_unfrozen_filesystem_makes_its_disk_crash() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS[:1],
        guest_fs=root_and_esp(),
        exclude_mounts=("/boot/efi",),
    )
    assert plan.problems == ()  # excluding it is accepted ...
    assert plan.freeze_list == ("/",)
    esp = next(d for d in plan.filesystems if d.fs.mountpoint == "/boot/efi")
    assert esp.reason.startswith("excluded")  # ... and the record says why
    assert plan.predicted_level is ConsistencyLevel.CRASH  # ... but the level does not pretend
    recs = [
        SnapshotFilesystem("/", "ext4", "disk0", frozen=True),
        SnapshotFilesystem("/boot/efi", "vfat", "disk0", frozen=False, reason=esp.reason),
    ]
    assert level_of(DISKS[:1], recs) is ConsistencyLevel.CRASH


def test_a_disk_excluded_whole_does_not_lower_the_level() -> None:
    plan = make_plan(
        policy=QuiescePolicy.REQUIRED,
        disks=DISKS[:2],
        guest_fs=[fs(0, "ext4", "/"), fs(1, "vfat", "/boot/efi")],
        exclude_disks=("disk1",),
    )
    assert plan.problems == ()
    assert [(d.device, d.reason) for d in plan.filesystems] == [
        ("disk0", ""),
        (None, "excluded: disk not snapshotted"),
    ]
    assert plan.predicted_level is ConsistencyLevel.FILESYSTEM
