"""``freezeframe snapshot export`` in-process over a record of real qcow2 chains: the ``--json``
result, the files written, the exit codes and JSON errors of what is refused."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from tests.conftest import CatalogDb
from tests.unit._chains import backing_of, needs_qemu_img
from tests.unit._export_records import recorded
from tests.unit.test_cli_on_fakes import Cli

from freezeframe.models import SnapshotRecord
from freezeframe.service import Config, Service

pytestmark = needs_qemu_img


@pytest.fixture
def setup(
    catalog_db: CatalogDb,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Cli, SnapshotRecord]:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))

    async def make() -> SnapshotRecord:
        cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
        async with await Service.open(cfg) as svc:
            return await recorded(svc, tmp_path)

    return Cli(catalog_db.url, monkeypatch, capsys), asyncio.run(make())


def test_export_json(setup: tuple[Cli, SnapshotRecord], tmp_path: Path) -> None:
    cli, rec = setup
    to = tmp_path / "out"
    code, out = cli("snapshot", "export", rec.id, "--to", str(to), "--format", "raw", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["snapshot_id"] == rec.id
    assert doc["format"] == "raw"
    assert doc["directory"] == str(to)
    assert doc["metadata_path"] == str(to / "metadata.json")
    assert doc["verdict"] == "unverified"
    assert [(i["device"], i["path"]) for i in doc["images"]] == [
        ("vda", str(to / "vda.raw")),
        ("vdb", str(to / "vdb.raw")),
    ]
    assert sorted(os.listdir(to)) == ["metadata.json", "vda.raw", "vdb.raw"]
    assert backing_of(str(to / "vda.raw")) is None
    before = {p.name: p.stat().st_mtime_ns for p in to.iterdir()}
    # again into the same directory (as qcow2: only metadata.json is in the way): refused
    code, out = cli("snapshot", "export", rec.id, "--to", str(to), "--json")
    assert code == 2
    assert json.loads(out)["code"] == "export-target-exists"
    assert {p.name: p.stat().st_mtime_ns for p in to.iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (("--format", "vmdk"), "bad-export-format"),
        (("--format", "raw", "--compress"), "compress-needs-qcow2"),
    ],
)
def test_refusals_exit_2_with_their_code(
    setup: tuple[Cli, SnapshotRecord], tmp_path: Path, extra: tuple[str, ...], code: str
) -> None:
    cli, rec = setup
    rc, out = cli("snapshot", "export", rec.id, "--to", str(tmp_path / "o"), *extra, "--json")
    assert rc == 2
    assert json.loads(out)["code"] == code
    assert not (tmp_path / "o").exists()
