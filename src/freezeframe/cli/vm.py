"""``freezeframe vm``: register VMs with their control sockets and policy."""

from __future__ import annotations

from pathlib import Path

import typer

from freezeframe.catalog import Catalog
from freezeframe.cli._common import console, emit_json, run
from freezeframe.errors import UsageError
from freezeframe.models import QuiescePolicy, VmConfig

app = typer.Typer(help="Register VMs (lab VMs are registered by `lab up`).", no_args_is_help=True)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Name of the VM in freezeframe."),
    qmp: Path = typer.Option(..., "--qmp", help="QEMU's QMP unix socket."),
    qga: Path | None = typer.Option(None, "--qga", help="The guest agent's unix socket."),
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
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a running QEMU VM by its sockets."""
    if freeze_timeout <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--freeze-timeout")
    cfg = VmConfig(
        name=name,
        qmp_path=str(qmp),
        qga_path=str(qga) if qga else None,
        agent=agent,
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        agent_log_path=agent_log,
        exclude_mounts=tuple(exclude_mount),
    )

    async def go() -> None:
        if not name or "/" in name:
            raise UsageError(f"bad VM name {name!r}")
        async with await Catalog.open() as cat:
            await cat.add_vm(cfg, replace=replace)

    run(go, as_json=as_json)
    if as_json:
        emit_json(cfg)
    else:
        console.print(f"registered VM [bold]{name}[/] (qmp {qmp}, quiesce {quiesce.value})")


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
        console.print(
            f"{v.name:20} {'lab ' if v.lab else ''}quiesce={v.quiesce.value} "
            f"agent={'yes' if v.agent else 'no'} qmp={v.qmp_path}",
            highlight=False,
        )


@app.command("remove")
def remove(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Forget a VM (its snapshots stay in the catalog)."""

    async def go() -> None:
        async with await Catalog.open() as cat:
            await cat.remove_vm(name)

    run(go, as_json=as_json)
    if as_json:
        emit_json({"removed": name})
    else:
        console.print(f"removed VM {name}")
