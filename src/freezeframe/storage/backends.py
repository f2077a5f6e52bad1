"""The storage-backend seam: which backend cuts a disk, and what the engine asks of it.

Owns the abstract :class:`StorageBackend`, :class:`BackendCapabilities`, the registry (entry
point group ``freezeframe.backends``, loaded lazily: a missing optional module is a
:class:`~freezeframe.errors.DependencyError` naming its package) and the built-in ``qcow2``
backend (an external overlay per disk, made and switched by the hypervisor driver: today's
behaviour). ``rbd`` lives in :mod:`freezeframe.storage.rbd_backend`.

Each disk is cut by the backend that owns its image (:func:`backend_name_for`); a VM may mix
them. A backend prepares before the freeze, cuts inside it, confirms, aborts, says its cut's
state, names what ``snapshot verify`` reads for a disk at the cut, and deletes what a snapshot
made. It never freezes or thaws: only :mod:`freezeframe.engine` sequences freeze -> cut ->
thaw.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Self

from freezeframe.errors import DependencyError, UsageError
from freezeframe.models import DiskInfo, SnapshotDisk, VmConfig

if TYPE_CHECKING:
    from freezeframe.hypervisor.base import CutState, HypervisorDriver, PreparedCut

__all__ = [
    "GROUP",
    "BackendCapabilities",
    "Qcow2Backend",
    "StorageBackend",
    "available_backends",
    "backend_name_for",
    "backend_of_record",
    "load_backend",
]

#: Entry point group of storage backends.
GROUP = "freezeframe.backends"

#: Built-in backends, used when the package's entry points are not installed (a source tree).
_BUILTIN = {
    "qcow2": "freezeframe.storage.backends:Qcow2Backend",
    "rbd": "freezeframe.storage.rbd_backend:RbdBackend",
}
_PACKAGE_FOR_MODULE = {"rados": "python3-rados", "rbd": "python3-rbd"}

#: The ``SnapshotDisk.backend`` value of each backend (``qcow2-external`` predates the seam).
RECORD_NAMES = {"qcow2": "qcow2-external", "rbd": "rbd"}


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What the planner checks before freezing.

    ``atomic_multi_disk``: the backend's cut of several disks is one atomic operation (a QMP
    ``transaction``); else the engine pauses the vCPUs around the cut when nothing is frozen.
    ``undoable``: a cut that was made can be taken back (an RBD snapshot is removed), so the
    engine makes it before the parts that cannot. ``needs_overlay_dir``: the cut creates files.
    """

    atomic_multi_disk: bool
    undoable: bool
    needs_overlay_dir: bool


