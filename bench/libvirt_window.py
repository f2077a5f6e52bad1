"""Freeze window through libvirt: freezeframe vs libvirt's own quiesced snapshot, in one run.

One transient libvirt domain runs the lab guest (the lab's cached kernel + initramfs, two data
disks ext4 + xfs with serials ffdisk0/ffdisk1, the writer workload, qemu-ga logging verbosely
to /var/log/qemu-ga.log). Each repetition takes one snapshot with each method, the order
rotating from one repetition to the next:

1. freezeframe through its libvirt driver (``Snapshotter.snapshot``, quiesce required);
2. libvirt-python: ``snapshotCreateXML(DISK_ONLY|ATOMIC|QUIESCE|NO_METADATA)``, new overlays;
3. ``virsh snapshot-create-as --disk-only --atomic --quiesce --no-metadata --diskspec ...``.

Every method is measured the same neutral way, from the guest agent's own log: the time from
the line ``read data ... guest-fsfreeze-freeze`` to ``logging re-enabled due to filesystem
unfreeze`` (qemu-ga stamps each line ``<sec>.<usec>:``). Also the longest write stall the
guest's workload saw (``/run/ffwork/maxgap_ms``, reset before each run). Every method adds one
layer per disk per run, so all see the same chain depth.

Phase 2 boots the same guest as a lab VM (QMP driver) and takes ``--runs`` freezeframe
snapshots of it, measured the same way: freezeframe through libvirt vs through QMP.

    .venv/bin/python bench/libvirt_window.py [--runs 20]

Target: median guest window freezeframe / libvirt-python <= 0.8 (PASS/MISS is printed; a miss
is not an error). Needs root and a libvirtd at qemu:///system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from freezeframe.agent import Agent, GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, libvirt_vm
from freezeframe.hypervisor.libvirt import LibvirtAgent
from freezeframe.lab import lab_down, lab_up
from freezeframe.lab._build import ensure_artifacts
from freezeframe.lab._disks import XFS_MIN_SIZE, make_disk
from freezeframe.lab._qemu import MEMORY_MB, kernel_cmdline
from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotRecord

REPO = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
AGENT_LOG = "/var/log/qemu-ga.log"
FSTYPES = ("ext4", "xfs")
DEVICES = ("vda", "vdb")
TARGET = 0.8
FF_LV, LV_PY, VIRSH, FF_QMP = "freezeframe/libvirt", "libvirt-python", "virsh", "freezeframe/qmp"
FREEZE_LINE = re.compile(rb"^(\d+\.\d+): .*read data.*\"guest-fsfreeze-freeze(?:-list)?\"", re.M)
THAW_LINE = re.compile(rb"^(\d+\.\d+): .*logging re-enabled due to filesystem unfreeze", re.M)

AgentFactory = Callable[[], Agent]


@dataclass
class Samples:
    """One method's runs: guest-log window, guest write stall, host duration of the call."""

    window: list[float] = field(default_factory=list)
    stall: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    #: freezeframe only: the engine's own timeline, split into freeze / cut / thaw.
    parts: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the guest


