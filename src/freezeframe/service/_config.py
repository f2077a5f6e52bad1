"""The service's configuration: one immutable object passed in, never read from or written to
the environment by the service itself.

:meth:`Config.from_env` is the one place the environment is consulted, and only as a default
(``$FREEZEFRAME_HOME``, ``$FREEZEFRAME_DATABASE_URL`` through :mod:`freezeframe.paths`); a face
that is told otherwise (``--database-url``) passes its value in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freezeframe import paths

__all__ = ["Config"]


@dataclass(frozen=True, slots=True)
class Config:
    """Where the service keeps its state and how it behaves.

    ``state_dir``: the state root (catalog file, lab VMs). ``database_url``: the catalog
    (SQLAlchemy URL; None: a SQLite file in ``state_dir``). ``followup``: a thaw that could not
    be confirmed keeps being retried in the background (long-running servers; the CLI leaves
    the freeze intent open for ``recover`` instead). ``thaw_timeout`` / ``recover_timeout``:
    seconds for one thaw + status confirmation (snapshot, recover).
    """

    state_dir: Path
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    followup: bool = False
    thaw_timeout: float = 5.0
    recover_timeout: float = 5.0

    @classmethod
    def from_env(
        cls,
        *,
        state_dir: Path | None = None,
        database_url: str | None = None,
        followup: bool = False,
    ) -> Config:
        """A configuration from explicit values, the environment filling in what is not given
        (``$FREEZEFRAME_HOME``, ``$FREEZEFRAME_DATABASE_URL``, then the built-in defaults)."""
        if state_dir is None:
            state_dir = paths.state_dir()
            database_url = database_url or paths.default_database_url()
        return cls(state_dir=state_dir, database_url=database_url, followup=followup)

    @property
    def catalog_url(self) -> str:
        """The catalog's URL: ``database_url``, else a SQLite file in ``state_dir``."""
        return self.database_url or f"sqlite:///{self.state_dir / 'catalog.sqlite'}"

    @property
    def lab_dir(self) -> Path:
        """Root of the lab VMs."""
        return self.state_dir / "lab"
