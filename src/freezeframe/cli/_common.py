"""What every CLI subcommand shares: running the async core, printing, errors -> exit codes.

Owns the mapping of :class:`~freezeframe.errors.FreezeframeError` to process exit codes and the
``--json`` convention (a single JSON document on stdout; human text and progress on stderr).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from rich.console import Console

from freezeframe.errors import FreezeframeError

__all__ = ["EXIT_WEAKER", "console", "die", "emit_json", "err_console", "run", "to_jsonable"]

T = TypeVar("T")

#: ``snapshot create`` succeeded but reached a weaker consistency level than asked.
EXIT_WEAKER = 20

console = Console()
err_console = Console(stderr=True)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums, datetimes, paths, tuples -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return obj


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def die(exc: FreezeframeError, *, as_json: bool = False) -> NoReturn:
    """Report ``exc`` (stderr, or a JSON error document) and exit with its code."""
    if as_json:
        doc: dict[str, Any] = {
            "error": type(exc).__name__,
            "message": exc.message,
            "exit_code": exc.exit_code,
        }
        if exc.hint:
            doc["hint"] = exc.hint
        snap = getattr(exc, "snapshot_id", None)
        if snap:
            doc["snapshot_id"] = snap
        emit_json(doc)
    else:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
    raise SystemExit(exc.exit_code)


def run(factory: Callable[[], Coroutine[Any, Any, T]], *, as_json: bool = False) -> T:
    """Run one coroutine of the async core; turn FreezeframeError into its exit code."""

    async def main() -> T:
        # SIGINT and SIGTERM only cancel the work: the engine's cleanup (the thaw above all)
        # runs to its end, and a second Ctrl-C cannot kill it (asyncio.run's own SIGINT
        # handling would raise KeyboardInterrupt and cancel every task, the thaw included).
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        signals = (signal.SIGINT, signal.SIGTERM)
        if task is not None:
            for sig in signals:
                loop.add_signal_handler(sig, task.cancel)
        try:
            return await factory()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        err_console.print("[red]interrupted[/]")
        raise SystemExit(130) from None
    except FreezeframeError as exc:
        die(exc, as_json=as_json)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        raise SystemExit(130) from None
