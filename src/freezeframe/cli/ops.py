"""``freezeframe doctor`` and ``freezeframe recover``: thin handlers over the service's
``doctor`` and ``recover``; the exit codes come from the report's codes."""

from __future__ import annotations

import typer
from rich.markup import escape

from freezeframe.cli._common import console, die, emit_json, serve
from freezeframe.cli._render import print_doctor
from freezeframe.models import QuiescePolicy
from freezeframe.service import RecoverOutcome


def doctor_cmd(
    vm: str = typer.Argument(..., help="A registered VM."),
    quiesce: QuiescePolicy | None = typer.Option(None, "--quiesce", help="Policy to judge by."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Can this VM be snapshotted consistently now? A checklist with fixes. Exit 1 on a FAIL."""
    rep = serve(lambda svc: svc.doctor(vm, quiesce=quiesce), as_json=as_json)
    if as_json:
        emit_json(rep)
    else:
        print_doctor(rep)
    if not rep.ok:
        raise SystemExit(1)


def recover_cmd(
    vm: str | None = typer.Argument(None, help="Only this VM (default: all)."),
    force: bool = typer.Option(False, "--force", help="Also intents of live processes."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Thaw every guest left with an open freeze intent (e.g. after a killed snapshot) and
    settle what dead snapshot processes left. Exit 12 if a guest could not be confirmed thawed,
    9 if intents of live processes were skipped (their guest may be frozen right now)."""
    report = serve(lambda svc: svc.recover(vm, force=force), as_json=as_json)
    if as_json:
        emit_json(report)
    elif not report.outcomes:
        console.print("no open freeze intents: no guest is left frozen by freezeframe")
    for o in [] if as_json else report.outcomes:
        _print(o)
    err = report.error()
    if err is not None:
        if not as_json:
            die(err)
        raise SystemExit(err.exit_code)


_STATE = {
    "closed": "[green]closed[/]",
    "thawed": "[green]thawed[/]",
    "skipped": "[yellow]skipped[/]",
    "thaw-unconfirmed": "[red]FAILED[/]",
    "settled": "[green]settled[/]",
}


def _print(o: RecoverOutcome) -> None:
    what = f"intent {o.intent_id}" if o.intent_id is not None else "record left unsettled"
    console.print(f"{escape(o.vm)} (snapshot {escape(o.snapshot_id)}, {what}): "
                  f"{_STATE[o.code]} — {escape(o.detail)}", highlight=False)  # fmt: skip
