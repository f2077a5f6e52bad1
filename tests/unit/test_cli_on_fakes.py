"""The CLI in-process over the fake hypervisor (:mod:`freezeframe.testing`), once per catalog
backend: ``vm images --json``, ``snapshot list --status failed`` and ``snapshot show --json``
of a done snapshot, as an operator's scripts read them."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import CatalogDb

from freezeframe.cli.main import main
from freezeframe.errors import SnapshotFailedError
from freezeframe.models import QuiescePolicy
from freezeframe.service import Config, CreateSnapshot, Service
from freezeframe.testing import FakeHost, FakeVm


class Cli:
    def __init__(
        self, url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.url, self.monkeypatch, self.capsys = url, monkeypatch, capsys

    def __call__(self, *args: str) -> tuple[int, str]:
        """``freezeframe --database-url URL ARGS...`` in this process: (exit code, stdout)."""
        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "argv", ["freezeframe", "--database-url", self.url, *args])
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 0
        return code, self.capsys.readouterr().out


@pytest.fixture
def world(
    host: FakeHost,
    catalog_db: CatalogDb,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Cli, dict[str, Any]]:
    """``web1`` with a done snapshot, ``db`` (a vfat disk) with a failed one (policy
    required); the CLI on that catalog."""
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    web1 = host.add(FakeVm.simple("web1"))
    db = host.add(FakeVm.simple("db", ("ext4", "vfat")))

    async def setup() -> dict[str, Any]:
        cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
        async with await Service.open(cfg) as svc:
            for vm in (web1, db):
                await (await svc.catalog()).add_vm(vm.config())
            done = await svc.create_snapshot("web1")
            with pytest.raises(SnapshotFailedError) as failed:
                await svc.create_snapshot("db", CreateSnapshot(quiesce=QuiescePolicy.REQUIRED))
            return {"done": done.record, "failed": failed.value.snapshot_id}

    made = asyncio.run(setup())
    return Cli(catalog_db.url, monkeypatch, capsys), made


def test_vm_images_json(world: tuple[Cli, dict[str, Any]]) -> None:
    cli, made = world
    code, out = cli("vm", "images", "web1", "--json")
    assert code == 0, out
    rows = json.loads(out)
    overlays = {d.device: d.overlay for d in made["done"].disks}
    assert {r["device"]: r["boot_from"] for r in rows} == overlays
    assert {r["device"]: r["running_on"] for r in rows} == overlays
    code, out = cli("vm", "images", "nope", "--json")
    assert code == 2
    assert json.loads(out)["code"] == "vm-not-found"


def test_snapshot_list_status_failed(world: tuple[Cli, dict[str, Any]]) -> None:
    cli, made = world
    code, out = cli("snapshot", "list", "--status", "failed", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert [(r["id"], r["status"]) for r in rows] == [(made["failed"], "failed")]
    code, out = cli("snapshot", "list", "--status", "done", "--json")
    assert [r["id"] for r in json.loads(out)] == [made["done"].id]
    code, out = cli("snapshot", "list", "--status", "failed")  # text: the failed one only
    assert code == 0
    assert made["failed"][:12] in out
    assert made["done"].id[:12] not in out


def test_snapshot_show_json_of_a_done_snapshot(world: tuple[Cli, dict[str, Any]]) -> None:
    cli, made = world
    code, out = cli("snapshot", "show", made["done"].id, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["status"] == "done"
    assert "error" in doc
    assert doc["error"] is None
    assert doc["qemu_runs_on"] == {d.device: d.overlay for d in made["done"].disks}
    code, out = cli("snapshot", "show", made["failed"], "--json")
    assert code == 0, out
    failed = json.loads(out)
    assert failed["status"] == "failed"
    assert failed["error"]
