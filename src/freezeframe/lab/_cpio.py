"""A writer for the ``newc`` cpio format the Linux kernel unpacks as an initramfs.

Writing the archive in Python (instead of running ``cpio`` over a staging tree) lets the lab
put device nodes (``/dev/console``) into it without ``mknod`` on the host, and makes the
result byte-for-byte reproducible (fixed owners and mtimes, entries in insertion order).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["CpioWriter"]

_MAGIC = b"070701"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Append entries to a newc archive open for writing; :meth:`close` writes the trailer.

    Missing parent directories are added (mode 0755) before an entry; adding a directory
    twice is a no-op, any other duplicate name a ValueError.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            if stat.S_ISDIR(mode) and name in self._dirs:
                return
            raise ValueError(f"duplicate cpio entry {name!r}")
        if "/" in name:
            self._entry(name.rsplit("/", 1)[0], stat.S_IFDIR | 0o755)
        self._names.add(name)
        if stat.S_ISDIR(mode):
            self._dirs.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
