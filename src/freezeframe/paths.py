"""Where freezeframe keeps its state: the catalog, lab images, caches, run files.

Root: ``$FREEZEFRAME_HOME`` if set; else ``/var/lib/freezeframe`` for root; else
``$XDG_DATA_HOME/freezeframe`` (``~/.local/share/freezeframe``). Nothing here creates
anything except :func:`ensure_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_database_url", "ensure_dir", "lab_dir", "state_dir"]


def state_dir() -> Path:
    """The state root (not created)."""
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
