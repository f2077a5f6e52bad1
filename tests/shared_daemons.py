"""Session daemons of a parallel test run (pytest-xdist, ``scripts/test.sh`` runs ``-n 2``).

With xdist every worker is a test session of its own, so a ``scope="session"`` fixture runs
once per worker. A daemon such a fixture starts (the PostgreSQL server, libvirtd) must still be
started once per run: never twice on the same socket, port or directory, and never stopped
while another worker uses it. So, under xdist:

- the workers share a *run directory*: the parent of each worker's basetemp, which is the
  controller's basetemp (``/tmp/pytest-of-USER/pytest-N``), new for every run;
- the first worker that needs a daemon starts it while holding ``<run>/<name>.lock`` and
  records it in ``<run>/<name>.json``; the others, under the same lock, attach to it
  (:func:`start_once`);
- no worker stops it: the controller does, by the recorded PID or state, once every worker
  has finished (:func:`stop_recorded`, from ``pytest_sessionfinish`` in tests/conftest.py).

Without xdist (a plain ``pytest``, or ``-n 0``) none of this applies: the fixture starts and
stops its daemon itself.

Tests that share one instance of something costly that a fixture keeps per worker (the lab
Ceph, a module's lab VM, a module's images) are sent to one worker (``xdist_group``, honoured
by ``--dist loadgroup``): :func:`group_items`. The lab Ceph additionally refuses a second
worker (:func:`claim`), so a run with another ``--dist`` fails loudly instead of starting two
clusters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.nodeid import NodeId

from freezeframe.testing.postgres import PostgresError, PostgresServer

REPO = Path(__file__).resolve().parents[1]
LIBVIRTD_SCRIPT = REPO / "scripts" / "libvirtd.sh"
CONTRACT = REPO / "tests" / "contract"


def worker_id(config: pytest.Config) -> str | None:
    """``gw0``, ``gw1``... in an xdist worker; None in a plain session or the controller."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput["workerid"])


def is_controller(config: pytest.Config) -> bool:
    """True in the xdist controller (it runs no test; its workers do)."""
    return worker_id(config) is None and config.pluginmanager.has_plugin("dsession")


def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the workers of this run share (see the module's docstring)."""
    return tmp_path_factory.getbasetemp().parent


@contextlib.contextmanager
def _locked(run: Path, name: str) -> Iterator[Path]:
    """Hold ``<run>/<name>.lock``; yield the record's path ``<run>/<name>.json``."""
    with (run / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield run / f"{name}.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_once(run: Path, name: str, start: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record of daemon ``name`` for this run: ``start()``'s (it starts the daemon and
    returns what :func:`stop_recorded` needs) if no worker started it yet, else the one
    recorded. Whatever ``start`` raises is raised (nothing is recorded then)."""
    with _locked(run, name) as record:
        if record.exists():
            doc: dict[str, Any] = json.loads(record.read_text())
            return doc
        doc = start()
        record.write_text(json.dumps(doc))
        return doc


def claim(run: Path, name: str, worker: str) -> str | None:
    """Claim ``name`` for ``worker`` for this run; None when it is (now) this worker's, else
    the worker that claimed it first."""
    with _locked(run, name) as record:
        if record.exists():
            owner = str(json.loads(record.read_text())["worker"])
            return None if owner == worker else owner
        record.write_text(json.dumps({"worker": worker}))
        return None


# ---------------------------------------------------------------------------- the daemons


def start_postgres() -> dict[str, Any]:
    """Start the run's PostgreSQL server; stale once the controller (this worker's parent)
    is gone, so a killed run's server is reaped by the next start."""
    server = PostgresServer.start(owner_pid=os.getppid())
    return {"base": str(server.base)}


def attach_postgres(doc: dict[str, Any]) -> PostgresServer:
    return PostgresServer.attach(Path(doc["base"]))


def libvirtd_script(command: str, state: Path) -> subprocess.CompletedProcess[str]:
    """``scripts/libvirtd.sh COMMAND`` with the state file ``state`` (what it started)."""
    return subprocess.run(
        ["bash", str(LIBVIRTD_SCRIPT), command],
        env={**os.environ, "FF_LIBVIRTD_STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _stop_postgres(doc: dict[str, Any]) -> str | None:
    try:
        PostgresServer.attach(Path(doc["base"])).stop()
    except PostgresError as exc:
        return str(exc)
    return None


def _stop_libvirtd(doc: dict[str, Any]) -> str | None:
    done = libvirtd_script("stop", Path(doc["state"]))
    return None if done.returncode == 0 else done.stderr


_STOPPERS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "postgres": _stop_postgres,
    "libvirtd": _stop_libvirtd,
}


def stop_recorded(run: Path) -> list[str]:
    """Stop every daemon the workers of this run recorded in ``run`` (the controller, after
    the workers finished). Returns what could not be stopped (empty: all stopped)."""
    problems = []
    for name, stop in _STOPPERS.items():
        with _locked(run, name) as record:
            if not record.exists():
                continue
            why = stop(json.loads(record.read_text()))
            record.unlink()
        if why is not None:
            problems.append(f"{name}: {why}")
    return problems


# ---------------------------------------------------------------------------- test groups


def group_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that must share one worker with ``xdist_group``:

    - every test that uses the lab Ceph (``ceph_lab``): group ``ceph``;
    - the tests of a module whose fixtures live per module or class (a module's lab VM, its
      images) and of the contract suite's modules (their ``lab_pool``, taken through ``rig``
      at run time, is not in the static fixture closure): one group per module, so each is set
      up once, not once per worker.

    xdist (3.8) tells the controller an item's group by appending ``@GROUP`` to
    ``item._nodeid``, which pytest 9 no longer reads (a node's id is ``item._id``, a NodeId):
    its groups were silently lost (the lab Ceph's guard showed it). In a ``--dist loadgroup``
    worker the id is suffixed here, where pytest 9 keeps it; xdist's own suffix then changes
    nothing the scheduler reads (it splits on the last ``@``).
    """
    suffix = worker_id(config) is not None and bool(getattr(config.option, "loadgroup", False))
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        names = item.fixturenames
        defs = item._fixtureinfo.name2fixturedefs
        wide = any(d.scope in ("module", "class", "package") for fd in defs.values() for d in fd)
        if "ceph_lab" in names:
            group = "ceph"
        elif wide or item.path.is_relative_to(CONTRACT):
            group = item.module.__name__ if item.module else item.path.name
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        if suffix and not item.nodeid.endswith(f"@{group}") and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{group}")
