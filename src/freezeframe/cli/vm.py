"""``freezeframe vm``: register VMs with their control sockets (QEMU) or as libvirt domains,
with their policy; ``vm import --libvirt`` registers every running domain of a connection.

``vm add`` registers a VM that is not running yet (its socket paths not there yet, with a
warning) but refuses a path that exists and is not a unix socket. ``vm add --replace`` and
``vm remove`` refuse a lab VM (``lab down NAME --purge`` forgets it with its files) unless
``--force``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import typer
from rich.markup import escape

from freezeframe.catalog import Catalog
from freezeframe.cli._common import console, emit_json, err_console, run
from freezeframe.engine import ImportAction, ImportResult, import_libvirt, libvirt_vm
from freezeframe.errors import UsageError
from freezeframe.models import QuiescePolicy, VmConfig

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
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing entry."),
    force: bool = typer.Option(
        False, "--force", help="With --replace: also a lab VM's entry (it stops being a lab VM)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a QEMU VM by its sockets (it need not be running yet), or a libvirt domain."""
    qmp = qmp.absolute() if qmp is not None else None
    qga = qga.absolute() if qga is not None else None
    cfg = VmConfig(
        name=name,
        qmp_path=str(qmp) if qmp else None,
        qga_path=str(qga) if qga else None,
        agent=agent,
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        agent_log_path=agent_log,
        exclude_mounts=tuple(exclude_mount),
    )

    async def go() -> list[Path]:
        nonlocal cfg
        if (qmp is None) == (domain is None):
            raise UsageError(
                "name the VM's hypervisor: --qmp SOCKET (QEMU) or --libvirt DOMAIN (libvirt)",
                hint="one of them, not both",
            )
        if domain is not None and qga is not None:
            raise UsageError(
                "--qga is for QEMU VMs: libvirt owns a domain's agent socket",
                hint="drop --qga; freezeframe reaches the agent through libvirt",
            )
        if qga is not None and not agent:
            raise UsageError(
                "--qga names the guest agent's socket, --no-agent says there is none",
                hint="drop one of them",
            )
        missing = [p for p in (qmp, qga) if p is not None and not _socket_or_missing(p)]
        if domain is not None:
            cfg = await libvirt_vm(
                name,
                domain,
                connect,
                agent=agent,
                quiesce=quiesce,
                freeze_timeout=freeze_timeout,
                agent_log_path=agent_log,
                exclude_mounts=tuple(exclude_mount),
            )
        async with await Catalog.open() as cat:
            old = {v.name: v for v in await cat.list_vms()}.get(name) if replace else None
            if old is not None and old.lab and not force:
                raise UsageError(
                    f"{name!r} is a lab VM: replacing its registration would turn it into a VM "
                    "of your own (its agent socket and log forgotten) while the lab VM runs on",
                    hint=f"`freezeframe lab down {name} --purge`, then `freezeframe lab up "
                    f"{name}` (or `vm add {name} --replace --force`)",
                )
            await cat.add_vm(cfg, replace=replace)
        return missing

    missing = run(go, as_json=as_json)
    for path in missing:
        err_console.print(
            f"[yellow]warning:[/] {escape(str(path))} is not there yet: is the VM running?",
            highlight=False,
        )
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

    async def go() -> list[ImportResult]:
        if not libvirt:
            raise UsageError("say where to import from: --libvirt [--connect URI]")
        async with await Catalog.open() as cat:
            return await import_libvirt(cat, connect, replace=replace)

    results = run(go, as_json=as_json)
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


def _socket_or_missing(path: Path) -> bool:
    """True if ``path`` is a unix socket, False if it does not exist (yet).

    Raises UsageError when it exists and is something else, or cannot ever be one.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:  # e.g. a parent is a regular file
        raise UsageError(f"{path} cannot be a socket: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise UsageError(
            f"{path} exists and is not a unix socket",
            hint="pass the path QEMU was started with: -qmp unix:PATH / -chardev socket,path=PATH",
        )
    return True


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List registered VMs."""

    async def go() -> list[VmConfig]:
        async with await Catalog.open() as cat:
            return await cat.list_vms()

    vms = run(go, as_json=as_json)
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


@app.command("remove")
def remove(
    name: str,
    force: bool = typer.Option(False, "--force", help="Also a lab VM (its QEMU keeps running)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Forget a VM (its snapshots stay in the catalog). A lab VM: `lab down NAME --purge`."""

    async def go() -> None:
        async with await Catalog.open() as cat:
            if (await cat.get_vm(name)).lab and not force:
                raise UsageError(
                    f"{name!r} is a lab VM: removing only its registration would leave it "
                    "running and unreachable",
                    hint=f"`freezeframe lab down {name} --purge` (or `vm remove {name} --force`)",
                )
            await cat.remove_vm(name)

    run(go, as_json=as_json)
    if as_json:
        emit_json({"removed": name})
    else:
        console.print(f"removed VM {name}", markup=False, highlight=False)
