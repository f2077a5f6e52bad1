"""Human-readable rendering of records and reports (Rich), shared by the subcommands.

Every text that comes from outside (VM names, paths, reasons, QEMU's and the guest's words) is
escaped or printed with ``markup=False``: a ``[/tmp/x]`` in it is shown as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from freezeframe.cli._common import console
from freezeframe.cli._hints import render
from freezeframe.models import SnapshotRecord, SnapshotStatus, Verification
from freezeframe.service import BootImage, CheckStatus, DoctorReport, join_hint

__all__ = ["print_boot_images", "print_doctor", "print_record", "print_verification"]

_LEVEL_STYLE = {
    "application": "bold green",
    "filesystem": "green",
    "crash": "yellow",
    "none": "red",
}


def print_record(rec: SnapshotRecord, live: Sequence[BootImage] | None = None) -> None:
    """``rec`` as text; with ``live`` (``vm images`` of its VM), each disk also says which
    image QEMU runs it on now, so a switched-away or restarted disk is not shown as writing
    to this snapshot's overlay."""
    now = {b.device: b for b in live or ()}
    style = _LEVEL_STYLE.get(rec.level.value, "")
    status = (
        "[green]done[/]" if rec.status is SnapshotStatus.DONE else f"[red]{rec.status.value}[/]"
    )
    console.print(
        f"[bold]snapshot {escape(rec.id)}[/] of VM [bold]{escape(rec.vm)}[/]  {status}",
        highlight=False,
    )
    console.print(
        f"  taken      {rec.created_at:%Y-%m-%d %H:%M:%S} UTC, parent {rec.parent_id or '-'}",
        markup=False,
    )
    console.print(f"  policy     quiesce {rec.policy.value}")
    console.print(
        f"  level      [{style}]{rec.level.value}[/]  {escape(rec.level_reason)}", highlight=False
    )
    if rec.error:
        console.print(f"  [red]error[/]      {escape(rec.error)}", highlight=False)
    if rec.freeze_window_ms is not None:
        console.print(f"  window     {rec.freeze_window_ms:.1f} ms (freeze sent -> thawed)")
    for d in rec.disks:
        console.print(f"  disk {d.device} ({d.format}, node {d.node})", markup=False)
        console.print(f"    image at the cut  {d.image}", markup=False, highlight=False)
        console.print(f"    overlay (cut on)  {d.overlay or '-'}", markup=False, highlight=False)
        b = now.get(d.device)
        if b is not None and b.running_on is not None:
            same = d.overlay is not None and b.running_on == d.overlay
            console.print(
                f"    QEMU runs on now  {b.running_on}"
                + (" (this overlay)" if same else " (not this snapshot's overlay)")
                + (f"; holds snapshot {', '.join(b.held_by)} at its cut" if b.held_by else ""),
                markup=False,
                highlight=False,
            )
        if d.quiesce_note:
            console.print(f"    quiesce note      {d.quiesce_note}", markup=False)
    if rec.filesystems:
        t = Table("mount point", "type", "disk", "frozen", "why not", box=None, pad_edge=False)
        for f in rec.filesystems:
            frozen = "[green]yes[/]" if f.frozen else "[yellow]no[/]"
            t.add_row(Text(f.mountpoint), Text(f.fstype), Text(f.device or "-"), frozen,
                      Text(f.reason))  # fmt: skip
        console.print(t)
    if rec.timeline:
        t0 = rec.timeline[0].mono_ns
        t = Table("+ms", "step", "detail", box=None, pad_edge=False)
        for ev in rec.timeline:
            t.add_row(f"{(ev.mono_ns - t0) / 1e6:9.1f}", Text(ev.name), Text(ev.detail))
        console.print(t)
    if rec.evidence_unavailable:
        console.print(
            f"  evidence   unavailable: {rec.evidence_unavailable}", markup=False, highlight=False
        )
    if rec.evidence:
        console.print("  agent log during the freeze window:")
        for line in rec.evidence:
            console.print(f"    {line}", highlight=False, markup=False)
    if rec.verification is not None:
        print_verification(rec.verification)


def print_verification(v: Verification) -> None:
    ok = v.verdict.value == "verified-consistent"
    colour = "green" if ok else "red"
    console.print(
        f"  verify     [{colour}]{v.verdict.value}[/] at {v.checked_at:%Y-%m-%d %H:%M:%S}, "
        f"{v.duration_ms / 1000:.1f} s, {v.bytes_read / (1 << 20):.1f} MiB read"
    )
    for c in v.checks:
        part = f" {c.partition}" if c.partition else ""
        replay = " (log replayed on a throw-away overlay)" if c.log_replayed else ""
        console.print(
            f"    {c.device}{part} {c.fstype}: {c.verdict.value}{replay} {c.detail}",
            highlight=False,
            markup=False,
        )


def print_doctor(rep: DoctorReport) -> None:
    marks = {CheckStatus.PASS: "[green]pass[/]", CheckStatus.WARN: "[yellow]warn[/]",
             CheckStatus.FAIL: "[red]FAIL[/]"}  # fmt: skip
    console.print(f"[bold]doctor {escape(rep.vm)}[/]")
    for c in rep.checks:
        console.print(f"  {marks[c.status]}  {escape(c.name)}: {escape(c.detail)}", highlight=False)
        fix = join_hint(c.fix, c.remedy, render)
        if fix:
            console.print(f"        fix: {fix}", markup=False, highlight=False, style="dim")
    style = _LEVEL_STYLE.get(rep.predicted_level.value, "")
    console.print(f"  => [{style}]{escape(rep.verdict)}[/]")


def print_boot_images(vm: str, rows: Sequence[BootImage]) -> None:
    """``vm images``: per disk, the image to boot from and whether QEMU runs on it now."""
    if not rows:
        console.print(f"no disks known for VM {escape(vm)}")
        return
    for b in rows:
        state = (
            "QEMU runs on it now"
            if b.on_it
            else f"QEMU runs on {b.running_on} instead"
            if b.on_it is False
            else b.checked
        )
        console.print(f"disk {b.device}", markup=False)
        console.print(f"  boot from  {b.boot_from or '-'}", markup=False, highlight=False)
        console.print(
            f"  recorded   {'by snapshot ' + b.snapshot_id if b.snapshot_id else 'no snapshot'}",
            markup=False,
        )
        console.print(f"  now        {state}", markup=False, highlight=False)
        if b.held_by:
            console.print(
                f"  [red]at risk[/]    it writes to the image at the cut of snapshot "
                f"{escape(', '.join(b.held_by))}",
                highlight=False,
            )
