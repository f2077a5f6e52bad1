"""The dashboard over the fakes: login and session cookie, CSRF, Create snapshot through the
form, the result page (level, filesystems, the timeline chart, verdicts), escaping."""

from __future__ import annotations

import re

import httpx
import pytest

from freezeframe.api._chart import phases, timeline_svg
from freezeframe.service import Service
from freezeframe.testing import FakeVm
from tests.api.conftest import TOKEN

HTML = {"Accept": "text/html"}


async def login(client: httpx.AsyncClient) -> str:
    r = await client.post("/login", data={"token": TOKEN, "next": "/vms/web1"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/vms/web1"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert TOKEN not in cookie
    page = await client.get("/vms/web1", headers=HTML)
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert m, page.text
    return m.group(1)


async def test_pages_redirect_to_the_login_without_a_session(client: httpx.AsyncClient) -> None:
    r = await client.get("/vms/web1?cursor=x", headers=HTML)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/vms/web1%3Fcursor%3Dx"
    login_page = await client.get("/login", headers=HTML)
    assert login_page.status_code == 200
    assert 'type="password"' in login_page.text


async def test_a_wrong_token_does_not_log_in(client: httpx.AsyncClient) -> None:
    r = await client.post("/login", data={"token": "nope" * 8})
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert (await client.get("/", headers=HTML)).status_code == 303


async def test_login_only_follows_local_paths(client: httpx.AsyncClient) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil"):
        r = await client.post("/login", data={"token": TOKEN, "next": target})
        assert r.headers["location"] == "/"


async def test_the_session_cookie_also_opens_the_api(client: httpx.AsyncClient) -> None:
    await login(client)
    r = await client.get("/v1/vms/web1/doctor")  # the VM list fetches verdicts like this
    assert r.status_code == 200
    assert r.json()["predicted_level"] == "filesystem"


async def test_the_session_cookie_does_not_write_through_the_api(
    client: httpx.AsyncClient, svc: Service
) -> None:
    await login(client)
    r = await client.post("/v1/vms/web1/snapshots", json={})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert (await client.delete("/v1/vms/web1")).status_code == 401
    assert (await svc.list_snapshots("web1")).items == ()


async def test_vm_list_and_page(client: httpx.AsyncClient) -> None:
    await login(client)
    page = (await client.get("/", headers=HTML)).text
    assert 'href="/vms/web1"' in page
    assert 'data-doctor="/v1/vms/web1/doctor"' in page
    vm = (await client.get("/vms/web1", headers=HTML)).text
    assert 'id="create-snapshot"' in vm
    for policy in ("required", "preferred", "off"):
        assert f'value="{policy}"' in vm


async def test_create_from_the_form_then_the_result_page(
    client: httpx.AsyncClient, svc: Service
) -> None:
    csrf = await login(client)
    r = await client.post(
        "/vms/web1/snapshots", data={"csrf": csrf, "quiesce": "required", "verify": "no"}
    )
    assert r.status_code == 303, r.text
    sid = r.headers["location"].rsplit("/", 1)[1]
    job = svc.job(sid)
    if job is not None:
        await job.wait()
    page = (await client.get(f"/snapshots/{sid}", headers=HTML)).text
    assert 'id="level">filesystem<' in page
    assert "<svg" in page
    assert 'class="timeline"' in page
    for phase in ("prepare", "freeze", "cut", "thaw"):
        assert f">{phase}</text>" in page
    assert "/mnt/disk0" in page
    assert "/mnt/disk1" in page
    assert 'id="verify-button"' in page
    listing = (await client.get("/snapshots", headers=HTML)).text
    assert sid in listing
    assert "filesystem" in listing


async def test_forms_need_the_csrf_field(client: httpx.AsyncClient, svc: Service) -> None:
    await login(client)
    r = await client.post("/vms/web1/snapshots", data={"quiesce": "off"})
    assert r.status_code == 403
    assert "bad-csrf" in r.text
    r = await client.post("/vms/web1/snapshots", data={"quiesce": "off", "csrf": "0" * 64})
    assert r.status_code == 403
    assert (await svc.list_snapshots("web1")).items == ()


async def test_a_busy_vm_is_said_on_its_page(client: httpx.AsyncClient, svc: Service) -> None:
    from freezeframe.catalog import make_owner

    csrf = await login(client)
    cat = await svc.catalog()
    owner = make_owner()
    await cat.acquire_vm_lock("web1", owner)
    try:
        r = await client.post("/vms/web1/snapshots", data={"csrf": csrf, "quiesce": "off"})
    finally:
        await cat.release_vm_lock("web1", owner)
    assert r.status_code == 409
    assert "vm-busy" in r.text
    assert 'role="alert"' in r.text


async def test_text_from_outside_is_escaped(
    client: httpx.AsyncClient, svc: Service, web1: FakeVm
) -> None:
    out = await svc.create_snapshot("web1")
    await login(client)
    page = (await client.get(f"/snapshots/{out.record.id}", headers=HTML)).text
    assert "<script>alert" not in page  # (nothing injected) and the page renders
    bad = (await client.get("/vms/%3Cscript%3Ex", headers=HTML)).text
    assert "<script>x" not in bad
    assert "&lt;script&gt;x" in bad


def test_chart_phases_and_svg() -> None:
    ns = 1_000_000
    tl = [
        {"name": n, "mono_ns": t * ns}
        for n, t in [
            ("started", 0), ("prepared", 40), ("preflush_sent", 41), ("preflushed", 100),
            ("freeze_sent", 101), ("frozen", 180), ("cut_sent", 181), ("cut", 183),
            ("thaw_sent", 184), ("thawed", 192), ("thaw_confirmed", 195),
        ]
    ]  # fmt: skip
    ps = {p.name: p for p in phases(tl)}
    assert list(ps) == ["prepare", "pre-flush", "freeze", "cut", "thaw"]
    assert ps["freeze"].ms == pytest.approx(79)
    assert ps["thaw"].ms == pytest.approx(8)
    assert [p.in_window for p in ps.values()] == [False, False, True, True, True]
    svg = timeline_svg(tl, 91.0)
    assert svg.startswith("<svg")
    assert "freeze window (91.0 ms)" in svg
    assert timeline_svg([], None) == ""
    # a failed freeze is drawn as such, and the phases after it are absent
    failed = [{"name": "started", "mono_ns": 0}, {"name": "freeze_sent", "mono_ns": 5},
              {"name": "freeze_timeout", "mono_ns": 1005}]  # fmt: skip
    (fz,) = [p for p in phases(failed) if p.name == "freeze"]
    assert not fz.ok
