"""Lab VM lifecycle: ``lab_up``, ``lab_down``, ``lab_list``, ``lab_status``.

A lab VM lives in ``<lab dir>/NAME/``: ``vm.json`` (the :class:`LabVm` record), ``qemu.pid``,
``qmp.sock``, ``qga.sock``, ``console.log``, the base images ``diskN.qcow2`` and the overlays
snapshots put on top of them (``diskN.ff-<id>.qcow2``). Operations on one name are serialised
by a lock file in ``<lab dir>/.locks/``.

``lab_down`` (without purge) keeps the disks: it first flushes the guest (with an agent:
the workload is stopped, then ``sync``, bounded by :data:`FLUSH_TIMEOUT`), so nothing the guest
wrote is lost with its page cache; then it records in ``vm.json`` (key ``tops``) which image is
on top of each disk, and the next ``lab_up`` of that name boots every disk from the top of its
chain (see :mod:`freezeframe.lab._chain`), never from an image a snapshot recorded as its image
at the cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from freezeframe import paths
from freezeframe._aio import shielded
from freezeframe._tools import run
from freezeframe.agent import GuestAgent
from freezeframe.errors import (
    AgentError,
    AlreadyExistsError,
    FreezeframeError,
    LabError,
    NotFoundError,
)
from freezeframe.lab import _build, _chain, _disks, _qemu
from freezeframe.lab._model import (
    LabDisk,
    LabVm,
    parse_size,
    validate_accel,
    validate_fstypes,
    validate_name,
    validate_timeout,
)
from freezeframe.lab._util import atomic_write, console_tail, file_lock

__all__ = ["lab_down", "lab_list", "lab_status", "lab_up"]

log = logging.getLogger(__name__)

READY_MARKER = "FFLAB-READY"
ERROR_MARKER = "fflab: ERROR"
_RECORD = "vm.json"
_TOPS = "tops"
_DEFAULT_DISKS = ("ext4", "xfs")
_DEFAULT_SIZE = "256M"
_SOCKET_MAX = 107  # sun_path is 108 bytes with the terminating NUL
#: Seconds ``lab_down`` gives the guest to stop its workload and ``sync`` before QEMU quits.
FLUSH_TIMEOUT = 5.0
# Stops (SIGSTOP) the guest's workload, ``/bin/sh /etc/fflab/ffwork ...``, so it writes
# nothing after the sync, then syncs. "ff[w]ork" keeps this script's own command line (and
# the subshells it forks) from matching.
_FLUSH_SCRIPT = (
    "for p in /proc/[0-9]*; do "
    '[ "${p#/proc/}" = "$$" ] && continue; '
    'case "$(tr "\\0" " " < "$p/cmdline" 2>/dev/null)" in '
    '*/etc/fflab/ff[w]ork*) kill -STOP "${p#/proc/}" ;; esac; '
    "done; sync"
)
#: Resumes what :data:`_FLUSH_SCRIPT` stopped.
_RESUME_SCRIPT = _FLUSH_SCRIPT.replace("kill -STOP", "kill -CONT").replace("; sync", "")


def _vm_dir(name: str) -> Path:
    return paths.lab_dir() / name


def _lock(name: str) -> contextlib.AbstractAsyncContextManager[None]:
    return file_lock(paths.lab_dir() / ".locks" / name, timeout=300, what=f"lab VM {name}")


def _read_record(name: str) -> LabVm | None:
    """The recorded VM (``running`` checked against /proc), or None if there is no record."""
    try:
        doc = json.loads((_vm_dir(name) / _RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"lab VM {name}: unreadable {_RECORD}: {exc}") from exc
    try:
        pid = int(doc["pid"])
        running = _qemu.qemu_alive(pid, Path(doc["qmp_path"]))
        return LabVm.from_json(doc, running=running)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabError(f"lab VM {name}: malformed {_RECORD}: {exc}") from exc


def _read_tops(name: str) -> dict[str, str] | None:
    """What ``lab_down`` recorded on top of each device, or None (no clean stop recorded)."""
    try:
        doc = json.loads((_vm_dir(name) / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    tops = doc.get(_TOPS) if isinstance(doc, dict) else None
    if not isinstance(tops, dict) or not all(isinstance(v, str) for v in tops.values()):
        return None
    return {str(k): v for k, v in tops.items()}


def _write_record(vm: LabVm, tops: dict[str, str] | None = None) -> None:
    doc = vm.to_json()
    if tops is not None:
        doc[_TOPS] = tops
    atomic_write(_vm_dir(vm.name) / _RECORD, json.dumps(doc, indent=2).encode())


async def _query_tops(vm: LabVm) -> tuple[dict[str, str] | None, bool]:
    """Before stopping a running VM: the image on top of each of its disks (None if QEMU
    cannot tell: the next ``lab_up`` then searches), and whether QMP answered at all."""
    try:
        by_base = await _qemu.query_tops(vm.qmp_path)
    except LabError as exc:
        log.warning("lab %s: cannot ask QEMU for its disks' top images: %s", vm.name, exc.message)
        return None, False
    bases = {d.device: str(d.base_image) for d in vm.disks}
    found = {dev: by_base[base] for dev, base in bases.items() if base in by_base}
    if len(found) == len(vm.disks):
        return found, True
    log.warning("lab %s: query-block does not show every disk: %s", vm.name, by_base)
    return None, True


async def _flush_guest(vm: LabVm) -> None:
    """Stop the guest's workload and ``sync`` its filesystems through the agent, within
    :data:`FLUSH_TIMEOUT`; on failure or without an agent, log a warning and go on."""
    if vm.qga_path is None:
        log.warning(
            "lab %s: no guest agent: cannot flush the guest before stopping it; data it has "
            "not written back yet is lost",
            vm.name,
        )
        return
    agent = GuestAgent(str(vm.qga_path), timeout=FLUSH_TIMEOUT)
    started = time.monotonic()
    try:
        async with asyncio.timeout(FLUSH_TIMEOUT):
            res = await agent.exec(
                "/bin/sh", ["-c", _FLUSH_SCRIPT], timeout=FLUSH_TIMEOUT, capture=False
            )
        if res.exitcode != 0:
            log.warning("lab %s: guest flush exited with %s", vm.name, res.exitcode)
        else:
            log.info("lab %s: guest flushed in %.2fs", vm.name, time.monotonic() - started)
    except (AgentError, TimeoutError) as exc:
        why = exc.message if isinstance(exc, AgentError) else f"no answer in {FLUSH_TIMEOUT:g}s"
        log.warning(
            "lab %s: could not flush the guest before stopping it (%s); data it has not "
            "written back yet is lost",
            vm.name,
            why,
        )
    finally:
        await agent.close()


async def _resume_guest(vm: LabVm) -> None:
    """Undo :func:`_flush_guest`'s stop of the workload (SIGCONT); best effort, never raises."""
    if vm.qga_path is None:
        return
    agent = GuestAgent(str(vm.qga_path), timeout=FLUSH_TIMEOUT)
    try:
        async with asyncio.timeout(FLUSH_TIMEOUT):
            await agent.exec("/bin/sh", ["-c", _RESUME_SCRIPT], timeout=FLUSH_TIMEOUT)
    except (AgentError, TimeoutError) as exc:
        log.warning("lab %s: could not resume the guest's workload: %s", vm.name, exc)
    finally:
        await agent.close()