def domain_xml(name: str, root: Path, kernel: Path, initrd: Path, disks: list[Path]) -> str:
    """A transient domain running the lab guest like ``lab up`` does: same kernel command
    line, memory, one vCPU, ``-cpu max`` under TCG, default cache, ACPI on (without it the
    guest has no HPET / ACPI PM timer and its clock, hence the agent's stamps, ticks in 4 ms
    jiffies), no USB controller."""
    devices = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='{dev}' bus='virtio'/>
      <serial>ffdisk{i}</serial>
    </disk>"""
        for i, (dev, path) in enumerate(zip(DEVICES, disks, strict=True))
    )
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{MEMORY_MB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{kernel_cmdline(FSTYPES, agent=True)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum' migratable='off'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{devices}
    <serial type='file'><source path='{root}/console.log'/><target port='0'/></serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


async def start_domain(name: str, root: Path) -> str:
    """Make the disks, start the transient domain; return its UUID."""
    art = await ensure_artifacts()
    disks = [root / f"{dev}.qcow2" for dev in DEVICES]
    for i, (fstype, path) in enumerate(zip(FSTYPES, disks, strict=True)):
        await make_disk(path, fstype, 256 << 20 if fstype != "xfs" else XFS_MIN_SIZE, f"d{i}")
    xml = domain_xml(name, root, art.kernel, art.initrd, disks)

    def create() -> str:
        conn = libvirt.open(URI)
        try:
            return str(conn.createXML(xml, 0).UUIDString())
        finally:
            conn.close()

    return await asyncio.to_thread(create)


def destroy_domain(name: str) -> None:
    """Destroy the transient domain ``name`` if it still runs; never raises."""
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError:
        return
    try:
        conn.lookupByName(name).destroy()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


async def wait_ready(agent: AgentFactory, timeout: float = 300) -> None:
    """Until the agent answers and the workload has completed a few rounds."""
    end = time.monotonic() + timeout
    while True:
        try:
            async with agent() as ga:
                if int((await ga.file_read("/run/ffwork/seq")).strip() or b"0") >= 5:
                    return
        except Exception:
            if time.monotonic() > end:
                raise
        if time.monotonic() > end:
            raise TimeoutError("the guest did not become ready")
        await asyncio.sleep(1)


async def reset_stall(agent: AgentFactory) -> None:
    async with agent() as ga:
        await ga.exec("/bin/touch", ["/run/ffwork/reset"])
        for _ in range(100):  # the workload consumes the marker within one round
            r = await ga.exec("/bin/test", ["-e", "/run/ffwork/reset"])
            if r.exitcode != 0:
                return
            await asyncio.sleep(0.05)


async def observe(agent: AgentFactory, after: float) -> tuple[float, float, float]:
    """(window ms, write stall ms, thaw stamp) of the freeze logged after guest time
    ``after``, read from the agent's log and the workload's state."""
    await asyncio.sleep(0.3)  # let the workload complete a round after the thaw
    async with agent() as ga:
        stall = int((await ga.file_read("/run/ffwork/maxgap_ms")).strip() or b"0")
        log = await ga.file_read(AGENT_LOG, max_bytes=256 << 10, tail=True)
    freezes = [float(m.group(1)) for m in FREEZE_LINE.finditer(log)]
    freezes = [t for t in freezes if t > after]
    if len(freezes) != 1:
        raise RuntimeError(f"expected one new freeze in the agent log, found {len(freezes)}")
    thaws = [float(m.group(1)) for m in THAW_LINE.finditer(log)]
    thaw = next((t for t in thaws if t >= freezes[0]), None)
    if thaw is None:
        raise RuntimeError("no 'logging re-enabled' line after the freeze in the agent log")
    return (thaw - freezes[0]) * 1000, float(stall), thaw


# --------------------------------------------------------------------------- the methods


def ms_between(rec: SnapshotRecord, a: str, b: str) -> float:
    ta = next(e.mono_ns for e in rec.timeline if e.name == a)
    tb = next(e.mono_ns for e in rec.timeline if e.name == b)
    return (tb - ta) / 1e6


async def ff_run(snap: Snapshotter, vm: str, s: Samples) -> None:
    t0 = time.perf_counter()
    rec = await snap.snapshot(vm, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    s.call.append((time.perf_counter() - t0) * 1000)
    if rec.level is not ConsistencyLevel.FILESYSTEM:
        raise RuntimeError(f"snapshot {rec.id} is {rec.level.value}: {rec.level_reason}")
    for part, a, b in (
        ("freeze", "freeze_sent", "frozen"),
        ("cut", "frozen", "cut"),
        ("thaw", "cut", "thawed"),
        ("engine window", "freeze_sent", "thawed"),
        ("cut call", "cut_sent", "cut"),  # the driver's cut alone (inside "cut")
        ("thaw call", "thaw_sent", "thawed"),  # the agent's thaw alone (inside "thaw")
        ("preflush", "preflush_sent", "preflushed"),  # before the window
    ):
        s.parts.setdefault(part, []).append(ms_between(rec, a, b))


def overlays(root: Path, tag: str, n: int) -> list[tuple[str, Path]]:
    return [(dev, root / f"{dev}.{tag}-{n:03}.qcow2") for dev in DEVICES]


async def libvirt_py_run(dom: libvirt.virDomain, root: Path, n: int, s: Samples) -> None:
    disks = "".join(
        f"<disk name='{dev}' snapshot='external' type='file'>"
        f"<driver type='qcow2'/><source file='{path}'/></disk>"
        for dev, path in overlays(root, "lvpy", n)
    )
    xml = f"<domainsnapshot><name>lvpy-{n}</name><disks>{disks}</disks></domainsnapshot>"
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    )
    t0 = time.perf_counter()
    await asyncio.to_thread(dom.snapshotCreateXML, xml, flags)
    s.call.append((time.perf_counter() - t0) * 1000)


async def virsh_run(domain: str, root: Path, n: int, s: Samples) -> None:
    argv = ["virsh", "-q", "-c", URI, "snapshot-create-as", domain, f"virsh-{n}", "--disk-only",
            "--atomic", "--quiesce", "--no-metadata"]  # fmt: skip
    for dev, path in overlays(root, "virsh", n):
        argv += ["--diskspec", f"{dev},snapshot=external,file={path}"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    s.call.append((time.perf_counter() - t0) * 1000)
    if proc.returncode != 0:
        raise RuntimeError(f"virsh snapshot-create-as failed: {err.decode().strip()}")


# --------------------------------------------------------------------------- the phases


async def measured(
    agent: AgentFactory, s: Samples, after: float, run: Callable[[int], Awaitable[None]], n: int
) -> float:
    """Reset the stall, take snapshot ``n``, record the guest's view; return the thaw stamp."""
    await reset_stall(agent)
    await run(n)
    window, stall, thaw = await observe(agent, after)
    s.window.append(window)
    s.stall.append(stall)
    return thaw


