"""The cut of N RBD volumes under a running QEMU: QMP vs librbd in parallel vs a sequential loop.

    .venv/bin/python bench/rbd_cut.py [--runs 7] [--counts 1,2,4] [--paxos fast,default] [--json]

Starts the lab Ceph (``lab ceph up``) in a throw-away ``FREEZEFRAME_HOME``, creates 4 images
(64 MiB) and one QEMU without a guest (``-machine none``) that opens them all with its rbd driver
(``-blockdev driver=rbd,...``). A 64 KiB write to each through QEMU (HMP ``qemu-io``) makes
QEMU's librbd take each image's exclusive lock, as under a running guest. Then, for each paxos
setting (``fast``: the monitor's ``paxos propose interval`` 10 ms; ``default``: Ceph's 1 s; the
cluster is restarted on its data in between) and each N, ``--runs`` rounds, the methods'
order rotating each round, each making one snapshot of the first N images:

- ``qmp-transaction``: one QMP ``transaction`` of ``blockdev-snapshot-internal-sync`` over the N
  rbd nodes (QEMU's own librbd connection makes each snapshot; QEMU runs the actions one
  after another inside the one command);
- ``librbd-parallel``: :meth:`RbdClient.create_snaps` from outside, N threads over one
  connection, each opening its image, asking the lock owner (QEMU) for the snapshot, closing;
- ``librbd-preopened``: the same with the images opened before the clock starts
  (:meth:`RbdClient.open_images`, what a prepare step does before the freeze), only the
  snapshot requests timed (:meth:`OpenImages.create_snaps`);
- ``librbd-sequential``: one image after another over one connection (what Nova and Cinder
  do: the freeze lasts N snapshots).

Times are wall time of the whole step in ms (what the freeze window would hold). Meanwhile a
second QMP connection sends ``query-status`` back to back: the longest answer is how long
QEMU's main loop (where a guest's I/O completes, without iothreads) was blocked by the step.
Every snapshot is removed again after its round (not timed). Prints a table per paxos setting with
the median / min / max of each method and N, and the ratio median(N=4) / median(N=1);
``--json`` prints one JSON document instead. Cleans up QEMU (by PID) and the cluster
(``lab ceph down --purge``) in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from freezeframe.lab import ceph_down, ceph_up
from freezeframe.storage.rbd import (
    CephSettings,
    OpenImages,
    RbdClient,
    RbdImageRef,
    qemu_blockdev_json,
)

MAX_N = 4
METHODS = ("qmp-transaction", "librbd-parallel", "librbd-preopened", "librbd-sequential")


def start_qemu(
    workdir: Path, settings: CephSettings, refs: list[RbdImageRef]
) -> tuple[int, Path, Path]:
    """A guest-less QEMU with one rbd node per image; its PID and two QMP sockets (the cut's,
    the main-loop probe's)."""
    sock, probe, pidfile = workdir / "qmp.sock", workdir / "probe.sock", workdir / "qemu.pid"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-daemonize", "-pidfile", str(pidfile),
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-qmp", f"unix:{probe},server=on,wait=off"]  # fmt: skip
    for i, ref in enumerate(refs):
        argv += ["-blockdev", qemu_blockdev_json(ref, settings, node_name=f"rbd{i}")]
    subprocess.run(argv, check=True)
    return int(pidfile.read_text().strip()), sock, probe


def stop_qemu(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def timed(fn: Callable[[], Awaitable[Any]], probe: QMPClient) -> tuple[float, float]:
    """Run ``fn``: its wall time in ms, and the longest time QEMU's main loop took to answer
    a ``query-status`` (sent back to back on a second QMP connection) meanwhile, in ms."""
    done = asyncio.Event()
    worst = 0.0

    async def probing() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = time.perf_counter()
            await probe.execute("query-status")
            worst = max(worst, time.perf_counter() - t0)
            await asyncio.sleep(0.001)

    prober = asyncio.ensure_future(probing())
    await asyncio.sleep(0.005)
    t = time.perf_counter()
    try:
        await fn()
    finally:
        elapsed = time.perf_counter() - t
        done.set()
        await prober
    return elapsed * 1000, worst * 1000


async def _sequential(client: RbdClient, refs: list[RbdImageRef], name: str) -> None:
    for ref in refs:
        await client.create_snap(ref, name)


def cut_of(
    method: str,
    qmp: QMPClient,
    client: RbdClient,
    pre: OpenImages,
    refs: list[RbdImageRef],
    name: str,
) -> Callable[[], Awaitable[Any]]:
    """The step ``method`` takes to snapshot ``refs`` (nodes rbd0.. in QEMU) as ``name``."""
    if method == "qmp-transaction":
        actions = [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": f"rbd{i}", "name": name}}
            for i in range(len(refs))
        ]
        return lambda: qmp.execute("transaction", {"actions": actions})
    if method == "librbd-parallel":
        return lambda: client.create_snaps(refs, name)
    if method == "librbd-preopened":
        return lambda: pre.create_snaps(name)
    return lambda: _sequential(client, refs, name)


async def one_setting(
    paxos: str, runs: int, counts: list[int], workdir: Path, first: bool
) -> tuple[dict[str, dict[int, list[float]]], dict[str, dict[int, list[float]]]]:
    if not first:
        await ceph_down()
    lab = await ceph_up(paxos=paxos, timeout=120)
    print(f"[{paxos}] lab ceph up in {lab.started_in:.2f} s", file=sys.stderr)
    settings = lab.settings(timeout=30)
    refs = [RbdImageRef(lab.pool, f"bench{i}") for i in range(MAX_N)]
    results: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in METHODS}
    stalls: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in METHODS}
    async with await RbdClient.connect(settings) as client:
        for ref in refs:
            if not await client.image_exists(ref):
                await client.create_image(ref, 64 << 20)
        pid, sock, probe_sock = start_qemu(workdir, settings, refs)
        qmp, probe = QMPClient("rbd-cut"), QMPClient("rbd-probe")
        opened: dict[int, OpenImages] = {}
        try:
            await qmp.connect(str(sock))
            await probe.connect(str(probe_sock))
            for i in range(MAX_N):
                write = f'qemu-io rbd{i} "write -P 0x55 0 64k"'
                out = await qmp.execute("human-monitor-command", {"command-line": write})
                if str(out).strip():
                    raise RuntimeError(f"qemu-io rbd{i}: {out}")
            for n in counts:  # what a prepare step would do before the freeze
                opened[n] = await client.open_images(refs[:n])
            seq = 0
            for n in counts:
                for r in range(runs):
                    order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
                    for method in order:
                        seq += 1
                        name = f"ff-bench-{paxos}-{seq}"
                        some = refs[:n]
                        ms, stall = await timed(
                            cut_of(method, qmp, client, opened[n], some, name), probe
                        )
                        results[method][n].append(ms)
                        stalls[method][n].append(stall)
                        for ref in some:  # every snapshot must be there under its name
                            if name not in {s.name for s in await client.list_snaps(ref)}:
                                raise RuntimeError(f"{method}: {ref}@{name} missing")
                        await client.remove_snaps(some, name)
                        print(f"[{paxos}] N={n} run {r} {method:<18} {ms:8.1f} ms "
                              f"(main loop stall {stall:7.1f} ms)", file=sys.stderr)  # fmt: skip
        finally:
            for images in opened.values():
                await images.close()
            for c in (qmp, probe):
                with contextlib.suppress(Exception):
                    await c.disconnect()
            stop_qemu(pid)
    return results, stalls


