"""The snapshot lifecycle on real lab VMs (QEMU, qemu-ga, ext4/xfs): delete by live merge
without losing a byte, restore, the chain's depth coming back.

- Data safety (a QEMU lab VM and a libvirt one): with the workload writing, three snapshots;
  what each one's images hold (the workload's log read offline from the images at each cut) is
  recorded; the middle one, then
  the oldest, then the newest are deleted through the real CLI while the VM keeps writing.
  After each delete the remaining snapshots' images hold exactly what they held, every image
  of the chain passes ``qemu-img check``, the guest keeps writing, and at the end (the VM
  stopped cleanly) the guest's logs hold every record in order, none lost.
- Restore: after restoring snapshot 1 the guest's logs are exactly snapshot 1's, then the new
  boot's records (the workload restarts at seq=1), nothing of snapshot 2's; a snapshot taken
  after the restore is restored in turn; the other branch's snapshot still verifies.
- Depth: after 50 snapshots and deleting all but the last 3, the chain is 4 layers per disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from freezeframe.catalog import Catalog
from freezeframe.hypervisor import open_agent
from freezeframe.lab import LabVm
from freezeframe.lab.workload import LOG_NAME, SEQ_PATH
from freezeframe.models import QuiescePolicy, SnapshotRecord, SnapshotStatus, VerifyVerdict
from freezeframe.service import Config, CreateSnapshot, Service
from freezeframe.storage import mounted, open_image
from tests.integration.conftest import LabVmFactory

pytestmark = pytest.mark.integration
FF = [sys.executable, "-m", "freezeframe.cli.main"]
_SEQ = re.compile(rb"seq=(\d+) disk=(\d+) ")


def ff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FF, *args], env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False
    )


def ff_json(*args: str) -> Any:
    cli = ff(*args, "--json")
    assert cli.returncode == 0, f"{args}: {cli.stderr}{cli.stdout}"
    return json.loads(cli.stdout)


def records(log: bytes, disk: int) -> list[int]:
    """The sequence numbers of disk ``disk``'s complete records in a workload log, in order."""
    complete = log[: log.rfind(b"\n") + 1]
    return [int(m.group(1)) for m in _SEQ.finditer(complete) if int(m.group(2)) == disk]


def runs_in_order(seqs: list[int]) -> list[list[int]]:
    """``seqs`` cut into boots (each boot's workload starts at 1); each run must be 1..n."""
    runs: list[list[int]] = []
    for s in seqs:
        if s == 1 or not runs:
            runs.append([])
        runs[-1].append(s)
    for r in runs:
        assert r == list(range(1, len(r) + 1)), f"a record lost or out of order: {r[:5]}..."
    return runs


async def image_logs(image: str, fmt: str = "qcow2") -> bytes:
    async with open_image(image, fmt) as view, mounted(view) as mnt:
        return (mnt / LOG_NAME).read_bytes()


async def held(rec: SnapshotRecord) -> dict[str, str]:
    """device -> sha256 of the workload log in the snapshot's image at the cut."""
    out = {}
    for d in rec.disks:
        out[d.device] = hashlib.sha256(await image_logs(d.image, d.format)).hexdigest()
    return out


def qemu_img_check(image: str) -> None:
    res = subprocess.run(["qemu-img", "check", "-U", image], capture_output=True, text=True)
    assert res.returncode == 0, f"qemu-img check {image}: {res.stdout}{res.stderr}"


def chain(image: str) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return [str(layer["filename"]) for layer in json.loads(out.stdout)]


async def guest_sh(vm: LabVm, script: str) -> bytes:
    assert vm.agent_address is not None  # a socket (QEMU), through libvirt (libvirt)
    async with open_agent(vm.agent_address, timeout=30) as ga:
        res = await ga.exec("/bin/sh", ["-c", script], timeout=60)
    assert res.exitcode == 0, res
    return res.stdout


async def guest_seq(vm: LabVm) -> int:
    return int((await guest_sh(vm, f"cat {SEQ_PATH}")).strip() or b"0")


async def guest_log(vm: LabVm, disk: int) -> bytes:
    assert vm.agent_address is not None
    async with open_agent(vm.agent_address, timeout=30) as ga:
        return await ga.file_read(f"/mnt/disk{disk}/{LOG_NAME}", max_bytes=256 << 20)


async def active_images(catalog: Catalog, vm: str) -> dict[str, str]:
    return {i.device: i.location for i in await catalog.chain_images(vm) if i.active}


async def snapshot(
    svc: Service, vm: str, quiesce: QuiescePolicy = QuiescePolicy.REQUIRED
) -> SnapshotRecord:
    out = await svc.create_snapshot(vm, CreateSnapshot(quiesce=quiesce))
    assert out.record.status is SnapshotStatus.DONE, out.record.error
    return out.record


