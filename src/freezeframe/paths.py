"""Where freezeframe keeps its state: the catalog, lab images, caches, run files.

Root: the one :func:`using_state_dir` set for the running code (the service passes its
``Config.state_dir`` down this way to the lab, whose functions read :func:`lab_dir`); else
``$FREEZEFRAME_HOME`` if set; else ``/var/lib/freezeframe`` for root; else
``$XDG_DATA_HOME/freezeframe`` (``~/.local/share/freezeframe``). Nothing here creates
anything except :func:`ensure_dir`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

__all__ = ["default_database_url", "ensure_dir", "lab_dir", "state_dir", "using_state_dir"]

#: The state root set by :func:`using_state_dir` for this context (a task and the threads and
#: tasks it starts; others are not affected). None: from the environment.
_STATE_DIR: ContextVar[Path | None] = ContextVar("freezeframe_state_dir", default=None)


@contextlib.contextmanager
def using_state_dir(path: Path) -> Iterator[None]:
    """Within the block (and the tasks and ``asyncio.to_thread`` calls it starts), the state
    root is ``path``, whatever the environment says."""
    token = _STATE_DIR.set(path)
    try:
        yield
    finally:
        _STATE_DIR.reset(token)


def state_dir() -> Path:
    """The state root (not created)."""
    scoped = _STATE_DIR.get()
    if scoped is not None:
        return scoped
    env = os.environ.get("FREEZEFRAME_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/freezeframe")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "freezeframe"


def lab_dir() -> Path:
    """Root of lab VMs and the lab's build cache."""
    return state_dir() / "lab"


def default_database_url() -> str:
    """``$FREEZEFRAME_DATABASE_URL`` or a SQLite file in the state directory."""
    env = os.environ.get("FREEZEFRAME_DATABASE_URL")
    if env:
        return env
    return f"sqlite:///{state_dir() / 'catalog.sqlite'}"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
