"""Fixtures for integration tests on real lab VMs.

- Every test session gets its own ``FREEZEFRAME_HOME`` (lab VMs, catalog): a directory under
  /var/tmp, mode 0755, that libvirt's QEMU account can reach (pytest's own temp directories are
  0700), removed at the end of the session. It shares the persistent build cache
  ``FREEZEFRAME_CACHE=<repo>/.state/cache`` (kept if the variable is already set), so the kernel
  and initramfs are built once per machine.
- ``lab_vm``: a factory that boots lab VMs (``await lab_vm(name, disks=..., agent=...,
  driver=...)``) and always stops and purges them at teardown, even when the test failed; a
  libvirt one (``driver="libvirt"``) brings up ``libvirtd`` and has its domain destroyed by
  name (``virsh destroy ff-lab-NAME``) in any case.
- ``@pytest.mark.integration`` tests are skipped only when QEMU itself is not installed.
- ``libvirtd`` (session): libvirtd and virtlogd running for the session, started by
  ``scripts/libvirtd.sh start`` when they are not; at the end of the session the script stops
  only what it started for this session (a state file of the session's own). Yields the
  connection URI; skips when libvirt is not installed here or the session is not root.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from freezeframe.catalog import Catalog
from freezeframe.errors import UsageError
from freezeframe.lab import LabVm, lab_down, lab_up
from freezeframe.lab._model import domain_name
from tests import shared_daemons
from tests.integration.ceph_helpers import CephHandle, ceph_lab_session
from tests.integration.libvirt_helpers import destroy_domain, private_home

REPO = Path(__file__).resolve().parents[2]
QEMU = Path("/usr/bin/qemu-system-x86_64")
LIBVIRT_PACKAGES = (
    "libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu python3-libvirt"
)
_names = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if QEMU.exists():
        return
    skip = pytest.mark.skip(reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def lab_env() -> Iterator[Path]:
    """A private FREEZEFRAME_HOME for the session, the shared persistent build cache."""
    with private_home("ffhome-", REPO / ".state/cache") as home:
        yield home


@pytest.fixture
async def catalog(lab_env: Path) -> AsyncIterator[Catalog]:
    """The session's catalog (in its private FREEZEFRAME_HOME), open for one test."""
    cat = await Catalog.open()
    try:
        yield cat
    finally:
        await cat.close()


@pytest.fixture(scope="session")
def ceph_lab(lab_env: Path, request: pytest.FixtureRequest) -> Iterator[CephHandle]:
    """The lab Ceph of the session (see tests/integration/ceph_helpers.py). Under xdist its
    tests are one group (tests/shared_daemons.py): a second worker asking for it fails."""
    worker = shared_daemons.worker_id(request.config)
    if worker is not None:
        factory = request.getfixturevalue("tmp_path_factory")
        owner = shared_daemons.claim(shared_daemons.run_dir(factory), "ceph", worker)
        if owner is not None:
            pytest.fail(f"the lab Ceph runs on worker {owner} already: its tests must share "
                        "one worker (run with --dist loadgroup)", pytrace=False)  # fmt: skip
    yield from ceph_lab_session()


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
        driver: str | None = None,
        rbd: bool | Sequence[int] = False,
    ) -> LabVm: ...


@pytest.fixture
async def lab_vm(lab_env: Path, request: pytest.FixtureRequest) -> AsyncIterator[LabVmFactory]:
    """Boot lab VMs for one test; every VM it started (or tried to) is purged afterwards."""
    started: list[str] = []
    domains: list[str] = []

    async def make(
        name: str | None = None,
        *,
        disks: Sequence[str] = ("ext4", "xfs"),
        agent: bool = True,
        disk_size: str = "256M",
        accel: str = "auto",
        timeout: float = 60.0,
        driver: str | None = None,
        rbd: bool | Sequence[int] = False,
    ) -> LabVm:
        # libvirt domain names are global to libvirtd: unique across concurrent sessions
        vm_name = name or f"vm{os.getpid() % 100000}-{next(_names)}"
        if driver == "libvirt":
            request.getfixturevalue("libvirtd")
            domains.append(domain_name(vm_name))
        started.append(vm_name)
        return await lab_up(
            vm_name,
            disks=tuple(disks),
            agent=agent,
            disk_size=disk_size,
            accel=accel,
            timeout=timeout,
            driver=driver,
            rbd=rbd,
        )

    try:
        yield make
    finally:
        for vm_name in reversed(started):
            # UsageError: never created (bad input) or already purged by the test
            with contextlib.suppress(UsageError):
                await lab_down(vm_name, purge=True)
        for domain in domains:  # even if lab down failed
            destroy_domain(domain)


@pytest.fixture(scope="session")
def libvirtd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``qemu:///system`` answering for the whole session (see the module's docstring).
    Under xdist the first worker that needs it runs ``scripts/libvirtd.sh start`` for the run
    and the controller stops what that started (tests/shared_daemons.py)."""
    missing = [p for p in ("libvirtd", "virtlogd", "virsh") if shutil.which(p) is None]
    if missing or importlib.util.find_spec("libvirt") is None:
        pytest.skip(f"libvirt is not installed here (apt-get install -y {LIBVIRT_PACKAGES})")
    if os.geteuid() != 0:
        pytest.skip("libvirt tests run as root (qemu:///system)")
    if shared_daemons.worker_id(request.config) is not None:
        run = shared_daemons.run_dir(tmp_path_factory)
        shared_daemons.start_once(run, "libvirtd", lambda: _start_libvirtd(run / "libvirtd.pids"))
        yield "qemu:///system"
        return
    state = _start_libvirtd(tmp_path_factory.mktemp("libvirtd") / "started.pids")["state"]
    try:
        yield "qemu:///system"
    finally:
        stopped = shared_daemons.libvirtd_script("stop", Path(state))
        if stopped.returncode != 0:
            warnings.warn(f"scripts/libvirtd.sh stop failed: {stopped.stderr}", stacklevel=1)


def _start_libvirtd(state: Path) -> dict[str, str]:
    """``scripts/libvirtd.sh start`` recording what it started in ``state``; fails the test
    if it fails."""
    started = shared_daemons.libvirtd_script("start", state)
    if started.returncode != 0:
        pytest.fail(f"scripts/libvirtd.sh start failed:\n{started.stderr}", pytrace=False)
    return {"state": str(state)}


async def kill_create_while_frozen(catalog: Catalog, vm: str, *extra: str) -> None:
    """Run ``freezeframe snapshot create VM --hold-frozen 60 EXTRA...`` as a process and
    SIGKILL it two seconds after its freeze intent appears (progress inside the freeze window
    is only printed after the thaw, so the write-ahead intent is what tells it is frozen)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "freezeframe.cli.main", "snapshot", "create", vm,
         "--hold-frozen", "60", *extra],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not await catalog.open_intents(vm):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
