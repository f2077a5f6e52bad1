"""Schedules and prune over HTTP: ``GET/PUT/DELETE /v1/vms/{vm}/schedule``, ``GET
/v1/schedules``, ``POST /v1/prune`` (the service's documents; errors in the one shape)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from freezeframe.service import Scheduler, Service
from tests.api.conftest import AUTH


async def test_schedule_put_get_list_delete(
    client: httpx.AsyncClient, svc: Service, app: FastAPI
) -> None:
    r = await client.get("/v1/vms/web1/schedule", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["code"] == "schedule-not-found"
    woken: list[bool] = []
    sched = Scheduler(svc)
    sched.wake = lambda: woken.append(True)  # type: ignore[method-assign]
    app.state.ff.scheduler = sched
    body = {"every": "15m", "keep_last": 3, "keep_daily": 7, "quiesce": "required"}
    r = await client.put("/v1/vms/web1/schedule", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["every"] == "15m"
    assert doc["rules"] == {"keep-last": 3, "keep-daily": 7}
    assert doc["schedule"]["every_s"] == 900
    assert doc["schedule"]["quiesce"] == "required"
    assert doc["due"] is True
    assert woken == [True]  # the server's scheduler reads the new schedule at once
    listed = (await client.get("/v1/schedules", headers=AUTH)).json()
    assert [v["schedule"]["vm"] for v in listed] == ["web1"]
    bad = await client.put("/v1/vms/web1/schedule", json={"every": "often"}, headers=AUTH)
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid-interval"
    neg = await client.put(
        "/v1/vms/web1/schedule", json={"every": "1h", "keep_last": -1}, headers=AUTH
    )
    assert neg.status_code == 422
    ghost = await client.put("/v1/vms/ghost/schedule", json={"every": "1h"}, headers=AUTH)
    assert ghost.status_code == 404
    assert ghost.json()["code"] == "vm-not-found"
    assert (await client.delete("/v1/vms/web1/schedule", headers=AUTH)).status_code == 204
    assert (await client.get("/v1/schedules", headers=AUTH)).json() == []
    gone = await client.delete("/v1/vms/web1/schedule", headers=AUTH)
    assert gone.status_code == 404


async def test_prune_dry_run_over_http(client: httpx.AsyncClient, svc: Service) -> None:
    ids = [(await svc.create_snapshot("web1")).record.id for _ in range(3)]
    r = await client.put(
        "/v1/vms/web1/schedule", json={"every": "1h", "keep_last": 1}, headers=AUTH
    )
    assert r.status_code == 200
    r = await client.post("/v1/prune", json={"vm": "web1", "dry_run": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["dry_run"] is True
    assert doc["code"] == "done"
    assert [(i["id"], i["keep"], i["reason"]) for i in doc["items"]] == [
        (ids[0], False, "not-selected"),
        (ids[1], False, "not-selected"),
        (ids[2], True, "keep-last"),
    ]
    assert not any(i["deleted"] for i in doc["items"])
    none = await client.post("/v1/prune", json={"vm": "nope"}, headers=AUTH)
    assert none.status_code == 404
    assert none.json()["code"] == "schedule-not-found"
    assert (await client.post("/v1/prune", json={"dry_run": True})).status_code == 401
