"""Offline verification of disk images at the cut, on real images made on this host.

The images are built with mkfs on raw files (loop-mounted to write files), then converted to
qcow2 -- small (64-320 MiB virtual, a few MiB on disk). How each one is made:

- ext4 "quiesced": copied while ``fsfreeze -f`` holds the mounted filesystem -> clean.
- ext4 "crash": copied while mounted, after ``sync``, without a freeze -> ``needs_recovery``
  (ext4 sets it on disk at mount and clears it only at freeze/umount).
- xfs "quiesced": copied while frozen -> the log is still dirty (as measured in real guests),
  but covered: only superblock records behind the last checkpoint.
- xfs "crash": copied while mounted, right after ``sync``, without a freeze -> the log holds
  inode and AG header changes not yet written in place.
- xfs "clean": unmounted after writing -> clean log.
- vfat: mkfs.vfat only (the host cannot mount vfat); a second one with the dirty bit poked in.
- a partitioned disk (MBR written here: ext4 + vfat), a blank disk, an ext4 damaged with
  ``debugfs -w -R "clri ..."`` (a directory entry pointing to a wiped inode).

Every test runs with ``workdir`` under its own tmp_path and then checks that nothing is left:
no mount or loop device under it, no qemu-storage-daemon child, no files left in workdir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.cli.snapshot import verdict_exit
from freezeframe.engine import verify_snapshot
from freezeframe.errors import UsageError, VerifyError
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    Verification,
    VerifyVerdict,
    VmConfig,
)
from freezeframe.storage import mounted, open_image, verify_disks
from freezeframe.storage.verify import CHECK_OUTPUT_MAX, _parse_xfs_logprint
from tests.fakes.hostfs import MiB, loop_mounted, sh

TOOLS = ("qemu-img", "qemu-storage-daemon", "losetup", "mkfs.ext4", "mkfs.xfs", "mkfs.vfat")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(
        any(shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None for t in TOOLS),
        reason="needs qemu-utils, qemu-storage-daemon, e2fsprogs, xfsprogs, dosfstools",
    ),
]


def write_app_files(root: Path) -> None:
    (root / "app").mkdir()
    (root / "app" / "state.txt").write_text("counter=42\n")
    for i in range(50):
        (root / f"file{i}.dat").write_bytes(os.urandom(4096))


def copy_sparse(src: Path, dst: Path) -> None:
    sh("cp", "--sparse=always", str(src), str(dst))


def to_qcow2(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out))
    raw.unlink()
    return out


def make_fs_image(d: Path, name: str, fstype: str, size_mib: int, *, frozen: bool) -> Path:
    """mkfs on a raw file, write files while mounted, copy it (frozen or not), qcow2."""
    live = d / f"{name}.live.raw"
    with open(live, "wb") as f:
        f.truncate(size_mib * MiB)
    if fstype == "ext4":
        sh("mkfs.ext4", "-q", "-F", str(live))
    else:
        sh("mkfs.xfs", "-q", "-f", str(live))
    copy = d / f"{name}.raw"
    with loop_mounted(live, d / f"{name}.mnt") as mnt:
        write_app_files(mnt)
        sh("sync")
        if frozen:
            sh("fsfreeze", "-f", str(mnt))
            try:
                copy_sparse(live, copy)
            finally:
                sh("fsfreeze", "-u", str(mnt))
        else:
            copy_sparse(live, copy)
    live.unlink()
    return to_qcow2(copy)


def make_clean_xfs(d: Path) -> Path:
    raw = d / "xfsclean.raw"
    with open(raw, "wb") as f:
        f.truncate(320 * MiB)
    sh("mkfs.xfs", "-q", "-f", str(raw))
    with loop_mounted(raw, d / "xfsclean.mnt") as mnt:
        write_app_files(mnt)
    return to_qcow2(raw)


def make_vfat(d: Path, name: str, *, dirty: bool) -> Path:
    raw = d / f"{name}.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    sh("mkfs.vfat", "-F", "16", "-n", "FFTEST", str(raw))
    if dirty:  # FAT12/16 boot sector byte 0x25, bit 0: the Linux driver's "mounted" flag
        with open(raw, "r+b") as f:
            f.seek(0x25)
            f.write(b"\x01")
    return to_qcow2(raw)


def make_partitioned(d: Path) -> Path:
    """128 MiB disk, MBR: partition 1 ext4 (1-65 MiB), partition 2 vfat (65-127 MiB)."""
    disk = d / "parts.raw"
    with open(disk, "wb") as f:
        f.truncate(128 * MiB)
    parts = [(2048, 64 * 2048, 0x83, "ext4"), (65 * 2048, 62 * 2048, 0x0C, "vfat")]
    mbr = bytearray(512)
    for i, (start, count, ptype, _) in enumerate(parts):
        entry = struct.pack("<B3sB3sII", 0, b"\xff\xff\xff", ptype, b"\xff\xff\xff", start, count)
        mbr[446 + 16 * i : 446 + 16 * (i + 1)] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(disk, "r+b") as f:
        f.write(mbr)
    for i, (start, count, _, fstype) in enumerate(parts):
        part = d / f"part{i}.raw"
        with open(part, "wb") as f:
            f.truncate(count * 512)
        if fstype == "ext4":
            sh("mkfs.ext4", "-q", "-F", "-L", "FFROOT", str(part))
        else:
            sh("mkfs.vfat", "-n", "FFBOOT", str(part))
        sh("dd", f"if={part}", f"of={disk}", "bs=512", f"seek={start}", "conv=notrunc,sparse")
        part.unlink()
    return to_qcow2(disk)


def make_blank(d: Path) -> Path:
    raw = d / "blank.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    return to_qcow2(raw)


def make_damaged_ext4(d: Path) -> Path:
    raw = d / "damaged.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", str(raw))
    with loop_mounted(raw, d / "damaged.mnt") as mnt:
        write_app_files(mnt)
    inode = sh("debugfs", "-R", "stat /app/state.txt", str(raw)).split()[1]
    sh("debugfs", "-w", "-R", f"clri <{inode}>", str(raw))
    return to_qcow2(raw)


@dataclass(frozen=True)
class Images:
    ext4: Path
    ext4_crash: Path
    xfs: Path
    xfs_crash: Path
    xfs_clean: Path
    vfat: Path
    vfat_dirty: Path
    parts: Path
    blank: Path
    damaged: Path

    def all(self) -> list[Path]:
        return [getattr(self, f) for f in self.__dataclass_fields__]


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    d = tmp_path_factory.mktemp("images")
    imgs = Images(
        ext4=make_fs_image(d, "ext4", "ext4", 64, frozen=True),
        ext4_crash=make_fs_image(d, "ext4crash", "ext4", 64, frozen=False),
        xfs=make_fs_image(d, "xfs", "xfs", 320, frozen=True),
        xfs_crash=make_fs_image(d, "xfscrash", "xfs", 320, frozen=False),
        xfs_clean=make_clean_xfs(d),
        vfat=make_vfat(d, "vfat", dirty=False),
        vfat_dirty=make_vfat(d, "vfatdirty", dirty=True),
        parts=make_partitioned(d),
        blank=make_blank(d),
        damaged=make_damaged_ext4(d),
    )
    before = {p: fingerprint(p) for p in imgs.all()}
    yield imgs
    # The cut images are never written, by any test of this module.
    assert {p: fingerprint(p) for p in imgs.all()} == before


def qsd_children() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm.startswith("qemu-storage"):
            pids.append(int(entry.name))
    return pids


def loop_devices() -> dict[str, str]:
    """Attached loop devices -> backing file (``/`` once a FUSE export behind it is gone)."""
    found = {}
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            found[entry.name] = (entry / "loop" / "backing_file").read_text().strip()
    return found


def leftovers(workdir: Path, loops_before: dict[str, str] | None = None) -> list[str]:
    found = [line for line in Path("/proc/mounts").read_text().splitlines() if str(workdir) in line]
    for name, backing in loop_devices().items():
        new = loops_before is not None and name not in loops_before
        # ours: under workdir, or new and no longer backed by a file (the export went away)
        if str(workdir) in backing or (new and not Path(backing).is_file()):
            found.append(f"/dev/{name} on {backing}")
    found += [f"qsd pid {pid}" for pid in qsd_children()]
    found += [str(p) for p in workdir.iterdir()]
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    w = tmp_path / "work"
    w.mkdir()
    before = loop_devices()
    yield w
    left = leftovers(w, before)
    if left:  # clean up after the code under test before reporting what it left
        cleanup(w, before)
    assert not left, f"left behind: {left}"


def cleanup(workdir: Path, loops_before: dict[str, str]) -> None:
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        target = line.split()[1]
        if str(workdir) in target:
            subprocess.run(["umount", "-l", target], check=False)
    for name, backing in loop_devices().items():
        if str(workdir) in backing or (name not in loops_before and not Path(backing).is_file()):
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
    for pid in qsd_children():
        os.kill(pid, 15)


def disk(image: Path, device: str = "disk0", fmt: str = "qcow2") -> SnapshotDisk:
    return SnapshotDisk(device=device, node=device, image=str(image), format=fmt, overlay=None)


# ---------------------------------------------------------------------------- verdicts


async def test_quiesced_ext4_is_consistent(images: Images, workdir: Path) -> None:
    before = fingerprint(images.ext4)
    v = await verify_disks([disk(images.ext4)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    (check,) = v.checks
    assert (check.device, check.fstype, check.log_replayed) == ("disk0", "ext4", False)
    assert "e2fsck -fn passes" in check.detail
    assert 0 < v.bytes_read < 64 * MiB
    assert v.duration_ms > 0
    assert fingerprint(images.ext4) == before


async def test_unquiesced_ext4_needs_recovery(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.ext4_crash)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.NEEDS_RECOVERY
    (check,) = v.checks
    assert "needs_recovery" in check.detail
    assert check.log_replayed


async def test_frozen_xfs_log_replayed_then_consistent(images: Images, workdir: Path) -> None:
    before = fingerprint(images.xfs)
    v = await verify_disks([disk(images.xfs)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    (check,) = v.checks
    assert check.fstype == "xfs"
    assert check.log_replayed, check.detail
    assert "log covered" in check.detail
    assert "consistent after recovery" in check.detail
    # the replay went to the throw-away overlay: a second run must replay again
    again = await verify_disks([disk(images.xfs)], workdir=str(workdir))
    assert again.checks[0].log_replayed
    assert fingerprint(images.xfs) == before


async def test_unquiesced_xfs_needs_recovery(images: Images, workdir: Path) -> None:
    """A crash cut of xfs passes xfs_repair -n after the replay just like a frozen one; only
    the log as it was before the replay tells them apart."""
    v = await verify_disks([disk(images.xfs_crash)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.NEEDS_RECOVERY, v.checks
    (check,) = v.checks
    assert check.log_replayed
    assert "log dirty" in check.detail, check.detail
    assert "INO" in check.detail, check.detail
    assert "consistent after recovery" in check.detail


async def test_covered_xfs_log_of_an_unfrozen_filesystem_needs_recovery(
    images: Images, workdir: Path
) -> None:
    """A crash cut taken before the kernel logged new metadata leaves a covered log, just like
    a freeze: the record's "not frozen" decides."""
    v = await verify_disks([disk(images.xfs)], unfrozen={"disk0"}, workdir=str(workdir))
    assert v.verdict is VerifyVerdict.NEEDS_RECOVERY, v.checks
    assert "not frozen at the cut" in v.checks[0].detail
    other = await verify_disks([disk(images.xfs)], unfrozen={"disk9"}, workdir=str(workdir))
    assert other.verdict is VerifyVerdict.CONSISTENT


