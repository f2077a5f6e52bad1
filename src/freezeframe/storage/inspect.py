"""Reading a disk image at the cut, read-only, through a throw-away overlay.

Owns the plumbing of offline inspection: a temporary directory holding a qcow2 overlay whose
backing file is the cut image (opened read-only, so it is never written), a
``qemu-storage-daemon`` that exports the overlay as a raw file over FUSE (the host kernel has
neither ``nbd`` nor a way to loop-mount qcow2), a loop device with partition scanning on that
file, and ``mount``/``umount`` of what is on it. Everything a check writes (an xfs log replay,
an ext4 journal replay) lands in the overlay and is thrown away.

:func:`open_image` always tears down what it set up -- mounts left on its loop device, the loop
device, the daemon (by PID), the FUSE mount point, the temporary directory -- on success,
error or cancellation alike.

A process killed with SIGKILL cannot tear anything down, so the helpers run under ``setpriv
--pdeathsig KILL`` (the kernel kills them when the thread that started them -- asyncio's event
loop thread -- exits), and each workspace (``ff-verify-*``) holds ``owner.json``: the owner
(:func:`~freezeframe._owner.make_owner`, judged by
:func:`~freezeframe._owner.holder_is_dead`), when it was made, the daemon's PID and
the mount points made on its loop devices. :func:`sweep_stale_workspaces` (run by every
:func:`open_image`, and callable by ``recover``) cleans the workspaces of dead owners.

Bytes read: QEMU accounts I/O per BlockBackend only, and the FUSE export's BlockBackend is
anonymous, so ``query-blockstats`` reports 0 for every node of the daemon (measured on QEMU
7.2). :meth:`ImageView.bytes_read` therefore counts what was read from the exported disk: the
sectors read by the loop device (``/sys/block/loopN/stat``), i.e. the disk's guest-visible
bytes that the checks actually touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from freezeframe._aio import within
from freezeframe._owner import holder_is_dead, make_owner
from freezeframe._tools import require, run
from freezeframe.errors import FreezeframeError, ToolError, VerifyError

__all__ = ["ImageView", "Partition", "mounted", "open_image", "sweep_stale_workspaces"]

log = logging.getLogger(__name__)

#: How long qemu-storage-daemon may take to come up with its export.
_QSD_START_TIMEOUT = 20.0
#: How long it may take to stop after SIGTERM before it is killed.
_QSD_STOP_TIMEOUT = 10.0
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
_LOCK_HINT = (
    "the image is open for writing by another process (the running VM?): "
    "only an image at the cut, no longer written, can be verified"
)


@dataclass(frozen=True, slots=True)
class Partition:
    """One block device of an exported image that may carry a filesystem.

    ``device`` is the loop device itself (a filesystem on the whole disk, ``number`` None) or
    one of its partitions (``/dev/loopNpM``, ``number`` M). ``fstype`` is what ``blkid -p``
    finds (``ext4``, ``xfs``, ``vfat``, ``swap``, ...), None when it finds no signature.
    """

    device: str
    fstype: str | None
    label: str | None = None
    number: int | None = None


@dataclass(frozen=True, slots=True)
class ImageView:
    """A cut image, exported through a throw-away overlay and attached to a loop device.

    ``partitions`` holds the whole device when it carries a filesystem, else each partition
    of its partition table (``partition_table`` ``dos``/``gpt``); it is empty for a disk with
    neither. Valid only inside :func:`open_image`.
    """

    image: str
    format: str
    device: str
    partitions: tuple[Partition, ...]
    partition_table: str | None = None
    virtual_size: int = 0

    #: Every loop device on the export: ``device`` and, when the kernel cannot read the
    #: partition table, one per partition.
    loop_devices: tuple[str, ...] = ()
    #: Sectors already counted on each of ``loop_devices`` when it was attached (a reused loop
    #: device keeps its counters).
    sectors_before: tuple[int, ...] = field(default=(), repr=False)

    def bytes_read(self) -> int:
        """Bytes read from the exported disk since it was attached (loop devices' sectors
        read * 512).

        Raises VerifyError when a loop device is gone (outside :func:`open_image`).
        """
        now = sum(_sectors_read(dev) for dev in self.loop_devices)
        return (now - sum(self.sectors_before)) * 512


def _sectors_read(dev: str) -> int:
    """Sectors read from block device ``dev`` since it was set up; VerifyError if gone."""
    stat = Path("/sys/block") / Path(dev).name / "stat"
    try:
        return int(stat.read_text().split()[2])
    except (OSError, IndexError, ValueError) as exc:
        raise VerifyError(f"cannot read I/O statistics of {dev}: {exc}") from exc


# ---------------------------------------------------------------------------- helpers


async def _uncancellable(aw: Awaitable[object]) -> None:
    """Run ``aw`` to completion even if the calling task is cancelled meanwhile; re-raise the
    cancellation afterwards. Used for teardown, which must not stop half-way."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


