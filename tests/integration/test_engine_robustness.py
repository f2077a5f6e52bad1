"""Engine paths found by review: cancellation at every await that writes something, an
unconfirmed thaw, a cut that cannot be verified, hooks around a failing step.

Same rig as ``test_engine_paths.py``: a real QEMU (BIOS only: real QMP, real block layer, real
overlays) with a fake guest agent on a real socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from freezeframe.engine import SnapshotRequest, Snapshotter, recover, verify_snapshot
from freezeframe.engine.snapshot import _snapshot_disks
from freezeframe.errors import CatalogError, HypervisorUnavailableError, SnapshotFailedError
from freezeframe.hypervisor import HypervisorDriver, PreparedCut, PreparedDisk
from freezeframe.hypervisor.qmp import QmpDriver
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
)
from tests.integration.test_engine_paths import EXT4, XFS, Rig, _rig

pytestmark = pytest.mark.integration


async def _ff(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    """The CLI as a separate process on the rig's catalog (stdout and stderr piped)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from freezeframe.cli.main import main; main()",
        "--database-url",
        f"sqlite:///{tmp_path / 'cat.sqlite'}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in _rig(tmp_path, [EXT4, XFS]):
        yield r


def _wrap_cut(
    monkeypatch: pytest.MonkeyPatch, before: float, after: float, reached: asyncio.Event
) -> None:
    """Make QmpDriver.cut slow before and/or after the real transaction."""
    real = QmpDriver.cut

    async def slow_cut(self: QmpDriver, prepared: PreparedCut) -> None:
        reached.set()
        await asyncio.sleep(before)
        await real(self, prepared)
        await asyncio.sleep(after)

    monkeypatch.setattr(QmpDriver, "cut", slow_cut)


async def _cancel_during_cut(rig: Rig, req: SnapshotRequest, reached: asyncio.Event) -> None:
    task = asyncio.create_task(Snapshotter(rig.catalog).snapshot("t", req))
    await asyncio.wait_for(reached.wait(), 30)
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("quiesce", [QuiescePolicy.REQUIRED, QuiescePolicy.OFF])
async def test_cancel_after_the_switch_keeps_and_records_the_cut(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, quiesce: QuiescePolicy
) -> None:
    reached = asyncio.Event()
    _wrap_cut(monkeypatch, before=0.0, after=30.0, reached=reached)
    before = await rig.images()
    await _cancel_during_cut(rig, SnapshotRequest(quiesce=quiesce), reached)
    after = await rig.images()
    assert after != before  # QEMU switched before the answer was awaited
    (rec,) = await rig.catalog.list_snapshots("t")
    assert rec.status is SnapshotStatus.FAILED
    assert "interrupted" in (rec.error or "")
    # The overlays the VM writes to now are recorded, not lost, and exist on disk.
    assert {d.device: d.overlay for d in rec.disks} == after
    assert {d.device: d.image for d in rec.disks} == before
    assert all(Path(f).is_file() for f in after.values())
    assert "cut_state" in [e.name for e in rec.timeline]
    assert not rig.agent.frozen
    assert await rig.catalog.open_intents("t") == []
    # Its images at the cut can be verified like those of a done snapshot.
    await verify_snapshot(rig.catalog, rec.id)
    assert (await rig.catalog.get_snapshot(rec.id)).verification is not None
    # The next snapshot continues the chain from it.
    monkeypatch.undo()
    nxt = await Snapshotter(rig.catalog).snapshot("t", SnapshotRequest(quiesce=quiesce))
    assert nxt.parent_id == rec.id


async def test_cancel_before_the_switch_deletes_the_overlays(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = asyncio.Event()
    _wrap_cut(monkeypatch, before=30.0, after=0.0, reached=reached)
    before, files = await rig.images(), rig.files()
    await _cancel_during_cut(rig, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED), reached)
    assert await rig.images() == before
    assert rig.files() == files
    (rec,) = await rig.catalog.list_snapshots("t")
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert not rig.agent.frozen