@pytest.mark.parametrize(
    "driver", ["qmp", pytest.param("libvirt", marks=pytest.mark.libvirt)]
)  # fmt: skip
async def test_delete_middle_oldest_newest_while_the_vm_writes(
    lab_vm: LabVmFactory, catalog: Catalog, lab_env: Path, driver: str
) -> None:
    vm = await lab_vm(disks=("ext4", "xfs"), driver=driver)
    await catalog.add_vm(vm.vm_config(), replace=True)
    async with Service(Config.from_env()) as svc:
        recs = []
        for _ in range(3):
            await asyncio.sleep(0.7)
            recs.append(await snapshot(svc, vm.name))
    s1, s2, s3 = recs
    holds = {r.id: await held(r) for r in recs}
    first = s1.disks[0].device  # disk0 (QEMU), vda (libvirt)
    assert len({h[first] for h in holds.values()}) == 3  # the workload wrote in between

    async def after_delete(gone: SnapshotRecord, kept: list[SnapshotRecord]) -> None:
        before = await guest_seq(vm)
        out = ff_json("snapshot", "delete", gone.id)
        assert out["record"]["id"] == gone.id
        assert {d["how"] for d in out["disks"]} == {"live"}
        ids = {r.id for r in await catalog.list_snapshots(vm.name)}
        assert ids == {k.id for k in kept}
        for k in kept:
            now = await catalog.get_snapshot(k.id)
            assert await held(now) == holds[k.id], f"snapshot {k.id} changed"
        for device, top in (await active_images(catalog, vm.name)).items():
            layers = chain(top)
            assert len(layers) == len(kept) + 1, (device, layers)
            for layer in layers[1:]:  # the read-only ones; the active one at the end
                qemu_img_check(layer)
        await asyncio.sleep(0.5)
        assert await guest_seq(vm) > before  # it keeps writing

    await after_delete(s2, [s1, s3])
    await after_delete(s1, [s3])
    await after_delete(s3, [])
    # the disks write to the original images again
    assert {str(d.file) for d in vm.disks} == set((await active_images(catalog, vm.name)).values())
    seq = await guest_seq(vm)
    for i in range(2):
        log = await guest_log(vm, i)
        (run,) = runs_in_order(records(log, i))
        assert len(run) >= seq  # every record up to now, in order
    for device, image in (await active_images(catalog, vm.name)).items():
        assert chain(image) == [image], device
    # and snapshots go on after the merges: the disks' images are what the catalog says
    async with Service(Config.from_env()) as svc:
        again = await snapshot(svc, vm.name)
        assert {d.image for d in again.disks} == {str(d.file) for d in vm.disks}
        assert (await svc.verify_snapshot(again.id)).verification.verdict is (
            VerifyVerdict.CONSISTENT
        )


async def test_restore_then_restore_a_later_snapshot(
    lab_vm: LabVmFactory, catalog: Catalog, lab_env: Path
) -> None:
    vm = await lab_vm(disks=("ext4", "xfs"))
    await catalog.add_vm(vm.vm_config(), replace=True)
    async with Service(Config.from_env()) as svc:
        await asyncio.sleep(0.5)
        s1 = await snapshot(svc, vm.name)
        await asyncio.sleep(1.0)
        s2 = await snapshot(svc, vm.name)
    logs1 = [await image_logs(d.image) for d in s1.disks]
    logs2 = [await image_logs(d.image) for d in s2.disks]
    assert len(records(logs2[0], 0)) > len(records(logs1[0], 0))

    refused = ff("snapshot", "restore", s1.id, "--json")  # in place needs --yes
    assert refused.returncode == 2
    assert json.loads(refused.stdout)["code"] == "confirmation-required"

    out = ff_json("snapshot", "restore", s1.id, "--yes")
    assert (out["state"], out["vm"]) == ("restarted", vm.name)
    disks = out["disks"]
    assert [d["image"] for d in disks] == [d.image for d in s1.disks]
    assert all(d["discarded"] for d in disks)
    await _sees_exactly(vm, logs1)

    async with Service(Config.from_env()) as svc:
        await asyncio.sleep(1.0)
        s3 = await snapshot(svc, vm.name)  # on the restored chain
        logs3 = [await image_logs(d.image) for d in s3.disks]
        out = ff_json("snapshot", "restore", s3.id, "--yes")
        assert out["state"] == "restarted"
        await _sees_exactly(vm, logs3)
        # the other branch's snapshot is still whole
        assert (await svc.verify_snapshot(s2.id)).verification.verdict is (VerifyVerdict.CONSISTENT)
        assert await held(await catalog.get_snapshot(s2.id)) == {
            d.device: hashlib.sha256(log).hexdigest()
            for d, log in zip(s2.disks, logs2, strict=True)
        }


