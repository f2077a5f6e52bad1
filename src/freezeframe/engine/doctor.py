"""``doctor``: can this VM be snapshotted consistently right now, and if not, what to fix.

Runs the same preflight the snapshot runs (driver, agent probe, plan) without preparing,
freezing or switching anything, and turns each fact into a check: pass / warn / fail with a
one-line fix in the operator's words and the cloud's (``hw_qemu_guest_agent``,
``os_require_quiesce``). Ends with the consistency level a snapshot would reach now.

The catalog's VM lock is looked at first: while a snapshot of the VM is in progress, its QMP
and guest-agent sockets (one client each) belong to that snapshot, so doctor says so at once
and touches neither. When the agent does not answer, doctor tells a host-side socket problem
(the path given with ``vm add --qga`` does not exist or refuses connections) apart from a guest
without a running qemu-ga, and names QEMU's own agent socket (``query-chardev``) when the
registered path is another one: a FAIL (code ``agent-wrong-vm``), as ``snapshot create``
refuses it under every policy (the agent there is another guest's). A guest that is frozen
(``guest-fsfreeze-status``, asked before anything else) is one FAIL naming the open freeze
intent, if any, and ``freezeframe recover``; nothing is derived from ``guest-info`` then
(qemu-ga reports most commands disabled while frozen).

Open freeze intents come from the catalog before the hypervisor is asked, so they are reported
even when QEMU is gone or hung. A disk whose active image (``DiskInfo.file``) is the image at
the cut of a recorded snapshot of the VM (the VM restarted by hand on an older image) is a
FAIL (code ``image-held-by-snapshot``), as ``snapshot create`` refuses it: that snapshot is
being written to. A disk the guest mounts nothing from has its own warning line
(``no-mounted-filesystem``), and a crash-consistent prediction names why. The verdict never
contradicts a FAIL line: what ``create`` refuses (these two, a disk that cannot be cut, a
broken chain) predicts ``none``. A disk whose image chain (``DiskInfo.file`` and
``backing``) holds a local file missing on this host (deleted while QEMU keeps it open) is a
FAIL naming the open copy to save it from, and the predicted level is ``none``: ``snapshot
create`` refuses such a VM (BrokenChainError).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from freezeframe._aio import shielded
from freezeframe.catalog import Catalog, holder_is_dead, make_owner
from freezeframe.engine.chain import broken_chain_hint, missing_chain_files, open_copies
from freezeframe.engine.images import IMAGE_HELD, held_images, held_message
from freezeframe.engine.plan import UNFREEZABLE_FSTYPES, make_plan, map_filesystem_to_disk
from freezeframe.engine.snapshot import (
    AGENT_WRONG_VM,
    FREEZE_COMMANDS,
    Snapshotter,
    open_driver,
)
from freezeframe.errors import Action, BusyError, FreezeframeError, HypervisorError, Remedy
from freezeframe.hypervisor.base import HypervisorDriver
from freezeframe.models import (
    NO_MOUNTED_FILESYSTEM,
    ConsistencyLevel,
    FreezeIntent,
    FsFreezeState,
    QuiescePolicy,
    VmConfig,
)
from freezeframe.storage.backends import backend_name_for, load_backend

__all__ = ["DISK_NOT_CUTTABLE", "Check", "CheckStatus", "DoctorReport", "doctor"]

#: Code of a disk the driver cannot cut (a snapshot refuses it unless left out).
DISK_NOT_CUTTABLE = "disk-not-cuttable"


class CheckStatus(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a check status, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding; ``fix`` says what to do in neutral words, ``remedy`` names the operation
    that helps (each face renders it: the CLI as a command line)."""

    name: str
    status: CheckStatus
    detail: str
    fix: str = ""
    remedy: Remedy | None = None
    #: A stable code for findings that a snapshot acts on (``agent-wrong-vm``,
    #: ``image-held-by-snapshot``, ``no-mounted-filesystem``, ``disk-not-cuttable``); None else.
    code: str | None = None


