"""``freezeframe serve``: the REST API and the dashboard in one long-running process.

A thin command: it parses ``--listen``, gets the token
(:func:`freezeframe.api.load_or_create_token`), opens the service (with background thaw
follow-ups, as a server should), and runs
:func:`freezeframe.api.create_app` under uvicorn. SIGTERM / SIGINT stop it gracefully: no new
connections or jobs, the event streams that follow nothing end, every running snapshot and
verify finishes (a freeze is always followed by its thaw), then the process exits 0. The
token is never printed or logged: only the file that holds it.

It also runs the snapshot schedules (:class:`freezeframe.service.Scheduler`): a due schedule
is claimed in the catalog (several servers on one catalog run each slot once), snapshotted as
a job of the server (the same path as ``POST /v1/vms/{vm}/snapshots``), then pruned; a run
missed while no server ran is run once at start. On SIGTERM the scheduler claims no more
runs, a scheduled snapshot under way finishes (or thaws) like every other job, and the prune
after it is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import typer

from freezeframe.cli._common import config, err_console, run
from freezeframe.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8787"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port). Raises UsageError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise UsageError(
            f"--listen takes HOST:PORT, got {value!r}", hint="e.g. --listen 127.0.0.1:8787"
        )
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"--listen: port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: uvicorn (h11) writes a response's head and
        # body separately, and with Nagle on the body waited for the client's delayed ACK of
        # the head, ~40 ms per request on a keep-alive connection (measured: list p50 52 ms
        # -> 6 ms, /healthz 44 -> 2 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another address with --listen HOST:PORT",
        ) from exc
    sock.set_inheritable(True)
    return sock


def serve_cmd(
    listen: str = typer.Option(
        DEFAULT_LISTEN, "--listen", metavar="HOST:PORT", help="Address to listen on (port 0: any)."
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="File holding the API token (mode 0600); default: <state dir>/api-token, "
        "generated at the first start.",
    ),
    schedule_poll: float = typer.Option(
        5.0,
        "--schedule-poll",
        metavar="SECONDS",
        min=0.1,
        help="Re-read the schedules at least every SECONDS (a schedule set by another "
        "process is seen within it).",
    ),
) -> None:
    """Serve the REST API (/v1, /metrics, /openapi.json) and the web dashboard (/), and run
    the snapshot schedules that are due (`freezeframe schedule set`)."""
    import uvicorn

    from freezeframe.api import create_app, load_or_create_token
    from freezeframe.service import Scheduler, Service

    class _Server(uvicorn.Server):
        """uvicorn's server with our signal handling: the process drains its jobs before it
        exits instead of re-raising the signal when uvicorn is done (its default)."""

        def __init__(self, cfg: uvicorn.Config, on_stop: Callable[[], None]) -> None:
            super().__init__(cfg)
            self._on_stop = on_stop

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # installed by go() with loop.add_signal_handler

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self._on_stop()
            super().handle_exit(sig, frame)

    async def go() -> None:
        host, port = parse_listen(listen)
        cfg = dataclasses.replace(config(), followup=True)
        token, token_path = load_or_create_token(cfg.state_dir, token_file)
        sock = _bind(host, port)
        svc = await Service.open(cfg)
        app = create_app(svc, token=token, token_path=token_path)
        state = app.state.ff
        # due schedules run as snapshot jobs of this server (counted, refused once stopping)
        state.scheduler = Scheduler(svc, start=state.start_snapshot, poll=schedule_poll)
        scheduling = asyncio.get_running_loop().create_task(state.scheduler.run())
        server = _Server(
            uvicorn.Config(app, log_config=None, lifespan="off", access_log=True),
            state.begin_stop,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        if not _loopback(host):
            log.warning(
                "listening on %s, beyond this host: the API token and the dashboard's session "
                "travel unencrypted (plain HTTP); put a TLS proxy in front",
                host,
            )
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        err_console.print(
            f"freezeframe serve: listening on http://{shown}:{bound_port}/ "
            f"(API token in {token_path})",
            markup=False,
            highlight=False,
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            state.scheduler.stop()
            running = len(svc.jobs) + len(svc.verify_jobs) + len(state.scheduler.running)
            if running:
                err_console.print(
                    f"freezeframe serve: waiting for {running} running job(s) to finish",
                    markup=False,
                )
            await state.drain()
            # its runs under way end (a snapshot's thaw is never cut short)
            await asyncio.gather(scheduling, return_exceptions=True)
            await svc.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            sock.close()
        err_console.print("freezeframe serve: stopped", markup=False)

    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.INFO)
    run(go)