async def test_unconfirmed_thaw_is_flagged_on_a_done_record(rig: Rig) -> None:
    # The thaw gets no answer: the cut is good (taken frozen), but the guest may be frozen.
    rig.agent.behave("guest-fsfreeze-thaw", hang=True)  # no answer, no effect, nothing after
    rec = await Snapshotter(rig.catalog, thaw_timeout=1.0).snapshot(
        "t", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
    )
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM
    assert rec.thaw_unconfirmed
    assert "recover" in rec.level_reason
    assert rig.agent.frozen
    assert len(await rig.catalog.open_intents("t")) == 1


async def test_cli_exits_12_when_the_thaw_is_unconfirmed(rig: Rig, tmp_path: Path) -> None:
    rig.agent.behave("guest-fsfreeze-thaw", hang=True)  # no answer, no effect, nothing after
    proc = await _ff(tmp_path, "snapshot", "create", "t", "--quiesce", "required")
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 12, err.decode()
    assert "NOT confirmed" in err.decode()
    assert "freezeframe recover" in err.decode()
    shown = await _ff(tmp_path, "snapshot", "list", "--json")
    out, _ = await asyncio.wait_for(shown.communicate(), 60)
    assert [r["thaw_unconfirmed"] for r in json.loads(out)] == [True]


