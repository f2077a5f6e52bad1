"""Schedules and retention: ``schedule set/list/remove``, ``snapshot prune`` and the scheduler
that ``freezeframe serve`` runs.

Owns what a schedule asks (:class:`ScheduleSpec` -> the catalog's
:class:`~freezeframe.models.ScheduleRecord`), how a prune applies the keep rules of
:mod:`freezeframe.engine.retention` to a VM's snapshots and deletes what they prune, and the
scheduler loop (:class:`Scheduler`). The :class:`~freezeframe.service.Service` methods are
thin calls into this module.

Prune, per VM with a schedule (the rules are the schedule's):
- every snapshot gets a decision with a stable ``reason`` code (:class:`PruneItem`): kept by
  a rule (``keep-last`` ...), kept because a disk writes to its image (``in-use``), because
  it runs (``running``), ... or pruned (``superseded-in-slot``, ``not-selected``,
  ``failed-attempt``, ``failed-verification``);
- a pruned snapshot is deleted through :meth:`Service.delete_snapshot` (the VM's lock, the
  chain kept valid); a refusal (``layer-shared``, ``vm-busy``, ``snapshot-in-use`` ...)
  is reported for that snapshot as kept, because <that code> (``refused``), never aborts the
  prune; ``dry_run`` deletes nothing. The report's ``code``: ``done``, or ``delete-refused``
  when any delete was refused.

Scheduler (:class:`Scheduler`): every ``poll`` seconds at most (sooner when a schedule is due
sooner) it reads the schedules; one that is due (:func:`~freezeframe.engine.retention.due`:
never run, or its last run + interval is past -- a server that was down runs it ONCE, not once
per missed slot) is claimed in the catalog (compare-and-set of ``last_run_at``: of several
servers on one catalog exactly one runs a slot), snapshotted through the same job machinery
as ``POST /v1/vms/{vm}/snapshots`` (``start``; ``vm-busy`` etc. apply), then pruned; the run's
outcome is recorded on the schedule. :meth:`Scheduler.stop` claims nothing more, lets a
running snapshot finish (its thaw is never cut short), skips the prunes not started and
stops a running prune before its next delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from freezeframe.catalog import holder_is_dead, make_owner
from freezeframe.engine.retention import (
    Candidate,
    KeepRules,
    due,
    parse_every,
    plan_prune,
)
from freezeframe.errors import FreezeframeError, UsageError
from freezeframe.models import (
    QuiescePolicy,
    ScheduleRecord,
    SnapshotStatus,
    VerifyVerdict,
)
from freezeframe.service._jobs import SnapshotJob
from freezeframe.service._results import CreateSnapshot

if TYPE_CHECKING:
    from freezeframe.service._service import Service

__all__ = [
    "PRUNE_DONE",
    "PRUNE_REFUSED",
    "SHUTTING_DOWN",
    "PruneItem",
    "PruneReport",
    "ScheduleSpec",
    "ScheduleView",
    "Scheduler",
]

log = logging.getLogger(__name__)

#: A prune's code: every decision carried out (or a dry run).
PRUNE_DONE = "done"
#: A prune's code: at least one delete was refused (those snapshots are kept; see ``refused``).
PRUNE_REFUSED = "delete-refused"
#: Reason of a snapshot a prune did not delete because the server was stopping.
SHUTTING_DOWN = "shutting-down"

#: The shortest interval a schedule may have.
MIN_EVERY = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What ``schedule set`` asks: a snapshot every ``every`` (``30s``, ``1h``, ``1h30m``),
    the keep rules (None: off; all off keeps everything) and the quiesce policy (None: the
    VM's own)."""

    every: str
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    quiesce: QuiescePolicy | None = None
    enabled: bool = True

    def rules(self) -> KeepRules:
        """The keep rules. Raises UsageError (``invalid-keep-rule``)."""
        return rules_of(self)


def rules_of(rec: ScheduleRecord | ScheduleSpec) -> KeepRules:
    """The keep rules of a schedule, asked or stored. Raises UsageError
    (``invalid-keep-rule``)."""
    return KeepRules(
        last=rec.keep_last,
        hourly=rec.keep_hourly,
        daily=rec.keep_daily,
        weekly=rec.keep_weekly,
        monthly=rec.keep_monthly,
        yearly=rec.keep_yearly,
    )


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """A schedule as the faces show it: the stored ``schedule``, its interval as text
    (``every``), the rules that are on (``rules``: ``{"keep-last": 3}``), when the next run
    is due (``next_run_at``; ``due``: now or overdue), whether a run is under way
    (``running``: claimed, not finished, by a process not known to be gone)."""

    schedule: ScheduleRecord
    every: str
    rules: dict[str, int]
    next_run_at: datetime
    due: bool
    running: bool

    @classmethod
    def of(cls, rec: ScheduleRecord, now: datetime | None = None) -> ScheduleView:
        every = timedelta(seconds=rec.every_s)
        d = due(every, rec.last_run_at, now or datetime.now(UTC))
        return cls(
            schedule=rec,
            every=_every_text(every),
            rules=rules_of(rec).as_dict(),
            next_run_at=d.at,
            due=d.run,
            running=rec.last_run_at is not None
            and rec.last_finished_at is None
            and not holder_is_dead(rec.run_owner or "", rec.last_run_at),
        )


