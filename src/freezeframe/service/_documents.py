"""One serializer for every face: models, outcomes and errors as plain JSON values.

:func:`to_document` turns dataclasses, enums, datetimes, paths and containers into JSON values,
with the special cases written once: a snapshot record also gets ``thaw_unconfirmed`` and
``intent_left_open`` (shown live, :class:`SnapshotShown`, also ``qemu_runs_on``); a snapshot
summary (a list's item) is built directly by :func:`summary_document` (a page of them is what
lists send, so it is the fast path); a doctor report ``ok`` (first); a recover outcome its
``code`` (and ``failed``); a lab VM and the lab Ceph their own documents; an outcome its ``code``. A
:class:`~freezeframe.errors.Remedy` (on an error or a doctor check) is rendered by the face's
``render`` function into the ``hint`` / ``fix`` text; the remedy itself is also given as data.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from freezeframe.engine import Check, DoctorReport, RecoverOutcome
from freezeframe.errors import FreezeframeError, Remedy
from freezeframe.lab import CephDown, CephLab, LabVm
from freezeframe.models import SnapshotRecord, SnapshotSummary
from freezeframe.service._results import (
    RecoverReport,
    SnapshotOutcome,
    SnapshotShown,
    VerifyOutcome,
)

__all__ = ["RemedyRenderer", "error_document", "join_hint", "summary_document", "to_document"]

#: A face's words for a remedy (the CLI: ``freezeframe recover web1``).
RemedyRenderer = Callable[[Remedy], str]


def join_hint(hint: str | None, remedy: Remedy | None, render: RemedyRenderer | None) -> str | None:
    """A hint in a face's words: the neutral ``hint`` and the rendered ``remedy``
    (``"HINT: REMEDY"``); either alone when the other is missing."""
    if remedy is None or render is None:
        return hint or None
    said = render(remedy)
    return f"{hint}: {said}" if hint else said


def _remedy(remedy: Remedy | None) -> dict[str, Any] | None:
    if remedy is None:
        return None
    return {"action": remedy.action.value, "vm": remedy.vm, "params": dict(remedy.params)}


def summary_document(s: SnapshotSummary) -> dict[str, Any]:
    """A list item as JSON values: its fields by name, written out (no reflection), with the
    values :func:`to_document` would give them."""
    return {
        "id": s.id,
        "vm": s.vm,
        "created_at": s.created_at.isoformat(),
        "status": s.status.value,
        "policy": s.policy.value,
        "level": s.level.value,
        "error": s.error,
        "parent_id": s.parent_id,
        "freeze_window_ms": s.freeze_window_ms,
        "disk_count": s.disk_count,
        "filesystem_count": s.filesystem_count,
        "frozen_count": s.frozen_count,
        "verdict": None if s.verdict is None else s.verdict.value,
        "verified_at": None if s.verified_at is None else s.verified_at.isoformat(),
        "thaw_unconfirmed": s.thaw_unconfirmed,
        "intent_left_open": s.intent_left_open,
    }


def to_document(obj: Any, *, render: RemedyRenderer | None = None) -> Any:
    """``obj`` as plain JSON values (see the module's docstring for the special cases)."""
    if isinstance(obj, SnapshotSummary):
        return summary_document(obj)
    if isinstance(obj, FreezeframeError):
        return error_document(obj, render=render)
    if isinstance(obj, LabVm | CephLab | CephDown):
        return obj.to_json()
    if isinstance(obj, Remedy):
        return _remedy(obj)
    if isinstance(obj, RecoverReport):
        return [to_document(o, render=render) for o in obj.outcomes]
    if isinstance(obj, SnapshotShown):
        shown: dict[str, Any] = to_document(obj.record, render=render)
        if obj.live:
            shown["qemu_runs_on"] = obj.qemu_runs_on
        return shown
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        doc: dict[str, Any] = {}
        if isinstance(obj, DoctorReport):
            doc["ok"] = obj.ok
        for f in dataclasses.fields(obj):
            doc[f.name] = to_document(getattr(obj, f.name), render=render)
        if isinstance(obj, SnapshotRecord):
            doc["thaw_unconfirmed"] = obj.thaw_unconfirmed
            doc["intent_left_open"] = obj.intent_left_open
            doc["evidence_unavailable"] = obj.evidence_unavailable
        elif isinstance(obj, Check):
            doc["fix"] = join_hint(obj.fix, obj.remedy, render) or ""
        elif isinstance(obj, RecoverOutcome):
            doc["code"] = obj.code
            doc["failed"] = obj.failed
        elif isinstance(obj, SnapshotOutcome | VerifyOutcome):
            doc["code"] = obj.code.value
        return doc
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_document(v, render=render) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_document(v, render=render) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return obj


def error_document(
    exc: FreezeframeError, *, render: RemedyRenderer | None = None
) -> dict[str, Any]:
    """The JSON error document of ``exc``: ``error`` (class name), ``code``, ``message``,
    ``exit_code``, ``hint`` (in the face's words, null when none), ``remedy`` (data, null when
    none), and ``snapshot_id`` for a snapshot that was attempted."""
    doc: dict[str, Any] = {
        "error": type(exc).__name__,
        "code": exc.code,
        "message": exc.message,
        "exit_code": exc.exit_code,
        "hint": join_hint(exc.hint, exc.remedy, render),
        "remedy": _remedy(exc.remedy),
    }
    snap = getattr(exc, "snapshot_id", None)
    if snap:
        doc["snapshot_id"] = snap
    return doc
