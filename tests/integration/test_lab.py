"""The lab VM end to end: real QEMU, real Debian kernel, real qemu-ga."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from freezeframe import paths
from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.errors import AlreadyExistsError, DependencyError, LabError, UsageError
from freezeframe.lab import LabVm, _build, _qemu, cache_dir, lab_down, lab_list, lab_status, lab_up
from freezeframe.lab.workload import MAXGAP_PATH, SEQ_PATH, last_sequence
from freezeframe.models import QuiescePolicy
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def assert_nothing_left(name: str, vm: LabVm | None = None) -> None:
    vmdir = paths.lab_dir() / name
    assert processes_mentioning(str(vmdir)) == []
    if vm is not None:
        assert not _qemu.qemu_alive(vm.pid, vm.qmp_path)
        assert not vm.qmp_path.exists()
        assert vm.qga_path is None or not vm.qga_path.exists()
    mounts = Path("/proc/mounts").read_text()
    assert str(vmdir) not in mounts
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        assert str(vmdir) not in backing.read_text()


async def test_three_filesystems_agent_workload_and_clean_teardown(
    lab_vm: LabVmFactory,
) -> None:
    vm = await lab_vm("fs3", disks=("ext4", "xfs", "vfat"))
    assert vm.running
    assert vm.accel in ("tcg", "kvm")
    assert vm.qga_path is not None
    assert [d.fstype for d in vm.disks] == ["ext4", "xfs", "vfat"]
    assert all(d.file.is_file() and d.format == "qcow2" for d in vm.disks)
    assert _qemu.qemu_alive(vm.pid, vm.qmp_path)
    assert lab_status("fs3").running
    assert [v.name for v in lab_list()] == ["fs3"]

    async with GuestAgent(str(vm.qga_path), timeout=10.0) as ga:
        await ga.ping()
        by_mount = {fs.mountpoint: fs for fs in await ga.get_fsinfo()}
        for i, disk in enumerate(vm.disks):
            fs = by_mount[disk.mountpoint]
            assert fs.fstype == disk.fstype
            # the host maps guest filesystems to its disks by serial and PCI slot
            assert [d.serial for d in fs.disks] == [f"ff{disk.device}"]
            pci = fs.disks[0].pci
            assert pci is not None
            assert pci.slot == _qemu.DISK_SLOT0 + i
        seq1 = int((await ga.file_read(SEQ_PATH)).decode())
        await asyncio.sleep(1.5)
        seq2 = int((await ga.file_read(SEQ_PATH)).decode())
        assert seq2 > seq1 > 0
        assert int((await ga.file_read(MAXGAP_PATH)).decode()) >= 0
        for disk in vm.disks:
            log = await ga.file_read(f"{disk.mountpoint}/ffwork.log", max_bytes=64 << 20)
            last = last_sequence(log)
            assert last is not None
            assert last >= seq1

    await lab_down("fs3", purge=True)
    assert not (paths.lab_dir() / "fs3").exists()
    assert_nothing_left("fs3", vm)
    assert lab_list() == []


async def test_unknown_filesystem_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="btrfs"):
        await lab_up("badfs", disks=("ext4", "btrfs"))
    assert not (paths.lab_dir() / "badfs").exists()
    assert_nothing_left("badfs")


async def test_missing_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_build.HOST_FILES, "/nonexistent/usr/sbin/qemu-ga", "qemu-guest-agent")
    with pytest.raises(DependencyError) as info:
        await lab_up("nodeps")
    assert info.value.package == "qemu-guest-agent"
    assert "apt-get install -y qemu-guest-agent" in (info.value.hint or "")
    monkeypatch.delitem(_build.HOST_FILES, "/nonexistent/usr/sbin/qemu-ga")
    monkeypatch.setitem(_build.HOST_PROGRAMS, "qemu-system-ff-missing", "qemu-system-x86")
    with pytest.raises(DependencyError) as info:
        await lab_up("nodeps")
    assert info.value.package == "qemu-system-x86"
    assert not (paths.lab_dir() / "nodeps").exists()
    assert_nothing_left("nodeps")


async def test_running_name_is_taken_and_a_stale_directory_is_reused(
    lab_vm: LabVmFactory,
) -> None:
    vm = await lab_vm("dup", disks=("ext4",), agent=False)
    assert vm.qga_path is None
    with pytest.raises(AlreadyExistsError, match="already running"):
        await lab_up("dup", disks=("xfs",), agent=False)
    again = lab_status("dup")
    assert again.running
    assert again.pid == vm.pid
    assert [d.fstype for d in again.disks] == ["ext4"]

    # QEMU dies behind our back: the record is stale, and the name can be used again.
    os.kill(vm.pid, signal.SIGKILL)
    for _ in range(100):
        if not _qemu.qemu_alive(vm.pid, vm.qmp_path):
            break
        await asyncio.sleep(0.05)
    assert not lab_status("dup").running
    # A stopped VM restarts on its own disks: other disks are refused, nothing is touched.
    with pytest.raises(LabError, match=r"exists \(stopped\) with disks ext4, not vfat") as refused:
        await lab_up("dup", disks=("vfat",), agent=False)
    assert "lab down dup --purge" in (refused.value.hint or "")
    with pytest.raises(LabError, match="not 1073741824"):
        await lab_up("dup", disk_size="1G", agent=False)
    reborn = await lab_vm("dup", disks=("ext4",), agent=False)
    assert reborn.pid != vm.pid
    assert lab_status("dup").running
    assert [d.fstype for d in reborn.disks] == ["ext4"]
    # Purged, the name is free for other disks.
    await lab_down("dup", purge=True)
    other = await lab_vm("dup", disks=("vfat",), agent=False)
    assert [d.fstype for d in other.disks] == ["vfat"]


async def test_guest_not_ready_in_time(lab_vm: LabVmFactory) -> None:
    with pytest.raises(LabError, match="console") as info:
        await lab_vm("slow", disks=("ext4",), timeout=0.1)
    assert "not ready" in info.value.message
    status = lab_status("slow")
    assert not status.running
    assert_nothing_left("slow", status)


async def test_broken_guest_init_fails_with_console_tail(
    lab_vm: LabVmFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Build the broken initramfs in a private cache that borrows the real kernel.
    real_cache = cache_dir()
    await _build.ensure_artifacts()
    cache = tmp_path / "cache"
    cache.mkdir()
    for entry in real_cache.iterdir():
        if entry.name.startswith("kernel-") or entry.name == "accel-probe.json":
            (cache / entry.name).symlink_to(entry)
    monkeypatch.setenv("FREEZEFRAME_CACHE", str(cache))
    guest = tmp_path / "guest"
    shutil.copytree(_build.GUEST_DIR, guest)
    (guest / "init").write_text("#!/bin/sh\necho FFLAB-BROKEN-INIT\nexit 1\n")
    monkeypatch.setattr(_build, "GUEST_DIR", guest)

    with pytest.raises(LabError, match="QEMU exited during boot") as info:
        await lab_vm("broken", disks=(), timeout=60)
    assert "Kernel panic" in info.value.message  # the console's tail
    status = lab_status("broken")
    assert "FFLAB-BROKEN-INIT" in status.console_log.read_text()
    assert not status.running
    assert_nothing_left("broken", status)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _ff("lab", *args)


def _ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from freezeframe.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_cli_up_list_status_down() -> None:
    try:
        up = _cli("up", "cli1", "--disks", "ext4", "--no-agent", "--json")
        assert up.returncode == 0, up.stderr
        doc = json.loads(up.stdout)
        assert doc["name"] == "cli1"
        assert doc["qga_path"] is None
        assert doc["accel"] in ("tcg", "kvm")
        assert Path(doc["console_log"]).is_file()
        assert doc["disks"] == [
            {
                "device": "disk0",
                "node": "disk0",
                "file": str(paths.lab_dir() / "cli1" / "disk0.qcow2"),
                "format": "qcow2",
                "fstype": "ext4",
                "mountpoint": "/mnt/disk0",
            }
        ]
        assert _qemu.qemu_alive(doc["pid"], Path(doc["qmp_path"]))

        listed = json.loads(_cli("list", "--json").stdout)
        assert [(v["name"], v["running"]) for v in listed] == [("cli1", True)]
        assert json.loads(_cli("status", "cli1", "--json").stdout)["pid"] == doc["pid"]

        dup = _cli("up", "cli1", "--no-agent", "--json")
        assert dup.returncode == 2
        assert json.loads(dup.stdout)["error"] == "AlreadyExistsError"
        bad = _cli("up", "cli2", "--disks", "ext4,zfs", "--json")
        assert bad.returncode == 2
        assert "zfs" in json.loads(bad.stdout)["message"]

        snap = _ff("snapshot", "create", "cli1", "--quiesce", "off", "--json")
        assert snap.returncode == 0, snap.stderr
        listed = json.loads(_ff("snapshot", "list", "cli1", "--json").stdout)
        assert [r["id"] for r in listed] == [json.loads(snap.stdout)["id"]]

        down = _cli("down", "cli1", "--purge", "--json")
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["snapshots_removed"] == 1
        # Its images were in the purged directory: no record may point at them any more.
        everything = json.loads(_ff("snapshot", "list", "--json").stdout)
        assert [r["id"] for r in everything if r["vm"] == "cli1"] == []
        assert not _qemu.qemu_alive(doc["pid"], Path(doc["qmp_path"]))
        missing = _cli("status", "cli1", "--json")
        assert missing.returncode == 2
        assert json.loads(missing.stdout)["error"] == "NotFoundError"
        assert_nothing_left("cli1")
    finally:
        for name in ("cli1", "cli2"):
            if (paths.lab_dir() / name).exists():
                asyncio.run(lab_down(name, purge=True))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


async def _guest_sh(vm: LabVm, script: str) -> bytes:
    assert vm.qga_path is not None
    async with GuestAgent(str(vm.qga_path), timeout=30.0) as ga:
        res = await ga.exec("/bin/sh", ["-c", script])
    assert res.exitcode == 0, res
    return res.stdout


def _booted_from(name: str) -> list[str]:
    argv = (paths.lab_dir() / name / "qemu.argv").read_text().splitlines()
    return [a.split("filename=", 1)[1] for a in argv if a.startswith("driver=file,")]


async def test_restart_boots_from_the_top_of_each_chain(lab_vm: LabVmFactory) -> None:
    """lab down + lab up keeps what the guest wrote after a snapshot and never writes into
    the snapshot's image at the cut; so does an up after QEMU was killed (no record)."""
    name = "rst"
    vm = await lab_vm(name, disks=("ext4",))
    base = vm.disks[0].file
    async with await Catalog.open() as cat:
        await cat.add_vm(vm.vm_config(), replace=True)
        snap = Snapshotter(cat)
        first = await snap.snapshot(name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
        assert [Path(d.image) for d in first.disks] == [base]
        assert first.disks[0].overlay is not None
        top1 = Path(first.disks[0].overlay)
        await _guest_sh(vm, "echo after-first > /mnt/disk0/marker1 && sync")
        await lab_down(name)
        base_sum = _sha256(base)

        again = await lab_vm(name, disks=("ext4",))
        assert _booted_from(name) == [str(top1)]
        assert await _guest_sh(again, "cat /mnt/disk0/marker1") == b"after-first\n"
        second = await snap.snapshot(name, SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
        assert [Path(d.image) for d in second.disks] == [top1]
        assert second.disks[0].overlay is not None
        top2 = Path(second.disks[0].overlay)
        await _guest_sh(again, "echo after-second > /mnt/disk0/marker2 && sync")
        top1_sum = _sha256(top1)

    # Unclean: QEMU killed, nothing recorded; the one leaf of the chain is found.
    os.kill(again.pid, signal.SIGKILL)
    for _ in range(100):
        if not _qemu.qemu_alive(again.pid, again.qmp_path):
            break
        await asyncio.sleep(0.05)
    third = await lab_up(name)  # no disks given: its own (the fixture still purges it)
    assert [d.fstype for d in third.disks] == ["ext4"]
    assert _booted_from(name) == [str(top2)]
    out = await _guest_sh(third, "cat /mnt/disk0/marker1 /mnt/disk0/marker2")
    assert out == b"after-first\nafter-second\n"
    await lab_down(name)
    # The snapshots' images at the cut never changed.
    assert _sha256(base) == base_sum
    assert _sha256(top1) == top1_sum
    check = subprocess.run(["qemu-img", "check", str(base)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout

    # A leaf that would fork the chain makes the top ambiguous without a record: refused.
    record = paths.lab_dir() / name / "vm.json"
    doc = json.loads(record.read_text())
    assert doc["tops"] == {"disk0": str(top2)}
    stray = top2.with_name("disk0.ff-stray.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(top1), str(stray)],
        check=True,
    )
    del doc["tops"]
    record.write_text(json.dumps(doc))
    with pytest.raises(LabError, match="ambiguous") as info:
        await lab_up(name)
    assert "disk0.ff-stray.qcow2" in info.value.message
    assert top2.name in info.value.message
    assert not lab_status(name).running
    # A recorded top that now backs two images (a fork above it) is refused too.
    doc["tops"] = {"disk0": str(top1)}
    record.write_text(json.dumps(doc))
    with pytest.raises(LabError, match="backing file of other images"):
        await lab_up(name)
    assert _sha256(top1) == top1_sum


def test_cli_rejects_bad_up_input_and_help_shows_the_name_rule() -> None:
    for args, text in [
        (("--timeout", "-1"), "timeout"),
        (("--timeout", "0"), "timeout"),
        (("--timeout", "nan"), "timeout"),
        (("--disks", ""), "no data disk"),
        (("--disks", "ext4,,xfs"), "empty entry"),
        (("--disk-size", "1"), "disk size"),
    ]:
        res = _cli("up", "badin", *args, "--json")
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert json.loads(res.stdout)["error"] == "UsageError"
        assert text in json.loads(res.stdout)["message"]
    assert not (paths.lab_dir() / "badin").exists()
    helped = subprocess.run(
        [
            sys.executable,
            "-c",
            "from freezeframe.cli.main import main; main()",
            "lab",
            "up",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "1-32 characters of a-z, 0-9 and '-'" in helped.stdout
    purge = _cli("down", "--help").stdout
    assert "registration" in purge
