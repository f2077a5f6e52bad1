"""``freezeframe vm``: register VMs with their control sockets (QEMU) or as libvirt domains,
with their policy; ``vm import --libvirt`` registers every running domain of a connection.

Thin handlers over :class:`freezeframe.service.Service` (``add_vm``, ``import_libvirt``,
``list_vms``, ``remove_vm``), which owns the rules: a VM that is not running yet is registered
(its socket paths not there yet: a warning here), a path that exists and is no unix socket is
refused, and ``--replace`` / ``remove`` refuse a lab VM (code ``lab-vm``) unless ``--force``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from freezeframe.cli._common import console, die, emit_json, err_console, serve
from freezeframe.cli._render import print_boot_images
from freezeframe.errors import UsageError
from freezeframe.models import QuiescePolicy
from freezeframe.service import ImportAction, VmSpec

#: libvirt's system connection (the default of --connect); kept here so that the CLI does not
#: import the libvirt module (python3-libvirt is optional).
DEFAULT_URI = "qemu:///system"

app = typer.Typer(help="Register VMs (lab VMs are registered by `lab up`).", no_args_is_help=True)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Name of the VM in freezeframe."),
    qmp: Path | None = typer.Option(None, "--qmp", help="QEMU's QMP unix socket."),
    qga: Path | None = typer.Option(None, "--qga", help="The guest agent's unix socket."),
    domain: str | None = typer.Option(
        None, "--libvirt", help="A libvirt domain (name, UUID or id) instead of --qmp."
    ),
    connect: str = typer.Option(
        DEFAULT_URI, "--connect", help="libvirt connection URI (with --libvirt)."
    ),
    agent: bool = typer.Option(True, "--agent/--no-agent", help="hw_qemu_guest_agent."),
    quiesce: QuiescePolicy = typer.Option(
        QuiescePolicy.PREFERRED, "--quiesce", help="Default policy (os_require_quiesce=required)."
    ),
    freeze_timeout: float = typer.Option(10.0, "--freeze-timeout", help="Freeze deadline, s."),
    agent_log: str | None = typer.Option(
        None, "--agent-log", help="qemu-ga's --logfile inside the guest (evidence)."
    ),
    exclude_mount: list[str] = typer.Option([], "--exclude-mount", help="Never freeze this."),
    overlay_dir: Path | None = typer.Option(
        None, "--overlay-dir", help="Create its overlays here (default: next to each image)."
    ),
    ceph_conf: Path | None = typer.Option(
        None, "--ceph-conf", help="ceph.conf for its RBD disks (default: what QEMU was given)."
    ),
    ceph_id: str | None = typer.Option(
        None, "--ceph-id", help="Ceph client id for its RBD disks (default: QEMU's, or admin)."
    ),
    ceph_keyring: Path | None = typer.Option(
        None, "--ceph-keyring", help="Keyring file of that client (the key is never stored)."
    ),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing entry."),
    force: bool = typer.Option(
        False, "--force", help="With --replace: also a lab VM's entry (it stops being a lab VM)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a QEMU VM by its sockets (it need not be running yet), or a libvirt domain."""
    spec = VmSpec(
        name=name,
        qmp=str(qmp) if qmp is not None else None,
        qga=str(qga) if qga is not None else None,
        libvirt_domain=domain,
        connect_uri=connect,
        agent=agent,
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        agent_log=agent_log,
        exclude_mounts=tuple(exclude_mount),
        overlay_dir=str(overlay_dir.absolute()) if overlay_dir is not None else None,
        ceph_conf=str(ceph_conf.absolute()) if ceph_conf is not None else None,
        ceph_id=ceph_id,
        ceph_keyring=str(ceph_keyring.absolute()) if ceph_keyring is not None else None,
    )
    added = serve(lambda svc: svc.add_vm(spec, replace=replace, force=force), as_json=as_json)
    for path in added.not_there_yet:
        err_console.print(
            f"[yellow]warning:[/] {escape(path)} is not there yet: is the VM running?",
            highlight=False,
        )
    cfg = added.vm
    if as_json:
        emit_json(cfg)
    else:
        where = (
            f"libvirt domain {cfg.domain} at {cfg.connect_uri}"
            if cfg.driver == "libvirt"
            else f"qmp {cfg.qmp_path}"
        )
        console.print(
            f"registered VM [bold]{escape(name)}[/] ({escape(where)}, quiesce {quiesce.value})",
            highlight=False,
        )


@app.command("import")
def import_(
    libvirt: bool = typer.Option(
        False, "--libvirt", help="Register every running domain of a libvirt connection."
    ),
    connect: str = typer.Option(DEFAULT_URI, "--connect", help="libvirt connection URI."),
    replace: bool = typer.Option(
        False, "--replace", help="Overwrite registrations of the same name (never a lab VM's)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register the VMs a hypervisor already runs (today: libvirt domains, by their names)."""

    if not libvirt:
        die(UsageError("say where to import from: --libvirt [--connect URI]"), as_json=as_json)
    results = serve(lambda svc: svc.import_libvirt(connect, replace=replace), as_json=as_json)
    if as_json:
        emit_json(results)
        return
    if not results:
        console.print(f"no domains at {connect}", markup=False, highlight=False)
    for r in results:
        extra = ""
        if r.vm is not None and r.action in (ImportAction.ADDED, ImportAction.REPLACED):
            extra = f" agent={'yes' if r.vm.agent else 'no'} quiesce={r.vm.quiesce.value}"
        elif r.detail:
            extra = f" ({r.detail})"
        console.print(
            f"{r.action.value:12} {r.domain} {r.uuid}{extra}", markup=False, highlight=False
        )


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List registered VMs."""

    vms = serve(lambda svc: svc.list_vms(), as_json=as_json)
    if as_json:
        emit_json(vms)
        return
    for v in vms:
        where = (
            f"domain={v.domain} connect={v.connect_uri}"
            if v.driver == "libvirt"
            else f"qmp={v.qmp_path}"
        )
        console.print(
            f"{v.name:20} {v.driver:8} {'lab ' if v.lab else ''}quiesce={v.quiesce.value} "
            f"agent={'yes' if v.agent else 'no'} {where}",
            markup=False,
            highlight=False,
        )


@app.command("images")
def images(
    name: str = typer.Argument(..., help="A registered VM (or one with snapshot records)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per disk: the image to boot the VM from (the newest overlay recorded) and whether QEMU
    runs on it now. Restarting a VM on an older image changes the snapshots that hold it."""

    rows = serve(lambda svc: svc.vm_images(name), as_json=as_json)
    if as_json:
        emit_json(rows)
    else:
        print_boot_images(name, rows)


@app.command("remove")
def remove(
    name: str,
    force: bool = typer.Option(False, "--force", help="Also a lab VM (its QEMU keeps running)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Forget a VM (its snapshots stay in the catalog). A lab VM: `lab down NAME --purge`."""

    serve(lambda svc: svc.remove_vm(name, force=force), as_json=as_json)
    if as_json:
        emit_json({"removed": name})
    else:
        console.print(f"removed VM {name}", markup=False, highlight=False)
