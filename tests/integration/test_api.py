"""``freezeframe serve`` as a real process on a real lab VM (ext4 + xfs under the writer, the
real qemu-ga), driven with httpx: create through ``POST``, follow the event stream to its end,
``GET`` the record; ``401``; ``409 vm-busy`` for a concurrent create (from the same server,
from a second server on the same catalog, from the CLI); a client that drops mid-create; a
SIGTERM while a snapshot runs; ``404``; ``422``. One lab VM and one server for the module (TCG
guests are slow on two cores)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import FF, ServeProcess, follow_events, lab_down, lab_up

pytestmark = pytest.mark.integration

VM = f"api{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def lab(lab_env: Path) -> Iterator[str]:
    """One lab VM for the module, purged at the end."""
    try:
        lab_up(VM)
        yield VM
    finally:
        lab_down(VM)


@pytest.fixture(scope="module")
def server(
    lab: str, lab_env: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.output()
        assert srv.token not in srv.output()  # never logged


def wait_done(client: httpx.Client, sid: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec: dict[str, Any] = client.get(f"/v1/snapshots/{sid}").json()
        if rec["status"] != "running":
            return rec
        assert time.monotonic() < deadline, rec
        time.sleep(0.2)


def step_names(rec: dict[str, Any]) -> list[str]:
    return [e["name"] for e in rec["timeline"]]


def assert_thawed(client: httpx.Client, rec: dict[str, Any]) -> None:
    names = step_names(rec)
    assert "thaw_confirmed" in names, names
    assert not rec["thaw_unconfirmed"]
    doctor = client.get(f"/v1/vms/{rec['vm']}/doctor").json()
    frozen = [c for c in doctor["checks"] if c["status"] == "fail"]
    assert doctor["ok"], frozen


def test_create_follow_and_get(server: ServeProcess, lab: str) -> None:
    with server.client() as c:
        r = c.post(f"/v1/vms/{lab}/snapshots", json={"quiesce": "required", "verify": True})
        assert r.status_code == 202, r.text
        sid = r.json()["id"]
        assert r.headers["location"] == f"/v1/snapshots/{sid}"
        events = follow_events(c, sid)
        kinds = [k for k, _ in events]
        steps = [d["name"] for k, d in events if k == "step"]
        assert kinds[-2:] == ["outcome", "record"], kinds
        assert events[-2][1]["code"] == "done"
        for a, b in [("started", "prepared"), ("prepared", "freeze_sent"),
                     ("freeze_sent", "cut"), ("cut", "thawed")]:  # fmt: skip
            assert steps.index(a) < steps.index(b), steps
        rec = c.get(f"/v1/snapshots/{sid}").json()
        assert rec == events[-1][1]
        assert rec["status"] == "done"
        assert rec["level"] == "filesystem"
        assert rec["verification"]["verdict"] == "verified-consistent"
        assert {f["fstype"] for f in rec["filesystems"] if f["frozen"]} == {"ext4", "xfs"}
        assert rec["freeze_window_ms"] > 0
        assert_thawed(c, rec)
        # the CLI shows the same document
        show = subprocess.run([*FF, "snapshot", "show", sid, "--json"], env=dict(os.environ),
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(show.stdout) == c.get(f"/v1/snapshots/{sid}?live=true").json()
        metrics = c.get("/metrics").text
        assert 'freezeframe_snapshots_total{level="filesystem",outcome="done"}' in metrics
        assert "freezeframe_freeze_window_seconds_count" in metrics


def test_without_the_token_401(server: ServeProcess, lab: str) -> None:
    with server.client() as c:
        before = len(c.get(f"/v1/vms/{lab}/snapshots?limit=1000").json()["items"])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/vms"), ("POST", f"/v1/vms/{lab}/snapshots"),
                             ("GET", "/v1/snapshots"), ("GET", "/metrics")]:  # fmt: skip
            r = c.request(method, path)
            assert r.status_code == 401
            assert r.json()["code"] == "unauthorized"
    with server.client() as c:  # the refused POST started nothing
        assert len(c.get(f"/v1/vms/{lab}/snapshots?limit=1000").json()["items"]) == before


def test_unknown_vm_404_and_malformed_body_422(server: ServeProcess, lab: str) -> None:
    with server.client() as c:
        r = c.post("/v1/vms/no-such-vm/snapshots", json={})
        assert r.status_code == 404
        assert r.json()["code"] == "vm-not-found"
        r = c.post(f"/v1/vms/{lab}/snapshots", content=b'{"quiesce": ',
                   headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 422
        assert set(r.json()) == {"code", "message", "hint"}
        assert r.json()["code"] == "invalid-request"
        r = c.post(f"/v1/vms/{lab}/snapshots", json={"quiesce": "always"})
        assert r.status_code == 422
        assert r.json()["code"] == "invalid-request"


def test_concurrent_creates_are_409_vm_busy(server: ServeProcess, lab: str, tmp_path: Path) -> None:
    second = ServeProcess(tmp_path / "second.log")  # another server on the same catalog
    try:
        with server.client() as c, second.client() as c2:
            # a server's job holds the VM: the same server and the second one refuse
            r = c.post(f"/v1/vms/{lab}/snapshots", json={"verify": True})
            assert r.status_code == 202, r.text
            sid = r.json()["id"]
            busy = c.post(f"/v1/vms/{lab}/snapshots", json={})
            busy2 = c2.post(f"/v1/vms/{lab}/snapshots", json={})
            rec = wait_done(c, sid)
            assert busy.status_code == 409, busy.text
            assert busy.json()["code"] == "vm-busy"
            assert busy2.status_code == 409, busy2.text
            assert busy2.json()["code"] == "vm-busy"
            assert rec["status"] == "done"
            assert rec["level"] == "filesystem"
            # the CLI holds the VM (frozen for 2 s): both servers refuse
            before = {d["id"] for d in c.get("/v1/snapshots?limit=1000").json()["items"]}
            cli = subprocess.Popen(
                [*FF, "snapshot", "create", lab, "--hold-frozen", "2"], env=dict(os.environ),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while not {d["id"] for d in c.get("/v1/snapshots").json()["items"]} - before:
                    assert cli.poll() is None, cli.communicate()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                during = [x.post(f"/v1/vms/{lab}/snapshots", json={}) for x in (c, c2)]
                assert cli.poll() is None  # still running: the refusals were because of it
            finally:
                _out, err = cli.communicate(timeout=120)
            assert cli.returncode == 0, err
            for refused in during:
                assert refused.status_code == 409, refused.text
                assert refused.json()["code"] == "vm-busy"
    finally:
        assert second.stop() == 0, second.output()


def test_a_client_that_drops_mid_create(server: ServeProcess, lab: str) -> None:
    with server.client() as c:
        sid = c.post(f"/v1/vms/{lab}/snapshots", json={"quiesce": "required"}).json()["id"]
        first = follow_events(c, sid, stop_after=1)  # then the connection is dropped
        assert first[0][0] == "step"
    # a POST whose client hangs up before reading the answer
    body = b'{"quiesce": "required"}'
    raw = (
        f"POST /v1/vms/{lab}/snapshots HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with server.client() as c:
        rec = wait_done(c, sid)
        assert rec["status"] == "done"
        assert rec["level"] == "filesystem"
        assert_thawed(c, rec)
        before = {d["id"] for d in c.get(f"/v1/vms/{lab}/snapshots?limit=1000").json()["items"]}
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
        deadline = time.monotonic() + 60
        new: set[str] = set()
        while not new:
            assert time.monotonic() < deadline, "the dropped POST started no snapshot"
            time.sleep(0.2)
            items = c.get(f"/v1/vms/{lab}/snapshots?limit=1000").json()["items"]
            new = {d["id"] for d in items} - before
        (sid2,) = new
        rec2 = wait_done(c, sid2)
        assert rec2["status"] == "done"
        assert rec2["level"] == "filesystem"
        assert_thawed(c, rec2)


def test_sigterm_lets_the_running_snapshot_finish(lab: str, tmp_path: Path) -> None:
    srv = ServeProcess(tmp_path / "sigterm.log")
    try:
        with srv.client() as c:
            sid = c.post(f"/v1/vms/{lab}/snapshots", json={"quiesce": "required"}).json()["id"]
            srv.proc.send_signal(signal.SIGTERM)
            code = srv.proc.wait(180)
    finally:
        srv.stop()
    assert code == 0, srv.output()
    show = subprocess.run([*FF, "snapshot", "show", sid, "--json"], env=dict(os.environ),
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    rec = json.loads(show.stdout)
    assert rec["status"] == "done", rec
    assert rec["level"] == "filesystem"
    assert "thaw_confirmed" in step_names(rec)
    assert not rec["thaw_unconfirmed"]
