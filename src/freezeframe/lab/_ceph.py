"""A throw-away single-node Ceph on 127.0.0.1 for tests, benchmarks and the demo
(``freezeframe lab ceph up|down|status``).

One monitor (``mon.a``), one bluestore OSD (``osd.0``) on a sparse file, optionally a manager
(``mgr.x``), one pool (``rbd``, size 1, application ``rbd``), ``auth none`` — from Debian's
packages, without systemd. Everything lives in one folder, ``<lab dir>/_ceph`` (not a valid lab
VM name): ``ceph.conf``, the daemons' data, pid files, admin sockets and logs, and
``state.json`` (fsid, port, pool, settings, the daemons' PIDs). The daemons daemonize
themselves; :func:`ceph_down` stops them by their recorded PIDs (checked against
``/proc/PID/cmdline`` so a reused PID is never signalled; a zombie counts as stopped).

What makes it start in about 2 s (see measurements.md): the monitor's ``paxos propose
interval`` lowered to 10 ms (``paxos="fast"``; Ceph's default of 1 s, ``paxos="default"``, makes
a start take 8-12 s and every snapshot ~1 s: for benchmarks); the bluestore block path left
unset (a ``block`` file in the OSD's folder); clients get no shared admin socket; ready means a
test object write to the pool succeeded (not HEALTH_OK); the OSD's mkfs runs while the monitor
creates the OSD id and the pool.

``ceph_up`` is idempotent (a running cluster is returned as it is; a stopped one restarts on
its data, with the paxos setting asked for); ``ceph_down`` too (nothing to stop is fine), and
keeps the data unless ``purge``. Errors: DependencyError naming the missing Debian packages,
LabError (codes ``ceph-port-in-use``, ``ceph-start-failed``, ``ceph-not-ready``,
``ceph-running-differently``), NotFoundError (``ceph-not-found``) from :func:`ceph_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe import _tools, paths
from freezeframe._aio import shielded, within
from freezeframe.errors import (
    DependencyError,
    FreezeframeError,
    LabError,
    NotFoundError,
    UsageError,
)
from freezeframe.lab._util import atomic_write, file_lock
from freezeframe.storage.rbd import CephSettings, RbdClient

__all__ = [
    "DEFAULT_PORT",
    "PAXOS_INTERVALS",
    "POOL",
    "CephDaemon",
    "CephDown",
    "CephLab",
    "ceph_dir",
    "ceph_down",
    "ceph_status",
    "ceph_up",
    "check_ceph_dependencies",
]

log = logging.getLogger(__name__)

#: The monitor's ``paxos propose interval`` (seconds) per setting name.
PAXOS_INTERVALS: dict[str, float] = {"fast": 0.01, "default": 1.0}
#: The monitor's msgr2 port on 127.0.0.1 (Ceph's default).
DEFAULT_PORT = 3300
#: The pool of the lab cluster.
POOL = "rbd"
#: Size of the OSD's sparse block file.
OSD_SIZE = 8 << 30

_STATE = "state.json"
_PROBE_OBJECT = "freezeframe-ready"
#: program -> Debian package; ceph-mgr only with ``mgr``.
_PROGRAMS = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "monmaptool": "ceph-base"}
_MODULES = {"rados": "python3-rados", "rbd": "python3-rbd"}
#: Debian packages ``lab ceph`` needs (``apt-get install --no-install-recommends``).
PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common", "python3-rados", "python3-rbd")


@dataclass(frozen=True, slots=True)
class CephDaemon:
    """One daemon of the lab cluster: ``name`` (``mon.a``, ``osd.0``, ``mgr.x``), its recorded
    ``pid`` (0: never started) and whether it is running now."""

    name: str
    pid: int
    running: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "running": self.running}


@dataclass(frozen=True, slots=True)
class CephLab:
    """The lab cluster: where it lives (``dir``, ``conf``), its ``pool``, ``fsid``, monitor
    address, paxos setting, daemons. ``started_in``: seconds the last :func:`ceph_up` took to
    a usable pool (None from :func:`ceph_status`); ``already_running``: that up found it
    running."""

    dir: Path
    conf: Path
    pool: str
    fsid: str
    mon_addr: str
    paxos: str
    paxos_interval: float
    mgr: bool
    daemons: tuple[CephDaemon, ...]
    started_in: float | None = None
    already_running: bool = False

    @property
    def running(self) -> bool:
        return bool(self.daemons) and all(d.running for d in self.daemons)

    def settings(self, *, timeout: float = 10.0) -> CephSettings:
        """Connection settings of a client of this cluster (``client.admin``, no key)."""
        return CephSettings(conf=self.conf, client_id="admin", timeout=timeout)

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "conf": str(self.conf),
            "pool": self.pool,
            "client_id": "admin",
            "fsid": self.fsid,
            "mon_addr": self.mon_addr,
            "paxos": self.paxos,
            "paxos_propose_interval": self.paxos_interval,
            "mgr": self.mgr,
            "running": self.running,
            "daemons": [d.to_json() for d in self.daemons],
            "started_in": self.started_in,
            "already_running": self.already_running,
        }


@dataclass(frozen=True, slots=True)
class CephDown:
    """What :func:`ceph_down` did: the daemons it ``stopped`` (names), whether it ``purged``
    the folder, whether a cluster ``existed`` at all."""

    dir: Path
    stopped: tuple[str, ...]
    purged: bool
    existed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "stopped": list(self.stopped),
            "purged": self.purged,
            "existed": self.existed,
        }


def ceph_dir() -> Path:
    """The lab cluster's folder (not created)."""
    return paths.lab_dir() / "_ceph"


