"""A libvirt domain shaped like the ones Nova defines, on a real libvirtd, with the real guest.

The domain carries ``<metadata>`` with a ``nova:instance`` element; its instance disk is
``<instances>/<uuid>/disk``, a qcow2 backed by a raw image in ``<instances>/_base``; a second
volume is attached with a ``<serial>``; a config-drive cdrom; ``cache='none'``. (The lab guest
finds its data disks by serial, so the instance disk carries one too, which Nova's root disk
does not: nothing freezeframe does depends on it.)

What it must show: registered with ``vm add --libvirt``, a ``--quiesce required`` snapshot of
it is filesystem-consistent and verifies, the overlays are named after Nova's file names
(``disk.ff-ID.qcow2`` in the instance directory), libvirt's live XML names them, the cdrom is
left alone, and the domain's log has no ``custom-monitor`` taint. Then the lifecycle under
libvirt: ``snapshot restore --yes`` shuts the domain down, redefines its disks onto new
overlays of the snapshot's images and starts it (the guest's agent answers again); the later
snapshot, now on the abandoned branch, is deleted (its leaf image removed); the restored
snapshot is deleted by a live active commit (``virDomainBlockCommit``, pivot): the domain
writes to Nova's ``disk`` again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.lab._build import ensure_artifacts
from freezeframe.lab._disks import make_disk
from tests.integration.libvirt_helpers import (
    LIBVIRT_URI,
    destroy_domain,
    domain_log,
    domblklist,
    traversable_tmpdir,
    virsh,
)

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]
FF = [sys.executable, "-m", "freezeframe.cli.main"]


def ff(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FF, *args], capture_output=True, text=True, check=check, timeout=300)


def nova_xml(name: str, inst: Path, vol: Path, cdrom: Path, kernel: Path, initrd: Path) -> str:
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{inst.name}</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="26.0.0"/>
      <nova:name>web1</nova:name>
      <nova:flavor name="m1.tiny"><nova:memory>512</nova:memory></nova:flavor>
    </nova:instance>
  </metadata>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 ff.disks=ext4,xfs ff.agent=1 ff.workms=50</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model>qemu64</model></cpu>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{inst}/disk'/>
      <target dev='vda' bus='virtio'/>
      <serial>ffdisk0</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{vol}'/>
      <target dev='vdb' bus='virtio'/>
      <serial>ffdisk1</serial>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{cdrom}'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <serial type='file'><source path='{inst}/console.log'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{inst}/qga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture
def nova_domain(libvirtd: str, lab_env: Path) -> Iterator[tuple[str, Path]]:
    """A running Nova-shaped (persistent) domain: (domain name, instance directory)."""
    import asyncio

    root = traversable_tmpdir("ffnova-")
    inst = root / "instances" / str(uuid.uuid4())
    base = root / "instances" / "_base"
    inst.mkdir(parents=True)
    base.mkdir()
    for d in (root, root / "instances", inst, base):
        d.chmod(0o755)
    art = asyncio.run(ensure_artifacts())

    async def disks() -> None:
        q = base / "q.qcow2"
        await make_disk(q, "ext4", 256 << 20, "root")
        raw = base / "6f1d2e8a9b0c"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(q), str(raw)], check=True)
        q.unlink()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw",
             str(inst / "disk")],
            check=True,
        )  # fmt: skip
        await make_disk(root / "volume-1", "xfs", 320 << 20, "vol")

    asyncio.run(disks())
    cdrom = inst / "disk.config"
    cdrom.write_bytes(b"\0" * (1 << 20))
    name = f"instance-{uuid.uuid4().hex[:8]}"
    xml = root / "domain.xml"
    xml.write_text(nova_xml(name, inst, root / "volume-1", cdrom, art.kernel, art.initrd))
    # persistent, as Nova's domains are (a restore redefines it)
    for verb, arg in (("define", str(xml)), ("start", name)):
        subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, verb, arg], check=True, capture_output=True,
            timeout=300,
        )  # fmt: skip
    try:
        yield name, inst
    finally:
        destroy_domain(name)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_nova_shaped_domain(nova_domain: tuple[str, Path]) -> None:
    name, inst = nova_domain
    vm = f"nova-{name}"
    # `vm import` registers every running domain under its own name, agent from its channel.
    imported = json.loads(ff("--json", "vm", "import", "--libvirt").stdout)
    mine = next(r for r in imported if r["domain"] == name)
    assert mine["action"] == "added"
    assert mine["vm"]["agent"] is True
    assert mine["vm"]["driver"] == "libvirt"
    again = json.loads(ff("--json", "vm", "import", "--libvirt").stdout)
    assert next(r for r in again if r["domain"] == name)["action"] == "exists"
    # `vm add --libvirt` by name (with the agent's log as evidence), resolved to the UUID.
    ff("vm", "add", vm, "--libvirt", name, "--agent-log", "/var/log/qemu-ga.log")
    listed = json.loads(ff("--json", "vm", "list").stdout)
    mine = next(v for v in listed if v["name"] == vm)
    assert mine["driver"] == "libvirt"
    assert mine["domain"] == inst.name  # the domain's UUID
    bad = ff("--json", "vm", "add", "nope", "--libvirt", "no-such-domain", check=False)
    assert bad.returncode == 7, bad.stdout
    assert json.loads(bad.stdout)["error"] == "HypervisorUnavailableError"
    # The guest needs a few seconds to boot and start its agent: doctor until it answers.

    deadline = time.monotonic() + 120
    while True:
        doc = json.loads(ff("--json", "doctor", vm, check=False).stdout)
        if doc.get("predicted_level") == "filesystem" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert doc["predicted_level"] == "filesystem", doc
    names = {c["name"]: c["status"] for c in doc["checks"]}
    assert names["libvirt"] == "pass"
    assert names["agent channel"] == "pass"
    assert names["libvirt taint"] == "warn"  # says which calls taint custom-ga-command
    res = ff("--json", "snapshot", "create", vm, "--quiesce", "required", "--verify", check=False)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["level"] == "filesystem"
    assert rec["verification"]["verdict"] == "verified-consistent"
    devices = sorted(d["device"] for d in rec["disks"])
    assert devices == ["vda", "vdb"]  # the cdrom is not a disk to cut
    vda = next(d for d in rec["disks"] if d["device"] == "vda")
    assert vda["image"] == str(inst / "disk")
    assert vda["overlay"] == str(inst / f"disk.ff-{rec['id']}.qcow2")
    live = domblklist(name)
    assert live["vda"] == vda["overlay"]
    assert live["vdb"] == next(d["overlay"] for d in rec["disks"] if d["device"] == "vdb")
    assert "custom-monitor" not in domain_log(name)
    # The raw base in _base is still the bottom of the chain, untouched.
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", "--backing-chain", vda["overlay"]],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info[-1]["format"] == "raw"
    assert "/_base/" in info[-1]["filename"]

    # -- the lifecycle under libvirt: restore (shutdown, redefine, start), deletes
    later = json.loads(ff("--json", "snapshot", "create", vm, "--quiesce", "required").stdout)
    out = json.loads(
        ff("--json", "snapshot", "restore", rec["id"], "--yes", "--stop-timeout", "5").stdout
    )
    assert (out["state"], out["vm"]) == ("restarted", vm), out
    boot = {d["device"]: d for d in out["disks"]}
    assert boot["vda"]["image"] == str(inst / "disk")
    assert Path(boot["vda"]["boot_from"]).parent == inst  # next to Nova's files
    live = domblklist(name)
    assert live["vda"] == boot["vda"]["boot_from"]
    assert live["vdb"] == boot["vdb"]["boot_from"]
    persistent = virsh("dumpxml", "--inactive", name)
    assert boot["vda"]["boot_from"] in persistent  # redefined, not only running on it
    deadline = time.monotonic() + 120
    while True:  # the guest boots on the restored disks
        doc = json.loads(ff("--json", "doctor", vm, check=False).stdout)
        if doc.get("predicted_level") == "filesystem" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert doc["predicted_level"] == "filesystem", doc
    gone = json.loads(ff("--json", "snapshot", "delete", later["id"]).stdout)
    assert {d["how"] for d in gone["disks"]} == {"removed"}  # a leaf of the old branch
    merged = json.loads(ff("--json", "snapshot", "delete", rec["id"]).stdout)
    vda_merge = next(d for d in merged["disks"] if d["device"] == "vda")
    assert (vda_merge["how"], vda_merge["writes_to"]) == ("live", str(inst / "disk"))
    assert domblklist(name)["vda"] == str(inst / "disk")
