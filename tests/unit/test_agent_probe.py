"""Why there is no usable agent, as stable codes (``AgentProbe.code``), on the fakes: the engine
names the real reason instead of always saying "install qemu-guest-agent" (issue 12 item 6)."""

from __future__ import annotations

import pytest

from freezeframe.agent import Agent
from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, open_driver
from freezeframe.errors import AgentProtocolError, SnapshotFailedError
from freezeframe.hypervisor import HypervisorDriver
from freezeframe.models import QuiescePolicy, VmConfig
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


async def test_a_vm_paused_on_an_io_error_is_not_cut(host: FakeHost, catalog: Catalog) -> None:
    # Issue 12 item 6: with QEMU paused on ENOSPC (io-error), create still cut onto the full
    # filesystem under preferred. Refused before anything is prepared, under every policy.
    vm = host.add(FakeVm.simple("full"))
    await catalog.add_vm(vm.config())

    def io_error_driver(cfg: VmConfig) -> HypervisorDriver:
        driver = open_driver(cfg)

        async def run_state() -> str | None:
            return "io-error"

        driver.run_state = run_state  # type: ignore[method-assign]
        return driver

    snap = Snapshotter(catalog, driver_factory=io_error_driver)
    before = list(vm.ops)
    for policy in QuiescePolicy:
        with pytest.raises(SnapshotFailedError) as ei:
            await snap.snapshot("full", SnapshotRequest(quiesce=policy))
        assert ei.value.exit_code == 10
    assert "prepare" not in vm.ops[len(before) :]
    assert vm.guest is not None
    assert vm.guest.sent("guest-fsfreeze-freeze") == 0