def _orphan_pid(vmdir: Path) -> int | None:
    """The PID of a live QEMU of this VM directory known only from ``qemu.pid`` (a ``lab_up``
    killed before it wrote the record), or None."""
    try:
        pid = int((vmdir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _qemu.qemu_alive(pid, vmdir / "qmp.sock") else None


def _remove_runtime_files(vmdir: Path) -> None:
    for leftover in ("qmp.sock", "qga.sock", "qemu.pid"):
        (vmdir / leftover).unlink(missing_ok=True)


async def _wait_ready(vm: LabVm, deadline: float) -> None:
    """Wait until the guest is ready: READY on the console, then (with an agent) guest-ping.

    Raises LabError if QEMU exits, the guest init reports an error, or the deadline passes.
    """

    def check_alive() -> None:
        if not _qemu.qemu_alive(vm.pid, vm.qmp_path):
            raise LabError(f"lab VM {vm.name}: QEMU exited during boot")

    def console() -> str:
        try:
            return vm.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    while READY_MARKER not in console():
        check_alive()
        if time.monotonic() > deadline:
            raise LabError(f"lab VM {vm.name}: not ready: no {READY_MARKER} on the console")
        await asyncio.sleep(0.05)
    text = console()
    if ERROR_MARKER in text:
        lines = [ln for ln in text.splitlines() if ERROR_MARKER in ln]
        raise LabError(f"lab VM {vm.name}: the guest init failed: {'; '.join(lines)}")
    if vm.qga_path is None:
        return
    agent = GuestAgent(str(vm.qga_path), timeout=2.0)
    try:
        while True:
            check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"lab VM {vm.name}: the guest agent did not answer guest-ping")
            try:
                await agent.ping(timeout=min(2.0, left))
                return
            except AgentError as exc:
                log.debug("lab %s: agent not ready yet: %s", vm.name, exc)
                await asyncio.sleep(0.1)
    finally:
        await agent.close()


async def _new_disks(name: str, fstypes: tuple[str, ...], size: int | None) -> list[LabDisk]:
    """Create the directory and fresh data disks of a new lab VM. A directory without a
    record (a ``lab_up`` that failed before QEMU started) is replaced, unless it holds snapshot
    overlays: then LabError."""
    vmdir = _vm_dir(name)
    if vmdir.exists():
        overlays = sorted(p.name for p in vmdir.glob("*.ff-*.qcow2"))
        if overlays:
            raise LabError(
                f"lab VM {name}: {vmdir} has no {_RECORD} but holds snapshot images "
                f"({', '.join(overlays)}); not overwriting them",
                hint=f"freezeframe lab down {name} --purge",
            )
        log.info("lab %s: replacing unrecorded directory %s", name, vmdir)
        shutil.rmtree(vmdir)
    vmdir.mkdir(parents=True)
    out: list[LabDisk] = []
    for i, fstype in enumerate(fstypes):
        disk = LabDisk(
            device=f"disk{i}",
            node=f"disk{i}",
            file=vmdir / f"disk{i}.qcow2",
            format="qcow2",
            fstype=fstype,
            mountpoint=f"/mnt/disk{i}",
        )
        await _disks.make_disk(disk.file, fstype, size or parse_size(_DEFAULT_SIZE), f"ffdisk{i}")
        out.append(disk)
    return out


def _purge_hint(name: str) -> str:
    return f"freezeframe lab down {name} --purge, then lab up again"


def _agent_flag(agent: bool | None) -> str:
    return "--no-agent" if agent is False else "--agent"


def _check_agent(old: LabVm, agent: bool | None, hint: str) -> None:
    """Raise LabError if ``agent`` (None: no choice) differs from how ``old`` was built."""
    have = old.qga_path is not None
    if agent is None or agent == have:
        return
    state = "running" if old.running else "exists (stopped)"
    raise LabError(
        f"lab VM {old.name} {state} {'with' if have else 'without'} a guest agent, "
        f"not {'with' if agent else 'without'} one",
        hint=hint,
    )


async def _restart_disks(
    old: LabVm, fstypes: tuple[str, ...] | None, size: int | None
) -> tuple[list[LabDisk], list[LabDisk]]:
    """The disks of a stopped VM (as recorded) and the same disks pointing at the image each
    must boot from. Raises LabError if ``fstypes``/``size`` do not match them or the top of a
    chain cannot be told (see :func:`_chain.boot_tops`)."""
    name = old.name
    purge = _purge_hint(name)
    have = tuple(d.fstype for d in old.disks)
    if fstypes is not None and fstypes != have:
        raise LabError(
            f"lab VM {name} exists (stopped) with disks {','.join(have) or '(none)'}, "
            f"not {','.join(fstypes) or '(none)'}",
            hint=f"omit --disks to restart it as it is, or {purge}",
        )
    tops, bases = await _chain.boot_tops(name, _vm_dir(name), old.disks, _read_tops(name))
    if size is not None:
        for d in old.disks:
            want = max(size, _disks.XFS_MIN_SIZE) if d.fstype == "xfs" else size
            if bases[d.device].virtual_size != want:
                raise LabError(
                    f"lab VM {name} exists (stopped): {d.device} is "
                    f"{bases[d.device].virtual_size} bytes, not {want}",
                    hint=f"omit --disk-size to restart it as it is, or {purge}",
                )
    log.info("lab %s: restarting on its disks", name)
    boot = [dataclasses.replace(d, file=tops[d.device], base=d.base_image) for d in old.disks]
    return boot, boot


async def lab_up(
    name: str,
    *,
    disks: tuple[str, ...] | list[str] | None = None,
    disk_size: str | int | None = None,
    agent: bool | None = None,
    accel: str = "auto",
    timeout: float = 60.0,
    adopt: bool = False,
) -> LabVm:
    """Build (cached) and boot the lab VM ``name``; return it once it is ready.

    If ``name`` is already running: with ``adopt`` (e.g. it is running but not registered,
    its ``lab_up`` having been killed), wait until it is ready and return it as it runs;
    without, AlreadyExistsError.

    A new VM gets fresh data disks (``disks``: their filesystems, default ext4 + xfs;
    ``disk_size`` each, default 256M; ``agent``: start qemu-ga in the guest, default yes). A
    stopped VM of that name restarts as it was built: on its own disks, each booted from the
    top of its image chain (the overlay its last snapshot switched it to), so nothing written
    before ``lab_down`` is lost and no snapshot's image changes, and with its guest agent or
    without, as recorded; ``disks``, ``disk_size`` and ``agent``, if given, must match it.

    Ready means ``guest-ping`` answers (without an agent: READY on the console) within
    ``timeout`` seconds of QEMU's start (building the kernel and initramfs the first time
    comes on top). Raises UsageError (bad name, filesystem, size, accelerator),
    AlreadyExistsError (the name is running, without ``adopt``), LabError (``accel="kvm"``
    and KVM is not usable here; a QEMU of the name runs without a record; an adopted VM does
    not become ready or has other disks or another agent setting), DependencyError (a host
    package is missing), ToolError (mkfs / qemu-img / QEMU start failed) or LabError (build
    failed; the guest did not become ready: the message carries the console's last lines; a
    stopped VM's disks or agent setting do not match ``disks``/``disk_size``/``agent`` or the
    top of a disk's chain cannot be told for sure: the message names the candidate images).
    On any failure no QEMU
    of this VM is left running; its directory (with the console log) stays for inspection and
    is reused by the next ``lab_up``.
    """
    validate_name(name)
    asked = validate_fstypes(tuple(disks)) if disks is not None else None
    asked_size = parse_size(disk_size) if disk_size is not None else None
    validate_accel(accel)
    timeout = validate_timeout(timeout)
    _build.check_dependencies(asked if asked is not None else _DEFAULT_DISKS)
    vmdir = _vm_dir(name)
    qmp_path, qga_path = vmdir / "qmp.sock", vmdir / "qga.sock"
    if len(str(qga_path)) > _SOCKET_MAX:
        raise LabError(
            f"lab VM directory {vmdir} is too long for a unix socket path",
            hint="set FREEZEFRAME_HOME to a shorter path",
        )
    async with _lock(name):
        old = _read_record(name)
        if old is not None and old.running:
            if not adopt:
                raise AlreadyExistsError(
                    f"lab VM {name} is already running (pid {old.pid})",
                    hint=f"freezeframe lab down {name}",
                )
            have = tuple(d.fstype for d in old.disks)
            if asked is not None and asked != have:
                raise LabError(
                    f"lab VM {name} is running with disks {','.join(have) or '(none)'}, "
                    f"not {','.join(asked) or '(none)'}",
                    hint=f"omit --disks, or freezeframe lab down {name} first",
                )
            _check_agent(
                old, agent, f"omit {_agent_flag(agent)}, or freezeframe lab down {name} first"
            )
            await _wait_ready(old, time.monotonic() + timeout)
            log.info("lab %s: already running (pid %d) and ready", name, old.pid)
            return old
        orphan = _orphan_pid(vmdir) if old is None else None
        if orphan is not None:
            raise LabError(
                f"lab VM {name}: a QEMU of it (pid {orphan}) runs without a record "
                "(an interrupted lab up?)",
                hint=f"freezeframe lab down {name} stops it",
            )
        artifacts = await _build.ensure_artifacts()
        chosen = await _qemu.choose_accel(accel, artifacts, _build.cache_dir())
        log.info("lab %s: accelerator %s", name, chosen)
        if old is not None:
            _check_agent(
                old,
                agent,
                f"omit {_agent_flag(agent)} to restart it as it is, or {_purge_hint(name)}",
            )
            agent = old.qga_path is not None
            lab_disks, boot_disks = await _restart_disks(old, asked, asked_size)
            _remove_runtime_files(vmdir)
        else:
            lab_disks = await _new_disks(name, asked or _DEFAULT_DISKS, asked_size)
            boot_disks = lab_disks
        agent = True if agent is None else agent
        fstypes = tuple(d.fstype for d in lab_disks)
        console_log = vmdir / "console.log"
        console_log.unlink(missing_ok=True)  # no READY of an earlier boot
        pidfile = vmdir / "qemu.pid"
        argv = _qemu.qemu_argv(
            name=name,
            artifacts=artifacts,
            accel=chosen,
            cmdline=_qemu.kernel_cmdline(fstypes, agent=agent),
            console_log=console_log,
            qmp_path=qmp_path,
            qga_path=qga_path if agent else None,
            disks=boot_disks,
            pidfile=pidfile,
        )
        (vmdir / "qemu.argv").write_text("\n".join(argv) + "\n")
        started = time.monotonic()
        pid = 0
        try:
            await run(*argv, timeout=60, what="qemu-system-x86_64")
            pid = int(pidfile.read_text().strip())
            vm = LabVm(
                name=name,
                pid=pid,
                running=True,
                qmp_path=qmp_path,
                qga_path=qga_path if agent else None,
                console_log=console_log,
                accel=chosen,
                disks=tuple(lab_disks),
            )
            _write_record(vm)
            await _wait_ready(vm, started + timeout)
        except BaseException as exc:
            if not pid:
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pidfile.read_text().strip())
            if pid:
                _qemu.kill_now(pid, qmp_path)
            _remove_runtime_files(vmdir)
            if isinstance(exc, LabError | OSError | ValueError):
                raise LabError(
                    f"{exc} (after {time.monotonic() - started:.1f}s, timeout {timeout:g}s); "
                    f"console {console_log}, last lines:\n{console_tail(console_log)}"
                ) from exc
            raise
        log.info(
            "lab %s: ready in %.2fs (pid %d, %s)", name, time.monotonic() - started, pid, chosen
        )
        return vm


