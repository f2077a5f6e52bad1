"""What every CLI subcommand shares: the service, running it, printing, errors -> exit codes.

Owns the mapping of :class:`~freezeframe.errors.FreezeframeError` to process exit codes and the
``--json`` convention (a single JSON document on stdout, :func:`freezeframe.service.to_document`
with remedies in the CLI's words; human text and progress on stderr). Every decision is the
service's (:mod:`freezeframe.service`); a handler turns arguments into one call and renders.

Exit codes besides the errors': 130 on SIGINT, 143 on SIGTERM (128 + the signal, as a shell
reports a process killed by it); 141 (128 + SIGPIPE) when stdout's reader went away
(``freezeframe snapshot list | head -1``), silently. Output that is not a terminal is never
wrapped. Text from outside (messages, paths, guest and QEMU text) is printed with
:func:`rich.markup.escape` or ``markup=False``: a ``[/tmp/x]`` in it is text, not markup.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from rich.console import Console
from rich.markup import escape

from freezeframe.cli._hints import render
from freezeframe.errors import FreezeframeError
from freezeframe.service import Config, Service, error_document, join_hint, to_document

__all__ = [
    "EXIT_PIPE",
    "EXIT_WEAKER",
    "config",
    "configure",
    "console",
    "die",
    "emit_json",
    "err_console",
    "hint",
    "run",
    "serve",
    "service",
]

T = TypeVar("T")

#: ``snapshot create`` succeeded but reached a weaker consistency level than asked.
EXIT_WEAKER = 20

#: stdout's reader went away (128 + SIGPIPE, what a shell reports for a tool killed by it).
EXIT_PIPE = 128 + signal.SIGPIPE

#: Width of output that is not a terminal: no line is ever wrapped there.
_NO_WRAP_WIDTH = 1 << 16


def _stdout_gone() -> NoReturn:
    """The reader of stdout went away: stop quietly (no traceback, no message), exit 141."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    raise SystemExit(EXIT_PIPE)


class _Console(Console):
    """A Rich console that never hard-wraps output that is not a terminal (Rich's default is
    80 columns there) and ends quietly when its reader goes away."""

    def __init__(self, *, stderr: bool = False) -> None:
        super().__init__(stderr=stderr)
        if not self.is_terminal:
            self.soft_wrap = True
            self.width = _NO_WRAP_WIDTH

    def on_broken_pipe(self) -> None:
        if not self.stderr:
            _stdout_gone()
        # Progress and messages on stderr are a side channel: losing them must not stop a
        # snapshot half-way (this may run inside the freeze window's event loop).
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())


console: Console = _Console()
err_console: Console = _Console(stderr=True)


#: The configuration the root command built (:func:`configure`); one command per process.
_config: list[Config] = []


def configure(cfg: Config) -> None:
    """Set the service configuration of this process's command (the root command does, from
    its options and the environment's defaults)."""
    _config[:] = [cfg]


def config() -> Config:
    """The configuration :func:`configure` set; the defaults (environment) when none was."""
    return _config[0] if _config else Config.from_env()


def service() -> Service:
    """The service of this command (its catalog is opened on first use)."""
    return Service(config())


def serve(fn: Callable[[Service], Coroutine[Any, Any, T]], *, as_json: bool = False) -> T:
    """Run ``fn`` on this command's service (closed afterwards), as :func:`run` does."""

    async def go() -> T:
        async with service() as svc:
            return await fn(svc)

    return run(go, as_json=as_json)


def hint(exc: FreezeframeError) -> str | None:
    """``exc``'s hint in the CLI's words (its remedy as a command line)."""
    return join_hint(exc.hint, exc.remedy, render)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout (exit 141 when its reader went away)."""
    try:
        doc = to_document(obj, render=render)
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


def die(exc: FreezeframeError, *, as_json: bool = False) -> NoReturn:
    """Report ``exc`` (stderr, or a JSON error document) and exit with its code."""
    if as_json:
        emit_json(error_document(exc, render=render))
    else:
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        said = hint(exc)
        if said:
            err_console.print(f"[yellow]hint:[/] {escape(said)}", highlight=False)
    raise SystemExit(exc.exit_code)


def _stopped_by(sig: signal.Signals, detail: str, as_json: bool) -> NoReturn:
    """Exit 128 + ``sig`` (130 Ctrl-C, 143 SIGTERM), saying so on stderr and, with --json, as
    the one JSON error document on stdout."""
    word = "terminated" if sig == signal.SIGTERM else "interrupted"
    err_console.print(f"[red]{word}[/] ({detail})")
    if as_json:
        emit_json(
            {
                "error": "Terminated" if sig == signal.SIGTERM else "Interrupted",
                "code": "terminated" if sig == signal.SIGTERM else "interrupted",
                "message": f"{word} by {sig.name} ({detail})",
                "exit_code": 128 + sig,
                "hint": "every snapshot attempt is recorded with what it left: "
                "`freezeframe snapshot list`; a guest left frozen: `freezeframe recover`",
                "remedy": None,
            }
        )
    raise SystemExit(128 + sig)


def run(factory: Callable[[], Coroutine[Any, Any, T]], *, as_json: bool = False) -> T:
    """Run one coroutine of the async core; turn FreezeframeError into its exit code, SIGINT
    into 130 and SIGTERM into 143 (after the core's cleanup ran)."""
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals, task: asyncio.Task[Any]) -> None:
        received.append(sig)
        task.cancel()

    async def main() -> T:
        # SIGINT and SIGTERM only cancel the work: the engine's cleanup (the thaw above all)
        # runs to its end, and a second Ctrl-C cannot kill it (asyncio.run's own SIGINT
        # handling would raise KeyboardInterrupt and cancel every task, the thaw included).
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        signals = (signal.SIGINT, signal.SIGTERM)
        if task is not None:
            for sig in signals:
                loop.add_signal_handler(sig, on_signal, sig, task)
        try:
            return await factory()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    try:
        result = asyncio.run(main())
        if received:
            # The signal came while the work finished (a library swallowed the cancellation,
            # or it came after the last await): its promise still holds, 130 / 143.
            _stopped_by(received[0], "the work had finished: its result is stored", as_json)
        return result
    except asyncio.CancelledError:
        sig = received[0] if received else signal.SIGINT
        _stopped_by(sig, "the work was cut short: what it left is said above", as_json)
    except FreezeframeError as exc:
        die(exc, as_json=as_json)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        raise SystemExit(130) from None
