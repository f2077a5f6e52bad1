"""The QMP driver facing VMs started the way real hosts start them (issue 11), without QEMU:
the agent socket named by ``query-chardev`` (commas, spaces), image names ``json:{...}``,
scsi-hd disks named by their device id, what an overlay inherits (``query-named-block-nodes``
and QEMU's command line), who QEMU runs as (``/proc``), the overlay's owner and mode, and the
doctor lines on the QEMU user and on AppArmor/SELinux.

The replies below are what QEMU 7.2 answered on this machine for the same command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tests.fakes.fake_qmp import Error, FakeQmpServer, Reply, Return

from freezeframe.errors import CutError
from freezeframe.hypervisor import _files
from freezeframe.hypervisor import qmp as qmp_module
from freezeframe.hypervisor._files import (
    HostProcess,
    SecurityModule,
    apply_image_access,
    overlay_mode,
    read_process,
    security_modules,
    unreachable_for,
)
from freezeframe.hypervisor.qmp import (
    CmdlineBlockOptions,
    OverlaySettings,
    QmpDriver,
    chardev_unix_path,
    overlay_settings,
    real_file,
)
from freezeframe.models import DiskInfo, VmConfig

NOBODY = 65534


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ffshp-", dir="/tmp"))
    path.chmod(0o755)  # mkdtemp makes it 0700: QEMU as nobody could not search it
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------- the agent's socket


@pytest.mark.parametrize(
    ("filename", "path"),
    [
        ("unix:/run/q.sock,server=on", "/run/q.sock"),
        ("disconnected:unix:/run/q.sock,server=on", "/run/q.sock"),
        # QEMU 7.2 writes the path as it is: a comma and a space stay
        ("disconnected:unix:/tmp/a,b c/q,ga x.sock,server=on", "/tmp/a,b c/q,ga x.sock"),
        ("unix:/tmp/a,b c/q,ga x.sock,server=on", "/tmp/a,b c/q,ga x.sock"),
        ("unix:/run/old.sock,server", "/run/old.sock"),  # QEMU before 6.0
        ("unix:/run/client.sock", "/run/client.sock"),  # not listening
        ("disconnected:tcp:127.0.0.1:4444,server=on", None),
        ("pty:/dev/pts/3", None),
        ("null", None),
    ],
)
def test_chardev_unix_path(filename: str, path: str | None) -> None:
    assert chardev_unix_path(filename) == path


def test_chardev_unix_path_unescapes_doubled_commas_only_when_that_file_exists(
    short_dir: Path,
) -> None:
    real = short_dir / "q,ga.sock"
    real.touch()
    escaped = str(short_dir / "q,,ga.sock")
    assert chardev_unix_path(f"unix:{escaped},server=on") == str(real)
    # both names exist: the one QEMU wrote is taken as it is
    Path(escaped).touch()
    assert chardev_unix_path(f"unix:{escaped},server=on") == escaped


# ------------------------------------------------------------------- json:{...} image names

#: What QEMU 7.2 calls a qcow2 image opened with an explicit backing node whose header names
#: the backing by another path (libvirt's -blockdev pairs).
JSON_TOP = (
    'json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": '
    '"/var/lib/vm/base.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", '
    '"filename": "/var/lib/vm/top.qcow2"}}'
)


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("/var/lib/vm/top.qcow2", "/var/lib/vm/top.qcow2"),
        (JSON_TOP, "/var/lib/vm/top.qcow2"),
        # a filter above the format node, a host block device below
        (
            'json:{"driver": "throttle", "file": {"driver": "raw", "file": '
            '{"driver": "host_device", "filename": "/dev/vg/lv"}}}',
            "/dev/vg/lv",
        ),
        (
            'json:{"driver": "qcow2", "file.driver": "file", "file.filename": "/a.qcow2"}',
            "/a.qcow2",
        ),
        ('json:{"driver": "raw", "file": "/b.raw"}', "/b.raw"),
        # no local file: unchanged (an overlay directory is needed)
        (
            'json:{"driver": "raw", "file": {"driver": "nbd", "server": {"type": "inet", '
            '"host": "h", "port": "10809"}}}',
            'json:{"driver": "raw", "file": {"driver": "nbd", "server": {"type": "inet", '
            '"host": "h", "port": "10809"}}}',
        ),
        ("json:{not json", "json:{not json"),
        ("rbd:pool/image", "rbd:pool/image"),
    ],
)
def test_real_file(name: str, file: str) -> None:
    assert real_file(name) == file


# ------------------------------------------------------------------- what overlays inherit

#: query-named-block-nodes (trimmed) for: a legacy -drive with cache=none, aio=native,
#: discard=unmap, detect-zeroes=unmap; libvirt pairs with cache.direct=on and an explicit
#: backing node; a plain raw -drive.
NAMED = [
    {"node-name": "#block192", "drv": "qcow2", "ro": False, "detect_zeroes": "unmap",
     "cache": {"no-flush": False, "direct": True, "writeback": True},
     "file": "/vm/leg.qcow2"},
    {"node-name": "#block015", "drv": "file", "ro": False, "detect_zeroes": "off",
     "cache": {"no-flush": False, "direct": True, "writeback": True}, "file": "/vm/leg.qcow2"},
    {"node-name": "libvirt-1-format", "drv": "qcow2", "ro": False, "detect_zeroes": "off",
     "cache": {"no-flush": False, "direct": True, "writeback": True},
     "file": JSON_TOP.replace("/var/lib/vm", "/vm")},
    {"node-name": "libvirt-1-storage", "drv": "file", "ro": False, "detect_zeroes": "off",
     "cache": {"no-flush": True, "direct": True, "writeback": True}, "file": "/vm/top.qcow2"},
    {"node-name": "libvirt-2-format", "drv": "qcow2", "ro": True, "detect_zeroes": "off",
     "cache": {"no-flush": False, "direct": False, "writeback": True}, "file": "/vm/base.qcow2"},
    {"node-name": "#block390", "drv": "raw", "ro": False, "detect_zeroes": "off",
     "cache": {"no-flush": False, "direct": False, "writeback": True}, "file": "/vm/s.raw"},
]  # fmt: skip

ARGV = [
    "/usr/bin/qemu-system-x86_64", "-name", "vm",
    "-drive", "file=/vm/leg.qcow2,if=none,id=drive0,format=qcow2,cache=none,aio=native,"
    "discard=unmap,detect-zeroes=unmap,file.locking=off",
    "-device", "virtio-blk-pci,drive=drive0,id=virtio-disk0",
    "-blockdev", json.dumps({"driver": "file", "filename": "/vm/top.qcow2",
                             "node-name": "libvirt-1-storage", "aio": "io_uring",
                             "discard": "unmap", "cache": {"direct": True, "no-flush": True}}),
    "-blockdev", json.dumps({"node-name": "libvirt-1-format", "driver": "qcow2",
                             "file": "libvirt-1-storage", "backing": "libvirt-2-format",
                             "discard": "ignore", "read-only": False}),
    "--drive=file=/vm/odd,,name.raw,format=raw,aio=threads,if=none",
    "-blockdev", "driver=qcow2,node-name=k0,file.driver=file,file.filename=/vm/k.qcow2,"
    "file.aio=native,file.locking=on,discard=on",
]  # fmt: skip


def test_cmdline_block_options_reads_drive_and_blockdev() -> None:
    opts = CmdlineBlockOptions.from_argv(ARGV)
    assert opts.by_file == {
        "/vm/leg.qcow2": {"aio": "native", "discard": "unmap", "locking": "off"},
        "/vm/top.qcow2": {"aio": "io_uring", "discard": "unmap"},
        "/vm/odd,name.raw": {"aio": "threads"},
        "/vm/k.qcow2": {"aio": "native", "locking": "on"},
    }
    assert opts.by_node == {
        "libvirt-1-storage": {"discard": "unmap"},
        "libvirt-1-format": {"discard": "ignore"},
        "k0": {"discard": "on"},
    }
    # an overlay (not on the command line) takes the options of the nearest file below it
    assert opts.for_chain(["/vm/leg.ff-1.qcow2", "/vm/leg.qcow2"])["aio"] == "native"
    assert opts.for_chain(["/nowhere"]) == {}
    assert CmdlineBlockOptions.from_argv(["qemu", "-blockdev", "{broken"]).by_file == {}


def _disk(node: str, file: str, backing: tuple[str, ...] = ()) -> DiskInfo:
    return DiskInfo("d", node, file, "qcow2", 1 << 20, backing)


def test_overlay_settings_of_a_legacy_drive_with_cache_none_and_aio_native() -> None:
    got = overlay_settings(
        _disk("#block192", "/vm/leg.qcow2"), NAMED, CmdlineBlockOptions.from_argv(ARGV)
    )
    assert got == OverlaySettings(
        direct=True, no_flush=False, discard="unmap", detect_zeroes="unmap", read_only=False,
        file_direct=True, file_no_flush=False, aio="native", locking="off", file_discard="unmap",
    )  # fmt: skip
    spec = got.blockdev("ff-s1-d", "/vm/leg.ff-s1.qcow2")
    assert spec == {
        "driver": "qcow2",
        "node-name": "ff-s1-d",
        "file": {
            "driver": "file",
            "filename": "/vm/leg.ff-s1.qcow2",
            "cache": {"direct": True, "no-flush": False},
            "aio": "native",
            "locking": "off",
            "discard": "unmap",
        },
        "backing": None,
        "read-only": False,
        "cache": {"direct": True, "no-flush": False},
        "discard": "unmap",
        "detect-zeroes": "unmap",
    }
    assert got.describe() == (
        "cache.direct=on cache.no-flush=off discard=unmap detect-zeroes=unmap aio=native "
        "locking=off"
    )


def test_overlay_settings_of_libvirt_pairs_take_the_protocol_node_beneath() -> None:
    disk = _disk("libvirt-1-format", "/vm/top.qcow2", ("/vm/base.qcow2",))
    got = overlay_settings(disk, NAMED, CmdlineBlockOptions.from_argv(ARGV))
    assert (got.direct, got.no_flush) == (True, False)  # the format node's
    assert (got.file_direct, got.file_no_flush) == (True, True)  # libvirt-1-storage's
    assert (got.aio, got.discard, got.file_discard) == ("io_uring", "ignore", "unmap")


def test_overlay_settings_without_a_command_line_keep_what_qmp_says() -> None:
    got = overlay_settings(_disk("#block390", "/vm/s.raw"), NAMED, CmdlineBlockOptions())
    assert got == OverlaySettings(
        direct=False, no_flush=False, detect_zeroes="off", file_direct=False, file_no_flush=False
    )
    # QEMU refuses detect-zeroes=unmap without discard=unmap: one implies the other
    leg = overlay_settings(_disk("#block192", "/vm/leg.qcow2"), NAMED, CmdlineBlockOptions())
    assert (leg.detect_zeroes, leg.discard, leg.aio) == ("unmap", "unmap", None)
    # an unknown node: QEMU's defaults, nothing set
    assert overlay_settings(_disk("x", "/vm/x"), NAMED, CmdlineBlockOptions()) == (
        OverlaySettings()
    )


def test_aio_native_is_not_passed_without_cache_direct() -> None:
    named = [
        {"node-name": "n", "drv": "qcow2", "cache": {"direct": False, "no-flush": False},
         "detect_zeroes": "off", "file": "/vm/n.qcow2"},
    ]  # fmt: skip
    opts = CmdlineBlockOptions(by_file={"/vm/n.qcow2": {"aio": "native"}})
    assert overlay_settings(_disk("n", "/vm/n.qcow2"), named, opts).aio is None


# ------------------------------------------------------------------- the QEMU process


def _fake_proc(root: Path, pid: int, status: str, argv: list[str], label: bytes | None) -> None:
    base = root / str(pid)
    (base / "attr").mkdir(parents=True)
    (base / "status").write_text(status)
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if label is not None:
        (base / "attr" / "current").write_bytes(label)


def test_read_process_takes_the_effective_ids_after_runas(tmp_path: Path) -> None:
    status = "Name:\tqemu-system-x86\nUid:\t0\t65534\t65534\t65534\nGid:\t0\t65534\t65534\t65534\n"
    status += "Groups:\t65534 44\n"
    _fake_proc(tmp_path, 42, status, ["qemu-system-x86_64", "-runas", "nobody"],
               b"libvirt-7f3e (enforce)\n")  # fmt: skip
    proc = read_process(42, proc=tmp_path)
    assert proc == HostProcess(
        42, NOBODY, NOBODY, (NOBODY, 44), ("qemu-system-x86_64", "-runas", "nobody"),
        "libvirt-7f3e (enforce)",
    )  # fmt: skip
    assert proc.who == "nobody:nogroup (uid 65534, gid 65534)"
    assert read_process(43, proc=tmp_path) is None  # gone
    _fake_proc(tmp_path, 44, "Name:\tx\n", [], None)
    assert read_process(44, proc=tmp_path) is None  # no ids


def test_read_process_of_this_process() -> None:
    me = read_process(os.getpid())
    assert me is not None
    assert (me.uid, me.gid) == (os.geteuid(), os.getegid())


def test_unreachable_for_names_the_directory_qemu_cannot_search(short_dir: Path) -> None:
    nobody = HostProcess(1, NOBODY, NOBODY)
    short_dir.chmod(0o755)
    (short_dir / "ok").mkdir(mode=0o755)
    (short_dir / "ok").chmod(0o755)
    assert unreachable_for(str(short_dir / "ok"), nobody) is None
    private = short_dir / "private"
    private.mkdir()
    private.chmod(0o700)
    (private / "inner").mkdir()
    why = unreachable_for(str(private / "inner"), nobody)
    assert why is not None
    assert str(private) in why
    assert "0700" in why
    assert "nobody" in why
    # the group may search: a member may, others not
    os.chown(private, 0, 44)
    private.chmod(0o710)
    assert unreachable_for(str(private), HostProcess(1, NOBODY, NOBODY, (44,))) is None
    assert unreachable_for(str(private), nobody) is not None
    assert unreachable_for(str(private), HostProcess(1, 0, 0)) is None  # root


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_apply_image_access_gives_the_overlay_to_qemus_user_with_the_image_mode(
    tmp_path: Path,
) -> None:
    image, overlay = tmp_path / "disk", tmp_path / "disk.ff-1.qcow2"
    image.write_bytes(b"x")
    image.chmod(0o640)
    overlay.write_bytes(b"y")
    apply_image_access(overlay, str(image), HostProcess(1, NOBODY, NOBODY))
    st = overlay.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    # no process known: the image's owner; a read-only image still gives a writable overlay
    os.chown(image, 1, 2)
    image.chmod(0o444)
    apply_image_access(overlay, str(image), None)
    st = overlay.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 2, 0o644)


def test_overlay_mode() -> None:
    assert overlay_mode("/no/such/image") == 0o600
    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0o4755)  # no setuid, no execute on an overlay
        assert overlay_mode(f.name) == 0o644


def test_security_modules_read_apparmor_and_selinux(tmp_path: Path) -> None:
    assert security_modules(None, sysfs=tmp_path) == []
    (tmp_path / "kernel/security/apparmor").mkdir(parents=True)
    qemu = HostProcess(1, NOBODY, NOBODY, label="libvirt-5c3a (enforce)")
    assert security_modules(qemu, sysfs=tmp_path) == [
        SecurityModule("apparmor", True, "libvirt-5c3a")
    ]
    unconfined = HostProcess(1, 0, 0, label="unconfined")
    [aa] = security_modules(unconfined, sysfs=tmp_path)
    assert not aa.confines
    (tmp_path / "fs/selinux").mkdir(parents=True)
    (tmp_path / "fs/selinux/enforce").write_text("1")
    svirt = HostProcess(1, 107, 107, label="system_u:system_r:svirt_t:s0:c12,c345")
    selinux = security_modules(svirt, sysfs=tmp_path)[1]
    assert selinux == SecurityModule("selinux", True, "system_u:system_r:svirt_t:s0:c12,c345")
    assert selinux.confines
    assert not SecurityModule("selinux", True, "unconfined_u:unconfined_r:unconfined_t:s0").confines


def test_security_check_warns_when_a_module_confines_qemu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qmp_module, "security_modules", lambda qemu: [])
    ok = qmp_module._security_check(None, ["/vm"])
    assert ok.ok is True
    assert "neither AppArmor nor SELinux" in ok.detail
    monkeypatch.setattr(
        qmp_module,
        "security_modules",
        lambda qemu: [SecurityModule("apparmor", True, "libvirt-5c3a")],
    )
    warn = qmp_module._security_check(None, ["/vm"])
    assert warn.ok is None
    assert "libvirt-5c3a" in warn.detail
    assert "/vm" in warn.fix
    monkeypatch.setattr(
        qmp_module, "security_modules", lambda qemu: [SecurityModule("apparmor", False, "p")]
    )
    assert qmp_module._security_check(None, ["/vm"]).ok is True  # complain mode blocks nothing


# ------------------------------------------------------------------- the driver on fake QMP


def _block(qdev: str, node: str, file: str, drv: str = "qcow2", device: str = "") -> object:
    return {
        "device": device,
        "qdev": qdev,
        "removable": False,
        "inserted": {
            "node-name": node,
            "drv": drv,
            "ro": False,
            "file": file,
            "image": {"filename": file, "virtual-size": 1 << 20, "format": drv},
        },
    }


def _replies(
    blocks: Sequence[object], named: Sequence[object] = ()
) -> dict[str, Reply | list[Reply]]:
    return {
        "query-block": Return(blocks),
        "query-pci": Return([]),
        "qom-get": Error("no such property", "GenericError"),
        "query-named-block-nodes": Return(list(named)),
        "blockdev-add": Return({}),
        "blockdev-del": Return({}),
    }


async def test_disks_name_a_scsi_hd_by_its_device_id_and_resolve_json_names(
    short_dir: Path,
) -> None:
    sock = str(short_dir / "q.sock")
    blocks = [
        # -device scsi-hd,drive=drive1,id=scsi0-0-0-1: QEMU gives the id, not a QOM path
        _block("scsi0-0-0-1", "#block390", "/vm/s.raw", "raw", device="drive1"),
        _block("/machine/peripheral/virtio-disk1/virtio-backend", "libvirt-1-format", JSON_TOP),
        # -drive if=none,id=drive0 on a device without an id: the drive's id
        _block(
            "/machine/peripheral-anon/device[1]/virtio-backend",
            "#block9",
            "/vm/l.qcow2",
            device="drive0",
        ),
    ]
    async with FakeQmpServer(sock, _replies(blocks)) as fake, QmpDriver(sock, timeout=2) as drv:
        disks = await drv.disks()
    assert [(d.device, d.file) for d in disks] == [
        ("scsi0-0-0-1", "/vm/s.raw"),
        ("virtio-disk1", "/var/lib/vm/top.qcow2"),
        ("drive0", "/vm/l.qcow2"),
    ]
    # the scsi-hd's properties were asked at its QOM path
    paths = {m["arguments"]["path"] for m in fake.received if m["execute"] == "qom-get"}  # type: ignore[index]
    assert "/machine/peripheral/scsi0-0-0-1" in paths


async def test_prepare_cut_adds_the_overlay_with_the_disks_settings_and_owner(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(short_dir / "q.sock")
    image = short_dir / "leg.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    image.chmod(0o640)
    named = [dict(n, file=str(image)) for n in NAMED[:2]]
    argv = [*ARGV[:4], ARGV[4].replace("/vm/leg.qcow2", str(image))]
    me = HostProcess(os.getpid(), os.geteuid(), os.getegid(), argv=tuple(argv))
    monkeypatch.setattr(qmp_module, "_find_qemu", lambda path: me)
    disk = DiskInfo("d0", "#block192", str(image), "qcow2", 1 << 20)
    async with (
        FakeQmpServer(sock, _replies([], named)) as fake,
        QmpDriver(sock, timeout=5) as drv,
    ):
        prepared = await drv.prepare_cut("s1", [disk])
    overlay = Path(prepared.disks[0].overlay_file)
    assert overlay == short_dir / "leg.ff-s1.qcow2"
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o640
    [add] = [m["arguments"] for m in fake.received if m["execute"] == "blockdev-add"]
    assert add == {
        "driver": "qcow2",
        "node-name": "ff-s1-d0",
        "file": {"driver": "file", "filename": str(overlay),
                 "cache": {"direct": True, "no-flush": False}, "aio": "native",
                 "locking": "off", "discard": "unmap"},
        "backing": None,
        "read-only": False,
        "cache": {"direct": True, "no-flush": False},
        "discard": "unmap",
        "detect-zeroes": "unmap",
    }  # fmt: skip
    assert drv.last_settings["d0"].aio == "native"


async def test_prepare_cut_refuses_a_directory_qemus_user_cannot_search(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(short_dir / "q.sock")
    private = short_dir / "private"
    private.mkdir(mode=0o700)
    image = private / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    monkeypatch.setattr(qmp_module, "_find_qemu", lambda path: HostProcess(1, NOBODY, NOBODY))
    disk = DiskInfo("d0", "n0", str(image), "qcow2", 1 << 20)
    async with (
        FakeQmpServer(sock, _replies([])) as fake,
        QmpDriver(sock, timeout=5) as drv,
    ):
        with pytest.raises(CutError) as err:
            await drv.prepare_cut("s1", [disk])
    assert err.value.code == qmp_module.OVERLAY_DIR_UNREACHABLE
    assert "nobody" in err.value.message
    assert str(private) in err.value.message
    assert "blockdev-add" not in fake.commands()
    assert sorted(p.name for p in private.iterdir()) == ["d.qcow2"]  # nothing left behind


async def test_checks_say_who_qemu_runs_as_and_fail_an_unreachable_overlay_dir(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(short_dir / "q.sock")
    private = short_dir / "private"
    private.mkdir(mode=0o700)
    blocks = [_block("/machine/peripheral/d0/virtio-backend", "n0", str(private / "d.qcow2"))]
    monkeypatch.setattr(qmp_module, "_find_qemu", lambda path: HostProcess(7, NOBODY, NOBODY))
    monkeypatch.setattr(qmp_module, "security_modules", lambda qemu: [])
    async with FakeQmpServer(sock, _replies(blocks)):
        async with QmpDriver(sock, timeout=2) as drv:
            checks = {c.name: c for c in await drv.checks()}
        # the VM's own overlay directory is the one checked
        cfg = VmConfig("v", qmp_path=sock, overlay_dir=str(short_dir))
        async with QmpDriver.from_config(cfg) as drv:
            own = {c.name: c for c in await drv.checks()}
    assert checks["qemu process"].ok is True
    assert "pid 7 runs as nobody:nogroup" in checks["qemu process"].detail
    bad = checks[f"overlay dir {private}"]
    assert bad.ok is False
    assert "may not be searched" in bad.detail
    assert "give the VM an overlay directory" in bad.fix
    assert checks["security labels"].ok is True
    assert own[f"overlay dir {short_dir}"].ok is (
        unreachable_for(str(short_dir), HostProcess(7, NOBODY, NOBODY)) is None
    )


def test_cut_problem_and_prepared_for_use_the_vms_overlay_dir(short_dir: Path) -> None:
    drv = QmpDriver.from_config(VmConfig("v", qmp_path="/q", overlay_dir=str(short_dir)))
    net = DiskInfo("d0", "n0", 'json:{"driver": "rbd", "pool": "p", "image": "i"}', "raw", 1)
    assert drv.cut_problem(net) is None  # the VM's overlay directory takes it
    assert QmpDriver("/q").cut_problem(net) is not None
    [p] = drv.prepared_for("s1", [net]).disks
    assert p.overlay_file == str(short_dir / "d0.ff-s1.qcow2")
    assert _files.overlay_path(net, "s1", str(short_dir)) == short_dir / "d0.ff-s1.qcow2"