@pytest.mark.parametrize("level", [ConsistencyLevel.CRASH, ConsistencyLevel.FILESYSTEM])
async def test_verify_snapshot_tells_a_crash_cut_of_xfs(
    images: Images, tmp_path: Path, level: ConsistencyLevel
) -> None:
    """``snapshot verify`` of a ``--quiesce off`` snapshot: its xfs is needs-recovery even when
    the log is covered; the same image in a quiesced record is verified-consistent."""
    cat = await Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        await cat.add_vm(VmConfig(name="vx", qmp_path="/nonexistent.sock"))
        rec = SnapshotRecord(
            id="ab12cd34ef56",
            vm="vx",
            created_at=datetime.now(UTC),
            status=SnapshotStatus.DONE,
            policy=QuiescePolicy.OFF if level is ConsistencyLevel.CRASH else QuiescePolicy.REQUIRED,
            level=level,
            disks=(disk(images.xfs),),
        )
        await cat.begin_snapshot(dataclasses.replace(rec, status=SnapshotStatus.RUNNING))
        await cat.finish_snapshot(rec)
        v = await verify_snapshot(cat, rec.id)
    finally:
        await cat.close()
    want = (
        VerifyVerdict.NEEDS_RECOVERY
        if level is ConsistencyLevel.CRASH
        else VerifyVerdict.CONSISTENT
    )
    assert v.verdict is want, v.checks


