"""The image files a VM's snapshots hold at their cut, and the image each disk must boot from.

Owns what freezeframe knows and does about an image once a cut made it a backing file:

- which recorded snapshots hold an image at their cut (:func:`holding`, :func:`held_images`):
  a VM whose disk writes to such an image (restarted by hand on its original image) changes
  those snapshots; ``snapshot create`` refuses it and ``doctor`` fails it, code
  :data:`IMAGE_HELD`;
- protecting an image at the cut (:func:`protect_image`): its write bits are taken away on disk
  (a QEMU not running as root then cannot open it read-write; root ignores mode bits, so the
  refusal above is the real guard), its mode before is recorded so a merge can give it back;
- the fingerprint of an image at the cut (:func:`fingerprint`, :func:`fingerprint_changes`):
  size, mtime and inode right after the cut, so ``snapshot verify`` tells a changed snapshot
  (``changed-since-cut``) from an unchanged one;
- for any VM, the image each disk must boot from (:func:`boot_images`): the newest overlay
  recorded for it, and whether QEMU runs on it now.

Only local files (absolute paths) are looked at; anything else (``rbd:...``) is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from freezeframe._aio import shielded
from freezeframe.catalog import Catalog, make_owner
from freezeframe.errors import Action, BusyError, FreezeframeError, Remedy
from freezeframe.hypervisor import load_driver
from freezeframe.models import (
    DiskInfo,
    ImageFingerprint,
    SnapshotDisk,
    SnapshotRecord,
    SnapshotStatus,
    VerifyVerdict,
    VmConfig,
)

__all__ = [
    "IMAGE_HELD",
    "BootImage",
    "HeldImage",
    "boot_images",
    "cut_outcome_unknown",
    "fingerprint",
    "fingerprint_changes",
    "held_images",
    "held_message",
    "holding",
    "path_key",
    "protect_image",
]

log = logging.getLogger(__name__)

#: Code of a VM whose disk writes to an image a recorded snapshot holds at its cut.
IMAGE_HELD = "image-held-by-snapshot"

#: Seconds ``boot_images`` gives the hypervisor to answer which images the disks run on.
_LIVE_TIMEOUT = 10.0


def cut_outcome_unknown(rec: SnapshotRecord) -> bool:
    """A failed record whose cut's outcome could not be told (QEMU hung or gone at the time)
    and has not been settled since: its overlays were kept, in case the disks use them."""
    names = [e.name for e in rec.timeline]
    unknown = [
        i for i, e in enumerate(rec.timeline) if e.name == "cut_state" and e.detail == "unknown"
    ]
    return (
        rec.status is SnapshotStatus.FAILED
        and bool(rec.disks)
        and bool(unknown)
        and "cut_settled" not in names[unknown[-1] :]
    )


def holding(records: Sequence[SnapshotRecord]) -> list[SnapshotRecord]:
    """The records (oldest first, as given) that hold their images at the cut: done ones, and
    failed attempts whose cut happened (their images at the cut are kept and verifiable); not
    an attempt whose cut's outcome is unknown (the disks may legitimately still write to its
    "image at the cut"), nor a snapshot already verified ``changed-since-cut`` (it is lost:
    nothing is left to protect)."""
    return [
        r
        for r in records
        if (
            r.status is SnapshotStatus.DONE
            or (r.status is SnapshotStatus.FAILED and r.disks and not cut_outcome_unknown(r))
        )
        and not (r.verification is not None and r.verification.verdict is VerifyVerdict.CHANGED)
    ]


def path_key(path: str) -> str:
    """``path`` resolved (symlinks, ``..``) when it is a local path; else as it is (rbd:...)."""
    return os.path.realpath(path) if path.startswith("/") else path


@dataclass(frozen=True, slots=True)
class HeldImage:
    """A disk of a running VM that writes to ``image``, the image at the cut of the recorded
    snapshots ``snapshot_ids`` (oldest first); ``boot_from`` is the newest overlay recorded for
    that disk (the image it must run on), None when none is known."""

    device: str
    image: str
    snapshot_ids: tuple[str, ...]
    boot_from: str | None


def newest_overlay(device: str, records: Sequence[SnapshotRecord]) -> tuple[str, str] | None:
    """``(overlay, snapshot id)`` of the newest of ``records`` (oldest first) that switched
    disk ``device`` to an overlay; None when none did."""
    for rec in reversed(records):
        for sd in rec.disks:
            if sd.device == device and sd.overlay:
                return sd.overlay, rec.id
    return None


def held_images(disks: Sequence[DiskInfo], records: Sequence[SnapshotRecord]) -> list[HeldImage]:
    """The disks of ``disks`` whose active image is the image at the cut of one of
    ``records`` that :func:`holding` keeps (images lower in their backing chains are
    expected). Raises nothing."""
    held = holding(records)
    out: list[HeldImage] = []
    for disk in disks:
        top = path_key(disk.file)
        hits = [(r, sd) for r in held for sd in r.disks if path_key(sd.image) == top]
        if not hits:
            continue
        device = hits[-1][1].device  # the disk's name when it was cut
        newest = newest_overlay(device, held)
        out.append(
            HeldImage(
                device=disk.device,
                image=disk.file,
                snapshot_ids=tuple(dict.fromkeys(r.id for r, _ in hits)),
                boot_from=newest[0] if newest else None,
            )
        )
    return out


def held_message(vm: str, held: Sequence[HeldImage]) -> tuple[str, str, Remedy]:
    """``(message, hint, remedy)`` naming, per disk, the image it writes to, the snapshots at
    risk and the image to boot from; the remedy lists the VM's images."""
    parts = []
    for h in held:
        n = len(h.snapshot_ids)
        parts.append(
            f"disk {h.device} writes to {h.image}, the image at the cut of snapshot"
            f"{'s' if n > 1 else ''} {', '.join(h.snapshot_ids)} (read-only from then on): "
            f"{'they are' if n > 1 else 'it is'} being changed"
            + (f"; boot it from {h.boot_from}" if h.boot_from else "")
        )
    ids = list(dict.fromkeys(i for h in held for i in h.snapshot_ids))
    hint = (
        f"stop VM {vm} and start it again on the newest overlay of each disk; or, to give up "
        f"{'those snapshots' if len(ids) > 1 else 'that snapshot'}, verify "
        f"{', '.join(ids)} (a changed one is recorded changed-since-cut and no longer "
        "protected) and retry; the VM's images"
    )
    return "; ".join(parts), hint, Remedy(Action.LIST_IMAGES, vm)


