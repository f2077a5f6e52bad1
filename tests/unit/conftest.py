"""Fixtures of the unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

#: The CLI, run as a separate process (exit codes and output as an operator sees them).
FF = [sys.executable, "-m", "freezeframe.cli.main"]

Ff = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def ff(tmp_path: Path) -> Ff:
    """Run ``freezeframe ARGS...`` with a state directory of this test's own."""
    env = {**os.environ, "FREEZEFRAME_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FF, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    return run
