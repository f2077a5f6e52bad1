"""Why there is no usable agent, as stable codes (``AgentProbe.code``), on the fakes: the engine
names the real reason instead of always saying "install qemu-guest-agent" (issue 12 item 6)."""

from __future__ import annotations

import pytest

from freezeframe.agent import Agent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, open_driver
from freezeframe.errors import AgentProtocolError, SnapshotFailedError
from freezeframe.hypervisor import HypervisorDriver
from freezeframe.models import QuiescePolicy
from freezeframe.testing import FakeHost, FakeVm


def _garbling(driver: HypervisorDriver, address: str, timeout: float) -> Agent:
    """The VM's own fake agent, except that its connect meets a protocol violation."""
    agent = driver.agent_at(address, timeout=timeout)

    async def connect(timeout: float | None = None) -> None:
        raise AgentProtocolError("guest-sync-delimited: invalid JSON")

    agent.connect = connect  # type: ignore[method-assign]
    return agent


async def _probe(catalog: Catalog, snap: Snapshotter, name: str) -> str | None:
    cfg = await catalog.get_vm(name)
    async with open_driver(cfg) as driver:
        return (await snap.probe_agent(cfg, driver)).code


async def test_codes_for_each_reason(host: FakeHost, catalog: Catalog) -> None:
    for vm in (FakeVm.simple("ok"), FakeVm.simple("nochan", agent_channel=False)):
        host.add(vm)
        await catalog.add_vm(vm.config())
    snap = Snapshotter(catalog, ping_timeout=0.5)
    assert await _probe(catalog, snap, "ok") is None
    assert await _probe(catalog, snap, "nochan") == "no-channel"
    garbled = Snapshotter(catalog, ping_timeout=0.5, agent_factory=_garbling)
    assert await _probe(catalog, garbled, "ok") == "agent-protocol"
    with pytest.raises(SnapshotFailedError) as ei:
        await garbled.snapshot("ok", SnapshotRequest(quiesce=QuiescePolicy.REQUIRED))
    assert ei.value.hint is not None
