"""Human-readable rendering of records and reports (Rich), shared by the subcommands.

Every text that comes from outside (VM names, paths, reasons, QEMU's and the guest's words) is
escaped or printed with ``markup=False``: a ``[/tmp/x]`` in it is shown as it is.
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from freezeframe.cli._common import console
from freezeframe.engine import CheckStatus, DoctorReport
from freezeframe.models import SnapshotRecord, SnapshotStatus, Verification

__all__ = ["print_doctor", "print_record", "print_verification"]

_LEVEL_STYLE = {
    "application": "bold green",
    "filesystem": "green",
    "crash": "yellow",
    "none": "red",
}


def print_record(rec: SnapshotRecord) -> None:
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
        console.print(f"    now writing to    {d.overlay or '-'}", markup=False, highlight=False)
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
        if c.fix:
            console.print(f"        fix: {c.fix}", markup=False, highlight=False, style="dim")
    style = _LEVEL_STYLE.get(rep.predicted_level.value, "")
    console.print(f"  => [{style}]{escape(rep.verdict)}[/]")
