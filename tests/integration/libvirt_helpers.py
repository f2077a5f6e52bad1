"""Small helpers for tests on a real libvirtd (``qemu:///system``): read what libvirt says of a
domain (``virsh domblklist``, its log), destroy it, and make directories libvirt's QEMU
(``libvirt-qemu``) can traverse (pytest's own temp directories are 0700)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

LIBVIRT_URI = "qemu:///system"


def virsh(*args: str, check: bool = True, timeout: float = 120) -> str:
    return subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    ).stdout


def domblklist(domain: str) -> dict[str, str]:
    """target -> source, as ``virsh domblklist`` shows the live domain."""
    out: dict[str, str] = {}
    for line in virsh("domblklist", domain).splitlines()[2:]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].strip()
    return out


def domain_log(domain: str) -> str:
    """libvirt's log of the domain's QEMU (where taints are recorded)."""
    path = Path(f"/var/log/libvirt/qemu/{domain}.log")
    return path.read_text(errors="replace") if path.exists() else ""


def destroy_domain(domain: str) -> None:
    """Stop a transient domain (and undefine a persistent one); never raises."""
    virsh("destroy", domain, check=False)
    virsh("undefine", domain, check=False)


def traversable_tmpdir(prefix: str) -> Path:
    """A fresh directory under /var/tmp, mode 0755 (libvirt-qemu must reach the images)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def private_home(prefix: str, cache: Path) -> Iterator[Path]:
    """A private FREEZEFRAME_HOME (a :func:`traversable_tmpdir`) for a test session, sharing
    the persistent lab build cache ``cache`` (unless FREEZEFRAME_CACHE is set); removed after."""
    home = traversable_tmpdir(prefix)
    mp = pytest.MonkeyPatch()
    mp.setenv("FREEZEFRAME_HOME", str(home))
    mp.setenv("FREEZEFRAME_CACHE", os.environ.get("FREEZEFRAME_CACHE") or str(cache))
    try:
        yield home
    finally:
        mp.undo()
        shutil.rmtree(home, ignore_errors=True)