async def test_clean_xfs_log_is_consistent_without_replay(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.xfs_clean)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    (check,) = v.checks
    assert not check.log_replayed
    assert check.detail.startswith("log clean")


def test_xfs_logprint_classification() -> None:
    head = "xfs_logprint:\n    log tail: 40 head: 44 state: <DIRTY>\n\n"
    sb = (
        "TRANS: tid:0x1  #items:2  trans:0x1  q:0x0\n"
        "BUF: cnt:2 total:2 a:0x0 len:24 a:0x0 len:384 \n"
        "\tBUF:  #regs:2   start blkno:0x0   len:1   bmap size:1   flags:0x9000\n"
        "\tSUPER Block Buffer:\n"
    )
    ino = "INO: cnt:3 total:3 a:0x0 len:56 a:0x0 len:176 a:0x0 len:16 \n\tINODE: #regs:3\n"
    agf = (
        "BUF: cnt:2 total:2 a:0x0 len:24 a:0x0 len:128 \n"
        "\tBUF:  #regs:2   start blkno:0x1   len:1   bmap size:1   flags:0x2800\n"
        "\tAGF Buffer: (XAGF)\n"
    )
    assert _parse_xfs_logprint(head + sb + sb).state == "covered"
    dirty = _parse_xfs_logprint(head + sb + ino + agf)
    assert (dirty.state, dirty.items, dirty.kinds) == ("dirty", 2, ("BUF", "INO"))
    assert _parse_xfs_logprint(head).state == "unknown"
    assert _parse_xfs_logprint("garbage").state == "unknown"
    clean = "    log tail: 14 head: 14 state: <CLEAN>\n"
    assert _parse_xfs_logprint(clean).state == "clean"