@dataclass(frozen=True, slots=True)
class DoctorReport:
    vm: str
    policy: QuiescePolicy
    checks: tuple[Check, ...]
    predicted_level: ConsistencyLevel
    verdict: str  # one sentence

    @property
    def ok(self) -> bool:
        return all(c.status is not CheckStatus.FAIL for c in self.checks)


async def doctor(
    catalog: Catalog, vm: str, *, quiesce: QuiescePolicy | None = None
) -> DoctorReport:
    """Diagnose ``vm``. Raises NotFoundError for an unknown VM, CatalogError when the catalog
    cannot be read; everything else is a check."""
    cfg = await catalog.get_vm(vm)
    policy = quiesce or cfg.quiesce
    checks: list[Check] = []

    def add(
        name: str, ok: bool | None, detail: str, fix: str | _Fix = "", *, code: str | None = None
    ) -> None:
        """One check; ``fix`` is a neutral sentence, or one with the remedy that helps."""
        status = CheckStatus.PASS if ok else CheckStatus.WARN if ok is None else CheckStatus.FAIL
        text, remedy = (fix, None) if isinstance(fix, str) else fix
        checks.append(
            Check(name, status, detail, "" if ok else text, None if ok else remedy, code=code)
        )

    add(
        "policy",
        True,
        f"agent {'yes' if cfg.agent else 'no'} (hw_qemu_guest_agent), quiesce {policy.value}"
        f"{' (os_require_quiesce)' if policy is QuiescePolicy.REQUIRED else ''}, "
        f"freeze deadline {cfg.freeze_timeout:g} s",
    )
    held = await catalog.vm_lock_holder(cfg.name)
    if held is not None:
        owner, since = held
        when = since.isoformat(timespec="seconds")
        if not holder_is_dead(owner, since):
            add(
                "snapshot lock",
                None,
                f"a snapshot of {cfg.name} is in progress by {owner} since {when}: its QMP and "
                "guest-agent sockets serve one client each, so they are not checked now",
                ("check again once that snapshot has finished", Remedy(Action.DOCTOR, cfg.name)),
            )
            intents = await catalog.open_intents(cfg.name)
            if intents:
                add(
                    "freeze intents",
                    None,
                    f"{len(intents)} open (snapshot {intents[0].snapshot_id}): the guest is "
                    "frozen by that snapshot right now",
                    (
                        "nothing to do while it runs; if its process hangs, stop that process "
                        "(it holds the agent's only connection), then recover the VM",
                        Remedy(Action.RECOVER, cfg.name),
                    ),
                )
            return _report(
                cfg.name,
                policy,
                checks,
                ConsistencyLevel.NONE,
                f"a snapshot of {cfg.name} is in progress: another one would be refused now "
                "(busy); ask again when it has finished",
            )
        add(
            "snapshot lock",
            None,
            f"left by {owner} since {when}, a process that is gone",
            "nothing to do: the next snapshot takes the lock over",
        )
    # Holding the VM's lock: QMP and the agent serve one client each, so a snapshot starting
    # while doctor talks to them would fail or fall back; it is refused (busy) instead.
    owner = make_owner()
    try:
        await catalog.acquire_vm_lock(cfg.name, owner, purpose="doctor")
    except BusyError as exc:
        add(
            "snapshot lock",
            None,
            f"{exc.message}: its QMP and guest-agent sockets serve one client each, so they "
            "are not checked now",
            ("check again once that snapshot has finished", Remedy(Action.DOCTOR, cfg.name)),
        )
        return _report(
            cfg.name,
            policy,
            checks,
            ConsistencyLevel.NONE,
            f"a snapshot of {cfg.name} is in progress: ask again when it has finished",
        )
    try:
        return await _probe(catalog, cfg, policy, checks, add)
    finally:
        await shielded(catalog.release_vm_lock(cfg.name, owner))


