"""The lab VM end to end: real QEMU, real Debian kernel, real qemu-ga."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from freezeframe import paths
from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter
from freezeframe.errors import (
    Action,
    AlreadyExistsError,
    DependencyError,
    LabError,
    Remedy,
    UsageError,
)
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
        assert vm.qmp_path is None or not vm.qmp_path.exists()
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
    assert refused.value.remedy == Remedy(Action.LAB_DOWN, "dup", {"purge": "yes"})
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
                "base": str(paths.lab_dir() / "cli1" / "disk0.qcow2"),
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
        # The disk shows the image it runs on, and its base.
        for shown in (again, lab_status(name)):
            assert (shown.disks[0].file, shown.disks[0].base_image) == (top1, base)
        status = _cli("status", name)
        assert f"{top1} (base disk0.qcow2)" in status.stdout, status.stdout
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
    assert not _qemu.qemu_alive(again.pid, again.qmp_path)
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


def _seqs_before_restart(log: bytes, disk: int) -> int:
    """The last sequence number the workload's first run wrote to a log that a later boot's
    workload (starting again at seq=1) appended to."""
    seqs = [
        int(line.split()[0].removeprefix("seq="))
        for line in log.decode(errors="replace").splitlines()
        if line.startswith("seq=") and f" disk={disk} " in line
    ]
    for prev, cur in itertools.pairwise(seqs):
        if cur < prev:
            return prev
    raise AssertionError(f"no restart of the workload in the log of disk{disk}")


async def test_down_flushes_the_guest_before_quitting(lab_vm: LabVmFactory) -> None:
    """What the guest wrote without sync survives lab down + lab up; the workload's logs do
    not go back; the record says stopped afterwards."""
    name = "flush"
    vm = await lab_vm(name, disks=("ext4", "xfs"))
    await asyncio.sleep(1.0)  # a few workload rounds in the page cache
    seq = int(
        await _guest_sh(
            vm, "echo m-ext4 > /mnt/disk0/m2; echo m-xfs > /mnt/disk1/m2; cat /run/ffwork/seq"
        )
    )
    assert seq > 0
    await lab_down(name)
    doc = json.loads((paths.lab_dir() / name / "vm.json").read_text())
    assert doc["running"] is False
    assert not lab_status(name).running

    again = await lab_vm(name)
    out = await _guest_sh(again, "cat /mnt/disk0/m2 /mnt/disk1/m2")
    assert out == b"m-ext4\nm-xfs\n"
    assert again.qga_path is not None
    async with GuestAgent(str(again.qga_path), timeout=30.0) as ga:
        for i in range(2):
            log = await ga.file_read(f"/mnt/disk{i}/ffwork.log", max_bytes=64 << 20)
            assert _seqs_before_restart(log, i) >= seq


async def test_down_refuses_while_a_snapshot_runs(lab_vm: LabVmFactory) -> None:
    """lab down waits for nobody and destroys nothing while a snapshot holds the VM's lock:
    refused with exit 9; --force goes on, saying why QEMU could not be asked, with no raw
    qemu.qmp lines."""
    name = "busy"
    vm = await lab_vm(name, disks=("ext4",))
    async with await Catalog.open() as cat:
        await cat.add_vm(vm.vm_config(), replace=True)
    snap = subprocess.Popen(
        [sys.executable, "-c", "from freezeframe.cli.main import main; main()",
         "snapshot", "create", name, "--hold-frozen", "30", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        async with await Catalog.open() as cat:
            for _ in range(200):
                if await cat.vm_lock_holder(name) is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the snapshot never took the VM's lock")
        await asyncio.sleep(1.0)  # well inside the freeze
        for args in (("--purge",), ()):
            refused = _cli("down", name, *args, "--json")
            assert refused.returncode == 9, (refused.stdout, refused.stderr)
            assert json.loads(refused.stdout)["error"] == "BusyError"
            assert "in progress" in json.loads(refused.stdout)["message"]
            assert lab_status(name).running
        assert (paths.lab_dir() / name / "disk0.qcow2").is_file()

        forced = _cli("down", name, "--force")
        assert forced.returncode == 0, forced.stderr
        assert "stopping busy anyway (forced)" in forced.stderr
        assert not lab_status(name).running
    finally:
        if snap.poll() is None:
            snap.kill()  # it would wait out its hold, then fail: its QEMU is gone
        snap.communicate(timeout=60)


async def test_down_while_another_client_holds_qmp_says_why(lab_vm: LabVmFactory) -> None:
    """QEMU's QMP socket serves one client: lab down says why it cannot ask QEMU for the top
    images (no empty reason), prints no raw qemu.qmp lines, and still stops QEMU."""
    name = "qmpbusy"
    vm = await lab_vm(name, disks=("ext4",), agent=False)
    holder = QMPClient("test-holder")
    await holder.connect(str(vm.qmp_path))
    try:
        down = await asyncio.to_thread(_cli, "down", name)
    finally:
        with contextlib.suppress(Exception):
            await holder.disconnect()
    assert down.returncode == 0, down.stderr
    assert "qemu.qmp" not in down.stderr
    assert "Greeting" not in down.stderr
    tops_line = [ln for ln in down.stderr.splitlines() if "top images" in ln]
    assert tops_line, down.stderr
    assert "did not greet within" in tops_line[0]
    assert not lab_status(name).running
    assert not _qemu.qemu_alive(vm.pid, vm.qmp_path)


def test_cli_up_registers_a_running_unregistered_lab_vm() -> None:
    """`lab up` killed -9 during boot leaves QEMU running unregistered: the next `lab up`
    registers it (and says so); once registered, it is refused as running."""
    name = "orphan"
    record = paths.lab_dir() / name / "vm.json"
    first = subprocess.Popen(
        [sys.executable, "-c", "from freezeframe.cli.main import main; main()",
         "lab", "up", name, "--disks", "ext4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(600):
            if record.is_file():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("lab up never wrote its record")
        first.kill()
        first.wait(timeout=30)
        assert lab_status(name).running

        up = _cli("up", name)
        assert up.returncode == 0, up.stderr
        assert "not registered: registered it" in up.stderr
        assert lab_status(name).pid == json.loads(record.read_text())["pid"]
        snap = _ff("snapshot", "create", name, "--json")
        assert snap.returncode == 0, snap.stderr

        again = _cli("up", name, "--json")
        assert again.returncode == 2
        assert json.loads(again.stdout)["error"] == "AlreadyExistsError"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
        if (paths.lab_dir() / name).exists():
            asyncio.run(lab_down(name, purge=True))
        assert_nothing_left(name)


def test_cli_accel_kvm_fails_at_once_when_the_probe_says_no(tmp_path: Path) -> None:
    """With a cached probe saying KVM hangs, `--accel kvm` fails at once (exit 5) and names
    the way out, instead of waiting for the ready timeout."""
    asyncio.run(_build.ensure_artifacts())
    cache = tmp_path / "cache"
    cache.mkdir()
    for entry in cache_dir().iterdir():
        if entry.name != _qemu.PROBE_FILE:
            (cache / entry.name).symlink_to(entry)
    artifacts = asyncio.run(_build.ensure_artifacts())
    (cache / _qemu.PROBE_FILE).write_text(
        json.dumps({"key": _qemu._probe_key(artifacts.kver), "kvm": False, "at": 0})
    )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: the probe is not consulted")
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", "from freezeframe.cli.main import main; main()",
         "lab", "up", "kvmno", "--accel", "kvm", "--timeout", "30", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "FREEZEFRAME_CACHE": str(cache)},
    )  # fmt: skip
    assert res.returncode == 5, (res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert doc["error"] == "LabError"
    assert "KVM is not usable" in doc["message"]
    assert "--accel auto" in doc["hint"]
    assert time.monotonic() - started < 20
    assert not (paths.lab_dir() / "kvmno").exists()
    assert_nothing_left("kvmno")


async def test_a_failed_down_leaves_the_workload_running(
    lab_vm: LabVmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lab down stops the workload to flush; when QEMU then stays up (the stop failed, or
    Ctrl-C), the workload is resumed."""
    name = "resume"
    vm = await lab_vm(name, disks=("ext4",))

    async def broken_stop(*_: object, **__: object) -> str:
        raise LabError("simulated: QEMU could not be stopped")

    monkeypatch.setattr(_qemu, "stop_qemu", broken_stop)
    with pytest.raises(LabError, match="simulated"):
        await lab_down(name)
    monkeypatch.undo()
    first = int(await _guest_sh(vm, "cat /run/ffwork/seq"))
    await asyncio.sleep(1.5)
    assert int(await _guest_sh(vm, "cat /run/ffwork/seq")) > first  # still writing


