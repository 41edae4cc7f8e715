"""Alembic's environment: runs the migrations on the connection `smi.migrations.migrate` hands over.

There is no alembic.ini: `smi.migrations.config()` builds the configuration, and the
connection (with its lock held) comes in `config.attributes["connection"]`.
"""

from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

import smi.db  # noqa: F401  (registers the tables on SQLModel.metadata, for autogenerate)


def render_item(kind, obj, _autogen_context):
    """sqlmodel's AutoString is a plain VARCHAR: written as sa.String, migrations need no sqlmodel import."""
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String({obj.length or ''})"
    return False  # alembic's default rendering


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `smi migrate` or smi.migrations.migrate(engine)")
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite cannot ALTER most things: autogenerate writes batch (copy-and-move) operations for it.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
