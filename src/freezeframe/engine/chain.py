"""The files of each disk's image chain that are gone from this host.

A running QEMU keeps every image of every chain open, so deleting one (the image at the cut of
an earlier snapshot, or the active overlay itself) goes unnoticed while the VM runs: the guest
keeps reading and writing the unlinked file. A snapshot taken then records an image at the cut
that is missing or backs onto a missing file, and everything that lived only in the unlinked
file is lost the moment QEMU exits. ``doctor``, ``snapshot create`` and ``lab down`` ask
:func:`missing_chain_files` first.

:func:`missing_chain_files` checks the names the hypervisor reports (``DiskInfo.file`` and
``DiskInfo.backing``, top first); only local absolute paths are checked: ``json:{...}``,
``rbd:...``, ``nbd://...`` and other protocol names are not files of this host.
:func:`open_copies` finds where an unlinked file is still open (``/proc/PID/fd/N`` whose link
reads ``PATH (deleted)``), so the hint can say exactly what to copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from freezeframe.models import DiskInfo

__all__ = [
    "broken_chain_hint",
    "chain_files",
    "deleted_open_files",
    "describe_missing",
    "is_local_file_name",
    "missing_chain_files",
    "open_copies",
]

_DELETED = " (deleted)"


def is_local_file_name(name: str) -> bool:
    """Whether a hypervisor's image name is a path on this host (absolute, not ``json:``)."""
    return name.startswith("/")


def chain_files(disk: DiskInfo) -> tuple[str, ...]:
    """Every image of ``disk``'s chain, top first, each once."""
    return tuple(dict.fromkeys((disk.file, *disk.backing)))


def missing_chain_files(
    disks: Sequence[DiskInfo], *, exists: Callable[[str], bool] = os.path.exists
) -> dict[str, tuple[str, ...]]:
    """Each disk (by ``device``) whose chain holds local files that do not exist, mapped to
    those files, top first; disks whose chain is whole are left out. Non-local names are not
    checked. Raises nothing (``exists`` must not raise; the default does not)."""
    out: dict[str, tuple[str, ...]] = {}
    for disk in disks:
        gone = tuple(f for f in chain_files(disk) if is_local_file_name(f) and not exists(f))
        if gone:
            out[disk.device] = gone
    return out


def open_copies(
    files: Iterable[str], *, pids: Iterable[int] | None = None, proc: str | Path = "/proc"
) -> dict[str, str]:
    """Where each of ``files`` (unlinked, but maybe still held open) can still be read: path ->
    ``/proc/PID/fd/N`` of the first open descriptor whose link reads ``PATH (deleted)``.
    Looks at ``pids`` only, or at every process when None. Files found open nowhere are left
    out; processes and descriptors that cannot be read are skipped. Raises nothing."""
    wanted = {f + _DELETED: f for f in files}
    found: dict[str, str] = {}
    if not wanted:
        return found
    root = Path(proc)
    if pids is None:
        try:
            dirs = [p for p in root.iterdir() if p.name.isdigit()]
        except OSError:
            return found
    else:
        dirs = [root / str(pid) for pid in pids]
    for pdir in dirs:
        try:
            fds = sorted(pdir.joinpath("fd").iterdir(), key=lambda p: int(p.name))
        except (OSError, ValueError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            path = wanted.get(target)
            if path is not None and path not in found:
                found[path] = str(fd)
        if len(found) == len(wanted):
            break
    return found


def deleted_open_files(pid: int, *, proc: str | Path = "/proc") -> dict[str, str]:
    """The unlinked files process ``pid`` still holds open: path -> ``/proc/PID/fd/N`` (the
    first descriptor), for links that read ``/PATH (deleted)`` (not ``/memfd:...``). Empty when
    the process or its descriptors cannot be read. Raises nothing."""
    found: dict[str, str] = {}
    try:
        fds = sorted(Path(proc, str(pid), "fd").iterdir(), key=lambda p: int(p.name))
    except (OSError, ValueError):
        return found
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        path = target.removesuffix(_DELETED)
        if path != target and path.startswith("/") and not path.startswith("/memfd:"):
            found.setdefault(path, str(fd))
    return found


def describe_missing(missing: Mapping[str, Sequence[str]]) -> str:
    """``disk vda: /a.qcow2, /b.qcow2 missing; disk vdb: ...`` for messages."""
    return "; ".join(
        f"disk {dev}: {', '.join(files)} {'is' if len(files) == 1 else 'are'} missing"
        for dev, files in missing.items()
    )


def broken_chain_hint(copies: Mapping[str, str]) -> str:
    """What to do about missing chain files, naming the open copies found (path -> fd)."""
    if copies:
        saves = "; ".join(f"cp --sparse=always {fd} {path}" for path, fd in sorted(copies.items()))
        return (
            "the image was deleted while QEMU keeps it open: copy it back before QEMU exits "
            f"({saves}; an image the VM still writes to: pause its vCPUs first), or take a "
            "new full copy of the disk"
        )
    return (
        "the image was deleted while QEMU keeps it open: copy it back before QEMU exits "
        "(ls -l /proc/<qemu pid>/fd shows it as '(deleted)'; cp --sparse=always "
        "/proc/<qemu pid>/fd/N PATH; an image the VM still writes to: pause its vCPUs first), "
        "or take a new full copy of the disk"
    )
