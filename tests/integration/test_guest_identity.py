"""Issue 11 on real lab VMs: the agent frozen is provably this VM's, and a VM restarted on the
image a snapshot holds at its cut cannot change that snapshot without freezeframe saying so.

- Two lab VMs, VM a registered with VM b's agent socket: ``snapshot create`` refuses under
  every policy (code ``agent-wrong-vm``, exit class 10, both sockets named), neither guest is
  frozen (``guest-fsfreeze-status`` on both, and b's qemu-ga log has no freeze), nothing is
  recorded done; doctor fails it and predicts ``none``.
- A snapshot, the VM stopped and started again by hand on its ORIGINAL image (the lab's own
  QEMU command line, as an operator re-running it would): the image at the cut had lost its
  write bits at the cut (root QEMU opens it anyway), create refuses
  (``image-held-by-snapshot``), doctor fails it, ``vm images`` names the overlay to boot from,
  and ``snapshot verify`` of the earlier snapshot reports ``changed-since-cut`` once the guest
  has written into the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, verify_snapshot
from freezeframe.engine.images import boot_images
from freezeframe.errors import AgentError, SnapshotFailedError
from freezeframe.lab import LabVm, lab_down
from freezeframe.models import (
    ConsistencyLevel,
    FsFreezeState,
    QuiescePolicy,
    SnapshotStatus,
    VerifyVerdict,
)
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration


async def _state(path: Path) -> FsFreezeState:
    async with GuestAgent(str(path)) as ga:
        return await ga.fsfreeze_status()


async def test_a_vm_registered_with_its_neighbours_agent_is_refused_freezing_nothing(
    lab_vm: LabVmFactory, catalog: Catalog
) -> None:
    a, b = await lab_vm(disks=("ext4",)), await lab_vm(disks=("ext4",))
    assert a.qga_path is not None
    assert b.qga_path is not None
    await catalog.add_vm(b.vm_config(), replace=True)
    await catalog.add_vm(replace(a.vm_config(), qga_path=str(b.qga_path)), replace=True)
    for policy in QuiescePolicy:
        with pytest.raises(SnapshotFailedError) as ei:
            await Snapshotter(catalog).snapshot(a.name, SnapshotRequest(quiesce=policy))
        assert ei.value.code == "agent-wrong-vm", ei.value.message
        assert ei.value.exit_code == 10
        assert str(b.qga_path) in ei.value.message  # the registered socket
        assert str(a.qga_path) in ei.value.message  # the one QEMU serves for a
    for vm in (a, b):
        assert vm.qga_path is not None
        assert await _state(vm.qga_path) is FsFreezeState.THAWED
    async with GuestAgent(str(b.qga_path)) as ga:  # b's qemu-ga --verbose log: no freeze
        log = await ga.file_read(b.vm_config().agent_log_path or "", tail=True)
    assert b"guest-fsfreeze-freeze" not in log
    recs = await catalog.list_snapshots(a.name)
    assert len(recs) == 3
    assert all(r.status is SnapshotStatus.FAILED and not r.disks for r in recs)
    assert await catalog.list_snapshots(a.name, status=SnapshotStatus.DONE) == []

    rep = await doctor(catalog, a.name, quiesce=QuiescePolicy.REQUIRED)
    [channel] = [c for c in rep.checks if c.name == "agent channel"]
    assert channel.code == "agent-wrong-vm"
    assert rep.predicted_level is ConsistencyLevel.NONE
    assert not rep.ok

    await catalog.add_vm(a.vm_config(), replace=True)  # the right socket: quiesced again
    rec = await Snapshotter(catalog).snapshot(
        a.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
    )
    assert rec.level is ConsistencyLevel.FILESYSTEM


async def _wait_ready(console: Path, agent: Path, deadline: float) -> None:
    """As the lab waits: READY on the console first (the guest's init has started qemu-ga),
    then a ``guest-ping`` that answers. Pinging earlier leaves the agent's channel
    unusable for later clients here (every write ends in "Connection lost")."""
    while b"FFLAB-READY" not in (console.read_bytes() if console.exists() else b""):
        assert time.monotonic() < deadline, console.read_text(errors="replace")[-2000:]
        await asyncio.sleep(0.25)
    while True:
        try:
            async with GuestAgent(str(agent), timeout=5.0) as ga:
                await ga.ping()
                return
        except AgentError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_a_vm_restarted_on_its_original_image_is_refused_and_verify_says_changed(
    lab_vm: LabVmFactory, catalog: Catalog
) -> None:
    vm: LabVm = await lab_vm(disks=("ext4",))
    assert vm.qga_path is not None
    await catalog.add_vm(vm.vm_config(), replace=True)
    first = await Snapshotter(catalog).snapshot(
        vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)
    )
    [cut] = first.disks
    assert cut.overlay is not None
    assert cut.fingerprint is not None
    assert os.stat(cut.image).st_mode & 0o222 == 0  # protected at the cut
    assert cut.image_mode is not None
    assert cut.image_mode & 0o200

    vmdir = vm.qga_path.parent
    argv = (vmdir / "qemu.argv").read_text().split("\n")  # the command line it started with
    argv = [a for a in argv if a]
    assert any(f"filename={cut.image}" in a for a in argv), argv  # ... on the original image
    await lab_down(vm.name)
    subprocess.run(argv, check=True, timeout=60)  # the operator starts it again, as it was
    pid = int((vmdir / "qemu.pid").read_text().strip())
    try:
        await _wait_ready(vmdir / "console.log", vm.qga_path, time.monotonic() + 90)
        # The guest's workload writes into the image the snapshot holds.
        deadline = time.monotonic() + 30
        while os.stat(cut.image).st_mtime_ns == cut.fingerprint.mtime_ns:
            assert time.monotonic() < deadline, "the guest wrote nothing"
            await asyncio.sleep(0.5)

        files = set(vmdir.iterdir())
        with pytest.raises(SnapshotFailedError) as ei:
            await Snapshotter(catalog).snapshot(vm.name)
        assert ei.value.code == "image-held-by-snapshot"
        assert first.id in ei.value.message
        assert cut.overlay in ei.value.message  # the image to boot from
        assert set(vmdir.iterdir()) == files  # no overlay prepared
        assert await _state(vm.qga_path) is FsFreezeState.THAWED

        rep = await doctor(catalog, vm.name)
        assert any(c.code == "image-held-by-snapshot" for c in rep.checks), rep.checks
        assert rep.predicted_level is ConsistencyLevel.NONE

        [row] = await boot_images(catalog, vm.name)
        assert row.boot_from == cut.overlay
        assert row.running_on == cut.image
        assert row.on_it is False
        assert row.held_by == (first.id,)

        v = await verify_snapshot(catalog, first.id)
        assert v.verdict is VerifyVerdict.CHANGED
        assert cut.image in v.checks[0].detail
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.05)
