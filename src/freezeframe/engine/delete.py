"""Deleting a snapshot without losing a byte of any other: merges, RBD snapshot removal, record.

Owns which snapshots can be deleted now, the order of the steps and their write-ahead
records. The caller (the service) holds the VM's lock.

A qcow2 snapshot ``S`` recorded, per disk, the image ``I`` holding the disk at its cut; the
layer directly above it, ``J``, holds what changed after the cut (the next snapshot's image,
or the layer the disk writes to). Deleting ``S`` commits ``J`` into ``I``: ``I`` then reads
what ``J`` read (the next snapshot, or the disk's current data, now lives in ``I``) and ``J``
goes. Every image that stays reads exactly what it read before, so every other snapshot keeps
its data; the chain is one layer shorter.

- VM running and ``J`` in the disk's running chain: a live merge by the hypervisor's block
  job (:meth:`HypervisorDriver.merge_layer`: ``block-commit``, an active commit when ``J`` is
  the active layer — the disk then writes to ``I``); QEMU keeps a valid chain at every moment.
- otherwise (VM stopped, or ``J`` on a branch the VM does not run on, e.g. after a restore):
  ``qemu-img commit`` and an unsafe rebase of the layer above ``J`` (:mod:`.offline_chain`).
- a snapshot image nothing is layered on (a leaf left by a restore) is simply removed.
- RBD disks: the backend removes the RBD snapshot (``rbd snap rm``).

Write-ahead: the record turns ``deleting`` first (nobody reads it as a snapshot again; a
reader's hold refuses the delete before that), each merge opens a ``merges`` row before the
job starts, becomes ``merged`` in the same transaction that moves the data's location in the
chain model, and ``done`` once ``J``'s file is removed. ``freezeframe recover`` finishes what
a killed process left (:func:`finish_merges`): a merge is re-run (the hypervisor's job is
attached to, or found finished; qemu-img's commit is idempotent), then the delete resumes.

Refused before anything changes, with a code: ``snapshot-running``, ``snapshot-in-use``
(verify/export holds it), ``image-written-by-vm`` (a disk writes to the snapshot's image),
``layer-shared`` (two chains grow from the snapshot's image: it was restored from).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from freezeframe.catalog import Catalog
from freezeframe.engine.images import fingerprint, protect_image
from freezeframe.engine.snapshot import DriverFactory, open_driver
from freezeframe.errors import (
    Action,
    FreezeframeError,
    HypervisorUnavailableError,
    NotFoundError,
    Remedy,
    ToolError,
    UsageError,
)
from freezeframe.hypervisor.base import HypervisorDriver, LayerMerge, MergeProgress
from freezeframe.models import (
    ChainImage,
    DiskInfo,
    ImageFingerprint,
    MergeIntent,
    SnapshotRecord,
    SnapshotStatus,
    VmConfig,
)
from freezeframe.storage.backends import backend_of_record, load_backend
from freezeframe.storage.offline_chain import ChainProgress, backing_chain, commit_into_backing

__all__ = [
    "DeleteProgress",
    "DeleteResult",
    "LayerMerged",
    "check_deletable",
    "delete_snapshot",
    "finish_merges",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeleteProgress:
    """A merge of ``device`` under way: ``done`` of ``total`` bytes (``how``: live/offline)."""

    device: str
    how: str
    done: int
    total: int


ProgressFn = Callable[[DeleteProgress], None]


@dataclass(frozen=True, slots=True)
class LayerMerged:
    """What deleting did to one disk: ``top``'s data went into ``base`` (``how``: ``live``,
    ``offline``), or ``removed`` (a leaf image deleted, an RBD snapshot removed).
    ``writes_to``: the image the disk writes to after it, when the merge moved it."""

    device: str
    how: str
    top: str | None
    base: str
    bytes: int = 0
    duration_ms: float = 0.0
    writes_to: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """A deleted snapshot: its record as it was, and what happened to each disk."""

    record: SnapshotRecord
    disks: tuple[LayerMerged, ...]
    duration_ms: float


@dataclass(frozen=True, slots=True)
class _Plan:
    """One qcow2 disk of the snapshot: its image at the cut, the layer above (None: a leaf),
    the layer above that (re-pointed by an offline merge)."""

    device: str
    image: ChainImage
    above: ChainImage | None
    above_above: ChainImage | None


def _plans(rec: SnapshotRecord, images: list[ChainImage]) -> list[_Plan]:
    """The qcow2 disks of ``rec`` with their chain neighbours. Raises UsageError
    (``layer-shared``, ``image-written-by-vm``)."""
    by_loc = {(i.device, i.location): i for i in images}
    plans = []
    for d in rec.disks:
        if backend_of_record(d) != "qcow2":
            continue
        img = by_loc.get((d.device, d.image))
        if img is None or img.snapshot_id != rec.id:
            continue  # not linked (an older failed record): nothing of it is a layer we manage
        if img.active:
            raise _written_by_vm(rec, d.device, img.location)
        children = [i for i in images if i.backing_id == img.id]
        if len(children) > 1:
            raise UsageError(
                f"snapshot {rec.id}: image {img.location} of disk {d.device} is the backing "
                f"file of {len(children)} chains ({', '.join(c.location for c in children)}): "
                "a restore started a second chain from it",
                hint="delete the snapshots of one of the chains first, or keep this one",
                code="layer-shared",
            )
        above = children[0] if children else None
        grand = [i for i in images if above is not None and i.backing_id == above.id]
        plans.append(_Plan(d.device, img, above, grand[0] if grand else None))
    return plans


def _written_by_vm(rec: SnapshotRecord, device: str, image: str) -> UsageError:
    return UsageError(
        f"snapshot {rec.id}: disk {device} of VM {rec.vm} writes to {image}, the image the "
        "snapshot holds at its cut",
        hint="the snapshot is no longer what was cut; start the VM on its newest image first",
        code="image-written-by-vm",
        remedy=Remedy(Action.LIST_IMAGES, rec.vm),
    )


def check_deletable(rec: SnapshotRecord, images: list[ChainImage] | None = None) -> None:
    """Raise UsageError unless ``rec`` can be deleted now (no I/O): ``snapshot-running`` (its
    attempt is in progress or died: recover settles it), ``layer-shared``,
    ``image-written-by-vm`` (see the module's docstring)."""
    if rec.status == SnapshotStatus.RUNNING:
        raise UsageError(
            f"snapshot {rec.id} is still running (or its process died)",
            hint="wait for it to finish, or recover the VM to settle it",
            code="snapshot-running",
            remedy=Remedy(Action.RECOVER, rec.vm),
        )
    if images is not None:
        _plans(rec, images)


async def _connect(factory: DriverFactory, cfg: VmConfig | None) -> HypervisorDriver | None:
    """A connected driver of the VM, or None when it is not running (not reachable)."""
    if cfg is None:
        return None
    driver = factory(cfg)
    try:
        await driver.connect()
    except HypervisorUnavailableError as exc:
        log.info("VM %s is not running (%s): merging offline", cfg.name, exc.message)
        return None
    return driver


def _real(path: str) -> str:
    """The key a file is compared by: its real path (a name QEMU does not resolve as a local
    file, e.g. ``rbd:`` or ``json:``, as it is)."""
    return os.path.realpath(path) if path.startswith("/") else path


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _running_chain(disks: list[DiskInfo], device: str) -> set[str]:
    for d in disks:
        if d.device == device:
            return {_real(f) for f in (d.file, *d.backing)}
    return set()


async def _give_write_back(image: ChainImage) -> None:
    """``image``'s file gets the mode it had before freezeframe took its write bits away."""
    if image.mode is None or not image.location.startswith("/"):
        return
    await asyncio.to_thread(os.chmod, image.location, image.mode)


def _mode_now(path: str) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


async def _settle_base(
    base: str, holds_snapshot: bool
) -> tuple[int | None, ImageFingerprint | None]:
    """After a merge: ``base`` holds a snapshot's data now -> its write bits go again and it
    is fingerprinted; else (the disk writes to it) it stays as it is. Returns (mode to give
    back later, fingerprint)."""
    if not holds_snapshot:
        return _mode_now(base), None
    mode, problem = await asyncio.to_thread(protect_image, base)
    if problem:
        log.warning("cannot take the write bits of %s away: %s", base, problem)
    return mode if mode is not None else _mode_now(base), await asyncio.to_thread(fingerprint, base)


async def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(os.unlink, path)


async def _merge_one(
    catalog: Catalog,
    merge: MergeIntent,
    *,
    driver: HypervisorDriver | None,
    above: ChainImage | None,
    holds_snapshot: bool,
    progress: ProgressFn | None,
    bandwidth: int = 0,
) -> LayerMerged:
    """Run (or re-run) ``merge`` — live through ``driver`` when given, else offline — and
    record it: data moved, the chain model updated, ``top`` removed. ``above`` is the layer
    whose backing file is ``top``: its header is rewritten to point at ``base`` (QEMU does it
    live, an unsafe rebase offline), so when it holds a snapshot it gets its write bits for
    that and is protected and fingerprinted again afterwards. Raises FreezeframeError (the
    merge stays open: deleting again or recover re-runs it)."""
    start = time.monotonic()
    moved = 0
    active = not holds_snapshot and above is None
    above_held = above is not None and above.snapshot_id is not None
    if above is not None and above_held:
        await _give_write_back(above)
    if driver is not None:

        def live_cb(p: MergeProgress) -> None:
            if progress is not None:
                progress(DeleteProgress(p.device, "live", p.done, p.total))

        layer = LayerMerge(merge.device, merge.top, merge.base, speed=bandwidth)
        out = await driver.merge_layer(layer, live_cb)
        moved, active = out.bytes, out.active
    else:

        def offline_cb(p: ChainProgress) -> None:
            if progress is not None:
                progress(DeleteProgress(merge.device, "offline", p.done, p.total))

        above_file = above.location if above is not None else None
        if await _offline_done(merge, above_file):
            log.info("merge of %s into %s was already done", merge.top, merge.base)
        else:
            moved = await asyncio.to_thread(_allocated, merge.top)
            await commit_into_backing(
                merge.top, above=above_file, progress=offline_cb, rate=bandwidth
            )
    mode, fp = await _settle_base(merge.base, holds_snapshot)
    await catalog.merge_done(merge.id, fingerprint=fp, mode=mode)
    if above is not None and above_held:
        above_mode, above_fp = await _settle_base(above.location, True)
        await catalog.refingerprint(merge.vm, above.location, above_fp, above_mode)
    await _remove_file(merge.top)
    await catalog.close_merge(merge.id)
    return LayerMerged(
        device=merge.device,
        how="live" if driver is not None else "offline",
        top=merge.top,
        base=merge.base,
        bytes=moved,
        duration_ms=(time.monotonic() - start) * 1000,
        writes_to=merge.base if active else None,
    )


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


async def _offline_done(merge: MergeIntent, above_above: str | None) -> bool:
    """An offline merge a killed process finished: the layer above ``top`` already backs onto
    ``base``. Raises ToolError (``merge-top-missing``: ``top``'s file is gone although the
    merge was never recorded done — nothing is guessed)."""
    if not _exists(merge.top):
        raise ToolError(
            f"the merge of {merge.top} into {merge.base} is not recorded done, yet "
            f"{merge.top} is gone",
            hint="the layer was removed by hand; its data cannot be merged any more",
            code="merge-top-missing",
        )
    if above_above is None:
        return False
    chain = await backing_chain(above_above)
    backing = chain[0].backing
    return backing is not None and _real(backing) == _real(merge.base)


async def delete_snapshot(
    catalog: Catalog,
    rec: SnapshotRecord,
    *,
    driver_factory: DriverFactory | None = None,
    progress: ProgressFn | None = None,
    bandwidth: int = 0,
) -> DeleteResult:
    """Delete snapshot ``rec``: merge its qcow2 layers away (live or offline), remove its RBD
    snapshots, then its record. A record already ``deleting`` (interrupted) is finished.
    ``bandwidth``: the most bytes per second each merge copies (0: no limit).

    Raises UsageError (see :func:`check_deletable`), BusyError (``snapshot-in-use``),
    HypervisorError (a live merge failed: ``merge-failed``, ``not-in-chain``), ToolError (an
    offline merge failed), StorageError (an RBD snapshot could not be removed), DependencyError,
    CatalogError. On an error the record stays ``deleting`` with what is left; deleting again
    (or ``freezeframe recover``) finishes it.
    """
    start = time.monotonic()
    factory = driver_factory or open_driver
    check_deletable(rec)
    try:
        cfg: VmConfig | None = await catalog.get_vm(rec.vm)
    except NotFoundError:
        cfg = None  # forgotten VM: offline merges; the global Ceph settings apply
    images = await catalog.chain_images(rec.vm)
    plans = _plans(rec, images)
    driver = await _connect(factory, cfg) if plans else None
    results: list[LayerMerged] = []
    try:
        live_chains: dict[str, set[str]] = {}
        if driver is not None:
            disks = await driver.disks()
            live_chains = {p.device: _running_chain(disks, p.device) for p in plans}
            for p in plans:
                if _real(p.image.location) in _top_of(disks, p.device):
                    raise _written_by_vm(rec, p.device, p.image.location)
        rec = await catalog.begin_delete(rec.id)
        open_merges: dict[str, MergeIntent] = {}
        for m in await catalog.open_merges(rec.vm):
            if m.snapshot_id != rec.id:
                continue
            if m.state == "merged":  # killed after the data moved: only the file is left
                await _remove_file(m.top)
                await catalog.close_merge(m.id)
            else:
                open_merges[m.device] = m
        for p in plans:
            results.append(
                await _delete_layer(
                    catalog, rec, p, driver, live_chains, open_merges, progress, bandwidth
                )
            )
        results.extend(await _delete_rbd(rec, cfg))
        await catalog.finish_delete(rec.id)
    finally:
        if driver is not None:
            with contextlib.suppress(FreezeframeError):
                await driver.close()
    log.info("deleted snapshot %s of %s", rec.id, rec.vm)
    return DeleteResult(rec, tuple(results), (time.monotonic() - start) * 1000)


def _top_of(disks: list[DiskInfo], device: str) -> set[str]:
    return {_real(d.file) for d in disks if d.device == device}


async def _delete_layer(
    catalog: Catalog,
    rec: SnapshotRecord,
    p: _Plan,
    driver: HypervisorDriver | None,
    live_chains: dict[str, set[str]],
    open_merges: dict[str, MergeIntent],
    progress: ProgressFn | None,
    bandwidth: int,
) -> LayerMerged:
    if p.above is None:
        # A leaf: nothing reads through it any more (a restore discarded what was above).
        if _real(p.image.location) in live_chains.get(p.device, set()):
            raise _written_by_vm(rec, p.device, p.image.location)
        await _remove_file(p.image.location)
        await catalog.drop_image(p.image.id)
        return LayerMerged(p.device, "removed", None, p.image.location)
    chain = live_chains.get(p.device, set())
    live = driver is not None and _real(p.above.location) in chain
    merge = open_merges.get(p.device)
    if merge is None or merge.top != p.above.location or merge.base != p.image.location:
        merge = await catalog.open_merge(
            vm=rec.vm,
            snapshot_id=rec.id,
            device=p.device,
            top=p.above.location,
            base=p.image.location,
            live=live,
        )
    await _give_write_back(p.image)
    return await _merge_one(
        catalog,
        merge,
        driver=driver if live else None,
        above=p.above_above,
        holds_snapshot=p.above.snapshot_id is not None,
        progress=progress,
        bandwidth=bandwidth,
    )


async def _delete_rbd(rec: SnapshotRecord, cfg: VmConfig | None) -> list[LayerMerged]:
    rbd = [d for d in rec.disks if backend_of_record(d) == "rbd"]
    if not rbd:
        return []
    backend = load_backend("rbd").for_vm(cfg or VmConfig(name=rec.vm), None)
    try:
        await backend.delete(rec.id, rbd)
    finally:
        await backend.close()
    return [LayerMerged(d.device, "removed", None, d.image) for d in rbd]


async def finish_merges(
    catalog: Catalog,
    vm: str,
    *,
    driver_factory: DriverFactory | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """``recover``'s part: finish every delete of ``vm`` a killed process left (records
    ``deleting``, merges ``open``/``merged``). Returns the ids of the snapshots whose delete
    was finished. Raises FreezeframeError (what could not be finished stays recorded)."""
    finished: list[str] = []
    pending = await catalog.open_merges(vm)
    deleting = await catalog.list_snapshots(vm, status=SnapshotStatus.DELETING)
    ids = list(dict.fromkeys([*(m.snapshot_id for m in pending), *(r.id for r in deleting)]))
    for snapshot_id in ids:
        try:
            rec = await catalog.get_snapshot(snapshot_id)
        except NotFoundError:
            for m in pending:  # the record is gone: its merges were the last step
                if m.snapshot_id == snapshot_id:
                    await catalog.close_merge(m.id)
            continue
        await delete_snapshot(catalog, rec, driver_factory=driver_factory, progress=progress)
        finished.append(snapshot_id)
    return finished
