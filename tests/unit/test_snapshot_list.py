"""The snapshot list: the catalog's summary query (both backends), the service's pages of
summaries, their one JSON shape for the API and ``snapshot list --json``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from tests.conftest import CatalogDb
from tests.unit.conftest import Ff

from freezeframe.catalog import Catalog
from freezeframe.errors import NotFoundError, UsageError
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    SnapshotSummary,
    TimelineEvent,
    Verification,
    VerifyVerdict,
    VmConfig,
)
from freezeframe.service import Config, Service, summary_document, to_document

T0 = datetime(2026, 5, 1, 8, 0, 0, 250000, tzinfo=UTC)


def _disk(i: int) -> SnapshotDisk:
    return SnapshotDisk(
        device=f"disk{i}",
        node=f"#n{i}",
        image=f"/img/disk{i}.qcow2",
        format="qcow2",
        overlay=f"/img/disk{i}.s.qcow2",
        backend="qcow2-external",
        virtual_size=1 << 30,
    )


def _fs(i: int, frozen: bool) -> SnapshotFilesystem:
    return SnapshotFilesystem(f"/mnt/d{i}", "ext4", f"disk{i}", frozen, "" if frozen else "no")


def _steps(*names: str) -> tuple[TimelineEvent, ...]:
    return tuple(
        TimelineEvent(n, T0 + timedelta(milliseconds=i), i, "") for i, n in enumerate(names)
    )


def _records() -> list[SnapshotRecord]:
    """Records that differ in every field a summary shows, including the timeline flags in
    both states (still set, and cleared by a later ``thaw_confirmed``) and ties on
    ``created_at`` (broken by id)."""
    base = SnapshotRecord(
        id="",
        vm="web",
        created_at=T0,
        status=SnapshotStatus.DONE,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.FILESYSTEM,
    )
    verified = Verification(VerifyVerdict.NEEDS_RECOVERY, T0 + timedelta(hours=1))
    return [
        replace(base, id="a-plain"),
        replace(
            base,
            id="b-full",
            created_at=T0 + timedelta(seconds=1),
            parent_id="a-plain",
            disks=(_disk(0), _disk(1), _disk(2)),
            filesystems=(_fs(0, True), _fs(1, False), _fs(2, True)),
            timeline=_steps("started", "frozen", "cut", "thawed"),
            freeze_window_ms=93.5,
            verification=verified,
        ),
        replace(
            base,
            id="c-unconfirmed",
            created_at=T0 + timedelta(seconds=1),  # same instant as b-full: id decides
            vm="db",
            status=SnapshotStatus.FAILED,
            level=ConsistencyLevel.NONE,
            error="the thaw was not confirmed",
            timeline=_steps("started", "thaw_confirmed", "thaw_unconfirmed"),
        ),
        replace(
            base,
            id="d-confirmed-later",
            created_at=T0 + timedelta(seconds=2),
            policy=QuiescePolicy.PREFERRED,
            level=ConsistencyLevel.CRASH,
            timeline=_steps("thaw_unconfirmed", "intent_left_open", "thaw_confirmed"),
        ),
        replace(
            base,
            id="e-left-open",
            created_at=T0 + timedelta(seconds=3),
            vm="db",
            policy=QuiescePolicy.OFF,
            level=ConsistencyLevel.CRASH,
            disks=(_disk(0),),
            timeline=_steps("cut", "intent_left_open"),
        ),
        replace(
            base,
            id="f-running",
            created_at=T0 + timedelta(seconds=4),
            status=SnapshotStatus.RUNNING,
            level=ConsistencyLevel.NONE,
        ),
    ]


def _expected(rec: SnapshotRecord) -> SnapshotSummary:
    """The summary of ``rec`` as the definition says (from the whole record)."""
    v = rec.verification
    return SnapshotSummary(
        id=rec.id,
        vm=rec.vm,
        created_at=rec.created_at,
        status=rec.status,
        policy=rec.policy,
        level=rec.level,
        error=rec.error,
        parent_id=rec.parent_id,
        freeze_window_ms=rec.freeze_window_ms,
        disk_count=len(rec.disks),
        filesystem_count=len(rec.filesystems),
        frozen_count=sum(f.frozen for f in rec.filesystems),
        verdict=None if v is None else v.verdict,
        verified_at=None if v is None else v.checked_at,
        thaw_unconfirmed=rec.thaw_unconfirmed,
        intent_left_open=rec.intent_left_open,
    )


async def _store(cat: Catalog, records: list[SnapshotRecord]) -> None:
    for rec in records:
        await cat.begin_snapshot(replace(rec, status=SnapshotStatus.RUNNING, verification=None))
        if rec.status is not SnapshotStatus.RUNNING or rec.timeline:
            await cat.finish_snapshot(rec)


@pytest.fixture
async def cat(catalog_db: CatalogDb) -> AsyncIterator[Catalog]:
    catalog = await Catalog.open(catalog_db.url)
    try:
        await _store(catalog, _records())
        yield catalog
    finally:
        await catalog.close()


async def test_a_summary_says_what_the_whole_record_says(cat: Catalog) -> None:
    summaries = await cat.list_snapshot_summaries()
    records = [await cat.get_snapshot(s.id) for s in summaries]
    assert summaries == [_expected(r) for r in records]
    by_id = {s.id: s for s in summaries}
    # the cases are what they claim to be (so the comparison above covers them)
    assert by_id["b-full"].disk_count == 3
    assert (by_id["b-full"].filesystem_count, by_id["b-full"].frozen_count) == (3, 2)
    assert by_id["b-full"].verdict is VerifyVerdict.NEEDS_RECOVERY
    assert by_id["b-full"].verified_at == T0 + timedelta(hours=1)
    assert by_id["c-unconfirmed"].thaw_unconfirmed
    assert not by_id["d-confirmed-later"].thaw_unconfirmed
    assert not by_id["d-confirmed-later"].intent_left_open
    assert by_id["e-left-open"].intent_left_open
    assert by_id["c-unconfirmed"].error == "the thaw was not confirmed"
    assert by_id["f-running"].status is SnapshotStatus.RUNNING


async def test_summaries_page_in_the_records_order(cat: Catalog) -> None:
    for vm in (None, "web", "db"):
        for newest_first in (False, True):
            want = [r.id for r in await cat.list_snapshots_page(vm, newest_first=newest_first)]
            got: list[str] = []
            after = None
            while True:
                page = await cat.list_snapshot_summaries(
                    vm, limit=2, after=after, newest_first=newest_first
                )
                got += [s.id for s in page]
                if len(page) < 2:
                    break
                after = (page[-1].created_at, page[-1].id)
            assert got == want, (vm, newest_first)
    everything = [s.id for s in await cat.list_snapshot_summaries()]
    assert everything == ["a-plain", "b-full", "c-unconfirmed", "d-confirmed-later",
                          "e-left-open", "f-running"]  # fmt: skip
    failed = await cat.list_snapshot_summaries(status=SnapshotStatus.FAILED)
    assert [s.id for s in failed] == ["c-unconfirmed"]
    newest_db = await cat.list_snapshot_summaries("db", limit=1, newest_first=True)
    assert [s.id for s in newest_db] == ["e-left-open"]


async def test_a_summary_follows_its_record(cat: Catalog) -> None:
    """A verification set later, a record deleted: the next list shows it."""
    await cat.set_verification("a-plain", Verification(VerifyVerdict.CONSISTENT, T0))
    await cat.delete_snapshot("b-full")
    by_id = {s.id: s for s in await cat.list_snapshot_summaries()}
    assert by_id["a-plain"].verdict is VerifyVerdict.CONSISTENT
    assert "b-full" not in by_id


def test_summary_document_is_the_summarys_fields() -> None:
    """The hand-written serializer has every field, named as the dataclass names it, with the
    value the generic serializer gives (a field added later must be added there too)."""
    for rec in _records():
        s = _expected(replace(rec, verification=Verification(VerifyVerdict.CORRUPT, T0)))
        generic = {f.name: to_document(getattr(s, f.name)) for f in dataclasses.fields(s)}
        assert summary_document(s) == generic
        assert to_document(s) == generic
        json.dumps(summary_document(s))


@pytest.fixture
async def svc(catalog_db: CatalogDb, tmp_path: Path) -> AsyncIterator[Service]:
    async with await Service.open(
        Config(state_dir=tmp_path, database_url=catalog_db.url)
    ) as service:
        cat = await service.catalog()
        await cat.add_vm(VmConfig("web", driver="fake", domain="web"))
        await _store(cat, _records())
        yield service


async def test_the_service_lists_summaries_in_pages(svc: Service) -> None:
    first = await svc.list_snapshots(limit=4, newest_first=True)
    assert all(isinstance(s, SnapshotSummary) for s in first.items)
    assert [s.id for s in first.items] == ["f-running", "e-left-open", "d-confirmed-later",
                                           "c-unconfirmed"]  # fmt: skip
    assert first.next_cursor is not None
    second = await svc.list_snapshots(limit=4, newest_first=True, cursor=first.next_cursor)
    assert [s.id for s in second.items] == ["b-full", "a-plain"]
    assert second.next_cursor is None
    db = await svc.list_snapshots("db")  # not registered, but has records
    assert [s.id for s in db.items] == ["c-unconfirmed", "e-left-open"]
    with pytest.raises(NotFoundError) as nf:
        await svc.list_snapshots("never-was")
    assert nf.value.code == "vm-not-found"
    with pytest.raises(UsageError) as bad:
        await svc.list_snapshots(limit=1001)
    assert bad.value.code == "bad-limit"
    with pytest.raises(UsageError) as bad:
        await svc.list_snapshots(cursor="@@")
    assert bad.value.code == "bad-cursor"


@pytest.mark.sqlite_only
async def test_the_api_and_the_cli_list_the_same_documents(
    svc: Service, catalog_db: CatalogDb, ff: Ff, tmp_path: Path
) -> None:
    from freezeframe.api import create_app

    app = create_app(svc, token="t" * 32, dashboard=False)
    transport = httpx.ASGITransport(app=app)
    auth = {"Authorization": "Bearer " + "t" * 32}
    async with httpx.AsyncClient(transport=transport, base_url="http://ff") as client:
        r = await client.get("/v1/snapshots?order=oldest&limit=1000", headers=auth)
        assert r.status_code == 200, r.text
        api = r.json()["items"]
        r = await client.get("/v1/vms/db/snapshots?order=oldest", headers=auth)
        api_db = r.json()["items"]
    cli = ff("--database-url", catalog_db.url, "snapshot", "list", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == api
    cli_db = ff("--database-url", catalog_db.url, "snapshot", "list", "db", "--json")
    assert json.loads(cli_db.stdout) == api_db == [d for d in api if d["vm"] == "db"]
    full = next(d for d in api if d["id"] == "b-full")
    assert "disks" not in full
    assert "timeline" not in full
    assert (full["disk_count"], full["frozen_count"], full["verdict"]) == (3, 2, "needs-recovery")