def _lock_path() -> Path:
    return paths.lab_dir() / ".ceph.lock"


def check_ceph_dependencies(*, mgr: bool = False) -> None:
    """Raise DependencyError naming every missing Debian package (programs and the Python
    bindings) the lab cluster needs."""
    missing: list[str] = []
    programs = dict(_PROGRAMS)
    if mgr:
        programs["ceph-mgr"] = "ceph-mgr"
    for program, package in programs.items():
        try:
            _tools.require(program, package)
        except DependencyError:
            missing.append(package)
    for module, package in _MODULES.items():
        if importlib.util.find_spec(module) is None:
            missing.append(package)
    if missing:
        pkgs = " ".join(dict.fromkeys(missing))
        raise DependencyError(
            f"the lab Ceph needs Debian packages that are not installed: {pkgs}",
            package=pkgs,
            hint=f"install them: apt-get install -y --no-install-recommends {pkgs} "
            "(or run scripts/setup.sh as root)",
        )


# --- daemons ---------------------------------------------------------------------------------


def _alive(pid: int, program: str, conf: Path) -> bool:
    """``pid`` is a live (not zombie) ``program`` started with ``conf``."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    if state in ("Z", "X"):
        return False
    if not argv or os.path.basename(argv[0].decode(errors="replace")) != program:
        return False
    return str(conf).encode() in argv


def _program(daemon: str) -> str:
    return f"ceph-{daemon.split('.', 1)[0]}"


async def _stop(daemon: str, pid: int, conf: Path) -> bool:
    """SIGTERM the daemon ``pid`` (if it still is ours), wait up to 10 s, then SIGKILL.
    True if it was running."""
    program = _program(daemon)
    if not _alive(pid, program, conf):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for sig in (signal.SIGKILL, None):
        deadline = time.monotonic() + 10.0
        while _alive(pid, program, conf):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        else:
            return True
        if sig is not None:
            log.warning("lab ceph: %s (pid %d) ignored SIGTERM: SIGKILL", daemon, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    raise LabError(f"lab ceph: {daemon} (pid {pid}) survived SIGKILL", code="ceph-stop-failed")


async def _start(daemon: str, conf: Path, run_dir: Path, log_dir: Path) -> int:
    """Start ``daemon`` (``mon.a``, ``osd.0``, ``mgr.x``): it daemonizes; return its PID (its
    pid file). Raises LabError (``ceph-start-failed``) with its log's tail."""
    ident = daemon.split(".", 1)[1]
    program = _program(daemon)
    pidfile = run_dir / f"{daemon}.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    try:
        await _tools.run(
            program, "-i", ident, "-c", str(conf), timeout=60.0, what=f"start {daemon}"
        )
    except FreezeframeError as exc:
        raise LabError(
            f"lab ceph: {daemon} did not start: {exc.message}\n{_log_tail(log_dir, daemon)}",
            code="ceph-start-failed",
        ) from exc
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _alive(pid, program, conf):
                return pid
        await asyncio.sleep(0.02)
    raise LabError(
        f"lab ceph: {daemon} exited right after starting\n{_log_tail(log_dir, daemon)}",
        code="ceph-start-failed",
    )


