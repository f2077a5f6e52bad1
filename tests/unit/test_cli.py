"""The CLI's contract without a VM: bad input gets a clear message and a stable exit code,
``--json`` gives one JSON document, nothing is written by a refused command."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path


def test_unknown_names_exit_2(ff) -> None:  # type: ignore[no-untyped-def]
    for args in (
        ("snapshot", "show", "nope"),
        ("snapshot", "create", "nope"),
        ("snapshot", "list", "nope"),
        ("doctor", "nope"),
        ("snapshot", "verify", "nope"),
    ):
        r = ff(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "nope" in r.stderr


def test_json_errors_are_json(ff) -> None:  # type: ignore[no-untyped-def]
    r = ff("snapshot", "show", "nope", "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["error"] == "NotFoundError"
    assert doc["exit_code"] == 2


def test_vm_add_list_remove(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = ff("vm", "add", "web1", "--qmp", str(tmp_path / "qmp.sock"), "--quiesce", "required")
    assert r.returncode == 0, r.stderr
    assert ff("vm", "add", "web1", "--qmp", "/x").returncode == 2  # already registered
    (vm,) = json.loads(ff("vm", "list", "--json").stdout)
    assert vm["name"] == "web1"
    assert vm["quiesce"] == "required"
    bad = ff("vm", "add", "web2", "--qmp", "/x", "--quiesce", "sometimes")
    assert bad.returncode == 2
    assert ff("vm", "add", "web3", "--qmp", "/x", "--freeze-timeout", "0").returncode == 2
    assert len(json.loads(ff("vm", "list", "--json").stdout)) == 1
    assert ff("vm", "remove", "web1").returncode == 0
    assert json.loads(ff("vm", "list", "--json").stdout) == []


def test_doctor_on_unreachable_vm_fails_with_a_fix(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ff("vm", "add", "gone", "--qmp", str(tmp_path / "missing.sock"))
    r = ff("doctor", "gone", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    hv = next(c for c in doc["checks"] if c["name"] == "hypervisor")
    assert hv["status"] == "fail"
    assert hv["fix"]
    assert doc["predicted_level"] == "none"


def test_snapshot_of_unreachable_vm_fails_and_is_recorded(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ff("vm", "add", "gone", "--qmp", str(tmp_path / "missing.sock"))
    r = ff("snapshot", "create", "gone", "--json")
    assert r.returncode == 10, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["snapshot_id"]
    (rec,) = json.loads(ff("snapshot", "list", "gone", "--json").stdout)
    assert rec["status"] == "failed"
    assert rec["id"] == doc["snapshot_id"]


def test_recover_with_nothing_open(ff) -> None:  # type: ignore[no-untyped-def]
    r = ff("recover")
    assert r.returncode == 0
    assert "no open freeze intents" in r.stdout
    assert json.loads(ff("recover", "--json").stdout) == []


def test_lab_up_refuses_the_name_of_a_registered_vm(ff) -> None:  # type: ignore[no-untyped-def]
    ff("vm", "add", "web1", "--qmp", "/x")
    r = ff("lab", "up", "web1")
    assert r.returncode == 2
    assert "not a lab VM" in r.stderr
    assert ff("lab", "list", "--json").stdout.strip() == "[]"  # nothing was booted


def test_database_url_option(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "other.sqlite"
    assert ff("--database-url", f"sqlite:///{db}", "vm", "add", "a", "--qmp", "/x").returncode == 0
    assert db.exists()
    assert json.loads(ff("vm", "list", "--json").stdout) == []  # the default catalog is another
    listed = ff("--database-url", f"sqlite:///{db}", "vm", "list", "--json").stdout
    assert [v["name"] for v in json.loads(listed)] == ["a"]


def test_purge_forgets_catalog_entries_of_a_lab_vm_whose_directory_is_gone(  # type: ignore[no-untyped-def]
    ff, tmp_path: Path
) -> None:
    # Left by an older version, or a lab directory removed by hand: a registration and a
    # record whose images lived in the lab directory; an unrelated VM's record stays.
    from datetime import UTC, datetime

    from freezeframe.catalog import Catalog
    from freezeframe.models import (
        ConsistencyLevel,
        QuiescePolicy,
        SnapshotDisk,
        SnapshotRecord,
        SnapshotStatus,
        VmConfig,
    )

    url = f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}"
    labdir = tmp_path / "home" / "lab" / "ghost"

    def rec(sid: str, image: str) -> SnapshotRecord:
        disk = SnapshotDisk("disk0", "disk0", image, "qcow2", image + ".ff")
        return SnapshotRecord(
            sid, "ghost", datetime.now(UTC), SnapshotStatus.DONE, QuiescePolicy.OFF,
            ConsistencyLevel.CRASH, disks=(disk,),
        )  # fmt: skip

    async def seed() -> None:
        async with await Catalog.open(url) as cat:
            await cat.add_vm(VmConfig(name="ghost", qmp_path=str(labdir / "qmp.sock"), lab=True))
            for r in (
                rec("in-lab", str(labdir / "disk0.qcow2")),
                rec("elsewhere", "/srv/x"),
                rec("in-lab-ceph", "rbd:rbd/fflab-ghost-disk1@ff-in-lab-ceph"),  # lab up --rbd
                rec("other-ceph", "rbd:volumes/prod-disk1@ff-other-ceph"),
            ):
                await cat.begin_snapshot(replace(r, status=SnapshotStatus.RUNNING))
                await cat.finish_snapshot(r)

    asyncio.run(seed())
    r = ff("lab", "down", "ghost", "--purge", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "name": "ghost", "stopped": False, "purged": True, "snapshots_removed": 2,
    }  # fmt: skip
    listed = json.loads(ff("snapshot", "list", "--json").stdout)
    assert sorted(x["id"] for x in listed) == ["elsewhere", "other-ceph"]
    assert json.loads(ff("vm", "list", "--json").stdout) == []
    again = ff("lab", "down", "ghost", "--purge", "--json")  # nothing left of it now
    assert again.returncode == 2


def test_purge_never_touches_a_vm_that_is_not_a_lab_vm(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A snapshot of "web1" killed while frozen left a running record without disks and an open
    # intent: `recover` needs both. `lab down web1 --purge` must leave them alone.
    from datetime import UTC, datetime

    from freezeframe.catalog import Catalog
    from freezeframe.models import (
        ConsistencyLevel,
        QuiescePolicy,
        SnapshotRecord,
        SnapshotStatus,
        VmConfig,
    )

    url = f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}"

    async def seed(registered: bool) -> None:
        async with await Catalog.open(url) as cat:
            if registered:
                await cat.add_vm(VmConfig(name="web1", qmp_path="/run/web1.qmp"))
            await cat.begin_snapshot(
                SnapshotRecord(
                    f"s-{registered}",
                    "web1",
                    datetime.now(UTC),
                    SnapshotStatus.RUNNING,
                    QuiescePolicy.REQUIRED,
                    ConsistencyLevel.NONE,
                )
            )
            await cat.open_intent("web1", f"s-{registered}", "/run/web1.qga", "h:1:x")

    async def left() -> tuple[int, int]:
        async with await Catalog.open(url) as cat:
            return len(await cat.list_snapshots()), len(await cat.open_intents())

    for registered, n in ((True, 1), (False, 2)):  # registered, then removed with vm remove
        if not registered:
            assert ff("vm", "remove", "web1").returncode == 0
        asyncio.run(seed(registered))
        r = ff("lab", "down", "web1", "--purge", "--json")
        assert r.returncode == 2, r.stdout
        assert asyncio.run(left()) == (n, n)


def test_recover_exits_9_when_it_skips_a_live_process_intent(ff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import socket

    from freezeframe.catalog import Catalog
    from freezeframe.models import VmConfig

    url = f"sqlite:///{tmp_path / 'home' / 'catalog.sqlite'}"
    alive = f"{socket.gethostname()}:{os.getpid()}:test"  # this very process

    async def seed() -> None:
        async with await Catalog.open(url) as cat:
            await cat.add_vm(VmConfig(name="web1", qmp_path="/run/web1.qmp"))
            await cat.open_intent("web1", "s1", "/run/web1.qga", alive)

    asyncio.run(seed())
    r = ff("recover", "--json")
    assert r.returncode == 9, r.stderr
    (out,) = json.loads(r.stdout)
    assert out["skipped"] is True
    assert "live process" in out["detail"]


def test_an_emptied_catalog_file_is_an_error_naming_it_not_a_new_catalog(  # type: ignore[no-untyped-def]
    ff, tmp_path: Path
) -> None:
    # Issue 12 item 5: `snapshot list` said "no snapshots" and `recover` "no open freeze
    # intents" on a 0-byte catalog, re-initialising it. Exit 8 naming the file, left as it is.
    db = tmp_path / "home" / "catalog.sqlite"
    db.parent.mkdir(parents=True)
    db.touch()
    for args in (("snapshot", "list"), ("recover",)):
        r = ff(*args, "--json")
        assert r.returncode == 8, r.stderr
        doc = json.loads(r.stdout)
        assert doc["error"] == "CatalogError"
        assert str(db) in doc["message"]
        assert "empty" in doc["message"]
        assert "backup" in doc["hint"]
    assert db.stat().st_size == 0
