"""Offline checks of the filesystems in a snapshot's disk images, and their verdicts.

Owns the rules that turn checker output into a :class:`~freezeframe.models.VerifyVerdict`:

- ext2/3/4: ``dumpe2fs -h``; ``needs_recovery`` (a journal with unreplayed transactions: the
  filesystem was not quiesced) is ``needs-recovery`` -- the journal is then replayed on the
  throw-away overlay and ``e2fsck -fn`` must pass, else ``corrupt``. Without it, ``e2fsck -fn``
  decides between ``verified-consistent`` and ``corrupt``.
- xfs: ``xfs_repair -n``. A frozen xfs still has a dirty log (measured), so when the check
  refuses because of "valuable metadata changes in a log", the log is replayed on the overlay
  (mount + umount) and ``xfs_repair -n`` runs again: passing then is ``verified-consistent``
  with ``log_replayed``.
- vfat: ``fsck.vfat -n`` on the device (the host cannot mount vfat). Only the dirty bit set
  (mounted, not cleanly unmounted: vfat cannot be frozen) is ``needs-recovery``.
- anything else (or no filesystem at all): ``unchecked``.

User checks run on top, once per mountable filesystem that is not corrupt, mounted read-only.
The whole snapshot gets the worst verdict. The images are only read (see
:mod:`freezeframe.storage.inspect`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from freezeframe._tools import run
from freezeframe.errors import VerifyError
from freezeframe.models import FsCheck, SnapshotDisk, Verification, VerifyVerdict
from freezeframe.storage.inspect import ImageView, Partition, mounted, open_image

__all__ = ["verify_disks"]

log = logging.getLogger(__name__)

_EXT = frozenset({"ext2", "ext3", "ext4"})
_FAT = frozenset({"vfat", "msdos", "fat"})
_TAIL_LINES = 5
_DEFAULT_CHECK_TIMEOUT = 1800.0
_DEFAULT_USER_CHECK_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class _Result:
    verdict: VerifyVerdict
    detail: str
    log_replayed: bool = False


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _family(fstype: str | None) -> str | None:
    """Compare filesystem types loosely: the agent says ``ext4`` for an ext3 mounted as ext4."""
    if fstype is None:
        return None
    low = fstype.lower()
    if low in _EXT:
        return "ext"
    if low in _FAT:
        return "vfat"
    return low


# ---------------------------------------------------------------------------- checkers


async def _replay(part: Partition, workdir: str | None) -> str | None:
    """Replay a journal/log into the overlay by mounting and unmounting; the error text or
    None."""
    try:
        async with mounted(part, readonly=True, workdir=workdir):
            pass
    except VerifyError as exc:
        return exc.message
    return None


def _dumpe2fs_field(text: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else ""


async def _e2fsck(device: str, timeout: float) -> tuple[bool, str]:
    res = await run("e2fsck", "-f", "-n", device, check=False, timeout=timeout)
    return res.returncode == 0, _tail(res.out + "\n" + res.err)


async def _check_ext(part: Partition, timeout: float, workdir: str | None) -> _Result:
    dump = await run("dumpe2fs", "-h", part.device, check=False, timeout=timeout)
    if dump.returncode != 0:
        return _Result(
            VerifyVerdict.CORRUPT, f"dumpe2fs cannot read the superblock: {_tail(dump.err)}"
        )
    state = _dumpe2fs_field(dump.out, "Filesystem state")
    features = _dumpe2fs_field(dump.out, "Filesystem features").split()
    if "needs_recovery" in features:
        failed = await _replay(part, workdir)
        if failed:
            return _Result(
                VerifyVerdict.CORRUPT,
                f"journal needs recovery and replaying it failed: {failed}",
            )
        ok, out = await _e2fsck(part.device, timeout)
        if not ok:
            return _Result(
                VerifyVerdict.CORRUPT,
                f"journal needed recovery; after replay e2fsck -fn fails: {out}",
                log_replayed=True,
            )
        return _Result(
            VerifyVerdict.NEEDS_RECOVERY,
            "journal needs recovery (needs_recovery: not quiesced at the cut); "
            "replayed on the throw-away overlay, then e2fsck -fn passes",
            log_replayed=True,
        )
    ok, out = await _e2fsck(part.device, timeout)
    if not ok:
        return _Result(VerifyVerdict.CORRUPT, f"state {state or '?'}; e2fsck -fn fails: {out}")
    if state != "clean":
        return _Result(VerifyVerdict.CORRUPT, f"filesystem state is '{state}' (e2fsck -fn passes)")
    return _Result(VerifyVerdict.CONSISTENT, "state clean, no needs_recovery; e2fsck -fn passes")


_XFS_DIRTY_LOG = re.compile(r"metadata changes in a log|log.*(dirty|replay)", re.IGNORECASE)


async def _check_xfs(part: Partition, timeout: float, workdir: str | None) -> _Result:
    first = await run("xfs_repair", "-n", part.device, check=False, timeout=timeout)
    if first.returncode == 0:
        return _Result(VerifyVerdict.CONSISTENT, "log clean; xfs_repair -n passes")
    output = first.out + "\n" + first.err
    if not _XFS_DIRTY_LOG.search(output):
        return _Result(VerifyVerdict.CORRUPT, f"xfs_repair -n fails: {_tail(output)}")
    failed = await _replay(part, workdir)
    if failed:
        return _Result(VerifyVerdict.CORRUPT, f"log replay failed: {failed}")
    second = await run("xfs_repair", "-n", part.device, check=False, timeout=timeout)
    if second.returncode != 0:
        return _Result(
            VerifyVerdict.CORRUPT,
            f"after log replay xfs_repair -n fails: {_tail(second.out + chr(10) + second.err)}",
            log_replayed=True,
        )
    return _Result(
        VerifyVerdict.CONSISTENT,
        "log dirty; replayed on the throw-away overlay, then xfs_repair -n passes",
        log_replayed=True,
    )


_FAT_BENIGN = (
    re.compile(r"^fsck\.(v?fat|msdos) \d"),
    re.compile(r"^Dirty bit is set"),
    re.compile(r"^\s*Automatically removing dirty bit"),
    re.compile(r"^Leaving filesystem unchanged"),
    re.compile(r"^\S.*: \d+ files, \d+/\d+ clusters$"),
)


async def _check_vfat(part: Partition, timeout: float) -> _Result:
    res = await run("fsck.vfat", "-n", part.device, check=False, timeout=timeout)
    output = res.out + "\n" + res.err
    if res.returncode == 0:
        return _Result(VerifyVerdict.CONSISTENT, "fsck.vfat -n passes")
    if res.returncode == 1 and "Dirty bit is set" in output:
        other = [
            line
            for line in output.splitlines()
            if line.strip() and not any(p.search(line) for p in _FAT_BENIGN)
        ]
        if not other:
            return _Result(
                VerifyVerdict.NEEDS_RECOVERY,
                "dirty bit set (mounted at the cut; vfat cannot be frozen); "
                "fsck.vfat -n finds nothing else",
            )
    return _Result(VerifyVerdict.CORRUPT, f"fsck.vfat -n fails: {_tail(output)}")


async def _check_fs(part: Partition, fstype: str, timeout: float, workdir: str | None) -> _Result:
    family = _family(fstype)
    if family == "ext":
        return await _check_ext(part, timeout, workdir)
    if family == "xfs":
        return await _check_xfs(part, timeout, workdir)
    if family == "vfat":
        return await _check_vfat(part, timeout)
    return _Result(VerifyVerdict.UNCHECKED, f"no checker for {fstype}")


# ---------------------------------------------------------------------------- user checks


def _parse_user_checks(user_checks: Sequence[str]) -> list[list[str]]:
    parsed = []
    for line in user_checks:
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise VerifyError(f"user check {line!r} cannot be parsed: {exc}") from exc
        if not argv:
            raise VerifyError("empty user check")
        prog = argv[0]
        if "/" not in prog and shutil.which(prog) is None:
            raise VerifyError(f"user check {line!r}: program {prog!r} not found")
        if os.path.isabs(prog) and not os.access(prog, os.X_OK):
            raise VerifyError(f"user check {line!r}: {prog} is not executable")
        parsed.append(argv)
    return parsed


async def _run_user_check(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[int | None, str, str]:
    """Run one user check; (exit code or None on timeout, stdout, stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return 127, "", f"cannot start {argv[0]}: {exc}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace")
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _user_checks(
    disk: SnapshotDisk,
    part: Partition,
    fstype: str,
    checks: list[list[str]],
    timeout: float,
    workdir: str | None,
) -> tuple[bool, list[str]]:
    """Run every user check on ``part`` mounted read-only; (all passed, detail lines)."""
    notes: list[str] = []
    passed = True
    try:
        async with mounted(part, readonly=True, workdir=workdir) as mnt:
            env = dict(os.environ)
            env.update(
                FF_MOUNT=str(mnt),
                FF_DEVICE=disk.device,
                FF_FSTYPE=fstype,
                FF_IMAGE=disk.image,
                FF_BLOCKDEV=part.device,
                FF_PARTITION="" if part.number is None else str(part.number),
            )
            for argv in checks:
                name = shlex.join(argv)
                rc, out, err = await _run_user_check(argv, mnt, env, timeout)
                if rc is None:
                    passed = False
                    notes.append(f"user check `{name}` timed out after {timeout:g}s")
                elif rc != 0:
                    passed = False
                    notes.append(
                        f"user check `{name}` failed (exit {rc}): {_tail(out + chr(10) + err)}"
                    )
                else:
                    tail = _tail(out)
                    notes.append(f"user check `{name}` passed" + (f": {tail}" if tail else ""))
    except VerifyError as exc:
        log.warning("user checks not run on %s (%s): %s", disk.device, part.device, exc)
        notes.append(f"user checks NOT run: {exc.message}")
    return passed, notes