def _log_tail(log_dir: Path, daemon: str, lines: int = 8) -> str:
    try:
        text = (log_dir / f"{daemon}.log").read_text(errors="replace")
    except OSError:
        return f"(no log {log_dir / f'{daemon}.log'})"
    tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return f"{log_dir / f'{daemon}.log'}:\n" + "\n".join(tail)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (connections in TIME-WAIT do not count: the
    monitor binds with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# --- state -----------------------------------------------------------------------------------


def _conf_text(d: Path, *, fsid: str, port: int, paxos_interval: float) -> str:
    """The lab cluster's ceph.conf."""
    return f"""# freezeframe lab Ceph: throw-away, single node, auth none. Written by `lab ceph up`.
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
run dir = {d}/run

[mon]
mon data = {d}/mon/$cluster-$id
paxos propose interval = {paxos_interval:g}
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok

[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {OSD_SIZE}
bluestore fsck on mkfs = false
# Each close of the block file waits out one aio poll (250 ms by default): 8 closes per start.
bdev aio poll ms = 10
osd memory target = 1073741824
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok

[mgr]
mgr data = {d}/mgr/$cluster-$id
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok

# Clients (freezeframe, QEMU's rbd driver, the rbd CLI): no shared admin socket, no log file.
[client]
admin socket =
log file =
"""


def _read_state(d: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((d / _STATE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(
            f"lab ceph: unreadable {d / _STATE}: {exc}",
            code="ceph-state-unreadable",
            hint="stop what runs of it by hand, then purge the lab Ceph",
        ) from exc
    if not isinstance(doc, dict) or "fsid" not in doc:
        raise LabError(
            f"lab ceph: {d / _STATE} is not a lab Ceph record", code="ceph-state-unreadable"
        )
    return doc


def _write_state(d: Path, doc: dict[str, Any]) -> None:
    atomic_write(d / _STATE, (json.dumps(doc, indent=2) + "\n").encode())


def _lab_from_state(d: Path, doc: dict[str, Any], **extra: Any) -> CephLab:
    conf = d / "ceph.conf"
    pids: dict[str, int] = {str(k): int(v) for k, v in doc.get("pids", {}).items()}
    names = ["mon.a", "osd.0"] + (["mgr.x"] if doc.get("mgr") else [])
    daemons = tuple(
        CephDaemon(n, pids.get(n, 0), _alive(pids.get(n, 0), _program(n), conf)) for n in names
    )
    paxos = str(doc.get("paxos", "fast"))
    return CephLab(
        dir=d,
        conf=conf,
        pool=str(doc.get("pool", POOL)),
        fsid=str(doc["fsid"]),
        mon_addr=f"127.0.0.1:{int(doc['port'])}",
        paxos=paxos,
        paxos_interval=PAXOS_INTERVALS.get(paxos, 0.0),
        mgr=bool(doc.get("mgr")),
        daemons=daemons,
        **extra,
    )


# --- public ----------------------------------------------------------------------------------


def ceph_status() -> CephLab:
    """The lab cluster as it is now. Raises NotFoundError (``ceph-not-found``) when there is
    none, LabError when its record is unreadable."""
    d = ceph_dir()
    doc = _read_state(d)
    if doc is None:
        raise NotFoundError(
            f"no lab Ceph in {d}", code="ceph-not-found", hint="start the lab Ceph first"
        )
    return _lab_from_state(d, doc)


async def ceph_up(
    *,
    paxos: str | None = None,
    mgr: bool | None = None,
    port: int | None = None,
    timeout: float = 60.0,
) -> CephLab:
    """Start the lab cluster (or return it when it runs already) and wait until a test object
    write to its pool succeeds.

    ``paxos``: ``fast`` (10 ms, the default for a new cluster) or ``default`` (Ceph's 1 s);
    ``mgr``: also run a manager (default no); ``port``: the monitor's port on 127.0.0.1
    (default 3300). A stopped cluster restarts on its data with the ``paxos`` and ``mgr`` asked
    for (default: as before); its port cannot change. A running one is returned as it is, or
    refused (LabError ``ceph-running-differently``) when ``paxos``/``mgr`` ask for something
    else.

    Raises DependencyError (packages missing, all named), UsageError (bad option), LabError
    (``ceph-port-in-use``, ``ceph-start-failed``, ``ceph-not-ready`` after ``timeout``
    seconds: what it started is stopped again)."""
    if paxos is not None and paxos not in PAXOS_INTERVALS:
        raise UsageError(f"--paxos must be one of {', '.join(PAXOS_INTERVALS)}, got {paxos!r}")
    if port is not None and not (1 <= port <= 65535):
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if not (0 < timeout <= 3600):
        raise UsageError(f"--timeout must be in (0, 3600] seconds, got {timeout:g}")
    check_ceph_dependencies(mgr=bool(mgr))
    t0 = time.monotonic()
    async with file_lock(_lock_path(), timeout=120.0, what="lab ceph"):
        d = ceph_dir()
        doc = _read_state(d)
        if doc is not None:
            current = _lab_from_state(d, doc)
            if current.running:
                wanted_paxos = paxos or current.paxos
                wanted_mgr = current.mgr if mgr is None else mgr
                if (
                    wanted_paxos != current.paxos
                    or wanted_mgr != current.mgr
                    or (port is not None and port != int(doc["port"]))
                ):
                    raise LabError(
                        f"lab ceph runs already with paxos {current.paxos}, "
                        f"mgr {'on' if current.mgr else 'off'}, port {doc['port']}",
                        code="ceph-running-differently",
                        hint="stop it first (its data stays), then start it with the new settings",
                    )
                await _wait_ready(current, deadline=t0 + timeout)
                return _lab_from_state(
                    d, doc, started_in=time.monotonic() - t0, already_running=True
                )
            # Partly running (a daemon died, an up was killed): stop the rest, restart.
            await _stop_all(d, doc)
            if port is not None and port != int(doc["port"]):
                raise LabError(
                    f"lab ceph in {d} was made for port {doc['port']}, not {port}",
                    code="ceph-running-differently",
                    hint="purge it first (its images go), or leave the port out",
                )
            doc["paxos"] = paxos or doc.get("paxos", "fast")
            doc["mgr"] = bool(doc.get("mgr")) if mgr is None else mgr
            fresh = not (d / "osd" / "ceph-0" / "mkfs_done").exists()
        else:
            doc = {
                "fsid": str(uuid.uuid4()),
                "osd_uuid": str(uuid.uuid4()),
                "port": port or DEFAULT_PORT,
                "pool": POOL,
                "paxos": paxos or "fast",
                "mgr": bool(mgr),
                "pids": {},
            }
            fresh = True
        if fresh and d.exists():
            shutil.rmtree(d)  # an up killed half-way: start again from nothing
        try:
            await _bring_up(d, doc, fresh=fresh, deadline=t0 + timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await shielded(_stop_all(d, doc))
            raise
        return _lab_from_state(d, doc, started_in=time.monotonic() - t0)


def _prepare_dir(d: Path, doc: dict[str, Any]) -> Path:
    """Create the folders of ``doc``'s cluster in ``d``, write its ceph.conf (readable by
    libvirt's QEMU account) and state; return the conf's path."""
    for sub in ("run", "log", "mon", "osd/ceph-0") + (("mgr/ceph-x",) if doc["mgr"] else ()):
        (d / sub).mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    conf = d / "ceph.conf"
    text = _conf_text(
        d,
        fsid=doc["fsid"],
        port=int(doc["port"]),
        paxos_interval=PAXOS_INTERVALS[doc["paxos"]],
    )
    atomic_write(conf, text.encode())
    conf.chmod(0o644)
    _write_state(d, doc)
    return conf


async def _bring_up(d: Path, doc: dict[str, Any], *, fresh: bool, deadline: float) -> None:
    """Start (``fresh``: first create) the daemons of ``doc`` in ``d``; record their PIDs in
    ``doc`` and its state file as they start; wait for a usable pool."""
    port = int(doc["port"])
    if not _port_free(port):
        raise LabError(
            f"lab ceph: port {port} on 127.0.0.1 is in use (another Ceph monitor?)",
            code="ceph-port-in-use",
            hint="stop what listens there (`ss -ltnp sport = :PORT`), or choose another "
            "port for a new lab Ceph (--port)",
        )
    conf = _prepare_dir(d, doc)
    run_dir, log_dir = d / "run", d / "log"
    pids: dict[str, int] = doc.setdefault("pids", {})

    t0 = time.monotonic()

    def step(what: str) -> None:
        log.debug("lab ceph: %s at %.3f s", what, time.monotonic() - t0)

    async def start(daemon: str) -> None:
        pids[daemon] = await _start(daemon, conf, run_dir, log_dir)
        _write_state(d, doc)
        step(f"{daemon} started (pid {pids[daemon]})")

    if fresh:
        await _tools.run(
            "monmaptool",
            "--create",
            "--clobber",
            "--addv",
            "a",
            f"[v2:127.0.0.1:{port}]",
            "--fsid",
            doc["fsid"],
            str(d / "monmap"),
            what="monmaptool",
        )
        await _tools.run(
            "ceph-mon",
            "--mkfs",
            "-i",
            "a",
            "-c",
            str(conf),
            "--monmap",
            str(d / "monmap"),
            what="ceph-mon --mkfs",
        )
    step("mkfs of mon done" if fresh else "conf written")
    await start("mon.a")
    settings = CephSettings(conf=conf, timeout=max(1.0, min(30.0, deadline - time.monotonic())))
    async with await RbdClient.connect(settings) as client:
        if fresh:
            # The OSD's mkfs (~2 s of bluestore) runs while the monitor makes its id and the pool.
            mkfs = asyncio.ensure_future(
                _tools.run(
                    "ceph-osd",
                    "--mkfs",
                    "-i",
                    "0",
                    "--osd-uuid",
                    doc["osd_uuid"],
                    "-c",
                    str(conf),
                    what="ceph-osd --mkfs",
                )
            )
            try:
                osd_id = await client.mon_command({"prefix": "osd new", "uuid": doc["osd_uuid"]})
                if osd_id not in (0, {"osdid": 0}):
                    raise LabError(
                        f"lab ceph: the monitor gave the OSD id {osd_id!r}, not 0",
                        code="ceph-start-failed",
                    )
                await client.mon_command(
                    {"prefix": "osd pool create", "pool": doc["pool"], "pg_num": 8}
                )
                await client.mon_command(
                    {"prefix": "osd pool application enable", "pool": doc["pool"], "app": "rbd"}
                )
            finally:
                step("pool created")
                await mkfs  # never leave it running: raises its ToolError if it failed
                step("osd mkfs done")
        await start("osd.0")
        if doc["mgr"]:
            await start("mgr.x")
        await _probe(client, doc["pool"], deadline)
        step("test object written")


async def _probe(client: RbdClient, pool: str, deadline: float) -> None:
    """Write a test object to ``pool`` until it succeeds; LabError ``ceph-not-ready``."""
    last: FreezeframeError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            await within(client.write_object(pool, _PROBE_OBJECT, b"ok\n"), left)
            return
        except TimeoutError:
            break
        except FreezeframeError as exc:  # op timed out inside librados, PG not yet there, ...
            last = exc
            await asyncio.sleep(0.05)
    raise LabError(
        f"lab ceph: the pool {pool} took no write in time"
        + (f" (last: {last.message})" if last else ""),
        code="ceph-not-ready",
        hint="see the daemons' logs in the lab Ceph's log folder; a slow host: raise --timeout",
    )


async def _wait_ready(lab: CephLab, *, deadline: float) -> None:
    settings = lab.settings(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
    async with await RbdClient.connect(settings) as client:
        await _probe(client, lab.pool, deadline)


async def _stop_all(d: Path, doc: dict[str, Any]) -> tuple[str, ...]:
    """Stop every recorded daemon (mgr, osd, mon); the names of those that were running."""
    conf = d / "ceph.conf"
    pids: dict[str, int] = {str(k): int(v) for k, v in doc.get("pids", {}).items()}
    stopped = []
    for name in ("mgr.x", "osd.0", "mon.a"):
        if name in pids and await _stop(name, pids[name], conf):
            stopped.append(name)
    return tuple(stopped)


async def ceph_down(*, purge: bool = False) -> CephDown:
    """Stop the lab cluster's daemons by their recorded PIDs (SIGTERM, then SIGKILL after
    10 s); with ``purge`` also delete its folder (every image in it). Nothing to stop is fine.

    Raises LabError when a daemon survives SIGKILL or the record is unreadable (``purge``
    then still deletes the folder after stopping nothing: its daemons must be stopped by
    hand)."""
    d = ceph_dir()
    async with file_lock(_lock_path(), timeout=120.0, what="lab ceph"):
        try:
            doc = _read_state(d)
        except LabError:
            if not purge:
                raise
            doc = {}
        stopped = await _stop_all(d, doc) if doc else ()
        existed = d.exists()
        if purge and existed:
            shutil.rmtree(d)
        return CephDown(dir=d, stopped=stopped, purged=purge and existed, existed=existed)
