"""``doctor`` against a real QEMU (BIOS only: real QMP, real agent chardev) and a fake guest
agent: a snapshot in progress, the wording of a failing ``--quiesce required``, a guest-agent
socket path that is wrong on the host side, an open intent while QEMU is hung or gone and a VM
writing to an image at the cut of one of its snapshots.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, verify_snapshot
from freezeframe.engine.doctor import Check, CheckStatus, DoctorReport
from freezeframe.errors import Action, BusyError, Remedy, SnapshotFailedError
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotStatus,
    VerifyVerdict,
    VmConfig,
)
from tests.fakes.bios_vm import Vm, bios_vm
from tests.fakes.fake_agent import FakeAgent, FakeFs

pytestmark = pytest.mark.integration

EXT4 = FakeFs("/mnt/disk0", "ext4", name="vda", pci=(0, 0, 5, 0))
XFS = FakeFs("/mnt/disk1", "xfs", name="vdb", pci=(0, 0, 6, 0))
VFAT = FakeFs("/mnt/disk1", "vfat", name="vdb", pci=(0, 0, 6, 0), freezable=False)


@dataclass
class Rig:
    vm: Vm
    agent: FakeAgent
    catalog: Catalog
    cfg: VmConfig

    async def reconfigure(self, **changes: object) -> None:
        await self.catalog.add_vm(replace(self.cfg, **changes), replace=True)  # type: ignore[arg-type]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with (
        bios_vm(agent=True) as vm,
        # The fake agent takes the path of QEMU's own agent chardev (QEMU still reports it):
        # registered elsewhere, a snapshot is refused as another VM's agent (agent-wrong-vm).
        FakeAgent(vm.dir / "qga.sock", fs=[EXT4, XFS]) as agent,
    ):
        cat = await Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}")
        cfg = VmConfig(name="t", qmp_path=vm.qmp, qga_path=agent.path)
        await cat.add_vm(cfg)
        try:
            yield Rig(vm, agent, cat, cfg)
        finally:
            await cat.close()


def _check(rep: DoctorReport, name: str) -> Check:
    return next(c for c in rep.checks if c.name == name)


def _fixes(rep: DoctorReport) -> str:
    return "\n".join(c.fix for c in rep.checks)


async def test_a_snapshot_in_progress_is_reported_at_once(rig: Rig) -> None:
    task = asyncio.create_task(
        Snapshotter(rig.catalog).snapshot("t", SnapshotRequest(hold_frozen=2.0))
    )
    try:
        await rig.agent.wait_for("guest-fsfreeze-freeze")
        sent = len(rig.agent.commands)
        holder = await rig.catalog.vm_lock_holder("t")
        assert holder is not None
        start = time.monotonic()
        rep = await doctor(rig.catalog, "t")
        elapsed = time.monotonic() - start
        # the snapshot holds QMP (one client) and the agent: neither was touched or waited for
        assert elapsed < 1.0
        assert len(rig.agent.commands) == sent
        lock = _check(rep, "snapshot lock")
        assert lock.status is CheckStatus.WARN
        assert lock.detail.startswith(
            f"a snapshot of t is in progress by {holder[0]} since "
            f"{holder[1].isoformat(timespec='seconds')}"
        )
        intents = _check(rep, "freeze intents")
        assert intents.status is CheckStatus.WARN
        assert "frozen by that snapshot right now" in intents.detail
        assert [c.name for c in rep.checks] == ["policy", "snapshot lock", "freeze intents"]
        assert "in progress" in rep.verdict
        assert rep.ok  # warnings only
    finally:
        rec = await task
    assert rec.level is ConsistencyLevel.FILESYSTEM  # undisturbed
    rep = await doctor(rig.catalog, "t")  # finished: the full checklist again
    assert not any(c.name == "snapshot lock" for c in rep.checks)
    assert rep.ok, rep.checks


async def test_a_lock_left_by_a_dead_process_is_a_warning_only(rig: Rig) -> None:
    dead = f"{socket.gethostname()}:4194305:dead"  # above any pid_max: never a live process
    await rig.catalog.acquire_vm_lock("t", dead)
    rep = await doctor(rig.catalog, "t")
    lock = _check(rep, "snapshot lock")
    assert lock.status is CheckStatus.WARN
    assert f"left by {dead}" in lock.detail
    assert rep.predicted_level is ConsistencyLevel.FILESYSTEM  # every other check ran
    assert _check(rep, "agent").status is CheckStatus.PASS


async def test_required_quiesce_outcome_reads_correctly(rig: Rig) -> None:
    rig.agent.fs = [EXT4, VFAT]
    rep = await doctor(rig.catalog, "t", quiesce=QuiescePolicy.REQUIRED)
    outcome = _check(rep, "policy outcome")
    assert outcome.status is CheckStatus.FAIL
    assert outcome.detail.startswith(
        "this VM cannot be snapshotted with quiesce required (os_require_quiesce): "
        "/mnt/disk1 (vfat) on disk disk1 cannot be frozen"
    )
    assert "until" not in outcome.detail

    await rig.reconfigure(agent=False, qga_path=None)
    rep = await doctor(rig.catalog, "t", quiesce=QuiescePolicy.REQUIRED)
    outcome = _check(rep, "policy outcome")
    assert outcome.detail.startswith(
        "this VM cannot be snapshotted with quiesce required (os_require_quiesce): "
        "the VM is configured without a guest agent"
    )
    assert "until" not in outcome.detail


async def test_a_wrong_host_socket_path_is_not_blamed_on_the_guest(rig: Rig) -> None:
    qemu_side = f"{rig.vm.dir}/qga.sock"  # the VM's real agent chardev, as QEMU reports it
    missing = str(rig.vm.dir / "nonexistent" / "qga.sock")
    await rig.reconfigure(qga_path=missing)
    rep = await doctor(rig.catalog, "t", quiesce=QuiescePolicy.REQUIRED)
    channel = _check(rep, "agent channel")
    assert channel.status is CheckStatus.FAIL
    assert channel.code == "agent-wrong-vm"
    assert f"{missing} does not exist on this host" in channel.detail
    assert qemu_side in channel.detail
    assert channel.remedy is not None
    assert channel.remedy.params["qga"] == qemu_side
    assert "apt-get" not in _fixes(rep)
    assert not any(c.name == "agent" for c in rep.checks)
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert "agent-wrong-vm" in rep.verdict

    stale = rig.vm.dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # bound, never listening: what a stopped VM leaves behind
    s.close()
    await rig.reconfigure(qga_path=str(stale))
    rep = await doctor(rig.catalog, "t")
    channel = _check(rep, "agent channel")
    assert channel.status is CheckStatus.FAIL
    assert "refuses connections" in channel.detail
    assert "apt-get" not in _fixes(rep)


async def test_a_socket_that_accepts_but_no_agent_answers_is_the_guests_problem(
    tmp_path: Path,
) -> None:
    async with bios_vm(agent=True) as vm:  # QEMU accepts; no qemu-ga runs in a BIOS-only VM
        qemu_side = f"{vm.dir}/qga.sock"
        cat = await Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}")
        try:
            await cat.add_vm(VmConfig(name="t", qmp_path=vm.qmp, qga_path=qemu_side))
            rep = await doctor(cat, "t")
        finally:
            await cat.close()
    channel = _check(rep, "agent channel")
    assert channel.status is CheckStatus.PASS
    assert qemu_side in channel.detail
    agent = _check(rep, "agent")
    assert agent.status is CheckStatus.FAIL
    assert "install and start qemu-guest-agent in the guest" in agent.fix
    assert rep.predicted_level is ConsistencyLevel.CRASH


def _fails(rep: DoctorReport) -> list[Check]:
    return [c for c in rep.checks if c.status is CheckStatus.FAIL]


@pytest.mark.parametrize("policy", [QuiescePolicy.PREFERRED, QuiescePolicy.REQUIRED])
async def test_a_guest_left_frozen_is_one_clear_fail(rig: Rig, policy: QuiescePolicy) -> None:
    # What a `kill -9` of `snapshot create --hold-frozen` leaves: the guest frozen (qemu-ga
    # then reports most commands disabled in guest-info) and the freeze intent open.
    dead = f"{socket.gethostname()}:4194305:dead"
    intent = await rig.catalog.open_intent("t", "snap-killed", rig.agent.path, dead)
    rig.agent.frozen = True
    rep = await doctor(rig.catalog, "t", quiesce=policy)
    [fail] = _fails(rep)
    assert fail.name == "guest state"
    assert fail.detail.startswith("the guest is frozen (guest-fsfreeze-status): freeze intent ")
    assert f"intent {intent.id} of snapshot snap-killed by {dead}" in fail.detail
    assert fail.remedy == Remedy(Action.RECOVER, "t")
    names = [c.name for c in rep.checks]
    for misleading in ("freeze commands", "pre-flush", "freeze intents", "policy outcome"):
        assert misleading not in names
    assert "--block-rpcs" not in _fixes(rep)
    assert "frozen" in rep.verdict
    if policy is QuiescePolicy.REQUIRED:
        assert rep.predicted_level is ConsistencyLevel.NONE

    # frozen by someone else: no intent to name, recover cannot thaw it
    await rig.catalog.close_intent(intent.id, "test")
    rep = await doctor(rig.catalog, "t", quiesce=policy)
    [fail] = _fails(rep)
    assert fail.detail == (
        "the guest is frozen (guest-fsfreeze-status): no freeze intent of freezeframe is "
        "open, another tool froze it"
    )
    assert "guest-fsfreeze-thaw" in fail.fix

    rig.agent.frozen = False  # thawed: the full checklist again, all green
    rep = await doctor(rig.catalog, "t", quiesce=policy)
    assert _check(rep, "freeze commands").status is CheckStatus.PASS
    assert not _fails(rep)


@pytest.mark.parametrize("policy", list(QuiescePolicy))
async def test_a_registered_agent_path_that_is_not_qemus_is_refused(
    rig: Rig, policy: QuiescePolicy
) -> None:
    qemu_side = f"{rig.vm.dir}/qga.sock"  # the VM's real agent chardev, as QEMU reports it
    # Another guest's agent answers at the registered path: never frozen, refused.
    async with FakeAgent(rig.vm.dir / "neighbour.sock", fs=[EXT4, XFS]) as other_agent:
        await rig.reconfigure(qga_path=other_agent.path)
        rep = await doctor(rig.catalog, "t", quiesce=policy)
        channel = _check(rep, "agent channel")
        assert channel.status is CheckStatus.FAIL
        assert channel.code == "agent-wrong-vm"
        assert f"agent socket {other_agent.path}" in channel.detail
        assert f"org.qemu.guest_agent.0 at {qemu_side}" in channel.detail
        assert channel.remedy is not None
        assert channel.remedy.params["qga"] == qemu_side
        assert rep.predicted_level is ConsistencyLevel.NONE
        with pytest.raises(SnapshotFailedError) as ei:
            await Snapshotter(rig.catalog).snapshot("t", SnapshotRequest(quiesce=policy))
        assert ei.value.code == "agent-wrong-vm"
        assert other_agent.path in ei.value.message
        assert qemu_side in ei.value.message
        for agent in (other_agent, rig.agent):
            assert not agent.frozen
            assert "guest-fsfreeze-freeze" not in agent.commands

    # Some other listening socket that is no agent: refused the same way.
    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    other = rig.vm.dir / "other.sock"
    server = await asyncio.start_unix_server(hang_up, str(other))
    try:
        await rig.reconfigure(qga_path=str(other))
        rep = await doctor(rig.catalog, "t")
    finally:
        server.close()
        await server.wait_closed()
    channel = _check(rep, "agent channel")
    assert channel.status is CheckStatus.FAIL
    assert channel.code == "agent-wrong-vm"
    assert not any(c.name == "agent" for c in rep.checks)
    assert "apt-get" not in _fixes(rep)

    # Another name of QEMU's own socket is no mismatch.
    link = rig.vm.dir / "link.sock"
    link.symlink_to(qemu_side)
    await rig.reconfigure(qga_path=str(link))
    rep = await doctor(rig.catalog, "t", quiesce=policy)
    assert _check(rep, "agent channel").status is CheckStatus.PASS
    assert rep.ok, rep.checks


async def test_doctor_holds_the_vm_lock_while_it_talks_to_the_vm(rig: Rig) -> None:
    # QMP and the agent serve one client each: a snapshot starting meanwhile is refused (busy)
    # rather than failing on a busy socket or falling back to crash-consistent.
    rig.agent.behave("guest-info", delay=2.0, times=1)
    task = asyncio.create_task(doctor(rig.catalog, "t"))
    await rig.agent.wait_for("guest-info")
    with pytest.raises(BusyError):
        await Snapshotter(rig.catalog).snapshot("t")
    rep = await task
    assert rep.ok, rep
    assert await rig.catalog.vm_lock_holder("t") is None  # released
    rec = await Snapshotter(rig.catalog).snapshot("t")
    assert rec.level is ConsistencyLevel.FILESYSTEM


@pytest.mark.parametrize("how", ["hung", "killed"])
async def test_an_open_intent_is_reported_when_qemu_does_not_answer(rig: Rig, how: str) -> None:
    dead = f"{socket.gethostname()}:4194305:dead"
    await rig.catalog.open_intent("t", "snap-killed", rig.agent.path, dead)
    pid = rig.vm.proc.pid
    try:
        if how == "hung":
            os.kill(pid, signal.SIGSTOP)  # accepts on its socket (backlog), never greets
        else:
            rig.vm.proc.kill()
            await rig.vm.proc.wait()
        rep = await doctor(rig.catalog, "t")
    finally:
        if how == "hung":
            os.kill(pid, signal.SIGCONT)
    assert _check(rep, "hypervisor").status is CheckStatus.FAIL
    intents = _check(rep, "freeze intents")
    assert intents.status is CheckStatus.FAIL
    assert "1 open (snapshot snap-killed)" in intents.detail
    assert intents.remedy == Remedy(Action.RECOVER, "t")


async def _commit_to_base(vm: Vm, device: str) -> None:
    """Merge ``device``'s overlays down into its base image and pivot onto it: the VM writes
    to its original image again, as after a restart by hand on it."""
    top = (await vm.tops())[device]
    await vm.query("block-commit", {"job-id": "back", "device": str(top["node-name"])})
    deadline = time.monotonic() + 20
    while True:
        jobs = await vm.query("query-block-jobs")
        assert isinstance(jobs, list)
        if any(j["device"] == "back" and j["ready"] for j in jobs):
            break
        assert time.monotonic() < deadline, jobs
        await asyncio.sleep(0.05)
    await vm.query("block-job-complete", {"device": "back"})
    while (await vm.query("query-block-jobs")) != []:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_vm_writing_to_an_image_at_the_cut_fails_and_is_refused(rig: Rig) -> None:
    rec = await Snapshotter(rig.catalog).snapshot("t")
    [cut] = [d for d in rec.disks if d.device == "disk0"]
    assert cut.overlay is not None
    # The image at the cut lost its write bits (mode recorded) and was fingerprinted.
    assert cut.image_mode is not None
    assert cut.image_mode & 0o200
    assert os.stat(cut.image).st_mode & 0o222 == 0
    assert cut.fingerprint is not None
    rep = await doctor(rig.catalog, "t")  # the cut image is in the backing chain: as expected
    assert not any(c.name.endswith(" image") for c in rep.checks), rep.checks
    assert rep.ok, rep.checks

    await _commit_to_base(rig.vm, "disk0")  # root QEMU writes through the missing write bits
    assert (await rig.vm.tops())["disk0"]["file"] == cut.image
    rep = await doctor(rig.catalog, "t")
    [fail] = [c for c in rep.checks if c.name.endswith(" image")]
    assert fail.name == "disk disk0 image"
    assert fail.status is CheckStatus.FAIL
    assert fail.code == "image-held-by-snapshot"
    assert f"writes to {cut.image}, the image at the cut of snapshot {rec.id}" in fail.detail
    assert f"boot it from {cut.overlay}" in fail.detail
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert not rep.ok

    with pytest.raises(SnapshotFailedError) as ei:
        await Snapshotter(rig.catalog).snapshot("t", SnapshotRequest(quiesce=QuiescePolicy.OFF))
    assert ei.value.code == "image-held-by-snapshot"
    assert rec.id in ei.value.message

    with open(cut.image, "ab") as f:  # what a guest's writes do to the file (BIOS VM: none)
        f.write(b"\0" * 65536)
    v = await verify_snapshot(rig.catalog, rec.id)
    assert v.verdict is VerifyVerdict.CHANGED
    assert [c.device for c in v.checks] == ["disk0"]
    rep = await doctor(rig.catalog, "t")  # verified changed: nothing is left to protect
    assert not any(c.code == "image-held-by-snapshot" for c in rep.checks), rep.checks


async def test_the_no_agent_fix_replaces_the_registered_vm(rig: Rig) -> None:
    await rig.reconfigure(agent=False, qga_path=None)
    rep = await doctor(rig.catalog, "t")
    agent = _check(rep, "agent")
    assert agent.status is CheckStatus.FAIL
    assert agent.remedy == Remedy(
        Action.ADD_VM, "t", {"replace": "yes", "agent": "yes", "qga": "PATH"}
    )


async def test_a_failed_attempt_whose_cut_happened_counts_too(rig: Rig) -> None:
    # Interrupted after its cut: failed, but its images at the cut are kept and verifiable.
    rec = await Snapshotter(rig.catalog).snapshot("t")
    await rig.catalog.finish_snapshot(
        replace(rec, status=SnapshotStatus.FAILED, error="interrupted; thawed (confirmed)")
    )
    [_cut] = [d for d in rec.disks if d.device == "disk0"]
    await _commit_to_base(rig.vm, "disk0")
    rep = await doctor(rig.catalog, "t")
    [fail] = [c for c in rep.checks if c.name.endswith(" image")]
    assert fail.code == "image-held-by-snapshot"
    assert f"the image at the cut of snapshot {rec.id}" in fail.detail
