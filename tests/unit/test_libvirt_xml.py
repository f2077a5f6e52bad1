"""The libvirt driver's pure parts: domain XML (a Nova-shaped domain), policy metadata, agent
addresses, the <domainsnapshot> it sends. No libvirtd needed (python3-libvirt must import)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

libvirt_mod = pytest.importorskip("freezeframe.hypervisor.libvirt")
libvirt: Any = pytest.importorskip("libvirt")

from freezeframe.errors import UsageError  # noqa: E402
from freezeframe.hypervisor import driver_for_address, open_agent  # noqa: E402
from freezeframe.hypervisor.base import PreparedCut, PreparedDisk  # noqa: E402
from freezeframe.models import DiskInfo, PciAddress, QuiescePolicy  # noqa: E402

NOVA_XML = """
<domain type='kvm' id='7'>
  <name>instance-0000002a</name>
  <uuid>0b7e2c3a-1111-4222-8333-944455556666</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:name>web1</nova:name>
    </nova:instance>
    <ff:policy xmlns:ff="https://freezeframe.dev/xmlns/policy/1" quiesce="required"
               agent="yes" freeze-timeout="7.5"/>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/nova/instances/0b7e/disk' index='3'/>
      <backingStore type='file' index='4'>
        <format type='raw'/>
        <source file='/var/lib/nova/instances/_base/6f1d2e'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/nova/instances/0b7e/disk.eph0' index='2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/sdc' index='1'/>
      <target dev='vdc' bus='virtio'/>
      <serial>8e1c0a6e-volume</serial>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='volumes/volume-1'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/nova/instances/0b7e/disk.config'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <source mode='bind'
              path='/var/lib/libvirt/qemu/channel/target/domain-7/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
