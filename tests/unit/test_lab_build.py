"""Pure parts of the lab: validation, the newc writer, the QEMU command line, dependency checks."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from freezeframe.errors import DependencyError, LabError, UsageError
from freezeframe.lab import _build, _chain, _qemu
from freezeframe.lab._build import BootArtifacts
from freezeframe.lab._cpio import CpioWriter
from freezeframe.lab._model import (
    LabDisk,
    parse_disks,
    parse_size,
    validate_fstypes,
    validate_name,
    validate_timeout,
)
from freezeframe.lab._util import console_tail


@pytest.mark.parametrize("name", ["a", "vm0", "lab-1", "0abc", "a" * 32])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "A", "a_b", "a/b", "a" * 33, "a.b", "a b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_name(name)


def test_sizes() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(str(128 << 20)) == 128 << 20
    for bad in ("12", "1T", "abc", "-1G", "1.5G"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_fstypes() -> None:
    assert validate_fstypes(["EXT4", " xfs", "vfat"]) == ("ext4", "xfs", "vfat")
    with pytest.raises(UsageError, match="btrfs"):
        validate_fstypes(["ext4", "btrfs"])


def test_cpio_roundtrip_with_host_cpio(tmp_path: Path) -> None:
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("etc/deep/dir/file.txt", b"hello\n")  # parents created on the way
    w.dir("etc")  # adding a directory again is a no-op
    w.file("bin/tool", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "tool")
    w.close()
    with pytest.raises(ValueError, match="duplicate"):
        w.file("bin/tool", b"")
    listing = subprocess.run(
        ["cpio", "-itv"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert "etc/deep/dir/file.txt" in listing
    assert "bin/sh -> tool" in listing
    subprocess.run(["cpio", "-id", "--quiet"], input=buf.getvalue(), cwd=tmp_path, check=True)
    assert (tmp_path / "etc/deep/dir/file.txt").read_bytes() == b"hello\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/sh").readlink() == Path("tool")


def test_qemu_argv(tmp_path: Path) -> None:
    disks = [
        LabDisk("disk0", "disk0", tmp_path / "a,b.qcow2", "qcow2", "ext4", "/mnt/disk0"),
        LabDisk("disk1", "disk1", tmp_path / "d1.qcow2", "qcow2", "xfs", "/mnt/disk1"),
    ]
    art = BootArtifacts(tmp_path / "vmlinuz", tmp_path / "initrd", "6.1.0-1-amd64")
    argv = _qemu.qemu_argv(
        name="x",
        artifacts=art,
        accel="tcg",
        cmdline=_qemu.kernel_cmdline(["ext4", "xfs"], agent=True),
        console_log=tmp_path / "console.log",
        qmp_path=tmp_path / "qmp.sock",
        qga_path=tmp_path / "qga.sock",
        disks=disks,
        pidfile=tmp_path / "pid",
    )
    joined = " ".join(argv)
    assert "-cpu max" in joined
    assert "host" not in argv
    assert "-nodefaults" in argv
    assert argv[argv.index("-nic") + 1] == "none"
    assert f"driver=file,node-name=disk0-file,filename={tmp_path}/a,,b.qcow2" in argv
    assert "driver=qcow2,node-name=disk1,file=disk1-file" in argv
    assert any(a.startswith("virtio-blk-pci,id=disk1,drive=disk1,serial=ffdisk1,") for a in argv)
    assert f"socket,id=qga0,path={tmp_path}/qga.sock,server=on,wait=off" in argv
    assert "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert "ff.disks=ext4,xfs ff.agent=1" in argv[argv.index("-append") + 1]
    assert argv[-3:] == ["-daemonize", "-pidfile", str(tmp_path / "pid")]


def test_qemu_argv_without_agent_has_no_serial_port(tmp_path: Path) -> None:
    art = BootArtifacts(tmp_path / "k", tmp_path / "i", "v")
    argv = _qemu.qemu_argv(
        name="x",
        artifacts=art,
        accel="kvm",
        cmdline="c",
        console_log=tmp_path / "c",
        qmp_path=tmp_path / "q",
        qga_path=None,
        disks=[],
        pidfile=None,
    )
    assert not any("virtserialport" in a or "virtio-serial" in a for a in argv)
    assert "-cpu" not in argv
    assert "-daemonize" not in argv


def test_qemu_alive_refuses_foreign_pid(tmp_path: Path) -> None:
    with subprocess.Popen(["sleep", "30"]) as proc:
        try:
            assert not _qemu.qemu_alive(proc.pid, tmp_path / "qmp.sock")
            _qemu.kill_now(proc.pid, tmp_path / "qmp.sock")  # must not touch it
            assert proc.poll() is None
        finally:
            proc.kill()


def test_check_dependencies_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "HOST_FILES", {"/nonexistent/qemu-ga": "qemu-guest-agent"})
    with pytest.raises(DependencyError) as info:
        _build.check_dependencies(())
    assert info.value.package == "qemu-guest-agent"
    monkeypatch.setattr(_build, "HOST_FILES", {})
    monkeypatch.setattr(_build, "MKFS_PROGRAMS", {"xfs": ("mkfs.nonexistent-ff", "xfsprogs")})
    with pytest.raises(DependencyError) as info:
        _build.check_dependencies(("xfs",))
    assert info.value.package == "xfsprogs"


def test_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_tail(log) == "(missing)"
    log.write_bytes(b"")
    assert console_tail(log) == "(empty)"
    log.write_bytes(b"".join(b"line %d\r\n" % i for i in range(100)))
    assert console_tail(log, 3) == "line 97\nline 98\nline 99"


def test_console_tail_keeps_an_earlier_panic_line(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    trace = b"".join(b"trace %d\n" % i for i in range(50))
    log.write_bytes(b"boot\nKernel panic - not syncing: Attempted to kill init!\n" + trace)
    tail = console_tail(log, 10).splitlines()
    assert tail[0].startswith("Kernel panic")
    assert tail[1] == "..."
    assert tail[2:] == [f"trace {i}" for i in range(40, 50)]


def test_parse_disks() -> None:
    assert parse_disks("ext4,xfs") == ("ext4", "xfs")
    assert parse_disks(" EXT4 , vfat") == ("ext4", "vfat")
    for bad, text in [("", "no data disk"), (" , ", "no data disk"), ("ext4,,xfs", "empty")]:
        with pytest.raises(UsageError, match=text):
            parse_disks(bad)
    with pytest.raises(UsageError, match="zfs"):
        parse_disks("ext4,zfs")


def test_validate_timeout() -> None:
    assert validate_timeout(60) == 60.0
    assert validate_timeout(0.5) == 0.5
    for bad in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(UsageError):
            validate_timeout(bad)


def _qcow2(path: Path, backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*argv, str(path), "64M"], check=True)
    return path


def _disk(vmdir: Path, i: int) -> LabDisk:
    return LabDisk(f"disk{i}", f"disk{i}", vmdir / f"disk{i}.qcow2", "qcow2", "ext4", "/mnt")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
async def test_boot_tops_follows_the_chain_and_refuses_doubt(tmp_path: Path) -> None:
    d0, d1 = _disk(tmp_path, 0), _disk(tmp_path, 1)
    base0, base1 = _qcow2(d0.file), _qcow2(d1.file)
    a0 = _qcow2(tmp_path / "disk0.ff-a.qcow2", base0)
    b0 = _qcow2(tmp_path / "disk0.ff-b.qcow2", a0)
    # No record: the one leaf above each base.
    tops, bases = await _chain.boot_tops("t", tmp_path, [d0, d1], None)
    assert tops == {"disk0": b0, "disk1": base1}
    assert bases["disk0"].virtual_size == 64 << 20
    # A record wins when it checks out.
    tops, _ = await _chain.boot_tops(
        "t", tmp_path, [d0, d1], {"disk0": str(b0), "disk1": str(base1)}
    )
    assert tops == {"disk0": b0, "disk1": base1}
    # Never an image another one is backed by (a snapshot raced lab down: the one image above
    # it), never one of another disk's chain.
    tops, _ = await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(a0)})
    assert tops == {"disk0": b0}
    tops, _ = await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(base0)})
    assert tops == {"disk0": b0}
    with pytest.raises(LabError, match="does not chain back"):
        await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(base1)})
    with pytest.raises(LabError, match="missing"):
        await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(tmp_path / "gone.qcow2")})
    # A fork: without a record the top is ambiguous.
    fork = _qcow2(tmp_path / "disk0.ff-fork.qcow2", a0)
    with pytest.raises(LabError, match="ambiguous") as info:
        await _chain.boot_tops("t", tmp_path, [d0], None)
    assert "disk0.ff-b.qcow2, disk0.ff-fork.qcow2" in info.value.message
    with pytest.raises(LabError, match="backing file of other images") as info:
        await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(a0)})
    assert "disk0.ff-b.qcow2, disk0.ff-fork.qcow2" in info.value.message
    fork.unlink()
    # A broken link in the chain: refused, naming the file.
    a0.unlink()
    with pytest.raises(LabError, match=r"disk0\.ff-b\.qcow2"):
        await _chain.boot_tops("t", tmp_path, [d0], {"disk0": str(b0)})


async def test_accel_kvm_refused_when_the_cached_probe_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = BootArtifacts(tmp_path / "vmlinuz", tmp_path / "initrd", "6.1.0-test")
    monkeypatch.setattr(_qemu, "_kvm_usable", lambda: True)
    monkeypatch.setattr(_qemu, "_probe_key", lambda kver: f"key|{kver}")

    async def no_probe(artifacts: BootArtifacts) -> bool:
        raise AssertionError("the cached result must be used")

    monkeypatch.setattr(_qemu, "_probe_kvm", no_probe)
    probe = tmp_path / _qemu.PROBE_FILE
    probe.write_text('{"key": "key|6.1.0-test", "kvm": false, "at": 0}')
    with pytest.raises(LabError, match="KVM is not usable") as info:
        await _qemu.choose_accel("kvm", art, tmp_path)
    assert "--accel auto" in (info.value.hint or "")
    assert info.value.exit_code == 5
    assert await _qemu.choose_accel("auto", art, tmp_path) == "tcg"
    assert await _qemu.choose_accel("tcg", art, tmp_path) == "tcg"
    probe.write_text('{"key": "key|6.1.0-test", "kvm": true, "at": 0}')
    assert await _qemu.choose_accel("kvm", art, tmp_path) == "kvm"
    monkeypatch.setattr(_qemu, "_kvm_usable", lambda: False)
    with pytest.raises(LabError, match="/dev/kvm"):
        await _qemu.choose_accel("kvm", art, tmp_path)
