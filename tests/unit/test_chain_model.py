"""The catalog's chain model (revision 0009): image rows made when a snapshot is recorded,
moved by a merge in one transaction, filled in for existing catalogs by the migration, and
the holds and ``deleting`` state that keep a delete and a reader apart."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog
from freezeframe.catalog._catalog import _alembic_config
from freezeframe.errors import BusyError, UsageError
from freezeframe.models import (
    ChainImage,
    ConsistencyLevel,
    ImageFingerprint,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _rec(sid: str, n: int, image: str, overlay: str, status: SnapshotStatus) -> SnapshotRecord:
    return SnapshotRecord(
        id=sid,
        vm="web",
        created_at=T0 + timedelta(minutes=n),
        status=status,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.FILESYSTEM,
        parent_id=f"s{n}" if n > 0 else None,
        disks=(
            SnapshotDisk("vda", "n", image, "qcow2", overlay, image_mode=0o644),
            SnapshotDisk("vdb", "m", f"rbd:vol/web-b@ff-{sid}", "rbd", None, "rbd"),
        ),
    )


async def _store(cat: Catalog, n: int) -> list[SnapshotRecord]:
    """``n`` done snapshots of a chain base <- o1 <- ... <- on (active)."""
    files = ["/img/base.qcow2", *(f"/img/o{i}.qcow2" for i in range(1, n + 1))]
    recs = []
    for i in range(n):
        rec = _rec(f"s{i + 1}", i, files[i], files[i + 1], SnapshotStatus.RUNNING)
        await cat.begin_snapshot(rec)
        done = _rec(rec.id, i, files[i], files[i + 1], SnapshotStatus.DONE)
        await cat.finish_snapshot(done)
        recs.append(done)
    return recs


def _shape(rows: list[ChainImage]) -> list[tuple[str, str, str | None, bool, str | None]]:
    by_id = {r.id: r.location for r in rows}
    return sorted(
        (
            r.device,
            r.location,
            r.snapshot_id,
            r.active,
            by_id.get(r.backing_id) if r.backing_id is not None else None,
        )
        for r in rows
    )


async def test_rows_made_when_recorded(catalog: Catalog) -> None:
    await _store(catalog, 3)
    rows = await catalog.chain_images("web")
    assert _shape(rows) == [
        ("vda", "/img/base.qcow2", "s1", False, None),
        ("vda", "/img/o1.qcow2", "s2", False, "/img/base.qcow2"),
        ("vda", "/img/o2.qcow2", "s3", False, "/img/o1.qcow2"),
        ("vda", "/img/o3.qcow2", None, True, "/img/o2.qcow2"),
        ("vdb", "rbd:vol/web-b@ff-s1", "s1", False, None),
        ("vdb", "rbd:vol/web-b@ff-s2", "s2", False, None),
        ("vdb", "rbd:vol/web-b@ff-s3", "s3", False, None),
    ]


async def test_a_merge_moves_the_data_in_one_place(catalog: Catalog) -> None:
    await _store(catalog, 3)
    await catalog.begin_delete("s2")
    m = await catalog.open_merge(
        vm="web", snapshot_id="s2", device="vda", top="/img/o2.qcow2", base="/img/o1.qcow2",
        live=True,
    )  # fmt: skip
    assert [x.state for x in await catalog.open_merges("web")] == ["open"]
    fp = ImageFingerprint(size=10, mtime_ns=20, inode=30)
    await catalog.merge_done(m.id, fingerprint=fp, mode=0o640)
    s3 = await catalog.get_snapshot("s3")
    assert s3.disks[0].image == "/img/o1.qcow2"  # S3's data lives in S2's old file now
    assert (s3.disks[0].fingerprint, s3.disks[0].image_mode) == (fp, 0o640)
    await catalog.close_merge(m.id)
    await catalog.finish_delete("s2")
    assert (await catalog.get_snapshot("s3")).parent_id == "s1"  # S2's parent takes its place
    rows = await catalog.chain_images("web")
    vda = [r for r in _shape(rows) if r[0] == "vda"]
    assert vda == [
        ("vda", "/img/base.qcow2", "s1", False, None),
        ("vda", "/img/o1.qcow2", "s3", False, "/img/base.qcow2"),
        ("vda", "/img/o3.qcow2", None, True, "/img/o1.qcow2"),
    ]
    assert "rbd:vol/web-b@ff-s2" not in {r.location for r in rows}
    assert await catalog.open_merges("web") == []


async def test_holds_and_deleting_keep_readers_and_deletes_apart(catalog: Catalog) -> None:
    await _store(catalog, 2)
    async with catalog.hold_snapshot("s1", "verify"), catalog.hold_snapshot("s1", "export"):
        with pytest.raises(BusyError) as err:
            await catalog.begin_delete("s1")
        assert err.value.code == "snapshot-in-use"
    assert (await catalog.get_snapshot("s1")).status is SnapshotStatus.DONE
    await catalog.begin_delete("s1")
    assert (await catalog.get_snapshot("s1")).status is SnapshotStatus.DELETING
    with pytest.raises(BusyError) as err:
        async with catalog.hold_snapshot("s1", "export"):
            pass
    assert err.value.code == "snapshot-being-deleted"


async def test_a_hold_of_a_dead_process_does_not_block(
    catalog: Catalog, catalog_db: CatalogDb
) -> None:
    await _store(catalog, 1)
    engine = sa.create_engine(catalog_db.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO snapshot_holds (snapshot_id, purpose, owner, acquired_at) "
                    "VALUES ('s1', 'export', :owner, :at)"
                ),
                {"owner": f"{socket.gethostname()}:999999999:dead", "at": T0},
            )
    finally:
        engine.dispose()
    await catalog.begin_delete("s1")  # the dead export's hold is dropped


async def test_a_running_snapshot_cannot_be_deleted(catalog: Catalog) -> None:
    rec = _rec("r1", 0, "/img/base.qcow2", "/img/o1.qcow2", SnapshotStatus.RUNNING)
    await catalog.begin_snapshot(rec)
    with pytest.raises(UsageError) as err:
        await catalog.begin_delete("r1")
    assert err.value.code == "snapshot-running"


async def test_the_migration_fills_in_existing_catalogs(
    catalog: Catalog, catalog_db: CatalogDb
) -> None:
    await _store(catalog, 3)
    want = _shape(await catalog.chain_images("web"))
    engine = sa.create_engine(catalog_db.url)
    try:
        cfg = _alembic_config()
        for target, step in (("0008", command.downgrade), ("head", command.upgrade)):
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                step(cfg, target)
    finally:
        engine.dispose()
    assert _shape(await catalog.chain_images("web")) == want
    s2 = await catalog.get_snapshot("s2")
    assert s2.disks[0].image == "/img/o1.qcow2"


async def test_a_purge_forgets_the_rows(catalog: Catalog) -> None:
    await _store(catalog, 2)
    await catalog.delete_snapshot("s1")  # a record removed without a delete (purge)
    assert "/img/base.qcow2" not in {r.location for r in await catalog.chain_images("web")}
    assert await catalog.forget_images("web", "/img") == 2  # o1 (s2's image) and o2 (active)
    assert {r.location for r in await catalog.chain_images("web")} == {"rbd:vol/web-b@ff-s2"}
