"""The base of a live merge reopened with ``cache.direct`` on and back (:func:`direct_reopen`):
the options given for each shape of node (a named protocol node, an overlay's inline one), and
on a real QEMU (``-machine none``) that the reopen changes that one node's cache and nothing
else, and back."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from freezeframe.hypervisor.qmp import CmdlineBlockOptions, direct_reopen

CACHED = {"direct": False, "no-flush": False, "writeback": True}
DIRECT = {"direct": True, "no-flush": False, "writeback": True}

#: A lab disk (``-blockdev driver=file,node-name=disk0-file`` + ``driver=qcow2``) with two
#: overlays of cuts (format nodes named by freezeframe, protocol nodes by QEMU).
NAMED: list[object] = [
    {"node-name": "ff-s2-disk0", "drv": "qcow2", "file": "/vm/d.ff-s2.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off", "backing_file": "/vm/d.ff-s1.qcow2",
     "image": {"full-backing-filename": "/vm/d.ff-s1.qcow2"}},
    {"node-name": "#block511", "drv": "file", "file": "/vm/d.ff-s2.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off"},
    {"node-name": "ff-s1-disk0", "drv": "qcow2", "file": "/vm/d.ff-s1.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off", "backing_file": "d.qcow2",
     "image": {"full-backing-filename": "/vm/d.qcow2"}},
    {"node-name": "#block300", "drv": "file", "file": "/vm/d.ff-s1.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off"},
    {"node-name": "disk0", "drv": "qcow2", "file": "/vm/d.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off"},
    {"node-name": "disk0-file", "drv": "file", "file": "/vm/d.qcow2", "ro": False,
     "cache": CACHED, "detect_zeroes": "off"},
]  # fmt: skip
CHAIN = ("/vm/d.ff-s2.qcow2", "/vm/d.ff-s1.qcow2", "/vm/d.qcow2")
ARGV = ["qemu-system-x86_64", "-blockdev",
        "driver=file,node-name=disk0-file,filename=/vm/d.qcow2,aio=io_uring,locking=off",
        "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"]  # fmt: skip


def test_a_named_protocol_node_is_reopened_itself_with_its_command_line_options() -> None:
    spec = direct_reopen("/vm/d.qcow2", True, NAMED, CmdlineBlockOptions.from_argv(ARGV), CHAIN)
    assert spec == {
        "node-name": "disk0-file",
        "read-only": False,
        "driver": "file",
        "filename": "/vm/d.qcow2",
        "cache": {"direct": True, "no-flush": False},
        "aio": "io_uring",
        "locking": "off",
    }
    # already cached: nothing to set back
    assert direct_reopen("/vm/d.qcow2", False, NAMED, CmdlineBlockOptions(), CHAIN) is None


def test_an_overlay_is_reopened_through_its_format_node_keeping_its_backing() -> None:
    spec = direct_reopen(
        "/vm/d.ff-s1.qcow2", True, NAMED, CmdlineBlockOptions.from_argv(ARGV), CHAIN
    )
    assert spec == {
        "driver": "qcow2",
        "node-name": "ff-s1-disk0",
        "read-only": False,
        "cache": {"direct": False, "no-flush": False},  # the format node's own, unchanged
        "file": {
            "driver": "file",
            "filename": "/vm/d.ff-s1.qcow2",
            "cache": {"direct": True, "no-flush": False},
            "aio": "io_uring",  # what the overlay inherited from the chain's command line
            "locking": "off",
        },
        "backing": "disk0",
    }


def test_nothing_to_reopen() -> None:
    cmdline = CmdlineBlockOptions()
    direct = [
        {**n, "cache": DIRECT} if isinstance(n, dict) and n["drv"] == "file" else n for n in NAMED
    ]
    assert direct_reopen("/vm/d.qcow2", True, direct, cmdline, CHAIN) is None  # direct already
    assert direct_reopen("/vm/other.qcow2", True, NAMED, cmdline, CHAIN) is None  # unknown
    no_cache = [{k: v for k, v in n.items() if k != "cache"} for n in NAMED if isinstance(n, dict)]
    assert direct_reopen("/vm/d.qcow2", True, no_cache, cmdline, CHAIN) is None
    # the backing node of an overlay cannot be found: no reopen (QEMU would refuse it)
    lost = [n for n in NAMED if isinstance(n, dict) and n["node-name"] != "disk0"]
    assert direct_reopen("/vm/d.ff-s1.qcow2", True, lost, cmdline, CHAIN) is None


def _caches(nodes: list[dict[str, object]]) -> dict[tuple[str, object], object]:
    return {(str(n["drv"]), n["file"]): n["cache"]["direct"] for n in nodes}  # type: ignore[index]


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
async def test_the_reopen_flips_only_the_base_file_on_a_real_qemu(tmp_path: Path) -> None:
    files = [str(tmp_path / n) for n in ("d.qcow2", "d.ff-s1.qcow2", "d.ff-s2.qcow2")]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", files[0], "16M"], check=True)
    for below, above in itertools.pairwise(files):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", above],
            check=True,
        )
    sock = tmp_path / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults",
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-blockdev", f"driver=file,node-name=disk0-file,filename={files[0]}",
            "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"]  # fmt: skip
    proc = subprocess.Popen(argv)
    client = QMPClient("t")
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        await client.connect(str(sock))
        for i, name in ((1, "ff-s1-disk0"), (2, "ff-s2-disk0")):
            await client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": "disk0" if i == 1
                else "ff-s1-disk0", "file": {"driver": "file", "filename": files[i]}})  # fmt: skip
        cmdline = CmdlineBlockOptions.from_argv(argv)
        chain = tuple(reversed(files))

        async def nodes() -> list[dict[str, object]]:
            got = await client.execute("query-named-block-nodes", {"flat": True})
            assert isinstance(got, list)
            return got

        before = _caches(await nodes())
        assert set(before.values()) == {False}
        for image in (files[1], files[0]):  # an overlay (inline protocol node), a named one
            spec = direct_reopen(image, True, await nodes(), cmdline, chain)
            assert spec is not None
            await client.execute("blockdev-reopen", {"options": [spec]})
            now = _caches(await nodes())
            assert {k for k, v in now.items() if v} == {("file", image)}
            back = direct_reopen(image, False, await nodes(), cmdline, chain)
            assert back is not None
            await client.execute("blockdev-reopen", {"options": [back]})
            assert _caches(await nodes()) == before
            assert direct_reopen(image, False, await nodes(), cmdline, chain) is None
        await client.execute("quit")
    finally:
        await client.disconnect()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)
