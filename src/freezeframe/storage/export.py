"""Export a snapshot's disk images as standalone images (no backing file), plus a metadata file.

Design notes:
1. One ``qemu-img convert`` per disk reads the image at the cut *through its backing chain*
   and writes a standalone qcow2 (optionally ``-c`` compressed) or raw image; ``-f`` is always
   given (the format is never probed).
2. The source is opened read-only with qemu-img's normal shared lock and never with
   ``-U``/force-share: an image at the cut is only a read-only backing file of the running VM,
   which QEMU shares with readers; an image someone writes to (the VM's active overlay, or the
   base of a merge in progress) is refused with ``image-in-use`` instead of being copied while
   it changes. Nothing in the chain is opened for writing.
3. All or nothing: every image is written under a hidden temporary name (``.NAME.part-XXXX``)
   in the target directory, synced, checked (``qemu-img check``, no backing file), and only
   when every disk is done linked to its final name with ``link`` (fails if the name exists:
   never overwrites, even against a racing writer); the metadata file is written last the
   same way, so its presence marks a complete export. On error or cancellation every
   temporary (and any final name this call already linked) is removed.
4. Progress: qemu-img's ``-p`` percentages scaled to each disk's virtual size, summed over
   disks, delivered as :class:`ExportProgress` (bytes done / total).
5. The metadata is a plain mapping the caller builds (VM, time, level and why, verdict, disk
   mapping); this module adds an ``export`` section (format, compression, files) and writes it
   as JSON. It does not depend on the catalog or the record models.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from freezeframe._aio import shielded
from freezeframe.errors import AlreadyExistsError, NotFoundError, ToolError, UsageError
from freezeframe.storage._qemu_img import check_image, image_chain, run_qemu_img

__all__ = [
    "FORMATS",
    "ExportDisk",
    "ExportProgress",
    "ExportResult",
    "ExportedImage",
    "export_snapshot_images",
    "write_metadata",
]

log = logging.getLogger(__name__)

#: Output formats.
FORMATS = ("qcow2", "raw")
_SOURCE_FORMATS = frozenset({"qcow2", "raw"})
METADATA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ExportDisk:
    """One disk to export: ``image`` (the image at the cut, a local file) in ``format``;
    ``name`` the output file name (default ``PREFIX + device + .qcow2/.raw``)."""

    device: str
    image: str
    format: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ExportProgress:
    """Bytes (of the disks' virtual size) done out of ``total``, over all disks; ``device``
    is the disk being copied."""

    device: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class ExportedImage:
    device: str
    source: str
    path: str
    format: str
    virtual_size: int
    file_size: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ExportResult:
    directory: str
    images: tuple[ExportedImage, ...]
    metadata_path: str | None
    virtual_bytes: int
    seconds: float


def _json_default(value: object) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_no_replace(tmp: str, final: str) -> None:
    """Give ``tmp`` the name ``final`` unless ``final`` exists (atomic: ``link``)."""
    try:
        os.link(tmp, final)
    except FileExistsError as exc:
        raise AlreadyExistsError(
            f"{final} already exists: an export never overwrites a file",
            code="export-target-exists",
        ) from exc


def write_metadata(path: str | os.PathLike[str], data: Mapping[str, Any]) -> str:
    """Write ``data`` as JSON to ``path`` atomically, never replacing an existing file
    (datetimes, enums, paths, tuples converted). Returns the path.

    Raises AlreadyExistsError (``export-target-exists``), UsageError (not serializable),
    ToolError (``metadata-write-failed``: the filesystem refused)."""
    final = os.fspath(path)
    try:
        text = json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the export metadata is not JSON: {exc}") from exc
    directory = os.path.dirname(final) or "."
    tmp = os.path.join(directory, f".{os.path.basename(final)}.part-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_no_replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        raise ToolError(
            f"cannot write {final}: {exc.strerror or exc}",
            code="no-space" if exc.errno == errno.ENOSPC else "metadata-write-failed",
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final


def _prepare_dir(
    target: str, names: Sequence[str], metadata_name: str | None
) -> tuple[str, list[str], str | None]:
    """Create the target directory if needed; refuse names that exist already."""
    directory = os.path.abspath(target)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use {directory} as the export directory: {exc}") from exc
    finals = [os.path.join(directory, n) for n in names]
    meta_final = os.path.join(directory, metadata_name) if metadata_name is not None else None
    for f in [*finals, *([meta_final] if meta_final else [])]:
        if os.path.lexists(f):
            raise AlreadyExistsError(
                f"{f} already exists: an export never overwrites a file",
                code="export-target-exists",
            )
    return directory, finals, meta_final


def _output_name(disk: ExportDisk, prefix: str, fmt: str) -> str:
    name = disk.name or f"{prefix}{disk.device}.{fmt}"
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"not a usable file name for disk {disk.device}: {name!r}")
    return name


def _source(d: ExportDisk) -> str:
    """How qemu-img opens ``d``: its file, or for a ``json:`` protocol source (an RBD
    snapshot: ``{"driver": "rbd", ...}``) that source under the format driver (``raw``),
    which qemu-img's ``-f`` alone does not put on top of a json: protocol node."""
    if not d.image.startswith("json:"):
        return d.image
    inner = json.loads(d.image[len("json:") :])
    if inner.get("driver") == d.format:
        return d.image
    return "json:" + json.dumps({"driver": d.format, "file": inner}, separators=(",", ":"))


def _validate(
    disks: Sequence[ExportDisk], fmt: str, compress: bool, prefix: str, metadata_name: str | None
) -> list[str]:
    if fmt not in FORMATS:
        raise UsageError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if compress and fmt != "qcow2":
        raise UsageError("only a qcow2 export can be compressed")
    if not disks:
        raise UsageError("nothing to export: the snapshot has no disk images")
    names = [_output_name(d, prefix, fmt) for d in disks]
    if metadata_name is not None:
        names_all = [*names, metadata_name]
        if "/" in metadata_name or metadata_name.startswith(".") or not metadata_name:
            raise UsageError(f"not a usable metadata file name: {metadata_name!r}")
    else:
        names_all = names
    if len(set(names_all)) != len(names_all):
        raise UsageError("two exported files would have the same name")
    if len({d.device for d in disks}) != len(disks):
        raise UsageError("a disk is listed twice")
    for d in disks:
        if d.format not in _SOURCE_FORMATS:
            raise UsageError(
                f"disk {d.device}: cannot export a {d.format!r} image (qcow2 or raw files only)",
                code="export-backend-unsupported",
            )
        if d.image.startswith("json:") and d.format == "raw":
            continue  # a block driver's own source (an RBD snapshot), read-only
        if not d.image.startswith("/"):
            raise UsageError(
                f"disk {d.device}: {d.image} is not a local file nor a json: source",
                code="export-backend-unsupported",
            )
        if not os.path.isfile(d.image):
            raise NotFoundError(
                f"disk {d.device}: image {d.image} does not exist", code="image-not-found"
            )
    return names


async def export_snapshot_images(
    disks: Sequence[ExportDisk],
    target_dir: str | os.PathLike[str],
    *,
    fmt: str = "qcow2",
    compress: bool = False,
    progress: Callable[[ExportProgress], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    metadata_name: str = "metadata.json",
    prefix: str = "",
    timeout: float | None = None,
) -> ExportResult:
    """Export every disk of ``disks`` to ``target_dir`` (created if missing) as one standalone
    image each, then the metadata file (``metadata`` plus an ``export`` section) unless
    ``metadata`` is None. See the module notes for the guarantees.

    ``timeout`` bounds each disk's copy (seconds, None: unbounded).

    Raises UsageError (bad format/name, compression of raw, a non-file image; code
    ``export-backend-unsupported`` for an image that is no local qcow2/raw file),
    NotFoundError (``image-not-found``), AlreadyExistsError (``export-target-exists``: an
    output name exists; checked before anything is copied, and again atomically at the end),
    DependencyError (no qemu-img), ToolError (``image-in-use``: a source is being written by
    another process; ``no-space``; ``image-check-failed``; ``export-failed``). Nothing is left
    in ``target_dir`` by a failed or cancelled call.
    """
    started = time.monotonic()
    names = _validate(disks, fmt, compress, prefix, metadata_name if metadata is not None else None)
    if metadata is not None and "export" in metadata:
        raise UsageError("the metadata must not have an 'export' key (this module adds it)")
    directory, finals, meta_final = _prepare_dir(
        os.fspath(target_dir), names, metadata_name if metadata is not None else None
    )

    # sizes first (also refuses an image in use before anything is written)
    sizes = []
    for d in disks:
        chain = await image_chain(_source(d), d.format)
        sizes.append(chain[0].virtual_size)
    total = sum(sizes)
    token = secrets.token_hex(4)
    temps = [os.path.join(directory, f".{n}.part-{token}") for n in names]
    linked: list[str] = []
    done_before = 0
    images: list[ExportedImage] = []

    def report(device: str, done: int) -> None:
        if progress is not None:
            progress(ExportProgress(device, min(done, total), total))

    try:
        for d, tmp, final, size in zip(disks, temps, finals, sizes, strict=True):
            t0 = time.monotonic()
            report(d.device, done_before)
            base = done_before
            args = ["convert", "-p", "-f", d.format, "-O", fmt]
            if compress:
                args.append("-c")

            def on_percent(pct: float, dev: str = d.device, b: int = base, n: int = size) -> None:
                report(dev, b + int(n * pct / 100.0))

            await run_qemu_img(
                *args,
                _source(d),
                tmp,
                on_percent=on_percent,
                timeout=timeout,
                what=f"qemu-img convert {d.image}",
                code="export-failed",
            )
            await asyncio.to_thread(_fsync_file, tmp)
            out = await image_chain(tmp, fmt)
            if len(out) != 1 or out[0].backing:
                raise ToolError(
                    f"the export of {d.image} still has a backing file", code="export-failed"
                )
            await check_image(tmp, fmt)
            done_before += size
            report(d.device, done_before)
            images.append(
                ExportedImage(
                    device=d.device,
                    source=d.image,
                    path=final,
                    format=fmt,
                    virtual_size=size,
                    file_size=os.stat(tmp).st_size,
                    seconds=time.monotonic() - t0,
                )
            )
        for tmp, final in zip(temps, finals, strict=True):
            _link_no_replace(tmp, final)
            linked.append(final)
        _fsync_dir(directory)
        meta_path = None
        if metadata is not None and meta_final is not None:
            doc = {
                **metadata,
                "export": {
                    "version": METADATA_VERSION,
                    "exported_at": datetime.now(UTC),
                    "format": fmt,
                    "compressed": compress,
                    "images": [
                        {
                            "device": i.device,
                            "file": os.path.basename(i.path),
                            "format": i.format,
                            "virtual_size": i.virtual_size,
                            "file_size": i.file_size,
                            "source": i.source,
                        }
                        for i in images
                    ],
                },
            }
            meta_path = write_metadata(meta_final, doc)
    except BaseException:
        await shielded(asyncio.to_thread(_remove_all, [*temps, *linked]))
        raise
    finally:
        await shielded(asyncio.to_thread(_remove_all, temps))
    seconds = time.monotonic() - started
    log.info(
        "exported %d disk(s) (%d bytes) to %s in %.1f s", len(images), total, directory, seconds
    )
    return ExportResult(directory, tuple(images), meta_path, total, seconds)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_all(paths: Sequence[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", p, exc)
