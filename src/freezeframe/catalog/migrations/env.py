"""Alembic environment of the freezeframe catalog.

Used two ways:

- by :meth:`freezeframe.catalog.Catalog.open`, which passes an open connection (inside a write
  transaction) as ``config.attributes["connection"]``; the migration runs on it and the caller
  commits;
- by a developer running ``alembic -c src/freezeframe/catalog/alembic.ini revision
  --autogenerate -m "..."``: the URL comes from ``-x url=...``, ``$FREEZEFRAME_DATABASE_URL`` or
  the default state directory.

It never configures logging (a library stays silent until the application configures it).
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from freezeframe import paths
from freezeframe.catalog._schema import Base, UtcDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render our column types as plain SQLAlchemy types: migrations never import freezeframe."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        render_as_batch=connection.dialect.name == "sqlite",
    )


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or paths.default_database_url()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def _run_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or paths.default_database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
