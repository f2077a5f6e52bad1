"""The lab Ceph for integration tests: ``ceph_lab`` (session fixture, in conftest.py) and its
helpers. One cluster for the session, started with ``lab ceph up --port P --json`` on a free
port in the session's private FREEZEFRAME_HOME, stopped at the end with ``lab ceph down --purge
--json`` and, should that fail, by its recorded PIDs. Missing Debian packages are installed
when the session is root; otherwise the tests are skipped, saying which packages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from freezeframe.errors import DependencyError
from freezeframe.lab._ceph import check_ceph_dependencies
from freezeframe.storage.rbd import CephSettings

FF = [sys.executable, "-m", "freezeframe.cli.main"]
SECRET = "AQBs3cr3tK3yTh4tMustN3v3rSh0w=="


def ff(*args: str, timeout: float = 240.0, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [*FF, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ceph_pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X") and b"ceph-" in argv0


@dataclass
class CephHandle:
    doc: dict[str, Any]
    pids: set[int] = field(default_factory=set)

    @property
    def conf(self) -> Path:
        return Path(self.doc["conf"])

    @property
    def pool(self) -> str:
        return str(self.doc["pool"])

    def settings(self, **kw: Any) -> CephSettings:
        return CephSettings(conf=self.conf, **kw)

    def rbd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rbd", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )


def _ensure_packages() -> None:
    try:
        check_ceph_dependencies()
    except DependencyError as exc:
        if os.geteuid() != 0:
            pytest.skip(
                f"the lab Ceph needs Debian packages that are not installed: {exc.package} "
                "(as root the tests install them)"
            )
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *exc.package.split()],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
        check_ceph_dependencies()


def ceph_lab_session() -> Iterator[CephHandle]:
    _ensure_packages()
    res = ff("lab", "ceph", "up", "--port", str(free_port()), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    handle = CephHandle(doc, {d["pid"] for d in doc["daemons"]})
    try:
        yield handle
    finally:
        down = ff("lab", "ceph", "down", "--purge", "--json")
        left = [pid for pid in handle.pids if ceph_pid_alive(pid)]
        for pid in left:  # lab ceph down failed: stop them by PID anyway
            os.kill(pid, signal.SIGKILL)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"ceph daemons survived lab ceph down: {left}"
