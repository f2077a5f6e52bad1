"""``freezeframe snapshot``: create, list, show, verify, export and delete snapshot sets.

Exit codes of ``create``: 0 done at the level asked (filesystem when quiescing, crash with
``--quiesce off``); 20 done but weaker than asked (``preferred`` fell back to crash); the error
codes of :mod:`freezeframe.errors` otherwise (10 = attempted and failed, recorded; 9 = another
snapshot of this VM is in progress; 13 = cut, the disks switched, but the catalog could not
record it: ``freezeframe recover VM``). With ``--verify`` the verdict's code (:func:`verdict_exit`:
21 check-failed, 22 corrupt, 23 changed-since-cut) wins over 20.

Thin handlers over :class:`freezeframe.service.Service`: the service decides the outcome
(``done``, ``weaker-than-asked``, ``thaw-unconfirmed``, ``intent-left-open``) and runs the
verify; this module maps the outcome's code and the verdict to exit codes and text.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import typer
from rich.markup import escape

from freezeframe.cli._common import EXIT_WEAKER, console, emit_json, err_console, serve
from freezeframe.cli._progress import byte_bar
from freezeframe.cli._render import print_record, print_verification
from freezeframe.errors import FreezeframeError, SnapshotUnrecordedError, ThawUnconfirmedError
from freezeframe.models import (
    QuiescePolicy,
    SnapshotStatus,
    TimelineEvent,
    Verification,
    VerifyVerdict,
)
from freezeframe.service import (
    DEFAULT_CHECK_TIMEOUT,
    CreateSnapshot,
    DeleteResult,
    ExportOutcome,
    Outcome,
    Service,
    SnapshotOutcome,
    to_document,
)

app = typer.Typer(help="Create, list, show and verify snapshots.", no_args_is_help=True)


#: ``snapshot verify`` / ``create --verify``: the filesystems pass their own checks, a user
#: ``--check`` failed or timed out (verdict ``check-failed``).
EXIT_CHECK_FAILED = 21
#: ``snapshot verify`` / ``create --verify``: a filesystem is corrupt (verdict ``corrupt``).
EXIT_CORRUPT = 22
#: ``snapshot verify``: an image at the cut changed since the cut (verdict
#: ``changed-since-cut``: written to, e.g. by a VM restarted on it): the snapshot is lost.
EXIT_CHANGED = 23


def verdict_exit(v: Verification | None) -> int:
    """Exit code for a verification: 0 verified-consistent; 20 (EXIT_WEAKER) unchecked,
    needs-recovery or no verification; 21 check-failed; 22 corrupt; 23 changed-since-cut."""
    return EXIT_WEAKER if v is None else verdict_code(v.verdict.value)


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
    overlay_dir: Path | None = typer.Option(
        None, "--overlay-dir", help="Create the overlays here (default: the VM's overlay dir)."
    ),
    hold_frozen: float = typer.Option(0.0, "--hold-frozen", hidden=True),
    as_json: bool = typer.Option(False, "--json", help="Print the full record as JSON."),
) -> None:
    """Snapshot every disk of a running VM at one point in time, quiesced through the agent."""
    sid = Service.new_snapshot_id()  # named up front: an interrupted attempt is reported
    req = CreateSnapshot(
        quiesce=quiesce,
        freeze_timeout=freeze_timeout,
        exclude_mounts=tuple(exclude_mount),
        exclude_disks=tuple(exclude_disk),
        verify=verify,
        checks=tuple(check),
        check_timeout=check_timeout,
        hold_frozen=hold_frozen,
        snapshot_id=sid,
        overlay_dir=str(overlay_dir.absolute()) if overlay_dir is not None else None,
    )

    def progress(ev: TimelineEvent) -> None:
        err_console.print(f"[dim]{ev.t:%H:%M:%S.%f}"[:-3] + f"[/] {escape(ev.name)} "
                          f"{escape(ev.detail)}", highlight=False)  # fmt: skip

    async def go(svc: Service) -> SnapshotOutcome:
        try:
            return await svc.create_snapshot(vm, req, progress=None if as_json else progress)
        except asyncio.CancelledError:  # Ctrl-C / SIGTERM: say what it left, then exit
            with contextlib.suppress(FreezeframeError, asyncio.CancelledError):
                rec = await svc.get_snapshot(sid)
                err_console.print(
                    f"snapshot {rec.id} of {vm}: {rec.status.value}: "
                    f"{rec.error or rec.level_reason}"
                    + (f"; its disks switched ({len(rec.disks)} recorded)" if rec.disks else ""),
                    markup=False,
                )
            raise

    out = serve(go, as_json=as_json)
    rec = out.record
    if out.verify_problem is not None:
        err_console.print(f"[red]verify failed to run:[/] {escape(out.verify_problem.message)}")
    if as_json:
        emit_json(rec)
    else:
        print_record(rec)
    if out.code is Outcome.THAW_UNCONFIRMED:  # the cut is good, but the guest may be frozen
        if not as_json:
            err_console.print(
                "[red]the thaw was NOT confirmed: the guest may still be frozen.[/] "
                "Run `freezeframe recover` now."
            )
        raise SystemExit(ThawUnconfirmedError.exit_code)
    if out.code is Outcome.INTENT_LEFT_OPEN:  # done and thawed; the catalog says "maybe frozen"
        if not as_json:
            err_console.print(
                "[red]the freeze intent could not be closed[/] (the catalog failed; the guest "
                f"IS thawed, confirmed). Run `freezeframe recover {rec.vm}` to close it."
            )
        raise SystemExit(SnapshotUnrecordedError.exit_code)
    verdict = verdict_exit(out.verification) if out.verify_requested else 0
    if out.code is Outcome.WEAKER:
        if not as_json:
            err_console.print(
                f"[yellow]weaker than asked:[/] {rec.level.value} instead of {out.asked.value}"
            )
        raise SystemExit(max(EXIT_WEAKER, verdict))
    if verdict:
        raise SystemExit(verdict)


@app.command("list")
def list_(
    vm: str | None = typer.Argument(None, help="Only this VM."),
    status: SnapshotStatus | None = typer.Option(
        None, "--status", help="Only records of this status: done | failed | running | deleting."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List snapshots, oldest first (failed attempts too), also of a VM no longer registered.

    With --json: what a list shows of each (the items of the API's GET /v1/snapshots);
    `snapshot show ID --json` has the whole record."""

    recs = list(serve(lambda svc: svc.list_snapshots(vm, status=status), as_json=as_json).items)
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
            r.verdict.value if r.verdict else "unverified",
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

    # live: which image each disk runs on now (never claim it writes to this overlay blindly)
    shown = serve(lambda svc: svc.show_snapshot(snapshot_id, live=True), as_json=as_json)
    if as_json:
        emit_json(to_document(shown))
    else:
        print_record(shown.record, shown.images)


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
    filesystems pass, a --check failed or timed out), 22 corrupt, 23 changed-since-cut (an
    image at the cut was written to since the cut).
    """

    timeout = None if check_timeout == DEFAULT_CHECK_TIMEOUT else check_timeout
    v = serve(
        lambda svc: svc.verify_snapshot(snapshot_id, checks=tuple(check), check_timeout=timeout),
        as_json=as_json,
    ).verification
    if as_json:
        emit_json(v)
    else:
        print_verification(v)
    if code := verdict_exit(v):
        raise SystemExit(code)


@app.command("export")
def export_cmd(
    snapshot_id: str,
    to: Path = typer.Option(
        ..., "--to", help="Directory to write into (created if missing; never overwritten)."
    ),
    fmt: str = typer.Option("qcow2", "--format", help="qcow2 | raw."),
    compress: bool = typer.Option(False, "--compress", help="Compressed qcow2 (smaller, slower)."),
    verify: bool = typer.Option(
        False, "--verify", help="Verify the snapshot first; its verdict goes into the metadata."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a snapshot: one standalone image per disk (no backing file) and metadata.json.

    Reads the images at the cut, read-only, while the VM keeps running; the snapshot is held
    meanwhile (a delete is refused). Exit 0 done; with --verify the verdict's code as for
    `snapshot verify` (20 needs-recovery or unchecked, 21, 22). Nothing is left in DIR by a
    failed or interrupted export."""

    target = str(to.absolute())

    async def go(svc: Service) -> ExportOutcome:
        with byte_bar("export") as bar:
            return await svc.export_snapshot(
                snapshot_id,
                target,
                fmt=fmt,
                compress=compress,
                verify=verify,
                progress=lambda p: bar(p.device, p.done, p.total),
            )

    out = serve(go, as_json=as_json)
    if as_json:
        emit_json(out)
    else:
        print_export(out)
    if verify and (code := verdict_code(out.verdict)):
        raise SystemExit(code)


