"""``snapshot export`` of a running lab VM, end to end through the real CLI: with the workload
writing, a quiesced snapshot is exported with ``--verify --json``; each exported image is
standalone (no backing file), holds the workload's data as the image at the cut holds it, and
freezeframe's offline checks find its filesystems consistent; the VM's chain is untouched
(same files, the read-only ones with the same size, mtime and inode; the guest keeps writing);
the metadata file carries the level, its reason and the verdict; and the exported images boot
the lab guest on their own (a new lab VM on them: every filesystem mounts, the records up to
the cut are there, its workload writes on)."""

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
from freezeframe.lab import LabVm, lab_down, lab_up
from freezeframe.lab.workload import last_sequence
from freezeframe.models import (
    ConsistencyLevel,
    SnapshotDisk,
    SnapshotStatus,
    VerifyVerdict,
)
from freezeframe.storage import mounted, open_image, verify_disks
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
        ["qemu-img", "info", "-U", "--output=json", image],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def chain_files(vmdir: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(vmdir.glob("*.qcow2"))
    }


async def guest_seq(vm: LabVm) -> int:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        return int((await ga.file_read("/run/ffwork/seq")).strip() or b"0")


async def guest_sh(vm: LabVm, script: str) -> str:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path)) as ga:
        res = await ga.exec("/bin/sh", ["-c", script], timeout=30)
    assert res.exitcode == 0, res
    return res.stdout.decode()


async def test_export_while_the_vm_writes_and_boot_the_export(
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
    vmdir = vm.disks[0].file.parent
    overlays = {Path(str(d.overlay)).name for d in rec.disks}
    before = chain_files(vmdir)

    to = tmp_path / "export"
    cli = await asyncio.to_thread(
        ff, "snapshot", "export", rec.id, "--to", str(to), "--verify", "--json"
    )
    assert cli.returncode == 0, cli.stderr + cli.stdout
    out = json.loads(cli.stdout)
    assert set(out) >= {
        "snapshot_id", "vm", "directory", "format", "compressed", "images", "metadata_path",
        "verdict", "verdict_source", "virtual_bytes", "file_bytes", "duration_ms",
    }  # fmt: skip
    assert (out["snapshot_id"], out["vm"], out["format"]) == (rec.id, vm.name, "qcow2")
    assert (out["verdict"], out["verdict_source"]) == ("verified-consistent", "run")
    assert out["virtual_bytes"] == sum(d.virtual_size for d in rec.disks)
    print(  # the numbers of this run (pytest -s)
        f"export: {out['virtual_bytes'] / 2**20:.0f} MiB virtual, "
        f"{out['file_bytes'] / 2**20:.1f} MiB written, {out['duration_ms']:.0f} ms (with verify)"
    )
    assert sorted(os.listdir(to)) == ["disk0.qcow2", "disk1.qcow2", "metadata.json"]

    # the VM's chain is untouched: same files; all but the overlays the VM writes to unchanged
    after = chain_files(vmdir)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k not in overlays} == {
        k: v for k, v in before.items() if k not in overlays
    }
    assert all(after[k][2] == before[k][2] for k in overlays)
    assert changed_since_cut(await catalog.get_snapshot(rec.id)) is None

    doc = json.loads((to / "metadata.json").read_text())
    assert (doc["snapshot"], doc["vm"]) == (rec.id, vm.name)
    assert doc["level"] == "filesystem"
    assert doc["level_reason"] == rec.level_reason
    assert doc["verification"]["verdict"] == "verified-consistent"
    assert doc["verification"]["source"] == "run"
    assert [(d["device"], d["file"], d["source"]) for d in doc["disks"]] == [
        (d.device, f"{d.device}.qcow2", d.image) for d in rec.disks
    ]
    assert sorted(f["fstype"] for f in doc["filesystems"]) == ["ext4", "xfs"]

    exported = []
    cut_records = []
    for img, disk in zip(out["images"], rec.disks, strict=True):
        info = qemu_img_info(img["path"])
        assert "backing-filename" not in info, info
        assert "full-backing-filename" not in info, info
        assert (info["format"], info["virtual-size"]) == ("qcow2", disk.virtual_size)
        at_cut = await last_record(disk.image, disk.format)
        assert at_cut is not None
        assert await last_record(img["path"], "qcow2") == at_cut
        cut_records.append(at_cut)
        exported.append(SnapshotDisk(disk.device, disk.node, img["path"], "qcow2", overlay=None))
    expect = {f.device: f.fstype for f in rec.filesystems if f.device}
    verdict = await verify_disks(exported, expect=expect)
    assert verdict.verdict is VerifyVerdict.CONSISTENT, verdict.checks
    assert sorted(c.fstype for c in verdict.checks) == ["ext4", "xfs"]

    # the guest kept writing through all of it
    seq = await guest_seq(vm)
    await asyncio.sleep(1.0)
    assert await guest_seq(vm) > seq

    # the exported images boot the lab guest on their own
    name = f"{vm.name}-x"
    booted = await lab_up(
        name, disks=("ext4", "xfs"), images=[(i["path"], "qcow2") for i in out["images"]]
    )
    try:
        for i, n in enumerate(cut_records):  # every record up to the cut, in order
            line = await guest_sh(booted, f"sed -n '{n}p' /mnt/disk{i}/ffwork.log | cut -c1-24")
            assert line.startswith(f"seq={n} disk={i} "), line
        # its workload writes on the exported images: the log grows (the workload's own counter
        # restarts at 0 whenever its script starts, so a late start read as "went backwards")
        size = int(await guest_sh(booted, "wc -c < /mnt/disk0/ffwork.log"))
        await asyncio.sleep(1.0)
        assert int(await guest_sh(booted, "wc -c < /mnt/disk0/ffwork.log")) > size
    finally:
        await lab_down(name, purge=True)
    assert sorted(os.listdir(to)) == ["disk0.qcow2", "disk1.qcow2", "metadata.json"]
