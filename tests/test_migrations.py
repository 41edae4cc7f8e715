"""Schema migrations (smi/migrations): from empty to the models exactly, idempotent, adopting a database
made by create_all, and safe when the API and several workers start together. SQLite, or PostgreSQL with
SMI_TEST_POSTGRES_URL set."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, create_engine, event, inspect
from sqlmodel import Session, SQLModel, select

from smi.db import LedgerEntry, make_engine, utcnow
from smi.migrations import INITIAL, INITIAL_TABLES, config, current, head, migrate
from tests.conftest import database_url

ROOT = Path(__file__).resolve().parent.parent


def _plain_engine(tmp_path: Path):
    """An engine on a fresh database that nothing has migrated."""
    return create_engine(database_url(tmp_path))


def _differences(engine, metadata: MetaData = SQLModel.metadata) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)


def test_upgrade_from_empty_gives_exactly_the_models(tmp_path):
    engine = _plain_engine(tmp_path)
    assert migrate(engine) == head()
    # A model changed in smi/db.py without a migration fails here: write one with
    # `.venv/bin/python -m smi.migrations revision "what changed"` and review it.
    assert _differences(engine) == []

    # The comparison does see a difference when there is one (a column the database lacks).
    changed = MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["jobs"].append_column(Column("not_migrated", Integer))
    assert [d[0] for d in _differences(engine, changed)] == ["add_column"]


def test_upgrade_twice_changes_nothing(tmp_path):
    url = database_url(tmp_path)
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        session.add(LedgerEntry(job_id="j1", purpose="revenue", revenue_usd=5.0, created_at=utcnow()))
        session.commit()

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    assert migrate(engine) == head()
    assert statements and all(s.lstrip().upper().startswith(("SELECT", "PRAGMA")) for s in statements), statements

    again = make_engine(url)
    migrate(again)  # what every process start does
    with Session(again) as session:
        assert [e.job_id for e in session.exec(select(LedgerEntry))] == ["j1"]
    with again.connect() as connection:
        assert current(connection) == head()


def test_making_an_engine_changes_no_schema(tmp_path):
    """Migrating is a step of its own at process start: a read-only command (`smi usage`) creates nothing."""
    engine = make_engine(database_url(tmp_path))
    with engine.connect() as connection:
        assert inspect(connection).get_table_names() == [] and current(connection) is None
    migrate(engine)
    with engine.connect() as connection:
        assert "jobs" in inspect(connection).get_table_names() and current(connection) == head()


def test_database_made_by_create_all_is_stamped(tmp_path):
    engine = _plain_engine(tmp_path)
    # What make_engine did before migrations: create_all of the tables there were then (revision 0001's).
    SQLModel.metadata.create_all(engine, tables=[SQLModel.metadata.tables[name] for name in INITIAL_TABLES])
    SQLModel.metadata.tables["job_events"].drop(engine)  # as in a database older than that table
    with Session(engine) as session:
        session.add(LedgerEntry(job_id="j1", purpose="revenue", revenue_usd=5.0, created_at=utcnow()))
        session.commit()

    assert migrate(engine) == head()  # no "table already exists"
    with engine.connect() as connection:
        assert current(connection) == head()
    assert _differences(engine) == []
    with Session(engine) as session:
        assert [e.job_id for e in session.exec(select(LedgerEntry))] == ["j1"]


def test_initial_revision_creates_the_tables_it_names(tmp_path):
    """INITIAL_TABLES (what a create_all database is checked against when stamped) matches revision 0001."""
    engine = _plain_engine(tmp_path)
    with engine.connect() as connection:
        command.upgrade(config(connection), INITIAL)
        connection.commit()
        assert set(inspect(connection).get_table_names()) == set(INITIAL_TABLES) | {"alembic_version"}


STARTER = """
import sys, time
from pathlib import Path
from smi.db import make_engine
from smi.migrations import current, migrate
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():  # everything imported: all starters now migrate at the same moment
    time.sleep(0.001)
engine = make_engine(url)
migrate(engine)
with engine.connect() as connection:
    print(current(connection))
"""


def test_starters_migrating_at_once_all_succeed(tmp_path):
    """The API and three workers starting together on a fresh database: one migrates, the others wait for it."""
    url = database_url(tmp_path)
    go = tmp_path / "go"
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, url, str(tmp_path / f"ready{i}"), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [starter.communicate(timeout=60) for starter in starters]
    for starter, (out, err) in zip(starters, results, strict=True):
        assert starter.returncode == 0, err
        assert out.strip() == head()
    assert _differences(create_engine(url)) == []
