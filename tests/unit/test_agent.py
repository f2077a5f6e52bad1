"""Unit tests of the guest-agent client against the fake agent on a real unix socket.

Every misbehaviour (stale sync replies, oversize, invalid JSON, wrong types, silence, error
objects) must end in a clear AgentError within the call's timeout, never a hang, and leave the
client usable: the next command gets its own reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.fakes.fake_agent import FakeAgent, FakeExec, FakeFs

from freezeframe.agent import GuestAgent, Transport
from freezeframe.agent.protocol import decode_reply
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from freezeframe.models import FsFreezeState, PciAddress

FS = [
    FakeFs("/", "ext4", name="vda", pci=(0, 0, 4, 0), serial="root-disk"),
    FakeFs("/data", "xfs", name="vdb", pci=(0, 0, 5, 0)),
    FakeFs("/boot/efi", "vfat", name="vda1", pci=None, freezable=False),
]

SHORT = 0.2  # timeout for calls that are meant to time out
SLACK = 0.5  # how much later than its timeout a call may fail


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeAgent]:
    async with FakeAgent(tmp_path / "qga.sock", fs=FS) as f:
        yield f


@pytest.fixture
async def agent(fake: FakeAgent) -> AsyncIterator[GuestAgent]:
    async with GuestAgent(fake.path, timeout=2.0) as ga:
        yield ga


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.2f}s, expected < {seconds}s"


# ---------------------------------------------------------------------------- happy paths


async def test_connect_syncs_and_skips_stray_ff_error(fake: FakeAgent, agent: GuestAgent) -> None:
    assert fake.received[0][0] == "guest-sync-delimited"
    assert not agent.needs_sync
    await agent.ping()
    # one sync only: no re-sync while everything goes well
    assert [n for n, _ in fake.received] == ["guest-sync-delimited", "guest-ping"]


async def test_info(agent: GuestAgent) -> None:
    info = await agent.info()
    assert info.version == "7.2.22"
    assert info.enabled("guest-fsfreeze-freeze")
    assert not info.enabled("guest-no-such-thing")


async def test_info_reports_disabled_commands(tmp_path: Path) -> None:
    async with (
        FakeAgent(tmp_path / "q.sock", disabled=["guest-exec"]) as fake,
        GuestAgent(fake.path, timeout=2) as ga,
    ):
        assert not (await ga.info()).enabled("guest-exec")
        with pytest.raises(AgentCommandError) as ei:
            await ga.exec("/bin/true")
        assert ei.value.qga_class == "CommandNotFound"


async def test_get_fsinfo_narrows_into_models(agent: GuestAgent) -> None:
    fs = await agent.get_fsinfo()
    assert [(f.mountpoint, f.fstype, f.name) for f in fs] == [
        ("/", "ext4", "vda"),
        ("/data", "xfs", "vdb"),
        ("/boot/efi", "vfat", "vda1"),
    ]
    root = fs[0].disks[0]
    assert root.pci == PciAddress(0, 0, 4, 0)
    assert root.dev == "/dev/vda"
    assert root.bus_type == "virtio"
    assert root.serial == "root-disk"
    assert fs[1].disks[0].serial is None
    assert fs[2].disks[0].pci is None  # agent reported -1s: unknown address


async def test_freeze_status_thaw_state_machine(fake: FakeAgent, agent: GuestAgent) -> None:
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED
    assert await agent.fsfreeze_freeze() == 2  # vfat skipped silently, like qemu-ga
    assert await agent.fsfreeze_status() is FsFreezeState.FROZEN
    assert fake.frozen_mounts == ["/", "/data"]
    with pytest.raises(AgentCommandError) as ei:
        await agent.get_fsinfo()  # not allowed while frozen
    assert ei.value.qga_class == "CommandNotFound"
    assert ei.value.command == "guest-get-fsinfo"
    assert "frozen state" in str(ei.value)
    await agent.ping()  # allowed while frozen
    assert await agent.fsfreeze_thaw() == 2
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED
    assert await agent.fsfreeze_thaw() == 0
    assert fake.commands == [
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-status",
        "guest-get-fsinfo",
        "guest-ping",
        "guest-fsfreeze-thaw",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    ]


async def test_freeze_list(fake: FakeAgent, agent: GuestAgent) -> None:
    assert await agent.fsfreeze_freeze_list(["/data", "/not-mounted"]) == 1
    assert fake.received[-1] == (
        "guest-fsfreeze-freeze-list",
        {"mountpoints": ["/data", "/not-mounted"]},
    )
    assert fake.frozen_mounts == ["/data"]
    assert await agent.fsfreeze_thaw() == 1
    with pytest.raises(TypeError):
        await agent.fsfreeze_freeze_list("/data")


async def test_file_read_small_and_chunked(fake: FakeAgent) -> None:
    big = bytes(range(256)) * 40  # 10 KiB, binary
    fake.files["/etc/hostname"] = b"vm\n"
    fake.files["/var/log/big"] = big
    async with GuestAgent(fake.path, timeout=2, max_line=1024) as ga:
        assert await ga.file_read("/etc/hostname") == b"vm\n"
        assert await ga.file_read("/var/log/big") == big
        reads = [a for n, a in fake.received if n == "guest-file-read"]
        assert len(reads) > 10  # max_line=1024 forces chunks well under 1 KiB of data
        assert all(a["count"] * 4 // 3 < 1024 for a in reads)
    assert fake.open_handles == []


async def test_file_read_too_large_closes_handle(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.files["/big"] = b"x" * 5000
    with pytest.raises(AgentError, match="larger than max_bytes=4096"):
        await agent.file_read("/big", max_bytes=4096)
    assert fake.open_handles == []
    assert await agent.file_read("/big", max_bytes=5000) == b"x" * 5000


async def test_file_read_tail_reads_only_the_end(fake: FakeAgent, agent: GuestAgent) -> None:
    log = b"".join(b"line %05d\n" % i for i in range(2000))  # 22 000 bytes
    fake.files["/var/log/qemu-ga.log"] = log
    assert await agent.file_read("/var/log/qemu-ga.log", max_bytes=110, tail=True) == log[-110:]
    assert await agent.file_read("/var/log/qemu-ga.log", max_bytes=1 << 20, tail=True) == log
    seeks = [a for n, a in fake.received if n == "guest-file-seek"]
    assert seeks[1] == {"handle": seeks[1]["handle"], "offset": len(log) - 110, "whence": "set"}
    assert fake.open_handles == []


async def test_file_read_missing_file(agent: GuestAgent) -> None:
    with pytest.raises(AgentCommandError) as ei:
        await agent.file_read("/nonexistent")
    assert ei.value.qga_class == "GenericError"
    assert ei.value.command == "guest-file-open"


async def test_file_contents_never_logged(
    fake: FakeAgent, agent: GuestAgent, caplog: pytest.LogCaptureFixture
) -> None:
    fake.files["/etc/shadow"] = b"root:SECRET-HASH:19000"
    caplog.set_level(logging.DEBUG, logger="freezeframe")
    assert await agent.file_read("/etc/shadow") == b"root:SECRET-HASH:19000"
    assert "guest-file-read" in caplog.text
    assert "SECRET" not in caplog.text
    assert "cm9vdDpTRUNSRVQtSEFTSDoxOTAwMA" not in caplog.text  # nor its base64
    # a malformed reply to a read is not quoted in the error either
    fake.behave("guest-file-read", raw=b'{"return": {"buf-b64": "SECRET-LEAK" \n', times=1)
    with pytest.raises(AgentProtocolError) as ei:
        await agent.file_read("/etc/shadow")
    assert "SECRET" not in str(ei.value)


async def test_exec_with_output_and_exit_code(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.execs["/bin/sh"] = FakeExec(exitcode=3, stdout=b"out\n", stderr=b"err\n", running_polls=3)
    res = await agent.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
    assert (res.exitcode, res.signal, res.stdout, res.stderr) == (3, None, b"out\n", b"err\n")
    assert fake.exec_log == [["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]]
    assert fake.count("guest-exec-status") == 4
    assert fake.received[-5] == (
        "guest-exec",
        {
            "path": "/bin/sh",
            "arg": ["-c", "echo out; echo err >&2; exit 3"],
            "capture-output": True,
        },
    )


async def test_exec_killed_by_signal_no_capture(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.execs["/bin/crash"] = FakeExec(exitcode=None, signal=9, stdout=b"ignored")
    res = await agent.exec("/bin/crash", capture=False)
    assert (res.exitcode, res.signal, res.stdout) == (None, 9, b"")


async def test_exec_missing_program(agent: GuestAgent) -> None:
    with pytest.raises(AgentCommandError) as ei:
        await agent.exec("/nonexistent")
    assert ei.value.command == "guest-exec"


async def test_exec_timeout_leaves_client_usable(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.execs["/bin/sleep"] = FakeExec(running_polls=10_000)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError, match="still running"):
        await agent.exec("/bin/sleep", ["100"], timeout=SHORT)
    await agent.ping()


async def test_execute_low_level(agent: GuestAgent) -> None:
    assert await agent.execute("guest-ping") == {}
    assert await agent.execute("guest-sync", {"id": 42}) == 42
    with pytest.raises(AgentCommandError) as ei:
        await agent.execute("guest-no-such-command")
    assert ei.value.qga_class == "CommandNotFound"
    assert ei.value.command == "guest-no-such-command"


# ---------------------------------------------------------------------------- misbehaviour


async def test_stale_sync_replies_are_skipped(fake: FakeAgent) -> None:
    fake.behave("guest-sync-delimited", stale=3, times=1)
    async with GuestAgent(fake.path, timeout=2) as ga:
        info = await ga.info()
        assert info.version == "7.2.22"
        assert await ga.fsfreeze_status() is FsFreezeState.THAWED


async def test_late_reply_after_timeout_is_discarded(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-get-fsinfo", delay=0.4, times=1)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError, match="guest-get-fsinfo"):
        await agent.get_fsinfo(timeout=SHORT)
    assert agent.needs_sync
    # the fsinfo list arrives late; the status call must get its own "thawed", not that list
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED
    names = [n for n, _ in fake.received]
    assert names[-3:] == ["guest-get-fsinfo", "guest-sync-delimited", "guest-fsfreeze-status"]
    assert not agent.needs_sync


async def test_freeze_timeout_then_thaw_waits_for_the_freeze(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    fake.behave("guest-fsfreeze-freeze", delay=0.4, times=1)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=SHORT)
    # the freeze completes in the guest after our timeout; the thaw's re-sync waits for it
    assert await agent.fsfreeze_thaw() == 2
    assert not fake.frozen


async def test_silence_times_out_and_recovers(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-fsfreeze-freeze", silent=True, times=1)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=SHORT)
    assert fake.frozen  # it froze, it just never said so
    assert await agent.fsfreeze_status() is FsFreezeState.FROZEN
    assert await agent.fsfreeze_thaw() == 2


async def test_hung_agent_every_call_times_out(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-ping", hang=True)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
        await agent.ping(timeout=SHORT)
    # the agent reads nothing any more: even the re-sync of the next call times out
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_status(timeout=SHORT)
    fake.behave("guest-ping")
    fake.release()
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_reply_over_max_line(fake: FakeAgent) -> None:
    async with GuestAgent(fake.path, timeout=2, max_line=4096, max_reply=16384) as ga:
        fake.behave("guest-info", oversize=10_000, times=1)
        with within(2), pytest.raises(AgentProtocolError, match="max_line=4096"):
            await ga.info()
        assert ga.needs_sync
        assert (await ga.info()).version == "7.2.22"
        assert fake.connections == 1  # the rest of the long line was skipped by the re-sync


async def test_endless_line_fails_fast(fake: FakeAgent) -> None:
    async with GuestAgent(fake.path, timeout=2, max_line=4096, max_reply=1 << 20) as ga:
        fake.behave("guest-info", raw=b'{"return": "' + b"x" * 10_000, times=1)  # no newline
        with within(1), pytest.raises(AgentProtocolError, match="max_line=4096"):
            await ga.info()
        assert (await ga.info()).version == "7.2.22"


async def test_noise_over_max_reply_reconnects(fake: FakeAgent) -> None:
    async with GuestAgent(fake.path, timeout=2, max_line=4096, max_reply=16384) as ga:
        fake.behave("guest-info", oversize=200_000, times=1)
        with pytest.raises(AgentProtocolError, match=r"max_line|max_reply"):
            await ga.info()
        # the re-sync would have to skip more than max_reply bytes: it reconnects instead
        assert (await ga.info()).version == "7.2.22"
        assert fake.connections == 2


async def test_invalid_json(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-fsfreeze-status", invalid_json=True, times=1)
    with pytest.raises(AgentProtocolError, match="guest-fsfreeze-status: reply is not valid JSON"):
        await agent.fsfreeze_status()
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_reply_without_return_or_error(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-ping", raw=b'{"something": 1}\n', times=1)
    with pytest.raises(AgentProtocolError, match="neither"):
        await agent.ping()
    fake.behave("guest-ping", raw=b"[1, 2]\n", times=1)
    with pytest.raises(AgentProtocolError, match="not a JSON object"):
        await agent.ping()
    await agent.ping()


@pytest.mark.parametrize(
    ("command", "method", "returns", "field"),
    [
        ("guest-info", "info", {"version": 7, "supported_commands": []}, "'version'"),
        ("guest-info", "info", {"version": "7", "supported_commands": {}}, "supported_commands"),
        (
            "guest-info",
            "info",
            {"version": "7", "supported_commands": [{"name": "x", "enabled": "yes"}]},
            "supported_commands[0].enabled",
        ),
        ("guest-get-fsinfo", "get_fsinfo", {"not": "a list"}, "'return'"),
        (
            "guest-get-fsinfo",
            "get_fsinfo",
            [
                {
                    "name": "vda",
                    "mountpoint": "/",
                    "type": "ext4",
                    "disk": [
                        {
                            "pci-controller": {"domain": "0", "bus": 0, "slot": 4, "function": 0},
                            "bus-type": "virtio",
                            "bus": 0,
                            "target": 0,
                            "unit": 0,
                        }
                    ],
                }
            ],
            "return[0].disk[0].pci-controller.domain",
        ),
        (
            "guest-get-fsinfo",
            "get_fsinfo",
            [{"name": "vda", "mountpoint": None, "type": "ext4", "disk": []}],
            "return[0].mountpoint",
        ),
        ("guest-fsfreeze-status", "fsfreeze_status", "melted", "'return'"),
        ("guest-fsfreeze-freeze", "fsfreeze_freeze", "2", "'return'"),
        ("guest-fsfreeze-freeze", "fsfreeze_freeze", True, "'return'"),
        ("guest-fsfreeze-thaw", "fsfreeze_thaw", -1, "'return'"),
    ],
)
async def test_wrong_types_name_command_and_field(
    fake: FakeAgent, agent: GuestAgent, command: str, method: str, returns: Any, field: str
) -> None:
    fake.behave(command, returns=returns, times=1)
    with pytest.raises(AgentProtocolError) as ei:
        await getattr(agent, method)()
    assert command in str(ei.value)
    assert field in str(ei.value)
    assert agent.needs_sync
    await agent.ping()


async def test_wrong_exec_and_file_shapes(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.execs["/bin/x"] = FakeExec()
    fake.behave("guest-exec", returns={"pid": "12"}, times=1)
    with pytest.raises(AgentProtocolError, match="guest-exec: field 'pid'"):
        await agent.exec("/bin/x")
    fake.behave("guest-exec-status", returns={"exited": True, "out-data": "@@@"}, times=1)
    with pytest.raises(AgentProtocolError, match="out-data"):
        await agent.exec("/bin/x")
    fake.files["/f"] = b"abc"
    fake.behave("guest-file-read", returns={"count": 99, "buf-b64": "YWJj", "eof": True}, times=1)
    with pytest.raises(AgentProtocolError, match="count"):
        await agent.file_read("/f")
    # the handle was left open by the failed read; it is closed before the next normal call
    assert agent.orphan_handles
    assert fake.open_handles
    assert await agent.file_read("/f") == b"abc"
    assert fake.open_handles == []
    assert agent.orphan_handles == ()


async def test_error_object(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave(
        "guest-fsfreeze-freeze",
        error=("GenericError", "failed to freeze /data: Device or resource busy"),
        times=1,
    )
    with pytest.raises(AgentCommandError) as ei:
        await agent.fsfreeze_freeze()
    err = ei.value
    assert (err.command, err.qga_class) == ("guest-fsfreeze-freeze", "GenericError")
    assert "Device or resource busy" in str(err)
    assert not fake.frozen
    # any error: the next command is preceded by a re-sync
    await agent.ping()
    assert [n for n, _ in fake.received][-2:] == ["guest-sync-delimited", "guest-ping"]


async def test_malformed_error_object(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-ping", raw=b'{"error": {"class": 1}}\n', times=1)
    with pytest.raises(AgentProtocolError, match="error"):
        await agent.ping()


# ---------------------------------------------------------------------------- connection


async def test_missing_socket_hints_at_the_image_property(tmp_path: Path) -> None:
    ga = GuestAgent(str(tmp_path / "nope.sock"), timeout=1)
    with pytest.raises(AgentUnavailableError) as ei:
        await ga.connect()
    assert "does not exist" in str(ei.value)
    assert "hw_qemu_guest_agent=yes" in (ei.value.hint or "")


async def test_refused_hints_at_installing_the_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # a socket file nobody listens on: ECONNREFUSED
    try:
        with pytest.raises(AgentUnavailableError) as ei:
            await GuestAgent(path, timeout=1).ping()
        assert "install and start qemu-guest-agent" in (ei.value.hint or "")
    finally:
        s.close()


async def test_silent_peer_times_out_on_connect(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    server = await asyncio.start_unix_server(lambda r, w: None, path=path)
    try:
        ga = GuestAgent(path, timeout=SHORT)
        with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
            await ga.connect()
        await ga.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_agent_drops_connection_then_reconnects(fake: FakeAgent, agent: GuestAgent) -> None:
    await fake.disconnect()
    with pytest.raises(AgentUnavailableError):
        await agent.ping()
    assert not agent.connected
    await agent.ping()
    assert fake.connections == 2


async def test_close_and_reuse(fake: FakeAgent, agent: GuestAgent) -> None:
    await agent.close()
    assert not agent.connected
    await agent.close()  # idempotent
    await agent.ping()  # reconnects lazily
    assert fake.connections == 2


# ---------------------------------------------------------------------------- concurrency


async def test_cancellation_leaves_client_usable(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-get-fsinfo", delay=0.3, times=1)
    task = asyncio.create_task(agent.get_fsinfo())
    await fake.wait_for("guest-get-fsinfo")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert agent.needs_sync
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_cancelled_file_read_handle_closed_later(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.files["/f"] = b"data"
    fake.behave("guest-file-read", delay=0.3, times=1)
    task = asyncio.create_task(agent.file_read("/f"))
    await fake.wait_for("guest-file-read")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert agent.orphan_handles == (1000,)
    # freeze-safe commands (thaw, status, ping) never do housekeeping first
    await agent.fsfreeze_thaw()
    assert fake.open_handles == [1000]
    await agent.get_fsinfo()
    assert fake.open_handles == []
    assert not agent.orphan_handles


async def test_close_closes_leftover_handles(fake: FakeAgent) -> None:
    fake.files["/f"] = b"data"
    fake.behave("guest-file-read", delay=0.4, times=1)
    ga = GuestAgent(fake.path, timeout=2)
    with pytest.raises(AgentTimeoutError):
        await ga.file_read("/f", timeout=SHORT)
    assert fake.open_handles == [1000]
    with within(1.5):
        await ga.close()  # re-syncs (waits for the late read reply) and closes the handle
    assert fake.open_handles == []
    assert not ga.orphan_handles


async def test_calls_are_serialized(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-get-fsinfo", delay=0.1, times=1)
    fs, status, info = await asyncio.gather(
        agent.get_fsinfo(), agent.fsfreeze_status(), agent.info()
    )
    assert len(fs) == 3
    assert status is FsFreezeState.THAWED
    assert info.version == "7.2.22"


async def test_waiting_for_the_lock_counts_against_the_timeout(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    fake.behave("guest-ping", delay=0.4, times=1)
    slow = asyncio.create_task(agent.ping())
    await fake.wait_for("guest-ping")
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError, match="waiting for another"):
        await agent.fsfreeze_status(timeout=SHORT)
    await slow
    assert not agent.needs_sync  # the waiter never touched the stream


# ---------------------------------------------------------------------------- transport


class ScriptedTransport(Transport):
    """An in-memory transport: answers each written line from a script, records the bytes."""

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.written = bytearray()
        self.replies = replies
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def read(self, n: int) -> bytes:
        return await self.inbox.get()

    async def write(self, data: bytes) -> None:
        self.written += data
        text = data.lstrip(b"\xff")
        msg = json.loads(text)
        name = msg["execute"]
        if name == "guest-sync-delimited":
            # noise, then the delimiter and the reply, split across reads
            self.inbox.put_nowait(b'{"error": {"class": "GenericError", "desc": "x"}}\n\xff')
            self.inbox.put_nowait(b'{"return": %d}\n' % msg["arguments"]["id"])
        else:
            self.inbox.put_nowait(self.replies[name])

    async def close(self) -> None:
        self.closed = True


async def test_plugged_in_transport() -> None:
    transport = ScriptedTransport({"guest-ping": b'{"return": {}}\n'})

    async def connector() -> Transport:
        return transport

    ga = GuestAgent("scripted", timeout=1, connector=connector)
    await ga.ping()
    assert transport.written.startswith(b'\xff{"execute": "guest-sync-delimited"')
    assert transport.written.endswith(b'{"execute": "guest-ping"}\n')
    assert transport.written.count(b"\n") == 2  # one line per command
    await ga.close()
    assert transport.closed


# ---------------------------------------------------------------------------- urgent thaw


async def test_urgent_thaw_queues_behind_a_slow_freeze(fake: FakeAgent, agent: GuestAgent) -> None:
    """The review's scenario: the freeze outlives its timeout, the thaw's reply never comes in
    time, the client goes away; the guest still ends thawed, in the right order."""
    fake.behave("guest-fsfreeze-freeze", delay=3.0, times=1)
    t0 = time.monotonic()
    with within(0.5 + SLACK), pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=0.5)
    with within(1.0 + SLACK):
        assert await agent.fsfreeze_thaw_urgent(timeout=1.0) is None
    assert agent.needs_sync
    assert agent.connected  # never closed by the urgent thaw itself
    with within(SLACK):
        await agent.close()
    assert fake.count("guest-fsfreeze-thaw") == 0  # still queued behind the running freeze
    await fake.wait_for("guest-fsfreeze-thaw", timeout=4.0)
    assert time.monotonic() - t0 >= 2.9  # it ran only once the freeze was done
    assert not fake.frozen
    assert [n for n, _ in fake.received] == [
        "guest-sync-delimited",  # connect
        "guest-fsfreeze-freeze",
        "guest-sync-delimited",  # the urgent thaw's sync, written with it in one write
        "guest-fsfreeze-thaw",
    ]
    assert fake.dropped_replies >= 3  # the client was gone: freeze, sync, thaw replies


async def test_urgent_thaw_returns_the_count(fake: FakeAgent, agent: GuestAgent) -> None:
    assert await agent.fsfreeze_freeze() == 2
    assert await agent.fsfreeze_thaw_urgent() == 2
    assert not fake.frozen
    assert not agent.needs_sync  # it read through its own sync reply
    assert await agent.fsfreeze_thaw_urgent() == 0  # a blind thaw is harmless
    await agent.ping()
    assert [n for n, _ in fake.received][-5:] == [
        "guest-sync-delimited",
        "guest-fsfreeze-thaw",
        "guest-sync-delimited",
        "guest-fsfreeze-thaw",
        "guest-ping",  # no re-sync needed before it
    ]


async def test_urgent_thaw_without_a_connection_connects(fake: FakeAgent) -> None:
    fake.frozen, fake.frozen_mounts = True, ["/"]
    ga = GuestAgent(fake.path, timeout=2)
    try:
        assert await ga.fsfreeze_thaw_urgent() == 1
        assert not fake.frozen
    finally:
        await ga.close()


async def test_urgent_thaw_after_cancelling_the_freeze(fake: FakeAgent, agent: GuestAgent) -> None:
    """The engine's way: cancel the freeze call and thaw at once, without awaiting the
    cancelled task first (it still holds the lock): the write must not wait for it."""
    fake.behave("guest-fsfreeze-freeze", delay=0.5, times=1)
    freeze = asyncio.create_task(agent.fsfreeze_freeze())
    await fake.wait_for("guest-fsfreeze-freeze")
    freeze.cancel()
    urgent = asyncio.create_task(agent.fsfreeze_thaw_urgent(timeout=2))
    await asyncio.sleep(0.1)
    assert not freeze.done() or freeze.cancelled()
    with within(2):
        assert await urgent == 2
    with pytest.raises(asyncio.CancelledError):
        await freeze
    assert not fake.frozen
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_urgent_thaw_after_none_the_channel_is_usable(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    fake.behave("guest-fsfreeze-freeze", delay=1.0, times=1)
    with pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=SHORT)
    with within(SHORT + SLACK):
        assert await agent.fsfreeze_thaw_urgent(timeout=SHORT) is None
    assert agent.needs_sync
    # the re-sync discards the late freeze reply and the urgent thaw's sync and thaw replies
    assert await agent.fsfreeze_status(timeout=3) is FsFreezeState.THAWED
    assert not agent.needs_sync
    assert await agent.fsfreeze_thaw() == 0
    assert await agent.fsfreeze_freeze() == 2
    assert await agent.fsfreeze_thaw() == 2
    assert fake.commands[-5:] == [
        "guest-fsfreeze-thaw",  # the urgent one, answered late
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]


async def test_urgent_thaw_hung_agent_returns_none(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-fsfreeze-freeze", hang=True)
    with within(SHORT + SLACK), pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=SHORT)
    with within(0.5 + SLACK):
        assert await agent.fsfreeze_thaw_urgent(timeout=0.5) is None
    # the agent comes back (the hung freeze had frozen after all): the queued thaw runs
    fake.frozen, fake.frozen_mounts = True, ["/", "/data"]
    fake.behave("guest-fsfreeze-freeze")
    fake.release()
    await fake.wait_for("guest-fsfreeze-thaw")
    assert not fake.frozen
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_urgent_thaw_peer_that_never_reads(tmp_path: Path) -> None:
    """A socket nobody ever reads (not even accepted): None within the budget, no hang."""
    path = str(tmp_path / "deaf.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(4)
    ga = GuestAgent(path, timeout=SHORT)
    try:
        with pytest.raises(AgentTimeoutError):
            await ga.connect()
        with within(SHORT + SLACK):
            assert await ga.fsfreeze_thaw_urgent() is None
        with within(SLACK):
            assert await GuestAgent(path, timeout=SHORT).fsfreeze_thaw_urgent() is None
    finally:
        await ga.close()
        s.close()


async def test_urgent_thaw_does_not_wait_for_a_stuck_call(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    fake.frozen, fake.frozen_mounts = True, ["/"]
    fake.behave("guest-ping", hang=True, times=1)
    stuck = asyncio.create_task(agent.ping(timeout=30))  # holds the lock
    try:
        await fake.wait_for("guest-ping")
        with within(SHORT + SLACK):
            assert await agent.fsfreeze_thaw_urgent(timeout=SHORT) is None
        fake.release()  # the ping never gets a reply; the queued thaw runs
        await fake.wait_for("guest-fsfreeze-thaw")
        assert not fake.frozen
    finally:
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_urgent_thaw_next_to_a_call_in_flight(fake: FakeAgent, agent: GuestAgent) -> None:
    """Written while another call waits for its reply: each gets its own reply."""
    assert await agent.fsfreeze_freeze() == 2
    fake.behave("guest-fsfreeze-status", delay=0.3, times=1)
    status = asyncio.create_task(agent.fsfreeze_status())
    await fake.wait_for("guest-fsfreeze-status")
    assert await agent.fsfreeze_thaw_urgent() == 2
    assert await status is FsFreezeState.FROZEN  # its own reply, sent before the thaw ran
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED


async def test_urgent_thaw_written_while_another_call_syncs(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    """The other call waits for its re-sync (queued behind a slow freeze) when the urgent
    bytes go out: its command then goes behind the thaw. It must read through the thaw's
    replies, not take them for its own, and leave them to the urgent caller."""
    fake.behave("guest-fsfreeze-freeze", delay=0.6, times=1)
    with pytest.raises(AgentTimeoutError):
        await agent.fsfreeze_freeze(timeout=SHORT)
    status = asyncio.create_task(agent.fsfreeze_status(timeout=3))
    await fake.wait_for("guest-sync-delimited", n=2)  # connect + the status call's re-sync
    assert await agent.fsfreeze_thaw_urgent(timeout=3) == 2
    assert await status is FsFreezeState.THAWED  # ran after the thaw, and says so
    assert fake.commands[-3:] == [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
        "guest-fsfreeze-status",
    ]
    assert not agent.needs_sync
    await agent.ping()


async def test_urgent_thaw_reconnects_when_the_stream_broke(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    fake.frozen, fake.frozen_mounts = True, ["/"]
    await fake.disconnect()
    assert await agent.fsfreeze_thaw_urgent() == 1
    assert fake.connections == 2
    assert not fake.frozen


async def test_urgent_thaw_no_agent_at_all_returns_none(tmp_path: Path) -> None:
    with within(SLACK):
        assert (
            await GuestAgent(str(tmp_path / "none.sock"), timeout=1).fsfreeze_thaw_urgent() is None
        )


async def test_urgent_thaw_error_reply(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-fsfreeze-thaw", error=("GenericError", "thaw failed"), times=1)
    with pytest.raises(AgentCommandError) as ei:
        await agent.fsfreeze_thaw_urgent()
    assert (ei.value.command, ei.value.qga_class) == ("guest-fsfreeze-thaw", "GenericError")
    assert agent.needs_sync
    assert agent.connected
    await agent.ping()


async def test_urgent_thaw_bad_reply_shape(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-fsfreeze-thaw", returns="two", times=1)
    with pytest.raises(AgentProtocolError, match="guest-fsfreeze-thaw"):
        await agent.fsfreeze_thaw_urgent()
    fake.behave("guest-fsfreeze-thaw", invalid_json=True, times=1)
    with pytest.raises(AgentProtocolError, match="not valid JSON"):
        await agent.fsfreeze_thaw_urgent()
    assert await agent.fsfreeze_thaw_urgent() == 0


# ---------------------------------------------------------------------------- hostile JSON


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,  # RecursionError inside json
        b'{"return": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"return": ' + b"9" * 10_000 + b"}",  # over the int digit limit: ValueError
        b'{"return": "\xfe\xfe"}',  # not UTF-8
        b"\x00\x01",
    ],
)
def test_decode_reply_hostile_input(line: bytes) -> None:
    with pytest.raises(AgentProtocolError, match="guest-ping: reply"):
        decode_reply(line, "guest-ping")


async def test_deeply_nested_reply_is_a_protocol_error(fake: FakeAgent, agent: GuestAgent) -> None:
    fake.behave("guest-info", raw=b'{"return": ' + b"[" * 200_000 + b"\n", times=1)
    with pytest.raises(AgentProtocolError, match="nested too deeply"):
        await agent.info()
    assert (await agent.info()).version == "7.2.22"


# ---------------------------------------------------------------------------- close


async def test_close_is_bounded_when_the_peer_stops_reading(tmp_path: Path) -> None:
    """A peer that answers the sync and then reads nothing: an 8 MiB command stays in our
    send buffer; close() must not wait for it forever."""
    path = str(tmp_path / "stuck.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readuntil(b"\n")
        sync_id = json.loads(line.lstrip(b"\xff"))["arguments"]["id"]
        writer.write(b'\xff{"return": %d}\n' % sync_id)
        await writer.drain()
        await asyncio.Event().wait()  # never reads again

    server = await asyncio.start_unix_server(serve, path=path, limit=1024)
    ga = GuestAgent(path, timeout=SHORT)
    try:
        await ga.connect()
        with pytest.raises(AgentTimeoutError):
            await ga.execute("guest-ping", {"pad": "x" * (8 << 20)})
        async with asyncio.timeout(10):  # fail, not hang, if close() is unbounded
            with within(1.0 + SLACK):
                await ga.close()
        assert not ga.connected
    finally:
        server.close()
        await server.wait_closed()


async def test_urgent_replies_survive_another_callers_resync(
    fake: FakeAgent, agent: GuestAgent
) -> None:
    """Urgent bytes written while a call is in flight; that call fails (so the next one
    re-syncs), and a third call queued on the lock before the urgent caller re-syncs over the
    urgent replies: it must keep them for the urgent caller, not discard them."""
    assert await agent.fsfreeze_freeze() == 2
    fake.behave("guest-ping", delay=0.3, error=("GenericError", "busy"), times=1)
    ping = asyncio.create_task(agent.ping())
    await fake.wait_for("guest-ping")
    status = asyncio.create_task(agent.fsfreeze_status())  # queued on the lock
    await asyncio.sleep(0)
    assert await agent.fsfreeze_thaw_urgent() == 2  # its own thaw's count
    with pytest.raises(AgentCommandError):
        await ping
    assert await status is FsFreezeState.THAWED
    assert fake.count("guest-fsfreeze-thaw") == 1  # not sent twice
