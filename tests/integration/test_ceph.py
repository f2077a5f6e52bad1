"""The lab Ceph (``freezeframe lab ceph``) and :mod:`freezeframe.storage.rbd` against a real
single-node Ceph.

One cluster for the session: the ``ceph_lab`` fixture (tests/integration/conftest.py, helpers
in ceph_helpers.py), shared with test_rbd_snapshots.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from freezeframe.errors import StorageError
from freezeframe.storage.rbd import (
    CephSettings,
    RbdClient,
    RbdImageRef,
    qemu_blockdev_json,
    snap_name,
)
from tests.integration.ceph_helpers import (
    SECRET,
    CephHandle,
    ceph_pid_alive,
    ff,
    free_port,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(ceph_lab: CephHandle) -> AsyncIterator[RbdClient]:
    async with await RbdClient.connect(ceph_lab.settings(timeout=20)) as c:
        yield c


async def new_images(client: RbdClient, pool: str, n: int) -> list[RbdImageRef]:
    refs = [RbdImageRef(pool, f"t-{secrets.token_hex(4)}") for _ in range(n)]
    for ref in refs:
        await client.create_image(ref, 32 << 20)
    return refs


def test_up_is_quick_idempotent_and_prints_conf_and_pool(ceph_lab: CephHandle) -> None:
    doc = ceph_lab.doc
    assert doc["running"] is True
    assert doc["paxos"] == "fast"
    assert doc["paxos_propose_interval"] == pytest.approx(0.01)
    assert Path(doc["conf"]).is_file()
    assert doc["pool"] == "rbd"
    assert {d["name"] for d in doc["daemons"]} == {"mon.a", "osd.0"}
    assert doc["started_in"] < 30  # ~1.5 s here; generous for a loaded host
    again = ff("lab", "ceph", "up", "--json")
    assert again.returncode == 0, again.stderr
    doc2 = json.loads(again.stdout)
    assert doc2["already_running"] is True
    assert [d["pid"] for d in doc2["daemons"]] == [d["pid"] for d in doc["daemons"]]
    differently = ff("lab", "ceph", "up", "--paxos", "default", "--json")
    assert differently.returncode == 5
    assert json.loads(differently.stdout)["code"] == "ceph-running-differently"
    status = ff("lab", "ceph", "status", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["running"] is True
    # The pool really is what Ceph says: size 1, application rbd.
    out = subprocess.run(
        ["ceph", "-c", doc["conf"], "osd", "pool", "get", "rbd", "size", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["size"] == 1


async def test_parallel_snapshots_visible_with_rbd_snap_ls(
    ceph_lab: CephHandle, client: RbdClient
) -> None:
    refs = await new_images(client, ceph_lab.pool, 3)
    sid = secrets.token_hex(6)
    assert await client.create_snaps(refs, snap_name(sid)) == tuple(refs)
    for ref in refs:
        listed = json.loads(ceph_lab.rbd("snap", "ls", str(ref), "--format", "json").stdout)
        assert [s["name"] for s in listed] == [f"ff-{sid}"]
        assert listed[0]["protected"] == "false"
        assert await client.ff_snapshot_ids(ref) == (sid,)
        snaps = await client.list_snaps(ref)
        assert [s.snapshot_id for s in snaps] == [sid]
        assert snaps[0].size == 32 << 20
    assert await client.remove_ff_snaps(refs, sid) == tuple(refs)
    for ref in refs:
        assert json.loads(ceph_lab.rbd("snap", "ls", str(ref), "--format", "json").stdout) == []
        await client.remove_image(ref)
        assert not await client.image_exists(ref)


async def test_images_opened_before_the_cut(ceph_lab: CephHandle, client: RbdClient) -> None:
    refs = await new_images(client, ceph_lab.pool, 2)
    async with await client.open_images(refs) as images:
        assert await images.create_snaps(snap_name("pre1")) == tuple(refs)
        await client.create_snap(refs[1], snap_name("pre2"))  # taken on one image already
        with pytest.raises(StorageError) as exc:
            await images.create_snaps(snap_name("pre2"))
        assert exc.value.code == "rbd-snapshot-exists"
    for ref in refs:  # pre1 on both; pre2 rolled back on the first, kept on the second
        listed = json.loads(ceph_lab.rbd("snap", "ls", str(ref), "--format", "json").stdout)
        names = [s["name"] for s in listed]
        assert names == (["ff-pre1"] if ref == refs[0] else ["ff-pre1", "ff-pre2"])
    with pytest.raises(StorageError) as missing:
        await client.open_images([refs[0], RbdImageRef(ceph_lab.pool, "nope")])
    assert missing.value.code == "rbd-image-not-found"
    for ref in refs:
        await client.remove_image(ref, with_snaps=True)


async def test_a_failed_cut_leaves_no_snapshot(ceph_lab: CephHandle, client: RbdClient) -> None:
    refs = await new_images(client, ceph_lab.pool, 2)
    missing = RbdImageRef(ceph_lab.pool, "no-such-image")
    with pytest.raises(StorageError) as exc:
        await client.create_snaps([*refs, missing], snap_name("dead1"))
    assert exc.value.code == "rbd-image-not-found"
    assert exc.value.left == ()
    for ref in refs:
        assert json.loads(ceph_lab.rbd("snap", "ls", str(ref), "--format", "json").stdout) == []
    # A name already taken on one image: the others are rolled back, the old one stays.
    await client.create_snap(refs[1], snap_name("dup"))
    with pytest.raises(StorageError) as dup:
        await client.create_snaps(refs, snap_name("dup"))
    assert dup.value.code == "rbd-snapshot-exists"
    assert await client.ff_snapshot_ids(refs[0]) == ()
    assert await client.ff_snapshot_ids(refs[1]) == ("dup",)
    for ref in refs:
        await client.remove_image(ref, with_snaps=True)


async def test_error_codes_of_real_failures(ceph_lab: CephHandle, client: RbdClient) -> None:
    (ref,) = await new_images(client, ceph_lab.pool, 1)
    assert await client.image_size(ref) == 32 << 20
    with pytest.raises(StorageError) as no_image:
        await client.image_size(RbdImageRef(ceph_lab.pool, "nope"))
    assert no_image.value.code == "rbd-image-not-found"
    with pytest.raises(StorageError) as no_pool:
        await client.list_snaps(RbdImageRef("no-such-pool", "x"))
    assert no_pool.value.code == "rbd-pool-not-found"
    with pytest.raises(StorageError) as no_snap:
        await client.remove_snap(ref, "ff-none")
    assert no_snap.value.code == "rbd-snapshot-not-found"
    assert await client.remove_snap(ref, "ff-none", missing_ok=True) is False
    with pytest.raises(StorageError) as exists:
        await client.create_image(ref, 1 << 20)
    assert exists.value.code == "rbd-image-exists"
    await client.create_snap(ref, snap_name("e1"))
    with pytest.raises(StorageError) as snap_exists:
        await client.create_snap(ref, snap_name("e1"))
    assert snap_exists.value.code == "rbd-snapshot-exists"
    assert snap_exists.value.target == f"{ref}@ff-e1"
    with pytest.raises(StorageError) as has_snaps:
        await client.remove_image(ref)
    assert has_snaps.value.code == "rbd-busy"
    await client.remove_image(ref, with_snaps=True)


#: A client that opens ``pool/image`` (a watch on its header), says so, and waits to be killed.
_HOLDER = """
import sys, time, rados, rbd
cluster = rados.Rados(conffile=sys.argv[1])
cluster.connect(timeout=20)
ioctx = cluster.open_ioctx(sys.argv[2])
image = rbd.Image(ioctx, sys.argv[3])
print("open", flush=True)
time.sleep(300)
"""


async def test_a_killed_clients_watch_is_evicted_at_once(
    ceph_lab: CephHandle, client: RbdClient
) -> None:
    """``lab down --purge`` after a killed QEMU: the dead client's watch would keep the image
    for Ceph's watch timeout (30 s); ``evict_watchers`` blocklists it, the removal goes at once."""
    (ref,) = await new_images(client, ceph_lab.pool, 1)
    assert await client.evict_watchers(ref) == ()  # nobody else watches it
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ceph_lab.conf), ref.pool, ref.image],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(StorageError) as busy:  # the dead client still watches it
        await client.remove_image(ref)
    assert busy.value.code == "rbd-busy", busy.value
    evicted = await client.evict_watchers(ref)
    assert len(evicted) == 1, evicted
    start = time.monotonic()
    await client.remove_image(ref)
    assert time.monotonic() - start < 10
    assert not await client.image_exists(ref)