def _every_text(every: timedelta) -> str:
    left = int(every.total_seconds())
    parts = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


@dataclass(frozen=True, slots=True)
class PruneItem:
    """One snapshot's fate in a prune: ``keep`` or not, ``reason`` (a retention reason code,
    or the code of a refused delete: then ``refused`` is that code and the snapshot is kept),
    ``slot`` (the rule's slot when a rule decided), ``detail`` (words), ``deleted`` (it is
    gone: never in a dry run)."""

    id: str
    vm: str
    created_at: datetime
    status: SnapshotStatus
    verdict: VerifyVerdict | None
    keep: bool
    reason: str
    slot: str | None = None
    detail: str = ""
    deleted: bool = False
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune decided and did: ``code`` (``done``, ``delete-refused``), ``dry_run``,
    the VMs pruned with their rules (``rules``: VM -> ``{"keep-last": 3}``) and one item per
    snapshot, oldest first."""

    code: str
    dry_run: bool
    rules: dict[str, dict[str, int]]
    items: tuple[PruneItem, ...]

    @property
    def deleted(self) -> list[str]:
        return [i.id for i in self.items if i.deleted]

    @property
    def refused(self) -> list[PruneItem]:
        return [i for i in self.items if i.refused]

    def summary(self) -> str:
        """``deleted 2, kept 3, refused 1 (layer-shared)`` (``would delete`` if dry)."""
        kept = sum(1 for i in self.items if i.keep)
        gone = sum(1 for i in self.items if not i.keep)
        words = f"{'would delete' if self.dry_run else 'deleted'} {gone}, kept {kept}"
        refused = self.refused
        if refused:
            codes = ", ".join(sorted({i.refused or "" for i in refused}))
            words += f", refused {len(refused)} ({codes})"
        return words


# ---------------------------------------------------------------------------- service calls


async def set_schedule(svc: Service, vm: str, spec: ScheduleSpec) -> ScheduleView:
    """Create or replace ``vm``'s schedule. Raises UsageError (``invalid-interval``,
    ``invalid-keep-rule``), NotFoundError (``vm-not-found``), CatalogError."""
    every = parse_every(spec.every)
    if every < MIN_EVERY or every.total_seconds() != int(every.total_seconds()):
        raise UsageError(
            f"the interval must be whole seconds, at least 1s: {spec.every!r}",
            code="invalid-interval",
        )
    spec.rules()  # validates
    rec = ScheduleRecord(
        vm=vm,
        every_s=int(every.total_seconds()),
        keep_last=spec.keep_last or None,
        keep_hourly=spec.keep_hourly or None,
        keep_daily=spec.keep_daily or None,
        keep_weekly=spec.keep_weekly or None,
        keep_monthly=spec.keep_monthly or None,
        keep_yearly=spec.keep_yearly or None,
        quiesce=spec.quiesce,
        enabled=spec.enabled,
    )
    return ScheduleView.of(await (await svc.catalog()).set_schedule(rec))


async def get_schedule(svc: Service, vm: str) -> ScheduleView:
    """``vm``'s schedule. Raises NotFoundError (``schedule-not-found``), CatalogError."""
    return ScheduleView.of(await (await svc.catalog()).get_schedule(vm))


async def list_schedules(svc: Service) -> list[ScheduleView]:
    """Every schedule, by VM name. Raises CatalogError."""
    now = datetime.now(UTC)
    return [ScheduleView.of(r, now) for r in await (await svc.catalog()).list_schedules()]


async def remove_schedule(svc: Service, vm: str) -> None:
    """Forget ``vm``'s schedule (its snapshots stay). Raises NotFoundError
    (``schedule-not-found``), CatalogError."""
    await (await svc.catalog()).remove_schedule(vm)


