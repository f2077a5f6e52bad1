"""Benchmark of ``verify_disks`` on a 2-disk set (ext4 + xfs, 1 GiB each, some files).

Builds the images on this host (mkfs on sparse raw files, files written through a loop mount,
copied while ``fsfreeze -f`` holds the filesystem -- like a quiesced cut -- then converted to
qcow2), verifies them a few times and prints the time and the bytes read against the disk
size. Verification must not copy the disks: the run fails when bytes read / virtual size
exceeds ``--max-ratio``. Needs root (loop devices, mounts, fsfreeze) and /dev/fuse.

    .venv/bin/python bench/verify_bench.py [--size-gib 1] [--data-mib 64] [--runs 3] [--lab]

With ``--lab``, the images are instead a real quiesced snapshot of a lab VM with 2 x 1 GiB
data disks (ext4 + xfs) under its writer workload, after ``--data-mib`` written in the guest.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo, for tests.fakes

from tests.fakes.hostfs import MiB, loop_mounted, sh

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.lab import lab_down, lab_up
from freezeframe.models import QuiescePolicy, SnapshotDisk, Verification, VerifyVerdict
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
    ap.add_argument("--lab", action="store_true", help="verify a real lab VM snapshot")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("verify_bench: needs root", file=sys.stderr)
        return 2
    size = int(args.size_gib * 1024 * MiB)
    with tempfile.TemporaryDirectory(prefix="ff-verify-bench-") as tmp:
        d = Path(tmp)
        if args.lab:
            disks = asyncio.run(lab_snapshot(d, size, args.data_mib))
        else:
            t0 = time.monotonic()
            images = [
                build(d, "ext4", "ext4", size, args.data_mib * MiB),
                build(d, "xfs", "xfs", size, args.data_mib * MiB),
            ]
            print(f"built 2 x {size / MiB:.0f} MiB images in {time.monotonic() - t0:.1f}s")
            disks = [
                SnapshotDisk(f"disk{i}", f"n{i}", str(p), "qcow2", None, virtual_size=size)
                for i, p in enumerate(images)
            ]
        try:
            results = [asyncio.run(verify_disks(disks, workdir=tmp)) for _ in range(args.runs)]
            return report(args, results, disks)
        finally:
            if args.lab:
                asyncio.run(lab_down(LAB_VM, purge=True))


LAB_VM = "bench-verify"


async def lab_snapshot(d: Path, size: int, data_mib: int) -> list[SnapshotDisk]:
    """A quiesced snapshot of a lab VM with 2 x ``size`` data disks (ext4 + xfs) under its
    writer workload, after ``data_mib`` MiB were written to each disk in the guest."""
    os.environ["FREEZEFRAME_HOME"] = str(d / "home")
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    vm = await lab_up(LAB_VM, disks=("ext4", "xfs"), disk_size=f"{size // MiB}M")
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path), timeout=300) as ga:
        for i in range(2):
            dd = ["if=/dev/zero", f"of=/mnt/disk{i}/blob", "bs=1M", f"count={data_mib}"]
            await ga.exec("/bin/dd", dd, timeout=300)
    async with await Catalog.open() as cat:
        await cat.add_vm(vm.vm_config())
        req = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
        rec = await Snapshotter(cat).snapshot(vm.name, req)
    print(f"lab snapshot {rec.id}: {rec.level.value}, window {rec.freeze_window_ms:.1f} ms")
    return list(rec.disks)


def report(args: argparse.Namespace, results: list[Verification], disks: list[SnapshotDisk]) -> int:
    """Print time and bytes read; non-zero when not consistent or when it read too much."""
    for dk in disks:
        print(f"  {Path(dk.image).name}: {Path(dk.image).stat().st_size / MiB:.1f} MiB on disk")
    last = results[-1]
    for c in last.checks:
        print(f"  {c.device} {c.fstype}: {c.verdict.value} (replayed={c.log_replayed})")
    durations = [r.duration_ms for r in results]
    total_size = sum(dk.virtual_size for dk in disks)
    ratio = last.bytes_read / total_size
    print(
        f"verify: median {statistics.median(durations):.0f} ms "
        f"(min {min(durations):.0f}, max {max(durations):.0f}, {args.runs} runs)"
    )
    print(
        f"bytes read: {last.bytes_read / MiB:.1f} MiB of {total_size / MiB:.0f} MiB virtual "
        f"(ratio {ratio:.4f})"
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
