"""The libvirt side of the lab without libvirtd: the domain XML, the traversal check, the
record and registration of a libvirt lab VM."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from freezeframe.errors import LabError, UsageError
from freezeframe.lab import _libvirt, _qemu
from freezeframe.lab._model import (
    GUEST_AGENT_LOG,
    LabDisk,
    LabVm,
    domain_name,
    libvirt_agent_address,
    validate_driver,
)
from freezeframe.models import QuiescePolicy, VmConfig

UUID = "8a3c5a1e-1b8e-4d7e-9d1f-2a6c0e7b1a01"
URI = "qemu:///system"


def _disk(vmdir: Path, i: int, fstype: str) -> LabDisk:
    return LabDisk(
        device=f"disk{i}",
        node=f"disk{i}",
        file=vmdir / f"disk{i}.ff-abc.qcow2",
        format="qcow2",
        fstype=fstype,
        mountpoint=f"/mnt/disk{i}",
        base=vmdir / f"disk{i}.qcow2",
    )


def _vm(vmdir: Path, *, agent: bool = True) -> LabVm:
    return LabVm(
        name="web",
        pid=42,
        running=True,
        qmp_path=None,
        qga_path=vmdir / "qga.sock" if agent else None,
        console_log=vmdir / "console.log",
        accel="tcg",
        disks=(_disk(vmdir, 0, "ext4"), _disk(vmdir, 1, "xfs")),
        driver="libvirt",
        domain=UUID,
        connect_uri=URI,
    )


def _xml(vmdir: Path, *, agent: bool = True, accel: str = "tcg") -> ET.Element:
    vm = _vm(vmdir, agent=agent)
    text = _libvirt.domain_xml(
        name=vm.name,
        uuid=UUID,
        vmdir=vmdir,
        accel=accel,
        kernel=vmdir / "kernel",
        initrd=vmdir / "initrd",
        cmdline=_qemu.kernel_cmdline(["ext4", "xfs"], agent=agent),
        console_log=vm.console_log,
        qga_path=vm.qga_path,
        disks=vm.disks,
    )
    return ET.fromstring(text)


def test_domain_xml_boots_what_the_qmp_lab_boots(tmp_path: Path) -> None:
    dom = _xml(tmp_path)
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "ff-lab-web" == domain_name("web")
    assert dom.findtext("uuid") == UUID
    lab = dom.find(f"metadata/{{{_libvirt.NAMESPACE}}}lab")
    assert lab is not None
    assert (lab.get("name"), lab.get("dir")) == ("web", str(tmp_path))
    assert dom.findtext("memory") == str(_qemu.MEMORY_MB)
    assert dom.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert dom.findtext("vcpu") == "1"
    assert dom.findtext("os/kernel") == str(tmp_path / "kernel")
    assert dom.findtext("os/initrd") == str(tmp_path / "initrd")
    assert dom.findtext("os/cmdline") == _qemu.kernel_cmdline(["ext4", "xfs"], agent=True)
    assert dom.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    disks = dom.findall("devices/disk")
    got = [
        (
            d.find("target").get("dev"),  # type: ignore[union-attr]
            d.find("source").get("file"),  # type: ignore[union-attr]
            d.find("driver").get("type"),  # type: ignore[union-attr]
            d.find("driver").get("cache"),  # type: ignore[union-attr]
            d.findtext("serial"),
            d.find("address").get("slot"),  # type: ignore[union-attr]
        )
        for d in disks
    ]
    assert got == [
        ("vda", str(tmp_path / "disk0.ff-abc.qcow2"), "qcow2", "none", "ffdisk0", "0x08"),
        ("vdb", str(tmp_path / "disk1.ff-abc.qcow2"), "qcow2", "none", "ffdisk1", "0x09"),
    ]
    channel = dom.find("devices/channel")
    assert channel is not None
    assert channel.get("type") == "unix"
    assert channel.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "bind",
        "path": str(tmp_path / "qga.sock"),
    }
    assert channel.find("target").attrib == {  # type: ignore[union-attr]
        "type": "virtio",
        "name": "org.qemu.guest_agent.0",
    }
    serial = dom.find("devices/serial")
    assert serial is not None
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == str(tmp_path / "console.log")  # type: ignore[union-attr]


def test_domain_xml_without_agent_and_under_kvm(tmp_path: Path) -> None:
    dom = _xml(tmp_path, agent=False, accel="kvm")
    assert dom.get("type") == "kvm"
    assert dom.find("cpu") is None  # never host-passthrough: -cpu host aborts here
    assert dom.find("devices/channel") is None
    assert dom.find("devices/controller[@type='virtio-serial']") is None


@pytest.fixture
def qemu_account(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's QEMU account is an ordinary user (uid 64055, group 64055) in these tests."""
    monkeypatch.setattr(
        _libvirt, "qemu_account", lambda: ("libvirt-qemu:libvirt-qemu", 64055, frozenset({64055}))
    )


