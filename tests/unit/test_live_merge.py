"""The live merge of one layer (``HypervisorDriver.merge_layer``) without a real VM: the fake
driver's chains, jobs and faults, and the QMP driver's error paths and idempotence against a
fake QMP server (``query-jobs`` scripted, as QEMU 7.2 answers it). Real merges on lab VMs are
in ``tests/contract/test_merge_contract.py``."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fakes.fake_qmp import Error, FakeQmpServer, Reply, Return

from freezeframe.errors import HypervisorError, HypervisorUnavailableError
from freezeframe.hypervisor import _files
from freezeframe.hypervisor.base import HypervisorDriver, LayerMerge, MergeProgress
from freezeframe.hypervisor.qmp import QmpDriver, merge_job_id
from freezeframe.testing import FakeDriver, FakeHost, FakeVm, MergeFault

# ------------------------------------------------------------------ the fake driver


@pytest.fixture
def host() -> Iterator[FakeHost]:
    with FakeHost() as h:
        yield h


async def _layered(host: FakeHost, name: str = "vm1", layers: int = 3) -> tuple[FakeVm, list[str]]:
    """A fake VM with one disk, cut ``layers`` times; its chain of disk0, top first."""
    vm = host.add(FakeVm.simple(name, ("ext4",)))
    async with FakeDriver(name) as drv:
        for i in range(layers):
            disks = await drv.disks()
            await drv.cut(await drv.prepare_cut(f"s{i}", disks))
    return vm, vm.chain("disk0")


async def test_fake_intermediate_merge_drops_the_layer_and_reports_progress(
    host: FakeHost,
) -> None:
    vm, chain = await _layered(host)
    seen: list[MergeProgress] = []
    async with FakeDriver("vm1") as drv:
        out = await drv.merge_layer(LayerMerge("disk0", chain[1], chain[2]), seen.append)
        assert await drv.disks() == vm.disk_infos()
    assert (out.active, out.already, out.bytes) == (False, False, vm.layer_bytes)
    assert vm.chain("disk0") == [chain[0], *chain[2:]]
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1] == MergeProgress("disk0", vm.layer_bytes, vm.layer_bytes)
    assert vm.images[chain[1]] is None  # the file stays, no node has it open
    assert vm.merge_jobs == {}


async def test_fake_active_merge_makes_the_disk_write_to_base(host: FakeHost) -> None:
    vm, chain = await _layered(host)
    async with FakeDriver("vm1") as drv:
        out = await drv.merge_layer(LayerMerge("disk0", chain[0], chain[1]))
        again = await drv.merge_layer(LayerMerge("disk0", chain[0], chain[1]))
        (disk,) = await drv.disks()
    assert (out.active, out.already) == (True, False)
    assert vm.active_images()["disk0"] == chain[1]
    assert disk.node == vm.images[chain[1]]
    assert (again.already, again.bytes) == (True, 0)


async def test_fake_refuses_layers_that_are_not_adjacent(host: FakeHost) -> None:
    vm, chain = await _layered(host)
    async with FakeDriver("vm1") as drv:
        for merge in (
            LayerMerge("disk0", chain[0], chain[2]),  # skips a layer
            LayerMerge("disk0", "nope.qcow2", "nope-base.qcow2"),  # neither in the chain
            LayerMerge("disk9", chain[0], chain[1]),  # no such disk
        ):
            with pytest.raises(HypervisorError) as ei:
                await drv.merge_layer(merge)
            assert ei.value.code == "not-in-chain"
    assert vm.chain("disk0") == chain


async def test_fake_job_error_midway_leaves_the_chain(host: FakeHost) -> None:
    vm, chain = await _layered(host)
    vm.merge_fault = MergeFault.FAIL
    async with FakeDriver("vm1") as drv:
        with pytest.raises(HypervisorError) as ei:
            await drv.merge_layer(LayerMerge("disk0", chain[1], chain[2]))
        assert ei.value.code == "merge-failed"
        assert vm.chain("disk0") == chain
        assert vm.merge_jobs == {}
        # the fault was consumed: merging again works
        out = await drv.merge_layer(LayerMerge("disk0", chain[1], chain[2]))
    assert not out.already
    assert chain[1] not in vm.chain("disk0")


async def test_fake_merge_left_running_is_attached_to(host: FakeHost) -> None:
    vm, chain = await _layered(host)
    vm.merge_fault = MergeFault.LOST
    merge = LayerMerge("disk0", chain[0], chain[1])
    async with FakeDriver("vm1") as drv:
        with pytest.raises(HypervisorUnavailableError):
            await drv.merge_layer(merge)
    assert vm.merge_jobs["disk0"].done == vm.layer_bytes // 2
    assert vm.chain("disk0") == chain
    seen: list[MergeProgress] = []
    async with FakeDriver("vm1") as drv:
        out = await drv.merge_layer(merge, seen.append)
    assert (out.active, out.already) == (True, False)
    assert seen[0].done == vm.layer_bytes // 2  # followed from where it was
    assert vm.chain("disk0") == chain[1:]
    assert vm.merge_jobs == {}


async def test_fake_cancelled_merge_stays_running_and_the_next_call_finishes_it(
    host: FakeHost,
) -> None:
    vm, chain = await _layered(host)
    vm.merge_fault = MergeFault.HANG
    merge = LayerMerge("disk0", chain[1], chain[2])
    async with FakeDriver("vm1") as drv:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await drv.merge_layer(merge)
        assert "disk0" in vm.merge_jobs
        out = await drv.merge_layer(merge)
    assert not out.already
    assert vm.chain("disk0") == [chain[0], *chain[2:]]


async def test_fake_attaches_to_a_left_job_of_another_layer_then_merges_the_one_asked(
    host: FakeHost,
) -> None:
    vm, chain = await _layered(host)
    vm.leave_merge("disk0", chain[2])
    async with FakeDriver("vm1") as drv:
        out = await drv.merge_layer(LayerMerge("disk0", chain[0], chain[1]))
    assert out.active
    assert not out.already
    assert vm.chain("disk0") == [chain[1], chain[3]]


async def test_the_default_driver_cannot_merge_live() -> None:
    class Bare(FakeDriver):
        merge_layer = HypervisorDriver.merge_layer

    with pytest.raises(HypervisorError) as ei:
        await Bare("x").merge_layer(LayerMerge("d", "a", "b"))
    assert ei.value.code == "live-merge-unsupported"
    assert ei.value.exit_code == 7


# ------------------------------------------------------------------ the QMP driver


def test_merge_job_ids_are_deterministic_and_well_formed() -> None:
    assert merge_job_id("disk0") == "ff-merge-disk0"
    long = merge_job_id("scsi0-0-0-1-with-a-very-long-name")
    assert long == merge_job_id("scsi0-0-0-1-with-a-very-long-name")
    assert long.startswith("ff-merge-")
    assert len(long) < 32


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ffmrg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


CHAIN = ["/vm/d.s2.qcow2", "/vm/d.s1.qcow2", "/vm/d.qcow2"]
NODES = {"/vm/d.s2.qcow2": "ff-s2-d", "/vm/d.s1.qcow2": "ff-s1-d", "/vm/d.qcow2": "d"}


def _query_block(chain: list[str]) -> Return:
    image: dict[str, object] | None = None
    for f in reversed(chain):
        image = {"filename": f, "virtual-size": 1 << 20, "format": "qcow2"} | (
            {"backing-image": image} if image else {}
        )
    return Return(
        [
            {
                "device": "",
                "qdev": "/machine/peripheral/d/virtio-backend",
                "removable": False,
                "inserted": {
                    "node-name": NODES[chain[0]],
                    "drv": "qcow2",
                    "ro": False,
                    "file": chain[0],
                    "image": image,
                },
            }
        ]
    )


def _named() -> Return:
    out: list[object] = []
    for f, n in NODES.items():
        out += [
            {"node-name": n, "drv": "qcow2", "file": f},
            {"node-name": f"#{n}", "drv": "file", "file": f},
        ]
    return Return(out)


def _job(status: str, **more: object) -> dict[str, object]:
    return {"id": "ff-merge-d", "type": "commit", "status": status,
            "current-progress": 10, "total-progress": 10} | more  # fmt: skip


def _replies(
    jobs: list[Reply], blocks: list[Reply] | None = None, more: dict[str, Reply] | None = None
) -> dict[str, Reply | list[Reply]]:
    return {
        "query-block": blocks or [_query_block(CHAIN)],
        "query-pci": Return([]),
        "qom-get": Error("no such property", "GenericError"),
        "query-named-block-nodes": _named(),
        "query-jobs": jobs,
        "block-commit": Return({}),
        "job-dismiss": Return({}),
        "job-complete": Return({}),
        "blockdev-del": Return({}),
        **(more or {}),
    }


def _args(fake: FakeQmpServer, command: str) -> list[object]:
    return [m.get("arguments") for m in fake.received if m["execute"] == command]


async def test_qmp_intermediate_merge_commits_by_node_with_the_plain_backing_path(
    short_dir: Path,
) -> None:
    sock = str(short_dir / "q.sock")
    after = [CHAIN[0], CHAIN[2]]
    replies = _replies(
        [Return([]), Return([_job("running", **{"current-progress": 4})]),
         Return([_job("concluded")])],
        [_query_block(CHAIN), _query_block(after)],
    )  # fmt: skip
    seen: list[MergeProgress] = []
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        out = await drv.merge_layer(
            LayerMerge("d", CHAIN[1], CHAIN[2], speed=100 << 20), seen.append
        )
    assert (out.active, out.already, out.bytes) == (False, False, 10)
    assert _args(fake, "block-commit") == [
        {"job-id": "ff-merge-d", "device": "ff-s2-d", "auto-finalize": True,
         "speed": 100 << 20, "auto-dismiss": False, "top-node": "ff-s1-d", "base-node": "d",
         "backing-file": CHAIN[2]}
    ]  # fmt: skip
    assert _args(fake, "job-dismiss") == [{"id": "ff-merge-d"}]
    assert [(p.done, p.total) for p in seen] == [(4, 10), (10, 10)]
    assert "job-complete" not in fake.commands()
    # the merged layer's node (blockdev-add'ed by a cut) is closed; its file node went with it
    assert _args(fake, "blockdev-del") == [{"node-name": "ff-s1-d"}]


async def test_qmp_active_merge_completes_the_job_once_ready(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies(
        [Return([]), Return([_job("running")]), Return([_job("ready")]),
         Return([_job("concluded")])],
        [_query_block(CHAIN), _query_block(CHAIN[1:])],
    )  # fmt: skip
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        out = await drv.merge_layer(LayerMerge("d", CHAIN[0], CHAIN[1]))
    assert (out.active, out.already) == (True, False)
    (args,) = _args(fake, "block-commit")
    assert isinstance(args, dict)
    assert (args["top-node"], args["base-node"]) == ("ff-s2-d", "ff-s1-d")
    assert "backing-file" not in args  # QEMU refuses one for the active layer
    assert _args(fake, "job-complete") == [{"id": "ff-merge-d"}]


async def test_qmp_job_error_is_merge_failed_and_the_job_dismissed(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies([Return([]), Return([_job("concluded", error="No space left on device")])])
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        with pytest.raises(HypervisorError) as ei:
            await drv.merge_layer(LayerMerge("d", CHAIN[1], CHAIN[2]))
    assert ei.value.code == "merge-failed"
    assert "No space left" in str(ei.value)
    assert _args(fake, "job-dismiss") == [{"id": "ff-merge-d"}]


async def test_qmp_refused_commit_is_merge_failed(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies(
        [Return([])], more={"block-commit": Error("Node 'd' is busy: block device is in use")}
    )
    async with FakeQmpServer(sock, replies), QmpDriver(sock, timeout=2) as drv:
        with pytest.raises(HypervisorError) as ei:
            await drv.merge_layer(LayerMerge("d", CHAIN[1], CHAIN[2]))
    assert ei.value.code == "merge-failed"


async def test_qmp_not_adjacent_or_unknown_is_not_in_chain(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    async with (
        FakeQmpServer(sock, _replies([Return([])])) as fake,
        QmpDriver(sock, timeout=2) as drv,
    ):
        for merge in (
            LayerMerge("d", CHAIN[0], CHAIN[2]),
            LayerMerge("d", "/vm/x.qcow2", "/vm/y.qcow2"),
            LayerMerge("nodisk", CHAIN[0], CHAIN[1]),
        ):
            with pytest.raises(HypervisorError) as ei:
                await drv.merge_layer(merge)
            assert ei.value.code == "not-in-chain"
    assert "block-commit" not in fake.commands()


async def test_qmp_top_gone_with_base_in_the_chain_is_already_done(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies([Return([])], [_query_block(CHAIN[1:])])
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        out = await drv.merge_layer(LayerMerge("d", CHAIN[0], CHAIN[1]))
    assert (out.already, out.bytes) == (True, 0)
    assert "block-commit" not in fake.commands()


async def test_qmp_attaches_to_a_ready_job_a_killed_run_left(short_dir: Path) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies(
        [Return([_job("ready")]), Return([_job("ready")]), Return([_job("concluded")])],
        [_query_block(CHAIN), _query_block(CHAIN[1:])],
    )
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        out = await drv.merge_layer(LayerMerge("d", CHAIN[0], CHAIN[1]))
    assert (out.active, out.already) == (True, False)
    assert "block-commit" not in fake.commands()
    assert _args(fake, "job-complete") == [{"id": "ff-merge-d"}]


async def test_qmp_dismisses_a_concluded_job_a_killed_run_left_then_merges(
    short_dir: Path,
) -> None:
    sock = str(short_dir / "q.sock")
    replies = _replies(
        [Return([_job("concluded", error="Input/output error")]),
         Return([_job("concluded")])],
        [_query_block(CHAIN), _query_block([CHAIN[0], CHAIN[2]])],
    )  # fmt: skip
    async with FakeQmpServer(sock, replies) as fake, QmpDriver(sock, timeout=2) as drv:
        out = await drv.merge_layer(LayerMerge("d", CHAIN[1], CHAIN[2]))
    assert not out.already
    assert fake.commands().count("job-dismiss") == 2
    assert fake.commands().index("job-dismiss") < fake.commands().index("block-commit")


async def test_qmp_merge_needs_a_connection(short_dir: Path) -> None:
    drv = QmpDriver(str(short_dir / "none.sock"))
    with pytest.raises(HypervisorUnavailableError):
        await drv.merge_layer(LayerMerge("d", CHAIN[0], CHAIN[1]))


# ------------------------------------------------------------------ flushing the base


async def test_flushing_fsyncs_the_base_until_the_block_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"x")
    calls: list[str] = []
    real = _files._fsync

    def counting(path: str) -> bool:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(_files, "_fsync", counting)
    async with _files.flushing(str(base), every=0.02):
        await asyncio.sleep(0.15)
    seen = len(calls)
    assert seen >= 3
    assert set(calls) == {str(base)}
    await asyncio.sleep(0.05)
    assert len(calls) == seen  # stopped with the block


async def test_flushing_a_path_that_is_no_local_file_does_nothing(tmp_path: Path) -> None:
    async with asyncio.timeout(1), _files.flushing(str(tmp_path / "missing.qcow2"), every=0.01):
        await asyncio.sleep(0.05)