async def test_a_stopped_vm_restarts_with_its_agent_setting(lab_vm: LabVmFactory) -> None:
    """A VM built --no-agent restarts without qemu-ga (and is registered agent=no) when
    `lab up` is given no agent choice; a differing choice is refused like a --disks one."""
    name = "mute"
    vm = await lab_vm(name, disks=("ext4",), agent=False)
    assert vm.qga_path is None
    await lab_down(name)
    up = await asyncio.to_thread(_cli, "up", name, "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["qga_path"] is None
    assert not any("qga" in a for a in (paths.lab_dir() / name / "qemu.argv").read_text().split())
    async with await Catalog.open() as cat:
        assert not (await cat.get_vm(name)).agent
    # lab status says honestly which images it shows: those the disks booted from.
    status = await asyncio.to_thread(_cli, "status", name)
    assert "the images each disk booted from" in status.stdout, status.stdout
    await lab_down(name)
    refused = await asyncio.to_thread(_cli, "up", name, "--agent", "--json")
    assert refused.returncode == 5, refused.stderr
    doc = json.loads(refused.stdout)
    assert doc["error"] == "LabError"
    assert "exists (stopped) without a guest agent, not with one" in doc["message"]
    assert "omit --agent" in doc["hint"]
    assert f"lab down {name} --purge" in doc["hint"]
    assert not lab_status(name).running
    with pytest.raises(LabError, match="without a guest agent, not with one"):
        await lab_up(name, agent=True)
    assert lab_status(name).qga_path is None


async def test_down_refuses_while_a_freeze_intent_is_open(lab_vm: LabVmFactory) -> None:
    """A snapshot killed while the guest was frozen leaves an open freeze intent (and a dead
    lock owner): lab down refuses (exit 12) and names `freezeframe recover`, which thaws the
    guest; --force goes on and --purge closes the intents."""
    name = "frozen"
    vm = await lab_vm(name, disks=("ext4",))
    assert vm.qga_path is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{socket.gethostname()}:{dead.pid}:deadbeef"
    async with await Catalog.open() as cat:
        await cat.add_vm(vm.vm_config(), replace=True)
        async with GuestAgent(str(vm.qga_path), timeout=30.0) as ga:
            await cat.open_intent(name, "ff-killed1", str(vm.qga_path), owner)
            assert await ga.fsfreeze_freeze() >= 1
        try:
            for args in ((), ("--purge",)):
                refused = await asyncio.to_thread(_cli, "down", name, *args, "--json")
                assert refused.returncode == 12, (refused.stdout, refused.stderr)
                doc = json.loads(refused.stdout)
                assert doc["error"] == "RecoverError"
                assert "ff-killed1" in doc["message"]
                assert "frozen" in doc["message"]
                assert doc["code"] == "intent-open"
                assert doc["remedy"] == {"action": "recover", "vm": name, "params": {}}
                assert f"`freezeframe recover {name}`" in doc["hint"]
                assert lab_status(name).running
                assert len(await cat.open_intents(name)) == 1
            rec = await asyncio.to_thread(_ff, "recover", name)
            assert rec.returncode == 0, (rec.stdout, rec.stderr)
            assert await cat.open_intents(name) == []
            async with GuestAgent(str(vm.qga_path), timeout=30.0) as ga:
                assert (await ga.fsfreeze_status()).value == "thawed"
        finally:
            with contextlib.suppress(Exception):
                async with GuestAgent(str(vm.qga_path), timeout=10.0) as ga:
                    await ga.fsfreeze_thaw()
        # Another intent left open: --force stops the VM anyway and --purge closes it.
        await cat.open_intent(name, "ff-killed2", str(vm.qga_path), owner)
        forced = await asyncio.to_thread(_cli, "down", name, "--force", "--purge")
        assert forced.returncode == 0, forced.stderr
        assert "ff-killed2" in forced.stderr
        assert "anyway (forced)" in forced.stderr
        assert await cat.open_intents(name) == []
    assert not _qemu.qemu_alive(vm.pid, vm.qmp_path)
