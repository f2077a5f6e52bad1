"""Overlay files on this host, shared by the drivers that cut with external qcow2 overlays.

Owns how an overlay is named (``<image stem>.ff-<snapshot id>.qcow2``, next to its image or in
an overlay directory), whether one can be created there, who must be able to open it (the QEMU
process: its user and groups from ``/proc/PID/status``, its AppArmor/SELinux label), giving it
that owner, its image's mode and (SELinux) its image's label, and removing one; keeping the
base of a running merge flushed (:func:`flushing`). No I/O with a VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import CutError
from freezeframe.models import DiskInfo

__all__ = [
    "OVERLAY_SUFFIX",
    "HostProcess",
    "SecurityModule",
    "apply_image_access",
    "flushing",
    "group_name",
    "image_stem",
    "is_block_device",
    "local_cut_problem",
    "overlay_mode",
    "overlay_path",
    "read_process",
    "remove_file",
    "security_modules",
    "unreachable_for",
    "user_name",
]

log = logging.getLogger(__name__)

#: How often :func:`flushing` fsyncs (seconds).
FLUSH_EVERY = 0.1


def _fsync(path: str) -> bool:
    """fsync ``path``; False when it cannot be opened or flushed (never raises)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


@contextlib.asynccontextmanager
async def flushing(path: str, every: float = FLUSH_EVERY) -> AsyncIterator[None]:
    """While the block is running, fsync the local file ``path`` every ``every`` seconds (in a
    worker thread). For the base of a live merge: QEMU writes it through the host's page cache
    (cache=writeback), and the guest's next fsync (ext4's ordered journal on the host) or the
    job's final flush otherwise has to write out everything the job copied at once, stalling
    the guest's writes for that long (bench/merge_bench.py: longest stall of a 256 MiB merge
    180-270 ms without, 120-190 ms with). The libvirt driver's way, and the QMP driver's
    fallback when QEMU cannot reopen the base with ``cache.direct`` on (which keeps the stall
    within 2 normal gaps). Stops at once for a path that cannot be opened (no local file).
    Never raises."""
    stop = asyncio.Event()

    async def loop() -> None:
        while await asyncio.to_thread(_fsync, path):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: The suffix every overlay's stem carries; stripped so that overlays of overlays keep one.
OVERLAY_SUFFIX = re.compile(r"\.ff-[A-Za-z0-9_-]+$")


def overlay_path(disk: DiskInfo, snapshot_id: str, overlay_dir: str | None) -> Path:
    """Where ``disk``'s overlay for ``snapshot_id`` goes. Raises CutError when the image is not
    a local absolute path and no ``overlay_dir`` is given."""
    local = os.path.isabs(disk.file)
    if overlay_dir is None and not local:
        raise CutError(
            f"disk {disk.device}: image {disk.file!r} is not a local absolute path",
            hint="pass an overlay directory",
        )
    stem = image_stem(Path(disk.file).name) if local else disk.device
    directory = Path(overlay_dir) if overlay_dir is not None else Path(disk.file).parent
    return directory / f"{stem}.ff-{snapshot_id}.qcow2"


def image_stem(name: str) -> str:
    """The part of an image's file name its overlays are named after: an image extension
    (``.qcow2``, ``.img``, ``.raw``) and an earlier overlay's ``.ff-<id>`` are dropped, any
    other dot is kept, so Nova's ``disk``, ``disk.eph0`` and ``disk.swap`` stay apart."""
    for ext in (".qcow2", ".img", ".raw"):
        if name.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return OVERLAY_SUFFIX.sub("", name) or name


