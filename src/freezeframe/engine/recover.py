"""Closing freeze intents that nobody closed: a killed process must never leave a guest frozen.

An intent is written before ``guest-fsfreeze-freeze`` is sent and closed once a thaw is
confirmed. An intent still open means the guest may be frozen: :func:`recover` thaws it through
the agent, confirms with ``guest-fsfreeze-status``, closes the intent and notes it on the
snapshot record (marking a record left ``running`` by a dead process as failed).

Recovering a VM takes its snapshot lock, like a snapshot does: a thaw sent while another process
holds a guest frozen for its own cut would silently break that snapshot's consistency. A lock
left by a dead process of this host is taken over; a VM whose lock a live process holds is
skipped (that process thaws the guest itself) unless ``force``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, replace

from freezeframe._aio import shielded
from freezeframe.agent import GuestAgent
from freezeframe.catalog import Catalog, holder_is_dead, make_owner
from freezeframe.engine.timeline import Timeline
from freezeframe.errors import AgentError, BusyError, FreezeframeError, NotFoundError
from freezeframe.models import FreezeIntent, FsFreezeState, SnapshotStatus

__all__ = ["RecoverOutcome", "recover"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoverOutcome:
    """What happened to one open intent."""

    intent_id: int
    vm: str
    snapshot_id: str
    thawed: bool
    skipped: bool = False
    detail: str = ""


async def recover(
    catalog: Catalog,
    vm: str | None = None,
    *,
    force: bool = False,
    timeout: float = 5.0,
) -> list[RecoverOutcome]:
    """Thaw every VM with an open freeze intent (of ``vm`` only, if given).

    Intents whose owner is not provably dead (alive on this host, or on another host) are
    skipped (the owner thaws itself) unless ``force``; so are the intents of a VM whose snapshot
    lock a live process holds. With ``force`` the guest is thawed regardless. Never raises for
    one VM's trouble: each outcome says what happened.

    Raises:
        NotFoundError: ``vm`` is given and not registered.
        CatalogError: the catalog fails.
    """
    if vm is not None:
        await catalog.get_vm(vm)
    by_vm: defaultdict[str, list[FreezeIntent]] = defaultdict(list)
    for intent in await catalog.open_intents(vm):
        by_vm[intent.vm].append(intent)
    outcomes: list[RecoverOutcome] = []
    for name, intents in by_vm.items():
        outcomes.extend(await _recover_vm(catalog, name, intents, force, timeout))
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
                _skipped(i, f"owned by a live process ({i.owner}); --force thaws anyway")
                if i in live
                else _skipped(i, "the VM has an intent of a live process; --force thaws anyway")
                for i in intents
            ]
    owner = make_owner()
    locked = False
    try:
        await catalog.acquire_vm_lock(vm, owner)
        locked = True
    except BusyError as exc:
        if not force:
            return [
                _skipped(i, f"{exc.message}; it thaws itself; --force thaws anyway")
                for i in intents
            ]
        log.warning("recovering VM %s without its lock (--force): %s", vm, exc.message)
    try:
        return [await _recover_one(catalog, i, timeout) for i in intents]
    finally:
        if locked:
            await shielded(catalog.release_vm_lock(vm, owner))


async def _recover_one(catalog: Catalog, intent: FreezeIntent, timeout: float) -> RecoverOutcome:
    tl = Timeline()
    try:
        async with GuestAgent(intent.qga_path, timeout=timeout) as agent:
            async with asyncio.timeout(timeout * 3):
                before = await agent.fsfreeze_status()
                n = await agent.fsfreeze_thaw()
                after = await agent.fsfreeze_status()
    except (AgentError, TimeoutError) as exc:
        msg = exc.message if isinstance(exc, AgentError) else "no answer"
        return RecoverOutcome(
            intent.id, intent.vm, intent.snapshot_id, thawed=False, detail=f"agent: {msg}"
        )
    if after is not FsFreezeState.THAWED:
        return RecoverOutcome(
            intent.id, intent.vm, intent.snapshot_id, thawed=False, detail="still frozen"
        )
    detail = f"was {before.value}; thawed {n} filesystem(s); confirmed thawed"
    await catalog.close_intent(intent.id, "recover")
    tl.mark("thaw_confirmed", f"by freezeframe recover: {detail}")
    try:
        rec = await catalog.get_snapshot(intent.snapshot_id)
    except NotFoundError:
        return RecoverOutcome(intent.id, intent.vm, intent.snapshot_id, thawed=True, detail=detail)
    changes: dict[str, object] = {"timeline": (*rec.timeline, *tl.events)}
    if rec.status is SnapshotStatus.RUNNING:
        changes["status"] = SnapshotStatus.FAILED
        changes["error"] = "the process taking it died; the guest was thawed by freezeframe recover"
    try:
        await catalog.finish_snapshot(replace(rec, **changes))  # type: ignore[arg-type]
    except FreezeframeError as exc:  # the thaw itself succeeded; the note is secondary
        log.warning("could not note the recovery on snapshot %s: %s", rec.id, exc)
    return RecoverOutcome(intent.id, intent.vm, intent.snapshot_id, thawed=True, detail=detail)