async def libvirt_phase(root: Path, runs: int, res: dict[str, Samples]) -> None:
    name = f"ffbench-lv-{secrets.token_hex(3)}"
    dom_dir = root / "domain"
    conn: libvirt.virConnect | None = None
    try:
        uuid = await start_domain(name, dom_dir)
        print(f"libvirt domain {name} ({uuid}) started; waiting for the guest", flush=True)

        def agent() -> Agent:
            return LibvirtAgent(uuid, URI, timeout=15)

        await wait_ready(agent)
        conn = libvirt.open(URI)
        dom = conn.lookupByUUIDString(uuid)
        cfg = await libvirt_vm("lvbench", uuid, URI, agent_log_path=AGENT_LOG)
        async with await Catalog.open() as cat:
            await cat.add_vm(cfg)
            snap = Snapshotter(cat)
            await asyncio.sleep(2)  # workload running, pages dirty
            methods: list[tuple[str, Callable[[int], Awaitable[None]]]] = [
                (FF_LV, lambda n: ff_run(snap, "lvbench", res[FF_LV])),
                (LV_PY, lambda n: libvirt_py_run(dom, dom_dir, n, res[LV_PY])),
                (VIRSH, lambda n: virsh_run(name, dom_dir, n, res[VIRSH])),
            ]
            last = 0.0
            for n in range(runs):
                k = n % len(methods)
                order = methods[k:] + methods[:k]  # rotate: no method always goes first
                line = []
                for label, fn in order:
                    last = await measured(agent, res[label], last, fn, n)
                    line.append(f"{label} {res[label].window[-1]:6.1f} ms")
                print(f"run {n + 1:2}: " + "   ".join(line), flush=True)
    finally:
        if conn is not None:
            conn.close()
        destroy_domain(name)


async def qmp_phase(runs: int, res: dict[str, Samples]) -> str:
    name = f"lvbench-qmp-{secrets.token_hex(3)}"
    try:
        vm = await lab_up(name, disks=FSTYPES, timeout=300)
        assert vm.qga_path is not None
        qga = str(vm.qga_path)

        def agent() -> Agent:
            return GuestAgent(qga)

        await wait_ready(agent)
        async with await Catalog.open() as cat:
            await cat.add_vm(vm.vm_config())
            snap = Snapshotter(cat)
            await asyncio.sleep(2)
            last = 0.0
            s = res[FF_QMP]
            for n in range(runs):
                last = await measured(agent, s, last, lambda _n: ff_run(snap, name, s), n)
                print(f"qmp run {n + 1:2}: {FF_QMP} {s.window[-1]:6.1f} ms", flush=True)
        return vm.accel
    finally:
        await lab_down(name, purge=True)


# --------------------------------------------------------------------------- the report


def stats(xs: list[float]) -> dict[str, float]:
    p90 = statistics.quantiles(xs, n=10, method="inclusive")[8] if len(xs) > 1 else xs[0]
    return {"median": statistics.median(xs), "p90": p90, "max": max(xs)}


