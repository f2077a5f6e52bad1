"""``freezeframe snapshot``: create, list, show and verify snapshot sets.

Exit codes of ``create``: 0 done at the level asked (filesystem when quiescing, crash with
``--quiesce off``); 20 done but weaker than asked (``preferred`` fell back to crash); the error
codes of :mod:`freezeframe.errors` otherwise (10 = attempted and failed, recorded; 9 = another
snapshot of this VM is in progress; 13 = cut, the disks switched, but the catalog could not
record it: ``freezeframe recover VM``). With ``--verify`` the verdict's code (:func:`verdict_exit`:
21 check-failed, 22 corrupt) wins over 20.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import typer
from rich.markup import escape

from freezeframe.catalog import Catalog
from freezeframe.cli._common import (
    EXIT_WEAKER,
    console,
    emit_json,
    err_console,
    hint_for_vm,
    run,
)
from freezeframe.cli._render import print_record, print_verification
from freezeframe.engine import SnapshotRequest, Snapshotter, verify_snapshot
from freezeframe.engine.verify import DEFAULT_CHECK_TIMEOUT, parse_user_checks
from freezeframe.errors import (
    FreezeframeError,
    NotFoundError,
    RecoverError,
    SnapshotUnrecordedError,
    UsageError,
)
from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotRecord,
    TimelineEvent,
    Verification,
    VerifyVerdict,
)

app = typer.Typer(help="Create, list, show and verify snapshots.", no_args_is_help=True)


def expected_level(policy: QuiescePolicy) -> ConsistencyLevel:
    return ConsistencyLevel.CRASH if policy is QuiescePolicy.OFF else ConsistencyLevel.FILESYSTEM


#: ``snapshot verify`` / ``create --verify``: the filesystems pass their own checks, a user
#: ``--check`` failed or timed out (verdict ``check-failed``).
EXIT_CHECK_FAILED = 21
#: ``snapshot verify`` / ``create --verify``: a filesystem is corrupt (verdict ``corrupt``).
EXIT_CORRUPT = 22


def verdict_exit(v: Verification | None) -> int:
    """Exit code for a verification: 0 verified-consistent; 20 (EXIT_WEAKER) unchecked,
    needs-recovery or no verification; 21 check-failed; 22 corrupt."""
    if v is None:
        return EXIT_WEAKER
    return {
        VerifyVerdict.CONSISTENT: 0,
        VerifyVerdict.CHECK_FAILED: EXIT_CHECK_FAILED,
        VerifyVerdict.CORRUPT: EXIT_CORRUPT,
    }.get(v.verdict, EXIT_WEAKER)


def _positive_seconds(value: float) -> float:
    if not 0 < value < float("inf"):  # also false for NaN
        raise typer.BadParameter(f"must be a number of seconds > 0, got {value:g}")
    return value


@app.command("create")
def create(
    vm: str = typer.Argument(..., help="A registered VM (see `freezeframe vm list`)."),
    quiesce: QuiescePolicy | None = typer.Option(
        None, "--quiesce", help="required | preferred | off (default: the VM's policy)."
    ),
    freeze_timeout: float | None = typer.Option(
        None, "--freeze-timeout", help="Freeze deadline in seconds (default: the VM's, 10)."
    ),
    exclude_mount: list[str] = typer.Option(
        [], "--exclude-mount", help="Guest mount point not to freeze (repeatable)."
    ),
    exclude_disk: list[str] = typer.Option(
        [], "--exclude-disk", help="Disk (device id) to leave out of the snapshot (repeatable)."
    ),
    verify: bool = typer.Option(False, "--verify", help="Verify the images right after the cut."),
    check: list[str] = typer.Option([], "--check", help="With --verify: a user check command."),
    check_timeout: float = typer.Option(
        DEFAULT_CHECK_TIMEOUT,
        "--check-timeout",
        metavar="SECONDS",
        callback=_positive_seconds,
        help="With --check: kill a check (its whole process group) after SECONDS; it fails.",
    ),
    hold_frozen: float = typer.Option(0.0, "--hold-frozen", hidden=True),
    as_json: bool = typer.Option(False, "--json", help="Print the full record as JSON."),
) -> None:
    """Snapshot every disk of a running VM at one point in time, quiesced through the agent."""
    req = SnapshotRequest(
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        exclude_mounts=tuple(exclude_mount),
        exclude_disks=tuple(exclude_disk),
        hold_frozen=hold_frozen,
    )

    def progress(ev: TimelineEvent) -> None:
        err_console.print(f"[dim]{ev.t:%H:%M:%S.%f}"[:-3] + f"[/] {escape(ev.name)} "
                          f"{escape(ev.detail)}", highlight=False)  # fmt: skip

    async def go() -> SnapshotRecord:
        # bad --check input is refused before anything is frozen or cut
        if check and not verify:
            raise UsageError("--check needs --verify (the checks run on the verified images)")
        if check_timeout != DEFAULT_CHECK_TIMEOUT and not check:
            raise UsageError("--check-timeout needs --check (it bounds each user check)")
        parse_user_checks(check)
        async with await Catalog.open() as cat:
            started = datetime.now(UTC)
            try:
                rec = await Snapshotter(cat).snapshot(
                    vm, req, progress=None if as_json else progress
                )
            except asyncio.CancelledError:  # Ctrl-C / SIGTERM: say what it left, then exit
                with contextlib.suppress(FreezeframeError, asyncio.CancelledError):
                    await _report_interrupted(cat, vm, started)
                raise
            except FreezeframeError as exc:
                with contextlib.suppress(NotFoundError):
                    exc.hint = hint_for_vm(await cat.get_vm(vm), exc.hint)
                raise
            if verify:
                try:
                    await verify_snapshot(cat, rec.id, checks=check, check_timeout=check_timeout)
                except FreezeframeError as exc:
                    err_console.print(f"[red]verify failed to run:[/] {escape(exc.message)}")
                rec = await cat.get_snapshot(rec.id)
            return rec

    rec = run(go, as_json=as_json)
    if as_json:
        emit_json(rec)
    else:
        print_record(rec)
    if rec.thaw_unconfirmed:  # the cut is good, but the guest may still be frozen
        if not as_json:
            err_console.print(
                "[red]the thaw was NOT confirmed: the guest may still be frozen.[/] "
                "Run `freezeframe recover` now."
            )
        raise SystemExit(RecoverError.exit_code)
    if rec.intent_left_open:  # done and thawed, but the catalog still says "maybe frozen"
        if not as_json:
            err_console.print(
                "[red]the freeze intent could not be closed[/] (the catalog failed; the guest "
                f"IS thawed, confirmed). Run `freezeframe recover {rec.vm}` to close it."
            )
        raise SystemExit(SnapshotUnrecordedError.exit_code)
    asked = expected_level(rec.policy)
    if rec.level.rank < asked.rank:
        if not as_json:
            err_console.print(
                f"[yellow]weaker than asked:[/] {rec.level.value} instead of {asked.value}"
            )
        raise SystemExit(max(EXIT_WEAKER, verdict_exit(rec.verification) if verify else 0))
    if verify and (code := verdict_exit(rec.verification)):
        raise SystemExit(code)


async def _report_interrupted(cat: Catalog, vm: str, started: datetime) -> None:
    """After an interrupted ``create``: the attempt's id and what it says (thawed or not,
    disks switched or not), from its record, on stderr."""
    mine = [r for r in await cat.list_snapshots(vm) if r.created_at >= started]
    for rec in mine[-1:]:
        err_console.print(
            f"snapshot {rec.id} of {vm}: {rec.status.value}: {rec.error or rec.level_reason}"
            + (f"; its disks switched ({len(rec.disks)} recorded)" if rec.disks else ""),
            markup=False,
        )


@app.command("list")
def list_(
    vm: str | None = typer.Argument(None, help="Only this VM."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List snapshots, oldest first (failed attempts too), also of a VM no longer registered."""

    async def go() -> list[SnapshotRecord]:
        async with await Catalog.open() as cat:
            recs = await cat.list_snapshots(vm)
            if vm is not None and not recs:
                await cat.get_vm(vm)  # NotFoundError: neither registered nor any record
            return recs

    recs = run(go, as_json=as_json)
    if as_json:
        emit_json(recs)
        return
    if not recs:
        err_console.print("no snapshots")
        return
    header = ("ID", "CREATED (UTC)", "VM", "STATUS", "LEVEL", "WINDOW", "VERIFIED", "PARENT")
    rows = [header] + [
        (
            r.id,
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
            r.vm,
            r.status.value,
            r.level.value,
            f"{r.freeze_window_ms:.1f} ms" if r.freeze_window_ms is not None else "-",
            r.verification.verdict.value if r.verification else "unverified",
            r.parent_id or "-",
        )
        for r in recs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        line = "  ".join(
            cell.rjust(w) if i == 5 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        console.print(line.rstrip(), markup=False, highlight=False)


@app.command("show")
def show(snapshot_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one snapshot: level and why, disks, filesystems, timeline, evidence, verdict."""

    async def go() -> SnapshotRecord:
        async with await Catalog.open() as cat:
            return await cat.get_snapshot(snapshot_id)

    rec = run(go, as_json=as_json)
    if as_json:
        emit_json(rec)
    else:
        print_record(rec)


@app.command("verify")
def verify_cmd(
    snapshot_id: str,
    check: list[str] = typer.Option(
        [], "--check", help="Command run in each read-only mounted filesystem (repeatable)."
    ),
    check_timeout: float = typer.Option(
        DEFAULT_CHECK_TIMEOUT,
        "--check-timeout",
        metavar="SECONDS",
        callback=_positive_seconds,
        help="Kill a check (its whole process group) after SECONDS; it counts as failed.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check every filesystem of every image at the cut, offline and read-only.

    Exit 0 verified-consistent, 20 unchecked or needs-recovery, 21 check-failed (the
    filesystems pass, a --check failed or timed out), 22 corrupt.
    """

    async def go() -> Verification:
        if check_timeout != DEFAULT_CHECK_TIMEOUT and not check:
            raise UsageError("--check-timeout needs --check (it bounds each user check)")
        async with await Catalog.open() as cat:
            return await verify_snapshot(
                cat, snapshot_id, checks=check, check_timeout=check_timeout
            )

    v = run(go, as_json=as_json)
    if as_json:
        emit_json(v)
    else:
        print_verification(v)
    if code := verdict_exit(v):
        raise SystemExit(code)
