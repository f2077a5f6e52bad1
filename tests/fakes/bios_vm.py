"""A BIOS-only QEMU for tests: real block layer and QMP, no guest kernel.

The VM sits in its BIOS, which is enough for every block operation (overlays, transactions),
and has a second QMP monitor (``watch``) the test drives independently of the code under test
(a QMP socket serves one client at a time). Disks: ``disk0`` (16 MiB) at PCI slot 5 with serial
``ffdisk0``, ``disk1`` (32 MiB) at slot 6; optionally an agent port whose chardev is a unix
socket at ``<dir>/qga.sock`` (``agent=True``), which a FakeAgent can be put behind instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from freezeframe.models import PciAddress

__all__ = ["QEMU_AGENT_PORT", "QEMU_EXTRAS", "Vm", "bios_vm", "chain", "pci", "qemu_img"]


QEMU_AGENT_PORT = (
    "-device virtio-serial-pci,addr=0x9",
    "-chardev socket,id=qga0,path={dir}/qga.sock,server=on,wait=off",
    "-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
)
#: Disks the driver must skip, a SCSI disk (PCI address = its controller's) and an agent port
#: whose chardev is not a unix socket.
QEMU_EXTRAS = (
    "-blockdev driver=file,filename={dir}/ro.qcow2,node-name=ro-file,read-only=on",
    "-blockdev driver=qcow2,file=ro-file,node-name=ro,read-only=on",
    "-device virtio-blk-pci,id=ro,drive=ro,addr=0x7",
    "-blockdev driver=file,filename={dir}/cd.raw,node-name=cd,read-only=on",
    "-device ide-cd,drive=cd,id=cd0",
    "-drive if=none,id=cdempty,media=cdrom",
    "-device ide-cd,drive=cdempty,id=cd1",
    "-blockdev driver=file,filename={dir}/d3.qcow2,node-name=disk3-file",
    "-blockdev driver=qcow2,file=disk3-file,node-name=disk3",
    "-device virtio-scsi-pci,id=scsi0,addr=0x8",
    "-device scsi-hd,drive=disk3,id=disk3,bus=scsi0.0,serial=ffdisk3",
    "-device virtio-serial-pci,addr=0x9",
    "-chardev null,id=qganull",
    "-device virtserialport,chardev=qganull,name=org.qemu.guest_agent.0",
)


@dataclass
class Vm:
    proc: asyncio.subprocess.Process
    dir: Path
    qmp: str  # the driver's socket
    watch: QMPClient  # the test's own monitor

    async def query(self, command: str, args: dict[str, object] | None = None) -> object:
        return await asyncio.wait_for(self.watch.execute(command, args), 10)

    async def tops(self) -> dict[str, dict[str, object]]:
        """qdev id -> query-block ``inserted`` of every drive that has a medium."""
        out: dict[str, dict[str, object]] = {}
        blocks = await self.query("query-block")
        assert isinstance(blocks, list)
        for b in blocks:
            if "inserted" in b:
                out[b["qdev"].split("/")[3]] = b["inserted"]
        return out

    async def node_names(self) -> set[str]:
        nodes = await self.query("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        return {n["node-name"] for n in nodes}


def pci(slot: int) -> PciAddress:
    return PciAddress(0, 0, slot, 0)


def qemu_img(*args: str) -> str:
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def chain(image: str) -> list[str]:
    info = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", image))
    return [entry["filename"] for entry in info]


@contextlib.asynccontextmanager
async def bios_vm(*, agent: bool, extras: bool = False) -> AsyncIterator[Vm]:
    tmp = Path(tempfile.mkdtemp(prefix="ffqmp-", dir="/tmp"))  # short: unix socket paths
    qemu_img("create", "-q", "-f", "qcow2", str(tmp / "d0.qcow2"), "16M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp / "d1.qcow2"), "32M")
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64",
        "-qmp", f"unix:{tmp}/qmp.sock,server=on,wait=off",
        "-qmp", f"unix:{tmp}/watch.sock,server=on,wait=off",
    ]  # fmt: skip
    opts = [
        f"-blockdev driver=file,filename={tmp}/d0.qcow2,node-name=disk0-file",
        "-blockdev driver=qcow2,file=disk0-file,node-name=disk0",
        "-device virtio-blk-pci,id=disk0,drive=disk0,serial=ffdisk0,addr=0x5",
        f"-blockdev driver=file,filename={tmp}/d1.qcow2,node-name=disk1-file",
        "-blockdev driver=qcow2,file=disk1-file,node-name=disk1",
        "-device virtio-blk-pci,id=disk1,drive=disk1,addr=0x6",
    ]
    if agent:
        opts += QEMU_AGENT_PORT
    if extras:
        qemu_img("create", "-q", "-f", "qcow2", str(tmp / "ro.qcow2"), "8M")
        qemu_img("create", "-q", "-f", "raw", str(tmp / "cd.raw"), "1M")
        qemu_img("create", "-q", "-f", "qcow2", str(tmp / "d3.qcow2"), "8M")
        opts += QEMU_EXTRAS
    for opt in opts:
        flag, _, value = opt.partition(" ")
        argv += [flag, value.format(dir=tmp)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    watch = QMPClient("watch")
    try:
        deadline = time.monotonic() + 15
        while not (tmp / "watch.sock").exists():
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"qemu exited {proc.returncode}: {err.decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu did not create its QMP sockets")
            await asyncio.sleep(0.02)
        # The socket file appears at bind(), before listen(): refused until QEMU listens.
        while True:
            try:
                await asyncio.wait_for(watch.connect(str(tmp / "watch.sock")), 10)
                break
            except ConnectError:
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield Vm(proc, tmp, str(tmp / "qmp.sock"), watch)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watch.disconnect(), 5)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
