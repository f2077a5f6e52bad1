"""The ``freezeframe`` command: one Typer app, one module per subcommand group.

Handlers are thin: they turn arguments into one call on the async core (engine, lab, catalog)
and print the result; only :func:`main` ever exits the process.
"""

from __future__ import annotations

import logging
import os

import typer

from freezeframe import __version__
from freezeframe.cli import lab, ops, snapshot, vm

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
app.command("doctor")(ops.doctor_cmd)
app.command("recover")(ops.recover_cmd)


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
    if database_url:
        # The catalog reads it from the environment (paths.default_database_url).
        os.environ["FREEZEFRAME_DATABASE_URL"] = database_url
    level = logging.DEBUG if verbose or os.environ.get("FREEZEFRAME_DEBUG") else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
