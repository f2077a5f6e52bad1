"""``recover`` against a fake agent on a real socket and a real SQLite catalog.

Recovering takes the VM's snapshot lock: a thaw must never land inside the freeze window of a
snapshot that a live process is taking right now.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.fakes.fake_agent import FakeAgent, FakeFs

from freezeframe.catalog import Catalog, make_owner
from freezeframe.engine import recover
from freezeframe.errors import NotFoundError
from freezeframe.models import VmConfig

FS = [FakeFs("/", "ext4"), FakeFs("/data", "xfs")]


def _dead_owner() -> str:
    """An owner string of a process of this host that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeAgent]:
    async with FakeAgent(tmp_path / "qga.sock", fs=FS) as f:
        f.frozen = True  # as a killed snapshot left it
        yield f


@pytest.fixture
async def cat(tmp_path: Path) -> AsyncIterator[Catalog]:
    catalog = await Catalog.open(f"sqlite:///{tmp_path / 'cat.sqlite'}")
    try:
        yield catalog
    finally:
        await catalog.close()


async def test_dead_owners_intent_is_thawed_and_the_lock_left_free(
    fake: FakeAgent, cat: Catalog
) -> None:
    dead = _dead_owner()
    intent = await cat.open_intent("web", "snap-1", fake.path, dead)
    await cat.acquire_vm_lock("web", dead)  # the dead snapshot's lock is still there
    out = await recover(cat)
    assert [(o.intent_id, o.thawed, o.skipped) for o in out] == [(intent.id, True, False)]
    assert not fake.frozen
    assert await cat.open_intents() == []
    await cat.acquire_vm_lock("web", make_owner())  # recover released what it took over


async def test_vm_locked_by_a_live_snapshot_is_left_alone_unless_forced(
    fake: FakeAgent, cat: Catalog
) -> None:
    await cat.open_intent("web", "snap-1", fake.path, _dead_owner())
    live = f"{socket.gethostname()}:{os.getpid()}:0ther0wn"  # alive: this process
    await cat.acquire_vm_lock("web", live)  # a new snapshot of "web" is running right now
    out = await recover(cat)
    assert [(o.thawed, o.skipped) for o in out] == [(False, True)]
    assert "in progress" in out[0].detail
    assert out[0].code == "skipped"
    assert "forcing thaws anyway" in out[0].detail  # neutral: each face names its force
    assert fake.frozen, "a thaw inside another snapshot's freeze window"
    assert not [c for c, _ in fake.received if c == "guest-fsfreeze-thaw"]
    assert len(await cat.open_intents()) == 1

    out = await recover(cat, force=True)
    assert [(o.thawed, o.skipped) for o in out] == [(True, False)]
    assert not fake.frozen
    await cat.release_vm_lock("web", live)  # still the live owner's lock


async def test_live_intent_skips_the_whole_vm(fake: FakeAgent, cat: Catalog) -> None:
    await cat.open_intent("web", "snap-old", fake.path, _dead_owner())
    await cat.open_intent("web", "snap-new", fake.path, make_owner())  # alive: this process
    out = await recover(cat)
    assert [(o.snapshot_id, o.skipped) for o in out] == [("snap-old", True), ("snap-new", True)]
    assert "live process" in out[0].detail
    assert fake.frozen


async def test_unknown_vm_is_refused(cat: Catalog) -> None:
    with pytest.raises(NotFoundError):
        await recover(cat, "nope")


async def test_intent_of_a_vm_that_is_not_running_is_closed(tmp_path: Path, cat: Catalog) -> None:
    # QEMU is gone: neither the agent's nor QMP's socket exists; nothing can be frozen.
    await cat.add_vm(VmConfig(name="gone", qmp_path=str(tmp_path / "qmp.sock")))
    await cat.open_intent("gone", "snap-1", str(tmp_path / "qga.sock"), _dead_owner())
    (out,) = await recover(cat)
    assert (out.thawed, out.failed) == (True, False)
    assert "not running" in out.detail
    assert await cat.open_intents() == []


async def test_unreachable_agent_of_a_running_vm_keeps_the_intent(
    tmp_path: Path, cat: Catalog
) -> None:
    # The VM's control socket answers (someone listens): the guest may well be frozen.
    qmp = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qmp))
    listener.listen()
    try:
        await cat.add_vm(VmConfig(name="alive", qmp_path=str(qmp)))
        await cat.open_intent("alive", "snap-1", str(tmp_path / "qga.sock"), _dead_owner())
        (out,) = await recover(cat, timeout=1.0)
        assert out.failed
        assert len(await cat.open_intents()) == 1
    finally:
        listener.close()


async def test_forced_recover_blocked_by_a_live_owner_says_to_stop_it(
    tmp_path: Path, cat: Catalog
) -> None:
    # A hung snapshot process still holds the agent's only connection: --force cannot get in.
    live = f"{socket.gethostname()}:{os.getpid()}:hung"
    await cat.open_intent("web", "s1", str(tmp_path / "busy-qga.sock"), live)
    (out,) = await recover(cat, force=True, timeout=0.5)
    assert out.failed
    assert "still alive" in out.detail
    assert "stop that process" in out.detail
