"""Live merge: freezeframe's ``merge_layer`` (QMP ``block-commit``) against ``qemu-img commit``
of the same chain offline, and the guest's longest write stall during a live merge, on one lab
VM in the same run.

Each run, on a lab VM (one ext4 data disk, ``--disk-size``) whose workload keeps writing:
a cut; the guest writes ``--data`` MiB (``dd`` of random data, fsync'ed) into the new layer
L; another cut (L is now an intermediate layer). The cuts are the driver's own, without a
freeze or a catalog: the merge is what is measured. Then, side by side on the same bytes:

- offline: L and its base copied (sparse) to a scratch directory, ``qemu-img commit -d`` of
  the copy of L into the copy of its base (the VM untouched);
- live: ``merge_layer(L -> base)`` while the guest writes (intermediate commit), then the
  active layer merged down too (active commit + pivot), so the chain is back to one image.

Throughput is L's allocated bytes (``qemu-img map``) per second of the merge (QEMU reopens
the base read-only when the job finalizes, which flushes it; an ``fsync`` of the base right
after the merge is timed too, and adds ~nothing). Write stalls are seen from inside the guest
by a writer that rewrites 4 KiB with ``fsync`` every 50 ms (each write reaches the disk, so a
block-layer stall shows; the lab workload itself writes through the page cache) and records
its longest gap between two writes (reset before each phase): the normal gap is that writer's
mean gap, and its longest gap, in a quiet window as long as the merge. Target: no stall during
a live merge above 2 x the normal gap (the summary prints PASS or MISS per mode).

Runs alternate between ``--modes`` (default ``full,cached,hostio``):

- ``full``: the driver as it is (the base reopened with ``cache.direct`` on while the job
  writes it, set back after; checked);
- ``cached``: the driver with the base's cache left as it is and fsync'ed from the host every
  0.1 s (what it falls back to when QEMU cannot reopen the base; the driver before);
- ``unflushed``: cached, without that fsync;
- ``limited``: ``full`` with ``LayerMerge.speed`` 100 MiB/s;
- ``hostio``: no merge measured: this process copies the layer's bytes into a file next to the
  base (512 KiB chunks, through the page cache, fsync'ed every 0.1 s and at the end), which
  shows what the same amount of plain host I/O does to the guest (the merge follows, unmeasured).

    .venv/bin/python bench/merge_bench.py [--runs 9] [--data 256] [--disk-size 1G]
        [--modes full,cached,hostio] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from freezeframe.agent import GuestAgent
from freezeframe.hypervisor import LayerMerge
from freezeframe.hypervisor import qmp as qmp_module
from freezeframe.hypervisor._files import flushing as _flushing
from freezeframe.hypervisor.qmp import QmpDriver
from freezeframe.lab import LabVm, lab_down, lab_up

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
#: The ``speed`` of the ``limited`` mode (bytes/s).
LIMIT = 100 * MIB
STATE = "/run/ffsync"

#: The guest's fsync writer: 4 KiB appended-in-place with fsync every 50 ms; its longest gap
#: between two completed writes in STATE/maxgap_ms and the writes since the last reset in
#: STATE/n (a reset: create STATE/reset).
WRITER = r"""
state=/run/ffsync
mkdir -p $state
rm -f $state/tick; mkfifo $state/tick; exec 3<>$state/tick
now_ms() { read -r up _ < /proc/uptime; ms=$(( ${up%.*} * 1000 + 1${up#*.}0 - 1000 )); }
echo 0 > $state/maxgap_ms; echo 0 > $state/n
now_ms; last=$ms; max=0; n=0
while :; do
    dd if=/dev/zero of=/mnt/disk0/ffsync bs=4096 count=1 conv=fsync,notrunc 2>/dev/null
    now_ms; gap=$((ms - last)); last=$ms; n=$((n + 1))
    if [ -e $state/reset ]; then max=0; n=0; rm -f $state/reset; gap=0; fi
    if [ $gap -gt $max ]; then max=$gap; echo $max > $state/maxgap_ms; fi
    echo $n > $state/n
    read -r -t 0.05 -u 3 _
done
"""


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def copy_pair(layer: str, base: str, top_copy: Path, base_copy: Path) -> None:
    """Sparse copies of ``layer`` and ``base``, the copy of ``layer`` backed by the copy of
    ``base``, everything on disk (so the commit's own flush writes only what it changed)."""
    subprocess.run(["cp", "--sparse=always", layer, str(top_copy)], check=True)
    subprocess.run(["cp", "--sparse=always", base, str(base_copy)], check=True)
    qemu_img("rebase", "-u", "-b", str(base_copy), "-F", "qcow2", str(top_copy))
    os.sync()


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _no_flushing(path: str, every: float = 0.1) -> AsyncIterator[None]:
    """The ``unflushed`` mode: the driver without its periodic fsync of the base."""
    yield


_DIRECT_WRITES = QmpDriver._merge_writes


@contextlib.asynccontextmanager
async def _cached_writes(self: QmpDriver, base: str, disk: Any) -> AsyncIterator[None]:
    """The ``cached`` mode: the base's cache left as it is, fsync'ed every 0.1 s (what the
    driver falls back to when QEMU cannot reopen the base)."""
    async with qmp_module.flushing(base):  # type: ignore[attr-defined]
        yield


async def base_direct(drv: QmpDriver, base: str) -> bool | None:
    """``cache.direct`` of ``base``'s protocol node now (None: not found)."""
    nodes = await drv._execute("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    for node in nodes:
        if node.get("drv") == "file" and node.get("file") == base:
            return bool(node["cache"]["direct"])
    return None


async def host_copy(src: str, dst: str, chunk: int = 512 * 1024) -> None:
    """The ``hostio`` mode: ``src``'s bytes copied into ``dst`` by this process, in the merge
    job's 512 KiB chunks, through the page cache, ``dst`` fsync'ed every 0.1 s as the driver
    does with a cached base and at the end; then ``dst`` removed."""

    def copy() -> None:
        with open(src, "rb") as f, open(dst, "wb") as g:
            while block := f.read(chunk):
                g.write(block)

    try:
        async with _flushing(dst):
            await asyncio.to_thread(copy)
        await asyncio.to_thread(fsync, dst)
    finally:
        os.unlink(dst)


def allocated(image: str) -> int:
    """Bytes allocated in ``image`` itself (not its backing files)."""
    extents = json.loads(qemu_img("map", "-U", "--output=json", image))
    return sum(e["length"] for e in extents if e.get("data") and e.get("depth", 0) == 0)


async def guest(vm: LabVm, *argv: str, timeout: float = 600) -> str:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path), timeout=30) as ga:
        r = await ga.exec(argv[0], list(argv[1:]), timeout=timeout)
        if r.exitcode != 0:
            raise RuntimeError(f"{argv}: exit {r.exitcode}: {r.stderr!r}")
        return r.stdout.decode(errors="replace") if r.stdout else ""


async def reset_writer(vm: LabVm) -> None:
    await guest(vm, "/bin/touch", f"{STATE}/reset")
    for _ in range(100):  # the writer consumes the marker within one round
        await asyncio.sleep(0.05)
        try:
            await guest(vm, "/bin/test", "!", "-e", f"{STATE}/reset")
            return
        except RuntimeError:
            continue


async def writer_stats(vm: LabVm) -> tuple[int, int]:
    """(longest gap ms, writes) since the last reset."""
    await asyncio.sleep(0.3)  # let the writer complete a round
    for _ in range(20):  # the writer may be rewriting a file just then: read again
        out = await guest(vm, "/bin/cat", f"{STATE}/maxgap_ms", f"{STATE}/n")
        if len(values := out.split()) == 2:
            return int(values[0]), int(values[1])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the guest's writer state cannot be read: {out!r}")


async def cut(drv: QmpDriver) -> None:
    """A layer boundary: the driver's cut of disk0, no freeze (what lies below the cut was
    fsync'ed by the guest; the merge does not care about consistency)."""
    async with drv:
        disks = [d for d in await drv.disks() if d.device == "disk0"]
        await drv.cut(await drv.prepare_cut(f"b{secrets.token_hex(5)}", disks))


async def one_run(vm: LabVm, data_mib: int, scratch: Path, n: int, mode: str) -> dict[str, Any]:
    drv = QmpDriver(str(vm.qmp_path), vm_name=vm.name, timeout=30)
    speed = LIMIT if mode == "limited" else 0
    await cut(drv)
    await guest(
        vm, "/bin/dd", "if=/dev/urandom", f"of=/mnt/disk0/fill{n}", "bs=1M",
        f"count={data_mib}", "conv=fsync",
    )  # fmt: skip
    await cut(drv)
    async with drv:
        (disk,) = [d for d in await drv.disks() if d.device == "disk0"]
    chain = [disk.file, *disk.backing]
    layer, base = chain[1], chain[2]
    layer_bytes = allocated(layer)
    for image in chain:
        os.chmod(image, os.stat(image).st_mode | 0o200)

    # offline: qemu-img commit of copies of the same two images
    top_copy, base_copy = scratch / "layer.qcow2", scratch / "base.qcow2"
    await asyncio.to_thread(copy_pair, layer, base, top_copy, base_copy)
    t0 = time.perf_counter()
    await asyncio.to_thread(qemu_img, "commit", "-q", "-d", str(top_copy))
    offline_s = time.perf_counter() - t0
    qemu_img("check", "-q", str(base_copy))
    top_copy.unlink()
    base_copy.unlink()

    # live: intermediate commit (layer -> base), then the active layer down too
    await reset_writer(vm)
    # cached, unflushed: the driver with the base's cache left as it is (with / without the
    # host's fsync of the base every 0.1 s); hostio: no merge, a host process copies the
    # layer's bytes into a file next to the base instead (the merge follows, unmeasured)
    qmp_module.flushing = _no_flushing if mode == "unflushed" else _flushing  # type: ignore[attr-defined]
    cached = mode in ("cached", "unflushed")
    QmpDriver._merge_writes = _cached_writes if cached else _DIRECT_WRITES  # type: ignore[method-assign]
    if mode == "hostio":
        t0 = time.perf_counter()
        await host_copy(layer, str(Path(base).parent / "hostio.tmp"))
        live_s = time.perf_counter() - t0
        stall, writes = await writer_stats(vm)
        async with drv:
            await drv.merge_layer(LayerMerge("disk0", layer, base, speed))
    else:
        async with drv:
            out = await drv.merge_layer(LayerMerge("disk0", layer, base, speed))
            direct = await base_direct(drv, base)
        live_s = out.duration_ms / 1000
        if direct is not False:
            raise RuntimeError(f"{base}: cache.direct is {direct} after the merge")
    t0 = time.perf_counter()
    await asyncio.to_thread(fsync, base)  # what qemu-img commit's final flush pays for
    flush_s = time.perf_counter() - t0
    if mode != "hostio":
        stall, writes = await writer_stats(vm)
    await reset_writer(vm)
    async with drv:
        act = await drv.merge_layer(LayerMerge("disk0", chain[0], base, speed))
    act_stall, _ = await writer_stats(vm)
    # quiet: the same writer with no merge, for as long as the live merge took (>= 2 s)
    quiet_s = max(2.0, live_s)
    await reset_writer(vm)
    await asyncio.sleep(quiet_s)
    quiet_gap, quiet_writes = await writer_stats(vm)
    for image in (layer, chain[0]):
        qemu_img("check", "-U", "-q", image)  # out of the chain now: must be intact
    await guest(vm, "/bin/rm", "-f", f"/mnt/disk0/fill{n}")  # room for the next run
    return {
        "mode": mode,
        "layer_mib": layer_bytes / MIB,
        "offline_s": offline_s,
        "live_s": live_s,
        "offline_mbs": layer_bytes / MIB / offline_s,
        "live_mbs": layer_bytes / MIB / live_s,
        "live_flushed_mbs": layer_bytes / MIB / (live_s + flush_s),
        "active_ms": act.duration_ms,
        "stall_ms": stall,
        "active_stall_ms": act_stall,
        "quiet_max_gap_ms": quiet_gap,
        "quiet_mean_gap_ms": (quiet_s + 0.3) * 1000 / max(1, quiet_writes),
        "writes_during_merge": writes,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--data", type=int, default=256, help="MiB the guest writes into the layer")
    ap.add_argument("--disk-size", default="1G")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--modes",
        default="full,cached,hostio",
        help="runs alternate between these: full (the driver as it is), cached (the base "
        "through the page cache, fsync'ed every 0.1 s), unflushed (cached, no fsync), limited "
        "(full at speed 100 MiB/s), hostio (the same bytes copied by the host, no merge)",
    )
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="ffbench-", dir="/var/tmp")
    os.chmod(home, 0o755)
    os.environ["FREEZEFRAME_HOME"] = home
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    vm = await lab_up("bench-merge", disks=("ext4",), disk_size=args.disk_size, timeout=240)
    runs: list[dict[str, Any]] = []
    try:
        assert vm.qga_path is not None
        async with GuestAgent(str(vm.qga_path), timeout=30) as ga:
            await ga.exec("/bin/sh", ["-c", f"/bin/sh -c '{WRITER}' >/dev/null 2>&1 &"])
        await asyncio.sleep(2)
        scratch = Path(home) / "offline"
        scratch.mkdir()
        modes = args.modes.split(",")
        for n in range(args.runs):
            r = await one_run(vm, args.data, scratch, n, modes[n % len(modes)])
            runs.append(r)
            print(
                f"run {n + 1} ({r['mode']}): layer {r['layer_mib']:.0f} MiB: "
                f"live {r['live_s']:.2f} s "
                f"({r['live_mbs']:.0f} MB/s; {r['live_flushed_mbs']:.0f} MB/s with the base "
                f"fsync'ed after), qemu-img commit {r['offline_s']:.2f} s "
                f"({r['offline_mbs']:.0f} MB/s); active merge {r['active_ms']:.0f} ms; "
                f"guest stall {r['stall_ms']} ms (active {r['active_stall_ms']} ms), quiet "
                f"max gap {r['quiet_max_gap_ms']} ms, mean gap {r['quiet_mean_gap_ms']:.0f} ms",
                flush=True,
            )
    finally:
        await lab_down(vm.name, purge=True)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    med = statistics.median
    normal = med(r["quiet_mean_gap_ms"] for r in runs)  # the writer's normal gap, every run
    quiet = med(r["quiet_max_gap_ms"] for r in runs)
    print(f"\naccelerator: {vm.accel}, layer {args.data} MiB, runs: {len(runs)} "
          f"({', '.join(modes)} alternating); normal gap (mean, quiet) {normal:.0f} ms, quiet "
          f"longest gap median {quiet:.0f} ms; target: no stall above 2 x the normal gap "
          f"= {2 * normal:.0f} ms")  # fmt: skip
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        # a run's longest stall: of the intermediate merge and the active one (hostio: of
        # the host's copy alone)
        stalls = [
            r["stall_ms"] if mode == "hostio" else max(r["stall_ms"], r["active_stall_ms"])
            for r in mine
        ]
        live, off = med(r["live_mbs"] for r in mine), med(r["offline_mbs"] for r in mine)
        within = sum(st <= 2 * normal for st in stalls)
        what = "host copy" if mode == "hostio" else "live merge"
        print(f"{mode}: {what} median {live:.0f} MB/s, qemu-img commit {off:.0f} MB/s "
              f"(ratio {live / off:.2f}); longest stall median {med(stalls):.0f} ms, max "
              f"{max(stalls)} ms = {max(stalls) / normal:.2f} x the normal gap: "
              f"{'PASS' if max(stalls) <= 2 * normal else 'MISS'} (target <= 2; runs within "
              f"{within}/{len(stalls)})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
