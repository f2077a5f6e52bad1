"""Who holds a VM lock, a freeze intent or a verify's mount, and whether that holder is still
alive. A neutral module below the layers (like :mod:`freezeframe._aio`): the catalog and the
storage modules both use it; :mod:`freezeframe.catalog` re-exports its functions.

An owner is ``"<hostname>:<pid>:<random>"``: one value per process (recomputed after a fork).
Only holders on *this* host can be judged; a holder is dead when its pid does not exist, or
when the process now running under that pid started after the lock was taken (the pid was
reused). Everything else counts as alive, so a lock is never stolen on a guess.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["Owner", "holder_is_dead", "make_owner", "parse_owner"]

log = logging.getLogger(__name__)

_owner_by_pid: dict[int, str] = {}

#: A process that started more than this after the lock was taken cannot be its holder
#: (/proc gives the boot time in whole seconds and the start time in clock ticks).
_START_SLACK_S = 2.0


def make_owner() -> str:
    """``"<hostname>:<pid>:<random>"`` identifying this process; stable for its lifetime."""
    pid = os.getpid()
    owner = _owner_by_pid.get(pid)
    if owner is None:
        owner = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
        _owner_by_pid.clear()
        _owner_by_pid[pid] = owner
    return owner


@dataclass(frozen=True, slots=True)
class Owner:
    host: str
    pid: int
    token: str


def parse_owner(owner: str) -> Owner | None:
    """Split an owner string; ``None`` if it was not made by :func:`make_owner`."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return None
    host, pid_text, token = parts
    try:
        pid = int(pid_text)
    except ValueError:
        return None
    if pid <= 0:
        return None
    return Owner(host, pid, token)


def _process_start(pid: int) -> datetime | None:
    """Wall-clock start time of ``pid`` from /proc, or ``None`` if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime_line = next(
            line
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # Field 22 (starttime) counts after the command name, which may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[19])
        boot = int(btime_line.split()[1])
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.fromtimestamp(boot + ticks / hz, UTC)


def holder_is_dead(owner: str, since: datetime) -> bool:
    """True only if ``owner`` is a process of this host that is provably gone.

    ``since`` is when the holder took the lock (aware). Never raises.
    """
    parsed = parse_owner(owner)
    if parsed is None or parsed.host != socket.gethostname():
        return False
    if parsed.pid == os.getpid():
        # Our own process (possibly a different Catalog or a different owner string): alive.
        return False
    try:
        os.kill(parsed.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, belongs to someone else
    except OSError:
        return False
    started = _process_start(parsed.pid)
    if started is not None and (started - since).total_seconds() > _START_SLACK_S:
        log.info("pid %d was reused after %s took its lock at %s", parsed.pid, owner, since)
        return True
    return False