async def _sees_exactly(vm: LabVm, logs: list[bytes]) -> None:
    """The guest's logs are ``logs`` (a snapshot's), then only the new boot's records."""
    for i, want in enumerate(logs):
        now = await guest_log(vm, i)
        assert now[: len(want)] == want, f"disk{i}: not the snapshot's data"
        runs_in_order(records(now, i))  # every boot's records whole and in order
        # after the snapshot's records the workload starts again at 1: nothing from later on
        rest = now[len(want) :]
        assert rest == b"" or rest.startswith(b"seq=1 "), rest[:40]


async def test_fifty_snapshots_back_to_four_layers(
    lab_vm: LabVmFactory, catalog: Catalog, lab_env: Path
) -> None:
    vm = await lab_vm(disks=("ext4",))
    await catalog.add_vm(vm.vm_config(), replace=True)
    # crash-consistent cuts: the workload's log must be on disk (not only in the guest's page
    # cache and journal) before the first one, or an early cut holds no log file at all
    await guest_sh(vm, "sync")
    async with Service(Config.from_env()) as svc:
        recs = [await snapshot(svc, vm.name, QuiescePolicy.OFF) for _ in range(50)]
        (top,) = (await active_images(catalog, vm.name)).values()
        assert len(chain(top)) == 51
        kept = recs[-3:]
        before = {r.id: await held(r) for r in kept}
        for r in recs[:-3]:
            await svc.delete_snapshot(r.id)
    (top,) = (await active_images(catalog, vm.name)).values()
    layers = chain(top)
    assert len(layers) == 4, layers
    assert layers[-1] == str(vm.disks[0].file)  # the oldest kept lives in the original image
    for r in kept:
        assert await held(await catalog.get_snapshot(r.id)) == before[r.id]
    for layer in layers[1:]:
        qemu_img_check(layer)
    # the merges rewrote the backing pointer in the header of the layer above (a kept
    # snapshot's image): re-fingerprinted, so no kept snapshot reads as changed since its cut
    # (crash-consistent cuts: their journals need a replay, which verify does on a copy)
    async with Service(Config.from_env()) as svc:
        for r in kept:
            v = (await svc.verify_snapshot(r.id)).verification
            assert v.verdict is VerifyVerdict.NEEDS_RECOVERY, (r.id, v.checks)


async def test_kill_9_during_a_live_merge_then_recover(
    lab_vm: LabVmFactory, catalog: Catalog, lab_env: Path
) -> None:
    """A delete killed while QEMU's block-commit runs: QEMU keeps running on a valid chain
    (the guest writes on), the record stays ``deleting``, and ``recover`` finishes it."""
    vm = await lab_vm(disks=("ext4",))
    await catalog.add_vm(vm.vm_config(), replace=True)
    async with Service(Config.from_env()) as svc:
        s1 = await snapshot(svc, vm.name)
        # 48 MiB above s1's image: the merge of s1 copies them, at 6 MiB/s about 8 s
        await guest_sh(vm, "dd if=/dev/zero of=/mnt/disk0/big bs=1M count=48 conv=fsync")
        s2 = await snapshot(svc, vm.name)
    before = await held(s2)
    proc = subprocess.Popen(
        [*FF, "snapshot", "delete", s1.id, "--bandwidth", "6"],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(300):  # the merge's write-ahead row, then into its job
            if await catalog.open_merges(vm.name):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the delete never opened its merge")
        await asyncio.sleep(2.0)
        assert proc.poll() is None, "the merge ended before the kill: nothing was tested"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert (await catalog.get_snapshot(s1.id)).status is SnapshotStatus.DELETING
    seq = await guest_seq(vm)
    await asyncio.sleep(1.0)
    assert await guest_seq(vm) > seq  # QEMU runs on, on a chain it keeps valid
    out = ff_json("recover", vm.name)
    assert [o["code"] for o in out] == ["delete-finished"], out
    assert {r.id for r in await catalog.list_snapshots(vm.name)} == {s2.id}
    now = await catalog.get_snapshot(s2.id)
    assert now.disks[0].image == s1.disks[0].image  # s2's data now lives in the original image
    assert await held(now) == before
    (top,) = (await active_images(catalog, vm.name)).values()
    layers = chain(top)
    assert layers == [top, s1.disks[0].image]
    qemu_img_check(layers[1])
    assert not Path(s2.disks[0].image).exists()  # the merged layer's file is gone
