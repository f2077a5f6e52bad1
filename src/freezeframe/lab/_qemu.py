"""QEMU for the lab: the command line, the accelerator probe, and stopping a lab QEMU by PID.

A lab QEMU is started with ``-daemonize`` and ``-pidfile``: it does not stay a child of the
process that ran ``lab up``. Before any signal is sent, ``/proc/PID/cmdline`` is checked to
still be that QEMU (a ``qemu-system-*`` program whose arguments name the VM's QMP socket), so
a recycled PID is never killed; a zombie counts as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from freezeframe._tools import require, run
from freezeframe.errors import ToolError
from freezeframe.lab._build import BootArtifacts
from freezeframe.lab._model import LabDisk
from freezeframe.models import GUEST_AGENT_PORT

__all__ = [
    "MEMORY_MB",
    "PROBE_TIMEOUT",
    "choose_accel",
    "kernel_cmdline",
    "kill_now",
    "qemu_alive",
    "qemu_argv",
    "query_tops",
    "stop_qemu",
]

log = logging.getLogger(__name__)

#: Guest memory (MiB); one vCPU.
MEMORY_MB = 256
#: Seconds a KVM guest gets to print the probe marker before KVM is declared unusable.
PROBE_TIMEOUT = 8.0
PROBE_MARKER = "FFLAB-PROBE-OK"
#: PCI slot of data disk 0 on the ``pc`` machine's bus ``pci.0`` (disk N is at 0x08 + N).
DISK_SLOT0 = 0x08


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def kernel_cmdline(fstypes: Sequence[str], *, agent: bool, workms: int = 50) -> str:
    """The kernel command line; the ``ff.*`` parameters are read by the guest init."""
    return (
        "console=ttyS0 quiet panic=-1 "
        f"ff.disks={','.join(fstypes)} ff.agent={1 if agent else 0} ff.workms={workms}"
    )


def qemu_argv(
    *,
    name: str,
    artifacts: BootArtifacts,
    accel: str,
    cmdline: str,
    console_log: Path,
    qmp_path: Path,
    qga_path: Path | None,
    disks: Sequence[LabDisk],
    pidfile: Path | None,
) -> list[str]:
    """The full QEMU command line of a lab VM (daemonized when ``pidfile`` is given)."""
    argv = [
        require("qemu-system-x86_64"),
        "-name",
        f"fflab-{name}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "pc",
        "-accel",
        accel,
        "-m",
        str(MEMORY_MB),
        "-smp",
        "1",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(artifacts.kernel),
        "-initrd",
        str(artifacts.initrd),
        "-append",
        cmdline,
        "-chardev",
        f"file,id=console,path={_opt(console_log)}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,path={_opt(qmp_path)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if accel == "tcg":
        argv += ["-cpu", "max"]  # never -cpu host
    if qga_path is not None:
        argv += [
            "-device",
            "virtio-serial-pci,id=vser0,bus=pci.0,addr=0x4",
            "-chardev",
            f"socket,id=qga0,path={_opt(qga_path)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}",
        ]
    for i, disk in enumerate(disks):
        argv += [
            "-blockdev",
            f"driver=file,node-name={disk.node}-file,filename={_opt(disk.file)}",
            "-blockdev",
            f"driver={disk.format},node-name={disk.node},file={disk.node}-file",
            "-device",
            f"virtio-blk-pci,id={disk.device},drive={disk.node},serial=ff{disk.device},"
            f"bus=pci.0,addr={DISK_SLOT0 + i:#x}",
        ]
    if pidfile is not None:
        argv += ["-daemonize", "-pidfile", str(pidfile)]
    return argv


def _proc_argv(pid: int) -> list[str] | None:
    """argv of a live (non-zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    if state in ("Z", "X", "x"):
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def qemu_alive(pid: int, qmp_path: Path) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``qmp_path``."""
    if pid <= 0:
        return False
    argv = _proc_argv(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    marker = f"path={_opt(qmp_path)},"
    return any(marker in arg for arg in argv)


def _wait_gone(pid: int, qmp_path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while qemu_alive(pid, qmp_path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_now(pid: int, qmp_path: Path) -> None:
    """SIGKILL the lab QEMU ``pid`` (if it still is one) and wait up to 10 s for it to go.

    Synchronous on purpose: used on failure and cancellation paths. Never raises.
    """
    if qemu_alive(pid, qmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, qmp_path, 10.0):
            log.error("lab: QEMU %d survived SIGKILL", pid)


async def _qmp_quit(qmp_path: Path, timeout: float) -> None:
    client = QMPClient("fflab")
    try:
        await asyncio.wait_for(client.connect(str(qmp_path)), timeout)
        await asyncio.wait_for(client.execute("quit"), timeout)
    finally:
        with contextlib.suppress(QMPError, OSError, TimeoutError, EOFError):
            await asyncio.wait_for(client.disconnect(), timeout)


async def query_tops(qmp_path: Path, timeout: float = 3.0) -> dict[str, str]:
    """Ask the running QEMU (``query-block``) which image is on top of each disk: a map from
    the file at the bottom of each chain (the disk's base image) to the top image's file.

    Raises QMPError, OSError, TimeoutError or EOFError when QEMU cannot be asked, ValueError
    when its reply is not what ``query-block`` returns.
    """
    client = QMPClient("fflab")
    try:
        await asyncio.wait_for(client.connect(str(qmp_path)), timeout)
        blocks = await asyncio.wait_for(client.execute("query-block"), timeout)
    finally:
        with contextlib.suppress(QMPError, OSError, TimeoutError, EOFError):
            await asyncio.wait_for(client.disconnect(), timeout)
    if not isinstance(blocks, list):
        raise ValueError(f"query-block returned {type(blocks).__name__}")
    tops: dict[str, str] = {}
    for block in blocks:
        inserted = block.get("inserted") if isinstance(block, dict) else None
        image = inserted.get("image") if isinstance(inserted, dict) else None
        if not isinstance(image, dict):
            continue
        top = image.get("filename")
        bottom = top
        below = image.get("backing-image")
        while isinstance(below, dict):
            bottom = below.get("filename")
            below = below.get("backing-image")
        if not isinstance(top, str) or not isinstance(bottom, str):
            raise ValueError("query-block: an image without a file name")
        tops[bottom] = top
    return tops


async def _wait_gone_async(pid: int, qmp_path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while qemu_alive(pid, qmp_path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def stop_qemu(pid: int, qmp_path: Path) -> str:
    """Stop the lab QEMU ``pid``: QMP ``quit``, then SIGTERM, then SIGKILL.

    Returns how it ended (``gone``, ``quit``, ``sigterm``, ``sigkill``). Never signals a
    process that is not that QEMU any more. Does not raise.
    """
    if not qemu_alive(pid, qmp_path):
        return "gone"
    try:
        await _qmp_quit(qmp_path, 3.0)
    except (QMPError, OSError, TimeoutError, EOFError) as exc:
        log.info("lab: QMP quit on %s failed (%s); signalling", qmp_path, exc)
    if await _wait_gone_async(pid, qmp_path, 5.0):
        return "quit"
    if qemu_alive(pid, qmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if await _wait_gone_async(pid, qmp_path, 5.0):
            return "sigterm"
    kill_now(pid, qmp_path)
    return "sigkill"


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def _probe_kvm(artifacts: BootArtifacts) -> bool:
    """Boot the lab kernel under KVM with ``ff.probe=1``; True if the marker shows in time."""
    with tempfile.TemporaryDirectory(prefix="fflab-probe-") as tmp:
        argv = qemu_argv(
            name="probe",
            artifacts=artifacts,
            accel="kvm",
            cmdline="console=ttyS0 quiet panic=-1 ff.probe=1",
            console_log=Path(tmp) / "console.log",
            qmp_path=Path(tmp) / "qmp.sock",
            qga_path=None,
            disks=(),
            pidfile=None,
        )
        started = time.monotonic()
        try:
            res = await run(*argv, timeout=PROBE_TIMEOUT, check=False, what="KVM probe")
        except ToolError as exc:
            log.info("lab: KVM probe: %s", exc)
            return False
        console = (Path(tmp) / "console.log").read_text(errors="replace")
        ok = res.returncode == 0 and PROBE_MARKER in console
        log.info(
            "lab: KVM probe %s in %.1fs", "passed" if ok else "failed", time.monotonic() - started
        )
        return ok


def _probe_key(kver: str) -> str:
    qemu = Path(require("qemu-system-x86_64")).stat()
    return f"{os.uname().release}|{qemu.st_size}|{qemu.st_mtime_ns}|{kver}"


async def choose_accel(requested: str, artifacts: BootArtifacts, cache: Path) -> str:
    """``kvm`` or ``tcg`` for ``requested`` (``auto``, ``kvm``, ``tcg``).

    ``auto`` uses KVM only if /dev/kvm opens and a throw-away guest boots under it within
    :data:`PROBE_TIMEOUT` (nested KVM here opens fine and then hangs silently). The probe's
    result is cached in ``cache/accel-probe.json`` per host kernel, QEMU binary and guest
    kernel. Does not raise.
    """
    if requested != "auto":
        return requested
    if not _kvm_usable():
        log.info("lab: /dev/kvm not usable; using TCG")
        return "tcg"
    key = _probe_key(artifacts.kver)
    probe_file = cache / "accel-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(probe_file.read_text())
        if doc["key"] == key:
            accel = "kvm" if doc["kvm"] else "tcg"
            log.info("lab: accelerator %s (cached KVM probe)", accel)
            return accel
    kvm = await _probe_kvm(artifacts)
    with contextlib.suppress(OSError):
        tmp = probe_file.with_name(f".{probe_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "kvm": kvm, "at": time.time()}))
        os.replace(tmp, probe_file)
    accel = "kvm" if kvm else "tcg"
    log.info("lab: accelerator %s (KVM probe %s)", accel, "passed" if kvm else "failed")
    return accel
