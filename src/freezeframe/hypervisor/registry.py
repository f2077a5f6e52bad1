"""Lookup of hypervisor drivers by name through the ``freezeframe.drivers`` entry points.

Raises :class:`~freezeframe.errors.UsageError` for an unknown name and
:class:`~freezeframe.errors.DependencyError` (naming the package) when the driver's module
cannot be imported because an optional dependency is missing.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from freezeframe.errors import DependencyError, UsageError

if TYPE_CHECKING:
    from freezeframe.agent.base import Agent
    from freezeframe.hypervisor.base import HypervisorDriver

__all__ = ["available_drivers", "driver_for_address", "load_driver", "open_agent"]

GROUP = "freezeframe.drivers"

#: Which package brings the optional module a driver needs.
_PACKAGE_FOR_MODULE = {"libvirt": "python3-libvirt", "qemu": "pip install qemu.qmp"}


def available_drivers() -> list[str]:
    """Names of the registered drivers (not imported)."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_driver(name: str) -> type[HypervisorDriver]:
    """Import and return the driver class registered as ``name``."""
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none (is freezeframe installed?)"
        raise UsageError(f"unknown hypervisor driver {name!r}; known: {known}")
    try:
        cls = eps[name].load()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        pkg = _PACKAGE_FOR_MODULE.get(missing, missing)
        raise DependencyError(
            f"driver {name!r} needs the Python module {missing!r}", package=pkg
        ) from exc
    return cls  # type: ignore[no-any-return]


def driver_for_address(address: str) -> str:
    """The driver whose agent address ``address`` is: ``NAME:...`` for a registered driver
    NAME (``libvirt:UUID@URI``), else ``qmp`` (a socket path, as intents always held)."""
    scheme, sep, _ = address.partition(":")
    if sep and not address.startswith("/") and scheme in available_drivers():
        return scheme
    return "qmp"


def open_agent(address: str, *, timeout: float) -> Agent:
    """An unconnected agent client for an agent address stored in a freeze intent, built by
    the driver that made the address. Raises UsageError / DependencyError as
    :func:`load_driver`."""
    return load_driver(driver_for_address(address)).agent_at(address, timeout=timeout)
