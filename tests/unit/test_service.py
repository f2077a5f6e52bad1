"""The service layer (:mod:`freezeframe.service`) on the fakes of :mod:`freezeframe.testing`,
once per catalog backend (SQLite, PostgreSQL): every outcome and error is asserted by its
stable code, the way the faces decide."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.conftest import CatalogDb

from freezeframe.catalog import make_owner
from freezeframe.cli._hints import render
from freezeframe.errors import (
    Action,
    AlreadyExistsError,
    BusyError,
    NotFoundError,
    Remedy,
    SnapshotFailedError,
    UsageError,
    VerifyError,
)
from freezeframe.models import ConsistencyLevel, QuiescePolicy, SnapshotStatus, VmConfig
from freezeframe.service import (
    Config,
    CreateSnapshot,
    Outcome,
    RecoverCode,
    Service,
    VerifyOutcome,
    VmSpec,
    error_document,
    to_document,
)
from freezeframe.testing import AgentFault, FakeHost, FakeVm


@pytest.fixture
async def svc(catalog_db: CatalogDb, tmp_path: Path) -> AsyncIterator[Service]:
    cfg = Config(state_dir=tmp_path / "home", database_url=catalog_db.url)
    async with await Service.open(cfg) as s:
        yield s


async def _vm(svc: Service, host: FakeHost, name: str, *fstypes: str, **cfg: object) -> FakeVm:
    vm = host.add(FakeVm.simple(name, fstypes or ("ext4", "xfs")))
    await (await svc.catalog()).add_vm(vm.config(**cfg))
    return vm


REQUIRED = CreateSnapshot(quiesce=QuiescePolicy.REQUIRED)


# ------------------------------------------------------------------ snapshot outcomes


async def test_done_at_the_level_asked(svc: Service, host: FakeHost) -> None:
    vm = await _vm(svc, host, "web1")
    seen: list[str] = []
    out = await svc.create_snapshot("web1", REQUIRED, progress=lambda ev: seen.append(ev.name))
    assert out.code is Outcome.DONE
    assert out.record.level is ConsistencyLevel.FILESYSTEM
    assert out.asked is ConsistencyLevel.FILESYSTEM
    assert "thawed" in seen  # progress saw the freeze window's steps (after the thaw)
    assert vm.guest is not None
    assert not vm.guest.frozen
    assert to_document(out)["code"] == "done"


async def test_preferred_that_falls_back_is_weaker_than_asked(svc: Service, host: FakeHost) -> None:
    vm = await _vm(svc, host, "web1")
    assert vm.guest is not None
    vm.guest.script("guest-fsfreeze-freeze", AgentFault.REFUSE)
    out = await svc.create_snapshot("web1", CreateSnapshot(quiesce=QuiescePolicy.PREFERRED))
    assert out.code is Outcome.WEAKER
    assert out.record.level is ConsistencyLevel.CRASH
    assert out.record.status is SnapshotStatus.DONE


async def test_quiesce_off_asks_for_crash_only(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host, "web1")
    out = await svc.create_snapshot("web1", CreateSnapshot(quiesce=QuiescePolicy.OFF))
    assert (out.code, out.asked) == (Outcome.DONE, ConsistencyLevel.CRASH)


async def test_unconfirmed_thaw_is_an_outcome_with_its_code(svc: Service, host: FakeHost) -> None:
    vm = await _vm(svc, host, "web1")
    assert vm.guest is not None
    vm.guest.script("guest-fsfreeze-thaw", AgentFault.REFUSE)
    out = await svc.create_snapshot("web1", CreateSnapshot(quiesce=QuiescePolicy.PREFERRED))
    assert out.code is Outcome.THAW_UNCONFIRMED
    assert to_document(out.record)["thaw_unconfirmed"] is True
    # the intent belongs to this (live) process: recover leaves it alone unless forced
    report = await svc.recover("web1")
    assert report.code is RecoverCode.INTENTS_SKIPPED
    err = report.error()
    assert err is not None
    assert (err.code, err.exit_code) == ("intents-skipped", 9)
    # forced, it cannot thaw either while the agent refuses: the report says so by its code
    report = await svc.recover("web1", force=True)
    assert report.code is RecoverCode.THAW_UNCONFIRMED
    err = report.error()
    assert err is not None
    assert (err.code, err.exit_code) == ("thaw-unconfirmed", 12)
    vm.guest.script("guest-fsfreeze-thaw", None)
    report = await svc.recover("web1", force=True)
    assert report.code is RecoverCode.DONE
    assert [o.code for o in report.outcomes] == ["thawed"]
    assert report.error() is None


async def test_required_with_an_unfreezable_filesystem_fails_with_its_code(
    svc: Service, host: FakeHost
) -> None:
    await _vm(svc, host, "web1", "ext4", "vfat")
    with pytest.raises(SnapshotFailedError) as ei:
        await svc.create_snapshot("web1", REQUIRED)
    assert ei.value.code == "fs-not-freezable"
    assert ei.value.exit_code == 10
    rec = await svc.get_snapshot(ei.value.snapshot_id)
    assert rec.status is SnapshotStatus.FAILED


async def test_required_without_an_agent_is_agent_unreachable(svc: Service, host: FakeHost) -> None:
    vm = host.add(FakeVm.simple("web1", agent_running=False))
    await (await svc.catalog()).add_vm(vm.config())
    with pytest.raises(SnapshotFailedError) as ei:
        await svc.create_snapshot("web1", REQUIRED)
    assert ei.value.code == "agent-unreachable"
    assert ei.value.remedy == Remedy(Action.DOCTOR, "web1")


async def test_unknown_vm_and_busy_vm_codes(svc: Service, host: FakeHost) -> None:
    with pytest.raises(NotFoundError) as nf:
        await svc.create_snapshot("nope")
    assert nf.value.code == "vm-not-found"
    assert nf.value.remedy == Remedy(Action.LIST_VMS)
    await _vm(svc, host, "web1")
    cat = await svc.catalog()
    owner = make_owner()
    await cat.acquire_vm_lock("web1", owner)
    try:
        with pytest.raises(BusyError) as busy:
            await svc.create_snapshot("web1")
        assert busy.value.code == "vm-busy"
        # lab down of a busy VM is refused before anything is touched, naming --force
        with pytest.raises(BusyError) as down:
            await svc.lab_down("web1")
        assert down.value.code == "vm-busy"
        assert down.value.remedy == Remedy(Action.FORCE, "web1")
    finally:
        await cat.release_vm_lock("web1", owner)


async def test_bad_check_input_is_refused_before_anything(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host, "web1")
    with pytest.raises(UsageError) as ei:
        await svc.create_snapshot("web1", CreateSnapshot(checks=("true",)))
    assert ei.value.code == "checks-need-verify"
    with pytest.raises(UsageError) as ei:
        await svc.create_snapshot("web1", CreateSnapshot(verify=True, check_timeout=5))
    assert ei.value.code == "check-timeout-needs-checks"
    assert (await svc.list_snapshots("web1")).items == ()


# ------------------------------------------------------------------ jobs (servers)


async def test_a_job_streams_its_timeline_and_a_second_start_is_vm_busy(
    svc: Service, host: FakeHost
) -> None:
    await _vm(svc, host, "web1")
    job = await svc.start_snapshot("web1", CreateSnapshot(hold_frozen=0.3))
    assert svc.job(job.snapshot_id) is job
    with pytest.raises(BusyError) as busy:
        await svc.start_snapshot("web1")
    assert busy.value.code == "vm-busy"
    follower = [ev.name async for ev in job.events()]
    out = await job.wait()
    assert out.code is Outcome.DONE
    assert out.record.id == job.snapshot_id
    assert follower == [ev.name for ev in job.history]
    assert {"freeze_sent", "thawed"} <= set(follower)
    assert svc.job(job.snapshot_id) is None  # finished jobs are forgotten; the record stays
    assert (await svc.get_snapshot(job.snapshot_id)).status is SnapshotStatus.DONE


async def test_a_follower_that_goes_away_does_not_stop_the_job(
    svc: Service, host: FakeHost
) -> None:
    vm = await _vm(svc, host, "web1")
    job = await svc.start_snapshot("web1", CreateSnapshot(hold_frozen=0.3))

    async def follow_one() -> None:
        async for _ev in job.events():
            raise asyncio.CancelledError  # the client disconnects after one event

    with pytest.raises(asyncio.CancelledError):
        await follow_one()
    await svc.drain()
    assert job.done
    assert (await job.wait()).code is Outcome.DONE
    assert vm.guest is not None
    assert not vm.guest.frozen


# ------------------------------------------------------------------ listing, VMs, documents


async def test_list_snapshots_pages_with_a_cursor(svc: Service, host: FakeHost) -> None:
    await _vm(svc, host, "web1")
    ids = [(await svc.create_snapshot("web1")).record.id for _ in range(3)]
    first = await svc.list_snapshots("web1", limit=2)
    assert [r.id for r in first.items] == ids[:2]
    assert first.next_cursor is not None
    second = await svc.list_snapshots("web1", limit=2, cursor=first.next_cursor)
    assert [r.id for r in second.items] == ids[2:]
    assert second.next_cursor is None
    newest = await svc.list_snapshots(limit=1, newest_first=True)
    assert [r.id for r in newest.items] == ids[-1:]
    assert [r.id for r in (await svc.list_snapshots()).items] == ids
    with pytest.raises(UsageError) as bad:
        await svc.list_snapshots(cursor="not-a-cursor")
    assert bad.value.code == "bad-cursor"
    with pytest.raises(NotFoundError) as nf:
        await svc.list_snapshots("never-was")
    assert nf.value.code == "vm-not-found"


async def test_lab_vm_refusals_and_remedies(svc: Service, tmp_path: Path) -> None:
    cat = await svc.catalog()
    await cat.add_vm(VmConfig(name="lab1", qmp_path=str(tmp_path / "gone.sock"), lab=True))
    with pytest.raises(UsageError) as ei:
        await svc.remove_vm("lab1")
    assert ei.value.code == "lab-vm"
    assert ei.value.remedy == Remedy(Action.LAB_DOWN, "lab1", {"purge": "yes"})
    with pytest.raises(UsageError) as ei:
        await svc.add_vm(VmSpec("lab1", qmp=str(tmp_path / "q.sock")), replace=True)
    assert ei.value.code == "lab-vm"
    # a lab VM whose QEMU is gone: the remedy is lab up, not "start QEMU by hand"
    with pytest.raises(SnapshotFailedError) as ei2:
        await svc.create_snapshot("lab1")
    assert ei2.value.code == "hypervisor-unreachable"
    assert ei2.value.remedy == Remedy(Action.LAB_UP, "lab1")
    doc = error_document(ei2.value, render=render)
    assert doc["code"] == "hypervisor-unreachable"
    assert doc["hint"].endswith("run `freezeframe lab up lab1`")
    rep = await svc.doctor("lab1")
    [hv] = [c for c in rep.checks if c.name == "hypervisor"]
    assert hv.remedy == Remedy(Action.LAB_UP, "lab1")
    await svc.remove_vm("lab1", force=True)
    assert await svc.list_vms() == []


async def test_add_vm_checks_its_address_and_sockets(svc: Service, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as ei:
        await svc.add_vm(VmSpec("a"))
    assert ei.value.code == "vm-address-required"
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(UsageError) as ei:
        await svc.add_vm(VmSpec("a", qmp=str(regular)))
    assert ei.value.code == "not-a-socket"
    with pytest.raises(UsageError) as ei:
        await svc.add_vm(VmSpec("a", qmp="/x", qga="/y", agent=False))
    assert ei.value.code == "qga-without-agent"
    added = await svc.add_vm(VmSpec("a", qmp=str(tmp_path / "later.sock")))
    assert added.not_there_yet == (str(tmp_path / "later.sock"),)
    with pytest.raises(AlreadyExistsError) as dup:
        await svc.add_vm(VmSpec("a", qmp=str(tmp_path / "later.sock")))
    assert dup.value.code == "vm-exists"


def test_the_cli_renders_remedies_as_command_lines() -> None:
    assert render(Remedy(Action.RECOVER, "web1")) == "run `freezeframe recover web1`"
    assert render(Remedy(Action.RECOVER)) == "run `freezeframe recover`"
    assert render(Remedy(Action.LIST_VMS)) == "see `freezeframe vm list`"
    assert (
        render(Remedy(Action.LAB_DOWN, "lab1", {"purge": "yes"}))
        == "run `freezeframe lab down lab1 --purge`"
    )
    assert (
        render(Remedy(Action.ADD_VM, "web1", {"replace": "yes", "qga": "/run/q.sock"}))
        == "run `freezeframe vm add web1 --replace --qga /run/q.sock`"
    )
    assert render(Remedy(Action.FORCE, "web1")) == "add --force"
    assert render(Remedy(Action.VERIFY, params={"id": "abc123"})) == (
        "run `freezeframe snapshot verify abc123`"
    )
    assert render(Remedy(Action.LIST_IMAGES, "web1")) == "see `freezeframe vm images web1`"
    for action in Action:  # every action has CLI words
        assert render(Remedy(action, "x"))


def test_config_takes_explicit_values_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("FREEZEFRAME_DATABASE_URL", "sqlite:////env.sqlite")
    assert Config.from_env().catalog_url == "sqlite:////env.sqlite"
    assert Config.from_env().state_dir == tmp_path / "env"
    cfg = Config.from_env(state_dir=tmp_path / "mine")
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'mine' / 'catalog.sqlite'}"
    assert Config.from_env(database_url="sqlite:////x.sqlite").catalog_url == "sqlite:////x.sqlite"


async def test_verify_is_a_job_of_the_service_one_per_snapshot(
    svc: Service, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _vm(svc, host, "web1")
    snap = await svc.start_snapshot("web1", CreateSnapshot(hold_frozen=0.3))
    with pytest.raises(BusyError) as busy:  # its snapshot job still runs
        await svc.start_verify(snap.snapshot_id)
    assert busy.value.code == "job-running"
    await snap.wait()

    release = asyncio.Event()
    calls: list[str] = []

    async def slow_verify(sid: str, **_kw: object) -> VerifyOutcome:
        calls.append(sid)
        await release.wait()
        raise VerifyError("the fake's images are not files")

    monkeypatch.setattr(svc, "verify_snapshot", slow_verify)
    job = await svc.start_verify(snap.snapshot_id[:12])  # a prefix names it too
    assert job.snapshot_id == snap.snapshot_id
    assert [ev.name for ev in job.history] == ["verify_started"]
    assert svc.verify_job(snap.snapshot_id) is job
    assert svc.verify_jobs == (job,)
    with pytest.raises(BusyError) as busy:
        await svc.start_verify(snap.snapshot_id)
    assert busy.value.code == "job-running"
    release.set()
    with pytest.raises(VerifyError):
        await job.wait()
    assert [ev.name async for ev in job.events()] == ["verify_started"]
    assert not svc.verify_jobs
    assert svc.verify_job(snap.snapshot_id) is job  # kept for a late follower
    again = await svc.start_verify(snap.snapshot_id)  # ended: a new one may start
    await svc.drain()
    assert again.done
    assert calls == [snap.snapshot_id, snap.snapshot_id]


async def test_start_verify_refuses_unknown_snapshots_and_a_lone_timeout(
    svc: Service, host: FakeHost
) -> None:
    with pytest.raises(NotFoundError) as nf:
        await svc.start_verify("f" * 32)
    assert nf.value.code == "snapshot-not-found"
    with pytest.raises(UsageError) as bad:
        await svc.start_verify("f" * 32, check_timeout=3.0)
    assert bad.value.code == "check-timeout-needs-checks"


async def test_show_snapshot_asks_qemu_only_when_live(svc: Service, host: FakeHost) -> None:
    vm = await _vm(svc, host, "web1")
    out = await svc.create_snapshot("web1")
    plain = await svc.show_snapshot(out.record.id[:8], live=False)
    assert not plain.live
    assert plain.images == ()
    assert to_document(plain) == to_document(out.record)
    vm.boot_from("disk0", "/elsewhere/disk0.qcow2")  # QEMU no longer runs on the overlay
    live = await svc.show_snapshot(out.record.id)
    doc = to_document(live)
    overlays = {d.device: d.overlay for d in out.record.disks}
    assert doc.pop("qemu_runs_on") == {**overlays, "disk0": "/elsewhere/disk0.qcow2"}
    assert doc == to_document(out.record)