</domain>
"""


def test_nova_domain_disks_and_channel() -> None:
    disks, channel = libvirt_mod.parse_domain_xml(NOVA_XML)
    assert [d.device for d in disks] == ["vda", "vdb", "vdc", "vdd"]  # no cdrom
    vda = disks[0]
    assert vda.file == "/var/lib/nova/instances/0b7e/disk"
    assert vda.format == "qcow2"
    assert vda.node == "libvirt-3-format"
    assert vda.backing == ("/var/lib/nova/instances/_base/6f1d2e",)
    assert vda.pci == PciAddress(0, 0, 4, 0)
    assert disks[1].file.endswith("disk.eph0")
    assert disks[2].file == "/dev/sdc"
    assert disks[2].serial == "8e1c0a6e-volume"
    assert disks[3].file == "rbd:volumes/volume-1"
    assert channel is not None


def test_network_and_block_disks_cannot_be_cut_but_nova_files_can(tmp_path: object) -> None:
    drv = libvirt_mod.LibvirtDriver("instance-0000002a")
    disks, _ = libvirt_mod.parse_domain_xml(NOVA_XML)
    by = {d.device: d for d in disks}
    assert drv.cut_problem(by["vdd"]) is not None  # rbd
    assert drv.cut_problem(by["vdc"]) is not None  # block device (or missing dir)


def test_nova_disk_names_get_distinct_overlays() -> None:
    drv = libvirt_mod.LibvirtDriver("x")
    disks, _ = libvirt_mod.parse_domain_xml(NOVA_XML)
    prepared = drv.prepared_for("abc123", disks[:2])
    files = [p.overlay_file for p in prepared.disks]
    assert len(set(files)) == 2, files


def test_policy_from_metadata() -> None:
    pol = libvirt_mod.parse_policy(NOVA_XML)
    assert pol is not None
    assert pol.quiesce is QuiescePolicy.REQUIRED
    assert pol.agent is True
    assert pol.freeze_timeout == 7.5
    assert libvirt_mod.parse_policy("<domain><metadata/></domain>") is None


def test_bad_policy_is_bad_input() -> None:
    bad = NOVA_XML.replace('quiesce="required"', 'quiesce="sometimes"')
    with pytest.raises(UsageError):
        libvirt_mod.parse_policy(bad)


def test_agent_addresses_round_trip_and_pick_the_driver() -> None:
    uuid = "0b7e2c3a-1111-4222-8333-944455556666"
    addr = libvirt_mod.agent_address(uuid, "qemu+ssh://host/system")
    assert libvirt_mod.parse_agent_address(addr) == (uuid, "qemu+ssh://host/system")
    assert driver_for_address(addr) == "libvirt"
    assert driver_for_address("/run/vm/qga.sock") == "qmp"
    agent = open_agent(addr, timeout=2)
    assert isinstance(agent, libvirt_mod.LibvirtAgent)
    assert agent.address == addr
    with pytest.raises(UsageError):
        libvirt_mod.parse_agent_address("libvirt:not-a-uuid@qemu:///system")


def test_snapshot_xml_switches_prepared_disks_and_leaves_others() -> None:
    drv = libvirt_mod.LibvirtDriver("x")
    d = DiskInfo("vda", "libvirt-3-format", "/i/disk", "qcow2", 1 << 30)
    cut = PreparedCut("abc", (PreparedDisk(d, "/i/disk.ff-abc.qcow2", "vda", "/i/disk"),))
    root = ET.fromstring(drv.snapshot_xml(cut, ["vdb"]))
    disks = {e.get("name"): e for e in root.iter("disk")}
    assert disks["vda"].get("snapshot") == "external"
    src = disks["vda"].find("source")
    assert src is not None
    assert src.get("file") == "/i/disk.ff-abc.qcow2"
    assert disks["vdb"].get("snapshot") == "no"


def _lv_error(code: int, message: str) -> Exception:
    import libvirt

    exc: Exception = libvirt.libvirtError(message)
    # What libvirt-python reads get_error_code()/get_error_message() from.
    exc.err = (code, 0, message, 2, None, None, None, 0, 0)  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("code_name", "message", "want"),
    [
        ("VIR_ERR_ARGUMENT_UNSUPPORTED", "QEMU guest agent is not configured", "Unavailable"),
        ("VIR_ERR_AGENT_UNRESPONSIVE", "QEMU guest agent is not connected", "Unavailable"),
        ("VIR_ERR_AGENT_UNRESPONSIVE", "Guest agent not available for now", "Timeout"),
        ("VIR_ERR_OPERATION_TIMEOUT", "timed out", "Timeout"),
        ("VIR_ERR_OPERATION_INVALID", "domain is not running", "Unavailable"),
        ("VIR_ERR_AGENT_UNSYNCED", "unsynced", "Protocol"),
        (
            "VIR_ERR_INTERNAL_ERROR",
            "unable to execute QEMU agent command 'guest-fsfreeze-freeze': failed",
            "Command",
        ),
    ],
)
def test_libvirt_agent_errors_become_agent_errors(code_name: str, message: str, want: str) -> None:
    import libvirt

    from freezeframe import errors

    err = libvirt_mod._agent_error(_lv_error(getattr(libvirt, code_name), message), "x")
    assert type(err) is getattr(errors, f"Agent{want}Error")


def test_libvirt_driver_errors_become_hypervisor_errors() -> None:
    import libvirt

    from freezeframe.errors import HypervisorError, HypervisorUnavailableError

    gone = libvirt_mod._hypervisor_error(_lv_error(libvirt.VIR_ERR_NO_DOMAIN, "no domain"), "x")
    assert type(gone) is HypervisorUnavailableError
    other = libvirt_mod._hypervisor_error(_lv_error(libvirt.VIR_ERR_INTERNAL_ERROR, "boom"), "x")
    assert type(other) is HypervisorError


def _gone() -> Exception:
    """libvirt's error for a domain that does not exist (any more)."""
    exc: Exception = libvirt.libvirtError("Domain not found")
    exc.get_error_code = lambda: libvirt.VIR_ERR_NO_DOMAIN  # type: ignore[attr-defined]
    return exc


class _Dom:
    def __init__(self, name: str, gone: bool = False) -> None:
        self._name, self._gone = name, gone

    def name(self) -> str:
        if self._gone:
            raise _gone()
        return self._name

    def UUIDString(self) -> str:
        return "00000000-0000-0000-0000-00000000000" + str(len(self._name))

    def isActive(self) -> int:
        return 1

    def XMLDesc(self, _flags: int) -> str:
        return f"<domain><name>{self._name}</name><devices/></domain>"


class _Conn:
    def listAllDomains(self, _flags: int) -> list[_Dom]:
        return [_Dom("a"), _Dom("vanished", gone=True), _Dom("bb")]

    def close(self) -> None:
        pass


async def test_a_domain_that_vanishes_while_listed_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a busy host a transient domain can stop between listAllDomains and its reading."""
    from freezeframe.hypervisor import libvirt as lv

    monkeypatch.setattr(lv, "_open", lambda _uri: _Conn())
    assert [d.name for d in await lv.list_domains("qemu:///test")] == ["a", "bb"]
