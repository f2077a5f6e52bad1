"""A snapshot (or a verify) running as a job of a long-running process, detached from whoever
started it.

A :class:`SnapshotJob` owns one task of :meth:`Service.create_snapshot`; any number of
followers read its timeline (:meth:`SnapshotJob.events`: every event so far, then each new one
as it happens, until the job ends). A follower that goes away never touches the task: only
:meth:`SnapshotJob.wait` (or the service's :meth:`~freezeframe.service.Service.close`) ends
with the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from freezeframe.models import TimelineEvent
from freezeframe.service._results import SnapshotOutcome, VerifyOutcome

__all__ = ["SnapshotJob", "VerifyJob"]


class SnapshotJob:
    """One snapshot being taken: its ``snapshot_id``, ``vm``, timeline so far (``history``),
    followers (:meth:`events`) and result (:meth:`wait`)."""

    def __init__(self, snapshot_id: str, vm: str) -> None:
        self.snapshot_id = snapshot_id
        self.vm = vm
        self.history: list[TimelineEvent] = []
        self.task: asyncio.Task[SnapshotOutcome] | None = None
        self._changed = asyncio.Condition()
        self.started = asyncio.Event()  # the first timeline event arrived (the VM was locked)

    def publish(self, ev: TimelineEvent) -> None:
        """Called by the engine's progress (in the event loop): record and wake followers."""
        self.history.append(ev)
        self.started.set()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def events(self) -> AsyncIterator[TimelineEvent]:
        """Every timeline event so far, then each new one as it is published, until the job
        ends. Steps inside the freeze window come after the thaw (the engine holds them)."""
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

    async def wait(self) -> SnapshotOutcome:
        """The job's outcome; raises what ``create_snapshot`` raised (the failed attempt's
        record stays in the catalog under :attr:`snapshot_id`). Cancelling the waiter does not
        cancel the job."""
        if self.task is None:
            raise RuntimeError("job not started")
        return await asyncio.shield(self.task)

    def _finished(self, _task: asyncio.Task[SnapshotOutcome]) -> None:
        self.started.set()
        asyncio.get_running_loop().create_task(self._notify())


class VerifyJob:
    """One verify being run: its ``snapshot_id``, ``vm``, steps so far (``history``: the
    ``verify_started`` step), followers (:meth:`events`) and result (:meth:`wait`). Kept a while
    after it ended (:meth:`Service.verify_job`), so a late follower still sees its verdict."""

    def __init__(self, snapshot_id: str, vm: str) -> None:
        self.snapshot_id = snapshot_id
        self.vm = vm
        self.history: list[TimelineEvent] = []
        self.task: asyncio.Task[VerifyOutcome] | None = None
        self._changed = asyncio.Condition()

    def publish(self, ev: TimelineEvent) -> None:
        """Record a step and wake the followers (in the event loop)."""
        self.history.append(ev)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def events(self) -> AsyncIterator[TimelineEvent]:
        """Every step so far, then each new one, until the job ends."""
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

    async def wait(self) -> VerifyOutcome:
        """The verdict; raises what ``verify_snapshot`` raised. Cancelling the waiter does not
        cancel the job."""
        if self.task is None:
            raise RuntimeError("job not started")
        return await asyncio.shield(self.task)

    def _finished(self, _task: asyncio.Task[VerifyOutcome]) -> None:
        asyncio.get_running_loop().create_task(self._notify())