# ---------------------------------------------------------------------------- per disk


async def _check_disk(
    disk: SnapshotDisk,
    view: ImageView,
    user_checks: list[list[str]],
    expected: str | None,
    timeout: float,
    user_timeout: float,
    workdir: str | None,
) -> list[FsCheck]:
    targets: list[tuple[Partition, str | None]] = [(p, p.fstype) for p in view.partitions]
    if not targets and expected:
        # blkid found nothing, but the guest had a filesystem here: let its checker judge.
        targets = [(Partition(view.device, None), expected)]
    if not targets:
        return [
            FsCheck(
                device=disk.device,
                fstype="none",
                verdict=VerifyVerdict.UNCHECKED,
                detail="no filesystem or partition table found",
            )
        ]
    checks: list[FsCheck] = []
    for part, fstype in targets:
        partition = None if part.number is None else str(part.number)
        if fstype is None:
            checks.append(
                FsCheck(
                    disk.device,
                    "none",
                    VerifyVerdict.UNCHECKED,
                    f"no filesystem on partition {partition}",
                    partition=partition,
                )
            )
            continue
        result = await _check_fs(part, fstype, timeout, workdir)
        verdict, details = result.verdict, [result.detail]
        if user_checks and verdict in (VerifyVerdict.CONSISTENT, VerifyVerdict.NEEDS_RECOVERY):
            ok, notes = await _user_checks(disk, part, fstype, user_checks, user_timeout, workdir)
            details.extend(notes)
            if not ok:
                verdict = VerifyVerdict.CORRUPT
        elif user_checks:
            details.append(f"user checks not run on a {verdict.value} filesystem")
        check = FsCheck(
            device=disk.device,
            fstype=fstype,
            verdict=verdict,
            detail="; ".join(details),
            log_replayed=result.log_replayed,
            partition=partition,
        )
        log.info(
            "%s%s %s: %s (%s)",
            disk.device,
            f" partition {partition}" if partition else "",
            fstype,
            verdict.value,
            check.detail,
        )
        checks.append(check)
    if expected and view.partitions:
        found = {_family(p.fstype) for p in view.partitions}
        if _family(expected) not in found:
            names = ", ".join(sorted(p.fstype or "none" for p in view.partitions))
            checks.append(
                FsCheck(
                    disk.device,
                    expected,
                    VerifyVerdict.CORRUPT,
                    f"the guest had {expected} on this disk; the image holds {names}",
                )
            )
    return checks


