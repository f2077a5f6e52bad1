"""How one user check is run: its exit decides, not its output's end; its group is killed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from freezeframe.storage.verify import _run_user_check


async def test_a_background_child_holding_the_output_does_not_fail_a_passed_check(
    tmp_path: Path,
) -> None:
    start = time.monotonic()
    run = await _run_user_check(
        ["sh", "-c", "sleep 100 & echo ok; exit 0"], tmp_path, dict(os.environ), timeout=20
    )
    assert run.returncode == 0
    assert "ok" in run.out
    assert time.monotonic() - start < 10  # neither the 20 s timeout nor the 100 s sleep


async def test_a_check_that_runs_too_long_is_killed_and_fails(tmp_path: Path) -> None:
    start = time.monotonic()
    run = await _run_user_check(
        ["sh", "-c", "echo started; sleep 100"], tmp_path, dict(os.environ), timeout=1
    )
    assert run.returncode is None
    assert "started" in run.out  # what it wrote before is kept
    assert time.monotonic() - start < 8
