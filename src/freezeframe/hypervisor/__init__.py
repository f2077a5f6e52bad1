"""Hypervisor drivers: a small ABC (:mod:`.base`) and implementations loaded lazily by name.

Drivers are registered under the ``freezeframe.drivers`` entry-point group (see
``pyproject.toml``); :func:`load_driver` imports one only when it is asked for, so an optional
dependency (``libvirt-python``) is needed only by the VMs that use it.
"""

from __future__ import annotations

from freezeframe.hypervisor.base import (
    DriverCapabilities,
    DriverCheck,
    DriverPolicy,
    HypervisorDriver,
    LayerMerge,
    MergeOutcome,
    MergeProgress,
    PreparedCut,
    PreparedDisk,
)
from freezeframe.hypervisor.registry import (
    available_drivers,
    driver_for_address,
    load_driver,
    open_agent,
)

__all__ = [
    "DriverCapabilities",
    "DriverCheck",
    "DriverPolicy",
    "HypervisorDriver",
    "LayerMerge",
    "MergeOutcome",
    "MergeProgress",
    "PreparedCut",
    "PreparedDisk",
    "available_drivers",
    "driver_for_address",
    "load_driver",
    "open_agent",
]
