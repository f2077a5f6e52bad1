"""freezeframe.storage.rbd without a cluster: error translation, secret hiding, names, QEMU
options, the lazy import, and create_snaps' all-or-nothing over fake bindings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import importlib
import json
import logging
import types
from pathlib import Path
from typing import Any

import pytest

from freezeframe.errors import DependencyError, FreezeframeError, StorageError
from freezeframe.storage import rbd as rbdmod
from freezeframe.storage.rbd import (
    CODES,
    CephSettings,
    RbdClient,
    RbdImageRef,
    qemu_blockdev,
    qemu_blockdev_json,
    snap_name,
    snapshot_id_of,
    translate_error,
)

SECRET = "AQBs3cr3tK3yTh4tMustN3v3rSh0w=="


class FakeCephError(Exception):
    """Shaped like the bindings' errors: a message and an ``errno`` attribute."""

    def __init__(self, message: str, err: int | None) -> None:
        super().__init__(message)
        self.errno = err


@pytest.mark.parametrize(
    ("err", "about", "connecting", "code"),
    [
        (errno.ENOENT, "image", False, "rbd-image-not-found"),
        (-errno.ENOENT, "image", False, "rbd-image-not-found"),  # librados' negative codes
        (errno.ENOENT, "pool", False, "rbd-pool-not-found"),
        (errno.ENOENT, "snapshot", False, "rbd-snapshot-not-found"),
        (errno.ENOENT, "conf", True, "ceph-config"),
        (errno.EEXIST, "image", False, "rbd-image-exists"),
        (errno.EEXIST, "snapshot", False, "rbd-snapshot-exists"),
        (errno.EBUSY, "snapshot", False, "rbd-busy"),
        (errno.ENOTEMPTY, "image", False, "rbd-busy"),
        (errno.EACCES, "image", False, "ceph-permission-denied"),
        (errno.EPERM, "image", True, "ceph-permission-denied"),
        (errno.ETIMEDOUT, "image", False, "ceph-timeout"),
        (errno.ETIMEDOUT, "conf", True, "ceph-unreachable"),
        (errno.EINVAL, "conf", True, "ceph-unreachable"),
        (errno.EIO, "image", False, "rbd-failed"),
        (None, "image", False, "rbd-failed"),
    ],
)
def test_translate_error_codes(err: int | None, about: str, connecting: bool, code: str) -> None:
    exc = translate_error(
        FakeCephError("boom", err), what="do", target="p/i", about=about, connecting=connecting
    )
    assert isinstance(exc, StorageError)
    assert isinstance(exc, FreezeframeError)
    assert exc.code == code
    assert code in CODES
    assert exc.errno == (abs(err) if err is not None else None)
    assert exc.target == "p/i"
    assert exc.exit_code == 14
    assert exc.message.startswith("do p/i: boom")


def test_translate_error_without_errno_uses_the_class_name() -> None:
    class ImageNotFound(Exception):
        pass

    class Timeout(Exception):
        pass

    assert translate_error(ImageNotFound("x"), what="w", target="t").code == "rbd-image-not-found"
    assert translate_error(Timeout("x"), what="w", target="t").code == "ceph-timeout"


def test_translate_error_scrubs_the_key() -> None:
    settings = CephSettings(conf=Path("/etc/ceph/ceph.conf"), key=SECRET)
    exc = translate_error(
        FakeCephError(f"bad key {SECRET}", errno.EINVAL),
        what="connect",
        target=f"x{SECRET}",
        connecting=True,
        settings=settings,
    )
    assert SECRET not in str(exc)
    assert SECRET not in exc.message
    assert "<hidden>" in exc.message


def test_settings_never_show_the_key() -> None:
    s = CephSettings(conf=Path("/c/ceph.conf"), client_id="cinder", key=SECRET)
    for text in (repr(s), str(s), f"{s}", json.dumps(s.to_json()), repr([s]), repr({"s": s})):
        assert SECRET not in text
    assert "key=<hidden>" in repr(s)
    assert s.to_json() == {
        "conf": "/c/ceph.conf",
        "client_id": "cinder",
        "keyring": None,
        "key_set": True,
        "timeout": 10.0,
    }
    assert "key=" not in repr(CephSettings(conf=Path("/c/ceph.conf")))
    assert CephSettings(conf=Path("/c/ceph.conf")).to_json()["key_set"] is False