async def test_vfat_checked_without_mounting(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.vfat)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    assert v.checks[0].fstype == "vfat"
    assert "fsck.vfat -n passes" in v.checks[0].detail


async def test_vfat_dirty_bit_needs_recovery(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.vfat_dirty)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.NEEDS_RECOVERY
    assert "dirty bit" in v.checks[0].detail


async def test_damaged_ext4_is_corrupt(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.damaged)], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CORRUPT
    assert "e2fsck -fn fails" in v.checks[0].detail


async def test_partitions_checked_each(images: Images, workdir: Path) -> None:
    async with open_image(str(images.parts), workdir=str(workdir)) as view:
        assert view.partition_table == "dos"
        assert [(p.number, p.fstype, p.label) for p in view.partitions] == [
            (1, "ext4", "FFROOT"),
            (2, "vfat", "FFBOOT"),
        ]
        async with mounted(view.partitions[0]) as mnt:
            assert (mnt / "lost+found").is_dir()
            with pytest.raises(OSError, match="Read-only file system"):
                (mnt / "x").write_text("read-only mount")
    v = await verify_disks([disk(images.parts)], workdir=str(workdir))
    assert [(c.partition, c.fstype, c.verdict) for c in v.checks] == [
        ("1", "ext4", VerifyVerdict.CONSISTENT),
        ("2", "vfat", VerifyVerdict.CONSISTENT),
    ]
    assert 0 < v.bytes_read < 128 * MiB


