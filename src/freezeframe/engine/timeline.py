"""The in-memory timeline of one snapshot: named steps with wall-clock and monotonic times.

Recording a step costs a clock read and a list append, so it is safe inside the freeze window
(nothing is written anywhere until the window is over).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from freezeframe.models import TimelineEvent

__all__ = ["Timeline"]


class Timeline:
    """Ordered steps; :meth:`mark` records one, :meth:`ms_between` measures an interval."""

    def __init__(self, on_mark: Callable[[TimelineEvent], None] | None = None) -> None:
        self._events: list[TimelineEvent] = []
        self._on_mark = on_mark

    def mark(self, name: str, detail: str = "", *, notify: bool = True) -> TimelineEvent:
        ev = TimelineEvent(
            name=name, t=datetime.now(UTC), mono_ns=time.monotonic_ns(), detail=detail
        )
        self._events.append(ev)
        if notify and self._on_mark is not None:
            self._on_mark(ev)
        return ev

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