async def _probe(
    catalog: Catalog,
    cfg: VmConfig,
    policy: QuiescePolicy,
    checks: list[Check],
    add: Callable[..., None],
) -> DoctorReport:
    """The checks that talk to the VM (hypervisor, agent), made while holding its lock."""
    # From the catalog first: an open intent is reported even when QEMU is gone or hung.
    intents = await catalog.open_intents(cfg.name)
    records = await catalog.list_snapshots(cfg.name)

    def add_intents() -> None:
        add(
            "freeze intents",
            not intents,
            "none open"
            if not intents
            else f"{len(intents)} open (snapshot {intents[0].snapshot_id}): guest may be frozen",
            ("thaw the guest and close the intents", Remedy(Action.RECOVER, cfg.name)),
        )

    driver = open_driver(cfg)
    try:
        await driver.connect()
    except HypervisorError as exc:
        add(
            "hypervisor",
            False,
            f"{driver.name}: {exc.message}",
            (
                exc.hint or "is the VM running? check its QMP socket path",
                exc.remedy or (None if exc.hint else Remedy(Action.LIST_VMS)),
            ),
        )
        add_intents()
        return _report(cfg.name, policy, checks, ConsistencyLevel.NONE)
    try:
        add("hypervisor", True, f"{driver.name} reachable")
        try:
            disks = await driver.disks()
        except HypervisorError as exc:
            add("disks", False, f"cannot list the VM's disks: {exc.message}", exc.hint or "")
            add_intents()
            return _report(cfg.name, policy, checks, ConsistencyLevel.NONE)
        if not disks:
            add("disks", False, "no writable disk", "attach a disk to snapshot")
        uncuttable: list[str] = []
        for d in disks:
            backend = backend_name_for(d)
            if backend == "qcow2":
                problem = driver.cut_problem(d, cfg.overlay_dir)
            else:  # the backend that owns the image says (rbd: its Ceph settings)
                try:
                    problem = load_backend(backend).for_vm(cfg, driver).cut_problem(d)
                except FreezeframeError as exc:
                    problem = exc.message
            if problem is not None:
                uncuttable.append(d.device)
            add(
                f"disk {d.device}",
                problem is None and driver.capabilities.atomic_multi_disk,
                f"{d.format} {d.file} (node {d.node}, {d.virtual_size // (1 << 20)} MiB), "
                f"backend {backend}: " + ("part of one atomic cut" if problem is None else problem),
                ("leave it out of the snapshot", _exclude_disk(cfg.name, d.device)),
                code=None if problem is None else DISK_NOT_CUTTABLE,
            )
        held = held_images(disks, records)
        for h in held:
            message, hint, remedy = held_message(cfg.name, [h])
            add(f"disk {h.device} image", False, message, (hint, remedy), code=IMAGE_HELD)
        broken = missing_chain_files(disks)
        copies = open_copies([f for files in broken.values() for f in files]) if broken else {}
        for dev, files in broken.items():
            add(
                f"disk {dev} chain",
                False,
                f"{', '.join(files)} {'is' if len(files) == 1 else 'are'} missing on this host, "
                "yet QEMU runs on it: deleted while open, what only it holds is lost when QEMU "
                "exits, and a snapshot would back onto it (refused)",
                broken_chain_hint({f: copies[f] for f in files if f in copies}),
            )
        driver_refusals: list[str] = []
        for found in await driver.checks():
            add(found.name, found.ok, found.detail, found.fix)
            if found.refuses and found.ok is False:
                driver_refusals.append(found.name)
        probe = await Snapshotter(catalog).probe_agent(cfg, driver, disks)
        channel = await _agent_chardev(driver) if cfg.agent else None
    finally:
        await driver.close()

    # While frozen, qemu-ga reports most commands disabled (guest-info): the freeze is the one
    # problem then, said once (with the intent, if freezeframe froze it), nothing derived from
    # guest-info.
    frozen = probe.state is FsFreezeState.FROZEN
    if not frozen:
        add_intents()
    agent_problem = probe.problem
    if not cfg.agent:
        add(
            "agent",
            False,
            "the VM is configured without a guest agent",
            (
                "set hw_qemu_guest_agent=yes on the image, install qemu-guest-agent in the guest "
                "and register the VM again with its agent socket, keeping its other options",
                Remedy(Action.ADD_VM, cfg.name, {"replace": "yes", "agent": "yes", "qga": "PATH"}),
            ),
        )
    elif probe.address is None:
        add(
            "agent channel",
            False,
            probe.problem or "no guest-agent channel",
            "set hw_qemu_guest_agent=yes on the image (adds a virtio-serial port "
            "org.qemu.guest_agent.0) and restart the VM",
        )
    elif probe.code == AGENT_WRONG_VM:
        # Refused under every policy: nothing was connected to (or the agent was let go).
        agent_problem = probe.problem or "the registered guest agent is not this VM's"
        socket = probe.address.startswith("/")
        host_problem = await _socket_problem(probe.address) if socket else None
        add(
            "agent channel",
            False,
            agent_problem + (f"; {probe.address} {host_problem}" if host_problem else ""),
            _socket_fix(cfg, probe.address, channel),
            code=AGENT_WRONG_VM,
        )
    else:
        socket = probe.address.startswith("/")  # QMP: a unix socket path we connect to
        host_problem = (
            None if probe.info is not None or not socket else await _socket_problem(probe.address)
        )
        # QEMU's agent socket, when it is not the registered one (QMP; libvirt owns its own)
        qemu_path = _elsewhere(probe.address, channel) if socket else None
        replace_fix = _socket_fix(cfg, probe.address, qemu_path)
        if host_problem is not None:
            # Nothing reached the guest: the host-side path is wrong, not the guest's package.
            agent_problem = f"the guest-agent socket {probe.address} {host_problem}"
            add("agent channel", False, agent_problem, _socket_fix(cfg, probe.address, channel))
        elif qemu_path is not None and probe.info is None:
            # Something listens at the registered path, but it is not this VM's agent port.
            agent_problem = (
                f"no guest agent answers at {probe.address} (the VM's registered agent "
                "socket), and QEMU's "
                f"agent port org.qemu.guest_agent.0 is at {qemu_path}"
            )
            add("agent channel", False, agent_problem, replace_fix)
        elif qemu_path is not None:
            add(
                "agent channel",
                None,
                f"the VM is registered with agent socket {probe.address}, but QEMU's agent port "
                f"org.qemu.guest_agent.0 is at {qemu_path}: the agent answering at "
                f"{probe.address} may be another VM's (its freeze would not quiesce this one), "
                "unless it reaches the same port another way (a proxy, QEMU in another mount "
                "namespace)",
                replace_fix,
            )
        elif socket:
            add(
                "agent channel",
                True,
                f"virtio-serial port org.qemu.guest_agent.0 at {probe.address} "
                "(accepts connections)",
            )
        host_side = host_problem is not None or (qemu_path is not None and probe.info is None)
        if probe.info is None:
            if not host_side:  # else said above: the host-side path, not the guest's agent
                if probe.code == "vm-not-running":
                    fix = "resume the VM (QMP `cont`, `virsh resume`): a paused guest cannot answer"
                elif probe.code == "agent-protocol":
                    fix = (
                        "check what serves the agent channel (it is no working qemu-ga): "
                        "restart qemu-guest-agent in the guest"
                    )
                else:
                    fix = ""
                add(
                    "agent",
                    False,
                    probe.problem or "the agent does not answer",
                    fix
                    or "install and start qemu-guest-agent in the guest "
                    "(apt-get install qemu-guest-agent; systemctl enable --now "
                    "qemu-guest-agent); or another client holds the socket (one at a time)",
                )
        else:
            ping = f", ping {probe.ping_ms:.1f} ms" if probe.ping_ms is not None else ""
            add("agent", True, f"qemu-ga {probe.info.version} answers{ping}")
            if frozen:
                agent_problem = _frozen_detail(intents)
                add("guest state", False, agent_problem, _frozen_fix(cfg.name, intents))
            else:
                missing = [c for c in FREEZE_COMMANDS if not probe.info.enabled(c)]
                add(
                    "freeze commands",
                    not missing,
                    "guest-fsfreeze-freeze/thaw/status enabled"
                    if not missing
                    else f"disabled or unsupported: {', '.join(missing)}",
                    "remove them from qemu-ga's --block-rpcs / blacklist in the guest",
                )
                add(
                    "pre-flush",
                    True if probe.info.enabled("guest-exec") else None,
                    "guest-exec enabled: dirty data is flushed before the freeze"
                    if probe.info.enabled("guest-exec")
                    else "guest-exec disabled: the freeze itself flushes dirty data (longer "
                    "window)",
                    "allow guest-exec in qemu-ga to shorten the freeze window",
                )
        for fs in probe.filesystems or []:
            disk = map_filesystem_to_disk(fs, tuple(disks))
            where = f"disk {disk.device}" if disk else "no snapshotted disk"
            freezable = fs.fstype not in UNFREEZABLE_FSTYPES
            excluded = fs.mountpoint in cfg.exclude_mounts
            add(
                f"fs {fs.mountpoint}",
                True if freezable else (None if excluded or disk is None else False),
                f"{fs.fstype} on {where}: "
                + (
                    "can be frozen"
                    if freezable
                    else "cannot be frozen (no FIFREEZE)" + (", excluded" if excluded else "")
                ),
                (
                    f"exclude mount point {fs.mountpoint} (that disk stays crash-consistent) "
                    f"or disk {disk.device if disk else '?'} from the snapshot",
                    Remedy(Action.EXCLUDE_MOUNT, cfg.name, {"mount": fs.mountpoint}),
                ),
            )

    plan = make_plan(
        policy=policy,
        disks=disks,
        guest_fs=probe.filesystems,
        exclude_mounts=cfg.exclude_mounts,
        agent_problem=agent_problem,
    )
    for dev in plan.raw_disks:
        add(
            f"disk {dev} filesystems",
            None,
            "the guest mounts nothing from it (swap, raw use or unmounted): it is cut as raw "
            f"data, crash-level for that disk ({NO_MOUNTED_FILESYSTEM}); the snapshot's level "
            "is that of the mounted filesystems",
            (
                "leave it out of the snapshot if it holds nothing worth keeping",
                _exclude_disk(cfg.name, dev),
            ),
            code=NO_MOUNTED_FILESYSTEM,
        )
    refused = [f"the registered guest agent is not this VM's ({AGENT_WRONG_VM})"]
    if probe.code != AGENT_WRONG_VM:
        refused = []
    refused += [
        f"disk {h.device} writes to an image snapshot {', '.join(h.snapshot_ids)} holds "
        f"({IMAGE_HELD})"
        for h in held
    ]
    refused += [f"disk {dev} cannot be cut ({DISK_NOT_CUTTABLE})" for dev in uncuttable]
    refused += driver_refusals
    if refused:  # create refuses these whatever the policy
        return _report(
            cfg.name,
            policy,
            checks,
            ConsistencyLevel.NONE,
            f"a snapshot of {cfg.name} would be refused now: "
            + "; ".join(refused)
            + " (see the FAIL lines)",
        )
    if broken:  # a snapshot is refused whatever the policy (BrokenChainError)
        return _report(
            cfg.name,
            policy,
            checks,
            ConsistencyLevel.NONE,
            f"a snapshot of {cfg.name} would be refused now: a disk's image chain has a "
            "missing file (see the FAIL above)",
        )
    if frozen:  # one FAIL says it all; a snapshot would not freeze (or fail under required)
        level = ConsistencyLevel.NONE if policy is QuiescePolicy.REQUIRED else plan.predicted_level
        return _report(
            cfg.name,
            policy,
            checks,
            level,
            f"the guest of {cfg.name} is frozen: thaw it first (a {policy.value} snapshot now "
            + (
                "would fail)"
                if level is ConsistencyLevel.NONE
                else f"would be {level.value}-consistent, nothing frozen by it)"
            ),
        )
    if policy is QuiescePolicy.REQUIRED and plan.problems:
        level = ConsistencyLevel.NONE
        add(
            "policy outcome",
            False,
            "this VM cannot be snapshotted with quiesce required (os_require_quiesce): "
            + "; ".join(plan.problems),
            (
                "fix the failing checks above, or snapshot with quiesce preferred "
                "(crash-consistent where the guest cannot be frozen)",
                Remedy(Action.SET_QUIESCE, cfg.name, {"quiesce": QuiescePolicy.PREFERRED.value}),
            ),
        )
    else:
        level = plan.predicted_level
        if plan.problems and level is ConsistencyLevel.CRASH:  # say why, on a line of its own
            add(
                "policy outcome",
                None,
                f"crash-consistent (quiesce {policy.value}): " + "; ".join(plan.problems),
                "fix the checks above to reach filesystem-consistent",
            )
    return _report(cfg.name, policy, checks, level)


