"""The snapshot sequence: plan -> preflight -> prepare -> freeze -> cut -> thaw -> record.

This module is the only place that knows the order freeze -> cut -> thaw. Everything that can
happen before the freeze does (overlays created, the guest's dirty data flushed with
``guest-exec sync``, the write-ahead records written), so the freeze window holds only
``guest-fsfreeze-freeze``, one atomic cut and ``guest-fsfreeze-thaw``.

Guarantees:

- The thaw always runs once a freeze was sent: on errors, on cancellation (SIGINT/SIGTERM are
  turned into cancellation by the CLI), with its own timeout, confirmed with
  ``guest-fsfreeze-status``. A write-ahead *freeze intent* is stored before the freeze is sent
  and closed only when a thaw is confirmed; :mod:`.recover` closes what a killed process left.
- The freeze window is bounded by the freeze deadline (default 10 s): a freeze that does not
  answer in time is abandoned, a thaw is sent, and the policy decides (fail or fall back).
- ``required``: any problem fails the snapshot; nothing is switched and the overlays prepared
  are removed; the failed attempt is recorded with its reason.
- ``preferred``: the cut is still atomic; the record says ``crash`` and why.
- One snapshot at a time per VM (the catalog's VM lock).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog, make_owner
from freezeframe.engine.plan import Plan, check_exclusions, level_of, make_plan
from freezeframe.engine.timeline import Timeline
from freezeframe.errors import (
    AgentError,
    AgentTimeoutError,
    FreezeframeError,
    HypervisorError,
    SnapshotFailedError,
    UsageError,
)
from freezeframe.hypervisor import HypervisorDriver, PreparedCut, load_driver
from freezeframe.models import (
    AgentInfo,
    ConsistencyLevel,
    DiskInfo,
    FreezeIntent,
    FsFreezeState,
    GuestFilesystem,
    QuiescePolicy,
    SnapshotDisk,
    SnapshotFilesystem,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
    VmConfig,
)

__all__ = [
    "AgentProbe",
    "Hook",
    "SnapshotRequest",
    "Snapshotter",
    "new_snapshot_id",
    "open_driver",
]

log = logging.getLogger(__name__)

#: Commands the freeze needs from the agent.
FREEZE_COMMANDS = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")

T = TypeVar("T")
ProgressFn = Callable[[TimelineEvent], None]
#: Called with the VM's name and its connected driver; runs outside the freeze window.
Hook = Callable[[str, HypervisorDriver], Awaitable[None]]


def new_snapshot_id() -> str:
    """A short random id; snapshots are ordered by their creation time, not by id."""
    return secrets.token_hex(6)


def open_driver(cfg: VmConfig) -> HypervisorDriver:
    """An unconnected driver for ``cfg`` (its class loaded lazily by name).

    Raises UsageError (unknown driver, missing setting), DependencyError (optional module).
    """
    cls = load_driver(cfg.driver)
    return cls.from_config(cfg)


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """One call's wishes; None means "the VM's own setting"."""

    quiesce: QuiescePolicy | None = None
    freeze_timeout: float | None = None
    exclude_mounts: tuple[str, ...] = ()
    exclude_disks: tuple[str, ...] = ()
    #: Keep the guest frozen this long after the cut (demonstrations and kill tests); bounded
    #: by the freeze deadline.
    hold_frozen: float = 0.0


@dataclass(frozen=True, slots=True)
class AgentProbe:
    """What the engine learned from the agent before deciding anything."""

    path: str | None
    problem: str | None = None
    info: AgentInfo | None = None
    filesystems: list[GuestFilesystem] | None = None
    state: FsFreezeState | None = None
    ping_ms: float | None = None


@dataclass(slots=True)
class _Outcome:
    """Mutable result of the freeze/cut/thaw section, turned into the record at the end."""

    frozen_count: int | None = None
    freeze_problem: str | None = None
    cut_done: bool = False
    thaw_confirmed: bool = False
    thaw_note: str = ""
    notes: list[str] = field(default_factory=list)


