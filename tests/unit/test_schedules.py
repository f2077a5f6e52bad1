"""Schedules and retention end to end on the fakes, once per catalog backend: the catalog's
``schedules`` table (set/get/list/remove, the claim of a run from several catalogs and
processes), ``Service.prune`` (a decision with a reason code per snapshot, refusals reported
per snapshot) and the :class:`~freezeframe.service.Scheduler` (due runs, a missed run once,
two servers on one catalog, stop)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog, make_owner
from freezeframe.cli.main import main
from freezeframe.engine.images import BootImage
from freezeframe.errors import BusyError, NotFoundError, UsageError
from freezeframe.models import QuiescePolicy, ScheduleRecord, SnapshotStatus
from freezeframe.service import (
    Config,
    CreateSnapshot,
    PruneReport,
    Scheduler,
    ScheduleSpec,
    ScheduleView,
    Service,
    SnapshotJob,
    to_document,
)
from freezeframe.testing import FakeHost, FakeVm

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture
async def svc(catalog_db: CatalogDb, tmp_path: Path) -> AsyncIterator[Service]:
    cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
    async with await Service.open(cfg) as s:
        yield s


async def _vm(svc: Service, host: FakeHost, name: str = "web1") -> FakeVm:
    vm = host.add(FakeVm.simple(name, ("ext4",)))
    await (await svc.catalog()).add_vm(vm.config())
    return vm


# ---------------------------------------------------------------------------- the catalog


async def test_catalog_set_get_list_remove(catalog: Catalog, host: FakeHost) -> None:
    with pytest.raises(NotFoundError) as err:
        await catalog.set_schedule(ScheduleRecord("ghost", 60))
    assert err.value.code == "vm-not-found"
    for name in ("b", "a"):
        await catalog.add_vm(host.add(FakeVm.simple(name, ("ext4",))).config())
    rec = await catalog.set_schedule(
        ScheduleRecord("b", 3600, keep_last=3, keep_daily=7, quiesce=QuiescePolicy.REQUIRED)
    )
    assert (rec.every_s, rec.keep_last, rec.keep_daily, rec.keep_hourly) == (3600, 3, 7, None)
    assert rec.quiesce is QuiescePolicy.REQUIRED
    assert rec.enabled
    assert rec.created_at is not None
    assert rec.created_at.tzinfo is not None
    assert rec.last_run_at is None
    await catalog.set_schedule(ScheduleRecord("a", 60))
    assert [s.vm for s in await catalog.list_schedules()] == ["a", "b"]
    # a replace keeps the last run (a changed schedule is not due at once)
    claimed = await catalog.claim_schedule_run("b", None, T0, "me")
    assert claimed is not None
    assert claimed.last_run_at == T0
    assert claimed.run_owner == "me"
    again = await catalog.set_schedule(ScheduleRecord("b", 60, keep_last=1))
    assert (again.every_s, again.keep_last, again.keep_daily) == (60, 1, None)
    assert again.last_run_at == T0
    await catalog.remove_schedule("a")
    with pytest.raises(NotFoundError) as err:
        await catalog.get_schedule("a")
    assert err.value.code == "schedule-not-found"
    with pytest.raises(NotFoundError) as err:
        await catalog.remove_schedule("a")
    assert err.value.code == "schedule-not-found"
    # forgetting the VM forgets its schedule
    await catalog.remove_vm("b")
    assert await catalog.list_schedules() == []


async def test_claim_is_a_compare_and_set(catalog: Catalog, host: FakeHost) -> None:
    await catalog.add_vm(host.add(FakeVm.simple("web", ("ext4",))).config())
    await catalog.set_schedule(ScheduleRecord("web", 60))
    first = await catalog.claim_schedule_run("web", None, T0, "p1")
    assert first is not None
    # a second claimer that read the schedule before the first claim loses
    assert await catalog.claim_schedule_run("web", None, T0, "p2") is None
    # the next slot is claimed from what the first claim wrote
    later = T0 + timedelta(minutes=1)
    assert await catalog.claim_schedule_run("web", T0 + timedelta(seconds=1), later, "p2") is None
    second = await catalog.claim_schedule_run("web", T0, later, "p2")
    assert second is not None
    assert second.run_owner == "p2"
    # the first run's late result does not overwrite the second claim's fields
    stale = await catalog.record_schedule_run("web", "p1", T0, snapshot_id="x", outcome="done")
    assert stale is False
    ok = await catalog.record_schedule_run(
        "web", "p2", later, snapshot_id="s2", outcome="done", prune="deleted 0, kept 2"
    )
    assert ok is True
    rec = await catalog.get_schedule("web")
    assert (rec.last_snapshot, rec.last_outcome, rec.last_prune) == (
        "s2",
        "done",
        "deleted 0, kept 2",
    )
    assert rec.last_finished_at is not None
    # a disabled schedule is never claimed
    await catalog.set_schedule(ScheduleRecord("web", 60, enabled=False))
    assert await catalog.claim_schedule_run("web", later, later + timedelta(hours=1), "p3") is None


async def test_two_catalogs_racing_for_one_slot(catalog_db: CatalogDb, host: FakeHost) -> None:
    cats = [await Catalog.open(catalog_db.url) for _ in range(4)]
    try:
        await cats[0].add_vm(host.add(FakeVm.simple("web", ("ext4",))).config())
        await cats[0].set_schedule(ScheduleRecord("web", 60))
        seen: datetime | None = None
        for rnd in range(10):
            now = T0 + timedelta(minutes=rnd)
            won = await asyncio.gather(
                *(c.claim_schedule_run("web", seen, now, f"c{i}") for i, c in enumerate(cats))
            )
            assert sum(w is not None for w in won) == 1, (rnd, won)
            seen = now
    finally:
        for c in cats:
            await c.close()


def _claim_in_child(url: str, seen: str | None, now: str, barrier: Any, results: Any) -> None:
    async def main() -> None:
        cat = await Catalog.open(url)
        try:
            await asyncio.to_thread(barrier.wait, 60)
            got = await cat.claim_schedule_run(
                "web",
                None if seen is None else datetime.fromisoformat(seen),
                datetime.fromisoformat(now),
                make_owner(),
            )
            results.put(("won" if got is not None else "lost", make_owner()))
        finally:
            await cat.close()

    try:
        asyncio.run(main())
    except Exception as exc:
        results.put(("error", repr(exc)))


async def test_processes_racing_for_one_slot(catalog_db: CatalogDb, host: FakeHost) -> None:
    cat = await Catalog.open(catalog_db.url)
    try:
        await cat.add_vm(host.add(FakeVm.simple("web", ("ext4",))).config())
        await cat.set_schedule(ScheduleRecord("web", 60))
        await cat.claim_schedule_run("web", None, T0, "earlier")
    finally:
        await cat.close()
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    now = (T0 + timedelta(minutes=1)).isoformat()
    procs = [
        ctx.Process(
            target=_claim_in_child, args=(catalog_db.url, T0.isoformat(), now, barrier, results)
        )
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        out = [await asyncio.to_thread(results.get, True, 120) for _ in range(n)]
    finally:
        for p in procs:
            await asyncio.to_thread(p.join, 30)
            if p.is_alive():
                p.kill()
    assert not [o for o in out if o[0] == "error"], out
    assert sum(o[0] == "won" for o in out) == 1, out
    cat = await Catalog.open(catalog_db.url)
    try:
        rec = await cat.get_schedule("web")
        winner = next(o[1] for o in out if o[0] == "won")
        assert rec.run_owner == winner
        assert rec.last_run_at == T0 + timedelta(minutes=1)
    finally:
        await cat.close()


# ---------------------------------------------------------------------------- the service


async def test_set_schedule_validates(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host)
    for every in ("0s", "soon", "1.5h", ""):
        with pytest.raises(UsageError) as err:
            await svc.set_schedule("web1", ScheduleSpec(every))
        assert err.value.code == "invalid-interval", every
    with pytest.raises(UsageError) as err:
        await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=-1))
    assert err.value.code == "invalid-keep-rule"
    with pytest.raises(NotFoundError) as err:
        await svc.set_schedule("nope", ScheduleSpec("1h"))
    assert err.value.code == "vm-not-found"
    view = await svc.set_schedule("web1", ScheduleSpec("1h30m", keep_last=3, keep_weekly=2))
    assert view.every == "1h30m"
    assert view.schedule.every_s == 5400
    assert view.rules == {"keep-last": 3, "keep-weekly": 2}
    assert view.due
    assert not view.running
    doc = to_document(view)
    assert doc["schedule"]["vm"] == "web1"
    assert doc["rules"] == {"keep-last": 3, "keep-weekly": 2}
    assert [v.schedule.vm for v in await svc.list_schedules()] == ["web1"]
    await svc.remove_schedule("web1")
    with pytest.raises(NotFoundError) as err:
        await svc.get_schedule("web1")
    assert err.value.code == "schedule-not-found"


async def _snapshots(svc: Service, vm: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        out = await svc.create_snapshot(vm, CreateSnapshot(quiesce=QuiescePolicy.PREFERRED))
        ids.append(out.record.id)
    return ids


async def _done_ids(svc: Service, vm: str) -> set[str]:
    page = await svc.list_snapshots(vm, status=SnapshotStatus.DONE)
    return {s.id for s in page.items}


async def test_prune_dry_run_then_for_real(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host)
    ids = await _snapshots(svc, "web1", 5)
    await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=2))
    dry = await svc.prune("web1", dry_run=True)
    assert dry.dry_run
    assert dry.code == "done"
    assert dry.rules == {"web1": {"keep-last": 2}}
    reasons = {i.id: (i.keep, i.reason) for i in dry.items}
    assert reasons == {
        ids[0]: (False, "not-selected"),
        ids[1]: (False, "not-selected"),
        ids[2]: (False, "not-selected"),
        ids[3]: (True, "keep-last"),
        ids[4]: (True, "keep-last"),
    }
    assert [i.id for i in dry.items] == ids  # oldest first
    assert await _done_ids(svc, "web1") == set(ids)  # a dry run deletes nothing
    assert dry.summary() == "would delete 3, kept 2"

    real = await svc.prune("web1")
    pruned = {i.id for i in real.items if not i.keep or i.refused}
    assert pruned == set(ids[:3])
    for item in real.items:
        if item.id in ids[3:]:
            assert item.keep
            assert item.reason == "keep-last"
            assert not item.deleted
        elif item.deleted:
            assert not item.keep
            assert item.reason == "not-selected"
            assert item.refused is None
        else:  # the delete was refused: kept, because <code>
            assert item.keep
            assert item.refused
            assert item.reason == item.refused
            assert "not-selected" in item.detail
    left = await _done_ids(svc, "web1")
    assert left == set(ids[3:]) | {i.id for i in real.items if i.refused}
    assert real.code == ("delete-refused" if real.refused else "done")


async def test_a_refused_delete_is_reported_and_the_prune_goes_on(
    svc: Service, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _vm(svc, host)
    ids = await _snapshots(svc, "web1", 4)
    await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=1))
    calls: list[str] = []

    async def delete(snapshot_id: str) -> Any:
        calls.append(snapshot_id)
        if snapshot_id == ids[1]:
            raise BusyError("a verification holds it", code="snapshot-in-use")
        if snapshot_id == ids[2]:
            raise UsageError("needs a merge", code="layer-shared")
        return await (await svc.catalog()).delete_snapshot(snapshot_id)

    monkeypatch.setattr(svc, "delete_snapshot", delete)
    report = await svc.prune("web1")
    assert calls == ids[:3]  # every pruned one was tried, oldest first
    got = {i.id: (i.keep, i.reason, i.deleted, i.refused) for i in report.items}
    assert got == {
        ids[0]: (False, "not-selected", True, None),
        ids[1]: (True, "snapshot-in-use", False, "snapshot-in-use"),
        ids[2]: (True, "layer-shared", False, "layer-shared"),
        ids[3]: (True, "keep-last", False, None),
    }
    assert report.code == "delete-refused"
    assert report.summary() == ("deleted 1, kept 3, refused 2 (layer-shared, snapshot-in-use)")
    doc = to_document(report)
    assert doc["code"] == "delete-refused"
    assert doc["items"][1]["refused"] == "snapshot-in-use"


async def test_prune_never_deletes_the_snapshot_a_disk_writes_to(
    svc: Service, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _vm(svc, host)
    ids = await _snapshots(svc, "web1", 3)
    await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=1))

    async def images(vm: str) -> list[BootImage]:
        # QEMU was restarted on the oldest snapshot's image by hand
        return [BootImage("disk0", "x", ids[2], "/img/at-cut", False, "asked", (ids[0],))]

    monkeypatch.setattr(svc, "vm_images", images)
    report = await svc.prune("web1", dry_run=True)
    first = report.items[0]
    assert (first.id, first.keep, first.reason) == (ids[0], True, "in-use")
    assert "disk0 runs on its image /img/at-cut" in first.detail
    assert "not-selected" in first.detail
    assert (report.items[1].keep, report.items[1].reason) == (False, "not-selected")


async def test_prune_without_schedule(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host)
    with pytest.raises(NotFoundError) as err:
        await svc.prune("web1")
    assert err.value.code == "schedule-not-found"
    empty = await svc.prune()  # no schedules at all: nothing to do
    assert empty == PruneReport("done", False, {}, ())


# ---------------------------------------------------------------------------- the scheduler


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_scheduler_runs_due_schedules_once_per_slot(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host)
    await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=2))
    clock = Clock(T0)
    sched = Scheduler(svc, clock=clock, poll=120)
    delay = await sched.tick()  # never run: due now
    assert sched.runs_started == 1
    assert delay == 120  # capped by poll
    await sched.wait()
    rec = (await svc.get_schedule("web1")).schedule
    assert rec.last_run_at == T0
    assert rec.last_outcome == "done"
    assert rec.last_snapshot in await _done_ids(svc, "web1")
    assert rec.last_prune == "deleted 0, kept 1"
    clock.now = T0 + timedelta(minutes=59)
    assert await sched.tick() == pytest.approx(60)  # not due: sleeps until it is (1 min)
    assert sched.runs_started == 1
    # down for five hours: ONE run at start, not five
    clock.now = T0 + timedelta(hours=5, minutes=3)
    await sched.tick()
    await sched.wait()
    await sched.tick()
    await sched.wait()
    assert sched.runs_started == 2
    rec = (await svc.get_schedule("web1")).schedule
    assert rec.last_run_at == clock.now
    view = ScheduleView.of(rec, clock.now)
    assert view.next_run_at == clock.now + timedelta(hours=1)
    assert not view.due
    assert len(await _done_ids(svc, "web1")) == 2


async def test_two_schedulers_on_one_catalog_run_a_slot_once(
    catalog_db: CatalogDb, tmp_path: Path, host: FakeHost
) -> None:
    cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
    async with await Service.open(cfg) as a, await Service.open(cfg) as b:
        await _vm(a, host)
        await a.set_schedule("web1", ScheduleSpec("1h"))
        clock = Clock(T0)
        sa, sb = Scheduler(a, clock=clock), Scheduler(b, clock=clock)
        for hour in range(3):
            clock.now = T0 + timedelta(hours=hour, seconds=1)
            await asyncio.gather(sa.tick(), sb.tick())
            await asyncio.gather(sa.wait(), sb.wait())
        assert sa.runs_started + sb.runs_started == 3
        assert len(await _done_ids(a, "web1")) == 3


async def test_scheduler_records_a_refused_snapshot(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host)
    await svc.set_schedule("web1", ScheduleSpec("1h"))
    cat = await svc.catalog()
    await cat.acquire_vm_lock("web1", make_owner(), purpose="delete")  # the VM is busy
    sched = Scheduler(svc, clock=Clock(T0))
    await sched.tick()
    await sched.wait()
    rec = (await svc.get_schedule("web1")).schedule
    assert rec.last_outcome == "vm-busy"
    assert rec.last_snapshot is None
    assert rec.last_error
    assert "in progress" in rec.last_error


async def test_stop_lets_the_running_snapshot_finish_and_skips_the_prune(
    svc: Service, host: FakeHost
) -> None:
    await _vm(svc, host)
    await svc.set_schedule("web1", ScheduleSpec("1h", keep_last=1))
    started = asyncio.Event()

    async def start(vm: str, req: CreateSnapshot) -> SnapshotJob:
        held = CreateSnapshot(quiesce=req.quiesce, hold_frozen=0.5)
        job = await svc.start_snapshot(vm, held)
        started.set()
        return job

    sched = Scheduler(svc, start=start, poll=0.1)
    runner = asyncio.create_task(sched.run())
    await asyncio.wait_for(started.wait(), 10)
    sched.stop()
    await asyncio.wait_for(runner, 20)  # returns once the run under way ended
    rec = (await svc.get_schedule("web1")).schedule
    assert rec.last_outcome == "done"
    assert rec.last_prune == "skipped: the server is stopping"
    assert len(await _done_ids(svc, "web1")) == 1
    assert sched.runs_started == 1


async def test_a_run_that_overran_its_interval_is_followed_at_once(
    svc: Service, host: FakeHost
) -> None:
    await _vm(svc, host)
    await svc.set_schedule("web1", ScheduleSpec("1s"))

    async def slow(vm: str, req: CreateSnapshot) -> SnapshotJob:
        return await svc.start_snapshot(vm, CreateSnapshot(quiesce=req.quiesce, hold_frozen=1.5))

    sched = Scheduler(svc, start=slow, poll=60)  # only the end of a run can wake it early
    runner = asyncio.create_task(sched.run())
    await asyncio.sleep(4.5)
    sched.stop()
    await asyncio.wait_for(runner, 20)
    assert sched.runs_started >= 2


def test_a_claim_of_a_dead_process_is_not_shown_running() -> None:
    rec = ScheduleRecord("web1", 60, last_run_at=datetime.now(UTC), run_owner=make_owner())
    assert ScheduleView.of(rec).running
    host_name = make_owner().split(":")[0]
    dead = replace(rec, run_owner=f"{host_name}:4194303:0000")  # no such pid
    assert not ScheduleView.of(dead).running
    assert not ScheduleView.of(replace(rec, last_finished_at=datetime.now(UTC))).running


# ---------------------------------------------------------------------------- the CLI


def test_cli_schedule_and_prune(
    host: FakeHost,
    catalog_db: CatalogDb,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    vm = host.add(FakeVm.simple("web1", ("ext4",)))

    async def setup() -> list[str]:
        cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
        async with await Service.open(cfg) as s:
            await (await s.catalog()).add_vm(vm.config())
            return await _snapshots(s, "web1", 3)

    ids = asyncio.run(setup())

    def cli(*args: str) -> tuple[int, Any]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["freezeframe", "--database-url", catalog_db.url, *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr().out
        return code, json.loads(out) if "--json" in args else out

    code, doc = cli("schedule", "set", "web1", "--every", "1h", "--keep-last", "1", "--json")
    assert code == 0, doc
    assert doc["rules"] == {"keep-last": 1}
    assert doc["every"] == "1h"
    code, doc = cli("schedule", "set", "web1", "--every", "nope", "--json")
    assert code == 2
    assert doc["code"] == "invalid-interval"
    code, doc = cli("schedule", "list", "--json")
    assert code == 0
    assert [v["schedule"]["vm"] for v in doc] == ["web1"]
    code, text = cli("schedule", "list")
    assert code == 0
    assert "keep-last 1" in text
    assert "due now" in text
    code, doc = cli("snapshot", "prune", "web1", "--dry-run", "--json")
    assert code == 0
    assert [(i["id"], i["reason"]) for i in doc["items"]] == [
        (ids[0], "not-selected"),
        (ids[1], "not-selected"),
        (ids[2], "keep-last"),
    ]
    code, text = cli("snapshot", "prune", "--dry-run")
    assert code == 0
    assert f"{ids[0]}  web1" in text
    assert "would delete not-selected" in text
    code, doc = cli("snapshot", "prune", "--json")
    refused = [i for i in doc["items"] if i["refused"]]
    assert code == (20 if refused else 0)
    assert doc["code"] == ("delete-refused" if refused else "done")
    assert {i["id"] for i in doc["items"] if i["deleted"] or i["refused"]} == set(ids[:2])
    code, doc = cli("schedule", "remove", "web1", "--json")
    assert (code, doc) == (0, {"removed": "web1"})
    code, doc = cli("schedule", "remove", "web1", "--json")
    assert doc["code"] == "schedule-not-found"
    assert code != 0
