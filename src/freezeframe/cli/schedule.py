"""``freezeframe schedule``: set, list and remove a VM's snapshot schedule.

Thin handlers over :class:`freezeframe.service.Service` (``set_schedule``, ``list_schedules``,
``remove_schedule``); ``freezeframe serve`` runs the schedules, ``freezeframe snapshot prune``
applies their keep rules now.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich.markup import escape

from freezeframe.cli._common import console, emit_json, err_console, serve
from freezeframe.models import QuiescePolicy
from freezeframe.service import ScheduleSpec, ScheduleView

app = typer.Typer(
    help="Snapshot schedules with retention (run by `freezeframe serve`).", no_args_is_help=True
)


def _keep(help_text: str, flag: str) -> Any:
    return typer.Option(None, flag, min=0, metavar="N", help=help_text)


@app.command("set")
def set_cmd(
    vm: str = typer.Argument(..., help="A registered VM (see `freezeframe vm list`)."),
    every: str = typer.Option(
        ...,
        "--every",
        metavar="INTERVAL",
        help="A snapshot every INTERVAL: 30s, 15m, 1h, 1d, 1h30m.",
    ),
    keep_last: int | None = _keep("Keep the newest N snapshots.", "--keep-last"),
    keep_hourly: int | None = _keep(
        "Keep the newest of each of the last N hours.", "--keep-hourly"
    ),
    keep_daily: int | None = _keep("Keep the newest of each of the last N days.", "--keep-daily"),
    keep_weekly: int | None = _keep(
        "Keep the newest of each of the last N ISO weeks.", "--keep-weekly"
    ),
    keep_monthly: int | None = _keep(
        "Keep the newest of each of the last N months.", "--keep-monthly"
    ),
    keep_yearly: int | None = _keep(
        "Keep the newest of each of the last N years.", "--keep-yearly"
    ),
    quiesce: QuiescePolicy | None = typer.Option(
        None, "--quiesce", help="required | preferred | off (default: the VM's policy)."
    ),
    disabled: bool = typer.Option(
        False, "--disabled", help="Store the schedule but do not run it (yet)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Snapshot VM every INTERVAL, then prune its snapshots by the keep rules.

    The rules follow Proxmox's prune: each keeps the newest snapshot of each of its last N
    slots, newest first, skipping slots an earlier rule already covers. No rule at all keeps
    everything. Setting a schedule again replaces it (its last run is kept)."""

    spec = ScheduleSpec(
        every=every,
        keep_last=keep_last,
        keep_hourly=keep_hourly,
        keep_daily=keep_daily,
        keep_weekly=keep_weekly,
        keep_monthly=keep_monthly,
        keep_yearly=keep_yearly,
        quiesce=quiesce,
        enabled=not disabled,
    )
    view = serve(lambda svc: svc.set_schedule(vm, spec), as_json=as_json)
    if as_json:
        emit_json(view)
        return
    console.print(
        f"schedule of [bold]{escape(vm)}[/]: every {view.every}, {_rules(view)}, "
        f"next run {_when(view)}",
        highlight=False,
    )


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the schedules: interval, keep rules, next run, how the last run went."""

    views = serve(lambda svc: svc.list_schedules(), as_json=as_json)
    if as_json:
        emit_json(views)
        return
    if not views:
        err_console.print("no schedules")
        return
    header = ("VM", "EVERY", "KEEP", "QUIESCE", "NEXT RUN (UTC)", "LAST RUN", "LAST PRUNE")
    rows = [header] + [
        (
            v.schedule.vm,
            v.every,
            _rules(v),
            v.schedule.quiesce.value if v.schedule.quiesce else "(vm)",
            _when(v),
            _last(v),
            v.schedule.last_prune or "-",
        )
        for v in views
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        console.print(line.rstrip(), markup=False, highlight=False)


@app.command("remove")
def remove_cmd(vm: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Forget VM's schedule (its snapshots stay)."""

    serve(lambda svc: svc.remove_schedule(vm), as_json=as_json)
    if as_json:
        emit_json({"removed": vm})
    else:
        console.print(f"removed the schedule of {vm}", markup=False, highlight=False)


def _rules(v: ScheduleView) -> str:
    return ", ".join(f"{k} {n}" for k, n in v.rules.items()) or "keep all"


def _stamp(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}"


def _when(v: ScheduleView) -> str:
    if not v.schedule.enabled:
        return "disabled"
    if v.running:
        return "running now"
    return "due now" if v.due else _stamp(v.next_run_at)


def _last(v: ScheduleView) -> str:
    s = v.schedule
    if s.last_run_at is None:
        return "never"
    if s.last_finished_at is None:
        return f"{_stamp(s.last_run_at)} running"
    return f"{_stamp(s.last_run_at)} {s.last_outcome or '?'} {s.last_snapshot or ''}".rstrip()