class Snapshotter:
    """Takes snapshots of VMs registered in a catalog. Safe to reuse from a long-running server.

    ``thaw_timeout`` bounds one thaw + status confirmation; ``ping_timeout`` the preflight ping.
    With ``followup`` (servers), a thaw that could not be confirmed keeps being retried in the
    background for ``followup_for`` seconds (see :meth:`wait_followups`); without it (the CLI)
    the freeze intent stays open for ``freezeframe recover``.

    ``before_freeze`` runs after everything is prepared, right before the freeze is sent (for
    application quiescing, or to pause the vCPUs in a test); ``after_thaw`` after the thaw was
    confirmed. A hook that raises FreezeframeError fails the snapshot like any step.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        thaw_timeout: float = 5.0,
        ping_timeout: float = 2.0,
        preflush_timeout: float = 30.0,
        followup: bool = False,
        followup_for: float = 300.0,
        before_freeze: Hook | None = None,
        after_thaw: Hook | None = None,
    ) -> None:
        self.catalog = catalog
        self.thaw_timeout = thaw_timeout
        self.ping_timeout = ping_timeout
        self.preflush_timeout = preflush_timeout
        self.followup = followup
        self.followup_for = followup_for
        self.before_freeze = before_freeze
        self.after_thaw = after_thaw
        self._followups: set[asyncio.Task[bool]] = set()

    # ------------------------------------------------------------------ public

    async def snapshot(
        self, vm: str, request: SnapshotRequest | None = None, progress: ProgressFn | None = None
    ) -> SnapshotRecord:
        """Take one snapshot set of every disk of ``vm``; return the stored record.

        Raises NotFoundError (unknown VM), UsageError (bad request), BusyError (another
        snapshot of this VM is running), SnapshotFailedError (attempted and failed; the failed
        record is stored under its ``snapshot_id``). A successful record may still be weaker
        than asked (``preferred``): compare ``record.level``.
        """
        req = request or SnapshotRequest()
        cfg = await self.catalog.get_vm(vm)
        policy = req.quiesce or cfg.quiesce
        freeze_timeout = (
            req.freeze_timeout if req.freeze_timeout is not None else cfg.freeze_timeout
        )
        if not 0 < freeze_timeout <= 3600:
            raise UsageError(f"freeze timeout must be in (0, 3600] seconds, got {freeze_timeout:g}")
        if req.hold_frozen < 0:
            raise UsageError("hold time must not be negative")
        owner = make_owner()
        await self.catalog.acquire_vm_lock(vm, owner)
        try:
            return await self._snapshot_locked(cfg, req, policy, freeze_timeout, owner, progress)
        finally:
            await _shielded(self.catalog.release_vm_lock(vm, owner))

    async def wait_followups(self, timeout: float | None = None) -> bool:
        """Wait for background thaw follow-ups; True if every one confirmed a thaw."""
        tasks = list(self._followups)
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending and all(t.result() for t in done if not t.cancelled())

    async def probe_agent(self, cfg: VmConfig, driver: HypervisorDriver) -> AgentProbe:
        """Ask the agent everything the plan needs; never raises for agent trouble (it becomes
        ``problem``). The connection is closed again."""
        agent, probe = await self._connect_agent(cfg, driver)
        if agent is not None:
            await agent.close()
        return probe

    # ------------------------------------------------------------------ the sequence

    async def _snapshot_locked(
        self,
        cfg: VmConfig,
        req: SnapshotRequest,
        policy: QuiescePolicy,
        freeze_timeout: float,
        owner: str,
        progress: ProgressFn | None,
    ) -> SnapshotRecord:
        sid = new_snapshot_id()
        tl = Timeline(on_mark=progress)
        parent = await self.catalog.latest_snapshot(cfg.name)
        record = SnapshotRecord(
            id=sid,
            vm=cfg.name,
            created_at=datetime.now(UTC),
            status=SnapshotStatus.RUNNING,
            policy=policy,
            level=ConsistencyLevel.NONE,
            parent_id=parent.id if parent else None,
        )
        await self.catalog.begin_snapshot(record)
        tl.mark("started", f"policy {policy.value}, freeze deadline {freeze_timeout:g}s")
        try:
            record = await self._take(cfg, req, policy, freeze_timeout, owner, record, tl)
        except asyncio.CancelledError:
            failed = replace(
                record,
                status=SnapshotStatus.FAILED,
                error="interrupted (the guest was thawed if it had been frozen)",
                timeline=tl.events,
            )
            await _shielded(self.catalog.finish_snapshot(failed))
            raise
        except UsageError:
            # Bad input found once the VM was asked (an exclusion naming nothing): not an
            # attempt, nothing was touched; forget the write-ahead record.
            await _shielded(self.catalog.delete_snapshot(sid))
            raise
        except FreezeframeError as exc:
            tl.mark("failed", exc.message, notify=False)
            failed = replace(
                record,
                status=SnapshotStatus.FAILED,
                error=exc.message,
                timeline=tl.events,
                freeze_window_ms=tl.ms_between("freeze_sent", "thawed"),
            )
            if isinstance(exc, _Failed):
                failed = replace(failed, filesystems=exc.filesystems)
            await _shielded(self.catalog.finish_snapshot(failed))
            raise SnapshotFailedError(
                f"snapshot {sid} of {cfg.name} failed: {exc.message}",
                snapshot_id=sid,
                hint=exc.hint,
            ) from exc
        await self.catalog.finish_snapshot(record)
        return record

    async def _take(
        self,
        cfg: VmConfig,
        req: SnapshotRequest,
        policy: QuiescePolicy,
        freeze_timeout: float,
        owner: str,
        record: SnapshotRecord,
        tl: Timeline,
    ) -> SnapshotRecord:
        driver = open_driver(cfg)
        async with driver:
            disks = await driver.disks()
            if not disks:
                raise UsageError(f"VM {cfg.name} has no writable disk to snapshot")
            agent: GuestAgent | None = None
            probe = AgentProbe(path=None, problem="quiesce off")
            if policy is not QuiescePolicy.OFF:
                agent, probe = await self._connect_agent(cfg, driver)
            keep_agent_open = False
            try:
                plan = self._plan(cfg, req, policy, disks, probe)
                tl.mark("planned", _plan_summary(plan))
                if policy is QuiescePolicy.REQUIRED and plan.problems:
                    raise _Failed(
                        "quiesce is required but: " + "; ".join(plan.problems),
                        filesystems=tuple(d.as_record(frozen=False) for d in plan.filesystems),
                        hint=_hint_for(plan.problems),
                    )
                prepared = await driver.prepare_cut(record.id, list(plan.disks))
                tl.mark("prepared", f"{len(prepared.disks)} overlay(s) created before the freeze")
                outcome = _Outcome()
                try:
                    if plan.quiesce and agent is not None and probe.path is not None:
                        await self._preflush(agent, probe, tl)
                        keep_agent_open = await self._freeze_cut_thaw(
                            cfg, req, plan, agent, probe.path, driver, prepared,
                            freeze_timeout, owner, record.id, tl, outcome,
                        )  # fmt: skip
                    else:
                        tl.mark("cut_sent")
                        await driver.cut(prepared)
                        outcome.cut_done = True
                        tl.mark("cut", f"{len(prepared.disks)} disk(s) in one transaction")
                finally:
                    if not outcome.cut_done:
                        await _shielded(driver.abort(prepared))
                if not outcome.cut_done:  # pragma: no cover - _freeze_cut_thaw raises instead
                    raise _Failed("the cut did not happen")
                await driver.verify_cut(prepared)
                tl.mark("cut_verified", "every disk writes to its new overlay")
                evidence: tuple[str, ...] = ()
                if agent is not None and cfg.agent_log_path and outcome.frozen_count is not None:
                    evidence = await self._evidence(agent, cfg.agent_log_path, tl)
            finally:
                if agent is not None and not keep_agent_open:
                    await agent.close()

        return self._finish(record, plan, prepared, probe, outcome, evidence, tl)

    # ------------------------------------------------------------------ steps

    async def _connect_agent(
        self, cfg: VmConfig, driver: HypervisorDriver
    ) -> tuple[GuestAgent | None, AgentProbe]:
        if not cfg.agent:
            return None, AgentProbe(
                path=None,
                problem="the VM is configured without a guest agent "
                "(set hw_qemu_guest_agent=yes on the image / `freezeframe vm add --agent`)",
            )
        channel: str | None = None
        if driver.capabilities.agent_channel_check:
            channel = await driver.agent_channel()
            if channel is None:
                return None, AgentProbe(
                    path=None,
                    problem="the VM has no guest-agent channel (no virtio-serial port "
                    "org.qemu.guest_agent.0; set hw_qemu_guest_agent=yes on the image)",
                )
        path = cfg.qga_path or (channel if channel and channel.startswith("/") else None)
        if path is None:
            return None, AgentProbe(
                path=None, problem="no guest-agent socket path is known (vm add --qga PATH)"
            )
        agent = GuestAgent(path, timeout=self.thaw_timeout)
        try:
            await agent.connect(timeout=self.ping_timeout)
            t0 = asyncio.get_running_loop().time()
            await agent.ping(timeout=self.ping_timeout)
            ping_ms = (asyncio.get_running_loop().time() - t0) * 1000
            # Ask the freeze state first: while frozen, qemu-ga reports most commands disabled.
            state = await agent.fsfreeze_status()
            info = await agent.info()
            fs = await agent.get_fsinfo() if state is FsFreezeState.THAWED else None
        except AgentError as exc:
            await agent.close()
            return None, AgentProbe(
                path=path,
                problem=f"the guest agent does not answer ({exc.message}); "
                "install and start qemu-guest-agent in the guest",
            )
        if state is FsFreezeState.FROZEN:
            await agent.close()
            return None, AgentProbe(
                path=path,
                info=info,
                state=state,
                problem="the guest is already frozen by someone else (guest-fsfreeze-status); "
                "not touching it — if that freeze is stale, run `freezeframe recover`",
            )
        missing = [c for c in FREEZE_COMMANDS if not info.enabled(c)]
        if missing:
            await agent.close()
            return None, AgentProbe(
                path=path,
                info=info,
                state=state,
                problem="the guest agent has the freeze commands disabled or unsupported: "
                + ", ".join(missing),
            )
        return agent, AgentProbe(
            path=path, info=info, filesystems=fs, state=state, ping_ms=ping_ms, problem=None
        )

    def _plan(
        self,
        cfg: VmConfig,
        req: SnapshotRequest,
        policy: QuiescePolicy,
        disks: list[DiskInfo],
        probe: AgentProbe,
    ) -> Plan:
        excl_mounts = tuple(dict.fromkeys((*cfg.exclude_mounts, *req.exclude_mounts)))
        bad = check_exclusions(disks, probe.filesystems, excl_mounts, req.exclude_disks)
        if bad:
            raise UsageError("; ".join(bad))
        plan = make_plan(
            policy=policy,
            disks=disks,
            guest_fs=probe.filesystems,
            exclude_mounts=excl_mounts,
            exclude_disks=req.exclude_disks,
            agent_problem=probe.problem if policy is not QuiescePolicy.OFF else None,
        )
        if not plan.disks:
            raise UsageError("every disk is excluded: nothing to snapshot")
        return plan

    async def _preflush(self, agent: GuestAgent, probe: AgentProbe, tl: Timeline) -> None:
        """Flush the guest's dirty data while it still runs, so FIFREEZE has little to do."""
        if probe.info is None or not probe.info.enabled("guest-exec"):
            tl.mark("preflush_skipped", "guest-exec is disabled in the agent")
            return
        tl.mark("preflush_sent", "guest-exec sync")
        try:
            res = await agent.exec("sync", timeout=self.preflush_timeout, capture=False)
        except AgentError as exc:
            tl.mark("preflush_failed", exc.message)
            return
        tl.mark("preflushed", f"exit {res.exitcode}")

    async def _freeze_cut_thaw(
        self,
        cfg: VmConfig,
        req: SnapshotRequest,
        plan: Plan,
        agent: GuestAgent,
        qga_path: str,
        driver: HypervisorDriver,
        prepared: PreparedCut,
        freeze_timeout: float,
        owner: str,
        sid: str,
        tl: Timeline,
        out: _Outcome,
    ) -> bool:
        """The freeze window. Returns True when the agent must stay open for a follow-up."""
        if self.before_freeze is not None:
            await self.before_freeze(cfg.name, driver)
            tl.mark("before_freeze_hook")
        intent = await self.catalog.open_intent(cfg.name, sid, qga_path, owner)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + freeze_timeout
        cut_error: HypervisorError | None = None
        try:
            tl.mark("freeze_sent", "all filesystems" if plan.freeze_list is None else
                    "list: " + " ".join(plan.freeze_list))  # fmt: skip
            try:
                if plan.freeze_list is None:
                    count = await agent.fsfreeze_freeze(timeout=freeze_timeout)
                else:
                    count = await agent.fsfreeze_freeze_list(
                        plan.freeze_list, timeout=freeze_timeout
                    )
                out.frozen_count = count
                tl.mark("frozen", f"{count} filesystem(s) frozen, {plan.expected_frozen} expected")
                if count < plan.expected_frozen:
                    out.freeze_problem = (
                        f"the agent froze {count} of {plan.expected_frozen} filesystems; "
                        "which ones failed is not reported by the agent"
                    )
            except AgentTimeoutError:
                out.freeze_problem = (
                    f"the freeze did not complete within the {freeze_timeout:g} s deadline"
                )
                tl.mark("freeze_timeout", out.freeze_problem)
            except AgentError as exc:
                out.freeze_problem = f"the freeze failed: {exc.message}"
                tl.mark("freeze_failed", exc.message)

            if out.freeze_problem is not None and plan.policy is QuiescePolicy.REQUIRED:
                pass  # thaw below, then fail: nothing is switched
            else:
                if req.hold_frozen > 0 and out.freeze_problem is None:
                    hold = min(req.hold_frozen, max(0.0, deadline - loop.time()))
                    tl.mark("holding", f"{hold:.2f} s (requested)")
                    await asyncio.sleep(hold)
                tl.mark("cut_sent")
                try:
                    await driver.cut(prepared)
                    out.cut_done = True
                    tl.mark("cut", f"{len(prepared.disks)} disk(s) in one transaction")
                except HypervisorError as exc:
                    cut_error = exc
                    tl.mark("cut_failed", exc.message)
        finally:
            late = out.freeze_problem is not None and out.frozen_count is None
            budget = 1.5 if late else self.thaw_timeout
            out.thaw_confirmed = await _shielded(self._thaw(agent, tl, budget))
            if out.thaw_confirmed:
                await _shielded(self.catalog.close_intent(intent.id, "engine"))
        keep_open = False
        if out.thaw_confirmed and self.after_thaw is not None:
            await self.after_thaw(cfg.name, driver)
            tl.mark("after_thaw_hook")
        if not out.thaw_confirmed:
            out.thaw_note = (
                "thaw not confirmed: the guest may still be frozen or freeze late; the freeze "
                f"intent {intent.id} stays open"
            )
            if self.followup:
                self._start_followup(agent, intent, sid)
                out.thaw_note += " (a background follow-up keeps thawing)"
                keep_open = True
            else:
                out.thaw_note += " — run `freezeframe recover`"
            tl.mark("thaw_unconfirmed", out.thaw_note)
        if cut_error is not None:
            raise _Failed(f"the cut failed, nothing was switched: {cut_error.message}")
        if out.freeze_problem is not None and plan.policy is QuiescePolicy.REQUIRED:
            raise _Failed(
                f"quiesce is required but {out.freeze_problem}; nothing was switched"
                + (f"; {out.thaw_note}" if out.thaw_note else ""),
                hint="check the guest agent with `freezeframe doctor VM`",
            )
        return keep_open

    async def _thaw(self, agent: GuestAgent, tl: Timeline, budget: float) -> bool:
        """Send the thaw and confirm it with guest-fsfreeze-status, within ``budget`` seconds."""
        tl.mark("thaw_sent")
        try:
            async with asyncio.timeout(budget):
                n = await agent.fsfreeze_thaw(timeout=budget)
                tl.mark("thawed", f"{n} filesystem(s) thawed")
                state = await agent.fsfreeze_status(timeout=budget)
        except (AgentError, TimeoutError) as exc:
            msg = exc.message if isinstance(exc, AgentError) else f"no answer within {budget:g} s"
            tl.mark("thaw_failed", msg)
            log.warning("thaw not confirmed: %s", msg)
            return False
        confirmed = state is FsFreezeState.THAWED
        tl.mark("thaw_confirmed" if confirmed else "still_frozen", f"status {state.value}")
        return confirmed

    def _start_followup(self, agent: GuestAgent, intent: FreezeIntent, sid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._followup(agent, intent, sid))
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    async def _followup(self, agent: GuestAgent, intent: FreezeIntent, sid: str) -> bool:
        """Keep thawing until confirmed (a freeze that reaches the guest late is undone)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.followup_for
        tl = Timeline()
        try:
            while loop.time() < end:
                if await self._thaw(agent, tl, min(self.thaw_timeout, 2.0)):
                    await self.catalog.close_intent(intent.id, "engine-followup")
                    await self._note_on_record(sid, "thaw_confirmed", "by the engine's follow-up")
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            await agent.close()

    async def _note_on_record(self, sid: str, name: str, detail: str) -> None:
        rec = await self.catalog.get_snapshot(sid)
        ev = Timeline().mark(name, detail)
        await self.catalog.finish_snapshot(replace(rec, timeline=(*rec.timeline, ev)))

    async def _evidence(self, agent: GuestAgent, path: str, tl: Timeline) -> tuple[str, ...]:
        """The agent's log lines from the freeze window (qemu-ga --logfile --verbose)."""
        try:
            data = await agent.file_read(path, max_bytes=4 << 20)
        except AgentError as exc:
            tl.mark("evidence_unavailable", f"{path}: {exc.message}", notify=False)
            return ()
        return select_window_lines(data.decode(errors="replace"), tl)

    def _finish(
        self,
        record: SnapshotRecord,
        plan: Plan,
        prepared: PreparedCut,
        probe: AgentProbe,
        out: _Outcome,
        evidence: tuple[str, ...],
        tl: Timeline,
    ) -> SnapshotRecord:
        disks = tuple(
            SnapshotDisk(
                device=p.disk.device,
                node=p.disk.node,
                image=p.image_at_cut,
                format=p.disk.format,
                overlay=p.overlay_file,
                backend="qcow2-external",
                virtual_size=p.disk.virtual_size,
            )
            for p in prepared.disks
        )
        froze = out.frozen_count is not None and out.freeze_problem is None
        if plan.policy is QuiescePolicy.OFF:
            fs = tuple(d.as_record(frozen=False, reason="quiesce off") for d in plan.filesystems)
            level, why = ConsistencyLevel.CRASH, "quiesce off: not frozen, crash-consistent cut"
        elif not plan.quiesce:
            fs = tuple(d.as_record(frozen=False) for d in plan.filesystems)
            level = ConsistencyLevel.CRASH
            why = "not frozen: " + "; ".join(plan.problems or ("nothing to freeze",))
        elif not froze:
            reason = out.freeze_problem or "freeze failed"
            fs = tuple(
                d.as_record(frozen=False, reason=d.reason or reason) for d in plan.filesystems
            )
            level, why = ConsistencyLevel.CRASH, f"fell back to crash-consistent: {reason}"
        else:
            fs = tuple(d.as_record(frozen=d.freeze) for d in plan.filesystems)
            level = level_of(plan.disks, list(fs))
            frozen = [f.mountpoint for f in fs if f.frozen]
            not_frozen = [f"{f.mountpoint} ({f.reason})" for f in fs if not f.frozen]
            why = f"frozen: {', '.join(frozen) or 'none'}"
            if not_frozen:
                why += f"; not frozen: {', '.join(not_frozen)}"
            if plan.problems:
                why += "; " + "; ".join(plan.problems)
        if out.thaw_note:
            why += f"; {out.thaw_note}"
        return replace(
            record,
            status=SnapshotStatus.DONE,
            level=level,
            level_reason=why,
            disks=disks,
            filesystems=fs,
            timeline=tl.events,
            freeze_window_ms=tl.ms_between("freeze_sent", "thawed"),
            evidence=evidence,
        )


