"""Lab VM lifecycle: ``lab_up``, ``lab_down``, ``lab_list``, ``lab_status``.

A lab VM lives in ``<lab dir>/NAME/``: ``vm.json`` (the :class:`LabVm` record), ``qemu.pid``,
``qmp.sock``, ``qga.sock``, ``console.log``, the base images ``diskN.qcow2`` and the overlays
snapshots put on top of them (``diskN.ff-<id>.qcow2``). Operations on one name are serialised
by a lock file in ``<lab dir>/.locks/``.

It runs under one of two drivers, chosen at its first ``lab_up`` and kept: ``qmp`` (the lab
starts QEMU itself, :mod:`freezeframe.lab._qemu`) or ``libvirt`` (a transient libvirt domain,
:mod:`freezeframe.lab._libvirt`; its directory then also holds ``domain.xml``, ``kernel`` and
``initrd``). Everything else — disks, chains, readiness, the flush, the recorded tops — is the
same code for both; the guest agent is reached through
:func:`freezeframe.hypervisor.open_agent` at the VM's :attr:`LabVm.agent_address`.

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
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from freezeframe import paths
from freezeframe._aio import shielded
from freezeframe._tools import run
from freezeframe.errors import (
    Action,
    AgentError,
    AlreadyExistsError,
    DependencyError,
    FreezeframeError,
    LabError,
    NotFoundError,
    Remedy,
    UsageError,
)
from freezeframe.hypervisor import available_drivers, load_driver, open_agent
from freezeframe.lab import _build, _chain, _disks, _libvirt, _qemu
from freezeframe.lab._build import BootArtifacts
from freezeframe.lab._model import (
    LIBVIRT_URI,
    LabDisk,
    LabVm,
    domain_name,
    parse_size,
    validate_accel,
    validate_driver,
    validate_fstypes,
    validate_name,
    validate_timeout,
)
from freezeframe.lab._util import atomic_write, console_tail, file_lock
from freezeframe.models import ExecResult

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


def _qmp(vm: LabVm) -> Path:
    """The QMP socket of a ``qmp`` lab VM (its record always names one)."""
    if vm.qmp_path is None:
        raise LabError(f"lab VM {vm.name}: its record names no QMP socket")
    return vm.qmp_path


def _libvirt_ids(vm: LabVm) -> tuple[str, str]:
    """The domain UUID and connection URI of a ``libvirt`` lab VM."""
    if vm.domain is None or vm.connect_uri is None:
        raise LabError(f"lab VM {vm.name}: its record names no libvirt domain")
    return vm.domain, vm.connect_uri


def _liveness(vm: LabVm) -> tuple[int, bool]:
    """QEMU's PID and whether it runs, from /proc: the recorded QEMU (``qmp``), the QEMU of
    the domain's UUID (``libvirt``)."""
    if vm.driver == "libvirt":
        pid = _libvirt.qemu_pid(_libvirt_ids(vm)[0], hint=vm.pid)
        return (pid, True) if pid is not None else (vm.pid, False)
    return vm.pid, _qemu.qemu_alive(vm.pid, _qmp(vm))