def summary(
    results: dict[str, dict[int, list[float]]],
    stalls: dict[str, dict[int, list[float]]],
    counts: list[int],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, per_n in results.items():
        row: dict[str, Any] = {}
        for n in counts:
            v, st = per_n[n], stalls[method][n]
            row[str(n)] = {"median": statistics.median(v), "min": min(v), "max": max(v),
                           "runs": [round(x, 1) for x in v],
                           "stall_median": statistics.median(st), "stall_max": max(st)}  # fmt: skip
        if 1 in counts and MAX_N in counts:
            row["ratio_4_to_1"] = row[str(MAX_N)]["median"] / row["1"]["median"]
        out[method] = row
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--paxos", default="fast,default")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if not counts or max(counts) > MAX_N or min(counts) < 1:
        parser.error(f"--counts: 1..{MAX_N}")
    doc: dict[str, Any] = {"runs": args.runs, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="ffrbdcut-", dir="/var/tmp") as home:
        os.chmod(home, 0o755)
        os.environ["FREEZEFRAME_HOME"] = home
        try:
            for i, paxos in enumerate(args.paxos.split(",")):
                res, st = await one_setting(paxos, args.runs, counts, Path(home), first=i == 0)
                doc["settings"][paxos] = summary(res, st, counts)
        finally:
            await ceph_down(purge=True)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for paxos, table in doc["settings"].items():
        print(f"\npaxos {paxos}: median [min..max] ms over {args.runs} runs")
        print(f"{'method':<18}" + "".join(f"{'N=' + str(n):>22}" for n in counts) + "  4/1")
        for method, row in table.items():
            cells = ""
            for n in counts:
                c = row[str(n)]
                cells += f"{c['median']:.1f} [{c['min']:.0f}..{c['max']:.0f}]".rjust(22)
            ratio = f"{row['ratio_4_to_1']:.2f}" if "ratio_4_to_1" in row else "-"
            print(f"{method:<18}{cells}  {ratio}")
        print("QEMU main loop: longest query-status answer during the cut, median [max] ms")
        for method, row in table.items():
            cells = ""
            for n in counts:
                c = row[str(n)]
                cells += f"{c['stall_median']:.1f} [{c['stall_max']:.0f}]".rjust(22)
            print(f"{method:<18}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
