"""Time ``lab up`` (warm build cache) to a ready guest agent: N runs, each value and the median.

    .venv/bin/python bench/lab_boot.py [--runs 5] [--disks ext4,xfs] [--accel auto] [--libvirt]

``--libvirt`` boots the guest as a transient libvirt domain (``lab up --libvirt``; libvirtd must
run: ``bash scripts/libvirtd.sh start``). Uses a throw-away ``FREEZEFRAME_HOME`` (under /var/tmp,
mode 0755, so libvirt's QEMU account reaches it) and the persistent cache ``$FREEZEFRAME_CACHE``
(default ``<repo>/.state/cache``). One untimed warm-up run builds the cache and settles the
accelerator probe first. Every VM is purged after its run.
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

from freezeframe.lab import lab_down, lab_up

REPO = Path(__file__).resolve().parents[1]


async def one_run(name: str, disks: tuple[str, ...], accel: str, driver: str) -> tuple[float, str]:
    started = time.monotonic()
    try:
        vm = await lab_up(name, disks=disks, accel=accel, timeout=120, driver=driver)
        return time.monotonic() - started, vm.accel
    finally:
        await lab_down(name, purge=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--disks", default="ext4,xfs")
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--libvirt", action="store_true", help="run it under libvirt")
    args = parser.parse_args()
    driver = "libvirt" if args.libvirt else "qmp"
    disks = tuple(d for d in args.disks.split(",") if d)
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state" / "cache"))
    with tempfile.TemporaryDirectory(prefix="ffbench-", dir="/var/tmp") as home:
        os.chmod(home, 0o755)
        os.environ["FREEZEFRAME_HOME"] = home
        warm, accel = await one_run("bench-warm", disks, args.accel, driver)
        print(f"warm-up (build cache, probe): {warm:.2f}s accel={accel}")
        times = []
        for i in range(args.runs):
            elapsed, accel = await one_run(f"bench{i}", disks, args.accel, driver)
            times.append(elapsed)
            print(f"run {i + 1}: lab up -> agent ready {elapsed:.2f}s accel={accel}")
        print(
            f"median {statistics.median(times):.2f}s  min {min(times):.2f}s  "
            f"max {max(times):.2f}s  ({args.runs} runs, disks={','.join(disks)}, accel={accel}, "
            f"driver={driver})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
