"""QEMU for the lab: the command line, the accelerator probe, and stopping a lab QEMU by PID.

A lab QEMU is started with ``-daemonize`` and ``-pidfile``: it does not stay a child of the
process that ran ``lab up``. Before any signal is sent, ``/proc/PID/cmdline`` is checked to
still be that QEMU (a ``qemu-system-*`` program whose arguments name the VM's QMP socket), so
a recycled PID is never killed; a zombie counts as gone.

The lab's QMP clients get a logger of their own (see :class:`_QuietLog`): :mod:`qemu.qmp` logs
an error before raising it, and the lab reports (or translates) every such exception itself,
so those records show at DEBUG (``-v``) only, never as raw lines on a normal run.
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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from freezeframe._aio import within
from freezeframe._tools import require, run
from freezeframe.errors import LabError, ToolError
from freezeframe.lab._build import BootArtifacts
from freezeframe.lab._model import LabDisk
from freezeframe.models import GUEST_AGENT_PORT

__all__ = [
    "DISK_SLOT0",
    "MEMORY_MB",
    "PROBE_FILE",
    "PROBE_TIMEOUT",
    "SERIAL_SLOT",
    "choose_accel",
    "is_qemu",
    "kernel_cmdline",
    "kill_now",
    "proc_argv",
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
#: PCI slot of the virtio-serial controller carrying the guest agent's port.
SERIAL_SLOT = 0x04


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
            f"virtio-serial-pci,id=vser0,bus=pci.0,addr={SERIAL_SLOT:#x}",
            "-chardev",
            f"socket,id=qga0,path={_opt(qga_path)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}",
        ]
    for i, disk in enumerate(disks):
        if disk.rbd is not None:  # lab up --rbd: QEMU's rbd driver on the lab Ceph, auth none
            pool, image = disk.rbd.split("/", 1)
            spec = {"driver": "rbd", "node-name": disk.node, "pool": pool, "image": image,
                    "conf": disk.rbd_conf, "user": "admin"}  # fmt: skip
            argv += ["-blockdev", json.dumps(spec)]
        else:
            argv += [
                "-blockdev",
                f"driver=file,node-name={disk.node}-file,filename={_opt(disk.file)}",
                "-blockdev",
                f"driver={disk.format},node-name={disk.node},file={disk.node}-file",
            ]
        argv += [
            "-device",
            f"virtio-blk-pci,id={disk.device},drive={disk.node},serial={disk.serial},"
            f"bus=pci.0,addr={DISK_SLOT0 + i:#x}",
        ]
    if pidfile is not None:
        argv += ["-daemonize", "-pidfile", str(pidfile)]
    return argv


def proc_argv(pid: int) -> list[str] | None:
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


def is_qemu(argv: Sequence[str]) -> bool:
    """True if ``argv`` (of a live process) is a ``qemu-system-*`` program's."""
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system")


