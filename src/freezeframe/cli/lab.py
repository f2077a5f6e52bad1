"""``freezeframe lab``: the built-in lab VM (up, down, list, status).

Thin handlers over :mod:`freezeframe.lab`; ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import typer
from rich.markup import escape

from freezeframe import paths
from freezeframe.catalog import Catalog, make_owner
from freezeframe.cli._common import console, die, emit_json, err_console, run
from freezeframe.errors import (
    AlreadyExistsError,
    BusyError,
    FreezeframeError,
    NotFoundError,
    RecoverError,
)
from freezeframe.lab import LabVm, lab_down, lab_list, lab_status, lab_up
from freezeframe.lab._model import libvirt_agent_address, parse_disks, parse_size, validate_timeout
from freezeframe.models import VmConfig

app = typer.Typer(
    help="The built-in lab VM: a real guest running the real qemu-guest-agent.",
    no_args_is_help=True,
)

_JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _print_vm(vm: LabVm) -> None:
    state = "[green]running[/]" if vm.running else "[red]stopped[/]"
    console.print(
        f"[bold]{escape(vm.name)}[/] {state} pid {vm.pid} accel {escape(vm.accel)} "
        f"driver {escape(vm.driver)}",
        highlight=False,
    )
    if vm.driver == "libvirt":
        where = f"  domain   {vm.domain_name} {vm.domain} on {vm.connect_uri}"
        agent = f"{vm.agent_address} (channel {vm.qga_path})" if vm.qga_path else "(none)"
    else:
        where, agent = f"  qmp      {vm.qmp_path}", str(vm.qga_path or "(none)")
    console.print(where, markup=False, highlight=False)
    console.print(f"  agent    {agent}", markup=False, highlight=False)
    console.print(f"  console  {vm.console_log}", markup=False, highlight=False)
    for d in vm.disks:
        # The image the disk booted from (the top of its chain then), its base if that differs.
        base = f" (base {d.base_image.name})" if d.base_image != d.file else ""
        console.print(
            f"  {d.device}    {d.fstype:<5} {d.mountpoint:<11} {d.format} {d.file}{base}",
            markup=False,
            highlight=False,
        )
    if vm.running and vm.disks:
        console.print(
            "  (the images each disk booted from: a snapshot since then moved it to a newer "
            "overlay, which `freezeframe snapshot show` names)",
            markup=False,
            highlight=False,
        )


def _sync(as_json: bool, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except FreezeframeError as exc:
        die(exc, as_json=as_json)


@app.command("up")
def up(
    name: str = typer.Argument(
        ..., help="VM name: 1-32 characters of a-z, 0-9 and '-', not starting with '-'."
    ),
    disks: str | None = typer.Option(
        None,
        "--disks",
        help="Data disk filesystems, in order, comma-separated: ext4, xfs, vfat "
        "(new VM: default ext4,xfs; a stopped VM restarts on its own disks).",
    ),
    disk_size: str | None = typer.Option(
        None, "--disk-size", help="Size of each new data disk, 64M..64G (default 256M)."
    ),
    agent: bool | None = typer.Option(
        None,
        "--agent/--no-agent",
        help="Start qemu-ga in the guest or not (new VM: default --agent; a stopped VM "
        "restarts as it was built).",
    ),
    accel: str = typer.Option("auto", "--accel", help="auto, kvm or tcg."),
    libvirt: bool | None = typer.Option(
        None,
        "--libvirt/--qmp",
        help="Run it as a transient libvirt domain on qemu:///system (registered with the "
        "libvirt driver) or as a QEMU of its own (new VM: default --qmp; a stopped VM "
        "restarts as it was built).",
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", help="Seconds for the guest to be ready (more than 0, at most 3600)."
    ),
    as_json: bool = _JSON,
) -> None:
    """Build (cached) and boot a lab VM; return once its agent answers guest-ping.

    A stopped lab VM restarts on its own disks, each from the top of its snapshot chain. A
    lab VM that runs but is not registered (its lab up was killed) is registered as it runs."""
    fstypes: tuple[str, ...] | None = None
    try:
        if disks is not None:
            fstypes = parse_disks(disks)
        if disk_size is not None:
            parse_size(disk_size)
        validate_timeout(timeout)
    except FreezeframeError as exc:
        die(exc, as_json=as_json)

    async def go() -> tuple[LabVm, bool]:
        registered = False
        async with await Catalog.open() as cat:
            with contextlib.suppress(NotFoundError):
                if not (await cat.get_vm(name)).lab:
                    raise AlreadyExistsError(
                        f"a VM named {name!r} is registered and is not a lab VM",
                        hint="pick another name, or `freezeframe vm remove` it first",
                    )
                registered = True
        running_pid = None
        if not registered:
            with contextlib.suppress(NotFoundError):
                before = lab_status(name)
                running_pid = before.pid if before.running else None
        vm = await lab_up(
            name,
            disks=fstypes,
            disk_size=disk_size,
            agent=agent,
            accel=accel,
            timeout=timeout,
            adopt=not registered,  # running and registered: AlreadyExistsError as before
            driver=None if libvirt is None else ("libvirt" if libvirt else "qmp"),
        )
        # Lab VMs are registered automatically, so `snapshot create NAME` works right away.
        async with await Catalog.open() as cat:
            await cat.add_vm(vm.vm_config(), replace=True)
        return vm, running_pid == vm.pid

    vm, adopted = run(go, as_json=as_json)
    if as_json:
        emit_json(vm.to_json())
    elif adopted:
        err_console.print(
            f"lab VM {vm.name} was already running (pid {vm.pid}) but not registered: "
            "registered it",
            markup=False,
            highlight=False,
        )
        _print_vm(vm)
    else:
        err_console.print(
            f"lab VM {vm.name} is up ({vm.accel}, {vm.driver})", markup=False, highlight=False
        )
        _print_vm(vm)


@app.command("down")
def down(
    name: str = typer.Argument(...),
    purge: bool = typer.Option(
        False,
        "--purge",
        help="Also delete its files (disks, snapshot overlays, logs), its registration and "
        "its snapshot records.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Go on even while a snapshot of the VM is in progress, its guest may be frozen "
        "(an open freeze intent), or QEMU holds a deleted disk image open (lost on stop).",
    ),
    save: bool = typer.Option(
        False,
        "--save",
        help="Copy disk images that were deleted while QEMU holds them open back to their "
        "paths (from /proc/PID/fd, vCPUs paused) before stopping it.",
    ),
    as_json: bool = _JSON,
) -> None:
    """Stop a lab VM: flush the guest (sync through the agent), then QMP quit (SIGTERM/SIGKILL
    if need be; under libvirt, destroy its transient domain); its disks stay for the next lab
    up. --purge deletes its files, its registration and its snapshot records (their images
    lived in the deleted directory).
    Refused (exit 9) while a snapshot of the VM is in progress, and (exit 12) while a freeze
    intent of it is open (run `freezeframe recover NAME` first), and (exit 5) while QEMU holds
    open a disk image that was deleted (copy it back from /proc/PID/fd/N first, or --save),
    unless --force."""

    async def go() -> tuple[bool, int]:
        async with await Catalog.open() as cat:
            owner = make_owner()
            locked = False
            try:
                await cat.acquire_vm_lock(name, owner, purpose="lab-down")
                locked = True
            except BusyError as exc:
                if not force:
                    raise BusyError(
                        f"lab VM {name}: not stopped: {exc.message}",
                        hint="wait for it to finish, or add --force (a snapshot may then "
                        "fail; with --purge its record would point at deleted images)",
                        holder_purpose=exc.holder_purpose,
                    ) from exc
                err_console.print(
                    f"warning: {exc.message}; stopping {name} anyway (--force)", markup=False
                )
            try:
                await _refuse_if_maybe_frozen(cat, name, force=force)
                try:
                    await lab_down(name, purge=purge, force=force, save=save)
                except NotFoundError:
                    # No lab VM of that name (its directory is gone), but the catalog may still
                    # hold its registration and records: --purge forgets those too.
                    if not purge:
                        raise
                    removed = await _forget_lab_vm(cat, name)
                    if removed is None:
                        raise
                    return False, removed
                if not purge:
                    return True, 0
                removed = await _forget_lab_vm(cat, name)
                return True, removed or 0
            finally:
                if locked:
                    await cat.release_vm_lock(name, owner)

    stopped, removed = run(go, as_json=as_json)
    if as_json:
        emit_json({"name": name, "stopped": stopped, "purged": purge, "snapshots_removed": removed})
    else:
        gone = f" and purged ({removed} snapshot record(s) removed)" if purge else ""
        what = "stopped" if stopped else "was not there; its catalog entries were forgotten"
        err_console.print(f"lab VM {name} {what}{gone if stopped else f' ({removed} record(s))'}",
                          markup=False)  # fmt: skip


async def _refuse_if_maybe_frozen(cat: Catalog, name: str, *, force: bool) -> None:
    """Raise RecoverError if the lab VM ``name`` runs and the catalog holds an open freeze
    intent of it (a snapshot died while its guest was frozen: stopping it now would skip the
    flush and leave the intent open); with ``force`` only warn."""
    intents = await cat.open_intents(name)
    if not intents:
        return
    try:
        running = lab_status(name).running
    except FreezeframeError:  # no such lab VM, unreadable record: lab_down decides
        return
    if not running:
        return  # a stopped guest is not frozen; --purge closes its intents
    which = ", ".join(f"intent {i.id} of snapshot {i.snapshot_id}" for i in intents)
    what = f"open freeze intent(s) ({which}): its guest may still be frozen"
    if force:
        err_console.print(
            f"warning: lab VM {name}: {what}; stopping it anyway (--force)", markup=False
        )
        return
    raise RecoverError(
        f"lab VM {name}: not stopped: {what}",
        hint=f"freezeframe recover {name} first (or add --force: it is stopped anyway; a frozen "
        "guest cannot flush what it has not written back)",
    )


async def _forget_lab_vm(cat: Catalog, name: str) -> int | None:
    """Forget what the catalog holds of the lab VM ``name`` (its directory is gone): its
    registration if it is a lab VM's, the records whose images all lived in its directory (and,
    with a lab registration, its records without images), and its intents on a socket in its
    directory (no guest is left to thaw). Returns how many records went, or None when nothing
    of a lab VM of that name was found; a VM that is not a lab VM is never touched."""
    labdir = str(paths.lab_dir() / name)
    try:
        cfg: VmConfig | None = await cat.get_vm(name)
    except NotFoundError:
        cfg = None
    if cfg is not None and not cfg.lab:
        return None
    records = [
        r
        for r in await cat.list_snapshots(name)
        if (r.disks and _inside([d.image for d in r.disks], labdir))
        or (not r.disks and cfg is not None)
    ]
    if cfg is None and not records:
        return None
    if cfg is not None:
        await cat.remove_vm(name)
    for rec in records:
        with contextlib.suppress(NotFoundError):
            await cat.delete_snapshot(rec.id)
    # A libvirt lab VM's agent is not a path in its directory but its domain's address.
    domain = (
        libvirt_agent_address(cfg.domain, cfg.connect_uri)
        if cfg is not None and cfg.driver == "libvirt" and cfg.domain and cfg.connect_uri
        else None
    )
    for intent in await cat.open_intents(name):
        if intent.agent_address == domain or _inside([intent.agent_address], labdir):
            await cat.close_intent(intent.id, "lab down --purge")
    return len(records)


def _inside(files: list[str], directory: str) -> bool:
    """Every one of ``files`` lies in ``directory`` (recorded paths are absolute)."""
    prefix = os.path.abspath(directory) + os.sep
    return all(os.path.normpath(f).startswith(prefix) for f in files)


@app.command("list")
def list_(as_json: bool = _JSON) -> None:
    """List the lab VMs."""
    vms: list[LabVm] = _sync(as_json, lab_list)
    if as_json:
        emit_json([vm.to_json() for vm in vms])
        return
    if not vms:
        err_console.print("no lab VMs")
    for vm in vms:
        state = "running" if vm.running else "stopped"
        fs = ",".join(d.fstype for d in vm.disks) or "-"
        console.print(
            f"{vm.name:<20} {state:<8} pid {vm.pid:<8} {vm.accel:<4} {vm.driver:<7} {fs}",
            markup=False,
        )


@app.command("status")
def status(name: str = typer.Argument(...), as_json: bool = _JSON) -> None:
    """Show one lab VM."""
    vm: LabVm = _sync(as_json, lab_status, name)
    if as_json:
        emit_json(vm.to_json())
    else:
        _print_vm(vm)
