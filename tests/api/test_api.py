"""The REST API over the fakes: authentication, the one error shape, snapshot jobs and their
event streams, paging, metrics. Tests assert codes and statuses, not prose."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from freezeframe.api import render_remedy
from freezeframe.api._app import ApiState
from freezeframe.catalog import make_owner
from freezeframe.errors import Action, Remedy, VerifyError
from freezeframe.service import CreateSnapshot, Service
from freezeframe.testing import AgentFault, FakeVm
from tests.api.conftest import AUTH, TOKEN


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each event of a complete text/event-stream body."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def assert_shape(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "hint"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    return dict(body)


# ------------------------------------------------------------------ auth


async def test_healthz_needs_no_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/vms"),
        ("POST", "/v1/vms"),
        ("GET", "/v1/vms/web1"),
        ("DELETE", "/v1/vms/web1"),
        ("GET", "/v1/vms/web1/doctor"),
        ("POST", "/v1/vms/web1/snapshots"),
        ("GET", "/v1/vms/web1/snapshots"),
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/snapshots/abc"),
        ("GET", "/v1/snapshots/abc/events"),
        ("POST", "/v1/snapshots/abc/verify"),
        ("POST", "/v1/vms/web1/recover"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/no-such-endpoint"),
    ],
)
async def test_every_endpoint_but_healthz_needs_the_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    r = await client.request(method, path)
    assert_shape(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
    assert_shape(await client.request(method, path, headers=wrong), 401, "unauthorized")
    basic = {"Authorization": f"Basic {TOKEN}"}
    assert_shape(await client.request(method, path, headers=basic), 401, "unauthorized")


async def test_the_token_is_never_in_a_response(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/login", "/openapi.json", "/v1/vms"):
        r = await client.get(path, headers=AUTH)
        assert TOKEN not in r.text


# ------------------------------------------------------------------ errors


async def test_unknown_vm_is_404_vm_not_found(client: httpx.AsyncClient) -> None:
    assert_shape(await client.get("/v1/vms/nope", headers=AUTH), 404, "vm-not-found")
    r = await client.post("/v1/vms/nope/snapshots", headers=AUTH, json={})
    assert_shape(r, 404, "vm-not-found")
    assert_shape(await client.get("/v1/vms/nope/doctor", headers=AUTH), 404, "vm-not-found")
    assert_shape(
        await client.get("/v1/snapshots/0123456789ab", headers=AUTH), 404, "snapshot-not-found"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"quiesce": "sometimes"}',
        b'{"freeze_timeout": "soon"}',
        b'{"verify": "perhaps"}',
        b'{"exclude_mounts": "/data"}',
        b'{"unknown_field": 1}',
        b"[1, 2]",
        b'{"freeze_timeout": NaN}',
    ],
)
async def test_malformed_create_body_is_422_with_a_code(
    client: httpx.AsyncClient, body: bytes
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    r = await client.post("/v1/vms/web1/snapshots", headers=headers, content=body)
    shape = assert_shape(r, 422, "invalid-request")
    assert "Traceback" not in shape["message"]


async def test_bad_values_the_service_refuses_are_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json={"freeze_timeout": -1})
    assert_shape(r, 400, "invalid-argument")


async def test_unknown_route_and_method_have_the_shape(client: httpx.AsyncClient) -> None:
    assert_shape(await client.get("/v1/nothing", headers=AUTH), 404, "not-found")
    assert_shape(await client.put("/v1/vms", headers=AUTH), 405, "method-not-allowed")


async def test_unexpected_errors_are_500_without_a_traceback(
    client: httpx.AsyncClient, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom() -> None:
        raise RuntimeError("secret detail /etc/shadow")

    monkeypatch.setattr(svc, "list_vms", boom)
    r = await client.get("/v1/vms", headers=AUTH)
    shape = assert_shape(r, 500, "internal-error")
    assert "secret" not in r.text
    assert "Traceback" not in r.text
    assert shape["hint"]


async def test_an_unreachable_catalog_is_503(
    client: httpx.AsyncClient, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freezeframe.errors import CatalogError

    async def down() -> None:
        raise CatalogError("database is locked")

    monkeypatch.setattr(svc, "list_vms", down)
    assert_shape(await client.get("/v1/vms", headers=AUTH), 503, "catalog-error")


def test_remedies_are_named_as_endpoints() -> None:
    assert render_remedy(Remedy(Action.RECOVER, "web1")) == "POST /v1/vms/web1/recover"
    assert render_remedy(Remedy(Action.DOCTOR, "a b")) == "GET /v1/vms/a%20b/doctor"
    assert render_remedy(Remedy(Action.REMOVE_VM, "web1")) == "DELETE /v1/vms/web1"
    assert "lab down web1 --purge" in render_remedy(
        Remedy(Action.LAB_DOWN, "web1", {"purge": "yes"})
    )
    for action in Action:  # every action has words of the API's own
        assert render_remedy(Remedy(action, "web1"))


# ------------------------------------------------------------------ VMs


async def test_vm_add_list_remove(client: httpx.AsyncClient, tmp_path: Any) -> None:
    body = {"name": "db1", "qmp": str(tmp_path / "qmp.sock"), "quiesce": "required"}
    r = await client.post("/v1/vms", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/vms/db1"
    assert r.json()["vm"]["quiesce"] == "required"
    assert r.json()["not_there_yet"] == [str(tmp_path / "qmp.sock")]
    assert_shape(await client.post("/v1/vms", headers=AUTH, json=body), 409, "vm-exists")
    names = [v["name"] for v in (await client.get("/v1/vms", headers=AUTH)).json()]
    assert names == ["db1", "web1"]
    assert (await client.delete("/v1/vms/db1", headers=AUTH)).status_code == 204
    assert_shape(await client.get("/v1/vms/db1", headers=AUTH), 404, "vm-not-found")


async def test_vm_add_takes_ceph_settings_and_an_overlay_dir(
    client: httpx.AsyncClient, tmp_path: Any
) -> None:
    body = {
        "name": "rbd1",
        "qmp": str(tmp_path / "qmp.sock"),
        "ceph_conf": "/etc/ceph/lab.conf",
        "ceph_id": "freezeframe",
        "ceph_keyring": "/etc/ceph/lab.client.freezeframe.keyring",
        "overlay_dir": str(tmp_path / "overlays"),
    }
    r = await client.post("/v1/vms", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    stored = (await client.get("/v1/vms/rbd1", headers=AUTH)).json()
    for key in ("ceph_conf", "ceph_id", "ceph_keyring", "overlay_dir"):
        assert r.json()["vm"][key] == body[key]
        assert stored[key] == body[key]
    bad = {**body, "name": "rbd2", "ceph_id": "client admin"}
    r = await client.post("/v1/vms", headers=AUTH, json=bad)
    assert r.status_code == 400, r.text
    assert r.json()["code"] != "invalid-request"  # the service refused it, not the schema


async def test_create_takes_an_overlay_dir(
    client: httpx.AsyncClient, svc: Service, tmp_path: Any
) -> None:
    where = tmp_path / "elsewhere"
    where.mkdir()
    sid = await create(client, overlay_dir=str(where))
    await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)  # to its end
    rec = await svc.get_snapshot(sid)
    assert rec.disks
    assert all((d.overlay or "").startswith(f"{where}/") for d in rec.disks), rec.disks
    r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json={"overlay_dir": 3})
    assert r.status_code == 422


async def test_vm_add_refusals_are_400(client: httpx.AsyncClient, tmp_path: Any) -> None:
    (tmp_path / "plain").write_text("")
    r = await client.post(
        "/v1/vms", headers=AUTH, json={"name": "x", "qmp": str(tmp_path / "plain")}
    )
    assert_shape(r, 400, "not-a-socket")
    r = await client.post("/v1/vms", headers=AUTH, json={"name": "x"})  # neither qmp nor libvirt
    assert_shape(r, 400, "vm-address-required")


async def test_doctor(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/vms/web1/doctor", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["ok"] is True
    assert r.json()["predicted_level"] == "filesystem"


async def test_recover_with_nothing_to_do(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/vms/web1/recover", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"code": "done", "outcomes": [], "error": None}


# ------------------------------------------------------------------ snapshots


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json=body)
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    assert r.headers["location"] == f"/v1/snapshots/{sid}"
    return str(sid)


async def test_create_then_events_then_record(
    client: httpx.AsyncClient, svc: Service, web1: FakeVm
) -> None:
    sid = await create(client)
    r = await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [k for k, _ in events]
    steps = [d["name"] for k, d in events if k == "step"]
    assert kinds[-2:] == ["outcome", "record"]
    assert steps[0] == "started"
    assert steps.index("freeze_sent") < steps.index("cut") < steps.index("thawed")
    assert events[-2][1]["code"] == "done"
    final = events[-1][1]
    assert final["level"] == "filesystem"
    assert final["status"] == "done"
    shown = (await client.get(f"/v1/snapshots/{sid}", headers=AUTH)).json()
    assert shown == final
    # the same document as the service's serializer (snapshot show --json)
    from freezeframe.service import to_document

    assert shown == to_document(await svc.get_snapshot(sid))
    assert not web1.guest.frozen  # type: ignore[union-attr]


async def test_live_adds_the_images_qemu_runs_on(client: httpx.AsyncClient, svc: Service) -> None:
    out = await svc.create_snapshot("web1")
    plain = (await client.get(f"/v1/snapshots/{out.record.id}", headers=AUTH)).json()
    assert "qemu_runs_on" not in plain
    live = (await client.get(f"/v1/snapshots/{out.record.id}?live=true", headers=AUTH)).json()
    assert {k: v for k, v in live.items() if k != "qemu_runs_on"} == plain
    overlays = {d["device"]: d["overlay"] for d in plain["disks"]}
    assert live["qemu_runs_on"] == overlays


async def test_events_of_a_finished_snapshot_replay_from_the_catalog(
    client: httpx.AsyncClient, svc: Service
) -> None:
    out = await svc.create_snapshot("web1")
    r = await client.get(f"/v1/snapshots/{out.record.id[:8]}/events", headers=AUTH)
    events = sse_events(r.text)
    assert [d["name"] for k, d in events if k == "step"] == [e.name for e in out.record.timeline]
    assert events[-1][0] == "record"
    # a client that reconnects gets only what follows its Last-Event-ID
    again = await client.get(
        f"/v1/snapshots/{out.record.id}/events", headers={**AUTH, "Last-Event-ID": "3"}
    )
    assert sse_events(again.text) == events[3:]


async def test_second_create_of_a_busy_vm_is_409_vm_busy(
    client: httpx.AsyncClient, svc: Service, web1: FakeVm
) -> None:
    assert web1.guest is not None
    web1.guest.script("guest-fsfreeze-freeze", AgentFault.HANG, times=1)
    sid = await create(client, freeze_timeout=1)  # hangs in the freeze for a second
    r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json={})
    assert_shape(r, 409, "vm-busy")
    job = svc.job(sid)
    assert job is not None
    out = await job.wait()
    assert out.record.level.value == "crash"  # preferred: fell back, thawed
    assert not web1.guest.frozen


async def test_the_catalog_lock_of_another_process_makes_409(
    client: httpx.AsyncClient, svc: Service
) -> None:
    cat = await svc.catalog()
    owner = make_owner()  # alive: this process, as a CLI or another serve would hold it
    await cat.acquire_vm_lock("web1", owner)
    try:
        r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json={})
        assert_shape(r, 409, "vm-busy")
    finally:
        await cat.release_vm_lock("web1", owner)


async def test_required_without_agent_fails_in_the_job_with_a_code(
    client: httpx.AsyncClient, web1: FakeVm
) -> None:
    assert web1.guest is not None
    web1.guest.agent_running = False
    sid = await create(client, quiesce="required")
    events = sse_events((await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)).text)
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["error", "record"]
    err = events[-2][1]
    assert err["code"] == "agent-unreachable"
    assert err["snapshot_id"] == sid
    assert events[-1][1]["status"] == "failed"


async def test_paging(client: httpx.AsyncClient, svc: Service) -> None:
    ids = [(await svc.create_snapshot("web1")).record.id for _ in range(5)]
    seen: list[str] = []
    url: str | None = "/v1/snapshots?limit=2"
    pages = 0
    while url:
        r = await client.get(url, headers=AUTH)
        assert r.status_code == 200, r.text
        seen += [d["id"] for d in r.json()["items"]]
        nxt = r.json()["next_cursor"]
        assert ("link" in r.headers) == (nxt is not None)
        url = f"/v1/snapshots?limit=2&cursor={nxt}" if nxt else None
        pages += 1
    assert pages == 3
    assert seen == ids[::-1]  # newest first
    oldest = await client.get("/v1/vms/web1/snapshots?limit=50&order=oldest", headers=AUTH)
    assert [d["id"] for d in oldest.json()["items"]] == ids
    assert_shape(await client.get("/v1/snapshots?cursor=zzz", headers=AUTH), 400, "bad-cursor")
    assert_shape(await client.get("/v1/snapshots?limit=0", headers=AUTH), 422, "invalid-request")
    assert_shape(
        await client.get("/v1/snapshots?order=random", headers=AUTH), 422, "invalid-request"
    )


async def test_metrics_count_this_servers_snapshots(client: httpx.AsyncClient) -> None:
    sid = await create(client)
    await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)  # to its end
    text = (await client.get("/metrics", headers=AUTH)).text
    assert 'freezeframe_snapshots_total{level="filesystem",outcome="done"} 1.0' in text
    assert "freezeframe_freeze_window_seconds_count 1.0" in text
    assert "freezeframe_thaw_unconfirmed_total 0.0" in text


async def test_metrics_count_an_unconfirmed_thaw(
    client: httpx.AsyncClient, svc: Service, web1: FakeVm
) -> None:
    assert web1.guest is not None

    async def counter() -> float:
        text = (await client.get("/metrics", headers=AUTH)).text
        [line] = [
            ln for ln in text.splitlines() if ln.startswith("freezeframe_thaw_unconfirmed_total ")
        ]
        return float(line.split()[1])

    assert await counter() == 0.0
    sid = await create(client)  # a confirmed thaw counts nothing
    await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)
    assert await counter() == 0.0
    web1.guest.script("guest-fsfreeze-thaw", AgentFault.REFUSE)
    try:
        sid = await create(client)
        events = sse_events((await client.get(f"/v1/snapshots/{sid}/events", headers=AUTH)).text)
        assert ("outcome", events[-2][1]) == events[-2]
        assert events[-2][1]["code"] == "thaw-unconfirmed"
        assert events[-1][1]["thaw_unconfirmed"] is True
        assert await counter() == 1.0
        text = (await client.get("/metrics", headers=AUTH)).text
        assert 'outcome="thaw-unconfirmed"' in text
    finally:
        web1.guest.script("guest-fsfreeze-thaw", None)  # the follow-up may thaw it now


async def test_verify_is_a_job_and_its_failure_has_a_code(
    client: httpx.AsyncClient, svc: Service
) -> None:
    out = await svc.create_snapshot("web1")
    r = await client.post(f"/v1/snapshots/{out.record.id}/verify", headers=AUTH)
    assert r.status_code == 202, r.text
    events = sse_events((await client.get(r.json()["events"], headers=AUTH)).text)
    assert events[0] == ("step", events[0][1])
    assert events[0][1]["name"] == "verify_started"
    # the fake's images are not files: the verify cannot read them
    assert [k for k, _ in events][-2:] == ["error", "record"]
    assert events[-2][1]["code"] == "verify-failed"


async def test_a_second_verify_of_a_snapshot_is_409_job_running(
    client: httpx.AsyncClient, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await svc.create_snapshot("web1")
    release = asyncio.Event()

    async def slow_verify(sid: str, **_kw: object) -> Any:
        await release.wait()
        raise VerifyError("the fake's images are not files")

    monkeypatch.setattr(svc, "verify_snapshot", slow_verify)
    r = await client.post(f"/v1/snapshots/{out.record.id}/verify", headers=AUTH)
    assert r.status_code == 202, r.text
    assert (await client.get("/healthz")).json()["jobs"] == 1
    again = await client.post(f"/v1/snapshots/{out.record.id}/verify", headers=AUTH)
    body = assert_shape(again, 409, "job-running")
    assert body["hint"]
    assert f"/v1/snapshots/{out.record.id}" in body["hint"]
    release.set()
    events = sse_events((await client.get(r.json()["events"], headers=AUTH)).text)
    assert [k for k, _ in events] == ["step", "error", "record"]
    assert events[1][1]["code"] == "verify-failed"
    assert (await client.get("/healthz")).json()["jobs"] == 0


async def test_a_stopping_server_takes_no_new_jobs(
    client: httpx.AsyncClient, app: Any, svc: Service
) -> None:
    state: ApiState = app.state.ff
    state.begin_stop()
    r = await client.post("/v1/vms/web1/snapshots", headers=AUTH, json={})
    assert r.status_code == 503
    assert r.json()["code"] == "shutting-down"
    assert (await client.get("/healthz")).json()["status"] == "stopping"


async def test_openapi_lists_the_endpoints(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json", headers=AUTH)).json()["paths"]
    for p in ("/v1/vms", "/v1/vms/{vm}/snapshots", "/v1/snapshots/{snapshot_id}/events"):
        assert p in paths


# ------------------------------------------------------------------ a real server


async def test_a_client_that_drops_mid_create_does_not_stop_the_snapshot(
    live_url: str, svc: Service, web1: FakeVm
) -> None:
    assert web1.guest is not None
    web1.guest.script("guest-fsfreeze-freeze", AgentFault.HANG, times=1)
    async with httpx.AsyncClient(base_url=live_url, headers=AUTH) as c:
        r = await c.post("/v1/vms/web1/snapshots", json={"freeze_timeout": 1.5})
        sid = r.json()["id"]
        async with c.stream("GET", f"/v1/snapshots/{sid}/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: step"):
                    break  # drop the connection with the snapshot in its freeze
    job = svc.job(sid)
    assert job is not None
    assert not job.done
    out = await asyncio.wait_for(job.wait(), 30)
    assert out.record.status.value == "done"
    assert web1.guest.sent("guest-fsfreeze-thaw")
    assert not web1.guest.frozen


async def test_followers_get_the_steps_live(live_url: str, svc: Service, web1: FakeVm) -> None:
    assert web1.guest is not None
    web1.guest.script("guest-fsfreeze-freeze", AgentFault.HANG, times=1)
    async with httpx.AsyncClient(base_url=live_url, headers=AUTH, timeout=30) as c:
        sid = (await c.post("/v1/vms/web1/snapshots", json={"freeze_timeout": 1})).json()["id"]

        async def follow() -> list[str]:
            kinds = []
            async with c.stream("GET", f"/v1/snapshots/{sid}/events") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kinds.append(line[7:])
            return kinds

        results = await asyncio.gather(*(follow() for _ in range(5)))
    for kinds in results:
        assert kinds[0] == "step"
        assert kinds[-1] == "record"
    assert len({tuple(k) for k in results}) == 1


async def test_create_snapshot_request_maps_every_field(svc: Service) -> None:
    from freezeframe.api._app import CreateBody

    body = CreateBody.model_validate(
        {"quiesce": "off", "freeze_timeout": 3, "exclude_mounts": ["/x"], "exclude_disks": ["d"],
         "verify": True, "overlay_dir": "/srv/overlays"}
    )  # fmt: skip
    assert set(CreateBody.model_fields) == {
        "quiesce", "freeze_timeout", "exclude_mounts", "exclude_disks", "verify", "overlay_dir"
    }  # fmt: skip
    assert {f for f in CreateSnapshot.__dataclass_fields__} >= set(CreateBody.model_fields)
    assert body.quiesce is not None
    assert body.quiesce.value == "off"
