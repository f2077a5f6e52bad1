"""Small helpers of the lab: an asyncio-friendly file lock, atomic writes, the console tail."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from freezeframe.errors import LabError

__all__ = ["atomic_write", "console_tail", "file_lock"]


@contextlib.asynccontextmanager
async def file_lock(path: Path, *, timeout: float, what: str) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` body.

    Polls without blocking the event loop. Raises LabError if the lock is not had within
    ``timeout`` seconds (``what`` names the lock in the message).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{what} is busy (lock {path} held for more than {timeout:g}s)"
                    ) from None
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_KEY_LINES = ("Kernel panic", "fflab: ERROR", "fflab: insmod")


def console_tail(console_log: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a console log ('(empty)' or '(missing)' otherwise), after
    up to 5 earlier key lines (kernel panic, guest init errors) that fell out of the tail."""
    try:
        data = console_log.read_bytes()
    except FileNotFoundError:
        return "(missing)"
    all_lines = data.decode(errors="replace").replace("\r", "").strip().splitlines()
    tail = all_lines[-lines:]
    if not tail:
        return "(empty)"
    # Keep the lines that explain a failure even when a long trace pushed them out of the tail.
    earlier = [ln for ln in all_lines[:-lines] if any(k in ln for k in _KEY_LINES)]
    head = [*earlier[-5:], "..."] if earlier else []
    return "\n".join(head + tail)
