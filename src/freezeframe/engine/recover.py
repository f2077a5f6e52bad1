"""Cleaning up after a snapshot process that died: a killed process must never leave a guest
frozen, nor overlays that nobody knows about.

An intent is written before ``guest-fsfreeze-freeze`` is sent and closed once a thaw is
confirmed. An intent still open means the guest may be frozen: :func:`recover` thaws it through
the agent, confirms with ``guest-fsfreeze-status``, closes the intent and notes it on the
snapshot record.

Recovering a VM takes its snapshot lock, like a snapshot does: a thaw sent while another process
holds a guest frozen for its own cut would silently break that snapshot's consistency. A lock
left by a dead process of this host is taken over; a VM whose lock a live process holds is
skipped (that process thaws the guest itself) unless ``force``.

While it holds the lock, no snapshot of the VM can be running, so a record still ``running`` was
left by a dead process: it is marked failed, and the overlays it prepared (stored on the record
before the freeze) are settled through the VM's driver — kept and recorded when the disks were
switched to them (the chain goes on from there), deleted when they were not.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from freezeframe._aio import shielded
from freezeframe.catalog import Catalog, holder_is_dead, make_owner
from freezeframe.engine.delete import finish_merges
from freezeframe.engine.images import cut_outcome_unknown
from freezeframe.engine.snapshot import open_driver
from freezeframe.engine.timeline import Timeline
from freezeframe.errors import (
    AgentError,
    AgentUnavailableError,
    BusyError,
    FreezeframeError,
    NotFoundError,
)
from freezeframe.hypervisor import HypervisorDriver, PreparedCut, open_agent
from freezeframe.models import (
    FreezeIntent,
    FsFreezeState,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    VmConfig,
)
from freezeframe.storage import sweep_stale_workspaces
from freezeframe.storage.backends import StorageBackend, backend_of_record, load_backend

__all__ = ["RecoverOutcome", "cut_outcome_unknown", "recover"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoverOutcome:
    """What happened to one open intent (``intent_id``), or to one record a dead process left
    running without an intent (``intent_id`` None: it died before freezing)."""

    intent_id: int | None
    vm: str
    snapshot_id: str
    thawed: bool
    skipped: bool = False
    detail: str = ""
    #: The VM is not running: nothing to thaw, the intent was closed (``thawed`` is True).
    vm_not_running: bool = False
    #: A snapshot delete a dead process left (record ``deleting``): ``finished`` now, or
    #: ``unfinished`` (``detail`` says why; the record stays ``deleting``). None: no delete.
    delete: str | None = None

    @property
    def failed(self) -> bool:
        """An intent whose guest could not be confirmed thawed, or a delete left unfinished."""
        if self.delete is not None:
            return self.delete == "unfinished"
        return self.intent_id is not None and not self.thawed and not self.skipped

    @property
    def code(self) -> str:
        """Stable code: ``closed`` (the VM is not running), ``thawed``, ``skipped`` (a live
        process owns the intent), ``thaw-unconfirmed``, ``settled`` (a record without an
        intent), ``delete-finished`` / ``delete-unfinished`` (a delete a dead process left)."""
        if self.delete is not None:
            return f"delete-{self.delete}"
        if self.vm_not_running:
            return "closed"
        if self.thawed:
            return "thawed"
        if self.skipped:
            return "skipped"
        if self.failed:
            return "thaw-unconfirmed"
        return "settled"


async def recover(
    catalog: Catalog,
    vm: str | None = None,
    *,
    force: bool = False,
    timeout: float = 5.0,
) -> list[RecoverOutcome]:
    """Thaw every VM with an open freeze intent and settle the records dead processes left
    running (of ``vm`` only, if given).

    Intents whose owner is not provably dead (alive on this host, or on another host) are
    skipped (the owner thaws itself) unless ``force``; so are the intents of a VM whose
    snapshot lock a live process holds. With ``force`` the guest is thawed regardless (but
    records are settled only under the lock). Verify workspaces (mounts, loop devices,
    qemu-storage-daemon) of dead processes are cleaned last, after every thaw. Never raises
    for one VM's trouble: each outcome says what happened.

    Raises:
        NotFoundError: ``vm`` is given and not registered.
        CatalogError: the catalog fails.
    """
    if vm is not None:
        await catalog.get_vm(vm)
    by_vm: defaultdict[str, list[FreezeIntent]] = defaultdict(list)
    for intent in await catalog.open_intents(vm):
        by_vm[intent.vm].append(intent)
    running = [
        r.vm
        for r in await catalog.list_snapshots(vm)
        if _unsettled(r) or r.status is SnapshotStatus.DELETING
    ]
    outcomes: list[RecoverOutcome] = []
    for name in dict.fromkeys([*by_vm, *running]):
        outcomes.extend(await _recover_vm(catalog, name, by_vm.get(name, []), force, timeout))
    # Last: thawing comes first, and cleaning a workspace can take a while (busy unmounts).
    for workspace in await sweep_stale_workspaces():  # a verify killed with -9
        log.warning("removed verify workspace %s left by a dead process", workspace)
    return outcomes


def _skipped(intent: FreezeIntent, detail: str) -> RecoverOutcome:
    return RecoverOutcome(
        intent.id, intent.vm, intent.snapshot_id, thawed=False, skipped=True, detail=detail
    )


async def _recover_vm(
    catalog: Catalog, vm: str, intents: list[FreezeIntent], force: bool, timeout: float
) -> list[RecoverOutcome]:
    if not force:
        live = [i for i in intents if not holder_is_dead(i.owner, i.opened_at)]
        if live:
            return [
                _skipped(i, f"owned by a live process ({i.owner}); forcing thaws anyway")
                if i in live
                else _skipped(i, "the VM has an intent of a live process; forcing thaws anyway")
                for i in intents
            ]
    owner = make_owner()
    locked = False
    try:
        await catalog.acquire_vm_lock(vm, owner, purpose="recover")
        locked = True
    except BusyError as exc:
        if not force:  # a live snapshot: its running record is not stale either
            return [
                _skipped(i, f"{exc.message}; it thaws itself; forcing thaws anyway")
                for i in intents
            ]
        log.warning("recovering VM %s without its lock (--force): %s", vm, exc.message)
    try:
        outcomes = [await _recover_one(catalog, i, timeout) for i in intents]
        if not locked:
            return outcomes
        settled = await _settle_stale_records(catalog, vm, timeout)
        merged = []
        for o in outcomes:
            note = settled.pop(o.snapshot_id, "")
            merged.append(replace(o, detail=f"{o.detail}; {note}") if note else o)
        merged += [
            RecoverOutcome(None, vm, sid, thawed=False, detail=note)
            for sid, note in settled.items()
        ]
        return merged + await _finish_deletes(catalog, vm)
    finally:
        if locked:
            await shielded(catalog.release_vm_lock(vm, owner))


async def _finish_deletes(catalog: Catalog, vm: str) -> list[RecoverOutcome]:
    """Finish the snapshot deletes of ``vm`` a dead process left (under the VM's lock)."""
    pending = [r.id for r in await catalog.list_snapshots(vm, status=SnapshotStatus.DELETING)]
    if not pending and not await catalog.open_merges(vm):
        return []
    try:
        done = await finish_merges(catalog, vm)
    except FreezeframeError as exc:
        log.warning("VM %s: a delete left by a dead process is not finished: %s", vm, exc)
        return [
            RecoverOutcome(
                None, vm, sid, thawed=False, delete="unfinished", detail=f"{exc.code}: {exc}"
            )
            for sid in pending
        ]
    return [
        RecoverOutcome(
            None, vm, sid, thawed=False, delete="finished", detail="the delete was finished"
        )
        for sid in done
    ]


async def _recover_one(catalog: Catalog, intent: FreezeIntent, timeout: float) -> RecoverOutcome:
    tl = Timeline()
    try:
        async with open_agent(intent.agent_address, timeout=timeout) as agent:
            async with asyncio.timeout(timeout * 3):
                before = await agent.fsfreeze_status()
                n = await agent.fsfreeze_thaw()
                after = await agent.fsfreeze_status()
    except (AgentError, TimeoutError) as exc:
        msg = exc.message if isinstance(exc, AgentError) else "no answer"
        if isinstance(exc, AgentUnavailableError) and await _vm_is_gone(catalog, intent.vm):
            # No QEMU, no guest: nothing can be frozen any more.
            detail = f"the VM is not running (agent: {msg}; QMP does not answer either)"
            await catalog.close_intent(intent.id, "recover (VM not running)")
            tl.mark("vm_not_running", f"by freezeframe recover: {detail}; intent closed")
            await _note(catalog, intent.snapshot_id, tl)
            return RecoverOutcome(
                intent.id,
                intent.vm,
                intent.snapshot_id,
                thawed=True,
                detail=detail,
                vm_not_running=True,
            )
        detail = f"agent: {msg}"
        if not holder_is_dead(intent.owner, intent.opened_at):
            # --force on a live (hung) owner: it may still hold the agent's only connection.
            detail += (
                f"; its owner {intent.owner} is still alive and may hold the agent's socket "
                "(one client at a time): stop that process, then run recover again"
            )
        return RecoverOutcome(intent.id, intent.vm, intent.snapshot_id, thawed=False, detail=detail)
    if after is not FsFreezeState.THAWED:
        return RecoverOutcome(
            intent.id, intent.vm, intent.snapshot_id, thawed=False, detail="still frozen"
        )
    detail = (
        f"the guest was {before.value}; {n} filesystem(s) thawed, "
        "confirmed by guest-fsfreeze-status"
    )
    await catalog.close_intent(intent.id, "recover")
    tl.mark("thaw_confirmed", f"by freezeframe recover: {detail}")
    await _note(catalog, intent.snapshot_id, tl)
    return RecoverOutcome(intent.id, intent.vm, intent.snapshot_id, thawed=True, detail=detail)


async def _note(catalog: Catalog, snapshot_id: str, tl: Timeline) -> None:
    """Append recover's events to the record (never rewriting it: without the lock, with
    --force, its owner may write meanwhile); a missing record or a failing note is logged."""
    try:
        await catalog.append_timeline(snapshot_id, tl.events)
    except NotFoundError:
        pass
    except FreezeframeError as exc:  # the thaw itself succeeded; the note is secondary
        log.warning("could not note the recovery on snapshot %s: %s", snapshot_id, exc)


async def _vm_is_gone(catalog: Catalog, vm: str) -> bool:
    """True only when the VM's driver is certain it is not running (QMP: its socket missing
    or refusing). Anything else, an unknown VM included, is not proof."""
    try:
        return await open_driver(await catalog.get_vm(vm)).is_gone()
    except FreezeframeError:
        return False


async def _settle_stale_records(catalog: Catalog, vm: str, timeout: float) -> dict[str, str]:
    """Mark the records of ``vm`` still running as failed (call with the VM's lock held: no
    snapshot of it is running) and settle their prepared overlays. Returns id -> what was done."""
    out: dict[str, str] = {}
    for rec in await catalog.list_snapshots(vm):
        if cut_outcome_unknown(rec):
            out[rec.id] = await _settle_unknown_cut(catalog, rec, timeout)
            continue
        if rec.status is not SnapshotStatus.RUNNING:
            continue
        note, disks, settled = await _settle_disks(catalog, rec, timeout)
        if not settled:  # asked again by the next recover, once the hypervisor answers
            out[rec.id] = f"{note}; left as it is: recover again later"
            continue
        ev = Timeline().mark("recovered", note)
        failed = replace(
            rec,
            status=SnapshotStatus.FAILED,
            error=f"the process taking it died; settled by freezeframe recover: {note}",
            disks=disks,
            timeline=(*rec.timeline, ev),
        )
        try:
            await catalog.finish_snapshot(failed)
        except FreezeframeError as exc:
            note += f"; the record could not be updated: {exc.message}"
        out[rec.id] = note
    return out


async def _settle_disks(
    catalog: Catalog, rec: SnapshotRecord, timeout: float
) -> tuple[str, tuple[SnapshotDisk, ...], bool]:
    """Keep (and record) overlays the VM was switched to; delete those it never used. The
    last value is False when that cannot be told now (the hypervisor does not answer, or
    answers something no cut leaves): the record is then left for a later recover."""
    if not rec.disks:
        return await _discard_unrecorded(catalog, rec, timeout), (), True
    files = ", ".join(d.overlay or d.image for d in rec.disks)
    state = await _ask_and_abort(catalog, rec, timeout)
    if state not in ("switched", "not-switched", "unknown"):
        return f"the hypervisor cannot be asked about its overlays ({state})", rec.disks, False
    if state == "switched":
        return "the disks had been switched: the overlays are kept and recorded", rec.disks, True
    if state == "not-switched":
        return f"the overlays it had prepared were removed: {files}", (), True
    return "the cut's state cannot be told (see the log)", rec.disks, False


async def _discard_unrecorded(catalog: Catalog, rec: SnapshotRecord, timeout: float) -> str:
    """A process that died between creating its overlays and recording them (a few ms) leaves
    files and nodes no record names: remove what the driver's naming says it made, unless a
    disk uses it (the cut cannot have happened before the record, but abort checks anyway)."""
    try:
        driver = open_driver(await catalog.get_vm(rec.vm))
        async with asyncio.timeout(timeout * 3), driver:
            prepared = driver.prepared_for(rec.id, await driver.disks())
            present = _existing([p.overlay_file for p in prepared.disks])
            await driver.abort(prepared)
    except (FreezeframeError, TimeoutError) as exc:
        msg = exc.message if isinstance(exc, FreezeframeError) else "no answer in time"
        return f"nothing recorded as prepared; leftovers could not be looked for ({msg})"
    if not present:
        return "nothing was prepared on the disks"
    kept = _existing(present)
    gone = [f for f in present if f not in kept]
    note = f"the overlays it had prepared were removed: {', '.join(gone)}" if gone else ""
    if kept:
        note += ("; " if note else "") + f"kept (in use or not removable): {', '.join(kept)}"
    return note


def _existing(files: list[str]) -> list[str]:
    """The files that exist (a stat each: cheap enough for the event loop)."""
    return [f for f in files if os.path.exists(f)]


def _unsettled(rec: SnapshotRecord) -> bool:
    return rec.status is SnapshotStatus.RUNNING or cut_outcome_unknown(rec)


async def _ask_and_abort(catalog: Catalog, rec: SnapshotRecord, timeout: float) -> str:
    """Ask the VM's driver whether ``rec``'s recorded cut is in effect and remove its overlays
    when it is not. Returns the cut state ("switched", "not-switched", "unknown"), or why the
    driver could not be asked."""
    qcow2 = tuple(d for d in rec.disks if backend_of_record(d) == "qcow2")
    others = tuple(d for d in rec.disks if backend_of_record(d) != "qcow2")
    try:
        cfg = await catalog.get_vm(rec.vm)
        if not qcow2:
            return await _settle_other_backends(cfg, rec, others, timeout)
        driver = open_driver(cfg)
        prepared = driver.prepared_from_record(rec.id, qcow2)
        async with asyncio.timeout(timeout * 3), driver:
            state: str = await driver.cut_state(prepared)
            if state == "unknown":
                state = await _state_from_chains(driver, prepared)
            if state == "not-switched":
                await driver.abort(prepared)
                if others:  # made before the transaction that did not happen: not kept
                    await _remove_other_backends(cfg, rec, others, timeout)
            return state
    except (FreezeframeError, TimeoutError) as exc:
        return exc.message if isinstance(exc, FreezeframeError) else "no answer in time"


async def _settle_other_backends(
    cfg: VmConfig, rec: SnapshotRecord, disks: tuple[SnapshotDisk, ...], timeout: float
) -> str:
    """A cut made only by backends whose parts can be taken back (RBD snapshots) of an attempt
    that was never recorded done (it died, or its outcome was unknown): whatever it made is
    removed (an RBD snapshot that appears late was not made inside the freeze: never kept).
    Returns ``not-switched`` once removed, as :func:`_ask_and_abort`, else why not. Raises
    FreezeframeError, TimeoutError."""
    for name, backend, handle in _backend_handles(cfg, rec, disks):
        async with asyncio.timeout(timeout * 3):
            await backend.abort(handle)
            got = await backend.cut_state(handle)
            if got != "not-switched":
                return f"its {name} snapshots could not be removed (state {got})"
    return "not-switched"


async def _remove_other_backends(
    cfg: VmConfig, rec: SnapshotRecord, disks: tuple[SnapshotDisk, ...], timeout: float
) -> None:
    """Remove what backends other than qcow2 made for ``rec`` (RBD snapshots). Never raises
    for the backends' own trouble (logged)."""
    for _, backend, handle in _backend_handles(cfg, rec, disks):
        async with asyncio.timeout(timeout * 3):
            await backend.abort(handle)


def _backend_handles(
    cfg: VmConfig, rec: SnapshotRecord, disks: tuple[SnapshotDisk, ...]
) -> Iterator[tuple[str, StorageBackend, Any]]:
    """Per backend that cut some of ``disks``: its name, the backend for ``cfg`` and the
    handle of what it made for ``rec``. Raises FreezeframeError (a backend cannot load)."""
    for name in dict.fromkeys(backend_of_record(d) for d in disks):
        backend = load_backend(name).for_vm(cfg, None)
        yield (
            name,
            backend,
            backend.handle_from_record(rec.id, [d for d in disks if backend_of_record(d) == name]),
        )


async def _state_from_chains(driver: HypervisorDriver, prepared: PreparedCut) -> str:
    """What the VM's disks use now, for a cut whose state the driver calls unknown (a VM
    restarted on the overlays and snapshotted again has them *below* its tops, a state no
    transaction leaves): ``switched`` when every overlay of the cut is in a disk's chain,
    ``not-switched`` when none is, else ``unknown``. Raises HypervisorError."""
    disks = await driver.disks()
    in_use = {d.file for d in disks} | {f for d in disks for f in d.backing}
    used = [p.overlay_file in in_use for p in prepared.disks]
    if used and all(used):
        return "switched"
    if not any(used):
        return "not-switched"
    return "unknown"


async def _settle_unknown_cut(catalog: Catalog, rec: SnapshotRecord, timeout: float) -> str:
    """Ask again, now that QEMU may answer: a cut that happened keeps its overlays (recorded);
    one that did not is removed, and the record no longer lists disks."""
    state = await _ask_and_abort(catalog, rec, timeout)
    if state not in ("switched", "not-switched", "unknown"):
        return f"the cut's outcome is still unknown ({state}): its overlays stay"
    if state == "unknown":
        return "the cut's outcome is still unknown: its overlays stay"
    if state == "switched":
        note, disks = "the cut did happen: the disks write to its overlays (kept)", rec.disks
    else:
        note, disks = "the cut did not happen: its overlays were removed", ()
    ev = Timeline().mark("cut_settled", f"by freezeframe recover: {note}")
    try:
        await catalog.finish_snapshot(
            replace(
                rec,
                disks=disks,
                error=f"{rec.error}; {note}" if rec.error else note,
                timeline=(*rec.timeline, ev),
            )
        )
    except FreezeframeError as exc:
        note += f"; the record could not be updated: {exc.message}"
    return note
