"""``snapshot export`` through the service (:meth:`Service.export_snapshot`, the export job)
over real qcow2 chains recorded as a snapshot: standalone images, the metadata file (level,
reason, verdict or ``unverified``, disk mapping, filesystems), the refusals and their codes,
the hold that makes a delete refuse meanwhile. The chains are those of tests/unit/_chains.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import CatalogDb
from tests.unit._chains import MIB, SIZE_MIB, backing_of, needs_qemu_img, read_blocks
from tests.unit._chains import views as chain_views
from tests.unit._export_records import recorded

from freezeframe.engine import export as engine_export
from freezeframe.errors import AlreadyExistsError, BusyError, FreezeframeError, UsageError
from freezeframe.models import (
    FsCheck,
    SnapshotStatus,
    Verification,
    VerifyVerdict,
)
from freezeframe.service import Config, ExportProgress, Service, to_document
from freezeframe.storage.export import export_snapshot_images

pytestmark = needs_qemu_img
V = chain_views()


@pytest.fixture
async def svc(catalog_db: CatalogDb, tmp_path: Path) -> AsyncIterator[Service]:
    cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
    async with await Service.open(cfg) as s:
        yield s


def stats(*dirs: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for d in dirs
        for p in sorted(d.glob("*.qcow2"))
    }


async def test_export_writes_standalone_images_and_metadata(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path)
    before = stats(tmp_path / "chains" / "vda", tmp_path / "chains" / "vdb")
    seen: list[ExportProgress] = []
    to = tmp_path / "out"
    out = await svc.export_snapshot(rec.id[:8], str(to), progress=seen.append)

    assert sorted(os.listdir(to)) == ["metadata.json", "vda.qcow2", "vdb.qcow2"]
    for dev in ("vda", "vdb"):
        img = str(to / f"{dev}.qcow2")
        assert backing_of(img) is None
        assert read_blocks(img, "qcow2", tmp_path) == V["l2"]
    assert (out.snapshot_id, out.vm, out.format, out.compressed) == (rec.id, "web1", "qcow2", False)
    assert out.virtual_bytes == 2 * SIZE_MIB * MIB
    assert out.file_bytes == sum(os.path.getsize(i.path) for i in out.images)
    assert (out.verdict, out.verdict_source) == ("unverified", "none")
    assert seen[-1].done == seen[-1].total == out.virtual_bytes
    # the chains were not touched
    assert stats(tmp_path / "chains" / "vda", tmp_path / "chains" / "vdb") == before

    doc = json.loads(Path(out.metadata_path).read_text())
    assert doc["snapshot"] == rec.id
    assert doc["vm"] == "web1"
    assert doc["taken_at"] == "2026-12-06T10:00:00+00:00"
    assert (doc["level"], doc["level_reason"]) == ("filesystem", "every filesystem frozen")
    assert doc["verification"]["verdict"] == "unverified"
    assert doc["verification"]["source"] == "none"
    assert [(d["device"], d["file"], d["source"]) for d in doc["disks"]] == [
        ("vda", "vda.qcow2", rec.disks[0].image),
        ("vdb", "vdb.qcow2", rec.disks[1].image),
    ]
    assert [(f["mountpoint"], f["fstype"], f["frozen"]) for f in doc["filesystems"]] == [
        ("/mnt/a", "ext4", True),
        ("/mnt/b", "xfs", True),
    ]
    assert doc["export"]["format"] == "qcow2"
    # the result's JSON document (CLI --json, the API's event)
    res = to_document(out)
    assert res["metadata_path"] == out.metadata_path
    assert [i["device"] for i in res["images"]] == ["vda", "vdb"]


async def test_a_recorded_verdict_goes_into_the_metadata(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path)
    v = Verification(
        VerifyVerdict.CONSISTENT,
        datetime.now(UTC),
        checks=(FsCheck("vda", "ext4", VerifyVerdict.CONSISTENT, "clean"),),
    )
    await (await svc.catalog()).set_verification(rec.id, v)
    out = await svc.export_snapshot(rec.id, str(tmp_path / "out"), fmt="raw")
    assert (out.verdict, out.verdict_source) == ("verified-consistent", "recorded")
    doc = json.loads(Path(out.metadata_path).read_text())
    assert doc["verification"]["verdict"] == "verified-consistent"
    assert doc["verification"]["checks"][0]["device"] == "vda"
    assert sorted(os.listdir(tmp_path / "out")) == ["metadata.json", "vda.raw", "vdb.raw"]
    assert read_blocks(str(tmp_path / "out" / "vdb.raw"), "raw", tmp_path) == V["l2"]


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"fmt": "vmdk"}, "bad-export-format"),
        ({"fmt": "raw", "compress": True}, "compress-needs-qcow2"),
    ],
)
async def test_bad_options_are_refused_with_codes(
    svc: Service, tmp_path: Path, kw: dict[str, Any], code: str
) -> None:
    rec = await recorded(svc, tmp_path)
    with pytest.raises(UsageError) as err:
        await svc.export_snapshot(rec.id, str(tmp_path / "out"), **kw)
    assert err.value.code == code
    assert not (tmp_path / "out").exists()


async def test_a_relative_directory_is_refused(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path)
    with pytest.raises(UsageError) as err:
        await svc.export_snapshot(rec.id, "out")
    assert err.value.code == "export-path-not-absolute"


async def test_a_snapshot_that_is_not_done_is_refused(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path, status=SnapshotStatus.FAILED)
    with pytest.raises(UsageError) as err:
        await svc.export_snapshot(rec.id, str(tmp_path / "out"))
    assert err.value.code == "snapshot-not-done"
    with pytest.raises(UsageError) as err:
        await svc.start_export(rec.id, str(tmp_path / "out"))
    assert err.value.code == "snapshot-not-done"
    assert not (tmp_path / "out").exists()


async def test_an_existing_target_is_refused_before_anything_is_copied(
    svc: Service, tmp_path: Path
) -> None:
    rec = await recorded(svc, tmp_path)
    to = tmp_path / "out"
    to.mkdir()
    (to / "vdb.qcow2").write_text("mine")
    with pytest.raises(AlreadyExistsError) as err:
        await svc.export_snapshot(rec.id, str(to))
    assert err.value.code == "export-target-exists"
    assert sorted(os.listdir(to)) == ["vdb.qcow2"]
    assert (to / "vdb.qcow2").read_text() == "mine"


async def test_an_image_changed_since_the_cut_is_not_exported(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path)
    with open(rec.disks[1].image, "ab") as f:  # written after the cut
        f.write(b"\0" * 512)
    with pytest.raises(UsageError) as err:
        await svc.export_snapshot(rec.id, str(tmp_path / "out"))
    assert err.value.code == "snapshot-changed-since-cut"
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    v = (await svc.get_snapshot(rec.id)).verification
    assert v is not None
    assert v.verdict is VerifyVerdict.CHANGED


async def test_a_delete_is_refused_while_the_export_holds_the_snapshot(
    svc: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await recorded(svc, tmp_path)
    copying, release = asyncio.Event(), asyncio.Event()
    real = export_snapshot_images

    async def slow(*args: Any, **kw: Any) -> Any:
        copying.set()
        await release.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(engine_export, "export_snapshot_images", slow)
    job = await svc.start_export(rec.id, str(tmp_path / "out"))
    assert svc.export_job(rec.id) is job
    await asyncio.wait_for(copying.wait(), 10)
    cat = await svc.catalog()
    with pytest.raises(BusyError) as err:
        await cat.begin_delete(rec.id)
    assert err.value.code == "snapshot-in-use"
    # a second job of the same snapshot is refused in this service
    with pytest.raises(BusyError) as busy:
        await svc.start_export(rec.id, str(tmp_path / "other"))
    assert busy.value.code == "job-running"
    with pytest.raises(BusyError) as busy:
        await svc.start_verify(rec.id)
    assert busy.value.code == "job-running"
    release.set()
    out = await job.wait()
    assert out.snapshot_id == rec.id
    names = [ev.name for ev in job.history]
    assert names[0] == "export_started"
    assert names[-1] == "export_progress"
    assert job.history[-1].detail.endswith(f"{out.virtual_bytes}/{out.virtual_bytes}")
    assert len(names) <= 2 + 1 / 0.02 + 2  # throttled
    assert svc.export_jobs == ()
    # the hold is gone with the export
    await cat.begin_delete(rec.id)


async def test_a_failed_export_job_ends_with_its_error(svc: Service, tmp_path: Path) -> None:
    rec = await recorded(svc, tmp_path)
    os.unlink(rec.disks[0].image)  # the image at the cut is gone
    job = await svc.start_export(rec.id, str(tmp_path / "out"))
    with pytest.raises(FreezeframeError) as err:
        await job.wait()
    assert err.value.code == "image-not-found"
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


async def test_a_disk_of_no_known_backend_is_refused_before_the_job(
    svc: Service, tmp_path: Path
) -> None:
    # (RBD snapshots are exported through their backend: tests/integration/test_rbd_snapshots.py)
    rec = await recorded(svc, tmp_path)
    odd = dataclasses.replace(rec.disks[1], image="nbd://host/export", backend="nbd")
    await (await svc.catalog()).finish_snapshot(dataclasses.replace(rec, disks=(rec.disks[0], odd)))
    with pytest.raises(UsageError) as err:
        await svc.start_export(rec.id, str(tmp_path / "out"))
    assert err.value.code == "export-backend-unsupported"
    assert svc.export_job(rec.id) is None