async def test_cancel_while_waiting_for_the_lock_leaves_no_lock(rig: Rig, tmp_path: Path) -> None:
    # Another process holds SQLite's write lock: acquiring the VM lock waits (busy timeout).
    blocker = sqlite3.connect(tmp_path / "cat.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(Snapshotter(rig.catalog).snapshot("t"))
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.sleep(0.3)
    blocker.execute("COMMIT")  # now the waiting write goes through, after the cancellation
    blocker.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The lock it may have taken is released: the next snapshot runs.
    rec = await Snapshotter(rig.catalog).snapshot("t")
    assert rec.status is SnapshotStatus.DONE
    assert await rig.catalog.list_snapshots("t") == [rec]


Hook = Callable[[str, HypervisorDriver], Awaitable[None]]


def _hooks(calls: list[str]) -> tuple[Hook, Hook]:
    async def before(vm: str, driver: HypervisorDriver) -> None:
        calls.append("before")

    async def after(vm: str, driver: HypervisorDriver) -> None:
        calls.append("after")

    return before, after


async def test_after_thaw_runs_when_the_intent_cannot_be_written(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any) -> None:
        raise CatalogError("catalog x: database is full")

    monkeypatch.setattr(rig.catalog, "open_intent", broken)
    calls: list[str] = []
    before, after = _hooks(calls)
    snap = Snapshotter(rig.catalog, before_freeze=before, after_thaw=after)
    with pytest.raises(SnapshotFailedError, match="database is full"):
        await snap.snapshot("t", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert calls == ["before", "after"]
    assert "guest-fsfreeze-freeze" not in rig.agent.commands


async def test_after_thaw_runs_when_the_before_hook_fails(rig: Rig) -> None:
    calls: list[str] = []

    async def before(vm: str, driver: HypervisorDriver) -> None:
        calls.append("before")
        raise CatalogError("application did not quiesce")

    _, after = _hooks(calls)
    snap = Snapshotter(rig.catalog, before_freeze=before, after_thaw=after)
    with pytest.raises(SnapshotFailedError, match="did not quiesce"):
        await snap.snapshot("t", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert calls == ["before", "after"]
    assert not rig.agent.frozen


async def test_unverifiable_but_switched_cut_stays_done(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lost(self: QmpDriver, prepared: PreparedCut) -> None:
        raise HypervisorUnavailableError("QMP connection lost")

    monkeypatch.setattr(QmpDriver, "verify_cut", lost)
    rec = await Snapshotter(rig.catalog).snapshot(
        "t", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
    )
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM
    assert "could not be verified" in rec.level_reason
    assert {d.device: d.overlay for d in rec.disks} == await rig.images()


# ---------------------------------------------------------------------------- a process dies


def _dead_owner() -> str:
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


async def _left_running(
    rig: Rig, *, cut: bool, recorded: bool = True
) -> tuple[str, dict[str, str]]:
    """What a process killed after preparing (and, with ``cut``, after cutting) leaves: a
    running record holding the prepared disks, and its VM lock. Returns (id, images before)."""
    before = await rig.images()
    sid = "dead0000" + ("c" if cut else "p")
    async with QmpDriver.from_config(rig.cfg) as driver:
        prepared = await driver.prepare_cut(sid, await driver.disks())
        if cut:
            await driver.cut(prepared)
    rec = SnapshotRecord(
        id=sid,
        vm="t",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
        disks=_snapshot_disks(prepared) if recorded else (),
    )
    await rig.catalog.begin_snapshot(rec)
    await rig.catalog.acquire_vm_lock("t", _dead_owner())
    return sid, before


async def test_recover_deletes_overlays_a_dead_process_prepared(rig: Rig) -> None:
    files = rig.files()
    sid, before = await _left_running(rig, cut=False)
    assert rig.files() != files  # the overlays exist
    (out,) = await recover(rig.catalog)
    assert (out.intent_id, out.snapshot_id, out.failed) == (None, sid, False)
    assert "removed" in out.detail
    assert rig.files() == files
    assert await rig.images() == before
    nodes = await rig.vm.query("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    assert not [n for n in nodes if str(n["node-name"]).startswith("ff-")]
    rec = await rig.catalog.get_snapshot(sid)
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()
    assert "died" in (rec.error or "")


async def test_recover_finds_overlays_a_dead_process_made_but_never_recorded(rig: Rig) -> None:
    # Killed in the few ms between creating the overlays and storing them on its record.
    files = rig.files()
    sid, before = await _left_running(rig, cut=False, recorded=False)
    assert rig.files() != files
    (out,) = await recover(rig.catalog)
    assert "removed" in out.detail
    assert rig.files() == files
    assert await rig.images() == before
    nodes = await rig.vm.query("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    assert not [n for n in nodes if str(n["node-name"]).startswith("ff-")]
    assert (await rig.catalog.get_snapshot(sid)).status is SnapshotStatus.FAILED


async def test_recover_keeps_and_records_overlays_of_a_dead_process_cut(rig: Rig) -> None:
    sid, before = await _left_running(rig, cut=True)
    (out,) = await recover(rig.catalog)
    assert "switched" in out.detail
    rec = await rig.catalog.get_snapshot(sid)
    assert rec.status is SnapshotStatus.FAILED
    now = await rig.images()
    assert {d.device: d.overlay for d in rec.disks} == now != before
    assert all(Path(f).is_file() for f in now.values())
    nxt = await Snapshotter(rig.catalog).snapshot("t")  # the lock was taken over and freed
    assert nxt.parent_id == sid


async def test_kill_9_while_frozen_then_recover_leaves_nothing(rig: Rig, tmp_path: Path) -> None:
    files, before = rig.files(), await rig.images()
    proc = await _ff(
        tmp_path, "snapshot", "create", "t", "--hold-frozen", "20", "--freeze-timeout", "30"
    )
    try:
        await rig.agent.wait_for("guest-fsfreeze-freeze", timeout=60)
        await asyncio.sleep(0.3)
        assert rig.agent.frozen
    finally:
        proc.kill()  # SIGKILL: no cleanup at all
        await proc.wait()
    await rig.agent.disconnect()
    out = await recover(rig.catalog)
    assert [(o.thawed, o.failed) for o in out] == [(True, False)]
    assert "removed" in out[0].detail
    assert not rig.agent.frozen
    assert rig.files() == files
    assert await rig.images() == before
    (rec,) = await rig.catalog.list_snapshots("t")
    assert rec.status is SnapshotStatus.FAILED
    names = [e.name for e in rec.timeline]
    for step in ("started", "planned", "prepared", "thaw_confirmed", "recovered"):
        assert step in names, names  # the story up to the kill is kept
    assert await rig.catalog.open_intents() == []


async def test_a_failing_checkpoint_still_removes_the_prepared_overlays(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, before = rig.files(), await rig.images()
    real = rig.catalog.finish_snapshot
    calls = 0

    async def flaky(rec: SnapshotRecord) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the checkpoint right after prepare_cut
            raise CatalogError("catalog x: database is locked")
        await real(rec)

    monkeypatch.setattr(rig.catalog, "finish_snapshot", flaky)
    with pytest.raises(SnapshotFailedError, match="database is locked"):
        await Snapshotter(rig.catalog).snapshot("t")
    assert rig.files() == files
    assert await rig.images() == before
    nodes = await rig.vm.query("query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    assert not [n for n in nodes if str(n["node-name"]).startswith("ff-")]


async def test_abort_never_deletes_a_file_a_disk_uses(rig: Rig) -> None:
    # A preparation whose node QEMU does not know (a restarted VM) but whose file a disk now
    # runs on: aborting it must keep the file.
    before = await rig.images()
    used = before["disk0"]
    async with QmpDriver.from_config(rig.cfg) as driver:
        (disk, *_) = await driver.disks()
        stale = PreparedCut("gone", (PreparedDisk(disk, used, "ff-gone-disk0", used),))
        await driver.abort(stale)
    assert Path(used).is_file()
    assert await rig.images() == before


@pytest.mark.parametrize("cut", [False, True])
async def test_recover_settles_a_cut_whose_outcome_was_unknown(rig: Rig, cut: bool) -> None:
    # QEMU hung during the cut: the attempt failed with its overlays kept, "outcome unknown".
    # Once QEMU answers again, recover settles it either way.
    files = rig.files()
    sid, before = await _left_running(rig, cut=cut)
    rec = await rig.catalog.get_snapshot(sid)
    ev = TimelineEvent("cut_state", datetime.now(UTC), 0, "unknown")
    await rig.catalog.finish_snapshot(
        replace(
            rec, status=SnapshotStatus.FAILED, error="the cut's outcome is unknown", timeline=(ev,)
        )
    )
    await rig.catalog.release_vm_lock("t", (await rig.catalog.vm_lock_holder("t") or ("",))[0])
    (out,) = await recover(rig.catalog)
    after = await rig.catalog.get_snapshot(sid)
    if cut:
        assert "did happen" in out.detail
        assert {d.device: d.overlay for d in after.disks} == await rig.images()
    else:
        assert "did not happen" in out.detail
        assert after.disks == ()
        assert rig.files() == files
        assert await rig.images() == before
    assert "cut_settled" in [e.name for e in after.timeline]
    assert await recover(rig.catalog) == []  # settled once


async def test_a_guest_left_frozen_by_a_dead_snapshot_is_named(rig: Rig) -> None:
    rig.agent.frozen = True
    rig.agent.frozen_mounts = ["/mnt/disk0", "/mnt/disk1"]
    intent = await rig.catalog.open_intent("t", "old-snap", rig.agent.path, _dead_owner())
    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(rig.catalog).snapshot(
            "t", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
        )
    msg = ei.value.message
    assert "old-snap" in msg
    assert f"freeze intent {intent.id}" in msg
    assert "gone" in msg
    assert "recover t first" in msg
    assert "guest-fsfreeze-thaw" not in rig.agent.commands


async def test_recover_leaves_a_record_for_later_while_qemu_is_hung(rig: Rig) -> None:
    files = rig.files()
    sid, _ = await _left_running(rig, cut=False)
    pid = rig.vm.proc.pid
    os.kill(pid, signal.SIGSTOP)  # QEMU hung: it cannot tell whether the disks switched
    try:
        (out,) = await recover(rig.catalog, timeout=1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "recover again later" in out.detail
    assert (await rig.catalog.get_snapshot(sid)).status is SnapshotStatus.RUNNING
    assert rig.files() != files  # nothing deleted on a guess
    (out,) = await recover(rig.catalog)  # QEMU answers again: settled now
    assert "removed" in out.detail
    assert rig.files() == files
    assert (await rig.catalog.get_snapshot(sid)).status is SnapshotStatus.FAILED


async def test_a_stopped_qemu_is_named_as_such(rig: Rig) -> None:
    pid = rig.vm.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(HypervisorUnavailableError, match=f"QEMU \\(pid {pid}\\).*is stopped"):
            async with QmpDriver.from_config(rig.cfg):
                pass
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_ctrl_c_says_which_attempt_and_what_it_left(rig: Rig, tmp_path: Path) -> None:
    proc = await _ff(
        tmp_path, "snapshot", "create", "t", "--hold-frozen", "20", "--freeze-timeout", "30"
    )
    await rig.agent.wait_for("guest-fsfreeze-freeze", timeout=60)
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130
    (rec,) = await rig.catalog.list_snapshots("t")
    text = err.decode()
    assert f"snapshot {rec.id} of t: failed: interrupted" in text
    assert "thawed (confirmed)" in text
    assert not rig.agent.frozen
