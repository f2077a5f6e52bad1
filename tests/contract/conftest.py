"""Fixtures of the driver contract suite: ``rig`` (one per driver, see :mod:`.rigs`), a fresh
catalog per test, lab VMs shared by a module (``lab_pool``), a private ``FREEZEFRAME_HOME``.

Real-VM rigs are ``@pytest.mark.integration`` and skipped when QEMU is not installed or the
suite does not run as root (the lab needs loop devices and KVM/TCG QEMU of its own).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from tests.contract.rigs import RIG_PARAMS, RIGS, LabPool, Rig
from tests.integration.conftest import libvirtd  # noqa: F401 (the session fixture)
from tests.integration.libvirt_helpers import private_home

REPO = Path(__file__).resolve().parents[2]
QEMU = Path("/usr/bin/qemu-system-x86_64")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = None
    if not QEMU.exists():
        why = f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    elif os.geteuid() != 0:
        why = "real-VM rigs need root (the lab VM)"
    if why is None:
        return
    for item in items:
        if item.path.is_relative_to(HERE) and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session", autouse=True)
def contract_env() -> Iterator[Path]:
    """A private FREEZEFRAME_HOME for the session (0755 under /var/tmp: libvirt's QEMU must
    reach the lab's images), the shared persistent lab build cache."""
    with private_home("ffcontract-", REPO / ".state/cache") as home:
        yield home


@pytest.fixture(scope="module")
def lab_pool() -> Iterator[LabPool]:
    """Lab VMs shared by the tests of one module (booted on first use, purged at the end)."""
    pool = LabPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=RIG_PARAMS)
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig of one driver, with a fresh catalog."""
    cls = RIGS[request.param]
    if cls.driver == "libvirt":
        request.getfixturevalue("libvirtd")
    pool = request.getfixturevalue("lab_pool") if cls.needs_lab else None
    catalog = await Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        rig = cls(catalog, pool)
        await rig.start()
        try:
            yield rig
        finally:
            await rig.stop()
    finally:
        await catalog.close()
