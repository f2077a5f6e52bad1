"""Export of a snapshot of a running lab VM (freezeframe.storage.export), before the CLI has an
``export`` command: the snapshot is taken with the CLI, exported by calling the module while the
guest keeps writing; each exported image is standalone (no backing file), holds the same
workload data as the image at the cut, and freezeframe's offline verification finds its
filesystems consistent. The VM's chain is not touched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine.verify import changed_since_cut
from freezeframe.lab import LabVm
from freezeframe.lab.workload import last_sequence
from freezeframe.models import (
    ConsistencyLevel,
    SnapshotDisk,
    SnapshotStatus,
    VerifyVerdict,
)
from freezeframe.storage import mounted, open_image, verify_disks
from freezeframe.storage.export import ExportDisk, ExportProgress, export_snapshot_images
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration
FF = [sys.executable, "-m", "freezeframe.cli.main"]


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FF, *args], env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False
    )


async def last_record(image: str, fmt: str) -> int | None:
    async with open_image(image, fmt) as view, mounted(view) as mnt:
        return last_sequence((mnt / "ffwork.log").read_bytes())


def qemu_img_info(image: str) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", image], capture_output=True, text=True, check=True
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


async def test_export_while_the_vm_writes(
    lab_vm: LabVmFactory, catalog: Catalog, tmp_path: Path
) -> None:
    vm = await lab_vm(disks=("ext4", "xfs"))
    await catalog.add_vm(vm.vm_config(), replace=True)
    await asyncio.sleep(1.0)  # let the workload dirty some pages
    cli = await asyncio.to_thread(ff, "snapshot", "create", vm.name, "--quiesce", "required")
    assert cli.returncode == 0, cli.stderr
    (rec,) = await catalog.list_snapshots(vm.name)
    assert rec.status is SnapshotStatus.DONE
    assert rec.level is ConsistencyLevel.FILESYSTEM
    assert all(d.backend == "qcow2-external" for d in rec.disks)

    seen: list[ExportProgress] = []
    res = await export_snapshot_images(
        [ExportDisk(d.device, d.image, d.format) for d in rec.disks],
        tmp_path / "export",
        progress=seen.append,
        metadata={
            "vm": vm.name,
            "snapshot": rec.id,
            "taken_at": rec.created_at,
            "level": rec.level,
            "level_reason": rec.level_reason,
            "verification": rec.verification.verdict if rec.verification else None,
            "disks": {d.device: d.image for d in rec.disks},
        },
    )
    assert seen[-1].done == seen[-1].total == sum(d.virtual_size for d in rec.disks)
    doc = json.loads(Path(str(res.metadata_path)).read_text())
    assert doc["level"] == "filesystem"
    assert doc["snapshot"] == rec.id
    assert sorted(i["device"] for i in doc["export"]["images"]) == sorted(
        d.device for d in rec.disks
    )

    # the VM's chain was not written: the images at the cut are what the cut left
    assert changed_since_cut(await catalog.get_snapshot(rec.id)) is None

    exported = []
    for img, disk in zip(res.images, rec.disks, strict=True):
        info = qemu_img_info(img.path)
        assert "backing-filename" not in info, info
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == disk.virtual_size
        # the same workload data as the image at the cut
        assert await last_record(img.path, "qcow2") == await last_record(disk.image, disk.format)
        exported.append(
            SnapshotDisk(
                device=disk.device, node=disk.node, image=img.path, format="qcow2", overlay=None
            )
        )

    expect = {f.device: f.fstype for f in rec.filesystems if f.device}
    verdict = await verify_disks(exported, expect=expect)
    assert verdict.verdict is VerifyVerdict.CONSISTENT, verdict.checks
    assert sorted(c.fstype for c in verdict.checks) == ["ext4", "xfs"]

    # a raw export of the same snapshot (no metadata) is just as consistent
    raw = await export_snapshot_images(
        [ExportDisk(d.device, d.image, d.format) for d in rec.disks],
        tmp_path / "raw",
        fmt="raw",
        metadata=None,
    )
    assert sorted(os.listdir(tmp_path / "raw")) == sorted(f"{d.device}.raw" for d in rec.disks)
    raw_disks = [
        SnapshotDisk(device=i.device, node=d.node, image=i.path, format="raw", overlay=None)
        for i, d in zip(raw.images, rec.disks, strict=True)
    ]
    raw_verdict = await verify_disks(raw_disks, expect=expect)
    assert raw_verdict.verdict is VerifyVerdict.CONSISTENT, raw_verdict.checks

    # the guest kept writing through all of it
    seq = await last_record_live(vm)
    await asyncio.sleep(1.0)
    assert await last_record_live(vm) > seq


async def last_record_live(vm: LabVm) -> int:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        return int((await ga.file_read("/run/ffwork/seq")).strip() or b"0")
