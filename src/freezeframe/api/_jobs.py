"""Server jobs: a snapshot or a verify runs as an asyncio task owned by the app, never by the
HTTP request that started it.

Owns the life of a job (started, accepted under an id, its events, finished), the fan-out of
its events to any number of followers (Server-Sent Events), and the drain at shutdown. A client
that disconnects or times out cancels only its own request: the job's task is not a child of
the request and is never cancelled by the server (SIGTERM waits for it, so a freeze is always
followed by its thaw). What a job does is the runner's business (a call on the service layer);
this module knows nothing about snapshots.

Events are ``(seq, kind, data)`` with ``data`` a JSON-ready dict; the last event of a job is
its final one (``record`` or ``error``). A finished job is kept (at most ``keep_finished`` of
them, oldest dropped first) so a late follower still gets the whole stream from memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "JobContext", "JobEvent", "JobManager", "ShuttingDown"]

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""


@dataclass(frozen=True, slots=True)
class JobEvent:
    seq: int
    kind: str
    data: dict[str, Any]


class Job:
    """One running or finished job; followers read its events with :meth:`follow`."""

    def __init__(self, kind: str, vm: str) -> None:
        self.kind = kind
        self.vm = vm
        self.id: str | None = None
        self.events: list[JobEvent] = []
        self.finished = False
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Append an event and wake the followers (cheap: callable from a progress hook)."""
        if self.finished:
            return
        self.events.append(JobEvent(len(self.events) + 1, kind, data))
        self._wake()

    def _finish(self) -> None:
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, after: int = 0) -> AsyncIterator[JobEvent]:
        """Every event with ``seq > after``, then the live ones, until the job finished."""
        i = max(0, after)
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.finished:
                return
            await self._changed.wait()


class JobContext:
    """What a runner gets: say under which id the job is known (once it is), publish events."""

    def __init__(self, job: Job, manager: JobManager, accepted: asyncio.Future[str]) -> None:
        self._job = job
        self._manager = manager
        self._accepted = accepted

    def accept(self, job_id: str) -> None:
        """The job is known as ``job_id`` from now on: the submitter gets its answer."""
        if self._job.id is not None:
            return
        self._job.id = job_id
        self._manager._register(self._job)
        if not self._accepted.done():
            self._accepted.set_result(job_id)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self._job.publish(kind, data)


Runner = Callable[[JobContext], Awaitable[None]]


class JobManager:
    """The app's jobs: start them, find them by id, drain them at shutdown."""

    def __init__(self, *, keep_finished: int = 256) -> None:
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._keep = keep_finished
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def running(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.finished]

    def _register(self, job: Job) -> None:
        if job.id is not None:
            self._jobs[job.id] = job

    async def submit(
        self, kind: str, vm: str, runner: Runner, on_error: Callable[[BaseException], None]
    ) -> Job:
        """Start ``runner`` as a task of the server and wait until it accepted the job under an
        id (or failed before that). ``on_error`` publishes a runner's unexpected exception as
        the job's final event (it is called inside the job's task).

        The waiting is shielded: a submitter that goes away does not touch the job.

        Raises:
            ShuttingDown: the server no longer takes jobs.
            Exception: whatever the runner raised before it accepted the job.
        """
        if not self.accepting:
            raise ShuttingDown
        job = Job(kind, vm)
        accepted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        ctx = JobContext(job, self, accepted)

        async def body() -> None:
            try:
                await runner(ctx)
            except BaseException as exc:
                if not accepted.done():
                    accepted.set_exception(exc)
                elif isinstance(exc, Exception):
                    log.error("job %s %s failed", kind, job.id, exc_info=exc)
                    with contextlib.suppress(Exception):
                        on_error(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                if not accepted.done():  # finished without ever saying its id
                    accepted.set_exception(RuntimeError(f"{kind} job ended without an id"))
                job._finish()
                if job.id is not None:
                    self._finished.append(job.id)
                    while len(self._finished) > self._keep:
                        self._jobs.pop(self._finished.popleft(), None)

        task = asyncio.create_task(body(), name=f"ff-{kind}-{vm}")
        job.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(accepted)
        return job

    async def drain(self) -> None:
        """Take no new jobs and wait for every running one to finish (never cancels them)."""
        self.accepting = False
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