def _mount_targets() -> list[tuple[str, str]]:
    """``(source, mount point)`` of every mount of this host (octal escapes decoded)."""

    def unescape(s: str) -> str:
        return s.encode().decode("unicode_escape") if "\\" in s else s

    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:  # pragma: no cover - /proc always exists on Linux
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:
            out.append((unescape(parts[0]), unescape(parts[1])))
    return out


def _is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    return any(target == real for _, target in _mount_targets())


async def _umount(path: str) -> None:
    """Unmount ``path``; retry a busy mount briefly, then detach it lazily. Never raises."""
    for attempt in range(5):
        try:
            await run("umount", path, timeout=60.0, what=f"umount {path}")
            return
        except ToolError as exc:
            if not _is_mounted(path):
                return
            log.debug("umount %s failed (attempt %d): %s", path, attempt + 1, exc)
            await asyncio.sleep(0.2 * (attempt + 1))
        except FreezeframeError as exc:
            log.warning("cannot unmount %s: %s", path, exc)
            return
    try:
        await run("umount", "-l", path, timeout=30.0, what=f"umount -l {path}")
        log.warning("%s was busy; detached it lazily", path)
    except FreezeframeError as exc:
        log.warning("cannot unmount %s: %s", path, exc)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


async def _image_info(image: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of the whole chain (taking the normal shared lock, so an image that a
    running VM still writes to is refused), plus ``qemu-img check`` for qcow2."""
    try:
        res = await run(
            "qemu-img",
            "info",
            "--output=json",
            "--backing-chain",
            "-f",
            fmt,
            image,
            timeout=60.0,
            what=f"qemu-img info {image}",
        )
    except ToolError as exc:
        hint = _LOCK_HINT if "lock" in exc.stderr else None
        raise VerifyError(
            f"image {image} cannot be opened as {fmt}: {_tail(exc.stderr) or exc}", hint=hint
        ) from exc
    try:
        chain = json.loads(res.out)
        top = chain[0]
        if not isinstance(top, dict):
            raise TypeError("not an object")
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise VerifyError(f"qemu-img info {image}: unexpected output") from exc
    if fmt == "qcow2":
        chk = await run(
            "qemu-img",
            "check",
            "--output=json",
            "-f",
            fmt,
            image,
            check=False,
            timeout=600.0,
            what=f"qemu-img check {image}",
        )
        # 0: fine, 3: leaked clusters only (harmless, space is merely wasted).
        if chk.returncode not in (0, 3):
            raise VerifyError(
                f"image {image} is damaged: qemu-img check exit {chk.returncode}: "
                f"{_tail(chk.err) or _tail(chk.out)}"
            )
    return top


def _probe_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


async def _probe(device: str) -> dict[str, str]:
    """``blkid -p`` (low-level probe, no cache) of ``device``: TYPE, LABEL, PTTYPE, ..."""
    res = await run(
        "blkid", "-p", "-o", "export", "-c", "/dev/null", device, check=False, timeout=60.0
    )
    if res.returncode not in (0, 2):  # 2: nothing found
        log.warning("blkid -p %s: exit %d: %s", device, res.returncode, _tail(res.err))
    return _probe_fields(res.out)


async def _loops_on(path: str) -> list[str]:
    """Loop devices attached to ``path`` (``losetup -j``); empty when that cannot be told."""
    if not _exists(path):
        return []
    try:
        res = await run("losetup", "-j", path, check=False, timeout=60.0)
    except FreezeframeError as exc:
        log.warning("losetup -j %s: %s", path, exc)
        return []
    return [line.split(":", 1)[0] for line in res.out.splitlines() if line.startswith("/dev/")]


def _partition_devices(loop: str) -> list[tuple[int, str]]:
    name = Path(loop).name
    found = []
    for entry in Path("/sys/block", name).glob(f"{name}p*"):
        try:
            number = int((entry / "partition").read_text())
        except (OSError, ValueError):
            continue
        found.append((number, f"/dev/{entry.name}"))
    return sorted(found)


_EXTENDED_TYPES = frozenset({"0x5", "0xf", "0x85"})


async def _partition_table(loop: str) -> list[tuple[int, int, int]]:
    """``(number, start sector, sectors)`` of each partition, read in user space by partx
    (the kernel may have no partition-table support: this host's has neither msdos nor efi)."""
    res = await run(
        "partx", "--show", "-g", "-o", "NR,START,SECTORS,TYPE", loop, check=False, timeout=60.0
    )
    if res.returncode != 0:
        log.warning("partx %s: %s", loop, _tail(res.err))
        return []
    table = []
    for line in res.out.splitlines():
        cols = line.split()
        if len(cols) < 3 or (len(cols) > 3 and cols[3].lower() in _EXTENDED_TYPES):
            continue
        with contextlib.suppress(ValueError):
            table.append((int(cols[0]), int(cols[1]), int(cols[2])))
    return table


async def _scan(
    loop: str, backing_file: str, extra_loops: list[str], baselines: dict[str, int]
) -> tuple[tuple[Partition, ...], str | None]:
    """Find the filesystems of the exported disk. Partitions come from the kernel
    (``losetup -P``) or, when it found none, from partx, each then attached as its own loop
    device (``--offset``/``--sizelimit``) recorded in ``extra_loops`` for the teardown and
    its read counter in ``baselines``."""
    whole = await _probe(loop)
    if whole.get("TYPE"):
        return (Partition(loop, whole["TYPE"], whole.get("LABEL")),), None
    table = whole.get("PTTYPE")
    devices = _partition_devices(loop)
    if table and not devices:
        for number, start, sectors in await _partition_table(loop):
            res = await run(
                "losetup",
                "--find",
                "--show",
                "--offset",
                str(start * 512),
                "--sizelimit",
                str(sectors * 512),
                backing_file,
                timeout=60.0,
                what=f"losetup (partition {number})",
            )
            dev = res.out.strip()
            extra_loops.append(dev)
            baselines[dev] = _sectors_read(dev)
            devices.append((number, dev))
    parts = []
    for number, dev in devices:
        fields = await _probe(dev)
        if not fields.get("TYPE") and fields.get("PTTYPE"):
            continue  # a container (extended partition), its members are listed themselves
        parts.append(Partition(dev, fields.get("TYPE"), fields.get("LABEL"), number))
    return tuple(parts), table


def _preflight(image: str) -> str:
    """The absolute path of ``image`` once it and ``/dev/fuse`` exist; VerifyError if not. A
    ``json:{...}`` image (a network image, e.g. an RBD snapshot opened read-only) is taken as
    it is."""
    network = image.startswith("json:")
    path = image if network else os.path.abspath(image)
    if not network and not os.path.exists(path):
        raise VerifyError(f"image {image} was deleted behind freezeframe's back")
    if not network and not os.path.isfile(path):
        raise VerifyError(f"image {image} is not a regular file")
    if not os.path.exists("/dev/fuse"):
        raise VerifyError(
            "cannot export images for checking: /dev/fuse is missing",
            hint="load the fuse module (modprobe fuse) or give the container /dev/fuse",
        )
    return path


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _touch(path: str) -> None:
    Path(path).touch()


def _open_log(path: str) -> BinaryIO:
    return open(path, "wb")  # handed to the child, closed by the caller


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        log.warning("could not remove %s", path)


# ---------------------------------------------------------------------------- workspaces

_WORKSPACE_PREFIX = "ff-verify-"
_OWNER_FILE = "owner.json"
#: Devices of the images open in this process -> their workspace (for :func:`mounted`).
_workspace_of: dict[str, str] = {}


def _write_record(workspace: str, **changes: object) -> None:
    """Create or update ``owner.json`` of ``workspace`` (atomically: write, then rename)."""
    path = os.path.join(workspace, _OWNER_FILE)
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        record = {
            "owner": make_owner(),
            "since": datetime.now(UTC).isoformat(),
            "qsd_pid": None,
            "mounts": [],
        }
    if "mount" in changes:
        record["mounts"] = [*record.get("mounts", []), changes.pop("mount")]
    record.update(changes)
    tmp = path + ".tmp"
    try:
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the owner of %s: %s", workspace, exc)


def _loop_backing() -> dict[str, str]:
    """``/dev/loopN`` -> the file it is attached to, for every attached loop device."""
    found = {}
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            backing = (entry / "loop" / "backing_file").read_text().strip()
            found[f"/dev/{entry.name}"] = backing.removesuffix(" (deleted)")
    return found


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _processes_in(mountpoints: Sequence[str]) -> list[int]:
    """PIDs whose working or root directory is in one of ``mountpoints`` (a user check and
    its children left behind by a killed verify)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for link in ("cwd", "root"):
            try:
                target = os.readlink(entry / link)
            except OSError:
                continue
            if any(_inside(target, m) for m in mountpoints):
                pids.append(int(entry.name))
                break
    return pids


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _read_record(workspace: str) -> dict[str, Any]:
    """``owner.json`` of ``workspace``; empty when missing or unreadable."""
    try:
        record = json.loads(Path(workspace, _OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _workspaces_in(top: str) -> list[str]:
    try:
        return sorted(str(p) for p in Path(top).glob(f"{_WORKSPACE_PREFIX}*") if p.is_dir())
    except OSError:
        return []


def _real_paths(paths: list[str]) -> set[str]:
    """Symlinks resolved: /proc/mounts and loop devices show real paths (a symlinked TMPDIR)."""
    return {os.path.realpath(p) for p in paths}


def _real_mkdtemp(prefix: str, directory: str | None) -> str:
    """A new temporary directory, by its real path (see :func:`_real_paths`)."""
    return os.path.realpath(tempfile.mkdtemp(prefix=prefix, dir=directory))


async def _sweep_one(workspace: str) -> bool:
    """Clean one workspace whose owner is dead; True when its directory is gone."""
    loops = [dev for dev, backing in _loop_backing().items() if _inside(backing, workspace)]
    devices = set(loops)
    for dev in loops:
        devices.update(part for _, part in _partition_devices(dev))
    record = _read_record(workspace)
    recorded = [m for m in record.get("mounts", []) if isinstance(m, str)]
    mounts = [t for src, t in _mount_targets() if src in devices]
    mounts += [m for m in recorded if m not in mounts and _is_mounted(m)]
    for pid in _processes_in(mounts):
        log.warning("killing pid %d (%s), left in %s", pid, _cmdline(pid)[:80], workspace)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for target in reversed(mounts):
        await _umount(target)
    for target in recorded:
        if not _is_mounted(target):
            with contextlib.suppress(OSError):
                os.rmdir(target)
    for dev in loops:
        try:
            await run("losetup", "-d", dev, timeout=60.0, what="losetup -d")
        except FreezeframeError as exc:
            log.warning("cannot detach %s: %s", dev, exc)
    qsd = record.get("qsd_pid")
    if isinstance(qsd, int) and qsd > 0 and workspace in _cmdline(qsd):
        log.warning("killing qemu-storage-daemon pid %d of %s", qsd, workspace)
        with contextlib.suppress(OSError):
            os.kill(qsd, signal.SIGKILL)
        for _ in range(100):
            if workspace not in _cmdline(qsd):
                break
            await asyncio.sleep(0.05)
    for _, target in reversed(_mount_targets()):
        if _inside(target, workspace):
            await _umount(target)
    if any(_inside(target, workspace) for _, target in _mount_targets()):
        log.warning("%s still has mounts; left in place", workspace)
        return False
    _remove_dir(workspace)
    return not _exists(workspace)


async def sweep_stale_workspaces(workdir: str | None = None) -> list[str]:
    """Clean the verify workspaces (``ff-verify-*`` in the temporary directory, and in
    ``workdir`` if given) whose owner process is provably dead (killed with SIGKILL, say):
    kill what still runs in their mounts, unmount them (lazily if busy), detach the loop
    devices backed by files inside them, kill their qemu-storage-daemon if that PID still
    runs it (its command line names the workspace), unmount the FUSE export, remove the
    directory. A workspace of a live owner, of another host, or without a readable owner
    record is never touched; one being swept by another process is skipped.

    Returns the workspaces removed. Never raises (what cannot be cleaned is logged).
    """
    tops = _real_paths([tempfile.gettempdir(), *([workdir] if workdir else [])])
    removed = []
    for top in sorted(tops):
        for ws in _workspaces_in(top):
            record_path = os.path.join(ws, _OWNER_FILE)
            try:
                fd = os.open(record_path, os.O_RDONLY)
            except OSError:
                continue  # no record (yet): never guess
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # another process is sweeping it
                record = _read_record(ws)
                try:
                    owner = str(record["owner"])
                    since = datetime.fromisoformat(str(record["since"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if not holder_is_dead(owner, since):
                    continue
                log.warning("cleaning %s, left by %s (dead)", ws, owner)
                try:
                    if await _sweep_one(ws):
                        removed.append(ws)
                except FreezeframeError as exc:
                    log.warning("cannot clean %s: %s", ws, exc)
            finally:
                os.close(fd)
    return removed


# ---------------------------------------------------------------------------- the daemon


class _Export:
    """One qemu-storage-daemon exporting ``overlay`` (backed by the cut image) at ``mountpoint``."""

    def __init__(self, image: str, fmt: str, overlay: str, mountpoint: str, socket: str) -> None:
        self.image = image
        self.fmt = fmt
        self.overlay = overlay
        self.mountpoint = mountpoint
        self.socket = socket
        self.log_path = str(Path(overlay).with_name("qsd.log"))
        self.proc: asyncio.subprocess.Process | None = None

    def argv(self) -> list[str]:
        cut: dict[str, object] = {
            "driver": self.fmt,
            "node-name": "ff-cut",
            "read-only": True,
            "file": {"driver": "file", "filename": self.image, "read-only": True},
        }
        if self.image.startswith("json:"):  # a network image's own options (rbd snapshot=)
            cut = {**json.loads(self.image.removeprefix("json:")), "node-name": "ff-cut",
                   "read-only": True}  # fmt: skip
        top = {
            "driver": "qcow2",
            "node-name": "ff-overlay",
            "file": {"driver": "file", "filename": self.overlay},
            "backing": "ff-cut",
        }
        export = {
            "type": "fuse",
            "id": "ff-export",
            "node-name": "ff-overlay",
            "mountpoint": self.mountpoint,
            "writable": True,
        }
        sock = self.socket.replace(",", ",,")
        return [
            # killed by the kernel when the thread that started it (the event loop's) exits
            require("setpriv", "util-linux"),
            "--pdeathsig",
            "KILL",
            "--",
            require("qemu-storage-daemon"),
            "--blockdev",
            json.dumps(cut),
            "--blockdev",
            json.dumps(top),
            "--export",
            json.dumps(export),
            "--chardev",
            f"socket,id=ff-qmp,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=ff-qmp",
        ]

    def _log_tail(self) -> str:
        try:
            return _tail(Path(self.log_path).read_text(errors="replace"))
        except OSError:
            return ""

    async def start(self) -> None:
        """Start the daemon and wait until its QMP monitor answers and the export exists.

        Raises VerifyError when it exits early or does not come up in time (it is stopped)."""
        argv = self.argv()
        log.debug("start %s", " ".join(argv))
        logf = _open_log(self.log_path)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        finally:
            logf.close()
        _write_record(str(Path(self.overlay).parent), qsd_pid=self.proc.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _QSD_START_TIMEOUT
        client = QMPClient("freezeframe-verify")
        try:
            while True:
                if self.proc.returncode is not None:
                    raise self._start_error(f"exited with {self.proc.returncode}")
                if loop.time() > deadline:
                    raise self._start_error(f"not ready after {_QSD_START_TIMEOUT:g}s")
                if _exists(self.socket):
                    try:
                        await within(client.connect(self.socket), 5.0)
                        break
                    except (QMPError, OSError, TimeoutError):
                        pass
                await asyncio.sleep(0.02)
            exports = await client.execute("query-block-exports")
            if not isinstance(exports, list) or not any(
                isinstance(e, dict) and e.get("id") == "ff-export" for e in exports
            ):
                raise self._start_error("the FUSE export is missing")
        except QMPError as exc:
            raise self._start_error(f"QMP: {exc}") from exc
        finally:
            with contextlib.suppress(QMPError, OSError):
                await client.disconnect()
        log.debug("qemu-storage-daemon pid %d exports %s", self.proc.pid, self.mountpoint)

    def _start_error(self, what: str) -> VerifyError:
        tail = self._log_tail()
        hint = _LOCK_HINT if "lock" in tail else None
        return VerifyError(
            f"cannot export image {self.image} (qemu-storage-daemon {what})"
            + (f": {tail}" if tail else ""),
            hint=hint,
        )

    async def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after a grace period; then make sure the FUSE mount point is
        gone. Never raises."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await within(proc.wait(), _QSD_STOP_TIMEOUT)
            except TimeoutError:
                log.warning("qemu-storage-daemon pid %d ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if _is_mounted(self.mountpoint):
            log.warning("FUSE export %s still mounted; detaching it", self.mountpoint)
            await _umount(self.mountpoint)


# ---------------------------------------------------------------------------- public API


@contextlib.asynccontextmanager
async def open_image(
    image: str, fmt: str = "qcow2", *, workdir: str | None = None
) -> AsyncIterator[ImageView]:
    """Export ``image`` (format ``fmt``) read-only through a throw-away overlay and attach it
    to a loop device with partition scanning; yield an :class:`ImageView`.

    The image is opened read-only as the backing file of a qcow2 overlay in a temporary
    directory (under ``workdir`` if given); it is never written. On exit -- normal, error or
    cancellation -- mounts left on the loop device are unmounted, the loop device detached,
    the daemon stopped by PID, the FUSE mount point removed and the directory deleted.

    Raises VerifyError when the image is missing, not a valid ``fmt`` image (truncated,
    damaged), still open for writing by another process, when ``/dev/fuse`` is missing or the
    export or loop device cannot be set up; DependencyError when a program is missing.
    """
    for program in ("qemu-img", "qemu-storage-daemon", "losetup", "blkid", "partx", "mount"):
        require(program)
    require("setpriv", "util-linux")
    await sweep_stale_workspaces(workdir)
    path = _preflight(image)
    info = await _image_info(path, fmt)
    size = int(info.get("virtual-size", 0))

    tmp = _real_mkdtemp(_WORKSPACE_PREFIX, workdir)
    _write_record(tmp)
    overlay = os.path.join(tmp, "overlay.qcow2")
    export_file = os.path.join(tmp, "disk")
    socket = os.path.join(tmp, "qmp.sock")
    export = _Export(path, fmt, overlay, export_file, socket)
    loop_dev: str | None = None
    extra_loops: list[str] = []
    baselines: dict[str, int] = {}

    async def teardown() -> None:
        loops = [*reversed(extra_loops), *([loop_dev] if loop_dev else [])]
        # a losetup interrupted by a cancellation may have attached a device we never heard of
        loops += [dev for dev in await _loops_on(export_file) if dev not in loops]
        mine = set(loops)
        if loop_dev is not None:
            mine.update(dev for _, dev in _partition_devices(loop_dev))
        for source, target in reversed(_mount_targets()):
            if source in mine:
                log.warning("%s still mounted at %s; unmounting it", source, target)
                await _umount(target)
        for dev in loops:
            try:
                await run("losetup", "-d", dev, timeout=60.0, what="losetup -d")
            except FreezeframeError as exc:
                log.warning("cannot detach %s: %s", dev, exc)
        await export.stop()
        for dev in [d for d, ws in _workspace_of.items() if ws == tmp]:
            del _workspace_of[dev]
        _remove_dir(tmp)

    try:
        if len(socket.encode()) > _SOCKET_PATH_MAX:
            raise VerifyError(
                f"work directory path too long for a unix socket: {tmp}",
                hint="pass a shorter workdir",
            )
        try:
            await run(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                path,
                "-F",
                fmt,
                overlay,
                str(size),
                what="create the throw-away overlay",
            )
        except ToolError as exc:
            raise VerifyError(f"cannot create an overlay on {image}: {exc}") from exc
        _touch(export_file)
        await export.start()
        try:
            res = await run(
                "losetup", "--find", "--show", "-P", export_file, timeout=60.0, what="losetup"
            )
        except ToolError as exc:
            raise VerifyError(f"cannot attach a loop device for {image}: {exc}") from exc
        loop_dev = res.out.strip()
        _workspace_of[loop_dev] = tmp
        baselines[loop_dev] = _sectors_read(loop_dev)
        partitions, table = await _scan(loop_dev, export_file, extra_loops, baselines)
        for part in partitions:
            _workspace_of[part.device] = tmp
        view = ImageView(
            image=image,
            format=fmt,
            device=loop_dev,
            partitions=partitions,
            partition_table=table,
            virtual_size=size,
            loop_devices=(loop_dev, *extra_loops),
            sectors_before=tuple(baselines[d] for d in (loop_dev, *extra_loops)),
        )
        log.debug("%s exported as %s: %s", image, loop_dev, partitions)
        yield view
    finally:
        await _uncancellable(teardown())


def _mount_options(fstype: str, readonly: bool, extra: Sequence[str]) -> str:
    opts = ["ro" if readonly else "rw", "nosuid", "nodev", "noexec"]
    if fstype == "xfs":
        opts.append("nouuid")  # the same filesystem may be mounted elsewhere on this host
    opts.extend(extra)
    return ",".join(opts)


@contextlib.asynccontextmanager
async def mounted(
    target: ImageView | Partition,
    *,
    readonly: bool = True,
    options: Sequence[str] = (),
    workdir: str | None = None,
) -> AsyncIterator[Path]:
    """Mount a filesystem of an open image on a temporary directory; unmount and remove it
    on exit (also on error or cancellation).

    ``target`` is a :class:`Partition` or an :class:`ImageView` with exactly one filesystem.
    The mount is ``nosuid,nodev,noexec`` (and ``nouuid`` for xfs). A read-only mount of a
    filesystem with a dirty journal or log still replays it -- into the throw-away overlay.

    Raises VerifyError when there is no single filesystem to mount or ``mount`` fails (e.g.
    a filesystem type this kernel cannot mount); DependencyError when ``mount`` is missing.
    """
    if isinstance(target, ImageView):
        with_fs = [p for p in target.partitions if p.fstype]
        if len(with_fs) != 1:
            raise VerifyError(
                f"image {target.image} has {len(with_fs)} filesystems; mount one partition"
            )
        part = with_fs[0]
    else:
        part = target
    if not part.fstype:
        raise VerifyError(f"{part.device} has no filesystem to mount")
    mnt = _real_mkdtemp("ff-mnt-", workdir)
    if part.device in _workspace_of:  # for the sweeper, should this process be killed
        _write_record(_workspace_of[part.device], mount=mnt)
    try:
        try:
            await run(
                "mount",
                "-t",
                part.fstype,
                "-o",
                _mount_options(part.fstype, readonly, options),
                part.device,
                mnt,
                timeout=300.0,
                what=f"mount {part.device}",
            )
        except ToolError as exc:
            raise VerifyError(
                f"cannot mount {part.fstype} on {part.device}: {_tail(exc.stderr) or exc}"
            ) from exc
        yield Path(mnt)
    finally:
        # also when mount itself was interrupted after the kernel had mounted
        if _is_mounted(mnt):
            await _uncancellable(_umount(mnt))
        if not _is_mounted(mnt):
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
