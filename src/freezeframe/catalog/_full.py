"""Telling a full catalog filesystem apart from other database failures.

SQLite reports a write that found no space as ``database or disk is full`` (``SQLITE_FULL``)
only when it notices itself; when the kernel refuses a write or a WAL/shared-memory extension
(ENOSPC) it often says ``disk I/O error`` (``SQLITE_IOERR_*``), which reads like failing
hardware. :func:`filesystem_full_error` asks the filesystem holding the catalog (``statvfs``)
at the moment the error is translated and, when it is (nearly) full, names that instead.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from freezeframe.errors import CatalogError

__all__ = ["FILESYSTEM_FULL", "NEARLY_FULL_BYTES", "CatalogFullError", "filesystem_full_error"]

#: :attr:`CatalogFullError.reason`.
FILESYSTEM_FULL = "filesystem-full"
#: A ``disk I/O error`` counts as a full filesystem when fewer bytes than this (or than the
#: catalog file and its WAL, whichever is more: one transaction may need that much) are free.
#: Space a failed transaction took is given back when it rolls back, so "no byte free" would
#: miss most of them.
NEARLY_FULL_BYTES = 1 << 20


class CatalogFullError(CatalogError):
    """The filesystem holding the catalog file has no room for the write.

    ``reason`` is :data:`FILESYSTEM_FULL`; ``path`` the catalog file; ``free_bytes`` what its
    filesystem had free when the error was seen (None when it could not be asked).
    """

    reason = FILESYSTEM_FULL
    default_code = "catalog-full"

    def __init__(
        self, message: str, *, path: Path, free_bytes: int | None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.free_bytes = free_bytes


def _free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write in ``directory``'s filesystem (root may use the
    blocks reserved for it)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the DB-API error a SQLAlchemy error wraps (``orig``), and their causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 8:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        orig = getattr(item, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, item.__cause__]
    return seen


def _kind(exc: BaseException) -> tuple[str, str] | None:
    """``("full", detail)`` for an error that says the disk is full, ``("io", detail)`` for a
    SQLite I/O error, else None."""
    for item in _causes(exc):
        if isinstance(item, OSError) and item.errno == errno.ENOSPC:
            return "full", str(item)
        if isinstance(item, sqlite3.Error):
            code = getattr(item, "sqlite_errorcode", None)
            primary = code & 0xFF if isinstance(code, int) else None
            if primary == sqlite3.SQLITE_FULL or "database or disk is full" in str(item):
                return "full", str(item)
            if primary == sqlite3.SQLITE_IOERR or "disk I/O error" in str(item):
                return "io", str(item)
    return None


def filesystem_full_error(
    what: str, exc: BaseException, file: Path | None
) -> CatalogFullError | None:
    """The error to raise instead of a plain CatalogError when ``exc`` (a SQLAlchemy, sqlite3
    or OS error met on catalog ``file``) comes from the catalog's filesystem being full; None
    when it does not, or when the catalog is no local file. ``what`` starts the message
    (e.g. ``catalog /var/lib/freezeframe/catalog.db``).

    ``database or disk is full`` and ENOSPC always count; a ``disk I/O error`` counts when
    fewer than :data:`NEARLY_FULL_BYTES` (or the catalog's own size) are free right now.
    """
    if file is None:
        return None
    kind = _kind(exc)
    if kind is None:
        return None
    directory = file.parent
    free = _free_bytes(directory)
    if kind[0] == "io":
        needed = max(NEARLY_FULL_BYTES, _size(file) + _size(file.with_name(file.name + "-wal")))
        if free is None or free >= needed:
            return None
    free_text = f"{free} bytes free" if free is not None else "free space unknown"
    return CatalogFullError(
        f"{what}: the filesystem holding the catalog {file} is full ({free_text} in "
        f"{directory}): {kind[1]}",
        path=file,
        free_bytes=free,
        hint=f"free space on the filesystem of {directory} (df -h {directory}), then retry",
    )
