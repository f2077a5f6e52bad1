"""Small real qcow2 chains for the export and offline-merge tests: each layer writes its own
pattern to its own 1 MiB blocks (some overlapping the layers below), and the expected view of
every layer is known, so a test can read any image back and compare block by block."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

MIB = 1 << 20
SIZE_MIB = 16

#: (layer name, {block: pattern byte}) from the base up.
LAYERS: list[tuple[str, dict[int, int]]] = [
    ("base", {b: 0x11 for b in range(8)}),
    ("l1", {2: 0x22, 3: 0x22, 12: 0x23}),
    ("l2", {3: 0x33, 4: 0x33, 5: 0x33, 12: 0x34, 14: 0x35}),
    ("top", {0: 0x44, 5: 0x44}),
]

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed (apt-get install qemu-utils)",
)


def views() -> dict[str, dict[int, int]]:
    """The expected view of each layer: block -> pattern (missing blocks read zero)."""
    out: dict[str, dict[int, int]] = {}
    acc: dict[int, int] = {}
    for name, writes in LAYERS:
        acc = {**acc, **writes}
        out[name] = dict(acc)
    return out


@dataclass(frozen=True)
class Chain:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / f"{name}.qcow2")


def make_chain(directory: Path, layers: list[tuple[str, dict[int, int]]] = LAYERS) -> Chain:
    prev: str | None = None
    for name, writes in layers:
        img = str(directory / f"{name}.qcow2")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if prev:
            cmd += ["-b", prev, "-F", "qcow2"]
        subprocess.run([*cmd, img, f"{SIZE_MIB}M"], check=True)
        io = []
        for block, pattern in sorted(writes.items()):
            io += ["-c", f"write -P {pattern:#x} {block * MIB} {MIB}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *io, img], check=True, capture_output=True)
        prev = img
    return Chain(directory)


def read_blocks(image: str, fmt: str, scratch: Path) -> dict[int, int]:
    """Every non-zero block of ``image``'s view -> its (uniform) pattern byte."""
    raw = scratch / "view.raw"
    raw.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, str(raw)],
                   check=True)  # fmt: skip
    data = raw.read_bytes()
    raw.unlink()
    out = {}
    for b in range(len(data) // MIB):
        block = data[b * MIB : (b + 1) * MIB]
        if block.count(0) == MIB:
            continue
        first = block[0]
        assert block.count(first) == MIB, f"block {b} of {image} is not uniform"
        out[b] = first
    return out


def backing_of(image: str) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", image],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    value = info.get("full-backing-filename") or info.get("backing-filename")
    return str(value) if value else None


def qemu_img_check(image: str) -> None:
    subprocess.run(["qemu-img", "check", "-q", image], check=True)


@contextmanager
def held_open(image: str) -> Iterator[subprocess.Popen[bytes]]:
    """``image`` opened read-write by another process (qemu-io waiting on stdin), the way a
    running VM holds its active overlay (and its backing files read-only)."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", image], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # qemu-io prints its prompt once it has opened the image (and holds its locks). Probing
        # the lock with `qemu-img info` instead raced with qemu-io's own open: a probe holding
        # the image for a moment made qemu-io fail to get its write lock and exit.
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        prompt = proc.stdout.read1(64) if ready else b""  # type: ignore[attr-defined]
        if b"qemu-io>" not in prompt:
            proc.kill()
            _, err = proc.communicate()
            raise RuntimeError(f"qemu-io did not open {image}: {err.decode(errors='replace')}")
        yield proc
    finally:
        proc.kill()
        proc.wait()
