"""``lab_up(..., images=[(path, format), ...])``: a new lab VM booted on given image files
(an exported snapshot) is checked before anything is built or started."""

from __future__ import annotations

from pathlib import Path

import pytest

from freezeframe.errors import NotFoundError, UsageError
from freezeframe.lab import lab_up


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    return tmp_path


async def test_images_need_one_filesystem_each(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    img.write_bytes(b"")
    with pytest.raises(UsageError):
        await lab_up("x1", images=[(img, "qcow2")])
    with pytest.raises(UsageError):
        await lab_up("x1", disks=("ext4", "xfs"), images=[(img, "qcow2")])


async def test_bad_format_rbd_and_missing_files_are_refused(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    img.write_bytes(b"")
    with pytest.raises(UsageError):
        await lab_up("x1", disks=("ext4",), images=[(img, "vmdk")])
    with pytest.raises(UsageError):
        await lab_up("x1", disks=("ext4",), images=[(img, "qcow2")], rbd=True)
    with pytest.raises(NotFoundError) as err:
        await lab_up("x1", disks=("ext4",), images=[(tmp_path / "gone.qcow2", "qcow2")])
    assert err.value.code == "image-not-found"
    assert not (tmp_path / "home" / "lab" / "x1").exists()
