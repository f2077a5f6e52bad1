"""``freezeframe._aio``: bounded awaits that never lose a cancellation (Python 3.11's
``asyncio.wait_for`` does when the inner awaitable finishes in the same loop iteration)."""

from __future__ import annotations

import asyncio

import pytest

from freezeframe._aio import shielded, within


async def _race(bound: str) -> object:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    async def work() -> str:
        if bound == "within":
            return await within(fut, 10)
        return await asyncio.wait_for(fut, 10)

    task = asyncio.ensure_future(work())
    await asyncio.sleep(0)
    fut.set_result("done")  # the inner awaitable finishes ...
    task.cancel()  # ... and the caller is cancelled in the same iteration (SIGTERM at the cut)
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_within_keeps_a_cancellation_that_wait_for_loses() -> None:
    assert await _race("within") == "cancelled"
    # The reason for within(): on Python 3.11 wait_for returns the result instead.
    assert await _race("wait_for") in ("done", "cancelled")


async def test_within_times_out_and_passes_results() -> None:
    assert await within(asyncio.sleep(0, result=7), 1) == 7
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(5), 0.01)


async def test_shielded_finishes_then_reraises_the_cancellation() -> None:
    done: list[int] = []

    async def cleanup() -> None:
        await asyncio.sleep(0.05)
        done.append(1)

    async def caller() -> None:
        await shielded(cleanup())

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == [1]


def test_cli_exits_143_when_a_sigterm_was_swallowed_below_it() -> None:
    import os
    import signal

    from freezeframe.cli._common import run

    async def work() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:  # a library that swallows the cancellation
            return "finished anyway"
        return "not signalled"

    with pytest.raises(SystemExit) as ei:
        run(work)
    assert ei.value.code == 143


def test_with_json_a_signal_is_one_json_error_document(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import os
    import signal

    from freezeframe.cli._common import run

    async def work() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(5)
        return "not signalled"

    with pytest.raises(SystemExit) as ei:
        run(work, as_json=True)
    assert ei.value.code == 143
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"] == "Terminated"
    assert doc["exit_code"] == 143
    assert doc["hint"]
