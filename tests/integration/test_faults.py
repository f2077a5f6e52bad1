"""Faults of issue 12 met on real lab VMs: the guest's agent killed, the catalog's filesystem
filling up between the cut and the record. Asserted by error class, exit code and state."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog, make_owner
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, open_driver
from freezeframe.engine.doctor import CheckStatus
from freezeframe.errors import SnapshotFailedError, SnapshotUnrecordedError
from freezeframe.hypervisor import HypervisorDriver
from freezeframe.models import ConsistencyLevel, FsFreezeState, QuiescePolicy, SnapshotStatus
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration


async def test_the_guest_agent_killed(lab_vm: LabVmFactory, lab_env: Path) -> None:
    vm = await lab_vm(disks=("ext4",))
    assert vm.qga_path is not None
    async with await Catalog.open() as catalog:
        await catalog.add_vm(vm.vm_config(), replace=True)
        async with GuestAgent(str(vm.qga_path), timeout=10) as ga:
            # In the background: the agent must answer this exec before it dies.
            await ga.exec(
                "/bin/sh",
                ["-c", "(sleep 0.3; kill -9 $(pidof qemu-ga)) >/dev/null 2>&1 &"],
                capture=False,
            )
        await _wait_agent_gone(str(vm.qga_path))
        cfg = await catalog.get_vm(vm.name)
        snap = Snapshotter(catalog, ping_timeout=1.0)
        async with open_driver(cfg) as driver:
            probe = await snap.probe_agent(cfg, driver)
        assert probe.code == "agent-unreachable"  # the VM runs: the agent is what is gone
        with pytest.raises(SnapshotFailedError) as ei:
            await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
        assert ei.value.exit_code == 10
        rec = await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.PREFERRED))
        assert rec.level is ConsistencyLevel.CRASH
        assert await catalog.open_intents(vm.name) == []
        report = await doctor(catalog, vm.name, quiesce=QuiescePolicy.REQUIRED)
        assert any(c.name == "agent" and c.status is CheckStatus.FAIL for c in report.checks)
        assert report.predicted_level is ConsistencyLevel.NONE


async def _wait_agent_gone(path: str) -> None:
    import asyncio

    for _ in range(50):
        try:
            async with GuestAgent(path, timeout=0.5) as ga:
                await ga.ping(timeout=0.5)
        except Exception:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("qemu-ga still answers")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_the_catalog_filesystem_fills_between_cut_and_record(
    lab_vm: LabVmFactory, small_fs: Path
) -> None:
    vm = await lab_vm(disks=("ext4",))
    filler = small_fs / "filler"
    async with await Catalog.open(f"sqlite:///{small_fs / 'catalog.sqlite'}") as catalog:
        await catalog.add_vm(vm.vm_config(), replace=True)

        async def fill(_vm: str, _driver: HypervisorDriver) -> None:
            # After the thaw, before the finished record is written: the filesystem fills.
            # unbuffered: nothing is left in a buffer for close() to fail on once it is full
            with filler.open("wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass  # full

        async def nothing(_vm: str, _driver: HypervisorDriver) -> None:
            return None

        snap = Snapshotter(catalog, before_freeze=nothing, after_thaw=fill)
        with pytest.raises(SnapshotUnrecordedError) as ei:
            await snap.snapshot(vm.name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
        err = ei.value
        assert err.exit_code == 13
        assert err.overlays
        assert all(Path(o).exists() for o in err.overlays)
        async with GuestAgent(str(vm.qga_path), timeout=10) as ga:
            assert await ga.fsfreeze_status() is FsFreezeState.THAWED
        # Space again: `freezeframe recover` (a process of its own, as an operator runs it)
        # records the switched disks, nothing is lost.
        filler.unlink()
        # The lock this process could not release (the filesystem was full): a CLI process
        # would be gone by now and its lock taken over; this one lives on, so let it go.
        await catalog.release_vm_lock(vm.name, make_owner())
        env = {**os.environ, "FREEZEFRAME_DATABASE_URL": f"sqlite:///{small_fs / 'catalog.sqlite'}"}
        done = subprocess.run(
            [sys.executable, "-m", "freezeframe.cli.main", "recover", vm.name],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rec = await catalog.get_snapshot(err.snapshot_id)
        assert rec.status is SnapshotStatus.FAILED
        assert {d.overlay for d in rec.disks} == set(err.overlays)
        nxt = await Snapshotter(catalog).snapshot(vm.name)
        assert nxt.parent_id == err.snapshot_id
