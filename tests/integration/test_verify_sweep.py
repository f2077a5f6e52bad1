"""A verify killed with SIGKILL leaves nothing behind for long: its helpers die with it
(``setpriv --pdeathsig``) and the next ``open_image`` -- or ``sweep_stale_workspaces``, which
``recover`` calls -- cleans its workspace: mounts, loop devices, the daemon, the check's
leftover children, the directory. A live owner's workspace is never touched."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.models import VerifyVerdict
from freezeframe.storage import sweep_stale_workspaces, verify_disks
from tests.integration.test_verify import (
    cleanup,
    disk,
    loop_devices,
    make_fs_image,
    pytestmark,
)

__all__ = ["pytestmark"]

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from freezeframe.models import SnapshotDisk
    from freezeframe.storage import verify_disks
    image, workdir = sys.argv[1:3]
    disk = SnapshotDisk(device="disk0", node="disk0", image=image, format="qcow2", overlay=None)
    asyncio.run(verify_disks([disk], user_checks=["sh -c 'sleep 30.25; true'"], workdir=workdir))
    """
)


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fs_image(tmp_path_factory.mktemp("img"), "ext4", "ext4", 64, frozen=True)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    w = tmp_path / "work"
    w.mkdir()
    before = loop_devices()
    yield w
    cleanup(w, before)  # only acts on what a failing test left


def mounts_under(path: Path) -> list[str]:
    """Mount points under ``path`` (/proc/self/mountinfo, field 5)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(str(path))]


def loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def alive(pid: int) -> bool:
    """Running (a zombie or a recycled pid does not count: its cmdline is empty)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def check_sleepers(workdir: Path) -> list[int]:
    """The check's ``sleep`` processes, found by their working directory under workdir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cmd.startswith(b"sleep\x0030.25") and cwd.startswith(str(workdir)):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("how", ["sweeper", "next open_image"])
async def test_killed_verify_is_cleaned_up(ext4_image: Path, work: Path, how: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ext4_image), str(work)])
    sleepers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (sleepers := check_sleepers(work)):
            assert child.poll() is None, "the verify ended before its check ran"
            assert time.monotonic() < deadline, "the check never started"
            await asyncio.sleep(0.1)
        (ws,) = work.glob("ff-verify-*")
        record = json.loads((ws / "owner.json").read_text())
        qsd = record["qsd_pid"]
        assert alive(qsd)
        assert f":{child.pid}:" in record["owner"]
        assert len(record["mounts"]) == 1
        assert mounts_under(work)
        assert loops_under(work)

        # a live owner's workspace is left alone
        assert await sweep_stale_workspaces(str(work)) == []
        assert alive(qsd)
        assert ws.exists()

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # PDEATHSIG: the daemon goes with its parent (the check's leader too); what it
        # leaves -- the stale FUSE mount, the loop device, the read-only mount and the
        # check's child sleeping in it -- waits for the sweeper
        deadline = time.monotonic() + 10
        while alive(qsd):
            assert time.monotonic() < deadline, "qemu-storage-daemon outlived its parent"
            await asyncio.sleep(0.05)
        assert mounts_under(work)
        assert loops_under(work)
        assert all(alive(pid) for pid in sleepers)

        if how == "sweeper":
            assert await sweep_stale_workspaces(str(work)) == [str(ws)]
        else:
            v = await verify_disks([disk(ext4_image)], workdir=str(work))
            assert v.verdict is VerifyVerdict.CONSISTENT
            assert await sweep_stale_workspaces(str(work)) == []
        assert mounts_under(work) == []
        assert loops_under(work) == []
        assert not any(alive(pid) for pid in sleepers)
        assert list(work.iterdir()) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in sleepers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