async def _agent_chardev(driver: HypervisorDriver) -> str | None:
    """The unix socket path of the VM's agent port as QEMU reports it, or None."""
    if not driver.capabilities.agent_channel_check:
        return None
    try:
        channel = await driver.agent_channel()
    except HypervisorError:
        return None
    return channel if channel and channel.startswith("/") else None


async def _socket_problem(path: str) -> str | None:
    """Why the host-side unix socket ``path`` cannot reach any agent: it does not exist, is
    no socket or refuses connections. None when it accepts a connection (closed at once)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist on this host"
    except OSError as exc:
        return f"cannot be looked at: {exc.strerror or exc}"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    try:
        async with asyncio.timeout(2):
            _, writer = await asyncio.open_unix_connection(path)
    except ConnectionRefusedError:
        return "refuses connections (nothing listens: a socket left by a VM that stopped?)"
    except (OSError, TimeoutError) as exc:
        return f"cannot be connected to ({exc or type(exc).__name__})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def _elsewhere(path: str, channel: str | None) -> str | None:
    """QEMU's agent socket ``channel`` when it is not the socket at ``path``; else None."""
    if channel is None or channel == path:
        return None
    try:
        if os.path.samefile(path, channel):  # another name of the same socket (a symlink)
            return None
    except OSError:
        pass
    return channel


