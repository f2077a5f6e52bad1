"""The in-memory timeline of one snapshot: named steps with wall-clock and monotonic times.

Recording a step costs two clock reads and a list append. Inside the freeze window the engine
wraps the steps in :meth:`Timeline.deferred`, so the progress callback (a terminal, a web
client) runs only after the thaw and can never delay or stop it; a callback that raises is
logged and ignored.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from freezeframe.models import TimelineEvent

__all__ = ["Timeline"]

log = logging.getLogger(__name__)


class Timeline:
    """Ordered steps; :meth:`mark` records one, :meth:`ms_between` measures an interval."""

    def __init__(self, on_mark: Callable[[TimelineEvent], None] | None = None) -> None:
        self._events: list[TimelineEvent] = []
        self._on_mark = on_mark
        self._held: list[TimelineEvent] | None = None

    def mark(self, name: str, detail: str = "", *, notify: bool = True) -> TimelineEvent:
        ev = TimelineEvent(
            name=name, t=datetime.now(UTC), mono_ns=time.monotonic_ns(), detail=detail
        )
        self._events.append(ev)
        if notify and self._on_mark is not None:
            if self._held is not None:
                self._held.append(ev)
            else:
                self._notify(ev)
        return ev

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold progress notifications until the block ends (the freeze window)."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for ev in held:
                self._notify(ev)

    def _notify(self, ev: TimelineEvent) -> None:
        if self._on_mark is None:
            return
        try:
            self._on_mark(ev)
        except Exception:
            log.warning("progress callback failed on %s; ignored", ev.name, exc_info=True)

    def find(self, name: str) -> TimelineEvent | None:
        """The last event called ``name``."""
        for ev in reversed(self._events):
            if ev.name == name:
                return ev
        return None

    def ms_between(self, start: str, end: str) -> float | None:
        a, b = self.find(start), self.find(end)
        if a is None or b is None:
            return None
        return (b.mono_ns - a.mono_ns) / 1e6

    @property
    def events(self) -> tuple[TimelineEvent, ...]:
        return tuple(self._events)