# ---------------------------------------------------------------------- helpers


class _Failed(FreezeframeError):
    """Internal: a snapshot failure with what is known about the filesystems."""

    def __init__(
        self,
        message: str,
        *,
        filesystems: tuple[SnapshotFilesystem, ...] = (),
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.filesystems = filesystems


async def _shielded(aw: Awaitable[T]) -> T:
    """Run ``aw`` to completion even if the caller is cancelled meanwhile, then re-raise the
    cancellation. Used for the thaw and for cleanup that must not be cut short."""
    task: asyncio.Future[T] = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def _plan_summary(plan: Plan) -> str:
    n_fs = sum(1 for d in plan.filesystems if d.freeze)
    return (
        f"{len(plan.disks)} disk(s), {n_fs} filesystem(s) to freeze, "
        f"predicted level {plan.predicted_level.value}"
        + (f", {len(plan.problems)} problem(s)" if plan.problems else "")
    )


def _hint_for(problems: tuple[str, ...]) -> str | None:
    text = " ".join(problems)
    if "without a guest agent" in text or "no guest-agent channel" in text:
        return "set hw_qemu_guest_agent=yes on the image, or use --quiesce preferred"
    if "does not answer" in text:
        return "install and start qemu-guest-agent in the guest (`freezeframe doctor VM`)"
    if "cannot be frozen" in text:
        return "exclude the mount point (--exclude-mount) or the disk (--exclude-disk)"
    return None


_LOG_TIME = re.compile(r"^(\d{9,11})\.(\d{1,6}):\s")
#: qemu-ga --verbose chatter that says nothing about the freeze.
_LOG_NOISE = re.compile(r"(?:dis|en)abling command:|process_event: called|received EOF")
_FREEZE_WORDS = ("fsfreeze", "freeze", "thaw")


def select_window_lines(text: str, tl: Timeline, skew: float = 2.0) -> tuple[str, ...]:
    """The agent's own account of the freeze, from its ``--verbose`` log.

    qemu-ga logs ``<sec>.<usec>: <level>: <msg>`` lines: ``read data ... guest-fsfreeze-freeze``
    (or ``-freeze-list``), ``disabling logging due to filesystem freeze``, then at the thaw
    ``logging re-enabled due to filesystem unfreeze`` (the thaw request arrives while logging
    is off, so it is not in the log).
    The guest clock may be off by a second or so (it starts from the RTC's whole seconds), so
    the window is found by content: the last freeze request logged within ``skew`` seconds of
    ours, up to the request that follows the thaw. Per-command enable/disable chatter is left
    out; anything but printable ASCII is replaced by ``?``. When no freeze request matches, the
    last lines that mention the freeze are returned.
    """
    start, end = tl.find("freeze_sent"), tl.find("thaw_sent") or tl.find("freeze_sent")
    if start is None or end is None:
        return ()
    lo, hi = start.t - timedelta(seconds=skew), end.t + timedelta(seconds=skew)
    lines = ["".join(c if " " <= c <= "~" else "?" for c in ln) for ln in text.splitlines()]
    stamped: list[tuple[datetime, str]] = []
    for line in lines:
        m = _LOG_TIME.match(line)
        if m is not None:
            sec = int(m.group(1)) + int(m.group(2).ljust(6, "0")) / 1e6
            stamped.append((datetime.fromtimestamp(sec, UTC), line))
    freezes = [
        i
        for i, (t, line) in enumerate(stamped)
        if "read data" in line and "guest-fsfreeze-freeze" in line and lo <= t <= hi
    ]
    if not freezes:
        return tuple([ln for ln in lines if any(w in ln for w in _FREEZE_WORDS)][-10:])
    first = freezes[-1]
    last = len(stamped) - 1
    # The thaw request itself is not logged (logging is off while frozen): the line saying
    # logging is back marks the thaw.
    thaw = next(
        (
            i
            for i in range(first, len(stamped))
            if "guest-fsfreeze-thaw" in stamped[i][1] or "unfreeze" in stamped[i][1]
        ),
        None,
    )
    if thaw is not None:
        nxt = next((i for i in range(thaw + 1, len(stamped)) if "read data" in stamped[i][1]), None)
        last = nxt - 1 if nxt is not None else last
    picked = [line for _, line in stamped[first : last + 1] if not _LOG_NOISE.search(line)]
    return tuple(picked[:100])
