"""``qemu-img`` with progress, for the storage modules that copy or merge images.

Owns: running one ``qemu-img`` subcommand with ``-p`` and turning its progress lines
(``    (12.50/100%)\\r`` on stdout, printed even when stdout is a pipe) into callbacks; reading
``qemu-img info`` of an image (and its chain); ``qemu-img check``. Failures are translated once,
here, into :mod:`freezeframe.errors`: a missing qemu-img is a DependencyError, a lock held by
another process (a running VM writing to the image, a merge in progress) a ToolError with code
``image-in-use``, a full filesystem ``no-space``, a damaged image ``image-check-failed``,
anything else ``tool-failed`` (or the caller's code). A cancelled call kills qemu-img and
waits for it before the cancellation propagates. Never uses a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from freezeframe._aio import within
from freezeframe._tools import require
from freezeframe.errors import NotFoundError, ToolError

__all__ = [
    "Layer",
    "check_image",
    "image_chain",
    "parse_progress",
    "run_qemu_img",
]

log = logging.getLogger(__name__)

_PROGRESS = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")
_LOCK_MARKERS = ("Failed to get", "lock")
IN_USE_HINT = (
    "another process has the image open for writing (the running VM, or a merge in progress): "
    "only an image no longer written to can be read or changed here"
)


@dataclass(frozen=True, slots=True)
class Layer:
    """One image of a chain (``qemu-img info --backing-chain``), top first."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None  # the backing file's name as resolved by qemu-img (full path)
    backing_format: str | None


def parse_progress(buffer: bytes) -> tuple[list[float], bytes]:
    """Percentages found in ``buffer`` and the unparsed rest (an incomplete last record)."""
    found: list[float] = []
    end = 0
    for m in _PROGRESS.finditer(buffer):
        found.append(float(m.group(1)))
        end = m.end()
    rest = buffer[end:]
    return found, rest[-64:]


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())


def classify(stderr: str, default: str) -> str:
    """The error code of a failed qemu-img from its stderr."""
    if all(marker in stderr for marker in _LOCK_MARKERS):
        return "image-in-use"
    if "No space left" in stderr:
        return "no-space"
    return default


async def run_qemu_img(
    *args: str,
    on_percent: Callable[[float], None] | None = None,
    timeout: float | None = None,
    what: str,
    code: str = "tool-failed",
) -> str:
    """Run ``qemu-img ARGS`` (add ``-p`` to ARGS for progress); return its stdout (without
    the progress records). ``on_percent`` gets every percentage printed (0..100).

    Raises DependencyError (no qemu-img), ToolError (cannot start, timeout, non-zero exit:
    code from :func:`classify` or ``code``). A cancellation kills qemu-img and waits for it."""
    exe = require("qemu-img")
    argv = (exe, *args)
    log.debug("run %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except (OSError, ValueError) as exc:
        raise ToolError(f"{what}: cannot start {exe}: {exc}", argv=argv, code=code) from exc
    stdout, stderr = proc.stdout, proc.stderr
    if stdout is None or stderr is None:  # pragma: no cover - both PIPEs were asked for
        await _kill(proc)
        raise ToolError(f"{what}: no pipes to qemu-img", argv=argv, code=code)

    async def read_out() -> bytes:
        kept = bytearray()
        pending = b""
        while chunk := await stdout.read(4096):
            values, pending = parse_progress(pending + chunk)
            if values and on_percent is not None:
                for v in values:
                    on_percent(min(max(v, 0.0), 100.0))
            if not values:
                kept += chunk
        return bytes(kept)

    async def communicate() -> tuple[bytes, bytes, int]:
        out, err = await asyncio.gather(read_out(), stderr.read())
        rc = await proc.wait()
        return out, err, rc

    try:
        out, err, rc = await within(communicate(), timeout)
    except TimeoutError as exc:
        await _kill(proc)
        raise ToolError(f"{what}: timed out after {timeout:g}s", argv=argv, code=code) from exc
    except BaseException:
        await _kill(proc)
        raise
    err_text = err.decode(errors="replace")
    if rc != 0:
        raise ToolError(
            f"{what} failed (exit {rc}): {_tail(err_text) or 'no output'}",
            argv=argv,
            returncode=rc,
            stderr=err_text,
            code=classify(err_text, code),
            hint=IN_USE_HINT if classify(err_text, code) == "image-in-use" else None,
        )
    return out.decode(errors="replace")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            proc.kill()
        await asyncio.shield(proc.wait())


async def image_chain(path: str, fmt: str, *, timeout: float = 60.0) -> list[Layer]:
    """``qemu-img info --backing-chain`` of ``path`` opened as ``fmt``, top first.

    Takes qemu-img's normal shared lock: an image another process writes to is refused
    (ToolError ``image-in-use``). Raises NotFoundError (``image-not-found``) when ``path``
    does not exist, ToolError on anything else."""
    try:
        out = await run_qemu_img(
            "info",
            "--output=json",
            "--backing-chain",
            "-f",
            fmt,
            path,
            timeout=timeout,
            what=f"qemu-img info {path}",
        )
    except ToolError as exc:
        if "No such file" in exc.stderr:
            raise NotFoundError(f"image {path} does not exist", code="image-not-found") from exc
        raise
    try:
        raw: Any = json.loads(out)
        items: Sequence[Any] = raw if isinstance(raw, list) else [raw]
        chain = [
            Layer(
                filename=str(i["filename"]),
                format=str(i["format"]),
                virtual_size=int(i["virtual-size"]),
                actual_size=int(i.get("actual-size", 0)),
                backing=i.get("full-backing-filename") or i.get("backing-filename"),
                backing_format=i.get("backing-filename-format"),
            )
            for i in items
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise ToolError(f"qemu-img info {path}: unexpected output", stderr=out) from exc
    if not chain:
        raise ToolError(f"qemu-img info {path}: empty output", stderr=out)
    return chain


async def check_image(path: str, fmt: str = "qcow2", *, timeout: float = 600.0) -> None:
    """``qemu-img check`` of a qcow2 image (raw has nothing to check). Leaked clusters (exit
    3: space wasted, data intact) are logged and accepted.

    Raises ToolError ``image-check-failed`` (corruption, or the check could not run) or
    ``image-in-use``."""
    if fmt != "qcow2":
        return
    exe = require("qemu-img")
    argv = (exe, "check", "-f", fmt, path)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await within(proc.communicate(), timeout)
    except BaseException:
        await _kill(proc)
        raise
    text = (out + err).decode(errors="replace")
    if proc.returncode == 3:
        log.warning("qemu-img check %s: leaked clusters (harmless): %s", path, _tail(text))
        return
    if proc.returncode != 0:
        code = classify(text, "image-check-failed")
        raise ToolError(
            f"qemu-img check {path} failed (exit {proc.returncode}): {_tail(text)}",
            argv=argv,
            returncode=proc.returncode,
            stderr=text,
            code=code,
            hint=IN_USE_HINT if code == "image-in-use" else None,
        )