def test_check_traversable_names_the_first_closed_directory(qemu_account: None) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:  # /tmp/pytest-of-root is 0700
        base = Path(tmp)
        base.chmod(0o755)
        closed = base / "closed"
        closed.mkdir()
        closed.chmod(0o750)
        inner = closed / "lab" / "web"
        inner.mkdir(parents=True)
        with pytest.raises(LabError) as info:
            _libvirt.check_traversable(inner)
        assert info.value.message.startswith(f"{closed} is not traversable by libvirt-qemu")
        assert f"chmod o+x {closed}" in (info.value.hint or "")
        os.chown(closed, 0, 64055)  # its group may traverse it
        _libvirt.check_traversable(inner)
        _libvirt.check_traversable(base / "not" / "there" / "yet")  # made 0755 later


def test_qemu_account_from_qemu_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# user = "nobody"\nuser = "+0"\ngroup = "+0"\n')
    monkeypatch.setattr(_libvirt, "_QEMU_CONF", conf)
    assert _libvirt.qemu_account() == ("+0:+0", 0, frozenset({0}))
    conf.write_text('user = "no-such-user-here"\n')
    assert _libvirt.qemu_account() is None  # libvirt would not start a domain either


def test_libvirt_record_and_registration(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    doc = vm.to_json()
    assert doc["driver"] == "libvirt"
    assert doc["domain_name"] == "ff-lab-web"
    assert doc["qmp_path"] is None
    assert LabVm.from_json(doc, running=True) == vm
    assert vm.vm_config() == VmConfig(
        name="web",
        driver="libvirt",
        connect_uri=URI,
        domain=UUID,
        agent=True,
        quiesce=QuiescePolicy.PREFERRED,
        agent_log_path=GUEST_AGENT_LOG,
        lab=True,
    )
    assert vm.agent_address == f"libvirt:{UUID}@{URI}"
    assert _vm(tmp_path, agent=False).agent_address is None
    assert _vm(tmp_path, agent=False).vm_config().agent is False
    with pytest.raises(ValueError, match="domain UUID"):
        LabVm.from_json({**doc, "domain": None}, running=False)


def test_old_records_are_qmp_lab_vms(tmp_path: Path) -> None:
    doc = _vm(tmp_path).to_json()
    for key in ("driver", "domain", "domain_name", "connect_uri"):
        del doc[key]
    doc["qmp_path"] = str(tmp_path / "qmp.sock")
    vm = LabVm.from_json(doc, running=False)
    assert (vm.driver, vm.domain_name, vm.agent_address) == ("qmp", None, str(vm.qga_path))
    assert vm.vm_config().qmp_path == str(tmp_path / "qmp.sock")


def test_the_agent_address_is_the_drivers() -> None:
    if importlib.util.find_spec("libvirt") is None:
        pytest.skip("python3-libvirt is not installed")
    from freezeframe.hypervisor.libvirt import agent_address

    assert libvirt_agent_address(UUID, URI) == agent_address(UUID, URI)


def test_validate_driver() -> None:
    assert validate_driver(None) is None
    assert validate_driver("libvirt") == "libvirt"
    with pytest.raises(UsageError, match="xen"):
        validate_driver("xen")