async def lab_down(name: str, *, purge: bool = False) -> None:
    """Stop the lab VM ``name`` (QMP quit, then SIGTERM, then SIGKILL) and remove its sockets;
    with ``purge`` delete its directory (disks, overlays, console log) too. Without ``purge``
    the guest is flushed first (workload stopped, ``sync`` through the agent, at most
    :data:`FLUSH_TIMEOUT` s; a failure is logged as a warning) and the image on top of each
    disk is recorded for the next ``lab_up``. A QEMU of the name that runs without a record
    (its ``lab_up`` was killed) is stopped too.

    The PID is checked to still be this VM's QEMU before any signal. Stopping a VM that is
    not running is not an error. Raises UsageError for a bad name, NotFoundError if there is
    no such lab VM, LabError if its record is unreadable or QEMU cannot be stopped.
    """
    validate_name(name)
    vmdir = _vm_dir(name)
    async with _lock(name):
        if not vmdir.exists():
            raise NotFoundError(f"no lab VM named {name}")
        try:
            vm = _read_record(name)
        except LabError:
            if not purge:
                raise
            vm = None
        if vm is None:
            orphan = _orphan_pid(vmdir)
            if orphan is not None:
                how = await _qemu.stop_qemu(orphan, vmdir / "qmp.sock")
                log.info("lab %s: unrecorded QEMU %d stopped (%s)", name, orphan, how)
                if _qemu.qemu_alive(orphan, vmdir / "qmp.sock"):
                    raise LabError(f"lab VM {name}: QEMU {orphan} could not be stopped")
        elif vm.running:
            tops: dict[str, str] | None = None
            qmp_ok = True
            try:
                if not purge:
                    await _flush_guest(vm)  # stops the workload: resumed if QEMU stays up
                    tops, qmp_ok = await _query_tops(vm)
                how = await _qemu.stop_qemu(vm.pid, vm.qmp_path, qmp=qmp_ok)
                log.info("lab %s: QEMU %d stopped (%s)", name, vm.pid, how)
            finally:  # also on Ctrl-C: a VM left running keeps its workload running
                alive = _qemu.qemu_alive(vm.pid, vm.qmp_path)
                if alive and not purge:
                    await shielded(_resume_guest(vm))
            if not purge:
                _write_record(dataclasses.replace(vm, running=alive), tops)
                log.info("lab %s: recorded tops %s", name, tops)
            if alive:
                raise LabError(f"lab VM {name}: QEMU {vm.pid} could not be stopped")
        elif not purge:  # stopped already (e.g. killed): the record says so, tops kept
            _write_record(vm, _read_tops(name))
        _remove_runtime_files(vmdir)
        if purge:
            shutil.rmtree(vmdir, ignore_errors=True)
            if vmdir.exists():
                raise LabError(f"lab VM {name}: could not delete {vmdir}")


def lab_status(name: str) -> LabVm:
    """The lab VM ``name`` as recorded, with ``running`` checked now.

    Raises UsageError for a bad name, NotFoundError if there is no such lab VM, LabError if
    its record is unreadable.
    """
    validate_name(name)
    vm = _read_record(name)
    if vm is None:
        raise NotFoundError(f"no lab VM named {name}")
    return vm


def lab_list() -> list[LabVm]:
    """Every lab VM with a record, sorted by name (unreadable records are skipped, logged)."""
    root = paths.lab_dir()
    if not root.is_dir():
        return []
    out: list[LabVm] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not (entry / _RECORD).is_file():
            continue
        try:
            vm = _read_record(entry.name)
        except FreezeframeError as exc:
            log.warning("lab: skipping %s: %s", entry, exc)
            continue
        if vm is not None:
            out.append(vm)
    return out
