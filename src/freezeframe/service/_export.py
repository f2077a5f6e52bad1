"""Exports run as jobs of the service (:meth:`Service.start_export`), and their steps.

Owns the bookkeeping of export jobs (the running ones and the last ended, for late
followers) and how an export's byte progress becomes job steps: ``export_started``, then
``export_progress`` (``detail``: ``DEVICE DONE/TOTAL``, bytes over all disks) at most every
:data:`STEP_EVERY` of the total and at the end. What an export does and refuses is the
engine's (:mod:`freezeframe.engine.export`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from freezeframe.engine.export import ExportOutcome, ExportProgress
from freezeframe.errors import Action, BusyError, Remedy
from freezeframe.models import SnapshotRecord, TimelineEvent
from freezeframe.service._jobs import ExportJob

__all__ = ["ExportJobs", "ExportProgressFn", "job_running"]

#: Called with the bytes done over all disks (in the event loop).
ExportProgressFn = Callable[[ExportProgress], None]

#: A progress step is published each time this fraction of the total more is done.
STEP_EVERY = 0.02

#: How many export jobs (running and ended) are remembered for late followers.
KEEP_EXPORT_JOBS = 64


def job_running(rec: SnapshotRecord) -> BusyError:
    """The refusal of a second job of snapshot ``rec`` in this service (code ``job-running``)."""
    return BusyError(
        f"snapshot {rec.id} has a job running in this server",
        hint="wait until it ends (follow its events), then ask again",
        code="job-running",
        remedy=Remedy(Action.SHOW_SNAPSHOT, rec.vm, {"id": rec.id}),
    )


def _step(name: str, detail: str) -> TimelineEvent:
    return TimelineEvent(name, datetime.now(UTC), time.monotonic_ns(), detail)


class ExportJobs:
    """The export jobs of one service, by snapshot id."""

    def __init__(self) -> None:
        self._jobs: dict[str, ExportJob] = {}

    def get(self, snapshot_id: str) -> ExportJob | None:
        """The export job of ``snapshot_id`` (full id): running, or one of the last ended."""
        return self._jobs.get(snapshot_id)

    def running(self, snapshot_id: str) -> bool:
        job = self._jobs.get(snapshot_id)
        return job is not None and not job.done

    @property
    def active(self) -> tuple[ExportJob, ...]:
        """The running export jobs."""
        return tuple(j for j in self._jobs.values() if not j.done)

    def tasks(self) -> list[asyncio.Task[ExportOutcome]]:
        """The tasks of the running export jobs (for a drain)."""
        return [j.task for j in self._jobs.values() if j.task is not None and not j.done]

    def start(
        self,
        rec: SnapshotRecord,
        detail: str,
        run: Callable[[ExportProgressFn], Awaitable[ExportOutcome]],
    ) -> ExportJob:
        """Start ``run(progress)`` as the export job of ``rec`` (its first step,
        ``export_started`` with ``detail``, is published before this returns). The caller
        checked that no other job of ``rec`` runs."""
        job = ExportJob(rec.id, rec.vm)
        self._jobs.pop(rec.id, None)  # the newest job of a snapshot is the one kept
        self._jobs[rec.id] = job
        ended = [k for k, j in self._jobs.items() if j.done]
        for k in ended[: max(0, len(self._jobs) - KEEP_EXPORT_JOBS)]:
            del self._jobs[k]  # oldest first (insertion order)
        job.publish(_step("export_started", detail))
        last = [-1.0]

        def progress(p: ExportProgress) -> None:
            frac = p.done / p.total if p.total else 1.0
            if frac - last[0] >= STEP_EVERY or (p.done == p.total and last[0] < 1.0):
                last[0] = frac
                job.publish(_step("export_progress", f"{p.device} {p.done}/{p.total}"))

        async def go() -> ExportOutcome:
            return await run(progress)

        task = asyncio.get_running_loop().create_task(go())
        job.task = task
        task.add_done_callback(job._finished)
        return job
