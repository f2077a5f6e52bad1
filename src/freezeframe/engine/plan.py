"""Planning a snapshot: which disks, which guest filesystems, what the freeze can achieve.

Pure functions over already-narrowed facts (the VM's disks from the driver, the guest's
filesystems from the agent, the policy): no I/O, so every decision the engine takes before
touching the guest is unit-tested here. The engine (:mod:`.snapshot`) gathers the facts and
acts on the plan; :mod:`.doctor` shows the same plan as a checklist.

A guest filesystem lives on every VM disk ``guest-get-fsinfo`` lists for it (LVM and md span
several): the plan holds one decision per (filesystem, snapshotted disk) pair, and freezes and
counts each mount point once. The level never pretends: a snapshotted disk is
filesystem-consistent only when every guest filesystem on it was frozen; one left unfrozen,
excluded by the user or not, makes the disk crash-consistent. Excluding a whole disk takes it
out of the snapshot, so it does not lower the level; excluding only some of the disks a
filesystem spans is refused (:func:`check_exclusions`), unless its mount point is excluded too.

A disk the guest mounts nothing from (swap, raw use, an unmounted disk) follows Nova: freeze
what is mounted, snapshot every disk. It is cut as raw data (crash-level for that disk, noted
per disk as ``no-mounted-filesystem``, :attr:`Plan.raw_disks`) and does not lower the
snapshot's level, nor fail ``required``, when every mounted filesystem is frozen; only when
the guest reports a filesystem that is neither frozen nor placed on a disk (it might lie on
that disk) does such a disk stay a problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from freezeframe.errors import UsageError
from freezeframe.models import (
    ConsistencyLevel,
    DiskInfo,
    GuestDisk,
    GuestFilesystem,
    QuiescePolicy,
    SnapshotFilesystem,
)

__all__ = [
    "UNFREEZABLE_FSTYPES",
    "FsDecision",
    "Plan",
    "agent_of_other_disks",
    "check_exclusions",
    "level_of",
    "make_plan",
    "map_filesystem_to_disk",
    "map_filesystem_to_disks",
]

#: Filesystem types whose FIFREEZE fails (qemu-ga ignores EOPNOTSUPP silently, measured here).
UNFREEZABLE_FSTYPES = frozenset({"vfat", "msdos", "fat", "exfat", "ntfs", "ntfs3", "fuseblk"})


@dataclass(frozen=True, slots=True)
class FsDecision:
    """What the plan does with one guest filesystem on one disk.

    A filesystem spanning several snapshotted disks has one decision per disk (same mount
    point, different ``device``), so the record of each disk says what happened to it.
    """

    fs: GuestFilesystem
    device: str | None  # DiskInfo.device it lives on, None if on no snapshotted disk
    freeze: bool  # in the freeze list
    excluded: bool = False  # the user excluded it (mount point or disk)
    reason: str = ""  # why it is not frozen

    def as_record(self, *, frozen: bool, reason: str | None = None) -> SnapshotFilesystem:
        return SnapshotFilesystem(
            mountpoint=self.fs.mountpoint,
            fstype=self.fs.fstype,
            device=self.device,
            frozen=frozen,
            reason=self.reason if reason is None else reason,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """The outcome of planning, before anything is touched.

    ``problems`` are reasons the freeze cannot give a filesystem-consistent snapshot of every
    snapshotted disk; under ``required`` any problem fails the snapshot before the freeze.
    ``freeze_list`` is None for a plain ``guest-fsfreeze-freeze`` (freeze everything), or the
    mount points to pass to ``guest-fsfreeze-freeze-list``, each once. ``expected_frozen`` is
    the number of mount points the agent should report frozen (it counts filesystems, not
    disks).
    """

    policy: QuiescePolicy
    disks: tuple[DiskInfo, ...]
    filesystems: tuple[FsDecision, ...] = ()
    quiesce: bool = False  # the engine will send a freeze
    freeze_list: tuple[str, ...] | None = None
    expected_frozen: int = 0
    problems: tuple[str, ...] = field(default_factory=tuple)
    #: Snapshotted disks the guest mounts nothing from, cut as raw data (``no-mounted-
    #: filesystem``): they do not lower the level (see the module's docstring).
    raw_disks: tuple[str, ...] = ()

    @property
    def predicted_level(self) -> ConsistencyLevel:
        """The level a snapshot reaches if the freeze does what the plan expects.

        By :func:`level_of`: crash when any snapshotted disk carries a filesystem the plan
        does not freeze (unfreezable, or excluded by mount point) or none at all; a disk
        excluded whole is not in ``disks`` and does not count.
        """
        if not self.disks:
            return ConsistencyLevel.NONE
        if not self.quiesce:
            return ConsistencyLevel.CRASH
        return level_of(
            self.disks,
            [d.as_record(frozen=d.freeze) for d in self.filesystems],
            raw=self.raw_disks,
        )


def _disk_of(gd: GuestDisk, disks: tuple[DiskInfo, ...]) -> DiskInfo | None:
    """The VM disk one guest disk is: by serial, else by the hypervisor's target name (what
    libvirt reports), else by PCI address when only one VM disk has it (disks behind one SCSI
    controller share the controller's address)."""
    if gd.serial:
        for disk in disks:
            if disk.serial and disk.serial == gd.serial:
                return disk
    if gd.target:
        for disk in disks:
            if disk.device == gd.target:
                return disk
    if gd.pci is not None:
        same = [d for d in disks if d.pci is not None and d.pci == gd.pci]
        if len(same) == 1:
            return same[0]
    return None


def map_filesystem_to_disks(
    fs: GuestFilesystem, disks: tuple[DiskInfo, ...]
) -> tuple[DiskInfo, ...]:
    """Every VM disk a guest filesystem lives on, each once, in the guest's order.

    A filesystem on LVM or md lists several guest disks; each is matched by serial first, then
    by target name, then by PCI address when only one VM disk has it. Guest disks that match
    no VM disk (ambiguous or not the VM's) are left out. Raises nothing.
    """
    found: list[DiskInfo] = []
    for gd in fs.disks:
        disk = _disk_of(gd, disks)
        if disk is not None and disk not in found:
            found.append(disk)
    return tuple(found)


def map_filesystem_to_disk(fs: GuestFilesystem, disks: tuple[DiskInfo, ...]) -> DiskInfo | None:
    """The first VM disk a guest filesystem lives on (see :func:`map_filesystem_to_disks` for
    all of them), None if on none. For display only: planning uses every disk. Raises nothing."""
    found = map_filesystem_to_disks(fs, disks)
    return found[0] if found else None


def level_of(
    disks: tuple[DiskInfo, ...] | list[DiskInfo],
    filesystems: list[SnapshotFilesystem],
    *,
    raw: tuple[str, ...] | list[str] = (),
) -> ConsistencyLevel:
    """Consistency level of a cut = the weakest over its (snapshotted) disks. Raises nothing.

    A disk is filesystem-consistent when it carries at least one guest filesystem and every
    one of them was frozen; otherwise crash-consistent. A filesystem excluded by mount point
    still lies on the disk unfrozen, so it makes the disk crash-consistent: the level never
    pretends. A disk excluded whole is not among ``disks`` and does not lower the level, nor
    does a disk in ``raw`` (the guest mounts nothing from it: :attr:`Plan.raw_disks`), unless
    every disk is one (nothing was frozen: crash).
    """
    levels: list[ConsistencyLevel] = []
    counted = [d for d in disks if d.device not in raw]
    if disks and not counted:
        return ConsistencyLevel.CRASH
    for disk in counted:
        on_disk = [f for f in filesystems if f.device == disk.device]
        if on_disk and all(f.frozen for f in on_disk):
            levels.append(ConsistencyLevel.FILESYSTEM)
        else:
            levels.append(ConsistencyLevel.CRASH)
    return ConsistencyLevel.weakest(levels)


def _chosen(disks: list[DiskInfo], exclude_disks: tuple[str, ...]) -> tuple[DiskInfo, ...]:
    return tuple(d for d in disks if d.device not in exclude_disks and d.node not in exclude_disks)


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _partial_exclusions(
    disks: list[DiskInfo],
    guest_fs: list[GuestFilesystem] | None,
    exclude_mounts: tuple[str, ...],
    exclude_disks: tuple[str, ...],
) -> list[str]:
    """Disk exclusions that would cut a filesystem in half: some of its disks in the snapshot,
    some not, and its mount point not excluded."""
    if guest_fs is None or not exclude_disks:
        return []
    chosen = _chosen(disks, exclude_disks)
    bad: list[str] = []
    for fs in guest_fs:
        if fs.mountpoint in exclude_mounts:
            continue
        on = map_filesystem_to_disks(fs, tuple(disks))
        left_out = [d.device for d in on if d not in chosen]
        if left_out and len(left_out) < len(on):
            bad.append(
                f"{fs.mountpoint} spans {_names([d.device for d in on])}: excluding "
                f"{_names(left_out)} would snapshot only part of it; exclude its mount point "
                f"{fs.mountpoint} too, or exclude "
                + ("neither disk" if len(on) == 2 else "none of its disks")
            )
    return bad


def make_plan(
    *,
    policy: QuiescePolicy,
    disks: list[DiskInfo],
    guest_fs: list[GuestFilesystem] | None,
    exclude_mounts: tuple[str, ...] = (),
    exclude_disks: tuple[str, ...] = (),
    agent_problem: str | None = None,
) -> Plan:
    """Decide what to snapshot and what to freeze.

    ``guest_fs`` is None when the agent could not be asked (``agent_problem`` says why).
    Unknown exclusions are not checked here (:func:`check_exclusions` reports them).
    Raises UsageError when ``exclude_disks`` leaves out some, not all, of the disks a
    filesystem spans and its mount point is not excluded (also reported by
    :func:`check_exclusions`, which the engine calls first).
    """
    chosen = _chosen(disks, exclude_disks)
    if policy is QuiescePolicy.OFF:
        return Plan(policy=policy, disks=chosen, quiesce=False)
    if agent_problem is not None or guest_fs is None:
        return Plan(
            policy=policy,
            disks=chosen,
            quiesce=False,
            problems=(agent_problem or "the guest agent could not be asked",),
        )
    partial = _partial_exclusions(disks, guest_fs, exclude_mounts, exclude_disks)
    if partial:
        raise UsageError("; ".join(partial))

    decisions: list[FsDecision] = []
    problems: list[str] = []
    for fs in guest_fs:
        on = map_filesystem_to_disks(fs, tuple(disks))
        devices: list[str | None] = [d.device for d in on if d in chosen] or [None]
        if fs.mountpoint in exclude_mounts:
            decisions += [
                FsDecision(fs, dev, freeze=False, excluded=True, reason="excluded by the user")
                for dev in devices
            ]
        elif on and devices == [None]:
            decisions.append(
                FsDecision(
                    fs, None, freeze=False, excluded=True, reason="excluded: disk not snapshotted"
                )
            )
        elif fs.fstype in UNFREEZABLE_FSTYPES:
            reason = f"{fs.fstype} does not support FIFREEZE"
            decisions += [FsDecision(fs, dev, freeze=False, reason=reason) for dev in devices]
            if on:
                names = [d.device for d in on]
                problems.append(
                    f"{fs.mountpoint} ({fs.fstype}) on disk {_names(names)} cannot be frozen; "
                    f"exclude disk {_names(names)} from the snapshot, or exclude mount point "
                    f"{fs.mountpoint} to take it unfrozen (crash-consistent)"
                )
        else:
            decisions += [FsDecision(fs, dev, freeze=True) for dev in devices]

    # A filesystem the guest reports that is neither frozen nor placed on a VM disk might
    # lie on a disk that looks empty: such a disk cannot be taken as raw data then.
    unplaced = [d for d in decisions if d.device is None and not d.freeze and not d.excluded]
    raw: list[str] = []
    for disk in chosen:
        if any(d.device == disk.device for d in decisions):
            continue
        if unplaced:
            problems.append(
                f"disk {disk.device} carries no guest filesystem the agent reports, and "
                f"{_names([d.fs.mountpoint for d in unplaced])} (not frozen) could not be "
                f"placed on a disk: it can only be crash-consistent; exclude disk "
                f"{disk.device} from the snapshot"
            )
        else:
            raw.append(disk.device)

    # One entry per mount point: qemu-ga freezes and counts filesystems, not disks.
    to_freeze = tuple(dict.fromkeys(d.fs.mountpoint for d in decisions if d.freeze))
    everything_freezable = all(d.freeze for d in decisions)
    return Plan(
        policy=policy,
        disks=chosen,
        filesystems=tuple(decisions),
        quiesce=bool(to_freeze),
        freeze_list=None if everything_freezable else to_freeze,
        expected_frozen=len(to_freeze),
        problems=tuple(problems)
        if to_freeze
        else (
            *problems,
            "no guest filesystem to freeze on the snapshotted disks"
            + (
                f" (the guest mounts nothing from {_names(raw)}: exclude "
                + ("that disk" if len(raw) == 1 else "those disks")
                + " from the snapshot, or snapshot without freezing: quiesce preferred or off)"
                if raw
                else ""
            ),
        ),
        raw_disks=tuple(raw),
    )


def agent_of_other_disks(
    guest_fs: list[GuestFilesystem], disks: list[DiskInfo] | tuple[DiskInfo, ...]
) -> str | None:
    """Whether the agent that reported ``guest_fs`` provably sits in another VM: the guest's
    virtio disks carry serials, the VM's disks carry serials, and not one of them matches
    (qemu-ga reports a virtio-blk serial as the guest sees it, cut to 20 characters, so a
    prefix matches). Returns what tells it (both sides' serials), None when it cannot be told
    or a serial matches. Raises nothing."""
    guest = {
        gd.serial for fs in guest_fs for gd in fs.disks if gd.serial and gd.bus_type == "virtio"
    }
    ours = {d.serial for d in disks if d.serial}
    if not guest or not ours:
        return None
    if any(o.startswith(g) or g.startswith(o) for g in guest for o in ours):
        return None
    return (
        f"the agent's guest has disks with serials {', '.join(sorted(guest))}; this VM's "
        f"disks have {', '.join(sorted(ours))}"
    )


def check_exclusions(
    disks: list[DiskInfo],
    guest_fs: list[GuestFilesystem] | None,
    exclude_mounts: tuple[str, ...],
    exclude_disks: tuple[str, ...],
) -> list[str]:
    """Exclusions the engine must refuse before anything happens: those that name nothing (a
    typo must not silently snapshot everything), and disk exclusions that would snapshot only
    part of a filesystem spanning several disks (unless its mount point is excluded too).
    Raises nothing."""
    bad: list[str] = []
    names = {d.device for d in disks} | {d.node for d in disks}
    bad += [f"excluded disk {x}: the VM has no such disk" for x in exclude_disks if x not in names]
    if guest_fs is not None:
        mounts = {f.mountpoint for f in guest_fs}
        bad += [
            f"excluded mount point {x}: the guest has no such mount point"
            for x in exclude_mounts
            if x not in mounts
        ]
    bad += _partial_exclusions(disks, guest_fs, exclude_mounts, exclude_disks)
    return bad
