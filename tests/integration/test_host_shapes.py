"""QEMU VMs started by hand the way real hosts start them (issue 11), not through the lab.

Each test boots the lab's guest (its kernel and initramfs: busybox, qemu-ga, a writer on every
data disk found by serial ``ffdiskN``) under TCG with its own command line, registers it with
``vm add --qmp`` like an operator would, takes a ``--quiesce required --verify`` snapshot with
the CLI and checks what the driver did to the VM through a second QMP monitor (``watch``): the
overlay's node settings, the overlay file's owner and mode.

Shapes: legacy ``-drive`` (a drive without a device id, ``detect-zeroes=unmap``); libvirt-style
``-blockdev`` JSON pairs (``libvirt-N-storage``/``libvirt-N-format``) with an explicit backing
node, whose image QEMU names ``json:{...}``; Nova's instance directory (``disk``, ``disk.eph0``,
``disk.swap`` over raw images in ``_base``); ``-runas nobody``; ``cache.direct=on,aio=native``;
a comma and a space in the socket and image paths; an unmounted scsi-hd disk. A paused VM is
reported as paused, not as a missing agent.

One ext4 image is made per module and copied for each VM; every QEMU is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from freezeframe.agent import GuestAgent
from freezeframe.lab._build import BootArtifacts, ensure_artifacts
from freezeframe.lab._disks import make_disk
from freezeframe.models import GUEST_AGENT_PORT
from tests.integration.libvirt_helpers import traversable_tmpdir

pytestmark = pytest.mark.integration
FF = [sys.executable, "-m", "freezeframe.cli.main"]
NOBODY = 65534
#: Seconds a TCG guest gets to become ready (its agent answering).
BOOT_TIMEOUT = 120.0


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FF, *args], capture_output=True, text=True, timeout=300, check=False)


def ff_json(*args: str) -> tuple[int, dict[str, object]]:
    res = ff("--json", *args)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"freezeframe {' '.join(args)}: no JSON (exit {res.returncode}):\n"
                    f"{res.stdout}\n{res.stderr}")  # fmt: skip
    return res.returncode, doc


def esc(value: str | Path) -> str:
    """A value in QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Guest:
    """What every VM of the module boots: the lab's kernel and initramfs, and one ext4 image
    (qcow2, no backing) to copy."""

    boot: BootArtifacts
    ext4: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    art = asyncio.run(ensure_artifacts())
    ext4 = tmp_path_factory.mktemp("shapes") / "ext4.qcow2"
    asyncio.run(make_disk(ext4, "ext4", 128 << 20, "data"))
    return Guest(art, ext4)