def verdict_code(verdict: str) -> int:
    """Exit code of a verdict's value (as :func:`verdict_exit`; ``unverified``: 20)."""
    try:
        v = VerifyVerdict(verdict)
    except ValueError:
        return EXIT_WEAKER
    return {
        VerifyVerdict.CONSISTENT: 0,
        VerifyVerdict.CHECK_FAILED: EXIT_CHECK_FAILED,
        VerifyVerdict.CORRUPT: EXIT_CORRUPT,
        VerifyVerdict.CHANGED: EXIT_CHANGED,
    }.get(v, EXIT_WEAKER)


def print_export(out: ExportOutcome) -> None:
    """An export's result as text: where each disk went, sizes, time, the metadata file."""
    secs = out.duration_ms / 1000.0
    rate = out.virtual_bytes / (1 << 20) / secs if secs > 0 else 0.0
    console.print(
        f"exported snapshot {out.snapshot_id} of {out.vm} to {out.directory} ({out.format}"
        f"{', compressed' if out.compressed else ''}) in {secs:.1f} s ({rate:.0f} MiB/s)",
        markup=False,
        highlight=False,
    )
    for i in out.images:
        console.print(
            f"  {i.device}: {i.path}  {i.virtual_size / (1 << 20):.1f} MiB virtual, "
            f"{i.file_size / (1 << 20):.1f} MiB on disk  (from {i.source})",
            markup=False,
            highlight=False,
        )
    console.print(
        f"metadata: {out.metadata_path} (verification: {out.verdict}, {out.verdict_source})",
        markup=False,
        highlight=False,
    )


