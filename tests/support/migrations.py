"""Migrate once per test run, replay after: a test's new database gets the newest schema from
the statements the real migration ran, not from Alembic again.

Every database test starts from an empty SQLite file or an empty PostgreSQL schema and calls
``Database.upgrade()``. Alembic's own work (loading 13 revision scripts, rendering each
operation, SQLite's batch copies) costs far more than the SQL it sends: about 0.15 s a test on
SQLite and 0.36 s on PostgreSQL. So the first upgrade of an empty database on each dialect runs
the real migration and records every statement it sends (``before_cursor_execute``); each
later upgrade of an empty database on that dialect sends the same statements, in one
transaction, without Alembic. Reads (``SELECT``, ``SHOW``, ``PRAGMA`` queries) and the
transaction's own ``BEGIN``/``COMMIT`` are left out: on an empty database the reads' answers
never change what follows.

What this does not touch: a database that is not empty (a test that migrates to a revision
and on from there) always gets the real migration, and test_migrations drives Alembic
directly. ``test_migrations.py`` checks that a replayed schema is the migrated one, row for row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from backend.db import Database

REAL_UPGRADE = Database.upgrade
_READS = ("select", "show")
_TRANSACTIONS = ("begin", "commit", "rollback", "savepoint", "release")


@dataclass
class Recording:
    """The statements one real migration of an empty database sent, in order."""

    statements: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, statement: str, parameters: Any, executemany: bool) -> None:
        head = statement.split(None, 1)[0].lower() if statement.strip() else ""
        if head in _READS or head in _TRANSACTIONS:
            return
        if head == "pragma" and "=" not in statement.split("(", 1)[0]:
            return  # a PRAGMA query, not a PRAGMA setting
        if executemany:
            parameters = list(parameters)
        self.statements.append((statement, parameters))


_recordings: dict[str, Recording] = {}


def recording(database: Database) -> Recording | None:
    """What this run recorded on ``database``'s dialect (``None``: nothing yet)."""
    return _recordings.get(database.engine.dialect.name)


def empty(connection: Connection) -> bool:
    """No table at all in the database (SQLite) or the current schema (PostgreSQL)."""
    if connection.dialect.name == "sqlite":
        query = "SELECT count(*) FROM sqlite_master"
    else:
        query = (
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema())"
            " + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE n.nspname = current_schema())"
        )
    return connection.execute(text(query)).scalar_one() == 0


def replay(connection: Connection, recording: Recording) -> None:
    for statement, parameters in recording.statements:
        connection.exec_driver_sql(statement, parameters)


async def upgrade(self: Database) -> None:
    """``Database.upgrade`` for tests: the real migration the first time on each dialect,
    its recorded statements after (an empty database only)."""
    earlier = recording(self)
    async with self.engine.begin() as conn:
        is_empty = await conn.run_sync(empty)
        if is_empty and earlier is not None:
            await conn.run_sync(replay, earlier)
            return
    if not is_empty:
        await REAL_UPGRADE(self)
        return
    recorded = Recording()

    def listen(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        recorded.add(statement, parameters, executemany)

    event.listen(self.engine.sync_engine, "before_cursor_execute", listen)
    try:
        await REAL_UPGRADE(self)
    finally:
        event.remove(self.engine.sync_engine, "before_cursor_execute", listen)
    _recordings.setdefault(self.engine.dialect.name, recorded)


@pytest.fixture(scope="session", autouse=True)
def migrate_once() -> Iterator[None]:
    """Every ``Database.upgrade()`` in this run replays the first real migration (above)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Database, "upgrade", upgrade)
        yield
