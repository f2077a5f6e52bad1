"""A throw-away PostgreSQL server for tests and benches (Debian's ``postgresql-15``).

Owns one cluster in a temporary directory of its own: ``initdb`` and ``pg_ctl start`` run as an
unprivileged account (PostgreSQL refuses root: the ``postgres`` system account, else
``nobody``; a non-root caller runs it as itself), listening on a unix socket in that directory
and, when asked, on 127.0.0.1 at a free port. Durability is switched off (``fsync``,
``synchronous_commit``, ``full_page_writes``): nothing in it is meant to outlive the test.
:meth:`PostgresServer.stop` signals the postmaster by the PID in ``postmaster.pid`` (no
systemd, no ``pg_ctlcluster``), waits for it to exit and removes the directory.

Typical use (the session fixture ``postgres`` of ``tests/conftest.py`` does this once per
session)::

    with PostgresServer.start() as pg:
        pg.create_database("t1")
        catalog = await Catalog.open(pg.url("t1"))

From a shell (benches, by hand): ``scripts/postgres.sh start DIR`` prints the URL of database
``freezeframe``; ``scripts/postgres.sh stop DIR`` stops it and removes DIR. Both call
``python -m freezeframe.testing.postgres``.

A server started for a process (``owner_pid``) that died without stopping it is stopped and
removed by the next :meth:`PostgresServer.start` (see :func:`reap_stale`). Errors: every
failure to start or stop raises :class:`PostgresError` (a RuntimeError: this is test tooling,
not part of freezeframe's error tree) naming the step and the server's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = ["PG_BINDIR", "PostgresError", "PostgresServer", "available", "reap_stale"]

log = logging.getLogger(__name__)

#: Debian's PostgreSQL 15 programs (``$FREEZEFRAME_PG_BINDIR`` overrides).
PG_BINDIR = Path(os.environ.get("FREEZEFRAME_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
#: Name prefix of the temporary directories (under ``tempfile.gettempdir()``).
PREFIX = "ff-pg-"
_MARKER = "freezeframe-postgres.json"
_SUPERUSER = "postgres"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresError(RuntimeError):
    """The throw-away server could not be started, used or stopped."""


def available() -> str | None:
    """None when a server can be started here, else why not (names the Debian package)."""
    for prog in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BINDIR / prog).is_file():
            return f"{PG_BINDIR / prog} is missing (apt-get install postgresql-15)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "Python module psycopg is missing (apt-get install python3-psycopg)"
    return None


def _account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as; None: as this process (not root)."""
    if os.geteuid() != 0:
        return None
    for name in (_SUPERUSER, "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise PostgresError("no unprivileged account (postgres, nobody) to run PostgreSQL as")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _postmaster_pid(data: Path) -> int | None:
    """The PID in ``data/postmaster.pid`` if that process is a live postgres, else None."""
    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"postgres" not in cmdline or not _pid_alive(pid):
        return None  # the pid was reused by another program: not ours to signal
    return pid


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class PostgresServer:
    """One running throw-away cluster. Get one with :meth:`start`; stop it with :meth:`stop`
    (or use it as a context manager)."""

    base: Path
    port: int
    tcp: bool
    pid: int

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the unix socket ``.s.PGSQL.<port>`` is."""
        return self.base

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def start(
        cls, base: Path | None = None, *, tcp: bool = False, owner_pid: int | None = None
    ) -> PostgresServer:
        """initdb + start a cluster in ``base`` (a new temporary directory by default; an
        existing ``base`` must be empty). ``tcp``: listen on 127.0.0.1 at a free port too.
        ``owner_pid``: the process whose death makes the server stale (default: this one;
        0: never stale, e.g. started from a shell script).

        Raises:
            PostgresError: PostgreSQL is not installed, or initdb/start failed (the message
                holds the end of the server's log).
        """
        why = available()
        if why is not None:
            raise PostgresError(why)
        reap_stale()
        if base is None:
            base = Path(tempfile.mkdtemp(prefix=PREFIX))
        else:
            base.mkdir(parents=True, exist_ok=True)
            if any(base.iterdir()):
                raise PostgresError(f"{base} is not empty")
        base.chmod(0o755)
        account = _account()
        owner = os.getpid() if owner_pid is None else owner_pid
        (base / _MARKER).write_text(json.dumps({"owner_pid": owner}))
        if account is not None:
            os.chown(base, *account)
        port = _free_port() if tcp else 5432
        try:
            cls._initdb(base, account, port, tcp)
            cls._run(
                account,
                "pg_ctl",
                "-D", str(base / "data"),
                "-l", str(base / "server.log"),
                "-w", "-t", "60", "-s",
                "start",
            )  # fmt: skip
            pid = _postmaster_pid(base / "data")
            if pid is None:
                raise PostgresError(f"pg_ctl started no server in {base}")
        except PostgresError as exc:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join((base / "server.log").read_text().splitlines()[-20:])
            cls._cleanup(base)
            raise PostgresError(f"{exc}\n{tail}".rstrip()) from exc
        except BaseException:
            cls._cleanup(base)
            raise
        server = cls(base=base, port=port, tcp=tcp, pid=pid)
        log.info("PostgreSQL started in %s (pid %d)", base, pid)
        return server

    @classmethod
    def attach(cls, base: Path) -> PostgresServer:
        """The server running in ``base`` (started by :meth:`start`, maybe by another process).

        Raises:
            PostgresError: no live server there.
        """
        pid = _postmaster_pid(base / "data")
        if pid is None:
            raise PostgresError(f"no PostgreSQL server is running in {base}")
        port = 5432
        tcp = False
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = (base / "data" / "postmaster.pid").read_text().splitlines()
            port = int(lines[3])
            tcp = lines[5].strip() != ""  # the first listen address; empty: socket only
        return cls(base=base, port=port, tcp=tcp, pid=pid)

    @classmethod
    def _initdb(cls, base: Path, account: tuple[int, int] | None, port: int, tcp: bool) -> None:
        cls._run(
            account,
            "initdb",
            "-D", str(base / "data"),
            "-U", _SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'" if tcp else "''",
            "port": str(port),
            "unix_socket_directories": f"'{base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] '",
            # Not UTC on purpose: what the catalog stores must not depend on the server's zone.
            "timezone": "'Asia/Kolkata'",
        }
        with (base / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# freezeframe.testing.postgres: a throw-away server\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    @staticmethod
    def _run(account: tuple[int, int] | None, prog: str, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        try:
            done = subprocess.run(
                [str(PG_BINDIR / prog), *args],
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                user=None if account is None else account[0],
                group=None if account is None else account[1],
                extra_groups=None if account is None else [],
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresError(f"{prog} failed: {exc}") from exc
        if done.returncode != 0:
            raise PostgresError(f"{prog} failed ({done.returncode}): {done.stderr.strip()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown, SIGINT to its PID; SIGKILL if it has not exited
        after ``timeout``) and remove its directory. Idempotent.

        Raises:
            PostgresError: it would not exit even after SIGKILL.
        """
        self._stop_pid(self.base, timeout)
        self._cleanup(self.base)

    @staticmethod
    def _stop_pid(base: Path, timeout: float) -> None:
        pid = _postmaster_pid(base / "data")
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        if _wait_gone(pid, timeout):
            return
        log.warning("PostgreSQL pid %d did not stop in %.0f s: killed", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10):
            raise PostgresError(f"PostgreSQL pid {pid} ({base}) does not exit")

    @classmethod
    def _cleanup(cls, base: Path) -> None:
        cls._stop_pid(base, 10)
        shutil.rmtree(base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ databases

    def url(self, database: str = "postgres", *, via_tcp: bool = False) -> str:
        """SQLAlchemy URL (driver psycopg) of ``database``: over the unix socket, or over
        127.0.0.1 when ``via_tcp`` (the server must have been started with ``tcp=True``)."""
        if via_tcp:
            if not self.tcp:
                raise PostgresError("this server does not listen on TCP (start it with tcp=True)")
            return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql+psycopg://{_SUPERUSER}@/{database}?host={host}&port={self.port}"

    def _admin(self, sql: str) -> None:
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.socket_dir),
                port=self.port,
                user=_SUPERUSER,
                dbname="postgres",
                autocommit=True,
            ) as conn:
                conn.execute(sql.encode())
        except psycopg.Error as exc:
            raise PostgresError(f"{sql}: {exc}") from exc

    def create_database(self, name: str, *, template: str = "template0") -> str:
        """CREATE DATABASE ``name`` as a copy of ``template`` (empty by default; a template
        must have no open connection while it is copied). Returns its URL.

        Raises:
            PostgresError: bad name, exists, or the template is in use.
        """
        for n in (name, template):
            if not _DB_NAME.match(n):
                raise PostgresError(f"bad database name {n!r}")
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ``name`` (IF EXISTS), closing any connection still open to it."""
        if not _DB_NAME.match(name):
            raise PostgresError(f"bad database name {name!r}")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def reset_database(self, name: str) -> None:
        """Make ``name`` empty again, much faster than dropping and creating it: close every
        other connection to it, then drop and re-create its schema ``public`` (every table,
        sequence and type the catalog makes lives there).

        Raises:
            PostgresError: it could not be emptied (drop it instead).
        """
        import psycopg

        if not _DB_NAME.match(name):
            raise PostgresError(f"bad database name {name!r}")
        sql = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid();"
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public"
        )
        try:
            with psycopg.connect(
                host=str(self.socket_dir),
                port=self.port,
                user=_SUPERUSER,
                dbname=name,
                autocommit=True,
            ) as conn:
                conn.execute(sql.encode())
        except psycopg.Error as exc:
            raise PostgresError(f"cannot reset database {name}: {exc}") from exc

    def mark_template(self, name: str) -> None:
        """Allow ``name`` to be copied by :meth:`create_database` (``IS_TEMPLATE``)."""
        if not _DB_NAME.match(name):
            raise PostgresError(f"bad database name {name!r}")
        self._admin(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true')


def reap_stale(tmp: Path | None = None) -> list[Path]:
    """Stop and remove servers of :data:`PREFIX` directories whose owner process is gone
    (a test session that was killed). Servers started with ``owner_pid=0`` are left alone.
    Returns the directories removed. Never raises."""
    removed: list[Path] = []
    root = tmp or Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for base in root.glob(f"{PREFIX}*"):
            try:
                owner = int(json.loads((base / _MARKER).read_text())["owner_pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if owner == 0 or _pid_alive(owner):
                continue
            try:
                PostgresServer._cleanup(base)
            except PostgresError as exc:
                log.warning("cannot remove stale PostgreSQL in %s: %s", base, exc)
                continue
            log.info("removed stale PostgreSQL in %s (owner pid %d gone)", base, owner)
            removed.append(base)
    return removed


def main(argv: list[str] | None = None) -> int:
    """``python -m freezeframe.testing.postgres start|stop|url DIR [--tcp]``."""
    parser = argparse.ArgumentParser(prog="python -m freezeframe.testing.postgres")
    parser.add_argument("command", choices=("start", "stop", "url"))
    parser.add_argument("dir", type=Path, help="the server's directory (created by start)")
    parser.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 too")
    parser.add_argument("--database", default="freezeframe", help="database start creates")
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    try:
        if args.command == "start":
            server = PostgresServer.start(base, tcp=args.tcp, owner_pid=0)
            server.create_database(args.database)
            print(server.url(args.database, via_tcp=args.tcp))
        elif args.command == "stop":
            if not (base / _MARKER).is_file():
                raise PostgresError(f"{base} holds no server started by this tool: left alone")
            PostgresServer._cleanup(base)
        else:
            print(PostgresServer.attach(base).url(args.database))
    except PostgresError as exc:
        print(f"postgres: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
