"""Freeze window and guest write stall with 1, 2, 4 RBD volumes: freezeframe vs a sequential loop.

    .venv/bin/python bench/rbd_window.py [--runs 5] [--counts 1,2,4] [--paxos fast,default]

For each monitor setting (``fast``: the lab Ceph's ``paxos propose interval`` 10 ms;
``default``: Ceph's 1 s) a lab Ceph and a lab VM with seven ext4 data disks, four of them RBD
images opened by QEMU's rbd driver (``lab up --rbd``), three local qcow2 images, under the lab
workload, are started in a throw-away ``FREEZEFRAME_HOME``. Every run freezes the same number
of filesystems, four, so that N measures the volumes, not the filesystems: N RBD volumes plus
4 - N qcow2 disks (1 RBD + 3 qcow2 ... 4 RBD). For each N, ``--runs`` alternating pairs:

- ``freezeframe``: ``Snapshotter.snapshot(quiesce=required, exclude_disks=the others)``: images
  opened before the freeze, every RBD snapshot made at once from outside, then the qcow2
  disks' one transaction; window = its record's ``freeze_sent`` -> ``thawed``;
- ``sequential``: what Nova's volume-backed path does: freeze (the same four filesystems,
  ``guest-fsfreeze-freeze-list``), then one ``create_snap`` per RBD volume after another (each
  opening its image; the qcow2 disks are not cut), then the thaw; window = freeze sent -> thaw
  answered.

Also the longest write stall the guest's workload saw in each run (``/run/ffwork/maxgap_ms``,
reset before each run). Every snapshot is removed after its run (not timed). Prints one table
per setting (median [min..max] ms) and the ratio median(N=4) / median(N=1) of each method.
Target (issue 9): freezeframe's ratio <= 1.5 in both settings. Everything started is stopped
(VM purged, cluster purged) in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.lab import LabDisk, LabVm, ceph_down, ceph_up, lab_down, lab_up
from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotRecord
from freezeframe.storage.rbd import RbdClient, RbdImageRef

REPO = Path(__file__).resolve().parents[1]
MAX_N = 4
#: The filesystems frozen in every run (N RBD volumes + FROZEN - N qcow2 disks).
FROZEN = 4


def refs_of(vm: LabVm) -> list[RbdImageRef]:
    return [RbdImageRef.parse(d.rbd) for d in vm.disks if d.rbd is not None]


def cut_disks(vm: LabVm, n: int) -> list[LabDisk]:
    """The disks of a run with N RBD volumes: the first N RBD ones, then FROZEN - N qcow2."""
    rbd = [d for d in vm.disks if d.rbd is not None]
    local = [d for d in vm.disks if d.rbd is None]
    return rbd[:n] + local[: FROZEN - n]


async def sequential_run(vm: LabVm, client: RbdClient, n: int, name: str) -> float:
    """Freeze, one snapshot after another, thaw (Nova's volume-backed loop); the window, ms."""
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        await ga.ping()
        t0 = time.perf_counter()
        # the filesystems freezeframe freezes with the others excluded (always FROZEN)
        await ga.fsfreeze_freeze_list([d.mountpoint for d in cut_disks(vm, n)], timeout=60)
        try:
            for ref in refs_of(vm)[:n]:
                await client.create_snap(ref, name)
        finally:
            await ga.fsfreeze_thaw(timeout=60)
        t1 = time.perf_counter()
    return (t1 - t0) * 1000


async def reset_stall(vm: LabVm) -> None:
    """Reset the workload's longest-gap record (it consumes the marker within one round)."""
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        await ga.exec("/bin/touch", ["/run/ffwork/reset"])
        for _ in range(100):
            if (await ga.exec("/bin/test", ["-e", "/run/ffwork/reset"])).exitcode != 0:
                return
            await asyncio.sleep(0.05)


async def stall_ms(vm: LabVm) -> float:
    """The longest write stall the workload saw since the reset, ms."""
    assert vm.qga_path is not None
    await asyncio.sleep(0.3)  # let the workload complete a round after the thaw
    async with GuestAgent(str(vm.qga_path)) as ga:
        return float(int((await ga.file_read("/run/ffwork/maxgap_ms")).strip() or b"0"))


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} [{min(xs):.0f}..{max(xs):.0f}]"


Results = dict[str, dict[int, list[float]]]