async def prune(
    svc: Service,
    vm: str | None = None,
    *,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
) -> PruneReport:
    """Apply the keep rules of ``vm``'s schedule (of every schedule's VM when None) to its
    snapshots and delete what they prune (nothing with ``dry_run``). ``stop``: once set, no
    further delete starts (the rest is reported kept, reason ``shutting-down``).

    Raises NotFoundError (``schedule-not-found``: ``vm`` has no schedule), CatalogError; a
    refused delete is reported in the item, never raised."""
    cat = await svc.catalog()
    schedules = [await cat.get_schedule(vm)] if vm is not None else await cat.list_schedules()
    items: list[PruneItem] = []
    rules: dict[str, dict[str, int]] = {}
    for sched in schedules:
        r = rules_of(sched)
        rules[sched.vm] = r.as_dict()
        items += await _prune_vm(svc, sched.vm, r, dry_run=dry_run, stop=stop)
    code = PRUNE_REFUSED if any(i.refused for i in items) else PRUNE_DONE
    return PruneReport(code, dry_run, rules, tuple(items))


async def _prune_vm(
    svc: Service, vm: str, rules: KeepRules, *, dry_run: bool, stop: asyncio.Event | None
) -> list[PruneItem]:
    cat = await svc.catalog()
    summaries = await cat.list_snapshot_summaries(vm)  # oldest first
    if not summaries:
        return []
    in_use = await _in_use(svc, vm)
    cands = [
        Candidate(s.id, s.created_at, s.status, s.verdict, in_use=s.id in in_use) for s in summaries
    ]
    decisions = plan_prune(cands, rules)
    items: list[PruneItem] = []
    for s, d in zip(summaries, decisions, strict=True):
        detail = d.detail
        if s.id in in_use and d.reason.value == "in-use":
            detail = f"{in_use[s.id]} ({d.detail})"
        item = PruneItem(
            id=s.id,
            vm=vm,
            created_at=s.created_at,
            status=s.status,
            verdict=s.verdict,
            keep=d.keep,
            reason=d.reason.value,
            slot=d.slot,
            detail=detail,
        )
        if not d.keep and not dry_run:
            item = await _delete(svc, item, stop)
        items.append(item)
    return items


async def _delete(svc: Service, item: PruneItem, stop: asyncio.Event | None) -> PruneItem:
    """Delete ``item``'s snapshot; a refusal keeps it, with the refusal's code as reason."""
    said = f"the rules prune it ({item.reason})"
    if stop is not None and stop.is_set():
        return _kept(item, SHUTTING_DOWN, f"{said}, but the server is stopping", refused=False)
    try:
        await svc.delete_snapshot(item.id)
    except FreezeframeError as exc:
        log.warning("prune: snapshot %s of %s kept: %s (%s)", item.id, item.vm, exc.code, exc)
        return _kept(item, exc.code, f"{said}; the delete was refused: {exc.message}")
    log.info("prune: deleted snapshot %s of %s (%s)", item.id, item.vm, item.reason)
    return dataclasses.replace(item, deleted=True)


def _kept(item: PruneItem, code: str, detail: str, *, refused: bool = True) -> PruneItem:
    return dataclasses.replace(
        item, keep=True, reason=code, detail=detail, refused=code if refused else None
    )


async def _in_use(svc: Service, vm: str) -> dict[str, str]:
    """Snapshot id -> why a disk of ``vm`` writes to (one of) its images: QEMU runs a disk on
    it now (asked under the VM's lock; a busy or stopped VM is not asked), or the catalog's
    chain model marks its image active. Best effort: what cannot be asked is left to the
    delete, which refuses such a snapshot itself."""
    out: dict[str, str] = {}
    try:
        for b in await svc.vm_images(vm):
            for sid in b.held_by:
                out[sid] = f"disk {b.device} runs on its image {b.running_on}"
    except FreezeframeError as exc:
        log.debug("prune: could not ask which images %s runs on: %s", vm, exc)
    cat = await svc.catalog()
    chain = getattr(cat, "chain_images", None)
    if chain is not None:
        with contextlib.suppress(FreezeframeError):
            for img in await chain(vm):
                if img.active and img.snapshot_id:
                    out.setdefault(img.snapshot_id, f"disk {img.device} writes to {img.location}")
    return out


# ---------------------------------------------------------------------------- the scheduler

#: Starts a snapshot job of ``vm`` (the API's start, so its metrics and refusals apply).
StartFn = Callable[[str, CreateSnapshot], Awaitable[SnapshotJob]]


