"""A disk chain with an image deleted while QEMU keeps it open (issue 12, item 2), on real lab
VMs: the image at the cut of a snapshot, or the active overlay itself. ``snapshot create``
refuses before preparing or freezing anything (BrokenChainError, exit 10, nothing switched),
``doctor`` FAILs and predicts ``none``, ``lab down`` refuses (exit 5) until the file is copied
back from QEMU's open descriptor as its hint says (or ``--save`` copies it back itself, with
the vCPUs paused), and then stops cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, doctor, open_driver
from freezeframe.engine.chain import open_copies
from freezeframe.engine.doctor import CheckStatus
from freezeframe.errors import BrokenChainError, LabError
from freezeframe.hypervisor import open_agent
from freezeframe.lab import LabVm, lab_down, lab_status, lab_up
from freezeframe.lab.workload import last_sequence
from freezeframe.models import ConsistencyLevel, FsFreezeState, QuiescePolicy, SnapshotStatus
from freezeframe.storage import mounted, open_image
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration
FF = [sys.executable, "-m", "freezeframe.cli.main"]
REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FF, *args], env=dict(os.environ), capture_output=True, text=True, timeout=120, check=False
    )


async def chains(catalog: Catalog, vm: LabVm) -> dict[str, tuple[str, ...]]:
    """Each disk's chain as QEMU reports it (``query-block``), top first."""
    async with open_driver(await catalog.get_vm(vm.name)) as drv:
        return {d.device: (d.file, *d.backing) for d in await drv.disks()}


async def frozen(vm: LabVm) -> FsFreezeState:
    assert vm.agent_address is not None
    async with open_agent(vm.agent_address, timeout=5) as ga:
        return await ga.fsfreeze_status()


async def assert_refused(catalog: Catalog, vm: LabVm, device: str, gone: str) -> None:
    """create refuses, nothing is prepared or switched; doctor FAILs; lab down refuses."""
    before = await chains(catalog, vm)
    files = set(vm.disks[0].file.parent.iterdir())
    with pytest.raises(BrokenChainError) as ei:
        await Snapshotter(catalog).snapshot(vm.name, REQUIRED)
    assert ei.value.exit_code == 10
    assert gone in ei.value.missing[device]
    assert await chains(catalog, vm) == before  # nothing switched
    assert set(vm.disks[0].file.parent.iterdir()) == files  # no overlay left behind
    assert await frozen(vm) is FsFreezeState.THAWED
    assert await catalog.open_intents(vm.name) == []
    rec = await catalog.get_snapshot(ei.value.snapshot_id)
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()

    cli = ff("snapshot", "create", vm.name, "--quiesce", "required")
    assert cli.returncode == 10, cli.stderr
    assert await chains(catalog, vm) == before

    rep = await doctor(catalog, vm.name)
    assert rep.predicted_level is ConsistencyLevel.NONE
    (chain,) = [c for c in rep.checks if c.name == f"disk {device} chain"]
    assert chain.status is CheckStatus.FAIL
    assert [c.name for c in rep.checks if c.status is CheckStatus.FAIL] == [chain.name]

    with pytest.raises(LabError) as le:
        await lab_down(vm.name)
    assert le.value.exit_code == 5
    assert lab_status(vm.name).running
    down = ff("lab", "down", vm.name)
    assert down.returncode == 5, down.stderr
    assert lab_status(vm.name).running
    assert await frozen(vm) is FsFreezeState.THAWED


def copy_back(vm: LabVm, path: str) -> None:
    """What the hint says: copy the unlinked file back from QEMU's open descriptor."""
    (fd,) = open_copies([path], pids=[lab_status(vm.name).pid]).values()
    shutil.copyfile(fd, path)


@pytest.mark.parametrize("driver", ["qmp", "libvirt"])
async def test_the_image_at_the_cut_deleted(
    lab_vm: LabVmFactory, catalog: Catalog, driver: str
) -> None:
    vm = await lab_vm(disks=("ext4",), driver=driver)
    await catalog.add_vm(vm.vm_config(), replace=True)
    first = await Snapshotter(catalog).snapshot(vm.name, REQUIRED)
    (d,) = first.disks
    assert d.overlay is not None
    # (a) the driver reports the whole chain, top first (query-block; libvirt's <backingStore>)
    assert (await chains(catalog, vm))[d.device] == (d.overlay, d.image)

    os.unlink(d.image)
    await assert_refused(catalog, vm, d.device, d.image)

    copy_back(vm, d.image)  # read-only since the cut: a faithful copy
    rep = await doctor(catalog, vm.name)
    assert rep.ok, rep.checks
    second = await Snapshotter(catalog).snapshot(vm.name, REQUIRED)
    assert second.level is ConsistencyLevel.FILESYSTEM
    await lab_down(vm.name)
    assert not lab_status(vm.name).running


async def test_the_active_overlay_deleted(lab_vm: LabVmFactory, catalog: Catalog) -> None:
    vm = await lab_vm(disks=("ext4",))
    await catalog.add_vm(vm.vm_config(), replace=True)
    first = await Snapshotter(catalog).snapshot(vm.name, REQUIRED)
    (d,) = first.disks
    assert d.overlay is not None

    os.unlink(d.overlay)
    await assert_refused(catalog, vm, d.device, d.overlay)

    # --force stops it anyway (what only the unlinked overlay held is lost, as warned)
    down = ff("lab", "down", vm.name, "--force")
    assert down.returncode == 0, down.stderr
    assert not lab_status(vm.name).running


async def last_seq(image: str) -> int:
    """The workload's last complete record in ``image`` (offline, read-only)."""
    async with open_image(image, "qcow2") as view, mounted(view) as mnt:
        seq = last_sequence((mnt / "ffwork.log").read_bytes())
    assert seq is not None
    return seq


@pytest.mark.parametrize("driver", ["qmp", "libvirt"])
async def test_lab_down_saves_a_deleted_active_overlay(
    lab_vm: LabVmFactory, catalog: Catalog, driver: str
) -> None:
    vm = await lab_vm(disks=("ext4",), driver=driver)
    await catalog.add_vm(vm.vm_config(), replace=True)
    first = await Snapshotter(catalog).snapshot(vm.name, REQUIRED)
    (d,) = first.disks
    assert d.overlay is not None
    os.unlink(d.overlay)
    await asyncio.sleep(2.0)  # the workload writes on, into the unlinked overlay only

    down = ff("lab", "down", vm.name, "--save")
    assert down.returncode == 0, down.stderr
    assert not lab_status(vm.name).running
    assert os.path.exists(d.overlay)
    assert not os.path.exists(d.overlay + ".ff-save")
    # What was written after the cut, which lived only in the unlinked file, is kept.
    assert await last_seq(d.overlay) > await last_seq(d.image)

    again = await lab_up(vm.name)  # restarts on it (its chain checked back to the base)
    assert again.running
    rep = await doctor(catalog, vm.name)
    assert not [c for c in rep.checks if c.name.endswith(" chain")]