async def one_setting(paxos: str, counts: list[int], runs: int) -> Results:
    ceph = await ceph_up(paxos=paxos)
    vm: LabVm | None = None
    results: Results = {
        k: {n: [] for n in counts} for k in ("ff", "ff_stall", "ff_cut", "seq", "seq_stall")
    }
    try:
        vm = await lab_up(
            f"rbdwin-{paxos}",
            disks=("ext4",) * (MAX_N + FROZEN - 1),
            disk_size="64M",
            rbd=range(MAX_N),
        )
        cat = await Catalog.open()
        await cat.add_vm(vm.vm_config(), replace=True)
        snap = Snapshotter(cat)
        devices = [d.device for d in vm.disks]
        await asyncio.sleep(2)
        async with await RbdClient.connect(ceph.settings(timeout=30)) as client:
            for n in counts:
                for r in range(runs):
                    await reset_stall(vm)
                    rec = await snap.snapshot(
                        vm.name,
                        SnapshotRequest(
                            quiesce=QuiescePolicy.REQUIRED,
                            exclude_disks=tuple(
                                set(devices) - {d.device for d in cut_disks(vm, n)}
                            ),
                        ),
                    )
                    assert rec.level is ConsistencyLevel.FILESYSTEM, rec.level_reason
                    assert rec.freeze_window_ms is not None
                    results["ff"][n].append(rec.freeze_window_ms)
                    results["ff_cut"][n].append(rec_ms(rec, "cut_sent", "cut"))
                    results["ff_stall"][n].append(await stall_ms(vm))
                    await client.remove_snaps(refs_of(vm)[:n], f"ff-{rec.id}")
                    await reset_stall(vm)
                    name = f"seq-{n}-{r}"
                    results["seq"][n].append(await sequential_run(vm, client, n, name))
                    results["seq_stall"][n].append(await stall_ms(vm))
                    await client.remove_snaps(refs_of(vm)[:n], name)
                    last = {k: v[n][-1] for k, v in results.items()}
                    print(
                        f"{paxos:7} N={n} run {r + 1}: freezeframe {last['ff']:7.1f} ms"
                        f" (cut {last['ff_cut']:6.1f}, stall {last['ff_stall']:4.0f} ms)  "
                        f"sequential {last['seq']:7.1f} ms (stall {last['seq_stall']:4.0f} ms)",
                        flush=True,
                    )
        await cat.close()
    finally:
        if vm is not None:
            await lab_down(vm.name, purge=True)
        await ceph_down(purge=True)
    print(f"\n{paxos} monitor setting (paxos propose interval {ceph.paxos_interval:g} s), "
          f"accelerator {vm.accel if vm else '?'}, {FROZEN} filesystems frozen in every run "
          "(N RBD + the rest qcow2), median [min..max] ms")  # fmt: skip
    print(f"{'N':>2}  {'freezeframe window':>22}  {'its cut':>18}  {'guest stall':>18}  "
          f"{'sequential window':>22}  {'guest stall':>18}")  # fmt: skip
    for n in counts:
        print(f"{n:>2}  {fmt(results['ff'][n]):>22}  {fmt(results['ff_cut'][n]):>18}  "
              f"{fmt(results['ff_stall'][n]):>18}  {fmt(results['seq'][n]):>22}  "
              f"{fmt(results['seq_stall'][n]):>18}")  # fmt: skip
    if 1 in counts and MAX_N in counts:
        med = statistics.median
        print(
            f"ratio median(N={MAX_N}) / median(N=1): freezeframe window "
            f"{med(results['ff'][MAX_N]) / med(results['ff'][1]):.2f} (target <= 1.5), "
            f"sequential {med(results['seq'][MAX_N]) / med(results['seq'][1]):.2f}\n"
        )
    return results


def rec_ms(rec: SnapshotRecord, a: str, b: str) -> float:
    ea = next(e for e in rec.timeline if e.name == a)
    eb = next(e for e in rec.timeline if e.name == b)
    return (eb.mono_ns - ea.mono_ns) / 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--counts", default="1,2,4")
    ap.add_argument("--paxos", default="fast,default")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if any(not 1 <= c <= MAX_N for c in counts):
        ap.error(f"counts must be in 1..{MAX_N}")
    settings = args.paxos.split(",")
    if len(settings) > 1:
        # One process per setting: librados aborts (Objecter::handle_osd_map assertion) in a
        # process that talked to an earlier cluster at the same address.
        for paxos in settings:
            argv = [sys.executable, __file__, "--runs", str(args.runs), "--counts", args.counts]
            proc = await asyncio.create_subprocess_exec(*argv, "--paxos", paxos)
            if await proc.wait() != 0:
                raise SystemExit(f"the {paxos} setting failed (exit {proc.returncode})")
        return
    home = tempfile.mkdtemp(prefix="ffrbdwin-", dir="/var/tmp")
    os.chmod(home, 0o755)
    os.environ["FREEZEFRAME_HOME"] = home
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    try:
        await one_setting(settings[0], counts, args.runs)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
