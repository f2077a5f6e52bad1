"""The lab Ceph's logic that needs no cluster: dependency errors, its conf, status and down
of a lab Ceph that does not exist, option checks, the CLI's errors."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from tests.unit.conftest import Ff

from freezeframe import _tools
from freezeframe.errors import DependencyError, NotFoundError, UsageError
from freezeframe.lab import _ceph
from freezeframe.lab._ceph import ceph_down, ceph_status, ceph_up, check_ceph_dependencies


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_missing_packages_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def require(program: str, package: str | None = None) -> str:
        if program in ("ceph-osd", "ceph-mgr"):
            raise DependencyError(f"{program} is not installed", package=package or program)
        return f"/usr/bin/{program}"

    monkeypatch.setattr(_tools, "require", require)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "rados" else object()
    )
    with pytest.raises(DependencyError) as exc:
        check_ceph_dependencies(mgr=True)
    assert exc.value.package == "ceph-osd ceph-mgr python3-rados"
    assert exc.value.code == "dependency-missing"
    assert "--no-install-recommends ceph-osd ceph-mgr python3-rados" in (exc.value.hint or "")
    with pytest.raises(DependencyError) as no_mgr:
        check_ceph_dependencies(mgr=False)
    assert no_mgr.value.package == "ceph-osd python3-rados"


def test_conf_follows_the_measured_recipe(tmp_path: Path) -> None:
    fast = _ceph._conf_text(tmp_path, fsid="f", port=3301, paxos_interval=0.01)
    slow = _ceph._conf_text(tmp_path, fsid="f", port=3301, paxos_interval=1.0)
    assert "paxos propose interval = 0.01\n" in fast
    assert "paxos propose interval = 1\n" in slow
    assert "mon host = v2:127.0.0.1:3301\n" in fast
    assert "bluestore block path" not in fast  # left unset: a block file in the OSD's folder
    assert "auth client required = none" in fast
    assert "osd pool default size = 1\n" in fast
    client = fast.split("[client]", 1)[1]
    assert "admin socket =\n" in client  # no shared admin socket for clients
    assert f"{tmp_path}/run/$name.asok" in fast.split("[client]", 1)[0]


def test_status_and_down_without_a_cluster(home: Path) -> None:
    with pytest.raises(NotFoundError) as exc:
        ceph_status()
    assert exc.value.code == "ceph-not-found"


async def test_down_without_a_cluster_is_fine(home: Path) -> None:
    res = await ceph_down()
    assert (res.stopped, res.purged, res.existed) == ((), False, False)
    res = await ceph_down(purge=True)
    assert (res.stopped, res.purged, res.existed) == ((), False, False)


@pytest.mark.parametrize(
    "kwargs", [{"paxos": "slow"}, {"port": 0}, {"port": 70000}, {"timeout": 0.0}]
)
async def test_up_refuses_bad_options(home: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        await ceph_up(**kwargs)  # type: ignore[arg-type]
    assert not (home / "lab" / "_ceph").exists()


def test_alive_ignores_other_processes_and_zombies(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    assert not _ceph._alive(os.getpid(), "ceph-mon", conf)  # pytest is no ceph-mon
    assert not _ceph._alive(0, "ceph-mon", conf)
    assert not _ceph._alive(2**22 + 12345, "ceph-mon", conf)


def test_cli_status_without_a_cluster(ff: Ff) -> None:
    res = ff("lab", "ceph", "status", "--json")
    assert res.returncode == 2
    doc = json.loads(res.stdout)
    assert doc["code"] == "ceph-not-found"
    down = ff("lab", "ceph", "down", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["existed"] is False
    bad = ff("lab", "ceph", "up", "--paxos", "slow", "--json")
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["code"] == "invalid-argument"
