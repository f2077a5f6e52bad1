"""Freeze window: freezeframe vs a raw floor, on the same lab VM in the same run.

The floor is the least any tool can do: overlays created and added beforehand, then
``guest-fsfreeze-freeze`` -> one QMP ``transaction`` of ``blockdev-snapshot`` ->
``guest-fsfreeze-thaw`` over raw sockets, timed from sending the freeze to the thaw's reply.
freezeframe's window is the same interval from its own record (``freeze_sent`` -> ``thawed``).
Runs alternate (ff, floor, ff, ...) so drift hits both alike. Also prints the longest write
stall the guest's workload saw during each run (``/run/ffwork/maxgap_ms``, reset before each run).

    .venv/bin/python bench/freeze_window.py [--runs 20] [--disks ext4,xfs]

Target (issue 3): median ratio freezeframe / floor <= 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.lab import LabVm, lab_down, lab_up
from freezeframe.models import ConsistencyLevel, QuiescePolicy

REPO = Path(__file__).resolve().parents[1]


class RawQga:
    """The minimum of the QGA protocol: sync once, then one JSON line per command."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        sync_id = secrets.randbelow(1 << 31)
        self.sock.sendall(
            b"\xff"
            + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode()
        )
        while True:  # skip everything up to the 0xFF that precedes our sync reply
            self.buf += self.sock.recv(65536)
            i = self.buf.rfind(b"\xff")
            if i >= 0 and b"\n" in self.buf[i:]:
                line, _, self.buf = self.buf[i + 1 :].partition(b"\n")
                if json.loads(line).get("return") == sync_id:
                    break

    def call(self, command: str) -> object:
        self.sock.sendall(json.dumps({"execute": command}).encode())
        while b"\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        line, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


async def floor_run(vm: LabVm, n: int) -> float:
    """Overlays prepared first; then freeze -> transaction -> thaw; returns the window in ms."""
    assert vm.qga_path is not None
    qmp = QMPClient("floor")
    await qmp.connect(str(vm.qmp_path))
    try:
        blocks: list[dict[str, Any]] = await qmp.execute("query-block")  # type: ignore[assignment]
        tops = [
            (b["inserted"]["node-name"], b["inserted"]["image"]) for b in blocks if "inserted" in b
        ]
        actions = []
        for i, (node, image) in enumerate(tops):
            base = image["filename"]
            overlay = str(Path(base).parent / f"floor-{n}-{i}.qcow2")
            await asyncio.to_thread(
                subprocess.run,
                ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2",
                 overlay, str(image["virtual-size"])],
                check=True,
            )  # fmt: skip
            ov_node = f"floor-{n}-{i}"
            await qmp.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": ov_node,
                 "file": {"driver": "file", "filename": overlay}, "backing": None},
            )  # fmt: skip
            actions.append(
                {"type": "blockdev-snapshot", "data": {"node": node, "overlay": ov_node}}
            )
        qga = RawQga(str(vm.qga_path))
        try:
            t0 = time.perf_counter()
            qga.call("guest-fsfreeze-freeze")
            await qmp.execute("transaction", {"actions": actions})
            qga.call("guest-fsfreeze-thaw")
            t1 = time.perf_counter()
        finally:
            qga.close()
    finally:
        await qmp.disconnect()
    return (t1 - t0) * 1000


async def reset_stall(vm: LabVm) -> None:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        await ga.exec("/bin/touch", ["/run/ffwork/reset"])
        for _ in range(100):  # the workload consumes the marker within one round
            r = await ga.exec("/bin/test", ["-e", "/run/ffwork/reset"])
            if r.exitcode != 0:
                return
            await asyncio.sleep(0.05)


async def stall_ms(vm: LabVm) -> int:
    assert vm.qga_path is not None
    await asyncio.sleep(0.3)  # let the workload complete a round after the thaw
    async with GuestAgent(str(vm.qga_path)) as ga:
        return int((await ga.file_read("/run/ffwork/maxgap_ms")).strip() or b"0")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--disks", default="ext4,xfs")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="ffbench-")
    os.environ["FREEZEFRAME_HOME"] = home
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    vm = await lab_up("bench-window", disks=tuple(args.disks.split(",")))
    try:
        cat = await Catalog.open()
        await cat.add_vm(vm.vm_config())
        snap = Snapshotter(cat)
        await asyncio.sleep(2)  # workload running, pages dirty
        ff, fl, ff_stall, fl_stall = [], [], [], []
        for n in range(args.runs):
            await reset_stall(vm)
            rec = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
            assert rec.level is ConsistencyLevel.FILESYSTEM, rec.level_reason
            assert rec.freeze_window_ms is not None
            ff.append(rec.freeze_window_ms)
            ff_stall.append(await stall_ms(vm))
            await reset_stall(vm)
            fl.append(await floor_run(vm, n))
            fl_stall.append(await stall_ms(vm))
            print(
                f"run {n + 1:2}: freezeframe {ff[-1]:7.1f} ms (guest stall {ff_stall[-1]:4} ms)   "
                f"floor {fl[-1]:7.1f} ms (guest stall {fl_stall[-1]:4} ms)",
                flush=True,
            )
        await cat.close()
    finally:
        await lab_down(vm.name, purge=True)
        shutil.rmtree(home, ignore_errors=True)
    ratios = [a / b for a, b in zip(ff, fl, strict=True)]
    med = statistics.median
    print(f"\naccelerator: {vm.accel}, disks: {args.disks}, runs: {args.runs}")
    print(f"freezeframe window median {med(ff):.1f} ms, guest stall median {med(ff_stall)} ms")
    print(f"raw floor   window median {med(fl):.1f} ms, guest stall median {med(fl_stall)} ms")
    print(
        f"ratio of medians {med(ff) / med(fl):.3f}; "
        f"median of per-pair ratios {med(ratios):.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    asyncio.run(main())
