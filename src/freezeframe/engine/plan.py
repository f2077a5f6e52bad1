"""Planning a snapshot: which disks, which guest filesystems, what the freeze can achieve.

Pure functions over already-narrowed facts (the VM's disks from the driver, the guest's
filesystems from the agent, the policy): no I/O, so every decision the engine takes before
touching the guest is unit-tested here. The engine (:mod:`.snapshot`) gathers the facts and
acts on the plan; :mod:`.doctor` shows the same plan as a checklist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from freezeframe.models import (
    ConsistencyLevel,
    DiskInfo,
    GuestFilesystem,
    QuiescePolicy,
    SnapshotFilesystem,
)

__all__ = [
    "UNFREEZABLE_FSTYPES",
    "FsDecision",
    "Plan",
    "check_exclusions",
    "level_of",
    "make_plan",
    "map_filesystem_to_disk",
]

#: Filesystem types whose FIFREEZE fails (qemu-ga ignores EOPNOTSUPP silently, measured here).
UNFREEZABLE_FSTYPES = frozenset({"vfat", "msdos", "fat", "exfat", "ntfs", "ntfs3", "fuseblk"})


@dataclass(frozen=True, slots=True)
class FsDecision:
    """What the plan does with one guest filesystem."""

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
    mount points to pass to ``guest-fsfreeze-freeze-list``.
    """

    policy: QuiescePolicy
    disks: tuple[DiskInfo, ...]
    filesystems: tuple[FsDecision, ...] = ()
    quiesce: bool = False  # the engine will send a freeze
    freeze_list: tuple[str, ...] | None = None
    expected_frozen: int = 0
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def predicted_level(self) -> ConsistencyLevel:
        """The level a snapshot reaches if the freeze does what the plan expects."""
        if not self.disks:
            return ConsistencyLevel.NONE
        if not self.quiesce:
            return ConsistencyLevel.CRASH
        return level_of(self.disks, [d.as_record(frozen=d.freeze) for d in self.filesystems])


def map_filesystem_to_disk(fs: GuestFilesystem, disks: tuple[DiskInfo, ...]) -> DiskInfo | None:
    """The VM disk a guest filesystem lives on: by serial first, then by PCI address when only
    one disk has it (disks behind one SCSI controller share the controller's address).

    A filesystem spanning several disks (LVM, md) maps to the first one found; the engine
    freezes it whole anyway.
    """
    for gd in fs.disks:
        for disk in disks:
            if gd.serial and disk.serial and gd.serial == disk.serial:
                return disk
    for gd in fs.disks:
        if gd.pci is None:
            continue
        same = [d for d in disks if d.pci is not None and d.pci == gd.pci]
        if len(same) == 1:
            return same[0]
    return None


def level_of(
    disks: tuple[DiskInfo, ...] | list[DiskInfo], filesystems: list[SnapshotFilesystem]
) -> ConsistencyLevel:
    """Consistency level of a cut = the weakest over its disks.

    A disk is filesystem-consistent when it carries at least one guest filesystem and every
    one of them not excluded by the user was frozen; otherwise crash-consistent.
    """
    levels: list[ConsistencyLevel] = []
    for disk in disks:
        on_disk = [f for f in filesystems if f.device == disk.device]
        covered = [f for f in on_disk if not f.reason.startswith("excluded")]
        # A disk whose filesystems were all excluded on purpose is still crash-consistent:
        # the user accepted that for it, the record says so, the level does not pretend.
        if covered and all(f.frozen for f in covered):
            levels.append(ConsistencyLevel.FILESYSTEM)
        else:
            levels.append(ConsistencyLevel.CRASH)
    return ConsistencyLevel.weakest(levels)


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
    Raises nothing: unknown exclusions are reported as problems by :func:`check_exclusions`.
    """
    chosen = tuple(
        d for d in disks if d.device not in exclude_disks and d.node not in exclude_disks
    )
    if policy is QuiescePolicy.OFF:
        return Plan(policy=policy, disks=chosen, quiesce=False)
    if agent_problem is not None or guest_fs is None:
        return Plan(
            policy=policy,
            disks=chosen,
            quiesce=False,
            problems=(agent_problem or "the guest agent could not be asked",),
        )

    decisions: list[FsDecision] = []
    problems: list[str] = []
    for fs in guest_fs:
        disk = map_filesystem_to_disk(fs, tuple(disks))
        on_chosen = disk is not None and disk in chosen
        device = disk.device if disk is not None and on_chosen else None
        if fs.mountpoint in exclude_mounts:
            decisions.append(
                FsDecision(fs, device, freeze=False, excluded=True, reason="excluded by the user")
            )
        elif disk is not None and not on_chosen:
            decisions.append(
                FsDecision(
                    fs, None, freeze=False, excluded=True, reason="excluded: disk not snapshotted"
                )
            )
        elif fs.fstype in UNFREEZABLE_FSTYPES:
            reason = f"{fs.fstype} does not support FIFREEZE"
            decisions.append(FsDecision(fs, device, freeze=False, reason=reason))
            if device is not None:
                problems.append(
                    f"{fs.mountpoint} ({fs.fstype}) on disk {device} cannot be frozen; "
                    f"exclude it with --exclude-mount {fs.mountpoint} or --exclude-disk {device}"
                )
        else:
            decisions.append(FsDecision(fs, device, freeze=True))

    for disk in chosen:
        if not any(d.device == disk.device for d in decisions):
            problems.append(
                f"disk {disk.device} carries no guest filesystem the agent reports "
                "(raw use, unmounted, or not mapped): it can only be crash-consistent"
            )

    to_freeze = tuple(d.fs.mountpoint for d in decisions if d.freeze)
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
        else (*problems, "no guest filesystem to freeze on the snapshotted disks"),
    )


def check_exclusions(
    disks: list[DiskInfo],
    guest_fs: list[GuestFilesystem] | None,
    exclude_mounts: tuple[str, ...],
    exclude_disks: tuple[str, ...],
) -> list[str]:
    """Exclusions that name nothing (a typo must not silently snapshot everything)."""
    bad: list[str] = []
    names = {d.device for d in disks} | {d.node for d in disks}
    bad += [f"--exclude-disk {x}: the VM has no such disk" for x in exclude_disks if x not in names]
    if guest_fs is not None:
        mounts = {f.mountpoint for f in guest_fs}
        bad += [
            f"--exclude-mount {x}: the guest has no such mount point"
            for x in exclude_mounts
            if x not in mounts
        ]
    return bad
