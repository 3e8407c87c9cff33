"""Database engine: SQLAlchemy 2 async on SQLite (aiosqlite) or PostgreSQL (asyncpg), one code path.

SQLite runs every transaction as ``BEGIN IMMEDIATE``: a writer takes the write lock up front,
so concurrent read-then-write transactions queue behind one another instead of failing with
"database is locked" halfway. A :meth:`Database.read_session` only reads: its transactions
begin deferred and never take the write lock (WAL readers never wait for a writer).
PostgreSQL runs at READ COMMITTED; the ledger's balance updates
are single conditional ``UPDATE`` statements, so they need nothing stronger.

A PostgreSQL connection is pinged on every checkout (as SQLAlchemy's ``pool_pre_ping`` would:
three round trips, BEGIN, the ping, ROLLBACK, about 0.3 ms), except one a new connection and one
taken by :meth:`Database.autocommit` with ``ping=False``: the ledger's one-statement hold and
close (:mod:`backend.ledger_pg`), which meet a dead connection by their statement's own failure
and try once more on a fresh, pinged one (safe: each is idempotent by key), so each is one round
trip on a healthy connection. ``ping_after_idle_s`` pings only a connection idle that long; it is
not the default, because under connections dropped mid-operation (``bench.chaos``
postgres-drops) an unpinged connection was once handed out in a state asyncpg refuses ("another
operation is in progress"). A connection that died anyway and fails its first statement
invalidates the pool's older connections, and the ledger tries its operation once more on a
fresh one (:mod:`backend.ledger_write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy import Insert, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Result, make_url
from sqlalchemy.exc import DisconnectionError, InvalidatePoolError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from backend.settings import Settings

SQLITE_BUSY_TIMEOUT_S = 60
READ_ONLY = "cocoon_read_only"  # the execution option of a read session's connections
# Set while a connection is checked out for :meth:`Database.autocommit` without its ping.
_UNPINGED: ContextVar[bool] = ContextVar("cocoon_db_unpinged", default=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(
    url: str, *, ping_after_idle_s: float | None = None, **kwargs: Any
) -> AsyncEngine:
    """An async engine for ``url``; SQLite files get their directory, WAL and immediate writes;
    a server's connections are pinged on every checkout, or only when they were idle
    ``ping_after_idle_s`` or more (never when checked out unpinged: :meth:`Database.autocommit`)."""
    if not is_sqlite(url):
        engine = create_async_engine(url, **kwargs)
        _ping_on_checkout(engine, ping_after_idle_s)
        return engine

    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, pool_size=10, **kwargs
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A read never upgrades to a write, so it cannot deadlock and needs no lock up front.
        deferred = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


def _ping_on_checkout(engine: AsyncEngine, idle_s: float | None) -> None:
    """Ping a connection on its way out of the pool, as ``pool_pre_ping`` does (a new one is
    not pinged; one that fails is replaced, and a dead one invalidates the pool's older ones),
    unless it is checked out unpinged, or ``idle_s`` is set and it was idle less than that."""
    fresh, idle_since = "cocoon_fresh", "cocoon_idle_since"

    @event.listens_for(engine.sync_engine, "connect")
    def _connected(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[fresh] = True

    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[idle_since] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        if record.info.pop(fresh, False) or _UNPINGED.get():
            return
        since = record.info.get(idle_since, 0.0)
        if idle_s is not None and time.monotonic() - since < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # the pool drops it and checks out another
            dead = engine.dialect.is_disconnect(error, dbapi_connection, None)  # type: ignore[arg-type]
            unusable = InvalidatePoolError if dead else DisconnectionError
            raise unusable(f"a pooled connection failed its ping: {error!r}") from error


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """Rows an UPDATE or DELETE matched. A session answers those with a ``CursorResult``, though
    its types promise only a ``Result`` (it cannot for every statement: sqlalchemy#12913)."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"no row count in a {type(result).__name__}: not an UPDATE or DELETE")
    return result.rowcount


def insert_new(dialect: str, table: Any) -> Insert:
    """An INSERT into ``table`` that writes nothing for a row whose unique key is taken
    (``ON CONFLICT DO NOTHING``), on SQLite and PostgreSQL alike."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


class Database:
    """The engine and a session factory, created once per process and closed at exit."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = create_engine(url, **engine_kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = async_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(settings.db_url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def session(self) -> AsyncSession:
        return self.sessions()

    def read_session(self) -> AsyncSession:
        """A session that only reads: on SQLite it never waits for, nor holds, the write lock
        (a write in it would fail with "database is locked" under load: don't)."""
        return self.read_sessions()

    @contextlib.asynccontextmanager
    async def autocommit(self, *, ping: bool = True) -> AsyncIterator[AsyncConnection]:
        """A connection on which each statement is its own transaction (no BEGIN, no COMMIT: a
        single statement is atomic by itself). ``ping=False`` checks it out without the pool's
        ping (three round trips fewer): the caller must then take a dead connection's failure
        as one, and try again on a pinged one."""
        connection = self.engine.connect()
        token = _UNPINGED.set(not ping)
        try:
            await connection.start()
        finally:
            _UNPINGED.reset(token)
        try:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")
        finally:
            await connection.close()

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration (Alembic ``upgrade head``)."""
        from backend.migrate import upgrade_connection

        async with self.engine.begin() as conn:
            await conn.run_sync(upgrade_connection)

    async def close(self) -> None:
        await self.engine.dispose()


def upgrade_database(url: str) -> None:
    """Synchronous entry point for ``cocoon db upgrade``."""

    async def run() -> None:
        db = Database(url)
        try:
            await db.upgrade()
        finally:
            await db.close()

    asyncio.run(run())
