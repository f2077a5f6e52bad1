"""A full catalog filesystem is named as such, never as "disk I/O error" (issue 12, item 6).

The filesystem tests mount a small tmpfs (root only) and fill it; the others feed the
translation the errors SQLite gives, with the free space faked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from freezeframe.catalog import FILESYSTEM_FULL, Catalog, CatalogFullError
from freezeframe.catalog._full import filesystem_full_error
from freezeframe.errors import CatalogError
from freezeframe.models import VmConfig

#: About a SQLite file's filesystem filling up: no PostgreSQL counterpart (a server's disk is
#: the server's business, reported through its own errors).
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> None:
    """Write a file into ``directory`` until its filesystem has no byte left."""
    with contextlib.suppress(OSError), (directory / "filler").open("wb", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    assert os.statvfs(directory).f_bfree == 0


def _assert_full(err: CatalogError, file: Path) -> None:
    assert isinstance(err, CatalogFullError)
    assert err.reason == FILESYSTEM_FULL
    assert err.path == file
    assert err.free_bytes is not None
    assert err.free_bytes < 64 * 1024
    assert err.exit_code == 8
    assert f"the filesystem holding the catalog {file} is full" in err.message
    assert err.hint is not None
    assert str(file.parent) in err.hint


async def test_writes_to_a_catalog_on_a_full_filesystem_say_it_is_full(small_fs: Path) -> None:
    file = small_fs / "cat.sqlite"
    cat = await Catalog.open(f"sqlite:///{file}")
    try:
        await cat.add_vm(VmConfig(name="before"))
        _fill(small_fs)
        mounts = tuple(f"/mnt/{'x' * 200}{i}" for i in range(50))
        failed: CatalogError | None = None
        for i in range(1000):  # until a page or the WAL cannot grow
            try:
                await cat.add_vm(VmConfig(name=f"vm{i}", exclude_mounts=mounts))
            except CatalogError as exc:
                failed = exc
                break
        assert failed is not None
        _assert_full(failed, file)
        # Once space is freed the catalog works again and nothing before the failure is lost.
        (small_fs / "filler").unlink()
        await cat.add_vm(VmConfig(name="after"))
        names = {v.name for v in await cat.list_vms()}
        assert {"before", "after"} <= names
    finally:
        await cat.close()


async def test_creating_a_catalog_on_a_full_filesystem_says_it_is_full(small_fs: Path) -> None:
    _fill(small_fs)
    file = small_fs / "cat.sqlite"
    with pytest.raises(CatalogError) as info:
        await Catalog.open(f"sqlite:///{file}")
    _assert_full(info.value, file)
    assert info.value.message.startswith(f"cannot create catalog {file}: ")
    assert not file.exists()


def _statvfs_with(free: int) -> object:
    return lambda _path: SimpleNamespace(f_bfree=free // 4096, f_bavail=free // 4096, f_frsize=4096)


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    err = sqlite3.OperationalError(message)
    err.sqlite_errorcode = code
    return err


def _wrapped(err: BaseException) -> OperationalError:
    return OperationalError("INSERT ...", {}, err)


@pytest.mark.parametrize(
    ("error", "free", "full"),
    [
        # "database or disk is full" is always the full filesystem, whatever statvfs says
        (_sqlite_error("database or disk is full", sqlite3.SQLITE_FULL), 10 << 30, True),
        # ENOSPC from a file operation (creating the catalog)
        (OSError(errno.ENOSPC, "No space left on device"), 10 << 30, True),
        # "disk I/O error" (SQLITE_IOERR_WRITE) on a filesystem with no room left
        (_sqlite_error("disk I/O error", 778), 8192, True),
        # ... but not on one with room: that is a real I/O error, kept as it was
        (_sqlite_error("disk I/O error", 778), 10 << 30, False),
        # anything else is not about space
        (_sqlite_error("database is locked", sqlite3.SQLITE_BUSY), 0, False),
    ],
)
def test_translation(
    error: BaseException, free: int, full: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "statvfs", _statvfs_with(free))
    file = tmp_path / "cat.sqlite"
    for exc in (error, _wrapped(error)):
        got = filesystem_full_error(f"catalog {file}", exc, file)
        if not full:
            assert got is None
            continue
        assert got is not None
        assert (got.reason, got.path, got.free_bytes) == (FILESYSTEM_FULL, file, free)
        assert got.message.startswith(
            f"catalog {file}: the filesystem holding the catalog {file} is full ({free} bytes "
            f"free in {tmp_path})"
        )
    # not a local file (a server database): never a filesystem question
    assert filesystem_full_error("catalog x", error, None) is None
