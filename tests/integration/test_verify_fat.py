"""vfat crash cuts: what a FAT mounted read-write at the cut shows is needs-recovery, real
structural damage is corrupt.

The host cannot mount vfat, so the images are made with mkfs.vfat and then edited byte by
byte (boot sector, FAT copies, root directory entries) to hold exactly what crash cuts of a
lab guest's vfat under a writer showed (``fsck.vfat -n`` output recorded in
``LAB_CRASH_CUT`` below), or damage a crash cannot cause (two files sharing a cluster).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from freezeframe.models import VerifyVerdict
from freezeframe.storage import verify_disks
from freezeframe.storage.verify import _parse_fsck_vfat
from tests.fakes.hostfs import MiB, sh
from tests.integration.test_verify import disk, pytestmark, to_qcow2, workdir

__all__ = ["pytestmark", "workdir"]

#: ``fsck.vfat -n`` of disk2 (vfat, FAT16, 64 MiB) of a lab VM cut with ``--quiesce off``
#: while a loop wrote, rewrote and deleted small files on it (dosfstools 4.2; abridged: the
#: same two lines followed for 49 more files).
LAB_CRASH_CUT = """\
fsck.fat 4.2 (2021-01-31)
FATs differ but appear to be intact.
  Using first FAT.
/ffwork.log
  File size is 1978968 bytes, cluster chain length is > 1980416 bytes.
  Truncating file to 1978968 bytes.
/c.1
  Contains a free cluster (7259). Assuming EOF.
/c.1
  File size is 5 bytes, cluster chain length is 0 bytes.
  Truncating file to 0 bytes.
Reclaimed 1644 unused clusters (3366912 bytes).
Dirty bit is set. Fs was not properly unmounted and some data may be corrupt.
 Automatically removing dirty bit.

Leaving filesystem unchanged.
/tmp/vfy-fat/c58d68c8ce15.raw: 98 files, 974/32695 clusters
"""


class FatImage:
    """A 64 MiB raw FAT image made by mkfs.vfat, edited in place."""

    def __init__(self, path: Path, *, fat32: bool = False) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
        sh("mkfs.vfat", "-F", "32" if fat32 else "16", "-n", "FFCRASH", str(path))
        boot = path.read_bytes()[:512]
        self.bps = struct.unpack_from("<H", boot, 11)[0]
        reserved = struct.unpack_from("<H", boot, 14)[0]
        self.nfats = boot[16]
        root_entries = struct.unpack_from("<H", boot, 17)[0]
        self.spf = struct.unpack_from("<I" if fat32 else "<H", boot, 36 if fat32 else 22)[0]
        self.fat_start = reserved * self.bps
        self.root = self.fat_start + self.nfats * self.spf * self.bps
        self.data = self.root + root_entries * 32

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def chain(self, clusters: list[int], copies: tuple[int, ...] = (0, 1)) -> None:
        """Link ``clusters`` (FAT16) in the given FAT copies, the last one end-of-chain."""
        for a, b in zip(clusters, [*clusters[1:], 0xFFFF], strict=True):
            for copy in copies:
                self.write(
                    self.fat_start + copy * self.spf * self.bps + a * 2, struct.pack("<H", b)
                )

    def file(self, slot: int, name: str, start: int, size: int) -> None:
        """A root directory entry (slot 0 holds the volume label)."""
        entry = name.upper().ljust(11).encode() + b"\x20" + bytes(14)
        self.write(self.root + slot * 32, entry + struct.pack("<HI", start, size))

    def set_dirty(self) -> None:
        """What the Linux driver sets at a read-write mount (FAT12/16: byte 0x25)."""
        self.write(0x25, b"\x01")


def make_crash_cut(d: Path) -> Path:
    """FAT16 with each artefact the lab's crash cuts showed."""
    img = FatImage(d / "crash.raw")
    img.set_dirty()
    img.file(1, "LOG", 2, 100)
    img.chain([2, 3, 4])  # size not yet updated after the chain grew
    img.chain([10])  # allocated, no directory entry yet
    img.file(2, "C1", 20, 5)  # directory entry written, FAT not yet
    img.file(3, "C2", 30, 5)
    img.chain([30], copies=(0,))  # first FAT written, second not yet
    return to_qcow2(img.path)


