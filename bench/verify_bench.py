"""Benchmark of ``verify_disks`` on a 2-disk set (ext4 + xfs, 1 GiB each, some files).

Builds the images on this host (mkfs on sparse raw files, files written through a loop mount,
copied while ``fsfreeze -f`` holds the filesystem -- like a quiesced cut -- then converted to
qcow2), verifies them a few times and prints the time and the bytes read against the disk
size. Verification must not copy the disks: the run fails when bytes read / virtual size
exceeds ``--max-ratio``. Needs root (loop devices, mounts, fsfreeze) and /dev/fuse.

    .venv/bin/python bench/verify_bench.py [--size-gib 1] [--data-mib 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests.fakes

from tests.fakes.hostfs import MiB, loop_mounted, sh

from freezeframe.models import SnapshotDisk, Verification, VerifyVerdict
from freezeframe.storage import verify_disks


def build(d: Path, name: str, fstype: str, size: int, data: int) -> Path:
    live = d / f"{name}.live.raw"
    with open(live, "wb") as f:
        f.truncate(size)
    sh(f"mkfs.{fstype}", "-q", "-F" if fstype == "ext4" else "-f", str(live))
    copy = d / f"{name}.raw"
    with loop_mounted(live, d / f"{name}.mnt") as mnt:
        chunk = os.urandom(MiB)
        for i in range(max(1, data // MiB)):
            sub = mnt / f"dir{i % 8}"
            sub.mkdir(exist_ok=True)
            (sub / f"file{i}.bin").write_bytes(chunk)
        for i in range(500):
            (mnt / f"small{i}.txt").write_text(f"record {i}\n")
        sh("sync")
        sh("fsfreeze", "-f", str(mnt))
        try:
            sh("cp", "--sparse=always", str(live), str(copy))
        finally:
            sh("fsfreeze", "-u", str(mnt))
    live.unlink()
    out = d / f"{name}.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(copy), str(out))
    copy.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--data-mib", type=int, default=64, help="file data written per disk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-ratio", type=float, default=0.1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("verify_bench: needs root", file=sys.stderr)
        return 2
    size = int(args.size_gib * 1024 * MiB)
    with tempfile.TemporaryDirectory(prefix="ff-verify-bench-") as tmp:
        d = Path(tmp)
        t0 = time.monotonic()
        images = [
            build(d, "ext4", "ext4", size, args.data_mib * MiB),
            build(d, "xfs", "xfs", size, args.data_mib * MiB),
        ]
        print(f"built 2 x {size / MiB:.0f} MiB images in {time.monotonic() - t0:.1f}s")
        for img in images:
            print(f"  {img.name}: {img.stat().st_size / MiB:.1f} MiB on disk")
        disks = [
            SnapshotDisk(
                device=f"disk{i}", node=f"n{i}", image=str(p), format="qcow2", overlay=None
            )
            for i, p in enumerate(images)
        ]
        results: list[Verification] = []
        for _ in range(args.runs):
            results.append(asyncio.run(verify_disks(disks, workdir=tmp)))
        last = results[-1]
        for c in last.checks:
            print(f"  {c.device} {c.fstype}: {c.verdict.value} (replayed={c.log_replayed})")
        durations = [r.duration_ms for r in results]
        total_size = size * len(disks)
        on_disk = sum(p.stat().st_size for p in images)
        ratio = last.bytes_read / total_size
        print(
            f"verify: median {statistics.median(durations):.0f} ms "
            f"(min {min(durations):.0f}, max {max(durations):.0f}, {args.runs} runs)"
        )
        print(
            f"bytes read: {last.bytes_read / MiB:.1f} MiB of {total_size / MiB:.0f} MiB virtual "
            f"(ratio {ratio:.4f}); image files hold {on_disk / MiB:.1f} MiB"
        )
        if last.verdict is not VerifyVerdict.CONSISTENT:
            print(f"FAIL: verdict {last.verdict.value}", file=sys.stderr)
            return 1
        if ratio > args.max_ratio:
            print(f"FAIL: read ratio {ratio:.3f} > {args.max_ratio}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
