"""The ``rbd`` storage backend: a disk in Ceph RBD is cut by an RBD snapshot of its image.

Owns how a disk's Ceph connection is chosen (:func:`settings_for`: the VM's ``--ceph-conf`` /
``--ceph-id`` / ``--ceph-keyring``, else what the hypervisor was given for the disk, else the
global defaults ``FREEZEFRAME_CEPH_CONF`` / ``FREEZEFRAME_CEPH_ID`` / ``/etc/ceph/ceph.conf``
and ``admin``) and the cut: images opened before the freeze, then every snapshot ``ff-<id>``
made at once from outside with librbd (the lock owner, QEMU, makes it on request), all or
nothing (:mod:`freezeframe.storage.rbd`). A multi-image cut is not one atomic operation: with
nothing frozen the engine pauses the vCPUs around it (:attr:`BackendCapabilities.
atomic_multi_disk` is False). No secret is read or stored here: keys come from keyrings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

from freezeframe._aio import within
from freezeframe.errors import CutError, StorageError
from freezeframe.models import DiskInfo, RbdSource, SnapshotDisk, VmConfig
from freezeframe.storage.backends import RECORD_NAMES, BackendCapabilities, StorageBackend
from freezeframe.storage.rbd import (
    CephSettings,
    OpenImages,
    RbdClient,
    RbdImageRef,
    qemu_blockdev_json,
    snap_name,
)

if TYPE_CHECKING:
    from freezeframe.hypervisor.base import CutState, HypervisorDriver

__all__ = ["RbdBackend", "RbdCut", "parse_record_image", "settings_for"]

#: Default seconds for a Ceph connection and each operation (a dead cluster fails fast
#: instead of holding a frozen guest); also the longest the cut waits inside the freeze for the
#: snapshots (librbd's own timeouts do not bound a snapshot request a stopped monitor leaves
#: unanswered: the request is abandoned instead, see :meth:`RbdBackend.cut`).
DEFAULT_TIMEOUT = 5.0

log = logging.getLogger(__name__)

#: Clean-ups of abandoned cuts still waiting for Ceph (kept referenced until they finish).
_REAPERS: set[asyncio.Task[None]] = set()


def settings_for(cfg: VmConfig | None, src: RbdSource | None) -> CephSettings:
    """The Ceph settings for a disk ``src`` of the VM ``cfg`` (see the module docstring)."""
    conf = (cfg.ceph_conf if cfg else None) or (src.conf if src else None)
    conf = conf or os.environ.get("FREEZEFRAME_CEPH_CONF") or "/etc/ceph/ceph.conf"
    cid = (cfg.ceph_id if cfg else None) or (src.user if src else None)
    cid = cid or os.environ.get("FREEZEFRAME_CEPH_ID") or "admin"
    keyring = cfg.ceph_keyring if cfg else None
    return CephSettings(
        conf=Path(conf),
        client_id=cid,
        keyring=Path(keyring) if keyring else None,
        timeout=DEFAULT_TIMEOUT,
    )


def parse_record_image(image: str) -> tuple[RbdImageRef, str]:
    """``rbd:pool/image@ff-ID`` (a recorded disk's image) -> (the image, the snapshot name).

    Raises StorageError (``ceph-config``) for anything else."""
    spec, sep, snap = image.removeprefix("rbd:").partition("@")
    if not image.startswith("rbd:") or not sep or not snap:
        raise StorageError(f"not a recorded RBD snapshot: {image!r}", code="ceph-config")
    return RbdImageRef.parse(spec), snap


@dataclass(slots=True)
class _Group:
    settings: CephSettings
    refs: list[RbdImageRef] = field(default_factory=list)
    client: RbdClient | None = None
    opened: OpenImages | None = None


@dataclass(slots=True)
class RbdCut:
    """The handle of one attempt: its disks and, once prepared, the open images."""

    snapshot_id: str
    disks: tuple[DiskInfo, ...]
    refs: tuple[RbdImageRef, ...]
    groups: list[_Group]
    #: Snapshot requests abandoned by :meth:`RbdBackend.cut` (no answer in time, or the cut
    #: was cancelled) that may still complete: never kept, removed by the abort.
    late: asyncio.Future[None] | None = None

    @property
    def snap(self) -> str:
        return snap_name(self.snapshot_id)


class RbdBackend(StorageBackend):
    """RBD snapshots made with librbd from outside the hypervisor, all images at once."""

    name: ClassVar[str] = "rbd"
    capabilities = BackendCapabilities(
        atomic_multi_disk=False, undoable=True, needs_overlay_dir=False
    )

    def __init__(self, cfg: VmConfig | None = None) -> None:
        self.cfg = cfg

    @classmethod
    def for_vm(cls, cfg: VmConfig, driver: HypervisorDriver | None) -> Self:
        return cls(cfg)

    @classmethod
    def owns(cls, disk: DiskInfo) -> bool:
        return disk.rbd is not None

    def cut_problem(self, disk: DiskInfo) -> str | None:
        if disk.rbd is None:
            return "not an RBD image"
        st = settings_for(self.cfg, disk.rbd)
        problems = st.problems()
        if not problems and not st.conf.is_file():
            problems.append(f"the Ceph configuration {st.conf} does not exist")
        if disk.backing:
            problems.append("an RBD image below a local overlay is not cut by the rbd backend")
        return "; ".join(problems) or None

    def _handle(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> RbdCut:
        groups: dict[CephSettings, _Group] = {}
        refs = []
        for d in disks:
            assert d.rbd is not None
            ref = RbdImageRef(d.rbd.pool, d.rbd.image, d.rbd.namespace)
            st = settings_for(self.cfg, d.rbd)
            groups.setdefault(st, _Group(st)).refs.append(ref)
            refs.append(ref)
        return RbdCut(snapshot_id, tuple(disks), tuple(refs), list(groups.values()))

    async def prepare(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> RbdCut:
        """Connect and open every image (before the freeze). Raises StorageError
        (``ceph-unreachable``, ``rbd-image-not-found``, ...) or DependencyError; nothing stays
        open then."""
        handle = self._handle(snapshot_id, disks)
        try:
            for g in handle.groups:
                g.client = await RbdClient.connect(g.settings, workers=max(4, len(g.refs)))
                g.opened = await g.client.open_images(g.refs)
        except BaseException:
            await asyncio.shield(self._close(handle))
            raise
        return handle

    async def cut(self, handle: RbdCut) -> None:
        """``ff-<id>`` of every image at once, all or nothing (what was made is removed again
        on any failure), within :data:`DEFAULT_TIMEOUT` (the settings' timeout). Requests with
        no answer by then (a stopped monitor) or when the caller is cancelled are abandoned, not
        waited for: the cut counts as not made, and :meth:`abort` removes whatever they make.
        Raises StorageError (``ceph-timeout`` when abandoned)."""
        task = asyncio.ensure_future(self._create_all(handle))
        timeout = max(g.settings.timeout for g in handle.groups)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            handle.late = task
            raise
        if not done:
            handle.late = task
            raise StorageError(
                f"the RBD snapshots {handle.snap} of {', '.join(map(str, handle.refs))} got no "
                f"answer within {timeout:g} s (a monitor or OSD does not answer): abandoned, "
                "removed once Ceph answers",
                code="ceph-timeout",
                target=", ".join(map(str, handle.refs)),
                hint="is the cluster up? (`ceph -s`)",
            )
        task.result()

    async def _create_all(self, handle: RbdCut) -> None:
        try:
            await asyncio.gather(*(g.opened.create_snaps(handle.snap)
                                   for g in handle.groups if g.opened is not None))  # fmt: skip
        except StorageError:
            # Another group may have made its snapshots: take them back too.
            await asyncio.shield(self._remove(handle))
            raise

    async def confirm(self, handle: RbdCut) -> None:
        if await self.cut_state(handle) != "switched":
            raise CutError(f"the RBD snapshot {handle.snap} is missing on some image")

    async def cut_state(self, handle: RbdCut) -> CutState:
        """``switched`` when every image has ``ff-<id>``, ``not-switched`` when none has (or
        the cut was abandoned: late snapshots are never kept)."""
        if handle.late is not None:
            return "not-switched"
        found = []
        try:
            for g in handle.groups:
                client = g.client or await RbdClient.connect(g.settings)
                try:
                    for ref in g.refs:
                        names = {s.name for s in await client.list_snaps(ref)}
                        found.append(handle.snap in names)
                finally:
                    if g.client is None:
                        await client.close()
        except StorageError:
            return "unknown"
        if found and all(found):
            return "switched"
        return "not-switched" if not any(found) else "unknown"

    async def abort(self, handle: RbdCut) -> None:
        """Remove ``ff-<id>`` wherever it was made, close everything; each step bounded by the
        settings' timeout (x3). Requests of an abandoned cut still unanswered are left to a
        background clean-up (logged: while the process lives, it removes what they make).
        Never raises."""
        timeout = 3 * max(g.settings.timeout for g in handle.groups)
        late = handle.late
        if late is not None and not late.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({late}, timeout=timeout)
            if not late.done():
                log.error(
                    "rbd: snapshot requests %s on %s still unanswered: removing them once Ceph "
                    "answers (`rbd snap rm IMAGE@%s` if this process ends first)",
                    handle.snap, ", ".join(map(str, handle.refs)), handle.snap,
                )  # fmt: skip
                reaper = asyncio.get_running_loop().create_task(self._reap(handle, late))
                _REAPERS.add(reaper)
                reaper.add_done_callback(_REAPERS.discard)
                return
        await self._bounded(self._remove(handle), timeout, f"remove {handle.snap}")
        await self._bounded(self._close(handle), timeout, "close the images")

    async def _reap(self, handle: RbdCut, late: asyncio.Future[None]) -> None:
        with contextlib.suppress(BaseException):
            await late
        await self._remove(handle)
        await self._close(handle)

    @staticmethod
    async def _bounded(aw: Awaitable[None], timeout: float, what: str) -> None:
        try:
            await within(aw, timeout)
        except TimeoutError:
            log.error("rbd: could not %s within %g s", what, timeout)

    async def _remove(self, handle: RbdCut) -> None:
        for g in handle.groups:
            try:
                client = g.client or await RbdClient.connect(g.settings)
                try:
                    await client.remove_snaps(g.refs, handle.snap)
                finally:
                    if g.client is None:
                        await client.close()
            except StorageError as exc:
                log.error(
                    "rbd: could not remove %s from %s: %s",
                    handle.snap,
                    ", ".join(map(str, g.refs)),
                    exc.message,
                )

    async def _close(self, handle: RbdCut) -> None:
        for g in handle.groups:
            if g.opened is not None:
                await g.opened.close()
                g.opened = None
            if g.client is not None:
                await g.client.close()
                g.client = None

    async def close(self) -> None:
        return None

    def record_disks(self, handle: RbdCut) -> tuple[SnapshotDisk, ...]:
        return tuple(
            SnapshotDisk(
                device=d.device,
                node=d.node,
                image=f"rbd:{ref}@{handle.snap}",
                format="rbd",
                overlay=None,
                backend=RECORD_NAMES["rbd"],
                virtual_size=d.virtual_size,
            )
            for d, ref in zip(handle.disks, handle.refs, strict=True)
        )

    def handle_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> RbdCut:
        infos = []
        for d in disks:
            ref, _ = parse_record_image(d.image)
            src = RbdSource(ref.pool, ref.image, ref.namespace)
            infos.append(DiskInfo(d.device, d.node, src.name, "rbd", d.virtual_size, rbd=src))
        return self._handle(snapshot_id, infos)

    def verify_source(self, disk: SnapshotDisk) -> str:
        """``json:{"driver": "rbd", ..., "snapshot": "ff-ID"}``: the snapshot, read-only."""
        ref, snap = parse_record_image(disk.image)
        src = RbdSource(ref.pool, ref.image, ref.namespace)
        return "json:" + qemu_blockdev_json(ref, settings_for(self.cfg, src), snapshot=snap)

    async def check_readable(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> None:
        """Every RBD snapshot of ``disks`` exists, asked within 3 × the settings' timeout per
        cluster. Raises StorageError: ``ceph-unreachable`` / ``ceph-timeout`` (a monitor or
        OSD does not answer), ``rbd-snapshot-not-found``, ``rbd-image-not-found``."""
        handle = self.handle_from_record(snapshot_id, disks)
        for g in handle.groups:
            bound = 3 * g.settings.timeout
            try:
                async with asyncio.timeout(bound):
                    async with await RbdClient.connect(g.settings) as client:
                        for ref in g.refs:
                            names = {s.name for s in await client.list_snaps(ref)}
                            if handle.snap not in names:
                                raise StorageError(
                                    f"{ref}@{handle.snap}: the RBD snapshot of {snapshot_id} "
                                    "is gone (removed by hand?): nothing to verify",
                                    code="rbd-snapshot-not-found",
                                    target=f"{ref}@{handle.snap}",
                                )
            except TimeoutError as exc:
                raise StorageError(
                    f"Ceph did not answer within {bound:g} s while looking for the RBD "
                    f"snapshots of {snapshot_id}: is the cluster up?",
                    code="ceph-timeout",
                ) from exc

    async def delete(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> None:
        """Remove the RBD snapshots of ``disks``. Raises StorageError."""
        handle = self.handle_from_record(snapshot_id, disks)
        for g in handle.groups:
            async with await RbdClient.connect(g.settings) as client:
                await client.remove_snaps(g.refs, handle.snap)
