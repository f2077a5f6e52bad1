"""``freezeframe serve`` as a process (no VM): the token file, the address, a clean stop."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from freezeframe.cli.serve import parse_listen
from freezeframe.errors import UsageError
from tests.api.server import FF, ServeProcess


def test_serve_generates_the_token_and_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FREEZEFRAME_DATABASE_URL", raising=False)
    srv = ServeProcess(tmp_path / "serve.log")
    try:
        token_file = tmp_path / "home" / "api-token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert srv.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            assert c.get("/v1/vms").status_code == 401
            assert c.get("/v1/vms", headers=srv.auth).json() == []
    finally:
        code = srv.stop()
    assert code == 0, srv.output()
    assert "stopped" in srv.output()
    assert srv.token not in srv.output()
    assert str(token_file) in srv.output()
    # a second start keeps the token
    srv2 = ServeProcess(tmp_path / "serve2.log")
    try:
        assert srv2.token == srv.token
    finally:
        assert srv2.stop() == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "out of range"),
        (["--token-file", "/nonexistent/token"], "does not exist"),
    ],
)
def test_serve_refuses_bad_input_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], words: str
) -> None:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    r = subprocess.run([*FF, "serve", *args], env=dict(os.environ), capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert words in r.stderr


def test_a_busy_port_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([*FF, "serve", "--listen", f"127.0.0.1:{port}"], env=dict(os.environ),
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("8787", ":8787", "host:", "host:http"):
        with pytest.raises(UsageError):
            parse_listen(bad)
