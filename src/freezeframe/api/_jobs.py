"""The server's refusal of new jobs while it stops.

Snapshot and verify jobs are the service's (:meth:`Service.start_snapshot`,
:meth:`Service.start_verify`): tasks of the service, never of the HTTP request that started
them, waited for at shutdown (:meth:`Service.drain`). This module holds what the HTTP face adds:
once SIGTERM came, a new job is refused with ``503 shutting-down``.
"""

from __future__ import annotations

__all__ = ["ShuttingDown"]


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""
