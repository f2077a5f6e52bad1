"""``doctor``: can this VM be snapshotted consistently right now, and if not, what to fix.

Runs the same preflight the snapshot runs (driver, agent probe, plan) without preparing,
freezing or switching anything, and turns each fact into a check: pass / warn / fail with a
one-line fix in the operator's words and the cloud's (``hw_qemu_guest_agent``,
``os_require_quiesce``). Ends with the consistency level a snapshot would reach now.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from freezeframe.catalog import Catalog
from freezeframe.engine.plan import UNFREEZABLE_FSTYPES, make_plan, map_filesystem_to_disk
from freezeframe.engine.snapshot import FREEZE_COMMANDS, Snapshotter, open_driver
from freezeframe.errors import HypervisorError
from freezeframe.models import ConsistencyLevel, FsFreezeState, QuiescePolicy

__all__ = ["Check", "CheckStatus", "DoctorReport", "doctor"]


class CheckStatus(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a check status, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: CheckStatus
    detail: str
    fix: str = ""


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
    """Diagnose ``vm``. Raises NotFoundError for an unknown VM; everything else is a check."""
    cfg = await catalog.get_vm(vm)
    policy = quiesce or cfg.quiesce
    checks: list[Check] = []

    def add(name: str, ok: bool | None, detail: str, fix: str = "") -> None:
        status = CheckStatus.PASS if ok else CheckStatus.WARN if ok is None else CheckStatus.FAIL
        checks.append(Check(name, status, detail, "" if ok else fix))

    add(
        "policy",
        True,
        f"agent {'yes' if cfg.agent else 'no'} (hw_qemu_guest_agent), quiesce {policy.value}"
        f"{' (os_require_quiesce)' if policy is QuiescePolicy.REQUIRED else ''}, "
        f"freeze deadline {cfg.freeze_timeout:g} s",
    )
    driver = open_driver(cfg)
    try:
        await driver.connect()
    except HypervisorError as exc:
        add(
            "hypervisor",
            False,
            f"{driver.name}: {exc.message}",
            exc.hint or "is the VM running? check its QMP socket path (`freezeframe vm list`)",
        )
        return _report(cfg.name, policy, checks, ConsistencyLevel.NONE)
    try:
        add("hypervisor", True, f"{driver.name} reachable")
        try:
            disks = await driver.disks()
        except HypervisorError as exc:
            add("disks", False, f"cannot list the VM's disks: {exc.message}", exc.hint or "")
            return _report(cfg.name, policy, checks, ConsistencyLevel.NONE)
        if not disks:
            add("disks", False, "no writable disk", "attach a disk to snapshot")
        for d in disks:
            problem = driver.cut_problem(d)
            add(
                f"disk {d.device}",
                problem is None and driver.capabilities.atomic_multi_disk,
                f"{d.format} {d.file} (node {d.node}, {d.virtual_size // (1 << 20)} MiB): "
                + ("part of one atomic cut" if problem is None else problem),
                f"leave it out with --exclude-disk {d.device}",
            )
        intents = await catalog.open_intents(cfg.name)
        add(
            "freeze intents",
            not intents,
            "none open"
            if not intents
            else f"{len(intents)} open (snapshot {intents[0].snapshot_id}): guest may be frozen",
            "run `freezeframe recover`",
        )
        probe = await Snapshotter(catalog).probe_agent(cfg, driver)
    finally:
        await driver.close()

    if not cfg.agent:
        add(
            "agent",
            False,
            "the VM is configured without a guest agent",
            "set hw_qemu_guest_agent=yes on the image and install qemu-guest-agent in the guest "
            "(`freezeframe vm add NAME --agent --qga PATH`)",
        )
    elif probe.path is None:
        add(
            "agent channel",
            False,
            probe.problem or "no guest-agent channel",
            "set hw_qemu_guest_agent=yes on the image (adds a virtio-serial port "
            "org.qemu.guest_agent.0) and restart the VM",
        )
    else:
        add("agent channel", True, f"virtio-serial port org.qemu.guest_agent.0 at {probe.path}")
        if probe.info is None:
            add(
                "agent",
                False,
                probe.problem or "the agent does not answer",
                "install and start qemu-guest-agent in the guest "
                "(apt-get install qemu-guest-agent; systemctl enable --now qemu-guest-agent)",
            )
        else:
            ping = f", ping {probe.ping_ms:.1f} ms" if probe.ping_ms is not None else ""
            add("agent", True, f"qemu-ga {probe.info.version} answers{ping}")
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
                else "guest-exec disabled: the freeze itself flushes dirty data (longer window)",
                "allow guest-exec in qemu-ga to shorten the freeze window",
            )
            if probe.state is FsFreezeState.FROZEN:
                add(
                    "guest state",
                    False,
                    "the guest is frozen right now",
                    "run `freezeframe recover` (or guest-fsfreeze-thaw)",
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
                f"--exclude-mount {fs.mountpoint} (that disk stays crash-consistent) or "
                f"--exclude-disk {disk.device if disk else '?'}",
            )

    plan = make_plan(
        policy=policy,
        disks=disks,
        guest_fs=probe.filesystems,
        exclude_mounts=cfg.exclude_mounts,
        agent_problem=probe.problem,
    )
    if policy is QuiescePolicy.REQUIRED and plan.problems:
        level = ConsistencyLevel.NONE
        add(
            "policy outcome",
            False,
            "os_require_quiesce is set: this VM cannot be snapshotted until "
            + "; ".join(plan.problems),
            "fix the failing checks above, or use --quiesce preferred",
        )
    else:
        level = plan.predicted_level
    return _report(cfg.name, policy, checks, level)


def _report(
    vm: str, policy: QuiescePolicy, checks: list[Check], level: ConsistencyLevel
) -> DoctorReport:
    if level is ConsistencyLevel.NONE:
        verdict = f"a {policy.value} snapshot of {vm} would fail now"
    else:
        verdict = f"a snapshot of {vm} would be {level.value}-consistent now"
    return DoctorReport(vm, policy, tuple(checks), level, verdict)