def qemu_alive(pid: int, qmp_path: Path | None) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``qmp_path`` (None: a VM
    without a QMP socket of the lab's, never)."""
    if pid <= 0 or qmp_path is None:
        return False
    argv = proc_argv(pid)
    if not argv or not is_qemu(argv):
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


class _QuietLog(logging.LoggerAdapter[logging.Logger]):
    """The logger of the lab's QMP clients: every record goes on at DEBUG, under the library's
    own logger name. Only our client instances get it; the ``qemu.qmp`` logger itself (other
    users of the library in the process) is left alone."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


def _why(exc: BaseException) -> str:
    """A non-empty description of ``exc`` (a TimeoutError's ``str`` is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_QMP_ERRORS = (QMPError, OSError, TimeoutError, EOFError)


@contextlib.asynccontextmanager
async def _qmp(qmp_path: Path, timeout: float) -> AsyncIterator[QMPClient]:
    """A QMP session on ``qmp_path``; raises LabError saying why one cannot be had."""
    client = QMPClient("fflab")
    # QMPClient only calls debug/info/warning/error/log on ``logger``, which an adapter has.
    client.logger = _QuietLog(client.logger, {})  # type: ignore[assignment]
    try:
        try:
            await within(client.connect(str(qmp_path)), timeout)
        except TimeoutError as exc:
            raise LabError(
                f"QEMU's QMP socket {qmp_path} did not greet within {timeout:g}s: another QMP "
                "client holds it (a snapshot of this VM in progress?)"
            ) from exc
        except _QMP_ERRORS as exc:
            raise LabError(f"cannot connect to QMP socket {qmp_path}: {_why(exc)}") from exc
        yield client
    finally:
        with contextlib.suppress(*_QMP_ERRORS):
            await within(client.disconnect(), timeout)


async def _qmp_execute(client: QMPClient, command: str, timeout: float) -> object:
    try:
        return await within(client.execute(command), timeout)
    except TimeoutError as exc:
        raise LabError(f"QMP {command}: no reply within {timeout:g}s") from exc
    except _QMP_ERRORS as exc:
        raise LabError(f"QMP {command} failed: {_why(exc)}") from exc


async def _qmp_quit(qmp_path: Path, timeout: float) -> None:
    async with _qmp(qmp_path, timeout) as client:
        await _qmp_execute(client, "quit", timeout)


async def query_tops(qmp_path: Path, timeout: float = 3.0) -> dict[str, str]:
    """Ask the running QEMU (``query-block``) which image is on top of each disk: a map from
    the file at the bottom of each chain (the disk's base image) to the top image's file.

    Raises LabError saying why QEMU cannot be asked (socket missing, no greeting within
    ``timeout``: another client holds the socket, no reply) or its reply is not what
    ``query-block`` returns.
    """
    async with _qmp(qmp_path, timeout) as client:
        blocks = await _qmp_execute(client, "query-block", timeout)
    if not isinstance(blocks, list):
        raise LabError(f"query-block returned {type(blocks).__name__}, not a list")
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
            raise LabError("query-block: an image without a file name")
        tops[bottom] = top
    return tops


async def _wait_gone_async(pid: int, qmp_path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while qemu_alive(pid, qmp_path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def stop_qemu(pid: int, qmp_path: Path, *, qmp: bool = True) -> str:
    """Stop the lab QEMU ``pid``: QMP ``quit`` (unless ``qmp`` is False, e.g. another client
    holds the socket), then SIGTERM, then SIGKILL.

    Returns how it ended (``gone``, ``quit``, ``sigterm``, ``sigkill``). Never signals a
    process that is not that QEMU any more. Does not raise.
    """
    if not qemu_alive(pid, qmp_path):
        return "gone"
    if qmp:
        try:
            await _qmp_quit(qmp_path, 3.0)
        except LabError as exc:
            log.info("lab: QMP quit failed (%s); signalling", exc.message)
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


#: Name of the KVM probe's cache file in the build cache.
PROBE_FILE = "accel-probe.json"


async def _kvm_works(artifacts: BootArtifacts, cache: Path) -> bool:
    """The (cached) result of the KVM probe; probes and caches it when there is none."""
    key = _probe_key(artifacts.kver)
    probe_file = cache / PROBE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(probe_file.read_text())
        if doc["key"] == key:
            log.info("lab: cached KVM probe: %s", "passed" if doc["kvm"] else "failed")
            return bool(doc["kvm"])
    kvm = await _probe_kvm(artifacts)
    with contextlib.suppress(OSError):
        tmp = probe_file.with_name(f".{probe_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "kvm": kvm, "at": time.time()}))
        os.replace(tmp, probe_file)
    return kvm


async def choose_accel(requested: str, artifacts: BootArtifacts, cache: Path) -> str:
    """``kvm`` or ``tcg`` for ``requested`` (``auto``, ``kvm``, ``tcg``).

    KVM is usable only if /dev/kvm opens and a throw-away guest boots under it within
    :data:`PROBE_TIMEOUT` (nested KVM here opens fine and then hangs silently). The probe's
    result is cached in ``cache/accel-probe.json`` per host kernel, QEMU binary and guest
    kernel. ``auto`` picks KVM when it is usable, else TCG; ``kvm`` probes too (once, cached).

    Raises LabError (exit 5) for ``kvm`` when KVM is not usable: the request is well formed
    (not a usage error), this host just cannot run it, and booting anyway would hang silently
    until the ready timeout. The hint suggests ``--accel auto`` or ``tcg``.
    """
    if requested == "tcg":
        return "tcg"
    hint = "use --accel auto (picks TCG here) or --accel tcg"
    if not _kvm_usable():
        if requested == "kvm":
            raise LabError("--accel kvm: /dev/kvm cannot be opened on this host", hint=hint)
        log.info("lab: /dev/kvm not usable; using TCG")
        return "tcg"
    if await _kvm_works(artifacts, cache):
        return "kvm"
    if requested == "kvm":
        raise LabError(
            "--accel kvm: KVM is not usable on this host: a test guest under KVM printed "
            f"nothing within {PROBE_TIMEOUT:g}s (nested KVM opens /dev/kvm, then hangs), "
            "so a lab VM would never become ready",
            hint=f"{hint}; delete {cache / PROBE_FILE} to probe again",
        )
    log.info("lab: KVM probe failed; using TCG")
    return "tcg"
