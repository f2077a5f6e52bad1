"""Which image each disk of a stopped lab VM boots from: the top of its qcow2 chain.

A snapshot switches a running disk to an overlay ``diskN.ff-<id>.qcow2`` backed by the image
it replaced (see :mod:`freezeframe.hypervisor.qmp`), so after a few snapshots a disk is a
chain ``diskN.qcow2 <- diskN.ff-a.qcow2 <- diskN.ff-b.qcow2`` and every image but the top is
a recorded snapshot's image at the cut: booting from one of them would lose the writes above
it and change that snapshot. :func:`boot_tops` picks the top: the one ``lab_down`` recorded
(checked), else the one file of the directory that chains to the base and backs no other.
It never picks an image that is the backing file of another image in the VM's directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from freezeframe._tools import run
from freezeframe.errors import Action, LabError, Remedy, ToolError
from freezeframe.lab._model import LabDisk

__all__ = ["ImageChain", "boot_tops", "image_chain"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageChain:
    """An image and the images below it, top first (real paths); its virtual size."""

    chain: tuple[Path, ...]
    virtual_size: int

    @property
    def bottom(self) -> Path:
        return self.chain[-1]


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


async def image_chain(path: Path) -> ImageChain:
    """``qemu-img info --backing-chain`` of ``path``.

    Only metadata is read, with ``-U`` (no image lock): a QEMU killed a moment ago may still
    hold its locks while it exits, and the QEMU started next takes its own locks anyway.

    Raises LabError if qemu-img cannot open it or a file of its chain (missing, corrupt),
    DependencyError if qemu-img is missing.
    """
    try:
        res = await run(
            "qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path),
            timeout=60, what=f"qemu-img info {path.name}",
        )  # fmt: skip
        doc = json.loads(res.stdout)
        if not isinstance(doc, list) or not doc:
            raise ValueError("not a non-empty list")
        chain = tuple(_real(str(entry["filename"])) for entry in doc)
        size = int(doc[0]["virtual-size"])
    except ToolError as exc:
        raise LabError(f"cannot read the image chain of {path}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"unexpected qemu-img info output for {path}: {exc}") from exc
    return ImageChain(chain, size)


def _names(paths: Sequence[Path] | set[Path]) -> str:
    return ", ".join(sorted(p.name for p in paths))


def _images(vmdir: Path) -> list[Path]:
    return sorted(p for p in vmdir.glob("*.qcow2") if not p.name.startswith("."))


async def boot_tops(
    name: str, vmdir: Path, disks: Sequence[LabDisk], recorded: Mapping[str, str] | None
) -> tuple[dict[str, Path], dict[str, ImageChain]]:
    """The image each disk (by device) must boot from, and the chain of each base image.

    ``recorded`` is what ``lab_down`` saw on top of each device before stopping QEMU (None
    after an unclean stop). A recorded top is used if it exists, its chain ends at the disk's
    base image and no image in ``vmdir`` is backed by it; without a record the top is the one
    image in ``vmdir`` whose chain ends at the base and which backs no other image.

    Raises LabError naming the files if an image in ``vmdir`` cannot be read, a base image is
    missing, a recorded top fails a check, or the top is not unique.
    """
    purge = "purge the lab VM (deletes the disks and their snapshots)"
    remedy = Remedy(Action.LAB_DOWN, name, {"purge": "yes"})
    chains: dict[Path, ImageChain] = {}
    unreadable: list[str] = []
    for path in _images(vmdir):
        try:
            chains[_real(path)] = await image_chain(path)
        except LabError as exc:
            unreadable.append(exc.message)
    if unreadable:
        raise LabError(
            f"lab VM {name}: cannot tell which image to boot from: {'; '.join(unreadable)}",
            hint=purge,
            remedy=remedy,
        )
    backing = {below for c in chains.values() for below in c.chain[1:]}
    tops: dict[str, Path] = {}
    bases: dict[str, ImageChain] = {}
    for disk in disks:
        base = _real(disk.base_image)
        base_chain = chains.get(base)
        if base_chain is None:
            raise LabError(f"lab VM {name}: {disk.device}: base image {disk.base_image} is missing")
        if len(base_chain.chain) != 1:
            raise LabError(
                f"lab VM {name}: {disk.device}: base image {disk.base_image} has a backing file "
                f"({base_chain.chain[1]})",
                hint=purge,
                remedy=remedy,
            )
        bases[disk.device] = base_chain
        want = recorded.get(disk.device) if recorded is not None else None
        if want is not None:
            top = _real(want)
            if not top.is_file():
                raise LabError(
                    f"lab VM {name}: {disk.device}: the image it ran on, {want}, is missing",
                    hint=purge,
                    remedy=remedy,
                )
            chain = chains.get(top) or await image_chain(top)
            if chain.bottom != base:
                raise LabError(
                    f"lab VM {name}: {disk.device}: the image it ran on, {want}, does not "
                    f"chain back to {disk.base_image} (its chain: {_names(chain.chain)})",
                    hint=purge,
                    remedy=remedy,
                )
            if top in backing:
                # A snapshot raced lab_down, or an interrupted one left an (empty) overlay:
                # the one image above it keeps everything it holds; several: refuse.
                above = [p for p, c in chains.items() if top in c.chain[1:] and p not in backing]
                if len(above) != 1:
                    raise LabError(
                        f"lab VM {name}: {disk.device}: the image it ran on, {top.name}, is the "
                        f"backing file of other images and the top above it is ambiguous: "
                        f"candidates {_names(above) or '(none)'}",
                        hint=f"delete the leftover of an interrupted snapshot, or {purge}",
                        remedy=remedy,
                    )
                log.warning(
                    "lab %s: %s: %s (recorded) now backs %s: booting that",
                    name, disk.device, top.name, above[0].name,
                )  # fmt: skip
                top = above[0]
        else:
            leaves = [p for p, c in chains.items() if c.bottom == base and p not in backing]
            if len(leaves) != 1:
                raise LabError(
                    f"lab VM {name}: {disk.device}: it was not stopped cleanly and the top of "
                    f"its image chain is ambiguous: candidates {_names(leaves) or '(none)'}",
                    hint=purge,
                    remedy=remedy,
                )
            top = leaves[0]
        if top != base:
            log.info("lab %s: %s boots from %s", name, disk.device, top)
        tops[disk.device] = top
    return tops, bases
