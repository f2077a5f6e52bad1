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


def console_tail(console_log: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a console log ('(empty)' or '(missing)' otherwise)."""
    try:
        data = console_log.read_bytes()
    except FileNotFoundError:
        return "(missing)"
    text = data.decode(errors="replace").replace("\r", "")
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(empty)"
