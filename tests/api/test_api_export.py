"""``POST /v1/snapshots/{id}/export``: a job of the server (``202`` with ``Location``), its
events (``export_started``, ``export_progress``, then ``export`` with the result, then the
record), and the one error shape for what is refused at once. The snapshot is a record over
real qcow2 chains (tests/unit/_export_records.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from freezeframe.models import SnapshotStatus
from freezeframe.service import Service
from tests.api.conftest import AUTH
from tests.api.test_api import assert_shape, sse_events
from tests.unit._chains import backing_of, needs_qemu_img
from tests.unit._export_records import recorded

pytestmark = needs_qemu_img


async def test_export_is_a_job_with_progress_and_a_result(
    client: httpx.AsyncClient, svc: Service, tmp_path: Path
) -> None:
    rec = await recorded(svc, tmp_path)
    to = tmp_path / "out"
    r = await client.post(
        f"/v1/snapshots/{rec.id[:6]}/export",
        json={"to": str(to), "format": "qcow2", "compress": True},
        headers=AUTH,
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["id"], body["vm"], body["job"]) == (rec.id, "web1", "export")
    assert r.headers["Location"] == f"/v1/snapshots/{rec.id}"
    events = sse_events((await client.get(body["events"], headers=AUTH)).text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "step"
    assert events[0][1]["name"] == "export_started"
    assert kinds[-2:] == ["export", "record"]
    steps = [d for k, d in events if k == "step"]
    assert {s["name"] for s in steps[1:]} == {"export_progress"}
    result = events[-2][1]
    assert result["snapshot_id"] == rec.id
    assert result["compressed"] is True
    assert result["verdict"] == "unverified"
    total = result["virtual_bytes"]
    assert steps[-1]["detail"].endswith(f" {total}/{total}")
    assert sorted(os.listdir(to)) == ["metadata.json", "vda.qcow2", "vdb.qcow2"]
    for i in result["images"]:
        assert backing_of(i["path"]) is None
    doc = json.loads((to / "metadata.json").read_text())
    assert doc["level"] == "filesystem"
    assert doc["verification"]["verdict"] == "unverified"
    assert (await client.get("/healthz")).json()["jobs"] == 0


async def test_refusals_come_before_the_job_in_the_one_error_shape(
    client: httpx.AsyncClient, svc: Service, tmp_path: Path
) -> None:
    rec = await recorded(svc, tmp_path)
    url = f"/v1/snapshots/{rec.id}/export"
    out = str(tmp_path / "out")
    assert_shape(
        await client.post(url, json={"to": out, "format": "vmdk"}, headers=AUTH),
        400,
        "bad-export-format",
    )
    assert_shape(
        await client.post(url, json={"to": out, "format": "raw", "compress": True}, headers=AUTH),
        400,
        "compress-needs-qcow2",
    )
    assert_shape(
        await client.post(url, json={"to": "relative/dir"}, headers=AUTH),
        400,
        "export-path-not-absolute",
    )
    assert_shape(
        await client.post(url, json={"to": out, "whatever": 1}, headers=AUTH),
        422,
        "invalid-request",
    )
    assert_shape(
        await client.post("/v1/snapshots/0badc0de0000/export", json={"to": out}, headers=AUTH),
        404,
        "snapshot-not-found",
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metadata.json").write_text("{}")
    assert_shape(
        await client.post(url, json={"to": str(tmp_path / "taken")}, headers=AUTH),
        409,
        "export-target-exists",
    )
    assert not (tmp_path / "out").exists()
    assert (await client.post(url, json={"to": out})).status_code == 401


async def test_a_snapshot_not_done_is_409(
    client: httpx.AsyncClient, svc: Service, tmp_path: Path
) -> None:
    rec = await recorded(svc, tmp_path, status=SnapshotStatus.FAILED)
    r = await client.post(
        f"/v1/snapshots/{rec.id}/export", json={"to": str(tmp_path / "out")}, headers=AUTH
    )
    assert_shape(r, 409, "snapshot-not-done")
