"""freezeframe: consistent, proven snapshots of running QEMU/KVM VMs and all their volumes."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