@pytest.fixture
def vmdir() -> Iterator[Path]:
    """A directory QEMU running as nobody can traverse (0755, under /var/tmp)."""
    path = traversable_tmpdir("ffshape-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class HandVm:
    """A QEMU started by hand: ``qmp`` is freezeframe's socket, ``watch`` the test's."""

    name: str
    proc: subprocess.Popen[bytes]
    qmp: Path
    watch: Path
    qga: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def query(self, command: str, args: dict[str, object] | None = None) -> object:
        async def go() -> object:
            client = QMPClient("watch")
            await asyncio.wait_for(client.connect(str(self.watch)), 10)
            try:
                return await asyncio.wait_for(client.execute(command, args), 10)
            finally:
                await client.disconnect()

        return asyncio.run(go())

    def node(self, name: str) -> dict[str, object]:
        nodes = self.query("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        found = [n for n in nodes if n["node-name"] == name]
        assert found, f"no node {name}: {[n['node-name'] for n in nodes]}"
        node: dict[str, object] = found[0]
        return node

    def top_nodes(self) -> dict[str, str]:
        """qdev (device id, else drive id) -> the node name on top of it now."""
        out: dict[str, str] = {}
        blocks = self.query("query-block")
        assert isinstance(blocks, list)
        for b in blocks:
            if "inserted" in b:
                key = b["qdev"].split("/")[3] if b["qdev"].startswith("/") else b["qdev"]
                out[key] = b["inserted"]["node-name"]
        return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop our QEMU by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def _agent_ready(qga: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        assert proc.poll() is None, f"QEMU exited with {proc.returncode}"
        agent = GuestAgent(str(qga), timeout=2)
        try:
            await agent.connect(timeout=2)
            await agent.ping(timeout=2)
            fs = await agent.get_fsinfo()
            if fs:  # the data disks are mounted
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        finally:
            await agent.close()
        await asyncio.sleep(0.5)


@contextlib.contextmanager
def hand_vm(
    guest: Guest,
    directory: Path,
    name: str,
    disk_args: Sequence[str],
    *,
    fstypes: Sequence[str] = ("ext4",),
    qmp: Path | None = None,
    qga: Path | None = None,
    extra: Sequence[str] = (),
) -> Iterator[HandVm]:
    """Boot the guest with ``disk_args`` (``-drive``/``-blockdev``/``-device`` options) and
    the data disks ``fstypes`` (serials ``ffdisk0``...), wait until its agent answers and its
    disks are mounted; stop QEMU by PID afterwards."""
    qmp = qmp or directory / "qmp.sock"
    qga = qga or directory / "qga.sock"
    watch = directory / "watch.sock"
    argv = [
        "qemu-system-x86_64", "-name", name, "-nodefaults", "-no-user-config",
        "-display", "none", "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "256",
        "-smp", "1", "-no-reboot", "-nic", "none",
        "-kernel", str(guest.boot.kernel), "-initrd", str(guest.boot.initrd),
        "-append", "console=ttyS0 quiet panic=-1 "
        f"ff.disks={','.join(fstypes)} ff.agent=1 ff.workms=50",
        "-chardev", f"file,id=console,path={esc(directory / 'console.log')}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={esc(qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=watch,path={esc(watch)},server=on,wait=off",
        "-mon", "chardev=watch,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={esc(qga)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}",
        *disk_args,
        *extra,
    ]  # fmt: skip
    with open(directory / "qemu.err", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        try:
            asyncio.run(_agent_ready(qga, proc, time.monotonic() + BOOT_TIMEOUT))
        except BaseException:
            print((directory / "qemu.err").read_text(errors="replace"))
            with contextlib.suppress(OSError):
                print((directory / "console.log").read_text(errors="replace")[-3000:])
            raise
        yield HandVm(name, proc, qmp, watch, qga)
    finally:
        _stop(proc)
        ff("vm", "remove", name)


def snapshot(vm: HandVm, *extra: str, raw: Sequence[str] = ()) -> dict[str, object]:
    """``snapshot create --quiesce required --verify``: level filesystem; every disk holding
    a filesystem verified-consistent. The disks ``raw`` (no filesystem in them) are checked
    as what they are, raw data: ``unchecked``, never worse; then the whole verdict is
    ``unchecked`` and the exit code says "weaker than a verified snapshot" (20).

    Every new top node keeps the cache and detect-zeroes settings of the node it replaced,
    and every overlay is owned by the user and group QEMU runs as, writable by it."""
    before = {dev: settings(vm.node(node)) for dev, node in vm.top_nodes().items()}
    code, rec = ff_json("snapshot", "create", vm.name, "--quiesce", "required", "--verify", *extra)
    assert rec.get("status") == "done", rec
    assert rec["level"] == "filesystem", rec
    verification = rec["verification"]
    assert isinstance(verification, dict)
    checks = {c["device"]: c["verdict"] for c in verification["checks"]}
    for device in disks_of(rec):
        expected = "unchecked" if device in raw else "verified-consistent"
        assert checks[device] == expected, verification
    whole = "unchecked" if raw else "verified-consistent"
    assert verification["verdict"] == whole, verification
    assert code == (0 if whole == "verified-consistent" else 20), rec
    after = {dev: settings(vm.node(node)) for dev, node in vm.top_nodes().items()}
    assert after == before
    ids = [line.split()[2] for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines()
           if line.startswith(("Uid:", "Gid:"))]  # fmt: skip
    for d in disks_of(rec).values():
        uid, gid, mode = owner_mode(d["overlay"])
        assert [str(uid), str(gid)] == ids, d
        assert mode & 0o600 == 0o600, d
    return rec


def settings(node: dict[str, object]) -> tuple[object, object]:
    """What QMP reports of a node's settings: cache (direct, no-flush) and detect-zeroes."""
    return node["cache"], node["detect_zeroes"]


def disks_of(rec: dict[str, object]) -> dict[str, dict[str, str]]:
    disks = rec["disks"]
    assert isinstance(disks, list)
    return {d["device"]: d for d in disks}


def owner_mode(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def doctor_checks(vm: str) -> tuple[dict[str, object], dict[str, dict[str, str]]]:
    """doctor's JSON document and its checks by name; asserts its verdict agrees with its
    checks: a FAIL never goes with a filesystem-consistent prediction, and a prediction of
    no snapshot names why in the verdict."""
    _, doc = ff_json("doctor", vm)
    checks = doc["checks"]
    assert isinstance(checks, list)
    fails = [c["name"] for c in checks if c["status"] == "fail"]
    if doc["predicted_level"] == "filesystem":
        assert not fails, doc
    if doc["predicted_level"] == "none":
        assert fails, doc
        assert (
            any(name in str(doc["verdict"]) for name in fails)
            or "fail" in str(doc["verdict"]).lower()
        ), doc
    return doc, {c["name"]: c for c in checks}


def doctor_predicts_filesystem(vm: str) -> None:
    """doctor passes every check that matters and predicts what the snapshot then reaches."""
    doc, _ = doctor_checks(vm)
    assert doc["predicted_level"] == "filesystem", doc


# ----------------------------------------------------------------------------- the shapes


def test_legacy_drive_and_a_paused_vm(guest: Guest, vmdir: Path) -> None:
    """``-drive if=none`` + a device without an id: the disk is named by its drive id; the
    overlay keeps detect-zeroes=unmap (and so discard=unmap). Paused (QMP ``stop``), the VM is
    reported as not running, never as a guest without qemu-guest-agent."""
    image = vmdir / "vm1.qcow2"
    shutil.copy(guest.ext4, image)
    disk = [
        "-drive", f"file={esc(image)},if=none,id=drive0,format=qcow2,"
        "discard=unmap,detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=drive0,serial=ffdisk0",
    ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-legacy", disk) as vm:
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        rec = snapshot(vm)
        assert rec["level"] == "filesystem"
        d = disks_of(rec)["drive0"]
        assert d["image"] == str(image)
        assert d["overlay"] == str(vmdir / f"vm1.ff-{rec['id']}.qcow2")
        top = vm.top_nodes()
        node = vm.node(top[next(iter(top))])
        assert node["file"] == d["overlay"]
        assert node["detect_zeroes"] == "unmap"

        vm.query("stop")
        try:
            doc, checks = doctor_checks(vm.name)
            assert checks["agent"]["status"] == "fail", checks
            assert "status paused" in checks["agent"]["detail"]
            text = json.dumps(doc)
            assert "install qemu-guest-agent" not in text, text
            assert "paused" in text, text
            code, failed = ff_json("snapshot", "create", vm.name, "--quiesce", "required")
            assert code != 0
            assert failed["code"] == "vm-not-running", failed
            assert "paused" in json.dumps(failed), failed
            assert "install qemu-guest-agent" not in json.dumps(failed), failed
        finally:
            vm.query("cont")


def test_libvirt_blockdev_pairs_with_an_explicit_backing_node(guest: Guest, vmdir: Path) -> None:
    """libvirt's JSON ``-blockdev`` pairs, the top image's backing given as a node and its
    header naming it by a non-canonical path: QEMU calls the image ``json:{...}``; freezeframe
    resolves the real file, names the overlay after it and keeps ``cache.direct``."""
    base_dir = vmdir / "base"
    base_dir.mkdir()
    base = base_dir / "base.qcow2"
    shutil.copy(guest.ext4, base)
    top = vmdir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "./base/../base/base.qcow2", "-F", "qcow2",
             str(top))  # fmt: skip
    cache = {"direct": True, "no-flush": False}
    nodes = [
        {"driver": "file", "filename": str(base), "node-name": "libvirt-2-storage",
         "auto-read-only": True, "discard": "unmap", "cache": cache},
        {"node-name": "libvirt-2-format", "read-only": True, "discard": "unmap", "cache": cache,
         "driver": "qcow2", "file": "libvirt-2-storage", "backing": None},
        {"driver": "file", "filename": str(top), "node-name": "libvirt-1-storage",
         "auto-read-only": True, "discard": "unmap", "cache": cache},
        {"node-name": "libvirt-1-format", "read-only": False, "discard": "unmap",
         "cache": cache, "driver": "qcow2", "file": "libvirt-1-storage",
         "backing": "libvirt-2-format"},
    ]  # fmt: skip
    disk = [a for n in nodes for a in ("-blockdev", json.dumps(n))]
    disk += ["-device", "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0,serial=ffdisk0"]
    with hand_vm(guest, vmdir, "shape-libvirt", disk) as vm:
        named = vm.node("libvirt-1-format")["file"]
        assert isinstance(named, str)
        assert named.startswith("json:")
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        _, checks = doctor_checks(vm.name)
        assert checks["disk virtio-disk0"]["status"] == "pass", checks
        rec = snapshot(vm)
        assert rec["level"] == "filesystem"
        d = disks_of(rec)["virtio-disk0"]
        assert d["image"] == str(top)
        assert d["overlay"] == str(vmdir / f"top.ff-{rec['id']}.qcow2")
        node = vm.node(vm.top_nodes()["virtio-disk0"])
        assert node["cache"]["direct"] is True  # type: ignore[index]
        # A second snapshot continues the chain from the first one's overlay.
        rec2 = snapshot(vm)
        assert rec2["parent_id"] == rec["id"]
        assert disks_of(rec2)["virtio-disk0"]["image"] == d["overlay"]


def test_nova_instance_directory(guest: Guest, vmdir: Path) -> None:
    """Nova's layout: ``disk``, ``disk.eph0``, ``disk.swap`` in the instance directory, qcow2
    over raw images in ``_base``; the swap disk holds no filesystem the guest mounts. Each
    disk gets its own overlay (named after its full file name)."""
    inst = vmdir / "instances" / "2b1e0c8e-6d1f-4a55-9a57-5f0c3c7b9d11"
    base = vmdir / "instances" / "_base"
    inst.mkdir(parents=True)
    base.mkdir()
    qemu_img("convert", "-O", "raw", str(guest.ext4), str(base / "6f1d2e8a9b0c"))
    qemu_img("convert", "-O", "raw", str(guest.ext4), str(base / "ephemeral_1_0706d66"))
    swap = base / "swap_64"
    with open(swap, "wb") as f:
        os.truncate(f.fileno(), 64 << 20)
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    for name, backing in (
        ("disk", "6f1d2e8a9b0c"),
        ("disk.eph0", "ephemeral_1_0706d66"),
        ("disk.swap", "swap_64"),
    ):
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base / backing), "-F", "raw",
                 str(inst / name))  # fmt: skip
    disk: list[str] = []
    for i, (name, serial) in enumerate((("disk", "ffdisk0"), ("disk.eph0", "ffdisk1"),
                                        ("disk.swap", "swap0"))):  # fmt: skip
        storage, fmt = f"libvirt-{i + 1}-storage", f"libvirt-{i + 1}-format"
        disk += [
            "-blockdev", f"driver=file,filename={esc(inst / name)},node-name={storage}",
            "-blockdev", f"driver=qcow2,file={storage},node-name={fmt}",
            "-device", f"virtio-blk-pci,drive={fmt},id=virtio-disk{i},serial={serial}",
        ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-nova", disk, fstypes=("ext4", "ext4")) as vm:
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        doctor_predicts_filesystem(vm.name)
        rec = snapshot(vm, raw=("virtio-disk2",))
        disks = disks_of(rec)
        # Every mounted filesystem froze; the swap disk is cut as raw data and says why.
        assert disks["virtio-disk2"]["quiesce_note"] == "no-mounted-filesystem"
        assert disks["virtio-disk0"]["quiesce_note"] is None
        overlays = {dev: Path(d["overlay"]).name for dev, d in disks.items()}
        sid = rec["id"]
        assert overlays == {
            "virtio-disk0": f"disk.ff-{sid}.qcow2",
            "virtio-disk1": f"disk.eph0.ff-{sid}.qcow2",
            "virtio-disk2": f"disk.swap.ff-{sid}.qcow2",
        }
        assert all(Path(d["overlay"]).parent == inst for d in disks.values())


def test_qemu_running_as_nobody(guest: Guest, vmdir: Path) -> None:
    """``-runas nobody``: QEMU opened its images as root at start, but opens overlays as
    nobody: they are created nobody:nogroup with the image's mode (0640 here), twice in a row;
    doctor says who QEMU runs as, and fails an overlay directory nobody cannot search."""
    image = vmdir / "vm.qcow2"
    shutil.copy(guest.ext4, image)
    image.chmod(0o640)  # root:root 0640: only root (QEMU before -runas) could open it
    disk = [
        "-blockdev", f"driver=file,filename={esc(image)},node-name=f0",
        "-blockdev", "driver=qcow2,file=f0,node-name=d0",
        "-device", "virtio-blk-pci,drive=d0,id=disk0,serial=ffdisk0",
    ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-runas", disk, extra=("-runas", "nobody")) as vm:
        status = Path(f"/proc/{vm.pid}/status").read_text()
        assert f"Uid:\t{NOBODY}" in status
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        _, checks = doctor_checks(vm.name)
        assert checks["qemu process"]["status"] == "pass"
        assert "nobody" in checks["qemu process"]["detail"]
        assert checks[f"overlay dir {vmdir}"]["status"] == "pass"
        first = snapshot(vm)
        overlay = disks_of(first)["disk0"]["overlay"]
        assert owner_mode(overlay) == (NOBODY, NOBODY, 0o640), overlay
        second = snapshot(vm)  # over the first overlay, which QEMU (nobody) opened itself
        assert disks_of(second)["disk0"]["image"] == overlay
        overlay = disks_of(second)["disk0"]["overlay"]
        assert owner_mode(overlay) == (NOBODY, NOBODY, 0o640), overlay
        assert vm.node(vm.top_nodes()["disk0"])["file"] == disks_of(second)["disk0"]["overlay"]

        # An overlay directory nobody may not search: doctor FAILs it, create refuses clearly.
        private = vmdir / "private"
        private.mkdir(mode=0o700)
        _, checks = doctor_checks(vm.name)  # the VM's own dirs still pass
        code, failed = ff_json("snapshot", "create", vm.name, "--overlay-dir", str(private))
        assert code != 0
        assert failed["code"] == "overlay-dir-unreachable", failed
        text = json.dumps(failed)
        assert "nobody" in text, text
        assert str(private) in text, text
        assert not list(private.iterdir())  # nothing left behind
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga),
                  "--overlay-dir", str(private), "--replace").returncode == 0  # fmt: skip
        _, checks = doctor_checks(vm.name)
        assert checks[f"overlay dir {private}"]["status"] == "fail", checks


def test_cache_direct_and_aio_native(guest: Guest, vmdir: Path) -> None:
    """``cache.direct=on`` with ``aio=native`` (dotted ``-blockdev`` options): the overlay's
    format and file nodes keep cache.direct=true after the snapshot, and QEMU opened the
    overlay file with O_DIRECT."""
    image = vmdir / "vm.qcow2"
    shutil.copy(guest.ext4, image)
    disk = [
        "-blockdev", f"driver=file,filename={esc(image)},node-name=f0,aio=native,"
        "cache.direct=on,cache.no-flush=off,locking=on",
        "-blockdev", "driver=qcow2,file=f0,node-name=d0,cache.direct=on,discard=unmap",
        "-device", "virtio-blk-pci,drive=d0,id=disk0,serial=ffdisk0",
    ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-direct", disk) as vm:
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        doctor_predicts_filesystem(vm.name)
        rec = snapshot(vm)
        assert rec["level"] == "filesystem"
        overlay = disks_of(rec)["disk0"]["overlay"]
        top = vm.node(vm.top_nodes()["disk0"])
        assert top["file"] == overlay
        assert top["cache"] == {"direct": True, "no-flush": False, "writeback": True}
        nodes = vm.query("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        files = [n for n in nodes if n["drv"] == "file" and n["file"] == overlay]
        assert files
        assert files[0]["cache"]["direct"] is True
        flags = [
            int(line.split()[1], 8)
            for fd in os.listdir(f"/proc/{vm.pid}/fd")
            if os.readlink(f"/proc/{vm.pid}/fd/{fd}") == overlay
            for line in Path(f"/proc/{vm.pid}/fdinfo/{fd}").read_text().splitlines()
            if line.startswith("flags:")
        ]
        assert flags, "QEMU holds no descriptor of the overlay"
        assert all(f & os.O_DIRECT for f in flags), flags


def test_comma_and_space_in_socket_and_image_paths(guest: Guest, vmdir: Path) -> None:
    """A comma and a space in the QMP socket, the agent socket and the image path. Registered
    without ``--qga``: the agent socket comes from QEMU's chardev (``query-chardev`` writes the
    path as it is)."""
    odd = vmdir / "vm 1,a"
    odd.mkdir()
    odd.chmod(0o755)
    image = odd / "data disk,0.qcow2"
    shutil.copy(guest.ext4, image)
    qmp, qga = odd / "qmp,0 x.sock", odd / "q,ga 0.sock"
    disk = [
        "-drive", f"file={esc(image)},if=none,id=drive0,format=qcow2",
        "-device", "virtio-blk-pci,drive=drive0,id=disk0,serial=ffdisk0",
    ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-comma", disk, qmp=qmp, qga=qga) as vm:
        assert ff("vm", "add", vm.name, "--qmp", str(qmp)).returncode == 0
        doc, checks = doctor_checks(vm.name)
        assert checks["agent channel"]["status"] == "pass", checks
        assert str(qga) in checks["agent channel"]["detail"]
        assert doc["predicted_level"] == "filesystem", doc
        rec = snapshot(vm)
        assert rec["level"] == "filesystem"
        d = disks_of(rec)["disk0"]
        assert d["image"] == str(image)
        assert d["overlay"] == str(odd / f"data disk,0.ff-{rec['id']}.qcow2")


def test_unmounted_scsi_hd_disk(guest: Guest, vmdir: Path) -> None:
    """A scsi-hd disk (raw, no filesystem the guest mounts) next to a mounted virtio disk: it
    is named by its device id, not its drive id, and snapshotted with the others."""
    image = vmdir / "vm.qcow2"
    shutil.copy(guest.ext4, image)
    data = vmdir / "data.raw"
    with open(data, "wb") as f:
        os.truncate(f.fileno(), 32 << 20)
    disk = [
        "-drive", f"file={esc(image)},if=none,id=drive-virtio-disk0,format=qcow2",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk0,id=virtio-disk0,serial=ffdisk0",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", f"file={esc(data)},if=none,id=drive1,format=raw",
        "-device", "scsi-hd,drive=drive1,id=scsi0-0-0-1,bus=scsi0.0",
    ]  # fmt: skip
    with hand_vm(guest, vmdir, "shape-scsi", disk) as vm:
        assert ff("vm", "add", vm.name, "--qmp", str(vm.qmp), "--qga", str(vm.qga)).returncode == 0
        doctor_predicts_filesystem(vm.name)
        rec = snapshot(vm, raw=("scsi0-0-0-1",))
        disks = disks_of(rec)
        assert set(disks) == {"virtio-disk0", "scsi0-0-0-1"}
        assert disks["scsi0-0-0-1"]["overlay"] == str(vmdir / f"data.ff-{rec['id']}.qcow2")
        assert disks["scsi0-0-0-1"]["quiesce_note"] == "no-mounted-filesystem"
        assert "scsi0-0-0-1" in str(rec["level_reason"])
