"""Human-readable rendering of records and reports (Rich), shared by the subcommands."""

from __future__ import annotations

from rich.table import Table

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
    console.print(f"[bold]snapshot {rec.id}[/] of VM [bold]{rec.vm}[/]  {status}")
    console.print(
        f"  taken      {rec.created_at:%Y-%m-%d %H:%M:%S} UTC, parent {rec.parent_id or '-'}"
    )
    console.print(f"  policy     quiesce {rec.policy.value}")
    console.print(
        f"  level      [{style}]{rec.level.value}[/]  {rec.level_reason}", highlight=False
    )
    if rec.error:
        console.print(f"  [red]error[/]      {rec.error}", highlight=False)
    if rec.freeze_window_ms is not None:
        console.print(f"  window     {rec.freeze_window_ms:.1f} ms (freeze sent -> thawed)")
    for d in rec.disks:
        console.print(f"  disk {d.device} ({d.format}, node {d.node})", highlight=False)
        console.print(f"    image at the cut  {d.image}", highlight=False)
        console.print(f"    now writing to    {d.overlay or '-'}", highlight=False)
    if rec.filesystems:
        t = Table("mount point", "type", "disk", "frozen", "why not", box=None, pad_edge=False)
        for f in rec.filesystems:
            frozen = "[green]yes[/]" if f.frozen else "[yellow]no[/]"
            t.add_row(f.mountpoint, f.fstype, f.device or "-", frozen, f.reason)
        console.print(t)
    if rec.timeline:
        t0 = rec.timeline[0].mono_ns
        t = Table("+ms", "step", "detail", box=None, pad_edge=False)
        for ev in rec.timeline:
            t.add_row(f"{(ev.mono_ns - t0) / 1e6:9.1f}", ev.name, ev.detail)
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
    console.print(f"[bold]doctor {rep.vm}[/]")
    for c in rep.checks:
        console.print(f"  {marks[c.status]}  {c.name}: {c.detail}", highlight=False)
        if c.fix:
            console.print(f"        fix: {c.fix}", highlight=False, style="dim")
    style = _LEVEL_STYLE.get(rep.predicted_level.value, "")
    console.print(f"  => [{style}]{rep.verdict}[/]")
