"""Fixtures for integration tests on real lab VMs.

- Every test session gets its own ``FREEZEFRAME_HOME`` (a temp directory: lab VMs, catalog)
  but shares the persistent build cache ``FREEZEFRAME_CACHE=<repo>/.state/cache`` (kept if the
  variable is already set), so the kernel and initramfs are built once per machine.
- ``lab_vm``: a factory that boots lab VMs (``await lab_vm(name, disks=..., agent=...)``) and
  always stops and purges them at teardown, even when the test failed.
- ``@pytest.mark.integration`` tests are skipped only when QEMU itself is not installed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from freezeframe.errors import UsageError
from freezeframe.lab import LabVm, lab_down, lab_up

REPO = Path(__file__).resolve().parents[2]
QEMU = Path("/usr/bin/qemu-system-x86_64")
_names = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if QEMU.exists():
        return
    skip = pytest.mark.skip(reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private FREEZEFRAME_HOME for the session, the shared persistent build cache."""
    home = tmp_path_factory.mktemp("ffhome")
    mp = pytest.MonkeyPatch()
    mp.setenv("FREEZEFRAME_HOME", str(home))
    mp.setenv(
        "FREEZEFRAME_CACHE", os.environ.get("FREEZEFRAME_CACHE") or str(REPO / ".state/cache")
    )
    try:
        yield home
    finally:
        mp.undo()


class LabVmFactory(Protocol):
    """``await lab_vm(name=None, *, disks=("ext4", "xfs"), agent=True, ...)`` -> LabVm."""

    async def __call__(
        self,
        name: str | None = None,
        *,
        disks: Sequence[str] = ("ext4", "xfs"),
        agent: bool = True,
        disk_size: str = "256M",
        accel: str = "auto",
        timeout: float = 60.0,
    ) -> LabVm: ...


@pytest.fixture
async def lab_vm(lab_env: Path) -> AsyncIterator[LabVmFactory]:
    """Boot lab VMs for one test; every VM it started (or tried to) is purged afterwards."""
    started: list[str] = []

    async def make(
        name: str | None = None,
        *,
        disks: Sequence[str] = ("ext4", "xfs"),
        agent: bool = True,
        disk_size: str = "256M",
        accel: str = "auto",
        timeout: float = 60.0,
    ) -> LabVm:
        vm_name = name or f"vm{os.getpid() % 1000}-{next(_names)}"
        started.append(vm_name)
        return await lab_up(
            vm_name,
            disks=tuple(disks),
            agent=agent,
            disk_size=disk_size,
            accel=accel,
            timeout=timeout,
        )

    try:
        yield make
    finally:
        for vm_name in reversed(started):
            # UsageError: never created (bad input) or already purged by the test
            with contextlib.suppress(UsageError):
                await lab_down(vm_name, purge=True)
