"""The storage-backend seam (issue 9): RBD disks told apart at the edges (QMP names, libvirt
XML), the registry, Ceph settings without secrets, and the engine cutting a mixed VM on the
fakes: RBD snapshots first (all at once), then the qcow2 transaction, one freeze; any failure
takes every part back; without a freeze the vCPUs are paused around the cut and that is
recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import pytest
from tests.conftest import CatalogDb

from freezeframe.catalog import Catalog
from freezeframe.engine import SnapshotRequest, Snapshotter, recover
from freezeframe.errors import (
    BusyError,
    NotFoundError,
    SnapshotFailedError,
    StorageError,
    UsageError,
)
from freezeframe.hypervisor.base import CutState, HypervisorDriver
from freezeframe.hypervisor.libvirt import parse_domain_xml
from freezeframe.hypervisor.qmp import rbd_source
from freezeframe.models import (
    ConsistencyLevel,
    DiskInfo,
    QuiescePolicy,
    RbdSource,
    SnapshotDisk,
    SnapshotStatus,
    VmConfig,
)
from freezeframe.service import Config, Service
from freezeframe.storage import backends as backends_mod
from freezeframe.storage.backends import (
    BackendCapabilities,
    Qcow2Backend,
    StorageBackend,
    backend_name_for,
    load_backend,
)
from freezeframe.storage.rbd_backend import RbdBackend, parse_record_image, settings_for
from freezeframe.testing import FakeDriver, FakeHost, FakeVm

REQUIRED = SnapshotRequest(quiesce=QuiescePolicy.REQUIRED)


# ------------------------------------------------------------------ the edges


def test_qmp_names_of_rbd_images() -> None:
    top = (
        'json:{"pool": "rbd", "image": "vol1", "conf": "/etc/c.conf", "driver": "rbd", '
        '"user": "cinder"}'
    )
    assert rbd_source(top) == RbdSource("rbd", "vol1", conf="/etc/c.conf", user="cinder")
    below_raw = 'json:{"driver": "raw", "file": {"driver": "rbd", "pool": "p", "image": "i"}}'
    assert rbd_source(below_raw) == RbdSource("p", "i")
    dotted = 'json:{"driver": "raw", "file.driver": "rbd", "file.pool": "p", "file.image": "i"}'
    assert rbd_source(dotted) == RbdSource("p", "i")
    assert rbd_source("rbd:p/ns/i:conf=/c:id=u") == RbdSource("p", "i", "ns", "/c", "u")
    assert rbd_source("/var/lib/images/a.qcow2") is None
    assert rbd_source('json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/a"}}') is (
        None
    )
    assert RbdSource("p", "i").name == "rbd:p/i"


def test_libvirt_network_rbd_disk() -> None:
    xml = """<domain><devices>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='rbd' name='volumes/volume-1' index='2'>
          <host name='10.0.0.1' port='6789'/><config file='/etc/ceph/c.conf'/>
        </source>
        <auth username='cinder'><secret type='ceph' uuid='0b1e-secret'/></auth>
        <target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/img/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
    </devices></domain>"""
    disks, _ = parse_domain_xml(xml)
    by_dev = {d.device: d for d in disks}
    rbd = by_dev["vdb"]
    assert rbd.rbd == RbdSource("volumes", "volume-1", conf="/etc/ceph/c.conf", user="cinder")
    assert rbd.file == "rbd:volumes/volume-1"
    assert by_dev["vda"].rbd is None
    assert backend_name_for(rbd) == "rbd"
    assert backend_name_for(by_dev["vda"]) == "qcow2"
    assert "0b1e-secret" not in repr(disks)


def test_registry_loads_lazily_and_names_what_is_unknown() -> None:
    assert load_backend("qcow2") is Qcow2Backend
    assert load_backend("rbd") is RbdBackend
    assert {"qcow2", "rbd"} <= set(backends_mod.available_backends())
    with pytest.raises(UsageError) as err:
        load_backend("nfs")
    assert "qcow2" in err.value.message


def test_settings_per_vm_then_disk_then_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FREEZEFRAME_CEPH_CONF", raising=False)
    monkeypatch.delenv("FREEZEFRAME_CEPH_ID", raising=False)
    src = RbdSource("p", "i", conf="/from/qemu.conf", user="qemu-user")
    vm = VmConfig("a", ceph_conf="/vm.conf", ceph_id="vmuser", ceph_keyring="/k.keyring")
    st = settings_for(vm, src)
    assert (st.conf, st.client_id, st.keyring) == (Path("/vm.conf"), "vmuser", Path("/k.keyring"))
    assert st.key is None  # never a secret from the registration
    st = settings_for(VmConfig("a"), src)
    assert (st.conf, st.client_id) == (Path("/from/qemu.conf"), "qemu-user")
    st = settings_for(VmConfig("a"), RbdSource("p", "i"))
    assert (st.conf, st.client_id) == (Path("/etc/ceph/ceph.conf"), "admin")
    monkeypatch.setenv("FREEZEFRAME_CEPH_CONF", "/g.conf")
    assert settings_for(None, RbdSource("p", "i")).conf == Path("/g.conf")
    assert VmConfig("a", ceph_id="bad id").problems()
    assert VmConfig("a", ceph_conf="rel.conf").problems()


def test_record_image_names_the_rbd_snapshot() -> None:
    ref, snap = parse_record_image("rbd:pool/img@ff-abc")
    assert (str(ref), snap) == ("pool/img", "ff-abc")
    with pytest.raises(StorageError):
        parse_record_image("/a/b.qcow2")
    backend = RbdBackend(VmConfig("a", ceph_conf="/c.conf"))
    d = SnapshotDisk("vdb", "n", "rbd:pool/img@ff-abc", "rbd", None, backend="rbd")
    src = backend.verify_source(d)
    assert src.startswith("json:")
    assert '"snapshot":"ff-abc"' in src
    assert '"read-only":true' in src


#: A Ceph key as a keyring holds it (base64 of 16 random bytes plus a header).
_KEY = "AQDx7mNnAAAAABAAzF8o0W7fYk3bQ1tq9cR2Lw=="


def test_ceph_key_in_a_keyring_never_leaves_its_file(ff: Any, tmp_path: Path) -> None:
    import json
    import sqlite3
    from datetime import UTC, datetime

    from freezeframe.models import SnapshotRecord

    keyring = tmp_path / "ceph.client.cinder.keyring"
    keyring.write_text(f"[client.cinder]\n\tkey = {_KEY}\n")
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:9\nkeyring = {keyring}\n")
    add = ff("vm", "add", "web", "--qmp", str(tmp_path / "q.sock"), "--ceph-conf", str(conf),
             "--ceph-id", "cinder", "--ceph-keyring", str(keyring), "--json")  # fmt: skip
    assert add.returncode == 0, add.stderr
    assert json.loads(add.stdout)["ceph_keyring"] == str(keyring)
    # A record with an RBD disk of that VM, in the CLI's own catalog.
    db = tmp_path / "home" / "catalog.sqlite"
    sid = "5ec2e7000001"
    rec = SnapshotRecord(
        id=sid,
        vm="web",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.DONE,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.FILESYSTEM,
        disks=(SnapshotDisk("vdb", "n1", f"rbd:volumes/web-vdb@ff-{sid}", "rbd", None, "rbd"),),
    )

    async def record() -> None:
        cat = await Catalog.open(f"sqlite:///{db}")
        try:
            await cat.begin_snapshot(dataclasses.replace(rec, status=SnapshotStatus.RUNNING))
            await cat.finish_snapshot(rec)
        finally:
            await cat.close()

    asyncio.run(record())
    runs = [
        ff("vm", "list", "--json"),
        ff("snapshot", "show", sid, "--json"),
        ff("snapshot", "list", "--json"),
        ff("doctor", "web", "--json"),  # the hypervisor is not there: errors and findings
        ff("snapshot", "create", "web", "--json"),  # refused: no QMP socket
        ff("snapshot", "delete", sid, "--json"),  # no such cluster: an RBD error
    ]
    assert str(keyring) in runs[0].stdout  # the path is shown, the key never
    assert sid in runs[1].stdout
    assert any(r.returncode != 0 for r in runs[3:])  # some errors were produced
    for r in runs:
        assert _KEY not in r.stdout + r.stderr, r.args
    # The catalog's rows, read raw: the keyring's path is there, its key nowhere.
    with sqlite3.connect(db) as raw:
        tables = [t for (t,) in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        dump = repr([raw.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables])
    assert str(keyring) in dump
    assert _KEY not in dump


# ------------------------------------------------------------------ the engine on fakes


class FakeRbd(StorageBackend):
    """An RBD backend in memory: ``made`` holds the snapshots, ``log`` every call (shared
    with the fake VM's ``ops`` to see the order)."""

    name: ClassVar[str] = "rbd"
    capabilities = BackendCapabilities(
        atomic_multi_disk=False, undoable=True, needs_overlay_dir=False
    )
    made: ClassVar[set[str]] = set()
    ops: ClassVar[list[str]] = []
    fail_cut: ClassVar[bool] = False
    fail_prepare: ClassVar[bool] = False
    fail_delete: ClassVar[bool] = False

    @classmethod
    def for_vm(cls, cfg: VmConfig, driver: HypervisorDriver | None) -> Self:
        return cls()

    @classmethod
    def owns(cls, disk: DiskInfo) -> bool:
        return disk.rbd is not None

    async def prepare(self, snapshot_id: str, disks: Sequence[DiskInfo]) -> Any:
        self.ops.append("rbd-prepare")
        if self.fail_prepare:
            raise StorageError("no monitor answered", code="ceph-unreachable")
        return (snapshot_id, tuple(disks))

    async def cut(self, handle: Any) -> None:
        self.ops.append("rbd-cut")
        if self.fail_cut:
            raise StorageError("timed out", code="ceph-timeout")
        self.made.update(f"{d.file}@ff-{handle[0]}" for d in handle[1])

    async def abort(self, handle: Any) -> None:
        self.ops.append("rbd-abort")
        self.made.difference_update(f"{d.file}@ff-{handle[0]}" for d in handle[1])

    async def cut_state(self, handle: Any) -> CutState:
        have = [f"{d.file}@ff-{handle[0]}" in self.made for d in handle[1]]
        return "switched" if all(have) else "not-switched" if not any(have) else "unknown"

    def record_disks(self, handle: Any) -> tuple[SnapshotDisk, ...]:
        return tuple(
            SnapshotDisk(d.device, d.node, f"{d.file}@ff-{handle[0]}", "rbd", None, "rbd")
            for d in handle[1]
        )

    async def delete(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> None:
        self.ops.append("rbd-delete")
        if self.fail_delete:
            raise StorageError("no monitor answered", code="ceph-unreachable")
        self.made.difference_update(d.image for d in disks)

    def handle_from_record(self, snapshot_id: str, disks: Sequence[SnapshotDisk]) -> Any:
        infos = tuple(
            DiskInfo(d.device, d.node, d.image.partition("@")[0], "rbd", 0,
                     rbd=RbdSource("p", d.device))
            for d in disks
        )  # fmt: skip
        return (snapshot_id, infos)


@pytest.fixture
def fake_rbd(monkeypatch: pytest.MonkeyPatch) -> type[FakeRbd]:
    """disk1 of every fake VM is an RBD volume cut by :class:`FakeRbd`."""
    FakeRbd.made, FakeRbd.ops = set(), []
    FakeRbd.fail_cut = FakeRbd.fail_prepare = FakeRbd.fail_delete = False
    real_disks = FakeDriver.disks

    async def disks(self: FakeDriver) -> list[DiskInfo]:
        out = []
        for d in await real_disks(self):
            if d.device == "disk1":
                src = RbdSource("volumes", f"{self.vm_name}-disk1")
                d = dataclasses.replace(d, file=src.name, backing=(), rbd=src)
            out.append(d)
        return out

    real_cut = FakeDriver.cut

    async def cut(self: FakeDriver, prepared: Any) -> None:
        FakeRbd.ops.append("qcow2-cut")
        await real_cut(self, prepared)

    real_load = backends_mod.load_backend

    def load(name: str) -> type[StorageBackend]:
        return FakeRbd if name == "rbd" else real_load(name)

    monkeypatch.setattr(FakeDriver, "disks", disks)
    monkeypatch.setattr(FakeDriver, "cut", cut)
    for module in (
        "freezeframe.engine.snapshot",
        "freezeframe.engine.recover",
        "freezeframe.engine.delete",
    ):
        monkeypatch.setattr(importlib.import_module(module), "load_backend", load)
    return FakeRbd


async def _vm(host: FakeHost, catalog: Catalog, name: str, **kw: Any) -> FakeVm:
    vm = host.add(FakeVm.simple(name, **kw))
    await catalog.add_vm(vm.config())
    return vm


async def test_mixed_vm_one_freeze_rbd_first_then_the_transaction(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    vm = await _vm(host, catalog, "m")
    rec = await Snapshotter(catalog).snapshot("m", REQUIRED)
    assert rec.level is ConsistencyLevel.FILESYSTEM, rec.level_reason
    by_dev = {d.device: d for d in rec.disks}
    assert by_dev["disk0"].backend == "qcow2-external"
    assert by_dev["disk0"].overlay is not None
    assert by_dev["disk1"].backend == "rbd"
    assert by_dev["disk1"].overlay is None
    assert by_dev["disk1"].image == f"rbd:volumes/m-disk1@ff-{rec.id}"
    assert fake_rbd.made == {f"rbd:volumes/m-disk1@ff-{rec.id}"}
    assert fake_rbd.ops == ["rbd-prepare", "rbd-cut", "qcow2-cut"]
    names = [e.name for e in rec.timeline]
    assert names.index("frozen") < names.index("cut") < names.index("thaw_sent")
    assert "paused" not in names  # frozen: no pause needed
    assert vm.active_images()["disk0"] == by_dev["disk0"].overlay
    # The next one continues from it (the RBD disk writes on to its image).
    again = await Snapshotter(catalog).snapshot("m", REQUIRED)
    assert again.parent_id == rec.id


async def test_a_failed_rbd_cut_takes_everything_back(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    vm = await _vm(host, catalog, "f")
    before = vm.active_images()
    fake_rbd.fail_cut = True
    with pytest.raises(SnapshotFailedError) as err:
        await Snapshotter(catalog).snapshot("f", REQUIRED)
    assert err.value.code == "ceph-timeout"
    assert "qcow2-cut" not in fake_rbd.ops  # the transaction was never sent
    assert fake_rbd.made == set()
    assert vm.active_images() == before
    assert "abort" in vm.ops  # the qcow2 overlay prepared was removed
    rec = await catalog.get_snapshot(err.value.snapshot_id or "")
    assert rec.status is SnapshotStatus.FAILED
    assert rec.disks == ()


async def test_a_refused_transaction_removes_the_rbd_snapshots(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    from freezeframe.testing.fake_driver import CutFault

    vm = await _vm(host, catalog, "t")
    vm.cut_fault = CutFault.FAIL
    with pytest.raises(SnapshotFailedError):
        await Snapshotter(catalog).snapshot("t", REQUIRED)
    assert fake_rbd.ops[:3] == ["rbd-prepare", "rbd-cut", "qcow2-cut"]
    assert "rbd-abort" in fake_rbd.ops
    assert fake_rbd.made == set()


async def test_prepare_failure_leaves_nothing_and_keeps_the_code(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    vm = await _vm(host, catalog, "p")
    before = vm.active_images()
    fake_rbd.fail_prepare = True
    with pytest.raises(SnapshotFailedError) as err:
        await Snapshotter(catalog).snapshot("p", REQUIRED)
    assert err.value.code == "ceph-unreachable"
    assert "abort" in vm.ops
    assert vm.active_images() == before
    assert vm.guest is not None
    assert vm.guest.sent("guest-fsfreeze-freeze") == 0  # failed before anything was frozen


async def test_no_freeze_pauses_the_vcpus_around_the_cut_and_records_it(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    vm = await _vm(host, catalog, "o")
    rec = await Snapshotter(catalog).snapshot("o", SnapshotRequest(quiesce=QuiescePolicy.OFF))
    assert rec.level is ConsistencyLevel.CRASH
    names = [e.name for e in rec.timeline]
    assert names.index("paused") < names.index("cut_sent") < names.index("resumed")
    assert "pause_window" in names
    assert "vCPUs were paused for" in rec.level_reason
    assert vm.ops.index("pause") < vm.ops.index("cut") < vm.ops.index("resume")
    assert not vm.paused


async def test_no_pause_for_qcow2_only_vms(host: FakeHost, catalog: Catalog) -> None:
    vm = await _vm(host, catalog, "q")
    rec = await Snapshotter(catalog).snapshot("q", SnapshotRequest(quiesce=QuiescePolicy.OFF))
    assert "paused" not in [e.name for e in rec.timeline]
    assert "pause" not in vm.ops


async def test_recover_removes_rbd_snapshots_of_an_attempt_that_died(
    host: FakeHost, catalog: Catalog, fake_rbd: type[FakeRbd]
) -> None:
    vm = await _vm(host, catalog, "r")
    sid = "deadbeef0001"
    disks = (SnapshotDisk("disk1", "n1", f"rbd:volumes/r-disk1@ff-{sid}", "rbd", None, "rbd"),)
    from datetime import UTC, datetime

    from freezeframe.models import SnapshotRecord

    rec = SnapshotRecord(
        id=sid,
        vm="r",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
        disks=disks,
    )
    await catalog.begin_snapshot(rec)
    await catalog.finish_snapshot(rec)
    fake_rbd.made.add(f"rbd:volumes/r-disk1@ff-{sid}")
    await recover(catalog, "r")
    assert fake_rbd.made == set()
    settled = await catalog.get_snapshot(sid)
    assert settled.status is SnapshotStatus.FAILED
    assert settled.disks == ()
    assert vm.active_images()  # the VM is untouched


# ------------------------------------------------------------------ delete


async def test_delete_of_a_mixed_snapshot_merges_and_removes(
    host: FakeHost,
    catalog: Catalog,
    catalog_db: CatalogDb,
    fake_rbd: type[FakeRbd],
    tmp_path: Path,
) -> None:
    vm = await _vm(host, catalog, "d")
    rec = await Snapshotter(catalog).snapshot("d", REQUIRED)  # disk0 qcow2, disk1 rbd
    qcow2 = next(d for d in rec.disks if d.device == "disk0")
    async with Service(Config(state_dir=tmp_path / "h", database_url=catalog_db.url)) as svc:
        out = await svc.delete_snapshot(rec.id)
    by_dev = {d.device: d for d in out.disks}
    # the newest snapshot: an active commit, the disk writes to the image at the cut again
    assert (by_dev["disk0"].how, by_dev["disk0"].writes_to) == ("live", qcow2.image)
    assert vm.chain("disk0") == [qcow2.image]
    assert by_dev["disk1"].how == "removed"
    assert fake_rbd.made == set()
    assert "rbd-delete" in fake_rbd.ops


async def test_delete_removes_the_rbd_snapshots_then_the_record(
    host: FakeHost,
    catalog: Catalog,
    catalog_db: CatalogDb,
    fake_rbd: type[FakeRbd],
    tmp_path: Path,
) -> None:
    await _vm(host, catalog, "e")
    rec = await Snapshotter(catalog).snapshot(
        "e", dataclasses.replace(REQUIRED, exclude_disks=("disk0",))
    )
    assert [d.backend for d in rec.disks] == ["rbd"]
    assert fake_rbd.made == {f"rbd:volumes/e-disk1@ff-{rec.id}"}
    async with Service(Config(state_dir=tmp_path / "h", database_url=catalog_db.url)) as svc:
        # A removal that fails keeps the record (and what is left in Ceph), lock released.
        fake_rbd.fail_delete = True
        with pytest.raises(StorageError) as err:
            await svc.delete_snapshot(rec.id)
        assert err.value.code == "ceph-unreachable"
        assert (await catalog.get_snapshot(rec.id)).disks == rec.disks
        assert fake_rbd.made == {f"rbd:volumes/e-disk1@ff-{rec.id}"}
        assert await catalog.vm_lock_holder("e") is None
        # Busy VM: refused with the lock's code, nothing touched.
        await catalog.acquire_vm_lock("e", "someone-else@host:1", purpose="snapshot")
        fake_rbd.fail_delete = False
        with pytest.raises(BusyError):
            await svc.delete_snapshot(rec.id)
        assert fake_rbd.made
        await catalog.release_vm_lock("e", "someone-else@host:1")
        # Again, by prefix: the snapshots go, then the record.
        deleted = await svc.delete_snapshot(rec.id[:8])
    assert deleted.record.id == rec.id
    assert fake_rbd.made == set()
    assert fake_rbd.ops[-1] == "rbd-delete"
    with pytest.raises(NotFoundError):
        await catalog.get_snapshot(rec.id)


async def test_delete_of_a_running_snapshot_is_refused(catalog: Catalog) -> None:
    from datetime import UTC, datetime

    from freezeframe.engine.delete import delete_snapshot
    from freezeframe.models import SnapshotRecord

    rec = SnapshotRecord(
        id="feedbeef0001",
        vm="gone",
        created_at=datetime.now(UTC),
        status=SnapshotStatus.RUNNING,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.NONE,
    )
    await catalog.begin_snapshot(rec)
    with pytest.raises(UsageError) as err:
        await delete_snapshot(catalog, rec)
    assert err.value.code == "snapshot-running"
    assert (await catalog.get_snapshot(rec.id)).status is SnapshotStatus.RUNNING


def test_vm_add_stores_ceph_settings_paths_only(ff: Any, tmp_path: Path) -> None:
    import json

    res = ff("vm", "add", "web", "--qmp", str(tmp_path / "q.sock"), "--ceph-conf",
             "/etc/ceph/c.conf", "--ceph-id", "cinder", "--ceph-keyring",
             "/etc/ceph/ceph.client.cinder.keyring", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ceph_conf"] == "/etc/ceph/c.conf"
    assert doc["ceph_id"] == "cinder"
    assert doc["ceph_keyring"] == "/etc/ceph/ceph.client.cinder.keyring"
    assert "key" not in doc
    bad = ff("vm", "add", "web2", "--qmp", str(tmp_path / "q.sock"), "--ceph-id", "no spaces",
             "--json")  # fmt: skip
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["code"] == "invalid-argument"


class _HangingImages:
    """Open images whose snapshot requests never get an answer (a stopped monitor), until
    ``answer`` is set; then they succeed."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.closed = False

    async def create_snaps(self, name: str) -> tuple[()]:
        await asyncio.shield(self.answer.wait())  # librbd's thread is not cancellable
        return ()

    async def close(self) -> None:
        self.closed = True


async def test_an_unanswered_rbd_cut_is_abandoned_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from freezeframe.storage import rbd_backend
    from freezeframe.storage.rbd import CephSettings

    backend = RbdBackend(VmConfig("x", ceph_conf="/c.conf"))
    src = RbdSource("p", "vol")
    handle = backend._handle("abc", [DiskInfo("vdb", "n", src.name, "raw", 0, rbd=src)])
    images = _HangingImages()
    handle.groups[0].settings = CephSettings(Path("/c.conf"), timeout=0.2)
    handle.groups[0].opened = images  # type: ignore[assignment]
    removed: list[str] = []

    async def remove(self: RbdBackend, h: Any) -> None:
        removed.append(h.snap)

    monkeypatch.setattr(rbd_backend.RbdBackend, "_remove", remove)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(StorageError) as err:
        await backend.cut(handle)
    assert loop.time() - t0 < 2.0  # not waiting for the request
    assert err.value.code == "ceph-timeout"
    assert await backend.cut_state(handle) == "not-switched"  # a late snapshot is never kept
    # The abort waits (bounded) for the request; still unanswered: a clean-up waits for it.
    await backend.abort(handle)
    assert removed == []
    assert rbd_backend._REAPERS
    images.answer.set()  # Ceph answers: the late snapshot is removed
    await asyncio.wait_for(asyncio.gather(*rbd_backend._REAPERS), 5)
    assert removed == ["ff-abc"]
    assert images.closed
