"""Exports of real qcow2 chains (freezeframe.storage.export): standalone images that read what
the image at the cut read, all or nothing, never overwriting, never touching the source chain."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.unit._chains import (
    MIB,
    SIZE_MIB,
    backing_of,
    held_open,
    make_chain,
    needs_qemu_img,
    qemu_img_check,
    read_blocks,
    views,
)

from freezeframe.errors import AlreadyExistsError, NotFoundError, ToolError, UsageError
from freezeframe.models import ConsistencyLevel, VerifyVerdict
from freezeframe.storage import export as export_mod
from freezeframe.storage._qemu_img import check_image as real_check_image
from freezeframe.storage._qemu_img import parse_progress
from freezeframe.storage.export import (
    ExportDisk,
    ExportProgress,
    export_snapshot_images,
    write_metadata,
)

V = views()


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def fingerprints(chain_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(chain_dir.glob("*.qcow2"))
    }


def test_parse_progress() -> None:
    assert parse_progress(b"    (0.00/100%)\r    (6.25/100%)\r    (12") == (
        [0.0, 6.25],
        b"\r    (12",
    )
    assert parse_progress(b"(100.00/100%)\r\n") == ([100.0], b"\r\n")
    assert parse_progress(b"nothing") == ([], b"nothing")


@needs_qemu_img
async def test_export_two_disks_with_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    c = make_chain(src)
    before = fingerprints(src)
    out = tmp_path / "out" / "deeper"  # created
    seen: list[ExportProgress] = []
    meta = {
        "vm": "web1",
        "snapshot": "abc123",
        "taken_at": "2026-12-06T10:00:00+00:00",
        "level": ConsistencyLevel.FILESYSTEM,
        "level_reason": "every filesystem frozen",
        "verification": VerifyVerdict.CONSISTENT,
        "disks": {"vda": c.path("l2"), "vdb": c.path("l1")},
    }
    res = await export_snapshot_images(
        [ExportDisk("vda", c.path("l2"), "qcow2"), ExportDisk("vdb", c.path("l1"), "qcow2")],
        out,
        progress=seen.append,
        metadata=meta,
    )
    assert listing(out) == ["metadata.json", "vda.qcow2", "vdb.qcow2"]
    for dev, layer in (("vda", "l2"), ("vdb", "l1")):
        img = str(out / f"{dev}.qcow2")
        assert backing_of(img) is None
        qemu_img_check(img)
        assert read_blocks(img, "qcow2", tmp_path) == V[layer]
    assert [i.device for i in res.images] == ["vda", "vdb"]
    assert res.virtual_bytes == 2 * SIZE_MIB * MIB
    assert res.metadata_path == str(out / "metadata.json")
    doc = json.loads((out / "metadata.json").read_text())
    assert doc["vm"] == "web1"
    assert doc["level"] == "filesystem"
    assert doc["verification"] == "verified-consistent"
    assert doc["export"]["format"] == "qcow2"
    assert doc["export"]["compressed"] is False
    assert [(i["device"], i["file"]) for i in doc["export"]["images"]] == [
        ("vda", "vda.qcow2"),
        ("vdb", "vdb.qcow2"),
    ]
    # progress: monotonic, over both disks, ends at the total
    assert seen[-1].done == seen[-1].total == res.virtual_bytes
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert {p.device for p in seen} == {"vda", "vdb"}
    # the source chain was not written
    assert fingerprints(src) == before


@needs_qemu_img
async def test_raw_and_compressed(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    raw = await export_snapshot_images(
        [ExportDisk("vda", c.path("top"), "qcow2")], tmp_path / "raw", fmt="raw", metadata=None
    )
    img = raw.images[0].path
    assert img.endswith("vda.raw")
    assert os.path.getsize(img) == SIZE_MIB * MIB
    assert read_blocks(img, "raw", tmp_path) == V["top"]
    assert raw.metadata_path is None
    assert listing(tmp_path / "raw") == ["vda.raw"]
    plain = await export_snapshot_images(
        [ExportDisk("vda", c.path("top"), "qcow2")], tmp_path / "plain", metadata={}
    )
    small = await export_snapshot_images(
        [ExportDisk("vda", c.path("top"), "qcow2")], tmp_path / "zip", compress=True, metadata={}
    )
    assert read_blocks(small.images[0].path, "qcow2", tmp_path) == V["top"]
    # uniform patterns compress to almost nothing
    assert small.images[0].file_size < plain.images[0].file_size / 4
    assert json.loads((tmp_path / "zip" / "metadata.json").read_text())["export"]["compressed"]


@needs_qemu_img
async def test_export_of_a_backing_file_a_running_process_holds(tmp_path: Path) -> None:
    """The image at the cut is a read-only backing file of the VM's active overlay: exported
    while a process writes to the overlay."""
    c = make_chain(tmp_path)
    with held_open(c.path("top")):
        res = await export_snapshot_images(
            [ExportDisk("vda", c.path("l2"), "qcow2")], tmp_path / "out", metadata={}
        )
    assert read_blocks(res.images[0].path, "qcow2", tmp_path) == V["l2"]


@needs_qemu_img
async def test_an_image_being_written_is_refused(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    with held_open(c.path("top")), pytest.raises(ToolError) as err:
        await export_snapshot_images(
            [ExportDisk("vda", c.path("top"), "qcow2")], tmp_path / "out", metadata={}
        )
    assert err.value.code == "image-in-use"
    assert err.value.hint
    assert listing(tmp_path / "out") == []


@needs_qemu_img
async def test_never_overwrites(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vdb.qcow2").write_text("mine")
    disks = [ExportDisk("vda", c.path("l1"), "qcow2"), ExportDisk("vdb", c.path("l2"), "qcow2")]
    with pytest.raises(AlreadyExistsError) as err:
        await export_snapshot_images(disks, out, metadata={})
    assert err.value.code == "export-target-exists"
    assert listing(out) == ["vdb.qcow2"]
    assert (out / "vdb.qcow2").read_text() == "mine"
    (out / "vdb.qcow2").unlink()
    (out / "metadata.json").write_text("{}")
    with pytest.raises(AlreadyExistsError):
        await export_snapshot_images(disks, out, metadata={"vm": "x"})
    assert listing(out) == ["metadata.json"]
    # a prefix avoids the clash
    res = await export_snapshot_images(
        disks, out, metadata={"vm": "x"}, prefix="s1-", metadata_name="s1.json"
    )
    assert listing(out) == ["metadata.json", "s1-vda.qcow2", "s1-vdb.qcow2", "s1.json"]
    assert len(res.images) == 2


@needs_qemu_img
async def test_a_file_appearing_during_the_export_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final names are taken with link(): a file created meanwhile wins, the export is
    undone (nothing of it left)."""
    c = make_chain(tmp_path)
    out = tmp_path / "out"
    real = real_check_image

    async def sneaky(path: str, fmt: str = "qcow2", **kw: float) -> None:
        await real(path, fmt)
        if not (out / "vdb.qcow2").exists() and "vdb" in path:
            (out / "vdb.qcow2").write_text("someone else's")

    monkeypatch.setattr(export_mod, "check_image", sneaky)
    disks = [ExportDisk("vda", c.path("l1"), "qcow2"), ExportDisk("vdb", c.path("l2"), "qcow2")]
    with pytest.raises(AlreadyExistsError):
        await export_snapshot_images(disks, out, metadata={})
    assert listing(out) == ["vdb.qcow2"]
    assert (out / "vdb.qcow2").read_text() == "someone else's"


