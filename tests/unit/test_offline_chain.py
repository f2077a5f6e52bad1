"""Offline merges of real qcow2 chains (freezeframe.storage.offline_chain): after each one,
every image that stays reads exactly what it held, and ``qemu-img check`` passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.unit._chains import (
    SIZE_MIB,
    backing_of,
    held_open,
    make_chain,
    needs_qemu_img,
    qemu_img_check,
    read_blocks,
    views,
)

from freezeframe.errors import NotFoundError, ToolError, UsageError
from freezeframe.storage.offline_chain import (
    ChainProgress,
    backing_chain,
    commit_into_backing,
    rebase_onto,
)

pytestmark = needs_qemu_img
V = views()


def assert_views(chain_dir: Path, expect: dict[str, str], scratch: Path) -> None:
    """Each image ``name`` reads what layer ``expect[name]`` held, and passes qemu-img check."""
    for name, layer in expect.items():
        img = str(chain_dir / f"{name}.qcow2")
        assert read_blocks(img, "qcow2", scratch) == V[layer], (name, layer)
        qemu_img_check(img)


async def test_chain_is_read_top_first(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    layers = await backing_chain(c.path("top"))
    assert [Path(la.filename).name for la in layers] == [
        "top.qcow2",
        "l2.qcow2",
        "l1.qcow2",
        "base.qcow2",
    ]
    assert layers[0].virtual_size == SIZE_MIB << 20
    assert layers[-1].backing is None
    assert layers[0].backing == c.path("l2")


async def test_commit_middle_layer(tmp_path: Path) -> None:
    """Delete the snapshot whose image is l1: l2's data goes into l1, top re-pointed at l1."""
    c = make_chain(tmp_path)
    seen: list[ChainProgress] = []
    out = await commit_into_backing(c.path("l2"), above=c.path("top"), progress=seen.append)
    assert out == c.path("l1")
    assert backing_of(c.path("top")) == c.path("l1")
    # l1 now holds what l2 held; base and top are unchanged; l2 itself is intact
    assert_views(tmp_path, {"base": "base", "l1": "l2", "l2": "l2", "top": "top"}, tmp_path)
    os.unlink(c.path("l2"))  # no longer referenced: the chain still reads right without it
    assert_views(tmp_path, {"top": "top", "l1": "l2"}, tmp_path)
    assert seen
    assert seen[-1].done == seen[-1].total == SIZE_MIB << 20
    assert all(p.step == "commit" for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)


async def test_commit_into_the_base(tmp_path: Path) -> None:
    """Delete the oldest snapshot (image base): l1's data goes into base, l2 re-pointed."""
    c = make_chain(tmp_path)
    await commit_into_backing(c.path("l1"), above=c.path("l2"))
    assert backing_of(c.path("l2")) == c.path("base")
    os.unlink(c.path("l1"))
    assert_views(tmp_path, {"base": "l1", "l2": "l2", "top": "top"}, tmp_path)


async def test_commit_the_top_without_above(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    await commit_into_backing(c.path("top"))
    assert_views(tmp_path, {"l2": "top", "l1": "l1", "base": "base"}, tmp_path)


async def test_rebase_drops_a_middle_layer(tmp_path: Path) -> None:
    """Delete the snapshot whose image is l1 keeping file names: l2 rebased onto base."""
    c = make_chain(tmp_path)
    seen: list[ChainProgress] = []
    await rebase_onto(c.path("l2"), c.path("base"), progress=seen.append)
    assert backing_of(c.path("l2")) == c.path("base")
    os.unlink(c.path("l1"))
    assert_views(tmp_path, {"base": "base", "l2": "l2", "top": "top"}, tmp_path)
    assert seen
    assert seen[-1].step == "rebase"
    assert seen[-1].done == seen[-1].total


async def test_rebase_to_nothing_flattens(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    await rebase_onto(c.path("l1"), None)
    assert backing_of(c.path("l1")) is None
    os.unlink(c.path("base"))
    assert_views(tmp_path, {"l1": "l1", "l2": "l2", "top": "top"}, tmp_path)


async def test_a_sequence_of_deletes_keeps_every_view(tmp_path: Path) -> None:
    """Middle, then oldest, then newest -- as the issue's data-safety scenario (offline)."""
    c = make_chain(tmp_path)
    # middle (l1's snapshot): rebase l2 onto base
    await rebase_onto(c.path("l2"), c.path("base"))
    os.unlink(c.path("l1"))
    assert_views(tmp_path, {"base": "base", "l2": "l2", "top": "top"}, tmp_path)
    # oldest (base's snapshot): commit l2 into base, re-point top
    await commit_into_backing(c.path("l2"), above=c.path("top"))
    os.unlink(c.path("l2"))
    assert_views(tmp_path, {"base": "l2", "top": "top"}, tmp_path)
    assert [Path(x.filename).name for x in await backing_chain(c.path("top"))] == [
        "top.qcow2",
        "base.qcow2",
    ]


async def test_refuses_what_is_not_a_layer(tmp_path: Path) -> None:
    c = make_chain(tmp_path)
    with pytest.raises(UsageError) as err:
        await commit_into_backing(c.path("base"))
    assert err.value.code == "not-a-layer"
    with pytest.raises(UsageError) as err:
        await commit_into_backing(c.path("l1"), above=c.path("top"))  # top backs onto l2
    assert err.value.code == "not-a-layer"
    with pytest.raises(UsageError) as err:
        await rebase_onto(c.path("l1"), c.path("top"))
    assert err.value.code == "not-in-chain"
    with pytest.raises(NotFoundError) as nf:
        await commit_into_backing(str(tmp_path / "nope.qcow2"))
    assert nf.value.code == "image-not-found"
    assert_views(tmp_path, {n: n for n in ("base", "l1", "l2", "top")}, tmp_path)


async def test_refuses_a_chain_a_running_process_has_open(tmp_path: Path) -> None:
    """A process writing to top (as a running VM) holds l2/l1 read-only: nothing changes."""
    c = make_chain(tmp_path)
    with held_open(c.path("top")):
        with pytest.raises(ToolError) as err:
            await commit_into_backing(c.path("l2"), above=c.path("top"))
        assert err.value.code == "image-in-use"
        with pytest.raises(ToolError) as err:
            await commit_into_backing(c.path("l1"))  # l1 is a read-only backing file there
        assert err.value.code == "image-in-use"
        with pytest.raises(ToolError) as err:
            await rebase_onto(c.path("l2"), c.path("base"))
        assert err.value.code == "image-in-use"
    assert_views(tmp_path, {n: n for n in ("base", "l1", "l2", "top")}, tmp_path)