def is_block_device(path: str) -> bool:
    """True when ``path`` is a block device; False otherwise or when it cannot be told."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def local_cut_problem(disk: DiskInfo, overlay_dir: str | None) -> str | None:
    """Why an overlay for ``disk`` cannot be created (in ``overlay_dir``, or next to its image
    when None) on this host; None when nothing stands in the way. Never raises."""
    if overlay_dir is None:
        if not os.path.isabs(disk.file):
            return (
                f"disk {disk.device}: image {disk.file!r} is not a local file "
                f"(network or protocol image, format {disk.format}): an overlay cannot go "
                "next to it; use overlay_dir"
            )
        if is_block_device(disk.file) or disk.file.startswith("/dev/"):
            return (
                f"disk {disk.device}: image {disk.file} is a block device: an overlay "
                "cannot go next to it; use overlay_dir"
            )
        directory = os.path.dirname(disk.file)
    else:
        directory = overlay_dir
    if not os.path.isdir(directory):
        return f"disk {disk.device}: overlay directory {directory} does not exist on this host"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"disk {disk.device}: overlay directory {directory} is not writable"
    return None


def remove_file(path: str | Path, label: str) -> None:
    """Delete ``path`` if it exists; only logs when it cannot. Never raises."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove %s: %s", label, path, exc)


# ---------------------------------------------------------------------------- the QEMU process


@dataclass(frozen=True, slots=True)
class HostProcess:
    """A process on this host as ``/proc`` shows it: its effective ``uid``/``gid`` (after
    QEMU's ``-runas``), supplementary ``groups``, command line and security ``label``
    (``/proc/PID/attr/current``: an AppArmor profile or SELinux context; None when the host
    has no such module or it cannot be read)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    argv: tuple[str, ...] = ()
    label: str | None = None

    @property
    def who(self) -> str:
        """``nobody:nogroup (uid 65534, gid 65534)``."""
        return f"{user_name(self.uid)}:{group_name(self.gid)} (uid {self.uid}, gid {self.gid})"


def user_name(uid: int) -> str:
    """The user's name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group's name, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _status_ids(text: str, key: str) -> list[int]:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return [int(v) for v in value.split()]
    return []