def test_settings_problems() -> None:
    assert CephSettings(conf=Path("/c/ceph.conf")).problems() == []
    assert len(CephSettings(conf=Path("ceph.conf")).problems()) == 1
    assert len(CephSettings(conf=Path("/c"), client_id="a b").problems()) == 1
    assert len(CephSettings(conf=Path("/c"), keyring=Path("k")).problems()) == 1
    assert len(CephSettings(conf=Path("/c"), timeout=0).problems()) == 1


async def test_connect_refuses_bad_settings_and_a_missing_conf(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as bad:
        await RbdClient.connect(CephSettings(conf=Path("rel.conf"), key=SECRET))
    assert bad.value.code == "ceph-config"
    with pytest.raises(StorageError) as missing:
        await RbdClient.connect(CephSettings(conf=tmp_path / "none.conf", key=SECRET))
    assert missing.value.code == "ceph-config"
    assert SECRET not in str(missing.value)
    assert SECRET not in repr(missing.value)


def test_snapshot_names() -> None:
    assert snap_name("0a1b2c3d4e5f") == "ff-0a1b2c3d4e5f"
    assert snapshot_id_of("ff-0a1b2c3d4e5f") == "0a1b2c3d4e5f"
    assert snapshot_id_of("ff-") is None
    assert snapshot_id_of("nova-snap") is None
    for bad in ("", "a/b", "a@b", "a b"):
        with pytest.raises(StorageError) as exc:
            snap_name(bad)
        assert exc.value.code == "ceph-config"


def test_image_refs() -> None:
    assert RbdImageRef.parse("volumes/volume-1") == RbdImageRef("volumes", "volume-1")
    assert RbdImageRef.parse("rbd:volumes/volume-1") == RbdImageRef("volumes", "volume-1")
    ns = RbdImageRef.parse("volumes/tenant/v")
    assert (ns.pool, ns.namespace, ns.image, str(ns)) == (
        "volumes",
        "tenant",
        "v",
        "volumes/tenant/v",
    )
    for bad in ("volume-1", "a/b/c/d", "a/b@snap", "/x"):
        with pytest.raises(StorageError) as exc:
            RbdImageRef.parse(bad)
        assert exc.value.code == "ceph-config"


def test_qemu_blockdev_options() -> None:
    s = CephSettings(conf=Path("/etc/ceph/ceph.conf"), client_id="cinder", key=SECRET)
    ref = RbdImageRef("volumes", "volume-1")
    assert qemu_blockdev(ref, s, node_name="rbd0") == {
        "driver": "rbd",
        "node-name": "rbd0",
        "pool": "volumes",
        "image": "volume-1",
        "conf": "/etc/ceph/ceph.conf",
        "user": "cinder",
    }
    view = qemu_blockdev(RbdImageRef("p", "i", "ns"), s, snapshot="ff-abc", key_secret="sec0")
    assert view["snapshot"] == "ff-abc"
    assert view["read-only"] is True
    assert view["namespace"] == "ns"
    assert view["key-secret"] == "sec0"
    text = qemu_blockdev_json(ref, s, snapshot="ff-abc")
    assert json.loads(text)["snapshot"] == "ff-abc"
    assert SECRET not in text


def test_missing_binding_names_its_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> types.ModuleType:
        if name == "rbd":
            raise ImportError("No module named 'rbd'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(DependencyError) as exc:
        rbdmod.libraries()
    assert exc.value.package == "python3-rbd"
    assert exc.value.code == "dependency-missing"


# --- create_snaps over fake bindings -------------------------------------------------------


class _RadosError(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class _ObjectNotFound(_RadosError):
    pass


class _RbdError(Exception):
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class FakeCluster:
    """Images ``pool/name`` -> set of snapshot names; ``fail`` maps an image to the errno its
    create_snap raises; ``delay`` makes every create_snap take that long (parallel check)."""

    def __init__(self) -> None:
        self.snaps: dict[str, set[str]] = {}
        self.fail: dict[str, int] = {}
        self.delay = 0.0
        self.active = 0
        self.max_active = 0
        self.closed: list[str] = []

    def open_ioctx(self, pool: str) -> Any:
        if pool != "p":
            raise _ObjectNotFound("pool missing", errno.ENOENT)
        return types.SimpleNamespace(close=lambda: None, pool=pool)

    def shutdown(self) -> None:
        pass


def fake_bindings(cluster: FakeCluster) -> tuple[Any, Any]:
    import threading
    import time

    lock = threading.Lock()

    class Image:
        def __init__(self, ioctx: Any, name: str, read_only: bool = False) -> None:
            if name not in cluster.snaps:
                raise _RbdError(f"error opening image {name}", errno.ENOENT)
            self.name = name

        def __enter__(self) -> Image:
            return self

        def close(self) -> None:
            cluster.closed.append(self.name)

        def __exit__(self, *a: object) -> None:
            pass

        def create_snap(self, snap: str) -> None:
            with lock:
                cluster.active += 1
                cluster.max_active = max(cluster.max_active, cluster.active)
            try:
                time.sleep(cluster.delay)
                if self.name in cluster.fail:
                    raise _RbdError("failed to create snapshot", cluster.fail[self.name])
                if snap in cluster.snaps[self.name]:
                    raise _RbdError("exists", errno.EEXIST)
                cluster.snaps[self.name].add(snap)
            finally:
                with lock:
                    cluster.active -= 1

        def remove_snap(self, snap: str) -> None:
            if snap not in cluster.snaps[self.name]:
                raise _RbdError("no snap", errno.ENOENT)
            cluster.snaps[self.name].discard(snap)

        def list_snaps(self) -> list[dict[str, Any]]:
            return [
                {"name": n, "id": i, "size": 1}
                for i, n in enumerate(sorted(cluster.snaps[self.name]))
            ]

    rados = types.SimpleNamespace(Error=_RadosError, ObjectNotFound=_ObjectNotFound)
    rbd = types.SimpleNamespace(Error=_RbdError, Image=Image)
    return rados, rbd


def fake_client(cluster: FakeCluster, settings: CephSettings | None = None) -> RbdClient:
    rados, rbd = fake_bindings(cluster)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    return RbdClient(settings or CephSettings(conf=Path("/x/ceph.conf")), cluster, pool, rados, rbd)


async def test_create_snaps_runs_in_parallel_and_names_them() -> None:
    cluster = FakeCluster()
    cluster.snaps = {"a": set(), "b": set(), "c": set(), "d": set()}
    cluster.delay = 0.2
    refs = [RbdImageRef("p", n) for n in "abcd"]
    async with fake_client(cluster) as client:
        loop = asyncio.get_running_loop()
        t = loop.time()
        assert await client.create_snaps(refs, snap_name("s1")) == tuple(refs)
        assert loop.time() - t < 0.6  # four 0.2 s calls at once, not 0.8 s
    assert cluster.max_active == 4
    assert all(s == {"ff-s1"} for s in cluster.snaps.values())


async def test_create_snaps_is_all_or_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster()
    cluster.snaps = {"a": {"old"}, "b": set(), "c": set()}
    cluster.fail = {"b": errno.EBUSY}
    refs = [RbdImageRef("p", n) for n in "abc"]
    settings = CephSettings(conf=Path("/x/ceph.conf"), key=SECRET)
    caplog.set_level(logging.DEBUG)
    async with fake_client(cluster, settings) as client:
        with pytest.raises(StorageError) as exc:
            await client.create_snaps(refs, "ff-s2")
        assert exc.value.code == "rbd-busy"
        assert exc.value.target == "p/b@ff-s2"
        assert exc.value.left == ()
        # What was made on a and c is gone again; a's own snapshot is untouched.
        assert cluster.snaps == {"a": {"old"}, "b": set(), "c": set()}
        # A missing image: the same, with its code.
        with pytest.raises(StorageError) as missing:
            await client.create_snaps([RbdImageRef("p", "a"), RbdImageRef("p", "zz")], "ff-s3")
        assert missing.value.code == "rbd-image-not-found"
        assert cluster.snaps["a"] == {"old"}
        with pytest.raises(StorageError) as nopool:
            await client.create_snap(RbdImageRef("q", "a"), "ff-s4")
        assert nopool.value.code == "rbd-pool-not-found"
        assert SECRET not in repr(client)
    assert SECRET not in caplog.text


async def test_a_cancelled_create_snaps_waits_and_removes_what_it_made() -> None:
    """Cancelled mid-way (Ctrl-C during the cut): the threads cannot be stopped, so it waits
    for them and removes every snapshot they made before the cancellation goes on."""
    cluster = FakeCluster()
    cluster.snaps = {"a": set(), "b": set(), "c": set()}
    cluster.delay = 0.3
    refs = [RbdImageRef("p", n) for n in "abc"]
    async with fake_client(cluster) as client:
        task = asyncio.ensure_future(client.create_snaps(refs, "ff-s5"))
        await asyncio.sleep(0.1)
        assert cluster.active == 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cluster.active == 0
        assert cluster.snaps == {"a": set(), "b": set(), "c": set()}


async def test_open_images_then_create_snaps() -> None:
    cluster = FakeCluster()
    cluster.snaps = {"a": set(), "b": set()}
    cluster.delay = 0.2
    refs = [RbdImageRef("p", n) for n in "ab"]
    async with fake_client(cluster) as client:
        async with await client.open_images(refs) as images:
            assert images.refs == tuple(refs)
            loop = asyncio.get_running_loop()
            t = loop.time()
            assert await images.create_snaps("ff-o1") == tuple(refs)
            assert loop.time() - t < 0.35  # both at once
            cluster.fail = {"b": errno.EIO}
            with pytest.raises(StorageError) as exc:
                await images.create_snaps("ff-o2")
            assert exc.value.code == "rbd-failed"
            assert exc.value.errno == errno.EIO
        assert sorted(cluster.closed) == ["a", "b"]
        assert cluster.snaps == {"a": {"ff-o1"}, "b": {"ff-o1"}}  # ff-o2 undone on a
        with pytest.raises(StorageError) as closed:
            await images.create_snaps("ff-o3")
        assert closed.value.code == "ceph-config"
        cluster.closed.clear()
        with pytest.raises(StorageError) as missing:
            await client.open_images([refs[0], RbdImageRef("p", "zz")])
        assert missing.value.code == "rbd-image-not-found"
        assert missing.value.target == "p/zz"
        assert cluster.closed == ["a"]  # what was opened is closed again


async def test_remove_ff_snaps_and_ids() -> None:
    cluster = FakeCluster()
    cluster.snaps = {"a": {"ff-s1", "ff-s2", "other"}, "b": {"ff-s1"}, "c": set()}
    refs = [RbdImageRef("p", n) for n in "abc"]
    async with fake_client(cluster) as client:
        assert await client.ff_snapshot_ids(refs[0]) == ("s1", "s2")
        removed = await client.remove_ff_snaps(refs, "s1")
        assert removed == (refs[0], refs[1])
        assert cluster.snaps == {"a": {"ff-s2", "other"}, "b": set(), "c": set()}
        assert await client.remove_snap(refs[2], "ff-s9", missing_ok=True) is False
        with pytest.raises(StorageError) as exc:
            await client.remove_snap(refs[2], "ff-s9")
        assert exc.value.code == "rbd-snapshot-not-found"
    with pytest.raises(StorageError) as closed:
        await client.list_snaps(refs[0])
    assert closed.value.code == "ceph-unreachable"


async def test_a_connect_given_up_on_shuts_the_cluster_down_once_it_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's timeout cancels the wait, not librados' connect in its thread: the handle
    that thread gets later must not stay open (a leaked Ceph client)."""
    import threading

    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    release = threading.Event()
    made: list[Any] = []

    class Rados:
        def __init__(self, **_kw: Any) -> None:
            self.down = False
            made.append(self)

        def conf_set(self, *_a: Any) -> None:
            pass

        def connect(self, timeout: int = 0) -> None:
            release.wait(10)

        def shutdown(self) -> None:
            self.down = True

    rados = types.SimpleNamespace(Rados=Rados, Error=_RadosError, ObjectNotFound=_ObjectNotFound)
    rbd = types.SimpleNamespace(Error=_RbdError)
    monkeypatch.setattr(rbdmod, "libraries", lambda: (rados, rbd))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await RbdClient.connect(CephSettings(conf=conf))
    assert len(made) == 1
    assert not made[0].down  # still connecting in its thread
    release.set()
    for _ in range(100):
        if made[0].down:
            break
        await asyncio.sleep(0.02)
    assert made[0].down