class StorageBackend(abc.ABC):
    """Cuts the disks it owns. ``handle`` values are the backend's own (opaque to the engine).

    Every method raises :class:`~freezeframe.errors.FreezeframeError` subclasses only
    (foreign errors are translated inside the backend)."""

    name: ClassVar[str] = "abstract"
    capabilities: ClassVar[BackendCapabilities]

    @classmethod
    def for_vm(cls, cfg: VmConfig, driver: HypervisorDriver | None) -> Self:
        """The backend for the disks of VM ``cfg`` (``driver``: its connected driver, None
        when there is none, as for ``recover`` of a backend that needs none). Raises
        UsageError when this backend cannot work that way."""
        return cls()

    @classmethod
    @abc.abstractmethod
    def owns(cls, disk: DiskInfo) -> bool:
        """Whether this backend cuts ``disk``. No I/O."""

    def cut_problem(self, disk: DiskInfo) -> str | None:
        """Why ``disk`` cannot be cut (for the planner and doctor, before freezing); None when
        nothing is known to stand in the way. Never raises."""
        return None

    @abc.abstractmethod
    async def prepare(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> Any:
        """Everything that can happen before the freeze; returns the handle. On failure
        nothing prepared is left."""

    @abc.abstractmethod
    async def cut(self, handle: Any) -> None:
        """Cut every disk of ``handle`` (inside the freeze), all or nothing."""

    async def confirm(self, handle: Any) -> None:
        """Check after the thaw that the cut is in effect. Raises CutError otherwise."""
        return None

    @abc.abstractmethod
    async def abort(self, handle: Any) -> None:
        """Remove what :meth:`prepare` (and a cut that is not kept) made. Never raises."""

    async def cut_state(self, handle: Any) -> CutState:
        """``switched``, ``not-switched`` or ``unknown``. Never raises."""
        return "unknown"

    @abc.abstractmethod
    def record_disks(self, handle: Any) -> tuple[SnapshotDisk, ...]:
        """The record's disks for ``handle``. No I/O."""

    @abc.abstractmethod
    def handle_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> Any:
        """The handle of attempt ``snapshot_id`` rebuilt from its recorded disks (recover)."""

    def verify_source(self, disk: SnapshotDisk) -> str:
        """The QEMU image name that reads ``disk`` as it was at the cut, read-only."""
        return disk.image

    async def check_readable(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> None:
        """Before an offline check reads ``disks`` through :meth:`verify_source`: that what
        the snapshot made is there and reachable, answered within the backend's own bound
        (a reader such as ``qemu-img`` would wait much longer on storage that does not
        answer). The default (files, checked by the reader itself) checks nothing. Raises
        the backend's error (StorageError for RBD)."""
        return None

    async def delete(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> None:
        """Remove what the snapshot made on ``disks`` (the qcow2 backend: nothing here; its
        files are merged by the chain operations)."""
        return None

    async def close(self) -> None:
        """Release connections. Never raises."""
        return None


def available_backends() -> list[str]:
    """The names of the registered backends (the built-ins at least)."""
    return sorted({*_BUILTIN, *(ep.name for ep in entry_points(group=GROUP))})


def load_backend(name: str) -> type[StorageBackend]:
    """Import and return the backend class registered as ``name``.

    Raises UsageError (unknown name), DependencyError (its module needs a missing package)."""
    eps = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    target = eps.get(name) or _BUILTIN.get(name)
    if target is None:
        raise UsageError(
            f"unknown storage backend {name!r}; known: {', '.join(available_backends())}"
        )
    module_name, _, attr = target.partition(":")
    try:
        import importlib

        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        raise DependencyError(
            f"storage backend {name!r} needs the Python module {missing!r}",
            package=_PACKAGE_FOR_MODULE.get(missing, missing),
        ) from exc
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, StorageBackend)):
        raise UsageError(f"storage backend {name!r} ({target}) is not a StorageBackend")
    return cls


def backend_name_for(disk: DiskInfo) -> str:
    """The backend that cuts ``disk``: ``rbd`` for an image in Ceph RBD, else ``qcow2``."""
    return "rbd" if disk.rbd is not None else "qcow2"


def backend_of_record(disk: SnapshotDisk) -> str:
    """The backend that made a recorded disk (``qcow2-external`` and older records: qcow2)."""
    return "rbd" if disk.backend == "rbd" else "qcow2"


class Qcow2Backend(StorageBackend):
    """An external qcow2 overlay per disk, created and switched by the hypervisor driver in one
    atomic transaction (QMP ``blockdev-snapshot``, libvirt ``snapshotCreateXML``)."""

    name = "qcow2"
    capabilities = BackendCapabilities(
        atomic_multi_disk=True, undoable=False, needs_overlay_dir=True
    )

    def __init__(self, driver: HypervisorDriver, overlay_dir: str | None = None) -> None:
        self.driver = driver
        self.overlay_dir = overlay_dir

    @classmethod
    def owns(cls, disk: DiskInfo) -> bool:
        return disk.rbd is None

    @classmethod
    def for_vm(cls, cfg: VmConfig, driver: HypervisorDriver | None) -> Self:
        if driver is None:
            raise UsageError("the qcow2 backend works through the VM's hypervisor driver")
        return cls(driver, cfg.overlay_dir)

    def cut_problem(self, disk: DiskInfo) -> str | None:
        return self.driver.cut_problem(disk, self.overlay_dir)

    async def prepare(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> PreparedCut:
        from freezeframe.hypervisor.base import PreparedCut

        if not disks:
            return PreparedCut(snapshot_id, ())
        return await self.driver.prepare_cut(snapshot_id, list(disks), self.overlay_dir)

    async def cut(self, handle: PreparedCut) -> None:
        if handle.disks:
            await self.driver.cut(handle)

    async def confirm(self, handle: PreparedCut) -> None:
        if handle.disks:
            await self.driver.verify_cut(handle)

    async def abort(self, handle: PreparedCut) -> None:
        if handle.disks:
            await self.driver.abort(handle)

    async def cut_state(self, handle: PreparedCut) -> CutState:
        if not handle.disks:
            return "not-switched"
        return await self.driver.cut_state(handle)

    def record_disks(self, handle: PreparedCut) -> tuple[SnapshotDisk, ...]:
        return tuple(
            SnapshotDisk(
                device=p.disk.device,
                node=p.disk.node,
                image=p.image_at_cut,
                format=p.disk.format,
                overlay=p.overlay_file,
                backend=RECORD_NAMES["qcow2"],
                virtual_size=p.disk.virtual_size,
            )
            for p in handle.disks
        )

    def handle_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> PreparedCut:
        return self.driver.prepared_from_record(snapshot_id, disks)
