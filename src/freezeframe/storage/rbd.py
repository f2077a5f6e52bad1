"""Ceph RBD images and their snapshots, through librbd/librados (Debian's ``python3-rbd`` and
``python3-rados``).

Owns:

- :class:`CephSettings`: how to reach a cluster (``ceph.conf`` path, client id, keyring path,
  optionally the key itself). The key never appears in ``repr``, logs, error messages or
  :meth:`CephSettings.to_json`.
- :class:`RbdClient`: one cluster connection; images (exists, size, create, remove) and their
  snapshots (list, create, remove; never protected, so removal needs no unprotect), snapshots
  of several images made in parallel over the one connection (:meth:`RbdClient.create_snaps`,
  all or nothing; or :meth:`RbdClient.open_images` before the freeze and
  :meth:`OpenImages.create_snaps` inside it), and the removal of every snapshot an attempt
  made (:meth:`RbdClient.remove_ff_snaps`, for recover and abort).
- The name convention of the snapshots freezeframe makes: ``ff-<snapshot id>``
  (:func:`snap_name`, :func:`snapshot_id_of`), so ``rbd snap ls pool/image`` tells which
  freezeframe snapshot made each.
- QEMU's options for an rbd block node (:func:`qemu_blockdev`), with ``snapshot=`` for a
  read-only view of a snapshot (for verify).

Every blocking librados/librbd call runs in a worker thread of the client's own thread pool
(never on the event loop; a pool of its own so that N images really are snapshotted at once,
whatever else uses asyncio's default executor). The bindings are imported lazily: a missing one
is a :class:`~freezeframe.errors.DependencyError` naming its Debian package. Every librados /
librbd error is translated here, once, into :class:`~freezeframe.errors.StorageError` (re-exported
here) with a stable ``code`` (:data:`CODES`) and the Ceph ``errno`` as data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno as _errno
import functools
import importlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from freezeframe._aio import AsyncClosing, shielded
from freezeframe.errors import DependencyError, StorageError

__all__ = [
    "CODES",
    "SNAP_PREFIX",
    "CephSettings",
    "OpenImages",
    "RbdClient",
    "RbdImageRef",
    "RbdSnap",
    "StorageError",
    "libraries",
    "qemu_blockdev",
    "qemu_blockdev_json",
    "snap_name",
    "snapshot_id_of",
    "translate_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Prefix of the RBD snapshots freezeframe makes: ``ff-<snapshot id>``.
SNAP_PREFIX = "ff-"

#: The stable codes of :class:`StorageError`.
CODES = (
    "ceph-config",  # the conf file is missing / unreadable, or a setting is invalid
    "ceph-unreachable",  # no monitor answered (stopped, wrong address) in time
    "ceph-timeout",  # connected, but an operation got no answer in time (OSD down, ...)
    "ceph-permission-denied",  # the client's key / caps do not allow it
    "rbd-pool-not-found",
    "rbd-image-not-found",
    "rbd-snapshot-not-found",
    "rbd-image-exists",
    "rbd-snapshot-exists",
    "rbd-busy",  # EBUSY / ENOTEMPTY: a protected snapshot, an image in use or with snapshots
    "rbd-failed",  # anything else (errno kept)
)

_NAME_RE = re.compile(r"^[^/@\s]+$")


@dataclass(frozen=True, slots=True)
class CephSettings:
    """How to reach a Ceph cluster: ``conf`` (a ceph.conf: monitors, options), ``client_id``
    (``admin`` for ``client.admin``), ``keyring`` (a keyring file; None: the conf's or Ceph's
    default), ``key`` (the secret itself, instead of a keyring; never shown), ``timeout``
    (seconds for the connection and for each operation, so a dead cluster fails instead of
    hanging)."""

    conf: Path
    client_id: str = "admin"
    keyring: Path | None = None
    key: str | None = field(default=None, repr=False)
    timeout: float = 10.0

    def __repr__(self) -> str:
        key = ", key=<hidden>" if self.key else ""
        return (
            f"CephSettings(conf={str(self.conf)!r}, client_id={self.client_id!r}, "
            f"keyring={None if self.keyring is None else str(self.keyring)!r}{key}, "
            f"timeout={self.timeout:g})"
        )

    __str__ = __repr__

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when nothing)."""
        out = []
        if not self.conf.is_absolute():
            out.append(f"the ceph.conf path must be absolute, got {str(self.conf)!r}")
        if not self.client_id or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.client_id):
            out.append(f"invalid Ceph client id {self.client_id!r}")
        if self.keyring is not None and not self.keyring.is_absolute():
            out.append(f"the keyring path must be absolute, got {str(self.keyring)!r}")
        if not (0 < self.timeout <= 3600):
            out.append(f"the Ceph timeout must be in (0, 3600] seconds, got {self.timeout:g}")
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe view: the key only as ``key_set``."""
        return {
            "conf": str(self.conf),
            "client_id": self.client_id,
            "keyring": None if self.keyring is None else str(self.keyring),
            "key_set": self.key is not None,
            "timeout": self.timeout,
        }

    def scrub(self, text: str) -> str:
        """``text`` with the key (if any) replaced by ``<hidden>``."""
        return text.replace(self.key, "<hidden>") if self.key else text


@dataclass(frozen=True, slots=True, order=True)
class RbdImageRef:
    """An RBD image: ``pool/image`` (``pool/namespace/image`` with a namespace)."""

    pool: str
    image: str
    namespace: str = ""

    def __post_init__(self) -> None:
        for what, value in (("pool", self.pool), ("image", self.image)):
            if not _NAME_RE.match(value):
                raise StorageError(
                    f"invalid RBD {what} name {value!r}", code="ceph-config", target=value
                )
        if self.namespace and not _NAME_RE.match(self.namespace):
            raise StorageError(f"invalid RBD namespace {self.namespace!r}", code="ceph-config")

    @classmethod
    def parse(cls, spec: str) -> RbdImageRef:
        """``pool/image`` or ``pool/namespace/image`` (an ``rbd:`` prefix is allowed).

        Raises StorageError (``ceph-config``) on anything else."""
        parts = spec.removeprefix("rbd:").split("/")
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        if len(parts) == 3:
            return cls(parts[0], parts[2], parts[1])
        raise StorageError(
            f"not an RBD image spec (pool/image): {spec!r}", code="ceph-config", target=spec
        )

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.pool}/{ns}{self.image}"


@dataclass(frozen=True, slots=True)
class RbdSnap:
    """One snapshot of an image: its ``name``, Ceph's ``id`` and the image ``size`` then."""

    name: str
    id: int
    size: int

    @property
    def snapshot_id(self) -> str | None:
        """The freezeframe snapshot that made it, or None (not an ``ff-`` snapshot)."""
        return snapshot_id_of(self.name)


