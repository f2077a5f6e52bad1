"""Small asyncio helpers shared by the engine and the drivers (imports nothing of freezeframe)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["shielded"]

T = TypeVar("T")


async def shielded(aw: Awaitable[T]) -> T:
    """Run ``aw`` to completion even if the caller is cancelled meanwhile, then re-raise the
    cancellation. Used for the thaw and for cleanup that must not be cut short.

    Raises:
        asyncio.CancelledError: the caller was cancelled (after ``aw`` finished).
        Exception: whatever ``aw`` raises.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
