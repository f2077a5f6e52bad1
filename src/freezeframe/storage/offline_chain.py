"""Merging qcow2 chain layers while nothing runs on them (the VM stopped): the offline half of
``snapshot delete``.

Design notes:
1. Chains are ``base <- ... <- layer <- upper <- ... <- top``; a snapshot's data is the view
   of the image it recorded at its cut (that image read through its backing chain). Deleting
   a snapshot removes one layer without changing the view of any other image that stays.
2. :func:`commit_into_backing` (``qemu-img commit -d``): ``upper``'s clusters are written
   into its backing file ``layer``, so ``layer`` then reads what ``upper`` read (the snapshot
   that recorded ``layer`` is gone, the one that recorded ``upper`` now lives in ``layer``);
   the image above ``upper`` (if any) is then re-pointed at ``layer`` with an unsafe rebase
   (``rebase -u``: same view, only the pointer changes). Cost: ``upper``'s allocated data.
3. :func:`rebase_onto` (safe ``qemu-img rebase``): an image keeps its view while its backing
   file changes to an ancestor (or to none: flattened); QEMU copies only the clusters that
   differ. Removes the layers between without renaming anything the upper records name.
4. At every step each image that is still referenced reads what it read before (commit -d
   never empties ``upper``; the pointer moves only after the data is in place), so a crash
   between steps leaves a valid chain; which file to delete afterwards is the caller's
   decision (and its write-ahead record's), never done here.
5. Every changed image is checked with ``qemu-img check`` afterwards. qemu-img takes write
   locks: an image a running QEMU has open fails with ToolError ``image-in-use`` and is not
   touched. Progress comes from ``-p`` as bytes of the virtual disk (done, total).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from freezeframe.errors import UsageError
from freezeframe.storage._qemu_img import Layer, check_image, image_chain, run_qemu_img

__all__ = [
    "ChainProgress",
    "backing_chain",
    "commit_into_backing",
    "rebase_onto",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChainProgress:
    """``step`` (``commit``, ``rebase``) of ``image``: ``done`` of ``total`` bytes."""

    step: str
    image: str
    done: int
    total: int


ProgressFn = Callable[[ChainProgress], None]


async def backing_chain(image: str, fmt: str = "qcow2") -> list[Layer]:
    """The chain of ``image``, top first (``qemu-img info --backing-chain``). Raises
    NotFoundError (``image-not-found``), ToolError (``image-in-use`` when written by
    another process)."""
    return await image_chain(image, fmt)


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return os.path.realpath(a) == os.path.realpath(b)


def _percent_cb(
    progress: ProgressFn | None, step: str, image: str, total: int
) -> Callable[[float], None] | None:
    if progress is None:
        return None

    def cb(pct: float) -> None:
        progress(ChainProgress(step, image, int(total * pct / 100.0), total))

    return cb


async def commit_into_backing(
    upper: str,
    *,
    above: str | None = None,
    progress: ProgressFn | None = None,
    timeout: float | None = None,
    rate: int = 0,
) -> str:
    """Write ``upper``'s data into its backing file and re-point ``above`` (the image whose
    backing file is ``upper``, if any) at that backing file. Returns the backing file
    (``layer``), which now reads what ``upper`` read; ``upper`` is left intact and no longer
    referenced by ``above`` (the caller deletes it when its records say so).

    Raises UsageError (``upper`` has no backing file, ``above`` does not back onto
    ``upper``, formats other than qcow2 on top), NotFoundError, ToolError (``image-in-use``,
    ``image-check-failed``, ``merge-failed``). ``rate``: the most bytes per second the commit
    copies (``qemu-img commit -r``; 0: no limit)."""
    chain = await image_chain(upper, "qcow2")
    if len(chain) < 2 or not chain[0].backing:
        raise UsageError(f"{upper} has no backing file to commit into", code="not-a-layer")
    layer = chain[1]
    above_chain: list[Layer] | None = None
    if above is not None:
        above_chain = await image_chain(above, "qcow2")
        if not _same(above_chain[0].backing, upper):
            raise UsageError(
                f"{above} does not back onto {upper} (its backing file is "
                f"{above_chain[0].backing})",
                code="not-a-layer",
            )
    size = chain[0].virtual_size
    log.info("commit %s into %s", upper, layer.filename)
    await run_qemu_img(
        "commit",
        "-p",
        "-d",
        *(("-r", str(rate)) if rate > 0 else ()),
        "-f",
        "qcow2",
        upper,
        on_percent=_percent_cb(progress, "commit", upper, size),
        timeout=timeout,
        what=f"qemu-img commit {upper}",
        code="merge-failed",
    )
    await check_image(layer.filename, layer.format)
    if above is not None:
        await _rebase(above, layer.filename, layer.format, safe=False, progress=None)
        await check_image(above, "qcow2")
    return layer.filename


async def rebase_onto(
    image: str,
    backing: str | None,
    *,
    backing_format: str | None = None,
    progress: ProgressFn | None = None,
    timeout: float | None = None,
) -> None:
    """Make ``image`` (qcow2) back onto ``backing`` (an image of its current chain; None:
    no backing file, i.e. flattened) while reading exactly what it read before: QEMU copies
    into ``image`` what the dropped layers held. ``backing_format`` defaults to the format
    qemu-img reports for ``backing`` in the chain.

    Raises UsageError (``backing`` is not below ``image`` in its chain), NotFoundError,
    ToolError (``image-in-use``, ``image-check-failed``, ``merge-failed``)."""
    chain = await image_chain(image, "qcow2")
    if backing is not None:
        below = [lay for lay in chain[1:] if _same(lay.filename, backing)]
        if not below:
            raise UsageError(
                f"{backing} is not in the backing chain of {image}", code="not-in-chain"
            )
        fmt = backing_format or below[0].format
    else:
        fmt = None
    await _rebase(
        image,
        backing,
        fmt,
        safe=True,
        progress=_percent_cb(progress, "rebase", image, chain[0].virtual_size),
        timeout=timeout,
    )
    await check_image(image, "qcow2")


async def _rebase(
    image: str,
    backing: str | None,
    backing_format: str | None,
    *,
    safe: bool,
    progress: Callable[[float], None] | None,
    timeout: float | None = None,
) -> None:
    args = ["rebase", "-p", "-f", "qcow2"]
    if not safe:
        args.append("-u")
    args += ["-b", backing or ""]
    if backing and backing_format:
        args += ["-F", backing_format]
    log.info("rebase %s onto %s (%s)", image, backing or "nothing", "safe" if safe else "unsafe")
    await run_qemu_img(
        *args,
        image,
        on_percent=progress,
        timeout=timeout,
        what=f"qemu-img rebase {image}",
        code="merge-failed",
    )
