"""A snapshot (or a verify) running as a job of a long-running process, detached from whoever
started it.

A :class:`SnapshotJob` owns one task of :meth:`Service.create_snapshot`, a :class:`VerifyJob`
one of :meth:`Service.verify_snapshot`, an :class:`ExportJob` one of
:meth:`Service.export_snapshot`; any number of followers read its steps
(:meth:`Job.events`: every step so far, then each new one as it happens, until the job ends).
A follower that goes away never touches the task: only :meth:`Job.wait` (or the service's
:meth:`~freezeframe.service.Service.close`) ends with the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from freezeframe.engine.export import ExportOutcome
from freezeframe.models import TimelineEvent
from freezeframe.service._results import SnapshotOutcome, VerifyOutcome

__all__ = ["ExportJob", "Job", "SnapshotJob", "VerifyJob"]

R = TypeVar("R")


class Job(Generic[R]):
    """One operation being run: its ``snapshot_id``, ``vm``, steps so far (``history``),
    followers (:meth:`events`) and result (:meth:`wait`)."""

    def __init__(self, snapshot_id: str, vm: str) -> None:
        self.snapshot_id = snapshot_id
        self.vm = vm
        self.history: list[TimelineEvent] = []
        self.task: asyncio.Task[R] | None = None
        self._changed = asyncio.Condition()

    def publish(self, ev: TimelineEvent) -> None:
        """Record a step and wake the followers (called in the event loop)."""
        self.history.append(ev)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def events(self) -> AsyncIterator[TimelineEvent]:
        """Every step so far, then each new one as it is published, until the job ends."""
        sent = 0
        while True:
            while sent < len(self.history):
                yield self.history[sent]
                sent += 1
            if self.done:
                return
            async with self._changed:
                if sent == len(self.history) and not self.done:
                    await self._changed.wait()

    async def wait(self) -> R:
        """The job's result; raises what its operation raised. Cancelling the waiter does not
        cancel the job. Raises RuntimeError when the job was never started."""
        if self.task is None:
            raise RuntimeError("job not started")
        return await asyncio.shield(self.task)

    def _finished(self, _task: asyncio.Task[R]) -> None:
        asyncio.get_running_loop().create_task(self._notify())


class SnapshotJob(Job[SnapshotOutcome]):
    """One snapshot being taken. Steps inside the freeze window come after the thaw (the
    engine holds them); a failed attempt's record stays in the catalog under
    :attr:`snapshot_id` and :meth:`wait` raises what ``create_snapshot`` raised."""

    def __init__(self, snapshot_id: str, vm: str) -> None:
        super().__init__(snapshot_id, vm)
        self.started = asyncio.Event()  # the first timeline event arrived (the VM was locked)

    def publish(self, ev: TimelineEvent) -> None:
        self.started.set()
        super().publish(ev)

    def _finished(self, task: asyncio.Task[SnapshotOutcome]) -> None:
        self.started.set()
        super()._finished(task)


class VerifyJob(Job[VerifyOutcome]):
    """One verify being run (``history``: its ``verify_started`` step). Kept a while after it
    ended (:meth:`Service.verify_job`), so a late follower still sees its verdict."""


class ExportJob(Job[ExportOutcome]):
    """One export being run (``history``: ``export_started``, then ``export_progress`` steps,
    their ``detail`` ``DEVICE DONE/TOTAL`` in bytes over all disks). Kept a while after it
    ended (:meth:`Service.export_job`), so a late follower still sees its result."""
