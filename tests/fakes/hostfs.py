"""Building filesystem images on the host for tests and benchmarks: run a program, mount a
raw image through a loop device (always undone, thawed first if a test froze it)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MiB", "loop_mounted", "sh"]

MiB = 1024 * 1024


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def loop_mounted(raw: Path, mnt: Path) -> Iterator[Path]:
    """Mount a raw filesystem image through a loop device; always undone."""
    dev = sh("losetup", "--find", "--show", str(raw)).strip()
    try:
        mnt.mkdir(exist_ok=True)
        sh("mount", dev, str(mnt))
        try:
            yield mnt
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, check=False)
            sh("umount", str(mnt))
    finally:
        sh("losetup", "-d", dev)
