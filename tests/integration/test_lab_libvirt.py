"""``lab up --libvirt``: the lab guest as a transient libvirt domain on a real libvirtd.

Each test gets a ``FREEZEFRAME_HOME`` that libvirt's QEMU account can traverse (pytest's own
temp directories are 0700); every lab VM in it is purged at teardown and its domain destroyed
by name (``virsh destroy ff-lab-NAME``), also when the test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from freezeframe.catalog import Catalog
from freezeframe.errors import LabError
from freezeframe.hypervisor import open_agent
from freezeframe.lab import lab_down, lab_status, lab_up
from freezeframe.lab._libvirt import NAMESPACE
from freezeframe.lab._model import GUEST_AGENT_LOG, domain_name, libvirt_agent_address
from freezeframe.models import QuiescePolicy, VmConfig
from tests.integration.libvirt_helpers import (
    LIBVIRT_URI,
    destroy_domain,
    domblklist,
    traversable_tmpdir,
    virsh,
)

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

FF = [sys.executable, "-m", "freezeframe.cli.main"]
#: libvirt's domain start can take over a minute on a loaded host (capability probing).
BOOT_TIMEOUT = "180"
_names = itertools.count()


def _name() -> str:
    """A lab VM name no other test session on this libvirtd uses (domain names are global)."""
    return f"lv{os.getpid() % 100000}-{next(_names)}"


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FF, *args], capture_output=True, text=True, timeout=300, check=False)


def running_domains() -> list[str]:
    return virsh("list", "--name").split()


@pytest.fixture
async def libvirt_home(libvirtd: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    home = traversable_tmpdir("ff-lablv-")
    monkeypatch.setenv("FREEZEFRAME_HOME", str(home))
    try:
        yield home
    finally:
        labdir = home / "lab"
        names = sorted(p.name for p in labdir.glob("[!.]*") if p.is_dir())
        for name in names:
            with contextlib.suppress(Exception):
                await lab_down(name, purge=True)
            destroy_domain(domain_name(name))
        shutil.rmtree(home, ignore_errors=True)


async def _guest_sh(uuid: str, script: str) -> bytes:
    async with open_agent(libvirt_agent_address(uuid, LIBVIRT_URI), timeout=30) as agent:
        res = await agent.exec("/bin/sh", ["-c", script])
    assert res.exitcode == 0, res
    return res.stdout


async def test_up_snapshot_down_and_up_again_on_the_same_disks(libvirt_home: Path) -> None:
    name = _name()
    dom = domain_name(name)
    vmdir = libvirt_home / "lab" / name

    up = ff("lab", "up", name, "--libvirt", "--disks", "ext4,xfs", "--timeout", BOOT_TIMEOUT,
            "--json")  # fmt: skip
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)
    uuid = doc["domain"]
    assert (doc["driver"], doc["domain_name"], doc["connect_uri"]) == ("libvirt", dom, LIBVIRT_URI)
    assert doc["qmp_path"] is None
    assert doc["qga_path"] == str(vmdir / "qga.sock")
    assert stat.S_IMODE(vmdir.stat().st_mode) == 0o755
    assert dom in running_domains()
    assert virsh("domuuid", dom).strip() == uuid
    assert domblklist(dom) == {"vda": str(vmdir / "disk0.qcow2"), "vdb": str(vmdir / "disk1.qcow2")}
    live = virsh("dumpxml", dom)
    assert f'<fflab:lab xmlns:fflab="{NAMESPACE}"' in live
    assert "org.qemu.guest_agent.0" in live
    async with await Catalog.open() as cat:
        assert await cat.get_vm(name) == VmConfig(
            name=name,
            driver="libvirt",
            connect_uri=LIBVIRT_URI,
            domain=uuid,
            agent=True,
            quiesce=QuiescePolicy.PREFERRED,
            agent_log_path=GUEST_AGENT_LOG,
            lab=True,
        )
    status = json.loads(ff("lab", "status", name, "--json").stdout)
    assert (status["running"], status["driver"], status["pid"]) == (True, "libvirt", doc["pid"])
    assert f"{name} " in ff("lab", "list").stdout

    # The agent answers through libvirt; a snapshot (libvirt driver) moves both disks to overlays.
    await _guest_sh(uuid, "echo before-snapshot > /mnt/disk0/marker0 && sync")
    snap = ff("snapshot", "create", name, "--quiesce", "required", "--json")
    assert snap.returncode == 0, snap.stderr
    tops = domblklist(dom)
    assert set(tops) == {"vda", "vdb"}
    for target, base in (("vda", "disk0.qcow2"), ("vdb", "disk1.qcow2")):
        assert Path(tops[target]).parent == vmdir
        assert Path(tops[target]).name != base
    # Written after the snapshot, not synced: lab down's flush must save it into the overlay.
    await _guest_sh(uuid, "echo after-snapshot > /mnt/disk0/marker1")

    down = ff("lab", "down", name)
    assert down.returncode == 0, down.stderr
    assert dom not in virsh("list", "--all", "--name").split()  # transient: gone
    record = json.loads((vmdir / "vm.json").read_text())
    assert record["tops"] == {"disk0": tops["vda"], "disk1": tops["vdb"]}
    assert json.loads(ff("lab", "status", name, "--json").stdout)["running"] is False

    again = ff("lab", "up", name, "--timeout", BOOT_TIMEOUT, "--json")  # as it was built
    assert again.returncode == 0, again.stderr
    doc2 = json.loads(again.stdout)
    assert (doc2["driver"], doc2["domain"]) == ("libvirt", uuid)
    assert [d["file"] for d in doc2["disks"]] == [tops["vda"], tops["vdb"]]
    assert domblklist(dom) == tops
    assert await _guest_sh(uuid, "cat /mnt/disk0/marker0 /mnt/disk0/marker1") == (
        b"before-snapshot\nafter-snapshot\n"
    )
    other = ff("lab", "up", name, "--qmp")
    assert other.returncode == 2  # running and registered: as for the QMP lab

    purge = ff("lab", "down", name, "--purge", "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout)["snapshots_removed"] == 1
    assert dom not in virsh("list", "--all", "--name").split()
    assert not vmdir.exists()


async def test_a_domain_without_its_record_is_found_by_name(
    libvirt_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _name()
    dom = domain_name(name)
    vm = await lab_up(name, disks=("ext4",), agent=False, driver="libvirt", timeout=180)
    assert (vm.running, vm.driver, vm.qga_path) == (True, "libvirt", None)
    assert "org.qemu.guest_agent.0" not in virsh("dumpxml", dom)
    assert lab_status(name).pid == vm.pid > 0
    adopted = await lab_up(name, agent=False, adopt=True)  # running: taken as it runs
    assert adopted.pid == vm.pid

    # Another FREEZEFRAME_HOME with a lab VM of the same name: refused, the domain untouched.
    other = traversable_tmpdir("ff-lablv-other-")
    try:
        monkeypatch.setenv("FREEZEFRAME_HOME", str(other))
        with pytest.raises(LabError, match="is not this VM's"):
            await lab_up(name, agent=False, driver="libvirt")
        assert not (other / "lab" / name).exists()
    finally:
        monkeypatch.setenv("FREEZEFRAME_HOME", str(libvirt_home))
        shutil.rmtree(other, ignore_errors=True)
    assert dom in running_domains()

    # The record is lost (a lab up killed before it wrote one): lab up refuses, naming the
    # domain; lab down finds the domain by its name and metadata and stops it.
    (libvirt_home / "lab" / name / "vm.json").unlink()
    with pytest.raises(LabError, match=f"libvirt domain {dom}") as info:
        await lab_up(name, agent=False, driver="libvirt")
    assert "runs without a record" in info.value.message
    await lab_down(name)
    assert dom not in virsh("list", "--all", "--name").split()


def test_a_killed_lab_up_leaves_a_domain_the_next_lab_up_registers(libvirt_home: Path) -> None:
    name = _name()
    dom = domain_name(name)
    cmd = [*FF, "lab", "up", name, "--libvirt", "--no-agent", "--disks", "ext4", "--timeout",
           BOOT_TIMEOUT]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while dom not in running_domains():  # killed once its domain runs, before it is ready
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the domain never ran"
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    again = ff("lab", "up", name)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr
    assert "registered it" in again.stderr
    vms = json.loads(ff("vm", "list", "--json").stdout)
    assert [(v["name"], v["driver"]) for v in vms] == [(name, "libvirt")]
    down = ff("lab", "down", name)
    assert down.returncode == 0, down.stderr
    assert dom not in running_domains()


async def test_a_directory_libvirt_cannot_traverse_is_refused(
    libvirtd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = traversable_tmpdir("ff-lablv-perm-")
    name = _name()
    try:
        private = base / "private"
        private.mkdir(mode=0o700)
        private.chmod(0o700)
        monkeypatch.setenv("FREEZEFRAME_HOME", str(private / "home"))
        with pytest.raises(LabError) as info:
            await lab_up(name, disks=("ext4",), agent=False, driver="libvirt")
        assert f"{private} is not traversable by" in info.value.message
        assert "chmod o+x" in (info.value.hint or "")
        assert not (private / "home" / "lab" / name).exists()  # nothing built or booted
        assert domain_name(name) not in running_domains()
    finally:
        shutil.rmtree(base, ignore_errors=True)
