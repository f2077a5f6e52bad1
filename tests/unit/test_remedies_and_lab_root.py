"""Findings say what helps as data (a remedy each face renders), never in one face's syntax;
the service's lab operations work under its ``Config.state_dir``, not the environment's."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.conftest import CatalogDb

from freezeframe import lab as _lab
from freezeframe import paths
from freezeframe.api._errors import render_remedy
from freezeframe.cli._hints import render
from freezeframe.engine import CheckStatus
from freezeframe.errors import Action, Remedy, SnapshotFailedError
from freezeframe.models import QuiescePolicy
from freezeframe.service import Config, CreateSnapshot, Service
from freezeframe.testing import FakeHost, FakeVm

#: A face's syntax in a neutral text: an option, or a command line of the CLI.
CLI_SYNTAX = re.compile(r"(^|\s)--[a-z]|freezeframe [a-z]")


def test_snapshot_options_render_in_each_faces_words() -> None:
    two = Remedy(Action.EXCLUDE_DISK, "web1", {"disk": "vdb,vdc"})
    mount = Remedy(Action.EXCLUDE_MOUNT, "web1", {"mount": "/boot/efi"})
    quiesce = Remedy(Action.SET_QUIESCE, "web1", {"quiesce": "preferred"})
    assert (
        render(two)
        == "run `freezeframe snapshot create web1 --exclude-disk vdb --exclude-disk vdc`"
    )
    assert render(mount) == "run `freezeframe snapshot create web1 --exclude-mount /boot/efi`"
    assert render(quiesce) == "run `freezeframe snapshot create web1 --quiesce preferred`"
    assert render_remedy(two) == 'POST /v1/vms/web1/snapshots {"exclude_disks": ["vdb", "vdc"]}'
    assert render_remedy(mount) == 'POST /v1/vms/web1/snapshots {"exclude_mounts": ["/boot/efi"]}'
    assert render_remedy(quiesce) == 'POST /v1/vms/web1/snapshots {"quiesce": "preferred"}'
    # the API names its body's fields (not the CLI's option names), flags as true
    overlay = Remedy(Action.ADD_VM, "web1", {"replace": "yes", "overlay-dir": "DIR"})
    assert render(overlay) == "run `freezeframe vm add web1 --replace --overlay-dir DIR`"
    assert render_remedy(overlay) == (
        'POST /v1/vms {"name": "web1", "replace": true, "overlay_dir": "DIR"}'
    )
    for action in Action:  # every action has words in both faces
        assert render(Remedy(action, "x"))
        assert render_remedy(Remedy(action, "x")) != action.value
    assert render_remedy(Remedy(Action.VERIFY, params={"id": "ab12"})) == (
        "POST /v1/snapshots/ab12/verify"
    )


@pytest.fixture
async def svc(catalog_db: CatalogDb, tmp_path: Path) -> AsyncIterator[Service]:
    async with await Service.open(
        Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
    ) as s:
        yield s


async def test_an_unfreezable_filesystem_has_remedies_not_options(
    svc: Service, host: FakeHost
) -> None:
    vm = host.add(FakeVm.simple("web1", ("ext4", "vfat")))
    await (await svc.catalog()).add_vm(vm.config())
    with pytest.raises(SnapshotFailedError) as ei:
        await svc.create_snapshot("web1", CreateSnapshot(quiesce=QuiescePolicy.REQUIRED))
    assert ei.value.code == "fs-not-freezable"
    assert ei.value.remedy == Remedy(Action.DOCTOR, "web1")
    assert not CLI_SYNTAX.search(ei.value.message), ei.value.message
    assert not CLI_SYNTAX.search(ei.value.hint or ""), ei.value.hint

    report = await svc.doctor("web1", quiesce=QuiescePolicy.REQUIRED)
    checks = {c.name: c for c in report.checks}
    vfat = checks["fs /mnt/disk1"]
    assert vfat.status is CheckStatus.FAIL
    assert vfat.remedy == Remedy(Action.EXCLUDE_MOUNT, "web1", {"mount": "/mnt/disk1"})
    outcome = checks["policy outcome"]
    assert outcome.remedy == Remedy(Action.SET_QUIESCE, "web1", {"quiesce": "preferred"})
    for c in report.checks:  # no check speaks a face's syntax itself
        assert not CLI_SYNTAX.search(c.fix), (c.name, c.fix)
        assert not CLI_SYNTAX.search(c.detail), (c.name, c.detail)


async def test_no_agent_channel_offers_quiesce_preferred(svc: Service, host: FakeHost) -> None:
    vm = host.add(FakeVm.simple("web1", agent_channel=False))
    await (await svc.catalog()).add_vm(vm.config())
    with pytest.raises(SnapshotFailedError) as ei:
        await svc.create_snapshot("web1", CreateSnapshot(quiesce=QuiescePolicy.REQUIRED))
    assert ei.value.code == "agent-unreachable"
    assert ei.value.remedy == Remedy(Action.SET_QUIESCE, "web1", {"quiesce": "preferred"})


async def test_lab_operations_use_the_services_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab finds its files under paths.lab_dir(): inside the service's calls (threads
    and coroutines alike) that is Config.state_dir's, whatever $FREEZEFRAME_HOME says; outside
    them the environment still decides."""
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "env"))
    seen: list[Path] = []

    def lab_list() -> list[object]:  # runs in a worker thread
        seen.append(paths.lab_dir())
        return []

    async def ceph_down(*, purge: bool = False) -> object:  # a coroutine
        seen.append(paths.lab_dir())
        return None

    monkeypatch.setattr(_lab, "lab_list", lab_list)
    monkeypatch.setattr(_lab, "ceph_down", ceph_down)
    one = Service(Config(state_dir=tmp_path / "one"))
    two = Service(Config(state_dir=tmp_path / "two"))
    await one.lab_list()
    await two.ceph_down()
    assert seen == [tmp_path / "one" / "lab", tmp_path / "two" / "lab"]
    assert paths.lab_dir() == tmp_path / "env" / "lab"  # outside: the environment
    with paths.using_state_dir(tmp_path / "x"):
        assert paths.state_dir() == tmp_path / "x"
    assert paths.state_dir() == tmp_path / "env"
