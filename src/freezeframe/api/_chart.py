"""The freeze-window timeline of a snapshot record as phases and as an inline SVG chart.

Owns only presentation: which timeline steps bound which phase (prepare, pre-flush, freeze,
cut, thaw) and how they are drawn. Rendered on the server (no JavaScript); every text put in
the SVG is escaped. The chart scales with its container (``viewBox``), so it reads on a
narrow window; the same numbers are in a table next to it for screen readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = ["Phase", "phases", "timeline_svg"]


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    start_ms: float  # from the first step of the timeline
    ms: float
    in_window: bool  # inside the freeze window (freeze sent -> thawed)
    ok: bool  # ended by its normal step (not a failure or timeout)


#: (phase, its first step, steps that end it normally, steps that end it badly)
_PHASES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("prepare", "started", ("prepared",), ("failed",)),
    ("pre-flush", "preflush_sent", ("preflushed",), ("preflush_timeout", "preflush_failed")),
    ("freeze", "freeze_sent", ("frozen",), ("freeze_failed", "freeze_timeout")),
    ("cut", "cut_sent", ("cut",), ("cut_failed", "cut_interrupted")),
    ("thaw", "thaw_sent", ("thawed",), ("thaw_failed",)),
)


def _mono(ev: Any) -> int:
    return int(ev["mono_ns"]) if isinstance(ev, dict) else int(ev.mono_ns)


def _name(ev: Any) -> str:
    return str(ev["name"]) if isinstance(ev, dict) else str(ev.name)


def phases(timeline: Sequence[Any]) -> list[Phase]:
    """The phases found in ``timeline`` (TimelineEvent objects or their JSON dicts), in order.

    A phase whose end is missing (the snapshot stopped there) is left out. Times come from the
    monotonic clock of the process that took the snapshot.
    """
    if not timeline:
        return []
    t0 = _mono(timeline[0])
    names = [_name(e) for e in timeline]
    try:
        win_start = _mono(timeline[names.index("freeze_sent")])
        win_end = _mono(timeline[names.index("thawed", names.index("freeze_sent"))])
    except ValueError:
        win_start = win_end = -1
    out: list[Phase] = []
    for phase, first, good, bad in _PHASES:
        if first not in names:
            continue
        i = names.index(first)
        end = next((j for j in range(i + 1, len(names)) if names[j] in good + bad), None)
        if end is None:
            continue
        a, b = _mono(timeline[i]), _mono(timeline[end])
        out.append(
            Phase(
                name=phase,
                start_ms=(a - t0) / 1e6,
                ms=(b - a) / 1e6,
                in_window=win_start >= 0 and win_start <= a and b <= win_end,
                ok=names[end] in good,
            )
        )
    return out


_W = 640
_LABEL = 92
_ROW = 22
_BAR = 14


def _rows(ps: list[Phase], origin: float, span: float, y0: int) -> list[str]:
    scale = (_W - _LABEL - 90) / span if span > 0 else 0.0
    out: list[str] = []
    for k, p in enumerate(ps):
        y = y0 + k * _ROW
        x = _LABEL + (p.start_ms - origin) * scale
        w = max(2.0, p.ms * scale)
        cls = "bar-window" if p.in_window else "bar"
        if not p.ok:
            cls = "bar-bad"
        out.append(
            f'<text x="{_LABEL - 6}" y="{y + _BAR - 3}" text-anchor="end" class="lbl">'
            f"{escape(p.name)}</text>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{_BAR}" class="{cls}">'
            f"<title>{escape(p.name)}: {p.ms:.1f} ms</title></rect>"
            f'<text x="{x + w + 4:.1f}" y="{y + _BAR - 3}" class="ms">{p.ms:.1f} ms</text>'
        )
    return out


def timeline_svg(timeline: Sequence[Any], window_ms: float | None) -> str:
    """An inline ``<svg>``: every phase on the snapshot's time axis, then the freeze window
    alone (zoomed: its phases are a few milliseconds next to a prepare of hundreds). Empty
    string when the timeline has no phase."""
    ps = phases(timeline)
    if not ps:
        return ""
    total = max(p.start_ms + p.ms for p in ps)
    inside = [p for p in ps if p.in_window]
    height = 28 + len(ps) * _ROW + (30 + len(inside) * _ROW if inside else 0) + 6
    label = "; ".join(f"{p.name} {p.ms:.1f} ms" for p in ps)
    if window_ms is not None:
        label += f"; freeze window {window_ms:.1f} ms"
    parts = [
        f'<svg class="timeline" viewBox="0 0 {_W} {height}" width="100%" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
        f'<text x="0" y="14" class="hdr">whole snapshot ({total:.1f} ms)</text>',
    ]
    parts += _rows(ps, 0.0, total, 22)
    if inside:
        y = 22 + len(ps) * _ROW + 12
        origin = min(p.start_ms for p in inside)
        span = max(p.start_ms + p.ms for p in inside) - origin
        win = f"{window_ms:.1f} ms" if window_ms is not None else f"{span:.1f} ms"
        parts.append(f'<text x="0" y="{y + 4}" class="hdr">freeze window ({win})</text>')
        parts += _rows(inside, origin, span, y + 12)
    parts.append("</svg>")
    return "".join(parts)
