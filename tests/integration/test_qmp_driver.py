"""Contract tests of the QMP driver against real QEMU processes (no guest kernel: the VM sits in
its BIOS, enough for block operations) and, for the error paths, a fake QMP server.

Each VM gets a second QMP monitor that the test watches QEMU through, independently of the
driver's own connection (a QMP socket serves one client at a time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError

from freezeframe._tools import run
from freezeframe.errors import (
    CutError,
    HypervisorError,
    HypervisorUnavailableError,
    ToolError,
    UsageError,
)
from freezeframe.hypervisor import load_driver
from freezeframe.hypervisor import qmp as qmp_module
from freezeframe.hypervisor.base import PreparedCut
from freezeframe.hypervisor.qmp import (
    QemuStoppedError,
    QmpCommandError,
    QmpDriver,
    overlay_node_name,
)
from freezeframe.models import DiskInfo, VmConfig
from tests.fakes.bios_vm import Vm, bios_vm, chain, pci, qemu_img
from tests.fakes.fake_qmp import Delay, Error, FakeQmpServer, Hang, Hangup, Reply, Return


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

    # no such overlay directory: refused up front (cut_problem), nothing sent to QEMU
    with pytest.raises(CutError, match="missing does not exist"):
        await driver.prepare_cut("s3", disks, overlay_dir=str(vm.dir / "missing"))
    # qemu-img fails for the 2nd disk: ToolError becomes CutError, the 1st disk is rolled back
    bad = [disks[0], dataclasses.replace(disks[1], format="nonsense")]
    with pytest.raises(CutError, match="qemu-img") as info:
        await driver.prepare_cut("s3", bad)
    assert isinstance(info.value.__cause__, ToolError)
    assert not any(n.startswith("ff-s3") for n in await vm.node_names())
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


@integration
async def test_every_connect_to_a_stopped_qemu_names_it_stopped(vm: Vm) -> None:
    """The first connects queue unanswered (no greeting), then QEMU's listen backlog is full
    and connect itself fails (EAGAIN/EINVAL): each one still names the stopped process."""
    pid = vm.proc.pid
    os.kill(pid, signal.SIGSTOP)
    causes: list[BaseException | None] = []
    try:
        for _ in range(5):
            drv = QmpDriver(vm.qmp, vm_name="t", timeout=5, greeting_timeout=0.5)
            with pytest.raises(QemuStoppedError) as info:
                await drv.connect()
            await drv.close()
            err = info.value
            assert (err.pid, err.state, err.exit_code) == (pid, "T", 7)
            assert isinstance(err, HypervisorUnavailableError)
            assert err.message == (
                f"VM 't': QEMU (pid {pid}) behind {vm.qmp} is stopped (SIGSTOP): it cannot answer"
            )
            assert err.hint == f"continue it (kill -CONT {pid}) and retry"
            causes.append(err.__cause__)
    finally:
        os.kill(pid, signal.SIGCONT)
        vm.proc.kill()  # the fixture waits for it; the queued connects die with it
    # Both ways a connect to a stopped QEMU fails were met: no greeting, and a full backlog.
    assert isinstance(causes[0], TimeoutError)
    roots = [c.exc if isinstance(c, ConnectError) else c for c in causes[1:]]
    assert any(isinstance(r, OSError) and r.errno in (errno.EAGAIN, errno.EINVAL) for r in roots), (
        roots
    )


@integration
async def test_prepare_rolls_back_on_a_foreign_error_and_on_cancel(
    driver: QmpDriver, vm: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = await driver.disks()
    calls: list[tuple[str, ...]] = []
    second_started = asyncio.Event()

    async def flaky_run(*argv: str, **kw: Any) -> object:
        calls.append(argv)
        if len(calls) == 2:  # qemu-img for the 2nd disk: disk0 is already file + node
            raise RuntimeError("a bug in a layer below")
        if len(calls) == 4:
            second_started.set()
            await asyncio.Event().wait()  # hangs until cancelled
        return await run(*argv, **kw)

    monkeypatch.setattr(qmp_module, "run", flaky_run)

    with pytest.raises(CutError, match="a bug in a layer below") as info:
        await driver.prepare_cut("s1", disks)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert list(vm.dir.glob("*.ff-*")) == []

    task = asyncio.create_task(driver.prepare_cut("s2", disks))
    await asyncio.wait_for(second_started.wait(), 10)
    assert "ff-s2-disk0" in await vm.node_names()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert list(vm.dir.glob("*.ff-*")) == []
    assert len(calls) == 4


@integration
async def test_a_second_cancel_during_the_rollback_does_not_cut_it_short(
    driver: QmpDriver, vm: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = await driver.disks()
    second_started, undo_started = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def hanging_run(*argv: str, **kw: Any) -> object:
        calls.append(argv[0])
        if len(calls) == 2:  # qemu-img for disk1: disk0 is already file + node
            second_started.set()
            await asyncio.Event().wait()  # hangs until cancelled
        return await run(*argv, **kw)

    real_execute = driver._execute

    async def slow_del(command: str, arguments: dict[str, object] | None = None) -> object:
        if command == "blockdev-del":
            undo_started.set()
            await asyncio.sleep(0.5)  # the operator presses Ctrl-C again meanwhile
        return await real_execute(command, arguments)

    monkeypatch.setattr(qmp_module, "run", hanging_run)
    monkeypatch.setattr(driver, "_execute", slow_del)

    task = asyncio.create_task(driver.prepare_cut("s1", disks))
    await asyncio.wait_for(second_started.wait(), 10)
    assert "ff-s1-disk0" in await vm.node_names()
    task.cancel()
    await asyncio.wait_for(undo_started.wait(), 10)
    for _ in range(3):
        task.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert list(vm.dir.glob("*.ff-*")) == []


@integration
async def test_cancel_while_blockdev_add_is_in_flight_removes_its_node(
    driver: QmpDriver, vm: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = await driver.disks()
    added = asyncio.Event()
    real_execute = driver._execute

    async def reply_never_seen(command: str, arguments: dict[str, object] | None = None) -> object:
        result = await real_execute(command, arguments)
        if command == "blockdev-add" and (arguments or {}).get("node-name") == "ff-s1-disk1":
            added.set()  # QEMU created the node, but the reply has not reached the caller yet
            await asyncio.Event().wait()
        return result

    monkeypatch.setattr(driver, "_execute", reply_never_seen)
    task = asyncio.create_task(driver.prepare_cut("s1", disks))
    await asyncio.wait_for(added.wait(), 10)
    assert {"ff-s1-disk0", "ff-s1-disk1"} <= await vm.node_names()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert list(vm.dir.glob("*.ff-*")) == []


@integration
async def test_a_socket_that_is_not_qmp_fails_fast_and_quietly(
    vm: Vm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    qga = f"{vm.dir}/qga.sock"  # QEMU's guest-agent chardev: accepts, never greets
    drv = QmpDriver(qga, vm_name="wrong")  # default timeouts, as the CLI builds it
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(HypervisorUnavailableError) as info:
        await drv.connect()
    elapsed = loop.time() - start
    assert elapsed < qmp_module.GREETING_TIMEOUT + 1.5 < drv.timeout
    assert info.value.message == (
        f"VM 'wrong': {qga} answered but sent no QMP greeting within "
        f"{qmp_module.GREETING_TIMEOUT:g} s: is it QEMU's QMP socket (-qmp unix:{qga},server=on)?"
    )
    assert "one client at a time" in (info.value.hint or "")
    await drv.close()
    # qemu.qmp's own error records ("Failed to establish session: CancelledError") are
    # translated into that error: they are passed on at DEBUG only (shown at -v)
    library = [r for r in caplog.records if r.name.startswith("qemu.qmp")]
    assert any("CancelledError" in r.getMessage() for r in library)
    assert [r.getMessage() for r in library if r.levelno > logging.DEBUG] == []


@integration
async def test_abort_reconnects_after_the_connection_is_gone(driver: QmpDriver, vm: Vm) -> None:
    prepared = await driver.prepare_cut("s1", await driver.disks())
    await driver.close()  # e.g. the connection dropped while the cut's outcome was unknown

    await driver.abort(prepared)

    assert not any(n.startswith("ff-") for n in await vm.node_names())
    assert not any(_exists(p.overlay_file) for p in prepared.disks)
    assert [d.node for d in await driver.disks()] == ["disk0", "disk1"]  # still connected


def _assert_lost(exc: HypervisorError, vm: Vm, command: str) -> None:
    assert isinstance(exc, HypervisorUnavailableError)
    assert exc.message == (
        f"VM 't': the QMP connection to {vm.qmp} was lost (during {command}): "
        "is QEMU still running?"
    )
    assert "disconnect()" not in (exc.hint or "")


@integration
async def test_qemu_gone_during_or_between_commands_is_a_lost_connection(
    driver: QmpDriver, vm: Vm
) -> None:
    # During: QEMU holds the command (stopped), then dies before answering.
    os.kill(vm.proc.pid, signal.SIGSTOP)
    task = asyncio.create_task(driver.disks())
    await asyncio.sleep(0.3)
    assert not task.done()
    vm.proc.kill()
    await vm.proc.wait()
    with pytest.raises(HypervisorError) as during:
        await task
    _assert_lost(during.value, vm, "query-block")
    # Between: every later command (qemu.qmp: "QMPClient is disconnecting. Call disconnect()
    # to return to IDLE state.") says the same.
    for call, command in ((driver.disks, "query-block"), (driver.agent_channel, "qom-list")):
        with pytest.raises(HypervisorError) as between:
            await call()
        _assert_lost(between.value, vm, command)
    with pytest.raises(HypervisorUnavailableError, match=r"does not exist|refused"):
        await driver.connect()  # a reconnect says what is wrong with the socket


@integration
async def test_cut_state(driver: QmpDriver, vm: Vm, caplog: pytest.LogCaptureFixture) -> None:
    prepared = await driver.prepare_cut("s1", await driver.disks())
    assert await driver.cut_state(prepared) == "not-switched"

    # only disk0 cut: a state one transaction cannot leave
    await driver.cut(PreparedCut("s1", prepared.disks[:1]))
    with caplog.at_level(logging.ERROR, logger="freezeframe.hypervisor.qmp"):
        assert await driver.cut_state(prepared) == "unknown"
    assert "disk0: switched, disk1: not-switched" in caplog.text
    assert await driver.cut_state(PreparedCut("s1", prepared.disks[:1])) == "switched"

    await driver.cut(PreparedCut("s1", prepared.disks[1:]))
    assert await driver.cut_state(prepared) == "switched"
    wrong = dataclasses.replace(prepared.disks[0], image_at_cut=str(vm.dir / "other.qcow2"))
    assert await driver.cut_state(PreparedCut("s1", (wrong,))) == "unknown"

    # the connection dropped: cut_state reconnects
    await driver.close()
    assert await driver.cut_state(prepared) == "switched"
    # ... and abort, reconnected, keeps the overlays QEMU uses
    await driver.close()
    await driver.abort(prepared)
    assert all(_exists(p.overlay_file) for p in prepared.disks)
    assert await driver.cut_state(prepared) == "switched"

    # a later cut on top: s1's overlays sit below the top now, which is no answer for s1
    second = await driver.prepare_cut("s2", await driver.disks())
    await driver.cut(second)
    assert await driver.cut_state(prepared) == "unknown"

    # the socket is gone: cannot ask
    await driver.close()
    moved = vm.dir / "moved.sock"
    os.rename(vm.qmp, moved)
    try:
        assert await driver.cut_state(second) == "unknown"
    finally:
        os.rename(moved, vm.qmp)
    assert await driver.cut_state(second) == "switched"


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
        # the connection is gone: abort reconnects; QEMU still knows the node and refuses to
        # delete it (in use) -> the overlay is kept
        fake.replies["query-named-block-nodes"] = Return(
            [{"node-name": "disk0"}, {"node-name": "ff-s1-disk0"}]
        )
        fake.replies["query-block"] = Return([])  # no disk uses the overlay file
        fake.replies["blockdev-del"] = Error("Node 'ff-s1-disk0' is busy")
        await drv.abort(prepared)
        assert fake.commands().count("qmp_capabilities") == 2
        assert fake.commands()[-1] == "blockdev-del"
        assert _exists(prepared.disks[0].overlay_file)
        # no QEMU to ask at all: everything is kept, nothing raised
        await fake.stop()
        await drv.abort(prepared)
        assert _exists(prepared.disks[0].overlay_file)
        assert await drv.cut_state(prepared) == "unknown"
        await drv.close()
    with pytest.raises(CutError, match="nothing to cut"):
        await QmpDriver(path).cut(PreparedCut("s1"))


async def test_abort_after_a_dropped_connection_removes_unused_overlays(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    prepared = _fake_prepared(sock_dir)
    replies: dict[str, Reply | list[Reply]] = {
        "transaction": Hangup(),
        "query-named-block-nodes": Return([{"node-name": "disk0"}, {"node-name": "ff-s1-disk0"}]),
        "query-block": Return([]),  # no disk uses the overlay file
        "blockdev-del": Return({}),
    }
    async with FakeQmpServer(path, replies) as fake, QmpDriver(path, timeout=2) as drv:
        with pytest.raises(CutError, match="outcome is unknown"):
            await drv.cut(prepared)
        await drv.abort(prepared)
        assert fake.received[-1] == {
            "execute": "blockdev-del",
            "arguments": {"node-name": "ff-s1-disk0"},
            "id": fake.received[-1]["id"],
        }
        assert not _exists(prepared.disks[0].overlay_file)


async def test_cancelled_cut_leaves_the_driver_usable(sock_dir: Path) -> None:
    path = str(sock_dir / "x.sock")
    prepared = _fake_prepared(sock_dir)
    top = {
        "node-name": "ff-s1-disk0",
        "image": {"filename": prepared.disks[0].overlay_file, "backing-image": {
            "filename": prepared.disks[0].image_at_cut}},
    }  # fmt: skip
    replies: dict[str, Reply | list[Reply]] = {
        "transaction": Delay(0.2, Return({})),
        "query-block": Return([{"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend",
                                "inserted": top}]),
    }  # fmt: skip
    async with FakeQmpServer(path, replies) as fake, QmpDriver(path, timeout=5) as drv:
        with pytest.raises(TimeoutError) as info:  # the caller's own timeout, nothing foreign
            async with asyncio.timeout(0.05):
                await drv.cut(prepared)
        assert type(info.value) is TimeoutError
        assert isinstance(info.value.__context__, asyncio.CancelledError)  # cut let it through
        # the next call gets its own answer (the late transaction reply is dropped), on the
        # same connection
        assert await drv.cut_state(prepared) == "switched"
        assert fake.commands() == ["qmp_capabilities", "transaction", "query-block"]

        # cancelled outright, the same
        fake.replies["transaction"] = Delay(0.2, Error("refused"))
        task = asyncio.create_task(drv.cut(prepared))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(QmpCommandError, match="stop has not been found"):
            await drv.pause()
        assert fake.commands().count("qmp_capabilities") == 1


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


async def test_cut_problem_names_disks_that_need_an_overlay_dir(sock_dir: Path) -> None:
    drv = QmpDriver(str(sock_dir / "x.sock"))
    local = DiskInfo("disk0", "disk0", str(sock_dir / "d0.qcow2"), "qcow2", 1 << 20)
    assert drv.cut_problem(local) is None
    assert drv.cut_problem(local, str(sock_dir)) is None
    missing = dataclasses.replace(local, file=str(sock_dir / "gone" / "d0.qcow2"))
    assert "gone does not exist" in (drv.cut_problem(missing) or "")
    rbd = DiskInfo("disk1", "disk1", 'json:{"driver": "rbd", "image": "i"}', "raw", 1)
    nbd = dataclasses.replace(rbd, file="nbd+unix:///exp?socket=/run/nbd.sock")
    for remote in (rbd, nbd):
        problem = drv.cut_problem(remote) or ""
        assert "not a local file" in problem
        assert "use overlay_dir" in problem
        assert drv.cut_problem(remote, str(sock_dir)) is None
    assert "gone does not exist" in (drv.cut_problem(rbd, str(sock_dir / "gone")) or "")
    blk = next((str(p) for p in Path("/dev").iterdir() if p.is_block_device()), None)
    if blk is not None:
        dev = dataclasses.replace(local, file=blk)
        assert "is a block device" in (drv.cut_problem(dev) or "")
        assert drv.cut_problem(dev, str(sock_dir)) is None

    # prepare_cut refuses the same disks before it creates or sends anything
    path = str(sock_dir / "x.sock")
    async with FakeQmpServer(path) as fake, QmpDriver(path, timeout=2) as conn:
        with pytest.raises(CutError, match=r"disk1: image .* is not a local file") as info:
            await conn.prepare_cut("s1", [local, rbd])
        assert "overlay directory" in (info.value.hint or "")
        assert fake.commands() == ["qmp_capabilities"]
    assert list(sock_dir.glob("*.ff-*")) == []


async def test_run_translates_a_program_that_cannot_start(sock_dir: Path) -> None:
    garbage = sock_dir / "garbage"
    garbage.write_bytes(b"\x7fnot an executable format\n")
    garbage.chmod(0o755)
    with pytest.raises(ToolError, match="cannot start") as info:
        await run(str(garbage), what="garbage")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOEXEC
    with pytest.raises(ToolError, match="cannot start") as info:
        await run("true", cwd=str(sock_dir / "gone"))
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(ToolError, match="cannot start") as info:
        await run("true", "a\0b")
    assert isinstance(info.value.__cause__, ValueError)
    assert (await run("true", cwd=str(sock_dir))).returncode == 0


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