def protect_image(path: str) -> tuple[int | None, str | None]:
    """Take the write bits of the local image ``path`` away (it is a backing file now).

    Returns ``(mode before, problem)``: the mode before (permission bits) when freezeframe
    changed it, None when it did not (not a local regular file, or already without write
    bits); ``problem`` says why it could not (chmod refused), else None. Never raises.
    """
    if not path.startswith("/"):
        return None, None
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        mode = stat.S_IMODE(st.st_mode)
        new = mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        if new == mode:
            return None, None
        os.chmod(path, new)
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    return mode, None


def fingerprint(path: str) -> ImageFingerprint | None:
    """Size, mtime and inode of the local image ``path``; None when it is no local file or
    cannot be stat'ed. Never raises."""
    if not path.startswith("/"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ImageFingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def fingerprint_changes(disk: SnapshotDisk) -> list[str] | None:
    """What changed in ``disk``'s image at the cut since its fingerprint was taken (empty when
    nothing did); None when it has no fingerprint or the file cannot be stat'ed (gone: the
    check of the image says so itself). Never raises."""
    if disk.fingerprint is None:
        return None
    now = fingerprint(disk.image)
    if now is None:
        return None
    return disk.fingerprint.differences(now)


@dataclass(frozen=True, slots=True)
class BootImage:
    """Where one disk of a VM must boot from.

    ``boot_from``: the image the catalog's chain model says the disk writes to (moved there by
    a snapshot's cut, a delete's merge or a restore), else the newest overlay recorded for the
    disk (``snapshot_id`` recorded it), else the image QEMU runs on when no snapshot switched
    the disk. ``running_on``: the image QEMU
    runs the disk on now (None when that could not be asked: ``checked`` says why not);
    ``on_it``: whether that is ``boot_from`` (None when not asked). ``held_by``: recorded
    snapshots whose image at the cut is ``running_on`` (a restart on an older image: they
    are being changed)."""

    device: str
    boot_from: str | None
    snapshot_id: str | None
    running_on: str | None
    on_it: bool | None
    checked: str
    held_by: tuple[str, ...] = ()


async def boot_images(catalog: Catalog, vm: str) -> list[BootImage]:
    """For each disk of ``vm`` (recorded by a snapshot, or listed by the running VM): the image
    it must boot from, and whether QEMU runs on it now.

    The running VM is asked only while holding its lock (QMP serves one client: a snapshot
    starting meanwhile would fail); when a snapshot holds it, or the VM is not running or not
    reachable, the answer comes from the catalog alone (``checked`` says why). Raises
    NotFoundError (neither registered nor any record), CatalogError.
    """
    records = await catalog.list_snapshots(vm)
    live: dict[str, str] | None = None
    checked = "asked the running VM"
    try:
        cfg = await catalog.get_vm(vm)
    except FreezeframeError:
        if not records:
            raise
        cfg = None
        checked = "not asked: the VM is not registered"
    if cfg is not None:
        live, why = await _live_files(catalog, cfg)
        if why is not None:
            checked = f"not asked: {why}"
    held = holding(records)
    # The chain model knows where each disk writes since merges and restores moved it.
    active = {
        i.device: i.location for i in await catalog.chain_images(vm) if i.active and i.vm == vm
    }
    devices = list(
        dict.fromkeys([*(live or {}), *(sd.device for r in held for sd in r.disks), *active])
    )
    out: list[BootImage] = []
    for device in devices:
        newest = newest_overlay(device, held)
        running = live.get(device) if live is not None else None
        boot_from = active.get(device) or (newest[0] if newest else running)
        on_it = (
            None
            if running is None or boot_from is None
            else path_key(running) == path_key(boot_from)
        )
        held_by = (
            tuple(
                r.id
                for r in held
                for sd in r.disks
                if sd.device == device and path_key(sd.image) == path_key(running)
            )
            if running is not None
            else ()
        )
        out.append(
            BootImage(
                device=device,
                boot_from=boot_from,
                # the snapshot whose cut made boot_from, when it did (not a restore's overlay)
                snapshot_id=newest[1] if newest and newest[0] == boot_from else None,
                running_on=running,
                on_it=on_it,
                checked=checked if live is None or device in live else "not listed by the VM",
                held_by=held_by,
            )
        )
    return out


async def _live_files(catalog: Catalog, cfg: VmConfig) -> tuple[dict[str, str] | None, str | None]:
    """Device -> the image QEMU runs it on now, asked under the VM's lock; or why not."""
    owner = make_owner()
    try:
        await catalog.acquire_vm_lock(cfg.name, owner, purpose="doctor")
    except BusyError as exc:
        return None, exc.message
    try:
        driver = load_driver(cfg.driver).from_config(cfg)
        async with asyncio.timeout(_LIVE_TIMEOUT):
            await driver.connect()
            try:
                disks = await driver.disks()
            finally:
                await driver.close()
    except FreezeframeError as exc:
        return None, exc.message
    except TimeoutError:
        return None, f"the VM did not answer within {_LIVE_TIMEOUT:g} s"
    finally:
        with contextlib.suppress(FreezeframeError):
            await shielded(catalog.release_vm_lock(cfg.name, owner))
    return {d.device: d.file for d in disks}, None