def snap_name(snapshot_id: str) -> str:
    """The RBD snapshot name of the freezeframe snapshot ``snapshot_id``: ``ff-<id>``.

    Raises StorageError (``ceph-config``) for an id that cannot be part of a snapshot name."""
    if not snapshot_id or not re.fullmatch(r"[A-Za-z0-9_.-]+", snapshot_id):
        raise StorageError(
            f"cannot name an RBD snapshot after snapshot id {snapshot_id!r}", code="ceph-config"
        )
    return f"{SNAP_PREFIX}{snapshot_id}"


def snapshot_id_of(name: str) -> str | None:
    """The freezeframe snapshot id in an RBD snapshot ``name`` (``ff-<id>``), else None."""
    if name.startswith(SNAP_PREFIX) and len(name) > len(SNAP_PREFIX):
        return name[len(SNAP_PREFIX) :]
    return None


# --- the libraries ---------------------------------------------------------------------------


def libraries() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules, imported on first use.

    Raises DependencyError naming the Debian package (``python3-rados``, ``python3-rbd``) when
    one is missing (in a virtual environment: created with ``--system-site-packages``?)."""
    mods = []
    for module, package in (("rados", "python3-rados"), ("rbd", "python3-rbd")):
        try:
            mods.append(importlib.import_module(module))
        except ImportError as exc:
            raise DependencyError(
                f"the Python binding of lib{module} (module {module!r}) is not installed",
                package=package,
                hint=f"install it: apt-get install -y {package} (a virtual environment must be "
                "created from /usr/bin/python3 with --system-site-packages to see it)",
            ) from exc
    return mods[0], mods[1]


_ENOENT_CODES = {
    "pool": "rbd-pool-not-found",
    "image": "rbd-image-not-found",
    "snapshot": "rbd-snapshot-not-found",
    "conf": "ceph-config",
}
_EEXIST_CODES = {"image": "rbd-image-exists", "snapshot": "rbd-snapshot-exists"}


def translate_error(
    exc: BaseException,
    *,
    what: str,
    target: str,
    about: str = "image",
    connecting: bool = False,
    settings: CephSettings | None = None,
) -> StorageError:
    """The :class:`StorageError` for a librados/librbd exception ``exc`` raised while doing
    ``what`` on ``target``. ``about`` says what a "not found" / "exists" means here (``pool``,
    ``image``, ``snapshot``, ``conf``); ``connecting``: the error came while connecting (a
    timeout then means no monitor answered). The key of ``settings`` is scrubbed from the
    message. Never raises."""
    err = getattr(exc, "errno", None)
    err = abs(err) if isinstance(err, int) else None
    name = type(exc).__name__
    if err is None:  # some binding classes carry no errno: use their names
        err = {
            "ObjectNotFound": _errno.ENOENT,
            "ImageNotFound": _errno.ENOENT,
            "ObjectExists": _errno.EEXIST,
            "ImageExists": _errno.EEXIST,
            "ImageBusy": _errno.EBUSY,
            "ObjectBusy": _errno.EBUSY,
            "PermissionError": _errno.EPERM,
            "PermissionDenied": _errno.EACCES,
            "TimedOut": _errno.ETIMEDOUT,
            "Timeout": _errno.ETIMEDOUT,
        }.get(name)
    hint = None
    if err == _errno.ENOENT:
        code = _ENOENT_CODES.get(about, "rbd-failed")
    elif err == _errno.EEXIST:
        code = _EEXIST_CODES.get(about, "rbd-failed")
    elif err in (_errno.EBUSY, _errno.ENOTEMPTY):  # ENOTEMPTY: an image that has snapshots
        code = "rbd-busy"
    elif err in (_errno.EACCES, _errno.EPERM):
        code = "ceph-permission-denied"
        hint = "check the client id and its keyring / key and the client's caps"
    elif err in (_errno.ETIMEDOUT, _errno.ESHUTDOWN, _errno.ECONNREFUSED, _errno.ENOTCONN):
        code = "ceph-unreachable" if connecting else "ceph-timeout"
        hint = "is the cluster up? (monitors reachable from this host, OSDs up: `ceph -s`)"
    elif connecting:
        code = "ceph-unreachable"
        hint = "is the cluster up? (monitors reachable from this host: `ceph -s`)"
    else:
        code = "rbd-failed"
    detail = str(exc).strip() or name
    if err is not None and f"errno {err}" not in detail and _errno.errorcode.get(err):
        detail = f"{detail} ({_errno.errorcode[err]})"
    message = f"{what} {target}: {detail}"
    if settings is not None:
        message = settings.scrub(message)
    return StorageError(message, code=code, errno=err, target=target, hint=hint)


def _is_ceph_error(exc: BaseException, rados: Any, rbd: Any) -> bool:
    return isinstance(exc, rados.Error | rbd.Error)


# --- the client ------------------------------------------------------------------------------


class RbdClient(AsyncClosing):
    """One connection to a Ceph cluster, for RBD images and their snapshots.

    Open it with ``async with await RbdClient.connect(settings) as client:`` (or call
    :meth:`close`). Every method raises :class:`StorageError` on a Ceph failure (codes in
    :data:`CODES`); none leaves a half-made state unless it says so. Safe to use from several
    tasks at once (librados/librbd are thread-safe; each call opens what it needs)."""

    def __init__(
        self,
        settings: CephSettings,
        cluster: Any,
        pool: concurrent.futures.ThreadPoolExecutor,
        rados: Any,
        rbd: Any,
    ) -> None:
        """Use :meth:`connect`."""
        self._settings = settings
        self._cluster = cluster
        self._pool = pool
        self._rados = rados
        self._rbd = rbd
        self._closed = False

    def __repr__(self) -> str:
        return f"RbdClient({self._settings!r}, closed={self._closed})"

    @property
    def settings(self) -> CephSettings:
        return self._settings

    @classmethod
    async def connect(cls, settings: CephSettings, *, workers: int = 8) -> RbdClient:
        """Connect to the cluster of ``settings`` (at most ``settings.timeout`` seconds).
        ``workers``: how many librbd calls may run at once (images snapshotted in parallel).

        Raises DependencyError (bindings missing), StorageError ``ceph-config`` (bad settings,
        conf missing) or ``ceph-unreachable`` / ``ceph-permission-denied``. Nothing stays open
        on failure."""
        problems = settings.problems()
        if problems:
            raise StorageError("; ".join(problems), code="ceph-config", target=str(settings.conf))
        if not settings.conf.is_file():
            raise StorageError(
                f"Ceph configuration {settings.conf} does not exist",
                code="ceph-config",
                target=str(settings.conf),
            )
        rados, rbd = libraries()
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="ff-rbd"
        )
        t = settings.timeout
        conf = {
            "client_mount_timeout": f"{t:g}",
            "rados_mon_op_timeout": f"{t:g}",
            "rados_osd_op_timeout": f"{t:g}",
            # A shared admin socket path makes every second client fail to bind it.
            "admin_socket": "",
        }
        if settings.keyring is not None:
            conf["keyring"] = str(settings.keyring)

        def open_cluster() -> Any:
            cluster = rados.Rados(
                conffile=str(settings.conf), rados_id=settings.client_id, conf=conf
            )
            try:
                if settings.key is not None:
                    cluster.conf_set("key", settings.key)
                cluster.connect(timeout=max(1, math.ceil(t)))
            except BaseException:
                with contextlib.suppress(Exception):
                    cluster.shutdown()
                raise
            return cluster

        opening = pool.submit(open_cluster)
        try:
            cluster = await asyncio.wrap_future(opening)
        except BaseException as exc:
            if not opening.done():  # cancelled (a caller's timeout) while the thread connects
                opening.add_done_callback(_shutdown_late)
            pool.shutdown(wait=False)
            if isinstance(exc, Exception) and _is_ceph_error(exc, rados, rbd):
                raise translate_error(
                    exc,
                    what="cannot connect to the Ceph cluster of",
                    target=str(settings.conf),
                    about="conf",
                    connecting=True,
                    settings=settings,
                ) from exc
            raise
        log.debug("rbd: connected (%s)", settings)
        return cls(settings, cluster, pool, rados, rbd)

    async def close(self) -> None:
        """Disconnect (waits for calls still running). Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self._pool, self._cluster.shutdown)
        self._pool.shutdown(wait=False)

    # -- plumbing -------------------------------------------------------------------------

    async def _call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        target: str,
        about: str = "image",
    ) -> T:
        """Run ``fn`` in the client's thread pool; translate a Ceph error (StorageError)."""
        if self._closed:
            raise StorageError(f"{what} {target}: the Ceph connection is closed",
                               code="ceph-unreachable", target=target)  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        except Exception as exc:
            if _is_ceph_error(exc, self._rados, self._rbd):
                raise translate_error(
                    exc, what=what, target=target, about=about, settings=self._settings
                ) from exc
            raise

    def _ioctx(self, ref: RbdImageRef) -> Any:
        """Blocking: an I/O context of ``ref``'s pool (and namespace). Raises the binding's
        error (ENOENT: the pool)."""
        ioctx = self._cluster.open_ioctx(ref.pool)
        if ref.namespace:
            ioctx.set_namespace(ref.namespace)
        return ioctx

    def _with_image(self, ref: RbdImageRef, fn: Callable[[Any], T], *, read_only: bool) -> T:
        """Blocking: open ``ref`` and run ``fn(image)``; close everything. A failure to open
        the pool or the image is re-raised as :class:`_OpenFailed` (see :meth:`_run_image`),
        so that ENOENT / EEXIST of ``fn`` itself can mean the snapshot."""

        def on_pool(ioctx: Any) -> T:
            try:
                image = self._rbd.Image(ioctx, ref.image, read_only=read_only)
            except self._rbd.Error as exc:
                raise _OpenFailed(exc, "image") from exc
            with image:
                return fn(image)

        return self._with_pool(ref, on_pool)

    async def _run_image(
        self,
        ref: RbdImageRef,
        fn: Callable[[Any], T],
        *,
        what: str,
        read_only: bool = False,
        about: str = "image",
        snap: str | None = None,
    ) -> T:
        target = f"{ref}@{snap}" if snap else str(ref)
        try:
            return await self._call(
                functools.partial(self._with_image, ref, fn, read_only=read_only),
                what=what,
                target=target,
                about=about,
            )
        except _OpenFailed as exc:
            raise translate_error(
                exc.cause, what=what, target=target, about=exc.about, settings=self._settings
            ) from exc.cause

    def _with_pool(self, ref: RbdImageRef, fn: Callable[[Any], T]) -> T:
        """Blocking: open ``ref``'s pool (and namespace) and run ``fn(ioctx)``; close it. A
        missing pool is re-raised as :class:`_OpenFailed`, so ENOENT / EEXIST of ``fn`` itself
        can mean the image."""
        try:
            ioctx = self._ioctx(ref)
        except self._rados.ObjectNotFound as exc:
            raise _OpenFailed(exc, "pool") from exc
        try:
            return fn(ioctx)
        finally:
            ioctx.close()

    async def _run_pool(self, ref: RbdImageRef, fn: Callable[[Any], T], *, what: str) -> T:
        try:
            return await self._call(
                functools.partial(self._with_pool, ref, fn), what=what, target=str(ref)
            )
        except _OpenFailed as exc:
            raise translate_error(
                exc.cause, what=what, target=str(ref), about="pool", settings=self._settings
            ) from exc.cause

    # -- cluster --------------------------------------------------------------------------

    async def mon_command(self, cmd: Mapping[str, Any]) -> Any:
        """Send one monitor command (``{"prefix": "osd pool create", ...}``); return its
        parsed JSON output (None when it printed nothing or not JSON).

        Raises StorageError (``rbd-failed`` with Ceph's errno and message on a refusal)."""
        doc = dict(cmd)
        doc.setdefault("format", "json")
        prefix = str(doc.get("prefix", "?"))

        def call() -> tuple[int, bytes, str]:
            ret, out, status = self._cluster.mon_command(
                json.dumps(doc), b"", timeout=max(1, math.ceil(self._settings.timeout))
            )
            return int(ret), bytes(out), str(status)

        ret, out, status = await self._call(call, what="monitor command", target=prefix)
        if ret != 0:
            err = abs(ret)
            code = "ceph-timeout" if err == _errno.ETIMEDOUT else "rbd-failed"
            raise StorageError(
                self._settings.scrub(
                    f"monitor command {prefix}: {status.strip() or _errno.errorcode.get(err)}"
                ),
                code=code,
                errno=err,
                target=prefix,
            )
        if not out.strip():
            return None
        try:
            return json.loads(out)
        except ValueError:
            return None

    async def pool_exists(self, pool: str) -> bool:
        """Whether ``pool`` exists."""
        return bool(
            await self._call(
                functools.partial(self._cluster.pool_exists, pool),
                what="look up pool",
                target=pool,
                about="pool",
            )
        )

    async def write_object(self, pool: str, name: str, data: bytes) -> None:
        """Write (replace) the object ``name`` in ``pool``: proves the pool takes writes.

        Raises StorageError (``rbd-pool-not-found``, ``ceph-timeout`` when no OSD serves it)."""

        def call() -> None:
            ioctx = self._cluster.open_ioctx(pool)
            try:
                ioctx.write_full(name, data)
            finally:
                ioctx.close()

        await self._call(call, what="write object to pool", target=f"{pool}/{name}", about="pool")

    # -- images ---------------------------------------------------------------------------

    async def image_exists(self, ref: RbdImageRef) -> bool:
        """Whether ``ref`` exists. Raises StorageError (``rbd-pool-not-found``, ...)."""
        try:
            await self.image_size(ref)
        except StorageError as exc:
            if exc.code == "rbd-image-not-found":
                return False
            raise
        return True

    async def image_size(self, ref: RbdImageRef) -> int:
        """The size of ``ref`` in bytes. Raises StorageError (``rbd-image-not-found``, ...)."""
        return int(
            await self._run_image(ref, lambda img: img.size(), what="size of", read_only=True)
        )

    async def create_image(self, ref: RbdImageRef, size: int) -> None:
        """Create the image ``ref`` of ``size`` bytes (Ceph's default features: layering,
        exclusive-lock, object-map, fast-diff, deep-flatten).

        Raises StorageError (``rbd-image-exists``, ``rbd-pool-not-found``, ...)."""
        await self._run_pool(
            ref, lambda ioctx: self._rbd.RBD().create(ioctx, ref.image, size), what="create image"
        )

    async def remove_image(self, ref: RbdImageRef, *, with_snaps: bool = False) -> None:
        """Remove the image ``ref``; with ``with_snaps`` its snapshots first (else an image
        with snapshots is refused, ``rbd-busy``). Raises StorageError."""
        if with_snaps:
            for snap in await self.list_snaps(ref):
                await self.remove_snap(ref, snap.name, missing_ok=True)
        await self._run_pool(
            ref, lambda ioctx: self._rbd.RBD().remove(ioctx, ref.image), what="remove image"
        )

    async def evict_watchers(self, ref: RbdImageRef) -> tuple[str, ...]:
        """Blocklist every other client that watches ``ref`` (this one excepted): the OSD
        drops their watches at once, and a lock one of them held can be taken at once, instead
        of after Ceph's watch timeout (30 s by default) when that client died without closing
        the image (a killed QEMU or process). Only for clients known to be gone: a live client
        blocklisted loses its access to the cluster. Returns the addresses blocklisted.

        Raises StorageError (``rbd-image-not-found``, ...)."""

        def watchers(img: Any) -> list[str]:
            return [str(w["addr"]) for w in img.watchers_list()]

        addrs = await self._run_image(ref, watchers, what="list watchers of", read_only=True)
        mine = str(await self._call(self._cluster.get_addrs, what="addresses of", target="self"))
        evicted = tuple(a for a in addrs if a not in mine)
        for addr in evicted:
            await self._call(
                functools.partial(self._cluster.blocklist_add, addr, 600),
                what="blocklist",
                target=addr,
            )
        return evicted

    async def list_images(self, pool: str) -> tuple[str, ...]:
        """The names of the images in ``pool``, sorted."""

        def call() -> list[str]:
            ioctx = self._cluster.open_ioctx(pool)
            try:
                return list(self._rbd.RBD().list(ioctx))
            finally:
                ioctx.close()

        return tuple(sorted(await self._call(call, what="list images of", target=pool,
                                             about="pool")))  # fmt: skip

    # -- snapshots ------------------------------------------------------------------------

    async def list_snaps(self, ref: RbdImageRef) -> tuple[RbdSnap, ...]:
        """The snapshots of ``ref``, oldest first. Raises StorageError."""

        def call(img: Any) -> list[RbdSnap]:
            return [RbdSnap(str(s["name"]), int(s["id"]), int(s["size"])) for s in img.list_snaps()]

        snaps = await self._run_image(ref, call, what="list snapshots of", read_only=True)
        return tuple(sorted(snaps, key=lambda s: s.id))

    async def create_snap(self, ref: RbdImageRef, name: str) -> None:
        """Create the snapshot ``name`` of ``ref`` (unprotected). When another client (QEMU)
        holds the image's exclusive lock, librbd asks it to make the snapshot.

        Raises StorageError (``rbd-snapshot-exists``, ``rbd-image-not-found``, ...)."""
        await self._run_image(
            ref,
            lambda img: img.create_snap(name),
            what="create snapshot",
            about="snapshot",
            snap=name,
        )

    async def remove_snap(self, ref: RbdImageRef, name: str, *, missing_ok: bool = False) -> bool:
        """Remove the snapshot ``name`` of ``ref``; True if it was removed, False if it (or,
        with ``missing_ok``, its image) was not there.

        Raises StorageError (``rbd-snapshot-not-found`` unless ``missing_ok``, ``rbd-busy``
        for a protected snapshot, ...)."""
        try:
            await self._run_image(
                ref,
                lambda img: img.remove_snap(name),
                what="remove snapshot",
                about="snapshot",
                snap=name,
            )
        except StorageError as exc:
            if missing_ok and exc.code in ("rbd-snapshot-not-found", "rbd-image-not-found"):
                return False
            raise
        return True

    async def create_snaps(self, refs: Sequence[RbdImageRef], name: str) -> tuple[RbdImageRef, ...]:
        """Create the snapshot ``name`` of every image of ``refs`` at once (one thread each,
        all over this one connection): all or nothing.

        If any fails, every snapshot already made by this call is removed again (after every
        call has finished, also when the caller is cancelled) and the first failure is raised:
        a StorageError with its code, and ``left`` (the images whose snapshot could not be
        removed again) as data on it. Returns ``refs`` in order."""
        return await _all_or_nothing(
            tuple(refs), name, lambda ref: self.create_snap(ref, name), self._undo
        )

    async def open_images(self, refs: Sequence[RbdImageRef]) -> OpenImages:
        """Open every image of ``refs`` now (before a freeze), so that a cut later only asks
        for the snapshots (:meth:`OpenImages.create_snaps`). Close the result (``async with``).

        Raises StorageError (``rbd-pool-not-found``, ``rbd-image-not-found``, ...; what was
        opened is closed again)."""
        refs = tuple(refs)
        _no_duplicates(refs)

        def open_all() -> tuple[dict[RbdImageRef, Any], list[Any]]:
            ioctxs: dict[tuple[str, str], Any] = {}
            handles: dict[RbdImageRef, Any] = {}
            try:
                for ref in refs:
                    key = (ref.pool, ref.namespace)
                    if key not in ioctxs:
                        try:
                            ioctxs[key] = self._ioctx(ref)
                        except self._rados.ObjectNotFound as exc:
                            raise _OpenFailed(exc, "pool", str(ref)) from exc
                    try:
                        handles[ref] = self._rbd.Image(ioctxs[key], ref.image)
                    except self._rbd.Error as exc:
                        raise _OpenFailed(exc, "image", str(ref)) from exc
            except BaseException:
                _close_all(handles.values(), ioctxs.values())
                raise
            return handles, list(ioctxs.values())

        try:
            handles, ioctxs = await self._call(
                open_all, what="open images", target=", ".join(map(str, refs))
            )
        except _OpenFailed as exc:
            raise translate_error(
                exc.cause,
                what="open image",
                target=exc.target,
                about=exc.about,
                settings=self._settings,
            ) from exc.cause
        return OpenImages(self, handles, ioctxs)

    async def _undo(self, made: Iterable[RbdImageRef], name: str) -> tuple[RbdImageRef, ...]:
        """Remove snapshot ``name`` of each image of ``made`` (in parallel); the images where
        that failed. Never raises a StorageError."""
        made = tuple(made)
        results = await asyncio.gather(
            *(self.remove_snap(ref, name, missing_ok=True) for ref in made),
            return_exceptions=True,
        )
        left = []
        for ref, res in zip(made, results, strict=True):
            if isinstance(res, BaseException):
                log.error("rbd: could not remove snapshot %s@%s again: %s", ref, name, res)
                left.append(ref)
        return tuple(left)

    async def remove_snaps(self, refs: Sequence[RbdImageRef], name: str) -> tuple[RbdImageRef, ...]:
        """Remove the snapshot ``name`` of every image of ``refs`` (in parallel; a missing one
        is fine); return the images it was removed from.

        Raises the first StorageError after every removal was tried."""
        refs = tuple(refs)
        results = await asyncio.gather(
            *(self.remove_snap(ref, name, missing_ok=True) for ref in refs),
            return_exceptions=True,
        )
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return tuple(ref for ref, res in zip(refs, results, strict=True) if res is True)

    async def remove_ff_snaps(
        self, refs: Sequence[RbdImageRef], snapshot_id: str
    ) -> tuple[RbdImageRef, ...]:
        """Remove every RBD snapshot the freezeframe snapshot ``snapshot_id`` made on
        ``refs`` (``ff-<id>``; for recover and abort). Returns the images it was removed from;
        raises the first StorageError after every removal was tried."""
        return await self.remove_snaps(refs, snap_name(snapshot_id))

    async def ff_snapshot_ids(self, ref: RbdImageRef) -> tuple[str, ...]:
        """The freezeframe snapshot ids that have an ``ff-`` snapshot on ``ref``, oldest
        first."""
        return tuple(s.snapshot_id for s in await self.list_snaps(ref) if s.snapshot_id)