async def test_unreachable_cluster_fails_fast_without_the_key(
    ceph_lab: CephHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conf = tmp_path / "ceph.conf"
    text = ceph_lab.conf.read_text()
    conf.write_text(text.replace(ceph_lab.doc["mon_addr"], f"127.0.0.1:{free_port()}"))
    settings = CephSettings(conf=conf, key=SECRET, timeout=2)
    t = time.monotonic()
    with pytest.raises(StorageError) as exc:
        await RbdClient.connect(settings)
    assert time.monotonic() - t < 15
    assert exc.value.code == "ceph-unreachable"
    for text in (str(exc.value), repr(exc.value), exc.value.hint or "", caplog.text):
        assert SECRET not in text
    # Connected with a key (auth none ignores it): still never shown.
    async with await RbdClient.connect(ceph_lab.settings(key=SECRET)) as c:
        assert SECRET not in repr(c)
        with pytest.raises(StorageError) as missing:
            await c.image_size(RbdImageRef(ceph_lab.pool, "nope"))
        assert SECRET not in str(missing.value)
    assert SECRET not in caplog.text


async def test_qemu_reads_a_snapshot_through_the_blockdev_options(
    ceph_lab: CephHandle, client: RbdClient
) -> None:
    """What verify will do: QEMU's rbd driver opens the image at an ff- snapshot read-only,
    while the image itself has moved on."""
    (ref,) = await new_images(client, ceph_lab.pool, 1)
    settings = ceph_lab.settings()
    rw = "json:" + qemu_blockdev_json(ref, settings)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x41 0 64k", rw], check=True, timeout=60, capture_output=True
    )
    await client.create_snaps([ref], snap_name("view1"))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x42 0 64k", rw], check=True, timeout=60, capture_output=True
    )
    view = "json:" + qemu_blockdev_json(ref, settings, snapshot=snap_name("view1"))
    at_cut = subprocess.run(
        ["qemu-io", "-r", "-c", "read -P 0x41 0 64k", view],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert at_cut.returncode == 0
    assert "Pattern verification failed" not in at_cut.stdout + at_cut.stderr
    now = subprocess.run(
        ["qemu-io", "-r", "-c", "read -P 0x42 0 64k", rw],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Pattern verification failed" not in now.stdout + now.stderr
    await client.remove_image(ref, with_snaps=True)


def test_port_in_use_is_refused(ceph_lab: CephHandle, tmp_path: Path) -> None:
    """A second lab Ceph (another FREEZEFRAME_HOME) on the running one's port: exit 5, its
    code, nothing started."""
    port = int(ceph_lab.doc["mon_addr"].rsplit(":", 1)[1])
    env = {**os.environ, "FREEZEFRAME_HOME": str(tmp_path / "other")}
    res = ff("lab", "ceph", "up", "--port", str(port), "--json", env=env)
    assert res.returncode == 5, res.stdout + res.stderr
    assert json.loads(res.stdout)["code"] == "ceph-port-in-use"
    status = ff("lab", "ceph", "status", "--json", env=env)
    assert status.returncode == 2
    assert json.loads(status.stdout)["code"] == "ceph-not-found"


async def test_down_then_up_restarts_on_its_data(ceph_lab: CephHandle) -> None:
    """Last in this file: stops the session's cluster and starts it again."""
    async with await RbdClient.connect(ceph_lab.settings(timeout=20)) as c:
        (ref,) = await new_images(c, ceph_lab.pool, 1)
        await c.create_snap(ref, snap_name("keep"))
    before = [d["pid"] for d in ceph_lab.doc["daemons"]]
    down = ff("lab", "ceph", "down", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["stopped"] == ["osd.0", "mon.a"]
    await asyncio.sleep(0)
    assert not any(ceph_pid_alive(p) for p in before)
    status = json.loads(ff("lab", "ceph", "status", "--json").stdout)
    assert status["running"] is False
    assert ff("lab", "ceph", "down", "--json").returncode == 0  # nothing to stop: fine
    up = ff("lab", "ceph", "up", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    doc = json.loads(up.stdout)
    ceph_lab.pids |= {d["pid"] for d in doc["daemons"]}
    ceph_lab.doc = doc
    assert doc["running"] is True
    assert doc["already_running"] is False
    async with await RbdClient.connect(ceph_lab.settings(timeout=20)) as c:
        assert await c.ff_snapshot_ids(ref) == ("keep",)
        await c.remove_image(ref, with_snaps=True)