def _frozen_detail(intents: list[FreezeIntent]) -> str:
    detail = "the guest is frozen (guest-fsfreeze-status)"
    if not intents:
        return detail + ": no freeze intent of freezeframe is open, another tool froze it"
    i = intents[0]
    return (
        f"{detail}: freeze intent {i.id} of snapshot {i.snapshot_id} by {i.owner} since "
        f"{i.opened_at.isoformat(timespec='seconds')} is still open (a snapshot process that "
        "died or was killed before its thaw)"
    )


#: A fix: a neutral sentence and the operation that helps (rendered by each face).
_Fix = tuple[str, Remedy | None]


def _exclude_disk(vm: str, device: str) -> Remedy:
    """The remedy "a snapshot of ``vm`` without disk ``device``"."""
    return Remedy(Action.EXCLUDE_DISK, vm, {"disk": device})


def _frozen_fix(vm: str, intents: list[FreezeIntent]) -> _Fix:
    if intents:
        return "thaw the guest and close the intent", Remedy(Action.RECOVER, vm)
    return (
        "this freeze is not recorded by freezeframe (recover handles recorded ones): thaw it "
        "with guest-fsfreeze-thaw once the tool that froze it is done",
        Remedy(Action.RECOVER, vm),
    )


def _socket_fix(cfg: VmConfig, path: str, channel: str | None) -> _Fix:
    if channel is not None and channel != path:
        return (
            f"QEMU says the VM's agent socket is {channel}: register it (keep the VM's other "
            "options)",
            Remedy(Action.ADD_VM, cfg.name, {"replace": "yes", "qga": channel}),
        )
    return (
        "is the VM running? register the host path of the VM's agent socket (keep its other "
        "options): the path of QEMU's `-chardev socket,path=PATH,server=on,wait=off,id=qga0` "
        "behind `-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`",
        Remedy(Action.ADD_VM, cfg.name, {"replace": "yes", "qga": "PATH"}),
    )


def _report(
    vm: str,
    policy: QuiescePolicy,
    checks: list[Check],
    level: ConsistencyLevel,
    verdict: str = "",
) -> DoctorReport:
    if not verdict and level is ConsistencyLevel.NONE:
        verdict = f"a {policy.value} snapshot of {vm} would fail now"
    elif not verdict:
        verdict = f"a snapshot of {vm} would be {level.value}-consistent now"
    return DoctorReport(vm, policy, tuple(checks), level, verdict)