class Scheduler:
    """Runs due schedules of one service's catalog (see the module's docstring).

    ``start``: how a snapshot job is started (default :meth:`Service.start_snapshot`);
    ``poll``: the longest sleep between two reads of the schedules (a schedule set by another
    process is seen within it); ``clock``: now (tests)."""

    def __init__(
        self,
        service: Service,
        *,
        start: StartFn | None = None,
        poll: float = 5.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not poll > 0:
            raise UsageError(f"the scheduler's poll must be > 0 s, got {poll}")
        self.service = service
        self._start = start or service.start_snapshot
        self.poll = poll
        self._clock = clock or (lambda: datetime.now(UTC))
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._runs: dict[str, asyncio.Task[None]] = {}
        self.runs_started = 0

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Claim nothing more; a running snapshot finishes, prunes not started are skipped."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Read the schedules now (one was set or changed by this process)."""
        self._wake.set()

    @property
    def running(self) -> tuple[str, ...]:
        """The VMs whose run is under way in this process."""
        return tuple(vm for vm, t in self._runs.items() if not t.done())

    async def run(self) -> None:
        """Loop until :meth:`stop`, then wait for the runs under way. Errors of one pass
        (the catalog unreachable) are logged and the loop goes on."""
        try:
            while not self._stop.is_set():
                try:
                    delay = await self.tick()
                except FreezeframeError as exc:
                    log.warning("scheduler: %s", exc)
                    delay = self.poll
                except Exception:  # a bug must not end the schedules of a running server
                    log.exception("scheduler: a pass failed")
                    delay = self.poll
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            await self.wait()

    async def wait(self) -> None:
        """Wait for every run under way (their errors are logged, not raised)."""
        tasks = [t for t in self._runs.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def tick(self) -> float:
        """One pass: claim and start each due schedule that is not running here; returns the
        seconds until the next one is due (at most ``poll``)."""
        cat = await self.service.catalog()
        now = self._clock()
        soonest = self.poll
        for rec in await cat.list_schedules():
            if not rec.enabled or self._stop.is_set():
                continue
            d = due(timedelta(seconds=rec.every_s), rec.last_run_at, now)
            if not d.run:
                soonest = min(soonest, (d.at - now).total_seconds())
                continue
            if rec.vm in self.running:
                continue  # the previous run is still going: this one is due when it ends
            claimed = await cat.claim_schedule_run(rec.vm, rec.last_run_at, now, make_owner())
            if claimed is None:
                log.info("scheduler: the run of %s was claimed by another process", rec.vm)
                continue
            if d.missed:
                log.warning(
                    "scheduler: %s missed %d run(s) while no server ran it: running once now",
                    rec.vm,
                    d.missed,
                )
            self.runs_started += 1
            task = asyncio.get_running_loop().create_task(self._run_one(claimed, now))
            task.add_done_callback(lambda _t: self._wake.set())  # a run that overran is due
            self._runs[rec.vm] = task
            soonest = min(soonest, float(rec.every_s))
        return max(0.05, soonest)

    async def _run_one(self, sched: ScheduleRecord, claimed_at: datetime) -> None:
        """Snapshot ``sched.vm`` as a job, then prune it; record how it went."""
        vm = sched.vm
        sid: str | None = None
        outcome, error, pruned = "error", None, None
        try:
            try:
                job = await self._start(vm, CreateSnapshot(quiesce=sched.quiesce))
                sid = job.snapshot_id
                out = await job.wait()
                outcome = out.code.value
            except FreezeframeError as exc:
                outcome, error = exc.code, exc.message
                sid = sid or getattr(exc, "snapshot_id", None)
                log.warning("scheduler: snapshot of %s: %s (%s)", vm, exc.message, exc.code)
            except Exception as exc:  # the face's refusal (server stopping) or a bug
                outcome, error = SHUTTING_DOWN if self._stop.is_set() else "error", str(exc)
                log.warning("scheduler: snapshot of %s not taken: %r", vm, exc)
            if self._stop.is_set():
                pruned = "skipped: the server is stopping"
            else:
                try:
                    report = await prune(self.service, vm, stop=self._stop)
                    pruned = report.summary()
                except FreezeframeError as exc:
                    pruned = f"failed: {exc.code}: {exc.message}"
                    log.warning("scheduler: prune of %s: %s", vm, exc)
            log.info("scheduler: %s: snapshot %s %s; prune: %s", vm, sid, outcome, pruned)
        finally:
            cat = await self.service.catalog()
            try:
                await cat.record_schedule_run(
                    vm,
                    sched.run_owner or make_owner(),
                    sched.last_run_at or claimed_at,
                    snapshot_id=sid,
                    outcome=outcome,
                    error=error,
                    prune=pruned,
                )
            except FreezeframeError as exc:
                log.warning("scheduler: could not record the run of %s: %s", vm, exc)