def _read_record(name: str) -> LabVm | None:
    """The recorded VM (``running`` checked against /proc), or None if there is no record."""
    try:
        doc = json.loads((_vm_dir(name) / _RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"lab VM {name}: unreadable {_RECORD}: {exc}") from exc
    try:
        vm = LabVm.from_json(doc, running=False)
        pid, running = _liveness(vm)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabError(f"lab VM {name}: malformed {_RECORD}: {exc}") from exc
    return dataclasses.replace(vm, pid=pid, running=running)


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
    """Before stopping a running VM: the image on top of each of its disks (None if QEMU or
    libvirt cannot tell: the next ``lab_up`` then searches), and whether they answered at all.
    QEMU is asked with ``query-block`` (by each disk's base image), libvirt for the domain's
    live XML (each disk's ``<source file>``, by its serial)."""
    try:
        if vm.driver == "libvirt":
            by_serial = await _libvirt.disk_files(*_libvirt_ids(vm))
            keys = {d.device: d.serial for d in vm.disks}
            found = {dev: by_serial[key] for dev, key in keys.items() if key in by_serial}
            seen: object = by_serial
        else:
            by_base = await _qemu.query_tops(_qmp(vm))
            keys = {d.device: str(d.base_image) for d in vm.disks}
            found = {dev: by_base[key] for dev, key in keys.items() if key in by_base}
            seen = by_base
    except LabError as exc:
        log.warning("lab %s: cannot ask for its disks' top images: %s", vm.name, exc.message)
        return None, False
    if len(found) == len(vm.disks):
        return found, True
    log.warning("lab %s: the hypervisor does not show every disk: %s", vm.name, seen)
    return None, True


async def _guest_sh(vm: LabVm, script: str) -> ExecResult:
    """Run ``/bin/sh -c script`` in the guest through its agent, within
    :data:`FLUSH_TIMEOUT`. Raises FreezeframeError (AgentError, or the driver cannot be
    loaded) or TimeoutError."""
    address = vm.agent_address
    if address is None:
        raise AgentError(f"lab VM {vm.name} has no guest agent")
    async with asyncio.timeout(FLUSH_TIMEOUT):
        async with open_agent(address, timeout=FLUSH_TIMEOUT) as agent:
            return await agent.exec("/bin/sh", ["-c", script], timeout=FLUSH_TIMEOUT, capture=False)


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
    started = time.monotonic()
    try:
        res = await _guest_sh(vm, _FLUSH_SCRIPT)
        if res.exitcode != 0:
            log.warning("lab %s: guest flush exited with %s", vm.name, res.exitcode)
        else:
            log.info("lab %s: guest flushed in %.2fs", vm.name, time.monotonic() - started)
    except (FreezeframeError, TimeoutError) as exc:
        why = (
            exc.message if isinstance(exc, FreezeframeError) else f"no answer in {FLUSH_TIMEOUT:g}s"
        )
        log.warning(
            "lab %s: could not flush the guest before stopping it (%s); data it has not "
            "written back yet is lost",
            vm.name,
            why,
        )


async def _resume_guest(vm: LabVm) -> None:
    """Undo :func:`_flush_guest`'s stop of the workload (SIGCONT); best effort, never raises."""
    if vm.qga_path is None:
        return
    try:
        await _guest_sh(vm, _RESUME_SCRIPT)
    except (FreezeframeError, TimeoutError) as exc:
        log.warning("lab %s: could not resume the guest's workload: %s", vm.name, exc)


def _orphan_pid(vmdir: Path) -> int | None:
    """The PID of a live QEMU of this VM directory known only from ``qemu.pid`` (a ``lab_up``
    killed before it wrote the record), or None."""
    try:
        pid = int((vmdir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _qemu.qemu_alive(pid, vmdir / "qmp.sock") else None


async def _find_domain(name: str, *, required: bool) -> _libvirt.Domain | None:
    """The libvirt domain named after the lab VM ``name``, or None. When libvirt cannot be
    asked: LabError / DependencyError if ``required``, else None."""
    try:
        return await _libvirt.find(name, LIBVIRT_URI)
    except (DependencyError, LabError) as exc:
        if required:
            raise
        log.debug("lab %s: libvirt not asked for a domain: %s", name, exc)
        return None


def _is_ours(dom: _libvirt.Domain, name: str) -> bool:
    """Whether ``dom`` is this lab VM's (its metadata names this VM's directory; another
    FREEZEFRAME_HOME on the same libvirtd may use the same lab name)."""
    return dom.lab_dir is not None and os.path.realpath(dom.lab_dir) == os.path.realpath(
        _vm_dir(name)
    )


async def _orphan(
    name: str, vmdir: Path, *, required: bool
) -> tuple[str, Callable[[], Awaitable[str]]] | None:
    """A QEMU of this VM that runs without a record saying so — what it is, and how to stop it
    — or None: one known from ``qemu.pid``, or the libvirt domain of its name when it is this
    VM's (libvirt asked as :func:`_find_domain` with ``required``)."""
    pid = _orphan_pid(vmdir)
    if pid is not None:
        return f"a QEMU of it (pid {pid})", lambda: _qemu.stop_qemu(pid, vmdir / "qmp.sock")
    dom = await _find_domain(name, required=required)
    if dom is not None and _is_ours(dom, name):
        what = f"its libvirt domain {domain_name(name)} (UUID {dom.uuid})"
        return what, lambda: _libvirt.destroy(dom.uuid, LIBVIRT_URI)
    return None


async def _stop_orphan(name: str, vmdir: Path) -> None:
    """Stop what :func:`_orphan` finds (libvirt asked only where it is at hand)."""
    found = await _orphan(name, vmdir, required=False)
    if found is None:
        return
    what, stop = found
    how = await stop()
    log.info("lab %s: unrecorded %s stopped (%s)", name, what, how)
    if await _orphan(name, vmdir, required=False) is not None:
        raise LabError(f"lab VM {name}: {what} could not be stopped")


def _require_libvirt_driver() -> None:
    """Raise unless freezeframe's libvirt driver can be loaded: a libvirt lab VM's agent is
    reached through it (readiness, ``lab down``'s flush)."""
    if "libvirt" not in available_drivers():
        raise LabError(
            "a lab VM under libvirt with a guest agent needs freezeframe's libvirt driver "
            "(entry point 'libvirt' of the freezeframe.drivers group), which is not installed",
            hint="install freezeframe with its libvirt driver, or use --no-agent",
        )
    load_driver("libvirt")


async def _libvirt_preflight(name: str, vmdir: Path, *, agent: bool) -> None:
    """Before anything is built or booted under libvirt: libvirt's QEMU account can traverse
    the way to the VM's directory, the libvirt driver loads (with an agent), libvirtd answers
    and no domain has the VM's domain name. Raises LabError / DependencyError."""
    _libvirt.check_traversable(vmdir)
    if agent:
        _require_libvirt_driver()
    dom = await _find_domain(name, required=True)
    if dom is None:
        return
    if _is_ours(dom, name):
        raise LabError(
            f"lab VM {name}: its libvirt domain {domain_name(name)} (UUID {dom.uuid}) still exists",
            remedy=Remedy(Action.LAB_DOWN, name),
        )
    whose = f"the lab VM in {dom.lab_dir}" if dom.lab_dir else "not a freezeframe lab VM"
    raise LabError(
        f"lab VM {name}: a libvirt domain {domain_name(name)} (UUID {dom.uuid}) exists and "
        f"is not this VM's ({whose})",
        hint=f"use another name, or stop that domain (virsh -c {LIBVIRT_URI} destroy "
        f"{domain_name(name)})",
    )


def _remove_runtime_files(vmdir: Path) -> None:
    for leftover in ("qmp.sock", "qga.sock", "qemu.pid"):
        (vmdir / leftover).unlink(missing_ok=True)


async def _wait_ready(vm: LabVm, deadline: float) -> None:
    """Wait until the guest is ready: READY on the console, then (with an agent) guest-ping
    through :func:`open_agent` (under libvirt: through libvirtd).

    Raises LabError if QEMU exits, the guest init reports an error, or the deadline passes.
    """

    def check_alive() -> None:
        if not _liveness(vm)[1]:
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
    if vm.agent_address is None:
        return
    agent = open_agent(vm.agent_address, timeout=2.0)
    try:
        while True:
            check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"lab VM {vm.name}: the guest agent did not answer guest-ping")
            try:
                await agent.connect(timeout=min(2.0, left))
                await agent.ping(timeout=min(2.0, left))
                return
            except AgentError as exc:
                log.debug("lab %s: agent not ready yet: %s", vm.name, exc)
                await asyncio.sleep(0.1)
    finally:
        await agent.close()


async def _new_disks(
    name: str,
    fstypes: tuple[str, ...],
    size: int | None,
    *,
    rbd: bool | Sequence[int] = False,
    images: Sequence[tuple[Path, str]] | None = None,
) -> list[LabDisk]:
    """Create the directory and fresh data disks of a new lab VM (with ``images``: disk N is
    the given image file ``(path, format)``, used in place, nothing created). A directory without a
    record (a ``lab_up`` that failed before QEMU started) is replaced, unless it holds snapshot
    overlays: then LabError. With ``rbd`` (True: every disk; a sequence: the disks of those
    indexes, the others stay local qcow2 images: a mixed VM) each such disk is moved into the
    lab Ceph's pool as the RBD image ``fflab-<name>-diskN`` (one of that name is replaced with
    its snapshots): NotFoundError when there is no lab Ceph, LabError when it is not running."""
    vmdir = _vm_dir(name)
    if vmdir.exists():
        overlays = sorted(p.name for p in vmdir.glob("*.ff-*.qcow2"))
        if overlays:
            raise LabError(
                f"lab VM {name}: {vmdir} has no {_RECORD} but holds snapshot images "
                f"({', '.join(overlays)}); not overwriting them",
                remedy=Remedy(Action.LAB_DOWN, name, {"purge": "yes"}),
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
        if images is not None:
            disk = dataclasses.replace(disk, file=images[i][0], format=images[i][1])
            out.append(disk)
            continue
        await _disks.make_disk(disk.file, fstype, size or parse_size(_DEFAULT_SIZE), f"ffdisk{i}")
        if rbd is True or (not isinstance(rbd, bool) and i in rbd):
            disk = await _into_rbd(name, disk)
        out.append(disk)
    return out


async def _into_rbd(name: str, disk: LabDisk) -> LabDisk:
    """Move the fresh qcow2 ``disk`` into the lab Ceph as a raw RBD image; the local file is
    removed."""
    from freezeframe.lab._ceph import ceph_status
    from freezeframe.storage.rbd import RbdClient, RbdImageRef

    ceph = ceph_status()
    if not ceph.running:
        raise LabError("the lab Ceph is not running", hint="start it: freezeframe lab ceph up")
    ref = RbdImageRef(ceph.pool, f"fflab-{name}-{disk.device}")
    async with await RbdClient.connect(ceph.settings()) as client:
        if await client.image_exists(ref):
            await client.remove_image(ref, with_snaps=True)
    target = f"rbd:{ref}:conf={ceph.conf}:id=admin"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk.file), target,
              timeout=120, what="qemu-img convert into RBD")  # fmt: skip
    disk.file.unlink(missing_ok=True)
    return dataclasses.replace(
        disk, format="raw", rbd=str(ref), rbd_conf=str(ceph.conf), rbd_mon=ceph.mon_addr
    )


async def _remove_rbd_images(vm: LabVm) -> None:
    """Remove the RBD images of ``vm``'s disks with their snapshots (``lab down --purge``,
    its QEMU stopped); best effort: what cannot be removed is logged. A client still watching
    an image then is a dead one (a killed QEMU or process): it is blocklisted first, so the
    removal need not wait out Ceph's watch timeout (30 s)."""
    from freezeframe.storage.rbd import CephSettings, RbdClient, RbdImageRef

    for d in vm.disks:
        if d.rbd is None or d.rbd_conf is None:
            continue
        try:
            async with await RbdClient.connect(CephSettings(Path(d.rbd_conf), timeout=5)) as c:
                ref = RbdImageRef.parse(d.rbd)
                evicted = await c.evict_watchers(ref)
                if evicted:
                    log.info("lab %s: %s: blocklisted dead watchers %s", vm.name, ref, evicted)
                await c.remove_image(ref, with_snaps=True)
        except FreezeframeError as exc:
            log.warning("lab %s: could not remove RBD image %s: %s", vm.name, d.rbd, exc.message)


def _purge_hint(name: str) -> str:
    return "purge it, then start it again"


def _purge_remedy(name: str) -> Remedy:
    return Remedy(Action.LAB_DOWN, name, {"purge": "yes"})


def _check_as_built(
    old: LabVm,
    *,
    agent: bool | None,
    driver: str | None,
    hint: Callable[[str], str],
    remedy: Remedy,
) -> None:
    """Raise LabError if ``agent`` or ``driver`` (None: no choice) differs from how ``old``
    was built; ``hint(flag)`` says what to do about the option ``flag``."""
    state = "running" if old.running else "exists (stopped)"
    have = old.qga_path is not None
    if agent is not None and agent != have:
        raise LabError(
            f"lab VM {old.name} {state} {'with' if have else 'without'} a guest agent, "
            f"not {'with' if agent else 'without'} one",
            hint=hint("--no-agent" if agent is False else "--agent"),
            remedy=remedy,
        )
    if driver is not None and driver != old.driver:
        raise LabError(
            f"lab VM {old.name} {state} under {old.driver}, not {driver}",
            hint=hint(f"--{driver}"),
            remedy=remedy,
        )


async def _restart_disks(
    old: LabVm, fstypes: tuple[str, ...] | None, size: int | None
) -> list[LabDisk]:
    """The disks of a stopped VM, each pointing at the image it must boot from (``file``; its
    ``base`` is kept). Raises LabError if ``fstypes``/``size`` do not match them or the top of
    a chain cannot be told (see :func:`_chain.boot_tops`)."""
    name = old.name
    purge = _purge_hint(name)
    have = tuple(d.fstype for d in old.disks)
    if fstypes is not None and fstypes != have:
        raise LabError(
            f"lab VM {name} exists (stopped) with disks {','.join(have) or '(none)'}, "
            f"not {','.join(fstypes) or '(none)'}",
            hint=f"ask for no disk layout to restart it as it is, or {purge}",
            remedy=_purge_remedy(name),
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
                    remedy=_purge_remedy(name),
                )
    log.info("lab %s: restarting on its disks", name)
    return [dataclasses.replace(d, file=tops[d.device], base=d.base_image) for d in old.disks]


async def _start_qemu(vm: LabVm, artifacts: BootArtifacts, cmdline: str) -> LabVm:
    """Start QEMU daemonized for ``vm``; return it with QEMU's PID."""
    vmdir = _vm_dir(vm.name)
    pidfile = vmdir / "qemu.pid"
    argv = _qemu.qemu_argv(
        name=vm.name,
        artifacts=artifacts,
        accel=vm.accel,
        cmdline=cmdline,
        console_log=vm.console_log,
        qmp_path=_qmp(vm),
        qga_path=vm.qga_path,
        disks=vm.disks,
        pidfile=pidfile,
    )
    (vmdir / "qemu.argv").write_text("\n".join(argv) + "\n")
    await run(*argv, timeout=60, what="qemu-system-x86_64")
    vm = dataclasses.replace(vm, pid=int(pidfile.read_text().strip()))
    _write_record(vm)
    return vm


async def _start_libvirt(
    vm: LabVm, artifacts: BootArtifacts, cmdline: str, timeout: float
) -> LabVm:
    """Create ``vm``'s transient domain (its directory made 0755 and checked traversable for
    libvirt's QEMU account first); return it with QEMU's PID. The record is written before
    the domain is created: a ``lab_up`` killed meanwhile leaves a domain ``lab_up`` adopts and
    ``lab_down`` stops."""
    vmdir = _vm_dir(vm.name)
    uuid, uri = _libvirt_ids(vm)
    os.chmod(vmdir, 0o755)  # noqa: S103 - libvirt's QEMU account must traverse it
    _libvirt.check_traversable(vmdir)
    kernel, initrd = _libvirt.boot_files(artifacts, vmdir)
    xml = _libvirt.domain_xml(
        name=vm.name,
        uuid=uuid,
        vmdir=vmdir,
        accel=vm.accel,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        console_log=vm.console_log,
        qga_path=vm.qga_path,
        disks=vm.disks,
    )
    atomic_write(vmdir / "domain.xml", xml.encode())
    _write_record(vm)
    started = time.monotonic()
    await _libvirt.create(xml, uri, timeout)
    vm = dataclasses.replace(vm, pid=_liveness(vm)[0])
    log.info("lab %s: domain %s created in %.2fs", vm.name, uuid, time.monotonic() - started)
    _write_record(vm)
    return vm


def _kill_now(vm: LabVm) -> None:
    """Stop ``vm``'s QEMU at once, synchronously (failure and cancellation paths); never
    raises. A ``qmp`` VM not started yet is found from ``qemu.pid``."""
    if vm.driver == "libvirt":
        _libvirt.destroy_now(*_libvirt_ids(vm))
        return
    pid = vm.pid
    if not pid:
        with contextlib.suppress(OSError, ValueError):
            pid = int((_vm_dir(vm.name) / "qemu.pid").read_text().strip())
    if pid:
        _qemu.kill_now(pid, _qmp(vm))


async def _stop(vm: LabVm, *, qmp: bool) -> str:
    """Stop ``vm``'s QEMU: QMP ``quit`` (not if ``qmp`` is False), then signals; under
    libvirt ``destroy``. Returns how it ended; never raises."""
    if vm.driver == "libvirt":
        try:
            return await _libvirt.destroy(*_libvirt_ids(vm))
        except (DependencyError, LabError) as exc:
            log.warning("lab %s: %s", vm.name, exc.message)
            return f"not stopped: {exc.message}"
    return await _qemu.stop_qemu(vm.pid, _qmp(vm), qmp=qmp)


async def lab_up(
    name: str,
    *,
    disks: tuple[str, ...] | list[str] | None = None,
    disk_size: str | int | None = None,
    agent: bool | None = None,
    accel: str = "auto",
    timeout: float = 60.0,
    adopt: bool = False,
    driver: str | None = None,
    rbd: bool | Sequence[int] = False,
    images: Sequence[tuple[str | Path, str]] | None = None,
) -> LabVm:
    """Build (cached) and boot the lab VM ``name``; return it once it is ready.

    If ``name`` is already running: with ``adopt`` (e.g. it is running but not registered,
    its ``lab_up`` having been killed), wait until it is ready and return it as it runs;
    without, AlreadyExistsError.

    A new VM gets fresh data disks (``disks``: their filesystems, default ext4 + xfs;
    ``disk_size`` each, default 256M; ``agent``: start qemu-ga in the guest, default yes) and
    runs under ``driver``: ``qmp`` (default: QEMU started by the lab) or ``libvirt`` (a
    transient libvirt domain on ``qemu:///system``; its directory is made 0755 and every
    directory above it must be traversable by libvirt's QEMU account). A stopped VM of that
    name restarts as it was built: on its own disks, each booted from the top of its image
    chain (the overlay its last snapshot switched it to), so nothing written before
    ``lab_down`` is lost and no snapshot's image changes, with its guest agent or without and
    under its driver, as recorded; ``disks``, ``disk_size``, ``agent`` and ``driver``, if
    given, must match it.

    Ready means ``guest-ping`` answers (without an agent: READY on the console) within
    ``timeout`` seconds of QEMU's start (building the kernel and initramfs the first time
    comes on top; under libvirt, creating the domain counts in). Raises UsageError (bad name,
    filesystem, size, accelerator, driver), AlreadyExistsError (the name is running, without
    ``adopt``), LabError (``accel="kvm"`` and KVM is not usable here; a QEMU or libvirt domain
    of the name runs without a record; a libvirt domain of that name belongs to something
    else; a directory on the way to a libvirt VM's is not traversable by libvirt's QEMU
    account; libvirtd does not answer; an adopted VM does not become ready or has other disks,
    another agent setting or another driver), DependencyError (a host package or the libvirt
    binding is missing), ToolError (mkfs / qemu-img / QEMU start failed) or LabError (build
    failed; libvirt refused the domain; the guest did not become ready: the message carries
    the console's last lines; a stopped VM's disks, agent setting or driver do not match
    ``disks``/``disk_size``/``agent``/``driver`` or the top of a disk's chain cannot be told
    for sure: the message names the candidate images).

    ``rbd`` (a new VM only): its data disks (True: all; a sequence: those indexes) are RBD
    images in the lab Ceph (``lab ceph up``), opened by QEMU's rbd driver (libvirt: ``<disk
    type='network'>``, auth none); a stopped VM on RBD images restarts on them as they are,
    and ``lab_down(purge=True)`` removes them with their snapshots. NotFoundError when there is
    no lab Ceph, LabError when it is not running. On any failure no QEMU of this VM is
    left running; its directory (with the console log) stays for inspection and is reused by
    the next ``lab_up``.

    ``images`` (a new VM only, with ``disks`` naming their filesystems, one each): boot the lab
    guest on these existing images ``(path, format)`` (qcow2 or raw, e.g. an exported
    snapshot) instead of fresh disks. They are used in place (the guest mounts and writes
    them) and stay where they are after ``lab_down(purge=True)``. UsageError when they do not
    match ``disks``; NotFoundError for a missing file; LabError when ``name`` exists already.
    """
    validate_name(name)
    asked = validate_fstypes(tuple(disks)) if disks is not None else None
    asked_size = parse_size(disk_size) if disk_size is not None else None
    validate_accel(accel)
    validate_driver(driver)
    timeout = validate_timeout(timeout)
    given = _check_images(images, asked, rbd)
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
                    code="lab-vm-running",
                    remedy=Remedy(Action.LAB_DOWN, name),
                )
            have = tuple(d.fstype for d in old.disks)
            if asked is not None and asked != have:
                raise LabError(
                    f"lab VM {name} is running with disks {','.join(have) or '(none)'}, "
                    f"not {','.join(asked) or '(none)'}",
                    hint="ask for no disk layout, or stop it first",
                    remedy=Remedy(Action.LAB_DOWN, name),
                )
            _check_as_built(
                old,
                agent=agent,
                driver=driver,
                hint=lambda flag: f"omit {flag}, or stop it first",
                remedy=Remedy(Action.LAB_DOWN, name),
            )
            await _wait_ready(old, time.monotonic() + timeout)
            log.info("lab %s: already running (pid %d) and ready", name, old.pid)
            return old
        if old is None:
            orphan = await _orphan(name, vmdir, required=driver == "libvirt")
            if orphan is not None:
                raise LabError(
                    f"lab VM {name}: {orphan[0]} runs without a record (an interrupted lab up?)",
                    hint="stop it",
                    remedy=Remedy(Action.LAB_DOWN, name),
                )
        else:
            if given is not None:
                raise LabError(
                    f"lab VM {name} exists: only a new lab VM boots on given images",
                    hint=f"pick another name, or {_purge_hint(name)}",
                    remedy=_purge_remedy(name),
                )
            _check_as_built(
                old,
                agent=agent,
                driver=driver,
                hint=lambda flag: f"omit {flag} to restart it as it is, or {_purge_hint(name)}",
                remedy=_purge_remedy(name),
            )
            agent, driver = old.qga_path is not None, old.driver
        agent = True if agent is None else agent
        driver = driver or "qmp"
        if driver == "libvirt":
            await _libvirt_preflight(name, vmdir, agent=agent)
        artifacts = await _build.ensure_artifacts()
        chosen = await _qemu.choose_accel(accel, artifacts, _build.cache_dir())
        log.info("lab %s: accelerator %s, driver %s", name, chosen, driver)
        if old is not None and any(d.rbd for d in old.disks):
            lab_disks = list(old.disks)  # RBD images: the live disk itself, no chain
            _remove_runtime_files(vmdir)
        elif old is not None:
            if rbd:
                raise LabError(
                    f"lab VM {name} exists (stopped) with local disks, not RBD ones",
                    hint=f"omit --rbd to restart it as it is, or {_purge_hint(name)}",
                    remedy=_purge_remedy(name),
                )
            lab_disks = await _restart_disks(old, asked, asked_size)
            _remove_runtime_files(vmdir)
        else:
            lab_disks = await _new_disks(
                name, asked or _DEFAULT_DISKS, asked_size, rbd=rbd, images=given
            )
        console_log = vmdir / "console.log"
        console_log.unlink(missing_ok=True)  # no READY of an earlier boot
        libvirt = driver == "libvirt"
        vm = LabVm(
            name=name,
            pid=0,
            running=True,
            qmp_path=None if libvirt else qmp_path,
            qga_path=qga_path if agent else None,
            console_log=console_log,
            accel=chosen,
            disks=tuple(lab_disks),
            driver=driver,
            domain=((old.domain if old is not None else None) or str(uuid.uuid4()))
            if libvirt
            else None,
            connect_uri=LIBVIRT_URI if libvirt else None,
        )
        cmdline = _qemu.kernel_cmdline(tuple(d.fstype for d in lab_disks), agent=agent)
        started = time.monotonic()
        try:
            if libvirt:
                vm = await _start_libvirt(vm, artifacts, cmdline, timeout)
            else:
                vm = await _start_qemu(vm, artifacts, cmdline)
            await _wait_ready(vm, started + timeout)
        except BaseException as exc:
            _kill_now(vm)
            _remove_runtime_files(vmdir)
            if isinstance(exc, LabError | OSError | ValueError):
                raise LabError(
                    f"{exc} (after {time.monotonic() - started:.1f}s, timeout {timeout:g}s); "
                    f"console {console_log}, last lines:\n{console_tail(console_log)}",
                    hint=exc.hint if isinstance(exc, LabError) else None,
                ) from exc
            raise
        log.info(
            "lab %s: ready in %.2fs (pid %d, %s, %s)",
            name, time.monotonic() - started, vm.pid, chosen, driver,
        )  # fmt: skip
        return vm


