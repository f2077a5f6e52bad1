"""A byte progress bar on stderr for long commands (``snapshot export``): Rich's bar, bytes
done / total, speed and time left; on a stderr that is no terminal, nothing is animated and
only the final state is printed. Never on stdout (``--json`` keeps stdout one document)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from freezeframe.cli._common import err_console

__all__ = ["ByteBar", "byte_bar"]


class ByteBar(Protocol):
    def __call__(self, label: str, done: int, total: int) -> None: ...


@contextmanager
def byte_bar(title: str) -> Iterator[ByteBar]:
    """A bar titled ``title``; call the yielded function with (label, done, total) bytes."""
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    task = bar.add_task(title, total=None)

    def update(label: str, done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, description=f"{title} {label}")

    with bar:
        yield update