def make_fat32_crash_cut(d: Path) -> Path:
    """FAT32: dirty bit in the boot sector only (its backup differs there), stale FSInfo."""
    img = FatImage(d / "crash32.raw", fat32=True)
    img.write(0x41, b"\x01")
    img.write(512 + 488, struct.pack("<I", 1234))  # FSInfo free cluster count
    return to_qcow2(img.path)


def make_cross_linked(d: Path) -> Path:
    """Two files sharing a cluster: no write order produces that."""
    img = FatImage(d / "cross.raw")
    img.set_dirty()
    img.file(1, "AAA", 2, 100)
    img.chain([2])
    img.file(2, "BBB", 2, 100)
    return to_qcow2(img.path)


def make_artefacts_not_dirty(d: Path) -> Path:
    """A crash artefact on a FAT that says it was cleanly unmounted."""
    img = FatImage(d / "nodirty.raw")
    img.file(1, "LOG", 2, 100)
    img.chain([2, 3, 4])
    return to_qcow2(img.path)


def fsck_output(image: Path) -> str:
    raw = image.with_suffix(".check.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    try:
        res = subprocess.run(["fsck.vfat", "-n", str(raw)], capture_output=True, text=True)
    finally:
        raw.unlink()
    return res.stdout + res.stderr


def test_lab_crash_cut_output_is_only_crash_artefacts() -> None:
    found = _parse_fsck_vfat(LAB_CRASH_CUT)
    assert found.dirty
    assert found.other == ()
    assert set(found.crash) == {
        "dirty bit set",
        "FAT copies differ",
        "file size and cluster chain differ",
        "cluster chain runs into a free cluster",
        "unused clusters allocated",
    }


def test_boot_sector_backup_differing_elsewhere_is_not_a_crash_artefact() -> None:
    text = (
        "There are differences between boot sector and its backup.\n"
        "This is mostly harmless. Differences: (offset:original/backup)\n"
        "  65:01/00, 71:4e/4f\n"
        "  Not automatically fixing this.\n"
        "Dirty bit is set. Fs was not properly unmounted and some data may be corrupt.\n"
    )
    found = _parse_fsck_vfat(text)
    assert found.dirty
    assert found.other
    assert "differences between boot sector" in found.other[0]


async def test_vfat_crash_cuts_need_recovery_damage_is_corrupt(
    tmp_path: Path, workdir: Path
) -> None:
    images = {
        "crash": make_crash_cut(tmp_path),
        "crash32": make_fat32_crash_cut(tmp_path),
        "cross": make_cross_linked(tmp_path),
        "nodirty": make_artefacts_not_dirty(tmp_path),
    }
    # the images really show what they are meant to (so the verdicts below mean something)
    crash_out = fsck_output(images["crash"])
    for message in ("FATs differ", "cluster chain length is >", "Contains a free cluster",
                    "Reclaimed 1 unused cluster", "Dirty bit is set"):  # fmt: skip
        assert message in crash_out
    assert "65:01/00" in fsck_output(images["crash32"])
    assert "share clusters" in fsck_output(images["cross"])

    v = await verify_disks(
        [disk(path, device=name) for name, path in images.items()], workdir=str(workdir)
    )
    by_disk = {c.device: c for c in v.checks}
    assert by_disk["crash"].verdict is VerifyVerdict.NEEDS_RECOVERY, by_disk["crash"].detail
    assert "FAT copies differ" in by_disk["crash"].detail
    assert by_disk["crash32"].verdict is VerifyVerdict.NEEDS_RECOVERY, by_disk["crash32"].detail
    assert by_disk["cross"].verdict is VerifyVerdict.CORRUPT
    assert "share clusters" in by_disk["cross"].detail
    assert by_disk["nodirty"].verdict is VerifyVerdict.CORRUPT
    assert "without the dirty bit" in by_disk["nodirty"].detail
    assert v.verdict is VerifyVerdict.CORRUPT
