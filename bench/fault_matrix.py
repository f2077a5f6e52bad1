"""Fault matrix (issue 12): faults an operator meets, on one lab VM, with what they leave.

Boots ONE lab VM (ext4 + xfs, QMP driver, a throw-away ``FREEZEFRAME_HOME``) and runs each
fault ``--tries`` times. Each try is met the way an operator meets it: the CLI as a process
(``python -m freezeframe.cli.main ... --json``) where that is how the fault happens, the engine
in-process where a hook is needed (QEMU stopped right after the freeze is sent). After each try,
with a fresh agent connection and a fresh catalog connection, it checks:

- guest thawed: ``guest-fsfreeze-status`` answers ``thawed``;
- nothing lost: every disk's chain (QMP ``query-block``) has all its files and ends on the base
  image the VM booted from, every image a ``done`` record names exists, no freeze intent is left
  open (plus what the fault itself must not lose: nothing switched, the catalog file untouched);
- clear error: the exit code is the one README.md documents for that fault and the JSON error
  document has a non-empty hint (``recover``: exit 0 and the intent reported thawed).

    .venv/bin/python bench/fault_matrix.py [--tries 3] [--json]

Prints one row per fault (k/N per check, median seconds per try); exits 0 whatever the cells
say (a measurement), non-zero only when the script itself broke. A try that raises is counted
as failing all three checks and is named in the ``errors`` column (traceback on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, open_driver
from freezeframe.engine.chain import open_copies
from freezeframe.errors import SnapshotFailedError
from freezeframe.hypervisor import HypervisorDriver, open_agent
from freezeframe.lab import LabVm, lab_down, lab_up
from freezeframe.models import FsFreezeState, QuiescePolicy, SnapshotStatus
from freezeframe.paths import state_dir

REPO = Path(__file__).resolve().parents[1]
FF = [sys.executable, "-m", "freezeframe.cli.main"]
VM = "ffmatrix"


@dataclass
class Try:
    """One try's outcome: the three checks, its wall time, and why a check failed."""

    thawed: bool = False
    intact: bool = False
    clear: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Lab:
    """The lab VM under test and what the faults need to clean up after themselves."""

    vm: LabVm
    bases: dict[str, str]  # device -> the image at the bottom of its chain
    procs: list[subprocess.Popen[str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ helpers


def catalog_file() -> Path:
    return state_dir() / "catalog.sqlite"


def exists(path: str) -> bool:
    return Path(path).exists()


def parse(out: str) -> Any:
    try:
        return json.loads(out)
    except ValueError:
        return None


async def ff(*args: str, timeout: float = 120) -> tuple[int, Any]:
    """Run the CLI with ``--json``; its exit code and parsed stdout (None if not JSON)."""
    r = await asyncio.to_thread(
        subprocess.run,
        [*FF, *args, "--json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return r.returncode, parse(r.stdout)


def spawn(lab: Lab, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*FF, *args, "--json"],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lab.procs.append(proc)
    return proc


def reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def error_is_clear(rc: int, doc: Any, want: int, note: list[str]) -> bool:
    """Exit ``want`` and a JSON error document whose exit_code says so, with a hint."""
    ok = (
        rc == want
        and isinstance(doc, dict)
        and doc.get("exit_code") == want
        and bool((doc.get("hint") or "").strip())
    )
    if not ok:
        hint = doc.get("hint") if isinstance(doc, dict) else None
        err = doc.get("error") if isinstance(doc, dict) else None
        note.append(f"exit {rc} (want {want}), error {err}, hint {hint!r}")
    return ok


async def wait_intent(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until ``proc`` has written its freeze intent (it is about to freeze, or frozen)."""
    deadline = time.monotonic() + timeout
    while True:
        async with await Catalog.open() as cat:
            if await cat.open_intents(VM):
                return
        if proc.poll() is not None:
            raise RuntimeError(f"create exited {proc.returncode} before freezing")
        if time.monotonic() > deadline:
            raise RuntimeError("no freeze intent appeared")
        await asyncio.sleep(0.05)


async def guest_thawed(lab: Lab, note: list[str]) -> bool:
    """A fresh agent connection says ``thawed``."""
    assert lab.vm.agent_address is not None
    try:
        async with open_agent(lab.vm.agent_address, timeout=5) as ga:
            state = await asyncio.wait_for(ga.fsfreeze_status(), 15)
    except Exception as e:  # the check's answer, not the script's failure
        note.append(f"fsfreeze-status: {type(e).__name__}: {e}")
        return False
    if state is not FsFreezeState.THAWED:
        note.append(f"guest {state.value}")
    return state is FsFreezeState.THAWED


async def chains() -> dict[str, tuple[str, ...]]:
    """Each disk's chain from QEMU, top first."""
    async with await Catalog.open() as cat:
        cfg = await cat.get_vm(VM)
    async with open_driver(cfg) as drv:
        return {d.device: (d.file, *d.backing) for d in await drv.disks()}


async def nothing_lost(lab: Lab, note: list[str]) -> bool:
    """Chains complete down to the base images, every done record's images exist, no open
    freeze intent."""
    ok = True
    for device, chain in (await chains()).items():
        missing = [f for f in chain if not exists(f)]
        if missing:
            note.append(f"{device}: missing {missing}")
            ok = False
        if chain[-1] != lab.bases.get(device):
            note.append(f"{device}: chain ends on {chain[-1]}, not {lab.bases.get(device)}")
            ok = False
    async with await Catalog.open() as cat:
        for rec in await cat.list_snapshots(VM):
            if rec.status is not SnapshotStatus.DONE:
                continue
            for d in rec.disks:
                for f in (d.image, d.overlay):
                    if f and not exists(f):
                        note.append(f"done {rec.id}: {f} missing")
                        ok = False
        if intents := await cat.open_intents(VM):
            note.append(f"{len(intents)} open freeze intent(s)")
            ok = False
    return ok


async def check(lab: Lab, t: Try) -> None:
    t.thawed = await guest_thawed(lab, t.notes)
    t.intact = await nothing_lost(lab, t.notes) and t.intact


# ------------------------------------------------------------------------------------- faults


async def sigkill_then_recover(lab: Lab, t: Try) -> None:
    """SIGKILL of ``snapshot create`` while frozen, then ``recover``: exit 0, thawed."""
    proc = spawn(lab, "snapshot", "create", VM, "--hold-frozen", "60")
    try:
        await wait_intent(proc)
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        reap(proc)
    if await guest_thawed(lab, []):  # the fault missed: the kill did not leave it frozen
        t.notes.append("the guest was not frozen after the kill")
    rc, doc = await ff("recover", VM)
    thawed = isinstance(doc, list) and bool(doc) and all(o.get("thawed") for o in doc)
    t.clear = rc == 0 and thawed
    if not t.clear:
        t.notes.append(f"recover exit {rc}: {doc}")
    t.intact = True
    await check(lab, t)


async def sigterm_during_freeze(lab: Lab, t: Try) -> None:
    """SIGTERM of ``snapshot create`` during the freeze: exit 143, thawed."""
    proc = spawn(lab, "snapshot", "create", VM, "--hold-frozen", "60")
    try:
        await wait_intent(proc)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, None, 60)
    finally:
        reap(proc)
    t.clear = error_is_clear(proc.returncode, parse(out), 143, t.notes)
    if not t.clear:
        said = " / ".join(err.splitlines())[-200:]
        t.notes.append(f"stdout {out.strip()[:80]!r}, stderr {said!r}")
    t.intact = True
    await check(lab, t)


async def qemu_stopped_after_freeze(lab: Lab, t: Try) -> None:
    """QEMU SIGSTOPped right after the freeze is sent, SIGCONTed 4 s later (engine in-process,
    quiesce required): exit 10, thawed when the call returns."""
    tasks: list[asyncio.Task[None]] = []

    async def stop_then_continue() -> None:
        await asyncio.sleep(0.02)
        os.kill(lab.vm.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(4.0)
        finally:
            os.kill(lab.vm.pid, signal.SIGCONT)

    async def before_freeze(_vm: str, _driver: HypervisorDriver) -> None:
        tasks.append(asyncio.create_task(stop_then_continue()))

    err: SnapshotFailedError | None = None
    async with await Catalog.open() as cat:
        snap = Snapshotter(cat, thaw_timeout=6.0, before_freeze=before_freeze)
        try:
            await snap.snapshot(
                VM, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED, freeze_timeout=2.0)
            )
        except SnapshotFailedError as e:
            err = e
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)
            os.kill(lab.vm.pid, signal.SIGCONT)
    # "thawed when the call returns": checked right away, before anything else connects
    t.thawed = await guest_thawed(lab, t.notes)
    if err is None:
        t.notes.append("the snapshot succeeded (the stop missed the freeze)")
    else:
        t.clear = err.exit_code == 10 and bool((err.hint or "").strip())
        if not t.clear:
            t.notes.append(f"{type(err).__name__} exit {err.exit_code}, hint {err.hint!r}")
    t.intact = True
    thawed = t.thawed
    await check(lab, t)
    t.thawed = thawed and t.thawed


async def vm_paused(lab: Lab, t: Try) -> None:
    """The VM paused (QMP ``stop``) before a snapshot: doctor's probe says ``vm-not-running``
    or ``create --quiesce required`` exits 10 with a hint; resumed after."""
    async with await Catalog.open() as cat:
        cfg = await cat.get_vm(VM)
        async with open_driver(cfg) as drv:
            await drv.pause()
    try:
        before = await chains()
        async with await Catalog.open() as cat, open_driver(cfg) as drv:
            probe = await Snapshotter(cat).probe_agent(cfg, drv)
        rc, doc = await ff("snapshot", "create", VM, "--quiesce", "required")
        note: list[str] = []
        create_ok = error_is_clear(rc, doc, 10, note)
        t.clear = (probe.code == "vm-not-running" or rc == 10) and create_ok
        if not t.clear:
            t.notes += [f"probe code {probe.code}", *note]
        t.intact = await chains() == before
        if not t.intact:
            t.notes.append("the disks switched while paused")
    finally:
        async with open_driver(cfg) as drv:
            await drv.resume()
    await check(lab, t)


async def image_deleted(lab: Lab, t: Try) -> None:
    """An image at the cut deleted: create exits 10 (BrokenChainError), nothing switched; the
    file is copied back from QEMU's open descriptor (as the hint says) afterwards."""
    rc, doc = await ff("snapshot", "create", VM, "--quiesce", "required")
    if rc != 0 or not isinstance(doc, dict):
        raise RuntimeError(f"the snapshot to cut an image failed: exit {rc} {doc}")
    gone = str(doc["disks"][0]["image"])
    before = await chains()
    os.unlink(gone)
    try:
        rc, doc = await ff("snapshot", "create", VM, "--quiesce", "required")
        t.clear = error_is_clear(rc, doc, 10, t.notes)
        if isinstance(doc, dict) and doc.get("error") != "BrokenChainError":
            t.clear = False
            t.notes.append(f"error {doc.get('error')}, not BrokenChainError")
        t.intact = await chains() == before
        if not t.intact:
            t.notes.append("the disks switched on a broken chain")
    finally:
        if not exists(gone):
            copies = open_copies([gone], pids=[lab.vm.pid])
            if gone not in copies:
                raise RuntimeError(f"{gone} is open nowhere: lost")
            shutil.copyfile(copies[gone], gone)
    await check(lab, t)


async def catalog_emptied(lab: Lab, t: Try) -> None:
    """The catalog file emptied: ``snapshot list`` exits 8, the file is left as it is; it is
    restored from a copy afterwards."""
    db = catalog_file()
    async with await Catalog.open() as cat:
        records = len(await cat.list_snapshots(VM))
    saved = Path(tempfile.mkdtemp(prefix="ffmatrix-db-"))
    files = sorted(db.parent.glob(db.name + "*"))
    for f in files:
        shutil.copy2(f, saved / f.name)
    try:
        db.write_bytes(b"")
        for f in files:
            if f != db:
                f.unlink()
        rc, doc = await ff("snapshot", "list", VM)
        t.clear = error_is_clear(rc, doc, 8, t.notes)
        size = db.stat().st_size if db.exists() else None
        t.intact = size == 0
        if not t.intact:
            t.notes.append(f"the emptied catalog file was rewritten (size {size})")
        if isinstance(doc, list):
            t.notes.append(f"listed {len(doc)} of {records} records")
    finally:
        for f in db.parent.glob(db.name + "*"):
            f.unlink()
        for f in files:
            shutil.copy2(saved / f.name, f)
        shutil.rmtree(saved, ignore_errors=True)
    async with await Catalog.open() as cat:
        if len(await cat.list_snapshots(VM)) != records:
            t.intact = False
            t.notes.append("records lost after the restore")
    await check(lab, t)


async def concurrent_create(lab: Lab, t: Try) -> None:
    """A second ``snapshot create`` while one holds the guest frozen: exit 9; the first one
    still finishes (exit 0)."""
    first = spawn(lab, "snapshot", "create", VM, "--hold-frozen", "4")
    try:
        await wait_intent(first)
        rc, doc = await ff("snapshot", "create", VM)
        t.clear = error_is_clear(rc, doc, 9, t.notes)
        await asyncio.to_thread(first.communicate, None, 60)
    finally:
        reap(first)
    t.intact = first.returncode == 0
    if not t.intact:
        t.notes.append(f"the first create exited {first.returncode}")
    await check(lab, t)


FAULTS: list[tuple[str, Callable[[Lab, Try], Awaitable[None]]]] = [
    ("SIGKILL while frozen + recover", sigkill_then_recover),
    ("SIGTERM during the freeze", sigterm_during_freeze),
    ("QEMU SIGSTOP 4 s after freeze sent", qemu_stopped_after_freeze),
    ("VM paused (QMP stop)", vm_paused),
    ("image at the cut deleted", image_deleted),
    ("catalog file emptied", catalog_emptied),
    ("second concurrent create", concurrent_create),
]


# --------------------------------------------------------------------------------------- main


async def settle(lab: Lab) -> None:
    """Between tries: SIGCONT, no leftover process, the VM running, no intent left open."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(lab.vm.pid, signal.SIGCONT)
    for proc in lab.procs:
        reap(proc)
    lab.procs.clear()
    with contextlib.suppress(Exception):
        async with await Catalog.open() as cat:
            cfg = await cat.get_vm(VM)
        async with open_driver(cfg) as drv:
            await drv.resume()
    with contextlib.suppress(Exception):
        await ff("recover", VM)


async def run(tries: int) -> list[dict[str, Any]]:
    vm = await lab_up(VM, disks=("ext4", "xfs"), driver="qmp")
    lab = Lab(vm=vm, bases={d.device: str(d.base or d.file) for d in vm.disks})
    try:
        async with await Catalog.open() as cat:
            await cat.add_vm(vm.vm_config())
        await asyncio.sleep(2)  # the workload running, pages dirty
        rows = []
        for name, fault in FAULTS:
            done: list[Try] = []
            for n in range(tries):
                t = Try()
                t0 = time.monotonic()
                try:
                    await fault(lab, t)
                except Exception as e:
                    traceback.print_exc()
                    t = Try(error=f"{type(e).__name__}: {e}")
                finally:
                    t.seconds = time.monotonic() - t0
                    await settle(lab)
                done.append(t)
                print(
                    f"  {name} #{n + 1}: thawed={t.thawed} intact={t.intact} clear={t.clear} "
                    f"{t.seconds:.1f}s {'; '.join(t.notes)}{t.error or ''}",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(
                {
                    "fault": name,
                    "tries": tries,
                    "guest_thawed": sum(t.thawed for t in done),
                    "nothing_lost": sum(t.intact for t in done),
                    "clear_error": sum(t.clear for t in done),
                    "median_s": round(statistics.median(t.seconds for t in done), 2),
                    "errors": [t.error for t in done if t.error],
                    "notes": sorted({n for t in done for n in t.notes}),
                }
            )
        return rows
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGCONT)
        for proc in lab.procs:
            reap(proc)
        await lab_down(VM, purge=True)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["fault", "tries", "guest thawed", "nothing lost", "clear error", "median s", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        n = r["tries"]
        cells = [
            r["fault"],
            str(n),
            f"{r['guest_thawed']}/{n}",
            f"{r['nothing_lost']}/{n}",
            f"{r['clear_error']}/{n}",
            f"{r['median_s']:.1f}",
            str(len(r["errors"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="ffmatrix-")
    os.environ["FREEZEFRAME_HOME"] = home
    os.environ.setdefault("FREEZEFRAME_CACHE", str(REPO / ".state/cache"))
    try:
        rows = asyncio.run(run(args.tries))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps({"tries": args.tries, "faults": rows}, indent=2))
    else:
        print(table(rows))
        for r in rows:
            for note in r["notes"] + r["errors"]:
                print(f"- {r['fault']}: {note}")


if __name__ == "__main__":
    main()
