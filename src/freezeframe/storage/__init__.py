"""Offline access to disk images at the cut: read-only export through a throw-away overlay
(:mod:`~freezeframe.storage.inspect`) and filesystem checks with verdicts
(:mod:`~freezeframe.storage.verify`)."""

from freezeframe.storage.inspect import (
    ImageView,
    Partition,
    mounted,
    open_image,
    sweep_stale_workspaces,
)
from freezeframe.storage.verify import parse_user_checks, verify_disks

__all__ = [
    "ImageView",
    "Partition",
    "mounted",
    "open_image",
    "parse_user_checks",
    "sweep_stale_workspaces",
    "verify_disks",
]
