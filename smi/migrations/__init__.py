"""Schema migrations (alembic), applied by every process at start (`make_engine`) and by `smi migrate`.

The migrations ship inside the package (this folder: env.py, versions/), and alembic is
configured here in code, so no alembic.ini is needed. New migration, after changing a
model in smi/db.py (review what it writes; tests/test_migrations.py fails until one exists):

    .venv/bin/python -m smi.migrations revision "what changed"   (see __main__.py)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, inspect, select

log = logging.getLogger("smi.migrations")
# Alembic logs two INFO lines per connection it looks at, i.e. at every process start: this module logs what changed.
logging.getLogger("alembic").setLevel(logging.WARNING)

HERE = Path(__file__).parent
INITIAL = "0001"
# The tables of revision 0001, i.e. what create_all made before migrations existed.
INITIAL_TABLES = (
    "jobs",
    "job_events",
    "submissions",
    "ledger",
    "upsampler_calls",
    "budget_alerts",
    "budget_releases",
    "download_tokens",
    "refunds",
    "sent_mail",
)
PG_LOCK_KEY = 0x534D49_0001  # pg_advisory_xact_lock key: any fixed number, the same in every process


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache
def head() -> str:
    """The newest revision; read from versions/ once per process."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migration in {HERE / 'versions'}")
    return revision


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine) -> str:
    """Brings the database to the newest revision and returns it. Safe to run from many processes
    at once: the work happens under a lock, and whoever comes second finds it done."""
    with engine.connect() as connection:  # the usual case, every start after the first: one cheap query
        if current(connection) == head():
            return head()
    with _locked(engine) as connection:
        revision = current(connection)
        if revision is None and inspect(connection).has_table("jobs"):
            _stamp_create_all_database(connection)
            revision = INITIAL
            log.info("database made before migrations (by create_all): stamped at revision %s", INITIAL)
        if revision != head():
            command.upgrade(config(connection), "head")
            log.info("database migrated from revision %s to %s", revision or "(empty)", head())
        connection.commit()
    return head()


def _stamp_create_all_database(connection: Connection) -> None:
    """A database made by `SQLModel.metadata.create_all` (before migrations existed) holds 0001's tables
    but no alembic_version: it is marked as being at 0001 instead of failing on "table exists". One older
    than some of those tables (e.g. job_events) gets them first, as create_all used to add them."""
    from sqlmodel import SQLModel

    SQLModel.metadata.create_all(connection, tables=[SQLModel.metadata.tables[name] for name in INITIAL_TABLES])
    command.stamp(config(connection), INITIAL)


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the database's migration lock until it ends. DDL is
    transactional in both databases, so a migration that fails leaves nothing half done."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(PG_LOCK_KEY)))
        elif engine.dialect.name == "sqlite":
            # Python's sqlite3 runs DDL outside any transaction unless one is begun by hand; IMMEDIATE also
            # takes SQLite's write lock, so a second starter waits here (busy timeout) and then finds it done.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection
