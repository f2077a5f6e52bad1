"""The agent client against the REAL qemu-ga, run on the host (no VM) on a unix socket.

qemu-ga's ``-m unix-listen`` mode speaks exactly what it speaks on a virtio-serial port, so this
checks the client's framing and reply narrowing against the real thing in well under a second.
On the host a freeze would freeze the HOST's filesystems: qemu-ga is started with the freeze
commands blocked (``-b``), the test checks they are disabled, and never calls them. Real-guest
freeze tests live with the engine and lab VM tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from freezeframe._tools import require
from freezeframe.agent import GuestAgent
from freezeframe.errors import AgentCommandError, AgentTimeoutError
from freezeframe.models import FsFreezeState

pytestmark = pytest.mark.integration

BLOCKED = "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw"


@pytest.fixture
def qemu_ga(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A host qemu-ga on ``tmp_path/qga.sock`` with freeze/thaw blocked; killed by PID."""
    exe = require("qemu-ga")
    sock = tmp_path / "qga.sock"
    state = tmp_path / "state"
    state.mkdir()
    log = (tmp_path / "qemu-ga.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            "-m",
            "unix-listen",
            "-p",
            str(sock),
            "-t",
            str(state),
            "-f",
            str(tmp_path / "qemu-ga.pid"),
            "-b",
            BLOCKED,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 5
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qemu-ga did not start: {(tmp_path / 'qemu-ga.log').read_text()}")
            time.sleep(0.02)
        yield str(sock), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture
async def agent(qemu_ga: tuple[str, subprocess.Popen[bytes]]) -> AsyncIterator[GuestAgent]:
    async with GuestAgent(qemu_ga[0], timeout=5, max_line=4096) as ga:
        yield ga


async def test_ping_info_status_fsinfo(agent: GuestAgent) -> None:
    await agent.ping()
    info = await agent.info()
    assert re.fullmatch(r"\d+\.\d+\.\d+", info.version)
    assert info.enabled("guest-exec")
    assert info.enabled("guest-get-fsinfo")
    # the safety net this test relies on: freeze is disabled on this host agent
    assert "guest-fsfreeze-freeze" in info.commands
    assert not info.enabled("guest-fsfreeze-freeze")
    assert not info.enabled("guest-fsfreeze-freeze-list")
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED
    fs = await agent.get_fsinfo()
    assert fs, "qemu-ga reported no filesystems on the host"
    for f in fs:
        assert f.mountpoint.startswith("/")
        assert f.fstype
    with pytest.raises(AgentCommandError) as ei:
        await agent.execute("guest-fsfreeze-freeze-list", {"mountpoints": ["/nonexistent"]})
    assert ei.value.qga_class == "CommandNotFound"  # blocked: refused before doing anything


async def test_file_read_binary_multi_chunk(agent: GuestAgent, tmp_path: Path) -> None:
    data = os.urandom(50_000)  # ~17 chunks at max_line=4096
    target = tmp_path / "blob"
    target.write_bytes(data)
    assert await agent.file_read(str(target)) == data
    with pytest.raises(AgentCommandError) as ei:
        await agent.file_read(str(tmp_path / "missing"))
    assert ei.value.command == "guest-file-open"


async def test_exec(agent: GuestAgent) -> None:
    res = await agent.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
    assert (res.exitcode, res.signal, res.stdout, res.stderr) == (3, None, b"out\n", b"err\n")
    res = await agent.exec("/bin/sh", ["-c", "kill -9 $$"])
    assert (res.exitcode, res.signal) == (None, 9)
    with pytest.raises(AgentCommandError):
        await agent.exec("/nonexistent/program")


async def test_exec_timeout_then_usable(agent: GuestAgent) -> None:
    with pytest.raises(AgentTimeoutError, match=r"pid \d+ still running") as ei:
        await agent.exec("/bin/sleep", ["30"], timeout=0.3)
    m = re.search(r"pid (\d+)", str(ei.value))
    assert m is not None
    pid = int(m.group(1))
    os.kill(pid, signal.SIGKILL)  # host agent: the "guest" pid is ours to clean up
    st = await agent.execute("guest-exec-status", {"pid": pid})
    for _ in range(50):
        if isinstance(st, dict) and st.get("exited"):
            break
        await asyncio.sleep(0.02)
        st = await agent.execute("guest-exec-status", {"pid": pid})
    assert isinstance(st, dict)
    assert st.get("signal") == 9


async def test_resync_after_a_stopped_agent(
    agent: GuestAgent, qemu_ga: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """SIGSTOP the agent: the call times out; after SIGCONT the late reply is discarded."""
    proc = qemu_ga[1]
    proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(AgentTimeoutError):
            await agent.get_fsinfo(timeout=0.3)
        assert time.monotonic() - start < 1.0
        assert agent.needs_sync
    finally:
        proc.send_signal(signal.SIGCONT)
    # the fsinfo reply now arrives late, then the sync reply; status must get "thawed"
    assert await agent.fsfreeze_status() is FsFreezeState.THAWED
    await agent.ping()


async def test_round_trip_numbers(agent: GuestAgent, qemu_ga: tuple[str, object]) -> None:
    times = []
    for _ in range(50):
        t = time.perf_counter()
        await agent.ping()
        times.append((time.perf_counter() - t) * 1000)
    await agent.close()  # qemu-ga serves one client at a time
    t = time.perf_counter()
    async with GuestAgent(qemu_ga[0], timeout=5) as other:
        await other.ping()
    connect_ms = (time.perf_counter() - t) * 1000
    print(
        f"host qemu-ga: ping median {statistics.median(times):.2f} ms, "
        f"max {max(times):.2f} ms; connect+sync+ping+close {connect_ms:.1f} ms"
    )
    assert statistics.median(times) < 50
