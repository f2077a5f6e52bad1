"""Running external programs (qemu-img, mkfs, e2fsck, losetup, ...) from asyncio.

Owns the translation of process failures into :mod:`freezeframe.errors`: a missing program is
a :class:`~freezeframe.errors.DependencyError` naming the Debian package that ships it, a
non-zero exit a :class:`~freezeframe.errors.ToolError` carrying argv, return code and stderr,
a program that cannot be started or a timeout (the process killed first) a ToolError too.
Never uses a shell.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass

from freezeframe._aio import within
from freezeframe.errors import DependencyError, ToolError

__all__ = ["PACKAGE_OF", "ToolResult", "require", "run"]

log = logging.getLogger(__name__)

#: Which Debian package provides a program freezeframe runs.
PACKAGE_OF: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-ga": "qemu-guest-agent",
    "busybox": "busybox-static",
    "mkfs.ext4": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "modprobe": "kmod",
    "depmod": "kmod",
    "cpio": "cpio",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "blkid": "util-linux",
    "partx": "util-linux",
    "apt-get": "apt",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "fusermount3": "fuse3",
}


@dataclass(frozen=True, slots=True)
class ToolResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def require(program: str, package: str | None = None) -> str:
    """Absolute path of ``program`` on PATH (also /usr/sbin, /sbin).

    Raises DependencyError naming the Debian package (``package``, else :data:`PACKAGE_OF`)
    when it is missing.
    """
    found = shutil.which(program) or shutil.which(
        program, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
    )
    if not found:
        pkg = package or PACKAGE_OF.get(program, program)
        raise DependencyError(f"{program} is not installed", package=pkg)
    return found


async def run(
    *argv: str,
    timeout: float = 120.0,
    check: bool = True,
    input: bytes | None = None,
    what: str | None = None,
    cwd: str | None = None,
) -> ToolResult:
    """Run ``argv`` (argv[0] looked up with :func:`require`), wait at most ``timeout`` seconds.

    Raises DependencyError if the program is missing; ToolError when it cannot be started
    (not executable, bad format, missing ``cwd``, a NUL byte in an argument; the OSError or
    ValueError is its cause), on timeout (the process is killed first) or, with ``check``, on
    a non-zero exit. ``what`` names the step in messages; ``cwd`` is the working directory of
    the program.
    """
    exe = require(argv[0])
    full = (exe, *argv[1:])
    log.debug("run %s", " ".join(full))
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )
    except (OSError, ValueError) as exc:  # EACCES, ENOEXEC, missing cwd, NUL in an argument
        raise ToolError(f"{what or argv[0]}: cannot start {exe}: {exc}", argv=tuple(full)) from exc
    try:
        out, err = await within(proc.communicate(input), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise ToolError(
            f"{what or argv[0]}: timed out after {timeout:g}s", argv=tuple(full)
        ) from exc
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    rc = proc.returncode if proc.returncode is not None else -1
    result = ToolResult(tuple(full), rc, out, err)
    if check and rc != 0:
        tail = result.err.strip().splitlines()[-3:]
        raise ToolError(
            f"{what or argv[0]} failed (exit {rc}): {' | '.join(tail) or 'no output'}",
            argv=tuple(full),
            returncode=rc,
            stderr=result.err,
        )
    return result
