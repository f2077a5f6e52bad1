"""``freezeframe doctor`` and ``freezeframe recover``."""

from __future__ import annotations

import dataclasses

import typer
from rich.markup import escape

from freezeframe.catalog import Catalog
from freezeframe.cli._common import console, die, emit_json, hint_for_vm, run, to_jsonable
from freezeframe.cli._render import print_doctor
from freezeframe.engine import DoctorReport, RecoverOutcome, doctor, recover
from freezeframe.errors import BusyError, FreezeframeError, RecoverError
from freezeframe.models import QuiescePolicy


def doctor_cmd(
    vm: str = typer.Argument(..., help="A registered VM."),
    quiesce: QuiescePolicy | None = typer.Option(None, "--quiesce", help="Policy to judge by."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Can this VM be snapshotted consistently now? A checklist with fixes. Exit 1 on a FAIL."""

    async def go() -> DoctorReport:
        async with await Catalog.open() as cat:
            rep = await doctor(cat, vm, quiesce=quiesce)
            cfg = await cat.get_vm(vm)
        checks = [dataclasses.replace(c, fix=hint_for_vm(cfg, c.fix) or "") for c in rep.checks]
        return dataclasses.replace(rep, checks=tuple(checks))

    rep = run(go, as_json=as_json)
    if as_json:
        emit_json({"ok": rep.ok, **to_jsonable(rep)})
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

    async def go() -> list[RecoverOutcome]:
        async with await Catalog.open() as cat:
            return await recover(cat, vm, force=force)

    out = run(go, as_json=as_json)
    failed = [o for o in out if o.failed]
    if as_json:
        emit_json(out)
    elif not out:
        console.print("no open freeze intents: no guest is left frozen by freezeframe")
    for o in [] if as_json else out:
        _print(o)
    skipped = [o for o in out if o.skipped]
    err: FreezeframeError | None = None
    if failed:
        err = RecoverError(
            f"{len(failed)} guest(s) could not be confirmed thawed",
            hint="is the VM running and its agent up? retry `freezeframe recover`",
        )
    elif skipped:  # a live process holds those guests frozen (or is about to): not ours
        err = BusyError(
            f"{len(skipped)} freeze intent(s) skipped: a live process owns them, and their "
            "guest may be frozen right now",
            hint="that process thaws them itself; if it hangs, stop it (it holds the agent's "
            "only connection), then run `freezeframe recover` again",
        )
    if err is not None:
        if not as_json:
            die(err)
        raise SystemExit(err.exit_code)


def _print(o: RecoverOutcome) -> None:
    state = (
        "[green]closed[/]" if o.vm_not_running else "[green]thawed[/]" if o.thawed
        else "[yellow]skipped[/]" if o.skipped
        else "[red]FAILED[/]" if o.failed else "[green]settled[/]"
    )  # fmt: skip
    what = f"intent {o.intent_id}" if o.intent_id is not None else "record left unsettled"
    console.print(f"{escape(o.vm)} (snapshot {escape(o.snapshot_id)}, {what}): "
                  f"{state} — {escape(o.detail)}", highlight=False)  # fmt: skip
