"""``GET /v1/snapshots/{id}/events``: a snapshot's steps as Server-Sent Events, then its record.

Owns the stream's wire format and where its events come from:

- a snapshot job of this server (:meth:`Service.job`): each timeline step as the engine reports
  it (the steps inside the freeze window right after the thaw: nothing is sent while the guest
  is frozen), then ``outcome`` (the outcome's code) or ``error`` (the one error shape plus
  ``snapshot_id``), then ``record``;
- a verify job of this server (:meth:`Service.verify_job`: running, or one of the last): ``step``
  ``verify_started``, then ``verification`` or ``error``, then ``record``;
- an export job of this server (:meth:`Service.export_job`; it comes before a verify job unless
  only the verify job runs): ``step`` ``export_started`` and ``export_progress`` (``detail``:
  ``DEVICE DONE/TOTAL`` bytes), then ``export`` (the result: the document of ``snapshot export
  --json``) or ``error``, then ``record``;
- otherwise the catalog: the stored steps, then (while another process still runs it) new
  steps as they are checkpointed, polled every half second, then ``record``.

Events: ``step`` (a timeline event: ``name``, ``t``, ``mono_ns``, ``detail``), ``outcome``,
``verification``, ``export``, ``error``, ``record`` (the same document as
``GET /v1/snapshots/{id}``), and
``end`` when the server stops before the snapshot ended. Every event has an ``id`` (its
position in the stream): a client that reconnects with ``Last-Event-ID`` gets only what
follows. A comment line is sent every ``ping`` seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from freezeframe._aio import within
from freezeframe.api._errors import error_body
from freezeframe.errors import FreezeframeError, NotFoundError
from freezeframe.models import SnapshotRecord, SnapshotStatus
from freezeframe.service import (
    ExportOutcome,
    Job,
    Service,
    SnapshotOutcome,
    VerifyOutcome,
    to_document,
)

__all__ = ["snapshot_events"]

log = logging.getLogger(__name__)

Event = tuple[str, dict[str, Any]]
R = TypeVar("R")

#: Seconds between two polls of the catalog for a snapshot another process runs.
POLL_SECONDS = 0.5


def _frame(seq: int, kind: str, data: dict[str, Any]) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _with_pings(source: AsyncIterator[Event], every: float) -> AsyncIterator[Event | None]:
    """``source``'s items, and None after each ``every`` seconds without one. ``source`` runs in
    a task of its own, so a ping never interrupts it mid-await."""
    queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await within(queue.get(), every)
            except TimeoutError:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _follow(
    job: Job[R] | None, sid: str, result: Callable[[R], Event]
) -> AsyncIterator[Event]:
    """A job's steps as they happen, then its result (``result``) or its error: the one error
    shape, also for a bug (logged)."""
    if job is None:
        return
    async for ev in job.events():
        yield "step", to_document(ev)
    try:
        outcome = await job.wait()
    except FreezeframeError as exc:
        yield "error", {**error_body(exc), "snapshot_id": sid}
    except Exception as exc:  # a bug: the stream still ends with the one error shape
        log.error("job of %s failed unexpectedly", sid, exc_info=exc)
        yield (
            "error",
            {"code": "internal-error", "message": f"internal error ({type(exc).__name__})",
             "hint": "see the server's log", "snapshot_id": sid},
        )  # fmt: skip
    else:
        yield result(outcome)


def _snapshot_outcome(outcome: SnapshotOutcome) -> Event:
    return (
        "outcome",
        {
            "code": outcome.code.value,
            "asked": outcome.asked.value,
            "verify_requested": outcome.verify_requested,
            "verify_problem": to_document(outcome.verify_problem),
        },
    )


def _verification(outcome: VerifyOutcome) -> Event:
    return "verification", to_document(outcome)


def _export(outcome: ExportOutcome) -> Event:
    return "export", to_document(outcome)


def _from_snapshot_job(svc: Service, sid: str) -> AsyncIterator[Event]:
    return _follow(svc.job(sid), sid, _snapshot_outcome)


def _from_verify_job(svc: Service, sid: str) -> AsyncIterator[Event]:
    return _follow(svc.verify_job(sid), sid, _verification)


async def _from_catalog(
    svc: Service, rec: SnapshotRecord, stopping: asyncio.Event
) -> AsyncIterator[Event]:
    sent = 0
    while True:
        for ev in rec.timeline[sent:]:
            yield "step", to_document(ev)
        sent = max(sent, len(rec.timeline))
        if rec.status is not SnapshotStatus.RUNNING or stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await within(stopping.wait(), POLL_SECONDS)
        rec = await svc.get_snapshot(rec.id)


async def _events(
    svc: Service, rec: SnapshotRecord, stopping: asyncio.Event
) -> AsyncIterator[Event]:
    sid = rec.id
    export = svc.export_job(sid)
    verify = svc.verify_job(sid)
    if svc.job(sid) is not None:
        async for item in _from_snapshot_job(svc, sid):
            yield item
    elif export is not None and (not export.done or verify is None or verify.done):
        async for item in _follow(export, sid, _export):
            yield item
    elif verify is not None:
        async for item in _from_verify_job(svc, sid):
            yield item
    else:
        async for item in _from_catalog(svc, rec, stopping):
            yield item
        if stopping.is_set():
            final = await svc.get_snapshot(sid)
            if final.status is SnapshotStatus.RUNNING:
                yield "end", {"reason": "server stopping", "snapshot_id": sid}
                return
    with contextlib.suppress(NotFoundError):  # purged meanwhile: nothing to show
        yield "record", to_document(await svc.get_snapshot(sid))


async def snapshot_events(
    svc: Service,
    rec: SnapshotRecord,
    stopping: asyncio.Event,
    *,
    after: int = 0,
    ping: float = 10.0,
    on_sent: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE byte stream of snapshot ``rec`` (see the module's docstring); ``after``: the
    ``Last-Event-ID`` of a reconnecting client (events up to it are skipped)."""
    seq = 0
    yield b"retry: 2000\n\n"
    try:
        async for item in _with_pings(_events(svc, rec, stopping), ping):
            if item is None:
                yield b": ping\n\n"
                continue
            seq += 1
            if seq <= after:
                continue
            yield _frame(seq, *item)
            if on_sent is not None:
                on_sent()
    except FreezeframeError as exc:
        seq += 1
        yield _frame(seq, "error", {**error_body(exc), "snapshot_id": rec.id})