@app.command("delete")
def delete_cmd(
    snapshot_id: str,
    bandwidth: float = typer.Option(
        0.0,
        "--bandwidth",
        metavar="MIB_PER_S",
        min=0.0,
        help="Cap each merge's copy at MIB_PER_S MiB/s (0: no limit): a slower merge, shorter "
        "stalls of the guest's writes.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete a snapshot without losing a byte of any other.

    Each qcow2 disk's layer is merged away: live while the VM runs (QEMU's block-commit; for
    the newest snapshot an active commit, after which the disk writes to the snapshot's
    image), offline with qemu-img when it is stopped; RBD snapshots are removed; then the
    record. Progress (bytes) on stderr. Refused while the snapshot runs, while a verify or
    export reads it (snapshot-in-use), when a disk writes to its image (image-written-by-vm)
    or two chains grow from it (layer-shared). An interrupted delete is finished by deleting
    again or by `freezeframe recover`."""

    async def go(svc: Service) -> DeleteResult:
        with byte_bar("merge") as bar:
            return await svc.delete_snapshot(
                snapshot_id,
                progress=lambda p: bar(p.device, p.done, p.total),
                bandwidth=int(bandwidth * (1 << 20)),
            )

    out = serve(go, as_json=as_json)
    if as_json:
        emit_json(out)
        return
    rec = out.record
    console.print(
        f"deleted snapshot {rec.id} of {rec.vm} in {out.duration_ms / 1000:.1f} s",
        markup=False,
        highlight=False,
    )
    for d in out.disks:
        if d.how == "removed":
            line = f"  {d.device}: removed {d.base}"
        else:
            line = (
                f"  {d.device}: merged {d.top} into {d.base} ({d.how}, "
                f"{d.bytes / (1 << 20):.1f} MiB in {d.duration_ms / 1000:.1f} s)"
            )
            if d.writes_to:
                line += f"; the disk writes to {d.writes_to} now"
        console.print(line, markup=False, highlight=False)


@app.command("restore")
def restore_cmd(
    snapshot_id: str,
    yes: bool = typer.Option(
        False, "--yes", help="Confirm: what the disks wrote since the newest snapshot is lost."
    ),
    into: str | None = typer.Option(
        None, "--as", metavar="NEW", help="Restore into a new lab VM NEW; the original runs on."
    ),
    stop_timeout: float = typer.Option(
        60.0,
        "--stop-timeout",
        metavar="SECONDS",
        help="A libvirt domain that has not shut down cleanly by then is destroyed.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Restore a VM's disks to a snapshot: new overlays on top of the snapshot's images.

    Every other snapshot stays usable and restorable. A lab VM is stopped and restarted on
    the new overlays, a persistent libvirt domain shut down, redefined on them and started; a
    QEMU VM freezeframe cannot start must be stopped first (vm-running),
    then booted on the images this prints. In place needs --yes (confirmation-required);
    --as NEW boots a new lab VM on them and leaves the original running."""
    if not yes and into is None and not as_json and sys.stdin.isatty():
        yes = typer.confirm(
            f"Restore snapshot {snapshot_id}? What the VM's disks wrote since its newest "
            "snapshot is discarded"
        )
    out = serve(
        lambda svc: svc.restore_snapshot(
            snapshot_id, into=into, yes=yes, stop_timeout=stop_timeout
        ),
        as_json=as_json,
    )
    if as_json:
        emit_json(out)
        return
    said = {
        "restarted": f"VM {out.vm} restarted on snapshot {out.snapshot_id}",
        "started": f"new lab VM {out.into} runs on snapshot {out.snapshot_id} ({out.vm} runs on)",
        "boot-from": f"VM {out.vm} restored to snapshot {out.snapshot_id}: start it on these "
        "images",
    }[out.state]
    console.print(said, markup=False, highlight=False)
    for d in out.disks:
        line = f"  {d.device}: {d.boot_from}  (backed by {d.image})"
        if d.discarded:
            line += f"; discarded {d.discarded}"
        console.print(line, markup=False, highlight=False)


@app.command("prune")
def prune_cmd(
    vm: str | None = typer.Argument(None, help="Only this VM (default: every scheduled VM)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; delete nothing."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Apply the keep rules of the VMs' schedules now (`freezeframe schedule set`).

    Every snapshot gets a decision and a reason code (keep-last ... keep-yearly, in-use,
    running, failed-verification-only-in-slot; not-selected, superseded-in-slot,
    failed-attempt, failed-verification). Never deleted: the snapshot a disk writes to, a
    failed-verification snapshot that is the only one of its slot. A refused delete keeps
    the snapshot and says why (its code); exit 20 when any was refused."""

    report = serve(lambda svc: svc.prune(vm, dry_run=dry_run), as_json=as_json)
    if as_json:
        emit_json(report)
    else:
        for i in report.items:
            if i.deleted:
                verb = "deleted"
            elif i.refused:
                verb = "kept, because"
            else:
                verb = "keep" if i.keep else ("would delete" if dry_run else "delete")
            line = f"{i.id}  {i.vm}  {i.created_at:%Y-%m-%d %H:%M:%S}  {verb} {i.reason}"
            if i.slot and not i.refused:
                line += f" ({i.slot})"
            console.print(line, markup=False, highlight=False)
            if i.refused:
                err_console.print(f"  {i.detail}", markup=False, highlight=False)
        err_console.print(report.summary() or "nothing to prune", markup=False, highlight=False)
    if report.refused:
        raise SystemExit(EXIT_WEAKER)