def _shutdown_late(opening: concurrent.futures.Future[Any]) -> None:
    """Done-callback of a connection whose caller stopped waiting: shut the cluster handle
    down once the thread has it, so an abandoned connect leaves nothing open."""
    if opening.cancelled() or opening.exception() is not None:
        return
    with contextlib.suppress(Exception):
        opening.result().shutdown()


class _OpenFailed(Exception):
    """Internal: opening the pool or the image (``about``) of ``target`` failed with
    ``cause``."""

    def __init__(self, cause: BaseException, about: str, target: str = "") -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.about = about
        self.target = target


def _close_all(handles: Iterable[Any], ioctxs: Iterable[Any]) -> None:
    """Blocking: close images, then I/O contexts; never raises."""
    for obj in (*handles, *ioctxs):
        try:
            obj.close()
        except Exception as exc:  # closing what is half gone must not hide the real error
            log.warning("rbd: close failed: %s", exc)


def _no_duplicates(refs: Sequence[RbdImageRef]) -> None:
    if len(set(refs)) != len(refs):
        raise StorageError("the same RBD image twice in one cut", code="ceph-config")


async def _all_or_nothing(
    refs: tuple[RbdImageRef, ...],
    name: str,
    create: Callable[[RbdImageRef], Awaitable[None]],
    undo: Callable[[Sequence[RbdImageRef], str], Awaitable[tuple[RbdImageRef, ...]]],
) -> tuple[RbdImageRef, ...]:
    """``create(ref)`` for every ref at once; if any fails (or the caller is cancelled), wait
    for all, ``undo`` what was made, raise the first failure (``left``: what undo could not
    remove). Returns ``refs``."""
    _no_duplicates(refs)
    tasks = [asyncio.ensure_future(create(ref)) for ref in refs]

    async def undo_after() -> tuple[RbdImageRef, ...]:
        await asyncio.wait(tasks)
        made = [ref for ref, t in zip(refs, tasks, strict=True)
                if not t.cancelled() and t.exception() is None]  # fmt: skip
        return await undo(made, name)

    if not tasks:
        return refs
    try:
        # asyncio.wait, not gather: a cancelled caller must not cancel the calls (their
        # threads go on and may still make a snapshot): they are waited for, then undone.
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        await shielded(undo_after())
        raise
    failed = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if not failed:
        return refs
    left = await shielded(undo_after())
    first = failed[0]
    if isinstance(first, StorageError):
        first.left = tuple(str(r) for r in left)
        if left:
            first.message += f"; could not remove the snapshot {name} again from: " + ", ".join(
                str(r) for r in left
            )
    raise first


