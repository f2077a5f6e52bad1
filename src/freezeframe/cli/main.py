"""The ``freezeframe`` command: one Typer app, one module per subcommand group.

Handlers are thin: they turn arguments into one call on :mod:`freezeframe.service` and render
what it returns (text, or one JSON document with ``--json``); only :func:`main` ever exits the
process. The service's :class:`~freezeframe.service.Config` is built here, from the options,
with the environment as defaults, and handed to the commands (``_common.configure``);
nothing writes the environment.

With ``--json`` among the arguments, an option-parsing error (unknown option, bad choice) is the
same JSON error document on stdout as every other error, exit 2, instead of Click's usage box.
``--json`` may also come before the command (``freezeframe --json vm list``): it is handed on to
the command, which owns its output.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from freezeframe import __version__
from freezeframe.cli import lab, ops, schedule, serve, snapshot, vm
from freezeframe.cli._common import configure, die
from freezeframe.errors import UsageError
from freezeframe.service import Config

app = typer.Typer(
    name="freezeframe",
    help="Consistent snapshots of running QEMU/KVM VMs and all their volumes, with proof.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(lab.app, name="lab")
app.add_typer(vm.app, name="vm")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(schedule.app, name="schedule")
app.command("doctor")(ops.doctor_cmd)
app.command("recover")(ops.recover_cmd)
app.command("serve")(serve.serve_cmd)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freezeframe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress to stderr."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        envvar="FREEZEFRAME_DATABASE_URL",
        help="Catalog database (SQLAlchemy URL); default: SQLite in the state directory.",
    ),
) -> None:
    # The service's configuration, passed to every command (cli._common.config): explicit
    # options first, the environment ($FREEZEFRAME_HOME, ...) as defaults only.
    configure(Config.from_env(database_url=database_url or None))
    level = logging.DEBUG if verbose or os.environ.get("FREEZEFRAME_DEBUG") else logging.WARNING
    if level == logging.DEBUG:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    else:  # an operator reads these: "warning: ...", like the CLI's own messages
        handler = logging.StreamHandler()
        handler.setFormatter(_PlainFormatter("%(levelname)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])


class _PlainFormatter(logging.Formatter):
    """``warning: message`` (level in lower case), without time or logger name."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


#: Options of the root command that take a value (the next argument is not the command).
_ROOT_VALUE_OPTIONS = frozenset({"--database-url"})


def _json_to_command(argv: list[str]) -> list[str]:
    """``argv`` with a ``--json`` given before the command moved behind it (every command
    takes ``--json``; the root command has no output of its own). Before a ``--`` if any."""
    i = 0
    leading: list[str] = []
    moved = False
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        if argv[i] == "--json":
            moved = True
        else:
            leading.append(argv[i])
            if argv[i] in _ROOT_VALUE_OPTIONS and i + 1 < len(argv):
                i += 1
                leading.append(argv[i])
        i += 1
    if not moved:
        return argv
    rest = argv[i:]
    end = rest.index("--") if "--" in rest else len(rest)
    return [*leading, *rest[:end], "--json", *rest[end:]]


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if "--json" not in argv:
        app()  # Click/Typer report usage errors themselves
        return
    try:
        code = app(args=_json_to_command(argv), standalone_mode=False)
    except typer.TyperException as exc:  # Click's UsageError (exit 2) and its other errors
        if getattr(exc, "option_name", None) == "--json":  # no command to hand it on to
            err = UsageError(
                "--json belongs to a command: `freezeframe [--json] COMMAND [ARGS]...` "
                "(no command given, or --json between a group and its command)",
                hint="e.g. `freezeframe vm list --json`; `freezeframe --help` lists the commands",
            )
        else:
            err = UsageError(exc.format_message())
        err.exit_code = exc.exit_code
        die(err, as_json=True)
    except typer.Abort:
        raise SystemExit(1) from None
    # Without standalone mode Click returns the code of a typer.Exit (or the handler's None).
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
