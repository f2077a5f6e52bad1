"""``DELETE /v1/snapshots/{id}``: 200 with what was done to each disk once the snapshot's layers
are merged away and its record is gone; the one error shape otherwise (running or held: 409;
unknown: 404)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import httpx

from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotRecord, SnapshotStatus
from freezeframe.service import Service
from freezeframe.testing import FakeHost, FakeVm
from tests.api.conftest import AUTH


async def test_delete_merges_a_qcow2_snapshot_away(client: httpx.AsyncClient, svc: Service) -> None:
    first = (await svc.create_snapshot("web1")).record
    second = (await svc.create_snapshot("web1")).record
    cat = await svc.catalog()
    async with cat.hold_snapshot(first.id, "export"):
        held = await client.delete(f"/v1/snapshots/{first.id}", headers=AUTH)
    assert held.status_code == 409, held.text
    assert held.json()["code"] == "snapshot-in-use"
    r = await client.delete(f"/v1/snapshots/{first.id}", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["record"]["id"] == first.id
    assert {d["how"] for d in body["disks"]} == {"live"}
    assert (await client.get(f"/v1/snapshots/{first.id}", headers=AUTH)).status_code == 404
    kept = (await client.get(f"/v1/snapshots/{second.id}", headers=AUTH)).json()
    # the second snapshot's data now lives in the first one's image at the cut
    assert [d["image"] for d in kept["disks"]] == [d.image for d in first.disks]


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
    assert r.status_code == 200, r.text
    assert (r.json()["record"]["id"], r.json()["disks"]) == (rec.id, [])
    again = await client.delete(f"/v1/snapshots/{rec.id}", headers=AUTH)
    assert again.status_code == 404
    assert again.json()["code"] == "snapshot-not-found"


async def test_restore_refusals_are_409_and_change_nothing(
    client: httpx.AsyncClient, svc: Service, host: FakeHost, web1: FakeVm
) -> None:
    rec = (await svc.create_snapshot("web1")).record
    before = web1.chain("disk0")
    url = f"/v1/snapshots/{rec.id}/restore"
    r = await client.post(url, json={}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (409, "confirmation-required"), r.text
    # a VM freezeframe cannot stop and start (here: the fake driver) must be stopped first
    r = await client.post(url, json={"yes": True}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (409, "vm-running"), r.text
    r = await client.post(url, json={"as": "web2"}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (409, "restore-as-unsupported"), r.text
    r = await client.post(url, json={"yes": True, "stop_timeout": 0}, headers=AUTH)
    assert (r.status_code, r.json()["code"]) == (400, "bad-stop-timeout"), r.text
    r = await client.post(url, json={"yes": True, "bogus": 1}, headers=AUTH)
    assert r.status_code == 422
    assert web1.chain("disk0") == before
    unknown = await client.post("/v1/snapshots/nope1234/restore", json={"yes": True}, headers=AUTH)
    assert unknown.status_code == 404