async def test_blank_disk_unchecked_and_worst_verdict_wins(images: Images, workdir: Path) -> None:
    v = await verify_disks(
        [disk(images.ext4, "disk0"), disk(images.blank, "disk1")], workdir=str(workdir)
    )
    assert [c.verdict for c in v.checks] == [VerifyVerdict.CONSISTENT, VerifyVerdict.UNCHECKED]
    assert v.verdict is VerifyVerdict.UNCHECKED
    v = await verify_disks(
        [disk(images.ext4, "disk0"), disk(images.ext4_crash, "disk1")], workdir=str(workdir)
    )
    assert v.verdict is VerifyVerdict.NEEDS_RECOVERY
    assert v.bytes_read > 0


async def test_expected_fstype_missing_is_corrupt(images: Images, workdir: Path) -> None:
    v = await verify_disks([disk(images.ext4)], expect={"disk0": "xfs"}, workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CORRUPT
    assert "the guest had xfs" in v.checks[-1].detail
    ok = await verify_disks([disk(images.ext4)], expect={"disk0": "ext4"}, workdir=str(workdir))
    assert ok.verdict is VerifyVerdict.CONSISTENT


# ---------------------------------------------------------------------------- user checks


async def test_user_check_reads_a_file(images: Images, workdir: Path) -> None:
    check = (
        'sh -c \'test "$PWD" = "$FF_MOUNT" && test "$FF_DEVICE" = disk0 '
        '&& test "$FF_FSTYPE" = xfs && test -n "$FF_IMAGE" && cat app/state.txt\''
    )
    v = await verify_disks([disk(images.xfs)], user_checks=[check], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    fs, user = v.checks
    assert fs.log_replayed
    assert (user.device, user.fstype, user.verdict) == ("disk0", "xfs", VerifyVerdict.CONSISTENT)
    assert user.detail.startswith("user checks:")
    assert "counter=42" in user.detail


async def test_failing_user_check_is_check_failed_not_corrupt(
    images: Images, workdir: Path
) -> None:
    """A user check is the application's opinion: the filesystem's own verdict stays."""
    checks = ["cat app/state.txt", "sh -c 'echo app state is bad >&2; exit 3'"]
    v = await verify_disks([disk(images.ext4)], user_checks=checks, workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CHECK_FAILED
    fs, user = v.checks
    assert (fs.fstype, fs.verdict) == ("ext4", VerifyVerdict.CONSISTENT)
    assert "e2fsck -fn passes" in fs.detail
    assert (user.fstype, user.verdict) == ("ext4", VerifyVerdict.CHECK_FAILED)
    assert "counter=42" in user.detail
    assert "exit 3" in user.detail
    assert "app state is bad" in user.detail
    # ranked between needs-recovery and corrupt
    crash = await verify_disks([disk(images.ext4_crash)], user_checks=checks, workdir=str(workdir))
    assert [c.verdict for c in crash.checks] == [
        VerifyVerdict.NEEDS_RECOVERY,
        VerifyVerdict.CHECK_FAILED,
    ]
    assert crash.verdict is VerifyVerdict.CHECK_FAILED
    damaged = await verify_disks(
        [disk(images.ext4), disk(images.damaged, "disk1")], user_checks=checks, workdir=str(workdir)
    )
    assert damaged.verdict is VerifyVerdict.CORRUPT
    assert "user checks not run on a corrupt filesystem" in damaged.checks[-1].detail


async def test_user_check_output_is_bounded(images: Images, workdir: Path) -> None:
    """A check printing megabytes keeps only the last few KiB, and says so."""
    checks = [
        "sh -c 'head -c 3000000 /dev/zero | tr \"\\\\000\" x; echo; echo LAST-LINE'",
        "sh -c 'seq 1 400000; echo END-OF-ERR >&2; exit 4'",
    ]
    v = await verify_disks([disk(images.ext4)], user_checks=checks, workdir=str(workdir))
    fs, user = v.checks
    assert fs.verdict is VerifyVerdict.CONSISTENT
    assert user.verdict is VerifyVerdict.CHECK_FAILED
    assert "LAST-LINE" in user.detail
    assert "END-OF-ERR" in user.detail
    assert "exit 4" in user.detail
    assert user.detail.count("[output truncated: 3000011 bytes written") == 1
    assert user.detail.count("[output truncated: 2688906 bytes written") == 1
    assert len(user.detail) < 3 * CHECK_OUTPUT_MAX


def test_verdict_exit_codes() -> None:
    def code(verdict: VerifyVerdict | None) -> int:
        if verdict is None:
            return verdict_exit(None)
        return verdict_exit(Verification(verdict, datetime.now(UTC)))

    assert [code(v) for v in VerifyVerdict] == [
        {"verified-consistent": 0, "check-failed": 21, "corrupt": 22, "changed-since-cut": 23}.get(
            v.value, 20
        )
        for v in VerifyVerdict
    ]
    assert code(VerifyVerdict.CHECK_FAILED) == 21
    assert code(VerifyVerdict.NEEDS_RECOVERY) == code(VerifyVerdict.UNCHECKED) == code(None) == 20


async def test_user_check_timeout_kills_its_process_group(images: Images, workdir: Path) -> None:
    """A check whose shell waits for a child is killed as a group at its timeout (killing
    only the shell left the child holding the output pipe: verify hung), recorded as failed,
    and the next check still runs; the mount, loop device and export are torn down."""
    checks = ["sh -c 'echo started; sleep 67.5; echo never'", "cat app/state.txt"]
    t0 = asyncio.get_running_loop().time()
    v = await asyncio.wait_for(
        verify_disks(
            [disk(images.ext4)],
            user_checks=checks,
            user_check_timeout=1.0,
            workdir=str(workdir),
        ),
        30,
    )
    assert asyncio.get_running_loop().time() - t0 < 25
    assert not processes_with(b"sleep\x0067.5"), "the check's child was not killed"
    assert v.verdict is VerifyVerdict.CHECK_FAILED
    fs, user = v.checks
    assert fs.verdict is VerifyVerdict.CONSISTENT
    assert "timed out after 1 s" in user.detail
    assert "started" in user.detail
    assert "counter=42" in user.detail  # the second check ran
    with pytest.raises(UsageError):
        await verify_disks([disk(images.ext4)], user_checks=["true"], user_check_timeout=0)


async def test_user_check_on_unmountable_vfat_says_not_run(images: Images, workdir: Path) -> None:
    if "vfat" in read_text("/proc/filesystems"):
        pytest.skip("this host can mount vfat")
    v = await verify_disks([disk(images.vfat)], user_checks=["true"], workdir=str(workdir))
    assert v.verdict is VerifyVerdict.CONSISTENT
    assert "user checks NOT run" in v.checks[0].detail


async def test_bad_user_check_rejected_before_any_export(workdir: Path, images: Images) -> None:
    """Bad input (exit 2), not a failure to verify."""
    with pytest.raises(UsageError, match="not found"):
        await verify_disks(
            [disk(images.ext4)], user_checks=["no-such-program-ff"], workdir=str(workdir)
        )
    with pytest.raises(UsageError, match="empty"):
        await verify_disks([disk(images.ext4)], user_checks=["  "], workdir=str(workdir))
    with pytest.raises(UsageError, match="cannot be parsed"):
        await verify_disks(
            [disk(images.ext4)], user_checks=['sh -c "unterminated'], workdir=str(workdir)
        )


# ---------------------------------------------------------------------------- errors, teardown


async def test_missing_image(tmp_path: Path, workdir: Path) -> None:
    with pytest.raises(VerifyError, match="deleted behind freezeframe's back"):
        await verify_disks([disk(tmp_path / "gone.qcow2")], workdir=str(workdir))


async def test_truncated_and_junk_images(images: Images, tmp_path: Path, workdir: Path) -> None:
    truncated = tmp_path / "truncated.qcow2"
    shutil.copyfile(images.xfs, truncated)
    os.truncate(truncated, truncated.stat().st_size // 2)
    with pytest.raises(VerifyError, match="damaged"):
        await verify_disks([disk(truncated)], workdir=str(workdir))
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(VerifyError, match="cannot be opened as qcow2"):
        await verify_disks([disk(junk)], workdir=str(workdir))


async def test_second_disk_failing_tears_down_the_first(
    images: Images, tmp_path: Path, workdir: Path
) -> None:
    orphan = tmp_path / "orphan.qcow2"
    sh(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
        str(tmp_path / "missing-base.qcow2"), "-u", str(orphan), "64M",
    )  # fmt: skip
    with pytest.raises(VerifyError):
        await verify_disks(
            [disk(images.ext4, "disk0"), disk(orphan, "disk1")], workdir=str(workdir)
        )


async def test_image_written_by_another_process_is_refused(
    images: Images, tmp_path: Path, workdir: Path
) -> None:
    """An image some process (a VM) still has open for writing is not an image at the cut; one
    held read-only as a backing file (the normal case after a cut) verifies fine."""
    active = tmp_path / "active.qcow2"
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        str(images.ext4),
        str(active),
    )
    sock = tmp_path / "holder.sock"
    holder = await asyncio.create_subprocess_exec(
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=qcow2,node-name=top,file.driver=file,file.filename={active}",
        "--chardev",
        f"socket,id=m,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=m",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        with pytest.raises(VerifyError) as err:
            await verify_disks([disk(active)], workdir=str(workdir))
        assert err.value.hint is not None
        assert "open for writing" in err.value.hint
        v = await verify_disks([disk(images.ext4)], workdir=str(workdir))
        assert v.verdict is VerifyVerdict.CONSISTENT
    finally:
        holder.terminate()
        await asyncio.wait_for(holder.wait(), 10)


async def test_cancellation_tears_everything_down(images: Images, workdir: Path) -> None:
    marker = workdir.parent / "started"
    check = f"sh -c 'touch {marker}; exec sleep 67.25'"
    task = asyncio.create_task(
        verify_disks([disk(images.ext4)], user_checks=[check], workdir=str(workdir))
    )
    for _ in range(600):
        if marker.exists():
            break
        await asyncio.sleep(0.05)
    assert marker.exists(), "the user check never started"
    assert leftovers(workdir), "expected live mounts/exports while the check runs"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not processes_with(b"sleep\x0067.25"), "the user check was not killed"


def processes_with(argv_part: bytes) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if argv_part in (proc / "cmdline").read_bytes():
                    found.append(proc.name)
    return found


def read_text(path: str) -> str:
    return Path(path).read_text()


async def test_open_image_error_inside_tears_down(images: Images, workdir: Path) -> None:
    mnt = workdir.parent / "forgotten"
    mnt.mkdir()

    async def forget_a_mount_and_fail() -> None:
        async with open_image(str(images.ext4), workdir=str(workdir)) as view:
            sh("mount", "-o", "ro", view.device, str(mnt))
            assert str(mnt) in read_text("/proc/mounts")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await forget_a_mount_and_fail()
    assert str(mnt) not in read_text("/proc/mounts")


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.06, 0.1, 0.2])
async def test_cancellation_at_any_point_leaves_nothing(
    images: Images, workdir: Path, delay: float
) -> None:
    """Cancel verification of a partitioned disk at various points of set-up and checking
    (the ``workdir`` fixture then asserts that nothing is left)."""
    task = asyncio.create_task(verify_disks([disk(images.parts)], workdir=str(workdir)))
    await asyncio.sleep(delay)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