def _worst(checks: Sequence[FsCheck]) -> VerifyVerdict:
    if not checks:
        return VerifyVerdict.UNCHECKED
    return max((c.verdict for c in checks), key=lambda v: v.badness)


async def verify_disks(
    disks: Sequence[SnapshotDisk],
    *,
    user_checks: Sequence[str] = (),
    expect: Mapping[str, str] | None = None,
    workdir: str | None = None,
    check_timeout: float = _DEFAULT_CHECK_TIMEOUT,
    user_check_timeout: float = _DEFAULT_USER_CHECK_TIMEOUT,
) -> Verification:
    """Check every filesystem of every disk image in ``disks``; the images are never written.

    Each image is opened with :func:`~freezeframe.storage.inspect.open_image` (throw-away
    overlay), one disk after the other; each filesystem found (on the whole device, or on each
    partition) gets an :class:`FsCheck`. ``expect`` maps ``SnapshotDisk.device`` to the
    filesystem type the guest reported: a disk without a recognisable filesystem is checked as
    that type, and a disk where it is missing gets a ``corrupt`` check.

    ``user_checks`` are command lines (split with :func:`shlex.split`, no shell) run once per
    mountable filesystem that is not corrupt, mounted read-only (``nosuid,nodev,noexec``;
    after the log/journal replay), with the mount point as working directory and
    ``FF_MOUNT``, ``FF_DEVICE`` (the snapshot disk), ``FF_FSTYPE``, ``FF_IMAGE`` (and
    ``FF_BLOCKDEV``, ``FF_PARTITION``) in the environment. A non-zero exit or a timeout makes
    the filesystem ``corrupt``, with the command's last output lines in the detail; a passing
    check's last stdout lines go into the detail too. A filesystem this host cannot mount
    (vfat) keeps its verdict and says "user checks NOT run" in its detail.

    The overall verdict is the worst one; ``bytes_read`` sums what was read from the exported
    disks (see :meth:`~freezeframe.storage.inspect.ImageView.bytes_read`).

    Raises VerifyError when a check cannot be run at all (image missing or damaged, export
    failed, ``/dev/fuse`` missing, a user check that is empty or names a missing program);
    DependencyError when a checker program is missing. Everything set up for the failing
    disk is torn down before the error propagates.
    """
    started = time.monotonic()
    checked_at = datetime.now(UTC)
    parsed = _parse_user_checks(user_checks)
    expect = expect or {}
    checks: list[FsCheck] = []
    total = 0
    for disk in disks:
        async with open_image(disk.image, disk.format, workdir=workdir) as view:
            try:
                checks.extend(
                    await _check_disk(
                        disk,
                        view,
                        parsed,
                        expect.get(disk.device),
                        check_timeout,
                        user_check_timeout,
                        workdir,
                    )
                )
            finally:
                try:
                    total += view.bytes_read()
                except VerifyError as exc:
                    log.warning("%s", exc)
    verification = Verification(
        verdict=_worst(checks),
        checked_at=checked_at,
        checks=tuple(checks),
        bytes_read=total,
        duration_ms=(time.monotonic() - started) * 1000.0,
    )
    log.info(
        "verified %d disk(s): %s (%d bytes read, %.0f ms)",
        len(disks),
        verification.verdict.value,
        verification.bytes_read,
        verification.duration_ms,
    )
    return verification
