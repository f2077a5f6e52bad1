"""``snapshot restore``: the service's part — which VM is stopped and started, and how.

Owns the rules around a restore (the engine, :mod:`freezeframe.engine.restore`, makes the
overlays and updates the chain model):

- in place (the snapshot's own VM) discards what the disks wrote since the newest snapshot,
  so it needs ``yes`` (code ``confirmation-required`` otherwise);
- a lab VM is stopped (its guest flushed), restarted on the new overlays, and ready when this
  returns; a persistent libvirt domain is shut down (the agent's or ACPI's shutdown, destroyed
  after ``stop_timeout``), its disk sources redefined, and started; a VM freezeframe cannot
  start (QEMU registered by its sockets) must be stopped by its operator first (code
  ``vm-running``): the result names the image each disk must boot from;
- ``into`` a new name (``--as NEW``): a new lab VM boots on the new overlays while the
  original keeps running (lab VMs only: ``restore-as-unsupported`` otherwise);
- the VM's lock is held throughout (purpose ``restore``), and the snapshot is held so that a
  delete cannot merge its image away meanwhile.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from freezeframe import lab as _lab
from freezeframe import paths
from freezeframe.catalog import make_owner
from freezeframe.engine.restore import (
    RestoredDisk,
    check_restorable,
    discard_old_layers,
    make_restore_overlays,
    record_restore,
    remove_overlays,
)
from freezeframe.engine.snapshot import open_driver
from freezeframe.errors import (
    AlreadyExistsError,
    NotFoundError,
    UsageError,
)

if TYPE_CHECKING:
    from freezeframe.service._service import Service

__all__ = ["RestoreResult", "restore_snapshot"]

#: Seconds a lab VM gets to boot on the restored images (TCG boots are slow).
LAB_TIMEOUT = 180.0


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """A restore of ``snapshot_id`` (of ``vm``) into ``into``: each disk's new image
    (``disks``), and ``state``: ``restarted`` (the lab VM runs on them), ``started`` (a new lab
    VM ``into`` runs on them), ``boot-from`` (the VM is stopped: start it on ``disks``'
    ``boot_from``)."""

    snapshot_id: str
    vm: str
    into: str
    state: str
    disks: tuple[RestoredDisk, ...]


async def restore_snapshot(
    svc: Service,
    snapshot_id: str,
    *,
    into: str | None = None,
    yes: bool = False,
    stop_timeout: float = 60.0,
) -> RestoreResult:
    """See the module's docstring. Raises NotFoundError, UsageError (codes
    ``confirmation-required``, ``vm-running``, ``restore-as-unsupported``, those of
    :func:`~freezeframe.engine.restore.check_restorable`), AlreadyExistsError (``vm-exists``:
    ``into`` is taken), BusyError (``vm-busy``, ``snapshot-in-use``), LabError, ToolError,
    CatalogError."""
    cat = await svc.catalog()
    rec = await cat.get_snapshot(snapshot_id)
    rows = check_restorable(rec, await cat.chain_images(rec.vm))
    cfg = await cat.get_vm(rec.vm)
    if into is not None and into != rec.vm:
        return await _restore_as(svc, snapshot_id, into)
    if not yes:
        raise UsageError(
            f"restoring snapshot {rec.id} discards what VM {rec.vm}'s disks wrote since its "
            "newest snapshot",
            hint='confirm with --yes (API: "yes": true), or restore into a new VM with --as',
            code="confirmation-required",
        )
    owner = make_owner()
    await cat.acquire_vm_lock(rec.vm, owner, purpose="restore")
    try:
        async with cat.hold_snapshot(rec.id, "restore"):
            # a persistent libvirt domain freezeframe stops and starts itself (restart_on)
            restartable = not cfg.lab and cfg.driver == "libvirt"
            if cfg.lab:
                await svc.refuse_if_maybe_frozen(rec.vm, force=False, warnings=[])
                with paths.using_state_dir(svc.config.state_dir):
                    await _lab.lab_down(rec.vm)
            elif not restartable and not await open_driver(cfg).is_gone():
                raise UsageError(
                    f"VM {rec.vm} is running: freezeframe cannot stop and start it",
                    hint="shut it down, restore, then start it on the images this names",
                    code="vm-running",
                )
            elif restartable:
                await svc.refuse_if_maybe_frozen(rec.vm, force=False, warnings=[])
            before = await cat.chain_images(rec.vm)
            made = await make_restore_overlays(cat, rec, rows)
            state = "boot-from"
            if restartable:
                try:
                    await open_driver(cfg).restart_on(
                        {m.device: m.boot_from for m in made}, stop_timeout=stop_timeout
                    )
                except BaseException:
                    await remove_overlays(made)  # the domain still names its old disks
                    raise
                state = "restarted"
            await record_restore(cat, made, rows, into=rec.vm)
            done = await discard_old_layers(cat, rec.vm, made, before)
            if cfg.lab:
                with paths.using_state_dir(svc.config.state_dir):
                    await _lab.set_boot_images(rec.vm, {d.device: d.boot_from for d in done})
                    await _lab.lab_up(rec.vm, timeout=LAB_TIMEOUT)
                state = "restarted"
    finally:
        await cat.release_vm_lock(rec.vm, owner)
    return RestoreResult(rec.id, rec.vm, rec.vm, state, tuple(done))


async def _restore_as(svc: Service, snapshot_id: str, into: str) -> RestoreResult:
    """A new lab VM ``into`` on new overlays of the snapshot's images; the original VM runs
    on untouched."""
    cat = await svc.catalog()
    rec = await cat.get_snapshot(snapshot_id)
    rows = check_restorable(rec, await cat.chain_images(rec.vm))
    if not (await cat.get_vm(rec.vm)).lab:
        raise UsageError(
            f"VM {rec.vm} is not a lab VM: a restore into a new VM is built for lab VMs only",
            hint="restore in place (the VM stopped), or export the snapshot",
            code="restore-as-unsupported",
        )
    with contextlib.suppress(NotFoundError):
        await cat.get_vm(into)
        raise AlreadyExistsError(f"a VM named {into!r} exists", code="vm-exists")
    with paths.using_state_dir(svc.config.state_dir):
        source = _lab.lab_status(rec.vm)
    fstypes = {d.device: d.fstype for d in source.disks}
    async with cat.hold_snapshot(rec.id, "restore"):
        made = await make_restore_overlays(cat, rec, rows)
        try:
            order = [d.device for d in source.disks if d.device in rows]
            by_dev = {m.device: m for m in made}
            with paths.using_state_dir(svc.config.state_dir):
                vm = await _lab.lab_up(
                    into,
                    disks=[fstypes[dev] for dev in order],
                    images=[(by_dev[dev].boot_from, "qcow2") for dev in order],
                    driver=source.driver,
                    agent=source.qga_path is not None,
                    timeout=LAB_TIMEOUT,
                )
        except BaseException:
            await remove_overlays(made)
            raise
        await record_restore(cat, made, rows, into=into)
    await cat.add_vm(vm.vm_config(), replace=True)
    return RestoreResult(rec.id, rec.vm, into, "started", tuple(made))
