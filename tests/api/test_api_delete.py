"""``DELETE /v1/snapshots/{id}`` (issue 9): 204 once a snapshot's parts and record are gone; the
one error shape otherwise (a qcow2 layer: 409 ``delete-needs-merge``; unknown: 404)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import httpx

from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotRecord, SnapshotStatus
from freezeframe.service import Service
from tests.api.conftest import AUTH


async def test_delete_of_a_qcow2_snapshot_is_409_and_keeps_it(
    client: httpx.AsyncClient, svc: Service
) -> None:
    rec = (await svc.create_snapshot("web1")).record
    r = await client.delete(f"/v1/snapshots/{rec.id}", headers=AUTH)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["code"] == "delete-needs-merge"
    assert "not built" in body["hint"]
    assert (await client.get(f"/v1/snapshots/{rec.id}", headers=AUTH)).status_code == 200


async def test_delete_removes_a_record_without_parts_and_404s_after(
    client: httpx.AsyncClient, svc: Service
) -> None:
    rec = SnapshotRecord(
        id="0ddba11c0001",
        vm="web1",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
    )
    cat = await svc.catalog()
    await cat.begin_snapshot(rec)
    running = await client.delete(f"/v1/snapshots/{rec.id}", headers=AUTH)
    assert running.status_code == 409
    assert running.json()["code"] == "snapshot-running"
    await cat.finish_snapshot(dataclasses.replace(rec, status=SnapshotStatus.FAILED, error="x"))
    r = await client.delete(f"/v1/snapshots/{rec.id}", headers=AUTH)
    assert r.status_code == 204, r.text
    assert r.content == b""
    again = await client.delete(f"/v1/snapshots/{rec.id}", headers=AUTH)
    assert again.status_code == 404
    assert again.json()["code"] == "snapshot-not-found"
