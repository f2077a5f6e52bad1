"""Contract tests of the QMP driver against real QEMU processes (no guest kernel: the VM sits in
its BIOS, enough for block operations) and, for the error paths, a fake QMP server.

Each VM gets a second QMP monitor that the test watches QEMU through, independently of the
driver's own connection (a QMP socket serves one client at a time).
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from freezeframe.errors import (
    CutError,
    HypervisorError,
    HypervisorUnavailableError,
    UsageError,
)
from freezeframe.hypervisor import load_driver
from freezeframe.hypervisor.base import PreparedCut
from freezeframe.hypervisor.qmp import QmpCommandError, QmpDriver, overlay_node_name
from freezeframe.models import DiskInfo, VmConfig
from tests.fakes.bios_vm import Vm, bios_vm, chain, pci, qemu_img
from tests.fakes.fake_qmp import Error, FakeQmpServer, Hang, Hangup, Reply, Return


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


@pytest.fixture
async def vm() -> AsyncIterator[Vm]:
    async with bios_vm(agent=True) as v:
        yield v


@pytest.fixture
async def driver(vm: Vm) -> AsyncIterator[QmpDriver]:
    async with QmpDriver(vm.qmp, vm_name="t", timeout=5) as drv:
        yield drv


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fffake-", dir="/tmp"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ real QEMU

integration = pytest.mark.integration


@integration
async def test_disks_lists_writable_disks_with_pci_and_serial() -> None:
    async with bios_vm(agent=False, extras=True) as vm, QmpDriver(vm.qmp) as drv:
        disks = await drv.disks()
        channel = await drv.agent_channel()
    d = vm.dir
    mib = 1 << 20
    assert disks == [
        DiskInfo("disk0", "disk0", f"{d}/d0.qcow2", "qcow2", 16 * mib, (), pci(5), "ffdisk0"),
        DiskInfo("disk1", "disk1", f"{d}/d1.qcow2", "qcow2", 32 * mib, (), pci(6), None),
        # a SCSI disk: the guest agent reports its controller's PCI address
        DiskInfo("disk3", "disk3", f"{d}/d3.qcow2", "qcow2", 8 * mib, (), pci(8), "ffdisk3"),
    ]
    # the agent port exists but its chardev is no unix socket: the chardev id
    assert channel == "qganull"


@integration
async def test_agent_channel_is_the_unix_socket(driver: QmpDriver, vm: Vm) -> None:
    assert await driver.agent_channel() == f"{vm.dir}/qga.sock"


@integration
async def test_agent_channel_none_without_port() -> None:
    async with bios_vm(agent=False) as vm, QmpDriver(vm.qmp) as drv:
        assert await drv.agent_channel() is None


@integration
async def test_prepare_and_cut_switch_both_disks(driver: QmpDriver, vm: Vm) -> None:
    disks = await driver.disks()
    prepared = await driver.prepare_cut("s1", disks)
    timings = driver.last_timings
    d = vm.dir
    assert [(p.overlay_file, p.overlay_node, p.image_at_cut) for p in prepared.disks] == [
        (f"{d}/d0.ff-s1.qcow2", "ff-s1-disk0", f"{d}/d0.qcow2"),
        (f"{d}/d1.ff-s1.qcow2", "ff-s1-disk1", f"{d}/d1.qcow2"),
    ]
    # prepared, but nothing switched yet
    assert {"ff-s1-disk0", "ff-s1-disk1"} <= await vm.node_names()
    assert {k: v["node-name"] for k, v in (await vm.tops()).items()} == {
        "disk0": "disk0",
        "disk1": "disk1",
    }

    await driver.cut(prepared)
    await driver.verify_cut(prepared)

    tops = await vm.tops()
    for p in prepared.disks:
        top = tops[p.disk.device]
        assert top["node-name"] == p.overlay_node
        assert top["image"]["filename"] == p.overlay_file  # type: ignore[index]
        assert top["image"]["backing-image"]["filename"] == p.image_at_cut  # type: ignore[index]
        assert chain(p.overlay_file) == [p.overlay_file, p.image_at_cut]
    after = await driver.disks()
    assert [(x.node, x.file, x.backing) for x in after] == [
        ("ff-s1-disk0", f"{d}/d0.ff-s1.qcow2", (f"{d}/d0.qcow2",)),
        ("ff-s1-disk1", f"{d}/d1.ff-s1.qcow2", (f"{d}/d1.qcow2",)),
    ]
    print(
        "\nQMP timings (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in driver.last_timings.items())
    )
    assert set(timings) == {f"prepare.disk{i}.{s}_ms" for i in (0, 1) for s in ("create", "add")}
    assert "cut.transaction_ms" in driver.last_timings


@integration
async def test_failing_transaction_switches_nothing(driver: QmpDriver, vm: Vm) -> None:
    prepared = await driver.prepare_cut("s1", await driver.disks())
    good, bad = prepared.disks
    broken = PreparedCut("s1", (good, dataclasses.replace(bad, overlay_node="ff-missing")))

    with pytest.raises(CutError, match="no disk switched") as info:
        await driver.cut(broken)
    assert isinstance(info.value.__cause__, QmpCommandError)

    tops = await vm.tops()
    assert tops["disk0"]["node-name"] == "disk0"  # the valid first action was rolled back too
    assert tops["disk1"]["node-name"] == "disk1"
    with pytest.raises(CutError, match="not the active node"):
        await driver.verify_cut(prepared)

    await driver.abort(prepared)
    assert not {"ff-s1-disk0", "ff-s1-disk1"} & await vm.node_names()
    assert not any(_exists(p.overlay_file) for p in prepared.disks)


@integration
async def test_abort_removes_nodes_and_files(driver: QmpDriver, vm: Vm) -> None:
    disks = await driver.disks()
    prepared = await driver.prepare_cut("s1", disks)
    assert all(_exists(p.overlay_file) for p in prepared.disks)

    await driver.abort(prepared)
    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert not any(_exists(p.overlay_file) for p in prepared.disks)
    assert await driver.disks() == disks
    await driver.abort(prepared)  # twice: nothing left to do, still no error
    # the same id can be prepared again
    again = await driver.prepare_cut("s1", disks)
    await driver.abort(again)


@integration
async def test_abort_keeps_an_overlay_in_use(driver: QmpDriver, vm: Vm) -> None:
    prepared = await driver.prepare_cut("s1", await driver.disks())
    await driver.cut(prepared)

    await driver.abort(prepared)  # e.g. after a cut whose reply was lost

    assert all(_exists(p.overlay_file) for p in prepared.disks)
    assert {"ff-s1-disk0", "ff-s1-disk1"} <= await vm.node_names()
    await driver.verify_cut(prepared)


@integration
async def test_two_cuts_make_achain(driver: QmpDriver, vm: Vm) -> None:
    first = await driver.prepare_cut("s1", await driver.disks())
    await driver.cut(first)
    second = await driver.prepare_cut("s2", await driver.disks())
    await driver.cut(second)
    await driver.verify_cut(second)

    d = vm.dir
    assert [p.overlay_file for p in second.disks] == [f"{d}/d0.ff-s2.qcow2", f"{d}/d1.ff-s2.qcow2"]
    assert [p.image_at_cut for p in second.disks] == [f"{d}/d0.ff-s1.qcow2", f"{d}/d1.ff-s1.qcow2"]
    disks = await driver.disks()
    assert disks[0].backing == (f"{d}/d0.ff-s1.qcow2", f"{d}/d0.qcow2")
    assert chain(disks[1].file) == [f"{d}/d1.ff-s2.qcow2", f"{d}/d1.ff-s1.qcow2", f"{d}/d1.qcow2"]


@integration
async def test_overlay_dir(driver: QmpDriver, vm: Vm) -> None:
    out = vm.dir / "overlays"
    out.mkdir()
    prepared = await driver.prepare_cut("s1", await driver.disks(), overlay_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["d0.ff-s1.qcow2", "d1.ff-s1.qcow2"]
    await driver.cut(prepared)
    assert chain(str(out / "d1.ff-s1.qcow2")) == [
        str(out / "d1.ff-s1.qcow2"),
        f"{vm.dir}/d1.qcow2",
    ]


@integration
async def test_prepare_failure_rolls_back(driver: QmpDriver, vm: Vm) -> None:
    disks = await driver.disks()
    # a node of that name already exists: blockdev-add of the 2nd overlay fails
    taken = vm.dir / "taken.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(taken), "1M")
    file = {"driver": "file", "filename": str(taken)}
    await vm.query("blockdev-add", {"driver": "qcow2", "node-name": "ff-s1-disk1", "file": file})
    with pytest.raises(CutError, match="ff-s1-disk1") as info:
        await driver.prepare_cut("s1", disks)
    assert isinstance(info.value.__cause__, QmpCommandError)
    assert "ff-s1-disk0" not in await vm.node_names()
    assert sorted(p.name for p in vm.dir.glob("*.ff-*")) == []

    # an overlay file already exists: refused before anything is created, file untouched
    (vm.dir / "d1.ff-s2.qcow2").write_bytes(b"keep")
    with pytest.raises(CutError, match="already exists"):
        await driver.prepare_cut("s2", disks)
    assert (vm.dir / "d1.ff-s2.qcow2").read_bytes() == b"keep"
    assert not (vm.dir / "d0.ff-s2.qcow2").exists()
    assert "ff-s2-disk0" not in await vm.node_names()

    # qemu-img fails (no such directory): ToolError becomes CutError
    with pytest.raises(CutError, match="qemu-img"):
        await driver.prepare_cut("s3", disks, overlay_dir=str(vm.dir / "missing"))
    with pytest.raises(CutError, match="invalid snapshot id"):
        await driver.prepare_cut("../x", disks)
    assert await driver.disks() == disks


@integration
async def test_pause_resume(driver: QmpDriver, vm: Vm) -> None:
    await driver.pause()
    assert (await vm.query("query-status"))["running"] is False  # type: ignore[index]
    await driver.resume()
    assert (await vm.query("query-status"))["running"] is True  # type: ignore[index]


@integration
async def test_second_client_is_told_one_client_at_a_time(driver: QmpDriver, vm: Vm) -> None:
    second = QmpDriver(vm.qmp, timeout=0.5)
    with pytest.raises(HypervisorUnavailableError, match="no QMP greeting") as info:
        await second.connect()
    assert "one client at a time" in (info.value.hint or "")
    await second.close()
    assert len(await driver.disks()) == 2  # the first connection is unaffected


# ------------------------------------------------------------------- connection errors


async def test_connect_missing_socket(sock_dir: Path) -> None:
    drv = QmpDriver(str(sock_dir / "nope.sock"), vm_name="gone")
    with pytest.raises(HypervisorUnavailableError, match="does not exist") as info:
        await drv.connect()
    assert "-qmp unix:" in (info.value.hint or "")
    await drv.close()
    with pytest.raises(HypervisorUnavailableError, match="not connected"):
        await drv.disks()


async def test_connect_refused_on_stale_socket(sock_dir: Path) -> None:
    path = str(sock_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: what a dead QEMU leaves behind
    s.close()
    with pytest.raises(HypervisorUnavailableError, match="refused") as info:
        await QmpDriver(path).connect()
    assert isinstance(info.value.__cause__, Exception)


async def test_connect_to_something_that_is_not_qmp(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    async with FakeQmpServer(path, greeting=b'{"hello": "world"}\n'):
        with pytest.raises(HypervisorUnavailableError, match="not a QMP server"):
            await QmpDriver(path, timeout=2).connect()
    # silent like a guest-agent socket
    async with FakeQmpServer(path, greeting=None):
        with pytest.raises(HypervisorUnavailableError, match="no QMP greeting"):
            await QmpDriver(path, timeout=0.3).connect()


async def test_negotiation_refused(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    async with FakeQmpServer(path, {"qmp_capabilities": Error("nope")}):
        with pytest.raises(HypervisorUnavailableError, match="not a QMP server"):
            await QmpDriver(path, timeout=2).connect()


# ------------------------------------------------------------------ command errors (fake)


async def test_command_error_timeout_and_bad_reply(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    replies: dict[str, Reply | list[Reply]] = {
        "query-block": [Error("boom", "DeviceNotFound"), Return({"not": "a list"}), Hang()],
        "query-pci": Return([]),
    }
    async with FakeQmpServer(path, replies), QmpDriver(path, timeout=0.3) as drv:
        with pytest.raises(QmpCommandError, match="boom") as info:
            await drv.disks()
        assert info.value.qmp_class == "DeviceNotFound"
        assert info.value.command == "query-block"
        with pytest.raises(HypervisorError, match="not a list"):
            await drv.disks()
        with pytest.raises(HypervisorError, match="no reply within"):
            await drv.disks()
        # the connection survives a timeout: the next command gets its own answer
        with pytest.raises(QmpCommandError, match="has not been found"):
            await drv.pause()
        await drv.close()
        await drv.close()


def _fake_prepared(tmp: Path) -> PreparedCut:
    from freezeframe.hypervisor.base import PreparedDisk

    disk = DiskInfo("disk0", "disk0", str(tmp / "d0.qcow2"), "qcow2", 1 << 20)
    overlay = tmp / "d0.ff-s1.qcow2"
    overlay.write_bytes(b"overlay")
    return PreparedCut("s1", (PreparedDisk(disk, str(overlay), "ff-s1-disk0", disk.file),))


async def test_cut_refused_vs_outcome_unknown(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    prepared = _fake_prepared(sock_dir)
    replies: dict[str, Reply | list[Reply]] = {
        "transaction": [Error("Cannot find device"), Hangup()]
    }
    async with FakeQmpServer(path, replies) as fake, QmpDriver(path, timeout=2) as drv:
        with pytest.raises(CutError, match="refused, no disk switched"):
            await drv.cut(prepared)
        with pytest.raises(CutError, match="outcome is unknown") as info:
            await drv.cut(prepared)
        assert isinstance(info.value.__cause__, HypervisorUnavailableError)
        sent = next(m for m in fake.received if m.get("execute") == "transaction")
        assert sent["arguments"] == {
            "actions": [
                {"type": "blockdev-snapshot", "data": {"node": "disk0", "overlay": "ff-s1-disk0"}}
            ]
        }
        # the connection is gone: abort cannot tell whether QEMU uses the overlay -> keeps it
        await drv.abort(prepared)
        assert _exists(prepared.disks[0].overlay_file)
        await drv.close()
    with pytest.raises(CutError, match="nothing to cut"):
        await QmpDriver(path).cut(PreparedCut("s1"))


async def test_connection_lost_is_unavailable(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    drv = QmpDriver(path, timeout=2)
    async with FakeQmpServer(path, {"stop": Hangup()}) as fake:
        await drv.connect()
        with pytest.raises(HypervisorUnavailableError):
            await drv.pause()
        with pytest.raises(HypervisorUnavailableError):
            await drv.resume()
        await drv.connect()  # reconnects
        with pytest.raises(QmpCommandError, match="cont has not been found"):
            await drv.resume()
        assert fake.commands().count("qmp_capabilities") == 2
    await drv.close()  # never raises, even on a dead connection


# ------------------------------------------------------------------------- small pieces


def test_overlay_node_name_fits_qemu_limits() -> None:
    assert overlay_node_name("s1", "disk0") == "ff-s1-disk0"
    long = overlay_node_name("01HZXJ4M8K3N2P5Q7R9S0T1V2W", "virtio-disk0")
    assert long.startswith("ff-")
    assert len(long) <= 31
    assert long != overlay_node_name("01HZXJ4M8K3N2P5Q7R9S0T1V2W", "virtio-disk1")
    assert overlay_node_name("s1", "a/b") == "ff-s1-a_b"


def test_registered_and_built_from_config() -> None:
    assert load_driver("qmp") is QmpDriver
    drv = QmpDriver.from_config(VmConfig(name="web", qmp_path="/run/web.qmp"))
    assert (drv.qmp_path, drv.vm_name) == ("/run/web.qmp", "web")
    assert QmpDriver.capabilities.atomic_multi_disk
    assert QmpDriver.capabilities.prepare_outside_freeze
    with pytest.raises(UsageError):
        QmpDriver.from_config(VmConfig(name="web"))
