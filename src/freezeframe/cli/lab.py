"""``freezeframe lab``: the built-in lab VM (up, down, list, status).

Thin handlers over the service's lab operations (``lab_up``, ``lab_down``, ``lab_list``,
``lab_status``), which own the rules (registration, the lock / open-intent / purge sequence of
``lab down``); ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from freezeframe.cli._common import console, emit_json, err_console, serve
from freezeframe.service import CephLab, LabUpRequest, LabVm

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
            f"  {d.device}    {d.fstype:<5} {d.mountpoint:<11} "
            + (f"rbd {d.rbd} (lab Ceph)" if d.rbd else f"{d.format} {d.file}{base}"),
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
    rbd: bool = typer.Option(
        False,
        "--rbd",
        help="A new VM's data disks as RBD images in the lab Ceph (lab ceph up first), opened "
        "by QEMU's rbd driver (under --libvirt: <disk type='network'>).",
    ),
    as_json: bool = _JSON,
) -> None:
    """Build (cached) and boot a lab VM; return once its agent answers guest-ping.

    A stopped lab VM restarts on its own disks, each from the top of its snapshot chain. A
    lab VM that runs but is not registered (its lab up was killed) is registered as it runs."""
    req = LabUpRequest(
        name=name,
        disks=disks,
        disk_size=disk_size,
        agent=agent,
        accel=accel,
        driver=None if libvirt is None else ("libvirt" if libvirt else "qmp"),
        timeout=timeout,
        rbd=rbd,
    )
    result = serve(lambda svc: svc.lab_up(req), as_json=as_json)
    vm, adopted = result.vm, result.adopted
    if as_json:
        emit_json(vm)
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

    res = serve(
        lambda svc: svc.lab_down(name, purge=purge, force=force, save=save), as_json=as_json
    )
    if as_json:
        emit_json(
            {
                "name": name,
                "stopped": res.stopped,
                "purged": purge,
                "snapshots_removed": res.snapshots_removed,
            }
        )
    else:
        removed = res.snapshots_removed
        gone = f" and purged ({removed} snapshot record(s) removed)" if purge else ""
        what = "stopped" if res.stopped else "was not there; its catalog entries were forgotten"
        tail = gone if res.stopped else f" ({removed} record(s))"
        err_console.print(f"lab VM {name} {what}{tail}", markup=False)


@app.command("list")
def list_(as_json: bool = _JSON) -> None:
    """List the lab VMs."""
    vms = serve(lambda svc: svc.lab_list(), as_json=as_json)
    if as_json:
        emit_json(vms)
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
    vm = serve(lambda svc: svc.lab_status(name), as_json=as_json)
    if as_json:
        emit_json(vm)
    else:
        _print_vm(vm)


# --- lab ceph: the throw-away single-node Ceph (the service's ceph_up / ceph_down) ----------

ceph_app = typer.Typer(
    help="A throw-away single-node Ceph on 127.0.0.1 (one mon, one OSD, pool rbd, auth none) "
    "for tests, benchmarks and the demo.",
    no_args_is_help=True,
)
app.add_typer(ceph_app, name="ceph")


def _print_ceph(lab: object) -> None:
    if not isinstance(lab, CephLab):
        return
    state = "running" if lab.running else "stopped"
    lines = [
        f"lab ceph {state}: paxos {lab.paxos} ({lab.paxos_interval:g} s), mon {lab.mon_addr}",
        f"  conf     {lab.conf}",
        f"  pool     {lab.pool}   (client id admin, auth none)",
        f"  folder   {lab.dir}",
        *(
            f"  {d.name:<8} pid {d.pid} {'running' if d.running else 'stopped'}"
            for d in lab.daemons
        ),
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False)


@ceph_app.command("up")
def ceph_up_cmd(
    paxos: str | None = typer.Option(
        None,
        "--paxos",
        help="The monitor's paxos propose interval: fast (10 ms; a new cluster's default) or "
        "default (Ceph's 1 s: every snapshot costs ~1 s, for benchmarks). A stopped cluster "
        "keeps its setting unless given.",
    ),
    mgr: bool | None = typer.Option(None, "--mgr/--no-mgr", help="Also run a ceph-mgr."),
    port: int | None = typer.Option(
        None, "--port", help="The monitor's port on 127.0.0.1 (new cluster; default 3300)."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to a usable pool."),
    as_json: bool = _JSON,
) -> None:
    """Start the lab Ceph (idempotent; a stopped one restarts on its data) and return once a
    test object write to its pool succeeds; print where its conf and pool are."""
    lab = serve(
        lambda svc: svc.ceph_up(paxos=paxos, mgr=mgr, port=port, timeout=timeout),
        as_json=as_json,
    )
    if as_json:
        emit_json(lab)
        return
    how = "was already running" if lab.already_running else f"is up in {lab.started_in:.2f} s"
    err_console.print(f"lab ceph {how}", markup=False)
    _print_ceph(lab)


@ceph_app.command("down")
def ceph_down_cmd(
    purge: bool = typer.Option(
        False, "--purge", help="Also delete its folder: every image and snapshot in it."
    ),
    as_json: bool = _JSON,
) -> None:
    """Stop the lab Ceph's daemons by their recorded PIDs (idempotent); its data stays for
    the next up unless --purge."""
    res = serve(lambda svc: svc.ceph_down(purge=purge), as_json=as_json)
    if as_json:
        emit_json(res)
        return
    what = ", ".join(res.stopped) or "nothing was running"
    err_console.print(
        f"lab ceph down: stopped {what}" + ("; purged " + str(res.dir) if res.purged else ""),
        markup=False,
    )


@ceph_app.command("status")
def ceph_status_cmd(as_json: bool = _JSON) -> None:
    """Show the lab Ceph: running or not, its conf, pool and daemons (exit 2 when there is
    none)."""
    lab = serve(lambda svc: svc.ceph_status(), as_json=as_json)
    if as_json:
        emit_json(lab)
    else:
        _print_ceph(lab)