def report(res: dict[str, Samples], runs: int, accel: str) -> None:
    med = statistics.median
    print(f"\naccelerator: {accel}, disks: {','.join(FSTYPES)}, runs: {runs} per method")
    print(
        f"{'method':<20} {'guest window ms (qemu-ga log)':>30}   {'guest write stall ms':>22}   "
        f"{'host call ms':>12}"
    )
    print(f"{'':<20} {'median':>9} {'p90':>9} {'max':>9}   {'median':>6} {'p90':>7} {'max':>7}   "
          f"{'median':>12}")  # fmt: skip
    summary: dict[str, object] = {}
    for label in (FF_LV, LV_PY, VIRSH, FF_QMP):
        s = res[label]
        if not s.window:
            continue
        w, st = stats(s.window), stats(s.stall)
        print(
            f"{label:<20} {w['median']:9.1f} {w['p90']:9.1f} {w['max']:9.1f}   "
            f"{st['median']:6.0f} {st['p90']:7.0f} {st['max']:7.0f}   {med(s.call):12.1f}"
        )
        half = len(s.window) // 2
        summary[label] = {
            "window_ms": w,
            "stall_ms": st,
            "call_ms_median": med(s.call),
            "window_ms_median_first_half": med(s.window[:half]) if half else None,
            "window_ms_median_second_half": med(s.window[half:]),
            "engine_ms_median": {k: med(v) for k, v in s.parts.items()} or None,
        }
    ratio = med(res[FF_LV].window) / med(res[LV_PY].window)
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(
        f"\nfreezeframe/libvirt vs libvirt-python, median guest window: {ratio:.3f} "
        f"(target <= {TARGET}): {verdict}"
    )
    print(f"freezeframe/libvirt vs virsh: {med(res[FF_LV].window) / med(res[VIRSH].window):.3f}")
    for label in (FF_LV, FF_QMP):
        p = res[label].parts
        if p:
            print(
                f"{label} engine timeline medians: freeze {med(p['freeze']):.1f} + cut "
                f"{med(p['cut']):.1f} + thaw {med(p['thaw']):.1f} ms (window "
                f"{med(p['engine window']):.1f} ms); of it the driver's cut call "
                f"{med(p['cut call']):.1f}, the thaw call {med(p['thaw call']):.1f}; "
                f"pre-flush before the window {med(p['preflush']):.1f} ms"
            )
    for label in (FF_LV, LV_PY, VIRSH, FF_QMP):
        ws = res[label].window
        if len(ws) > 1:
            print(
                f"{label} median window, first half of the runs {med(ws[: len(ws) // 2]):.1f} "
                f"ms, second half (deeper chain) {med(ws[len(ws) // 2 :]):.1f} ms"
            )
    cost: float | None = None
    if res[FF_QMP].window:
        cost = med(res[FF_LV].window) - med(res[FF_QMP].window)
        print(
            f"what libvirt costs freezeframe: median guest window {med(res[FF_LV].window):.1f} "
            f"ms (libvirt) vs {med(res[FF_QMP].window):.1f} ms (QMP): {cost:+.1f} ms"
        )
    print(
        json.dumps(
            {
                "bench": "libvirt_window",
                "accel": accel,
                "runs": runs,
                "methods": summary,
                "ratio_ff_vs_libvirt_python": round(ratio, 4),
                "target": TARGET,
                "verdict": verdict,
                "libvirt_cost_ms": cost,
            }
        )
    )


def make_root() -> Path:
    """A fresh directory under /var/tmp, mode 0755 (libvirt's QEMU runs as libvirt-qemu and
    must traverse to the images; a 0700 temp dir fails), with ``domain/`` for the images."""
    root = Path(tempfile.mkdtemp(prefix="ffbench-lv-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "domain").mkdir()
    (root / "domain").chmod(0o755)
    return root


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-qmp", action="store_true", help="only the libvirt phase")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    root = make_root()
    os.environ["FREEZEFRAME_HOME"] = str(root / "home")
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    res = {label: Samples() for label in (FF_LV, LV_PY, VIRSH, FF_QMP)}
    accel = "tcg"
    try:
        await libvirt_phase(root, args.runs, res)
        if not args.skip_qmp:
            accel = await qmp_phase(args.runs, res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(res, args.runs, accel)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