@needs_qemu_img
async def test_a_failing_disk_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make_chain(tmp_path)
    out = tmp_path / "out"
    calls = 0

    async def failing(path: str, fmt: str = "qcow2", **kw: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ToolError("damaged", code="image-check-failed")

    monkeypatch.setattr(export_mod, "check_image", failing)
    disks = [ExportDisk("vda", c.path("l1"), "qcow2"), ExportDisk("vdb", c.path("l2"), "qcow2")]
    with pytest.raises(ToolError) as err:
        await export_snapshot_images(disks, out, metadata={})
    assert err.value.code == "image-check-failed"
    assert listing(out) == []


@needs_qemu_img
async def test_cancellation_leaves_nothing_and_no_process(tmp_path: Path) -> None:
    img = str(tmp_path / "big.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512M", img],
                   check=True, capture_output=True)  # fmt: skip
    out = tmp_path / "out"
    started = asyncio.Event()

    def on_progress(p: ExportProgress) -> None:
        if p.done > 0:
            started.set()

    task = asyncio.create_task(
        export_snapshot_images(
            [ExportDisk("vda", img, "qcow2")], out, compress=True, progress=on_progress
        )
    )
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listing(out) == []
    ps = subprocess.run(["pgrep", "-f", f"qemu-img convert .*{img}"], capture_output=True)
    assert ps.returncode == 1, ps.stdout


@needs_qemu_img
async def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    out = tmp_path / "out"
    d = ExportDisk("vda", c.path("l1"), "qcow2")
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"disks": [d], "fmt": "vmdk"}, UsageError, "invalid-argument"),
        ({"disks": [d], "fmt": "raw", "compress": True}, UsageError, "invalid-argument"),
        ({"disks": []}, UsageError, "invalid-argument"),
        ({"disks": [d, ExportDisk("vda", c.path("l2"), "qcow2")]}, UsageError, "invalid-argument"),
        ({"disks": [ExportDisk("vda", "rbd:pool/img@s", "raw")]}, UsageError,
         "export-backend-unsupported"),
        ({"disks": [ExportDisk("vda", c.path("l1"), "vmdk")]}, UsageError,
         "export-backend-unsupported"),
        ({"disks": [ExportDisk("vda", str(tmp_path / "gone.qcow2"), "qcow2")]}, NotFoundError,
         "image-not-found"),
        ({"disks": [ExportDisk("vda", c.path("l1"), "qcow2", name="../x")]}, UsageError,
         "invalid-argument"),
        ({"disks": [d], "metadata": {"export": 1}}, UsageError, "invalid-argument"),
        ({"disks": [d], "metadata_name": "vda.qcow2"}, UsageError, "invalid-argument"),
    ]  # fmt: skip
    for kwargs, exc, code in cases:
        disks = kwargs.pop("disks")
        kwargs.setdefault("metadata", {})
        with pytest.raises(exc) as err:
            await export_snapshot_images(disks, out, **kwargs)  # type: ignore[arg-type]
        assert getattr(err.value, "code", None) == code, kwargs
    assert listing(out) == []


def test_write_metadata(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    write_metadata(p, {"a": (1, 2), "path": tmp_path, "level": ConsistencyLevel.CRASH})
    assert json.loads(p.read_text()) == {"a": [1, 2], "path": str(tmp_path), "level": "crash"}
    with pytest.raises(AlreadyExistsError):
        write_metadata(p, {"b": 1})
    with pytest.raises(UsageError):
        write_metadata(tmp_path / "n.json", {"x": object()})
    assert listing(tmp_path) == ["m.json"]