def read_process(pid: int, proc: str | Path = "/proc") -> HostProcess | None:
    """Process ``pid`` as ``proc`` shows it; None when it is gone or cannot be read. The
    effective ids are the second field of ``Uid:``/``Gid:`` in ``status``. Never raises."""
    base = Path(proc) / str(pid)
    try:
        status = (base / "status").read_text()
        uids, gids = _status_ids(status, "Uid"), _status_ids(status, "Gid")
        groups = tuple(_status_ids(status, "Groups"))
        raw = (base / "cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if len(uids) < 2 or len(gids) < 2:
        return None
    label: str | None = None
    for attr in ("attr/apparmor/current", "attr/current"):
        try:
            label = (base / attr).read_bytes().rstrip(b"\0\n").decode(errors="replace") or None
            break
        except OSError:  # EINVAL without a security module, or not readable
            continue
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return HostProcess(pid, uids[1], gids[1], groups, argv, label)


# ---------------------------------------------------------------------------- access


def overlay_mode(image: str) -> int:
    """The mode an overlay of ``image`` gets: the image's permission bits, with read and write
    for the owner (QEMU writes to it); 0o600 when the image cannot be read (not a local file)."""
    try:
        mode = stat.S_IMODE(os.stat(image).st_mode)
    except (OSError, ValueError):
        return 0o600
    return (mode & 0o666) | 0o600


def apply_image_access(overlay: Path, image: str, qemu: HostProcess | None) -> None:
    """Give ``overlay`` what the QEMU process needs to open it like ``image``: owned by QEMU's
    user and group (``-runas nobody``, libvirt's ``libvirt-qemu``; the image's owner when the
    process is unknown), the image's mode (:func:`overlay_mode`) and, where the image carries
    one, its SELinux label (``security.selinux``, so that ``svirt_t`` may open it).

    Raises:
        CutError: the owner or mode cannot be set (freezeframe not root and QEMU another user).
    """
    try:
        info = os.stat(image)
        uid, gid = (qemu.uid, qemu.gid) if qemu is not None else (info.st_uid, info.st_gid)
    except (OSError, ValueError):
        if qemu is None:
            uid, gid = -1, -1  # no image to copy from, no process: leave the owner as it is
        else:
            uid, gid = qemu.uid, qemu.gid
    try:
        now = os.stat(overlay)
        if (uid, gid) != (-1, -1) and (now.st_uid, now.st_gid) != (uid, gid):
            os.chown(overlay, uid, gid)
        os.chmod(overlay, overlay_mode(image))
    except OSError as exc:
        who = qemu.who if qemu is not None else f"uid {uid}, gid {gid}"
        raise CutError(
            f"cannot give overlay {overlay} to the QEMU process's user {who}: {exc.strerror}",
            hint="run freezeframe as root, or as the user QEMU runs as",
            code="overlay-owner",
        ) from exc
    _copy_selinux_label(overlay, image)


def _copy_selinux_label(overlay: Path, image: str) -> None:
    """Copy ``image``'s ``security.selinux`` to ``overlay`` on an SELinux host; best effort."""
    if not os.path.isdir("/sys/fs/selinux"):
        return
    try:
        label = os.getxattr(image, "security.selinux")
        os.setxattr(overlay, "security.selinux", label)
    except OSError as exc:
        log.info("cannot copy the SELinux label of %s to %s: %s", image, overlay, exc)


def _may(st: os.stat_result, uid: int, gids: set[int], bits: int) -> bool:
    """Whether ``uid`` (in ``gids``) has the permission ``bits`` (``r=4 w=2 x=1``) by mode."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return st.st_mode >> 6 & bits == bits
    if st.st_gid in gids:
        return st.st_mode >> 3 & bits == bits
    return st.st_mode & bits == bits


def unreachable_for(directory: str, qemu: HostProcess) -> str | None:
    """Why QEMU's user cannot open a file (it owns) in ``directory``: the first directory on
    the way it may not search (no ``x`` for it by mode bits; ACLs are not read), or None.
    Never raises (a directory that cannot be examined is not reported)."""
    gids = {qemu.gid, *qemu.groups}
    path = Path(os.path.abspath(directory))
    for part in (*reversed(path.parents), path):
        try:
            st = os.stat(part)
        except OSError:
            return None
        if not _may(st, qemu.uid, gids, 1):
            return (
                f"{part} (mode {stat.S_IMODE(st.st_mode):04o}, owner "
                f"{user_name(st.st_uid)}:{group_name(st.st_gid)}) may not be searched by "
                f"QEMU's user {qemu.who}"
            )
    return None


@dataclass(frozen=True, slots=True)
class SecurityModule:
    """A security module that could keep QEMU from opening a new overlay: ``name``
    (``apparmor`` or ``selinux``), whether it ``enforces``, and QEMU's ``label`` under it."""

    name: str
    enforces: bool
    label: str | None

    @property
    def confines(self) -> bool:
        """Whether QEMU is confined (not ``unconfined``/an unconfined SELinux domain)."""
        if self.label is None:
            return False
        if self.name == "apparmor":
            return self.label != "unconfined"
        domain = self.label.split(":")[2] if self.label.count(":") >= 2 else self.label
        return domain not in ("unconfined_t", "spc_t", "kernel_t", "initrc_t")


def security_modules(
    qemu: HostProcess | None, *, sysfs: str | Path = "/sys"
) -> list[SecurityModule]:
    """The security modules active on this host with QEMU's label under each: AppArmor
    (``/sys/kernel/security/apparmor``; a label ``NAME (enforce)``) and SELinux
    (``/sys/fs/selinux``; ``enforce`` says whether it enforces). Never raises."""
    root = Path(sysfs)
    label = qemu.label if qemu is not None else None
    out: list[SecurityModule] = []
    if (root / "kernel/security/apparmor").is_dir():
        profile = label
        enforce = True
        if label is not None and label.endswith(")") and " (" in label:
            profile, _, mode = label[:-1].rpartition(" (")
            enforce = mode == "enforce"
        out.append(SecurityModule("apparmor", enforce, profile))
    selinux = root / "fs/selinux"
    if selinux.is_dir():
        try:
            enforce = (selinux / "enforce").read_text().strip() == "1"
        except OSError:
            enforce = False
        out.append(SecurityModule("selinux", enforce, label))
    return out
