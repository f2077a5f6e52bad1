"""Small asyncio helpers shared by the engine and the drivers (imports nothing of freezeframe)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["AsyncClosing", "shielded", "within"]

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


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw`` bounded by ``timeout`` seconds (None: unbounded).

    Use it instead of :func:`asyncio.wait_for`: in Python 3.11 ``wait_for`` returns the inner
    result when its caller is cancelled in the same loop iteration as the inner awaitable
    completes, so the cancellation (Ctrl-C, SIGTERM) is lost. :func:`asyncio.timeout` keeps it.

    Raises:
        TimeoutError: ``aw`` did not finish in time (it is cancelled).
        asyncio.CancelledError: the caller was cancelled.
        Exception: whatever ``aw`` raises.
    """
    async with asyncio.timeout(timeout):
        return await aw


class AsyncClosing:
    """``async with obj:`` for a class with an ``async close()``: entering returns the object,
    leaving (however) awaits ``close()``."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