class OpenImages(AsyncClosing):
    """Images opened ahead of a cut by :meth:`RbdClient.open_images`: :meth:`create_snaps`
    then only asks for the snapshots (measured ~10-15 ms less per cut than opening them in
    the cut). Close it (``async with`` or :meth:`close`); the client must stay open."""

    def __init__(self, client: RbdClient, handles: dict[RbdImageRef, Any], ioctxs: list[Any]):
        self._client = client
        self._handles = handles
        self._ioctxs = ioctxs
        self._closed = False

    @property
    def refs(self) -> tuple[RbdImageRef, ...]:
        return tuple(self._handles)

    async def create_snaps(self, name: str) -> tuple[RbdImageRef, ...]:
        """Create the snapshot ``name`` of every open image at once, all or nothing (as
        :meth:`RbdClient.create_snaps`). Raises StorageError."""
        if self._closed:
            raise StorageError("the images were closed", code="ceph-config", target=name)
        client = self._client

        async def create(ref: RbdImageRef) -> None:
            await client._call(
                functools.partial(self._handles[ref].create_snap, name),
                what="create snapshot",
                target=f"{ref}@{name}",
                about="snapshot",
            )

        return await _all_or_nothing(self.refs, name, create, client._undo)

    async def close(self) -> None:
        """Close the images. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(
                self._client._pool,
                functools.partial(_close_all, self._handles.values(), self._ioctxs),
            )


# --- QEMU ------------------------------------------------------------------------------------


def qemu_blockdev(
    ref: RbdImageRef,
    settings: CephSettings,
    *,
    node_name: str | None = None,
    snapshot: str | None = None,
    key_secret: str | None = None,
    read_only: bool | None = None,
) -> dict[str, Any]:
    """QEMU's ``blockdev-add`` / ``-blockdev`` options of an rbd node for ``ref``:
    ``driver=rbd, pool, image, conf, user`` (+ ``namespace``). With ``snapshot`` the node opens
    that RBD snapshot, read-only (a view of the image at the cut, e.g. under a throw-away
    overlay for verify). ``key_secret``: the id of a QEMU ``secret`` object holding the key
    (QEMU cannot take a keyring path: without it, librbd finds the keyring through the conf).
    The key itself never goes in here."""
    opts: dict[str, Any] = {"driver": "rbd"}
    if node_name:
        opts["node-name"] = node_name
    opts["pool"] = ref.pool
    if ref.namespace:
        opts["namespace"] = ref.namespace
    opts["image"] = ref.image
    opts["conf"] = str(settings.conf)
    opts["user"] = settings.client_id
    if snapshot is not None:
        opts["snapshot"] = snapshot
        read_only = True
    if key_secret is not None:
        opts["key-secret"] = key_secret
    if read_only is not None:
        opts["read-only"] = read_only
    return opts


def qemu_blockdev_json(ref: RbdImageRef, settings: CephSettings, **kwargs: Any) -> str:
    """:func:`qemu_blockdev` as the JSON text ``-blockdev`` takes (and ``json:`` filenames)."""
    return json.dumps(qemu_blockdev(ref, settings, **kwargs), separators=(",", ":"))