def _check_images(
    images: Sequence[tuple[str | Path, str]] | None,
    fstypes: tuple[str, ...] | None,
    rbd: bool | Sequence[int],
) -> list[tuple[Path, str]] | None:
    """``lab_up``'s ``images`` as absolute paths, checked against ``fstypes`` (see there)."""
    if images is None:
        return None
    if fstypes is None or len(fstypes) != len(images):
        raise UsageError("booting on given images needs their filesystems, one per image")
    if rbd:
        raise UsageError("a lab VM boots on given image files or on RBD images, not both")
    out = []
    for path, fmt in images:
        if fmt not in ("qcow2", "raw"):
            raise UsageError(f"{path}: a lab disk image is qcow2 or raw, not {fmt!r}")
        p = Path(path).absolute()
        if not p.is_file():
            raise NotFoundError(f"no image file {p}", code="image-not-found")
        out.append((p, fmt))
    return out


async def lab_down(
    name: str, *, purge: bool = False, force: bool = False, save: bool = False
) -> None:
    """Stop the lab VM ``name`` (QMP quit, then SIGTERM, then SIGKILL; under libvirt
    ``destroy``, after which the transient domain is gone) and remove its sockets; with
    ``purge`` delete its directory (disks, overlays, console log) too. Without ``purge`` the
    guest is flushed first (workload stopped, ``sync`` through the agent, at most
    :data:`FLUSH_TIMEOUT` s; a failure is logged as a warning) and the image on top of each
    disk is recorded for the next ``lab_up``. A QEMU or libvirt domain of the name that runs
    without a record (its ``lab_up`` was killed) is stopped too.

    The PID is checked to still be this VM's QEMU before any signal, a libvirt domain to be
    this VM's (by its metadata). Stopping a VM that is not running is not an error. Raises
    UsageError for a bad name, NotFoundError if there is no such lab VM, LabError if its record
    is unreadable or QEMU cannot be stopped, and (without ``purge``, unless ``force``: then a
    warning) before touching anything when QEMU holds a disk image of the VM that was deleted
    (:func:`_refuse_if_image_unlinked`): it would be lost when QEMU exits. With ``save`` such
    images are copied back instead, after the flush, from QEMU's open descriptors with the
    vCPUs paused (:func:`_save_unlinked`), then QEMU is stopped; LabError (QEMU left running,
    resumed) when that fails.
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
        if vm is None or not vm.running:
            await _stop_orphan(name, vmdir)
        if vm is not None and vm.running:
            tops: dict[str, str] | None = None
            answered = True
            how = "not stopped"
            unlinked: dict[str, str] = {}
            if not purge:
                unlinked = _refuse_if_image_unlinked(vm, vmdir, force=force, save=save)
            try:
                if not purge:
                    await _flush_guest(vm)  # stops the workload: resumed if QEMU stays up
                    tops, answered = await _query_tops(vm)
                if unlinked:
                    await _save_unlinked(vm, unlinked)
                how = await _stop(vm, qmp=answered)
                log.info("lab %s: QEMU %d stopped (%s)", name, vm.pid, how)
            finally:  # also on Ctrl-C: a VM left running keeps its workload running
                alive = _liveness(vm)[1]
                if alive and not purge:
                    await shielded(_resume_guest(vm))
            if not purge:
                _write_record(dataclasses.replace(vm, running=alive), tops)
                log.info("lab %s: recorded tops %s", name, tops)
            if alive:
                raise LabError(f"lab VM {name}: QEMU {vm.pid} could not be stopped ({how})")
        elif vm is not None and not purge:  # stopped already (e.g. killed): tops kept
            _write_record(vm, _read_tops(name))
        _remove_runtime_files(vmdir)
        if purge:
            if vm is not None:
                await _remove_rbd_images(vm)
            shutil.rmtree(vmdir, ignore_errors=True)
            if vmdir.exists():
                raise LabError(f"lab VM {name}: could not delete {vmdir}")


def _refuse_if_image_unlinked(vm: LabVm, vmdir: Path, *, force: bool, save: bool) -> dict[str, str]:
    """Raise LabError (with ``force``: log a warning) when the running QEMU of ``vm`` holds
    open a disk image that was deleted and is missing (a file in ``vmdir`` or a
    ``.qcow2``/``.img``/``.raw`` image, its link in /proc/PID/fd reading ``PATH (deleted)``, and
    nothing at PATH): it lives only in that open file, and is gone once QEMU exits. The message
    names each one and how to copy it back (once copied back, only a warning is logged).
    Returns what to save (path -> ``/proc/PID/fd/N``) with ``save``; else nothing."""
    from freezeframe.engine.chain import deleted_open_files

    pid = _liveness(vm)[0]
    if pid <= 0:
        return {}
    held = {
        path: fd
        for path, fd in deleted_open_files(pid).items()
        if Path(path).parent == vmdir or path.endswith((".qcow2", ".img", ".raw"))
    }
    images = {path: fd for path, fd in held.items() if not os.path.exists(path)}
    for path in sorted(held.keys() - images.keys()):
        log.warning(
            "lab %s: QEMU %d still writes to a deleted %s; a file of that name exists again "
            "(copied back?): what QEMU wrote since that copy is not in it",
            vm.name, pid, path,
        )  # fmt: skip
    if not images:
        return {}
    what = (
        f"QEMU {pid} holds deleted disk image(s) open: "
        + ", ".join(f"{path} ({fd})" for path, fd in sorted(images.items()))
        + ": they live only in QEMU's open file(s) and are lost when it exits"
    )
    if save:
        log.warning("lab %s: %s; saving them (--save)", vm.name, what)
        return images
    if force:
        log.warning("lab %s: %s; stopping it anyway (--force)", vm.name, what)
        return {}
    saves = "; ".join(f"cp --sparse=always {fd} {path}" for path, fd in sorted(images.items()))
    raise LabError(
        f"lab VM {vm.name}: not stopped: {what}",
        hint=f"add --save: lab down then copies them back after the guest's flush, with its "
        f"vCPUs paused; or copy them yourself while QEMU runs ({saves}; the active image: "
        "pause the guest first), then lab down again; or add --force to lose them",
    )


async def _save_unlinked(vm: LabVm, images: dict[str, str]) -> None:
    """Copy each deleted image back to its path (``path -> /proc/PID/fd/N``) from QEMU's open
    descriptor, with the vCPUs paused (QMP ``stop`` / libvirt suspend: QEMU drains and flushes
    its block layer first, so the copy of an image it writes to is whole); QEMU stays paused
    for the stop that follows. Each copy goes to a temporary name and is renamed into place.
    Raises LabError (the vCPUs resumed, temporary files removed) when anything fails."""
    driver = load_driver(vm.driver).from_config(vm.vm_config())
    try:
        async with driver:
            await driver.pause()
            try:
                for path, fd in sorted(images.items()):
                    tmp = f"{path}.ff-save"
                    try:
                        await run("cp", "--sparse=always", fd, tmp, timeout=3600, what=f"copy {fd}")
                        os.replace(tmp, path)
                    finally:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp)
                    log.warning("lab %s: saved %s (from %s)", vm.name, path, fd)
            except BaseException:
                await shielded(driver.resume())
                raise
    except (FreezeframeError, OSError) as exc:
        raise LabError(
            f"lab VM {vm.name}: not stopped: could not save its deleted disk image(s): {exc}",
            hint="copy them back by hand (see `lab down` without --save), or add --force",
        ) from exc


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


async def set_boot_images(name: str, tops: dict[str, str]) -> None:
    """Record, for the stopped lab VM ``name``, the image each disk (by device) boots from
    next — a restore's new overlays: the next :func:`lab_up` restarts on them (their chains
    must end at the disks' base images, as every recorded top's).

    Raises UsageError (bad name), NotFoundError (no such lab VM), LabError (it runs; an
    unknown device; its record is unreadable)."""
    validate_name(name)
    async with _lock(name):
        vm = _read_record(name)
        if vm is None:
            raise NotFoundError(f"no lab VM named {name}")
        if vm.running:
            raise LabError(f"lab VM {name} runs: stop it before choosing its boot images")
        unknown = sorted(set(tops) - {d.device for d in vm.disks})
        if unknown:
            raise LabError(f"lab VM {name} has no disk {', '.join(unknown)}")
        merged = {**(_read_tops(name) or {}), **tops}
        _write_record(vm, merged)
