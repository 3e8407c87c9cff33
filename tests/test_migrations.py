"""Schema migrations keep what the database already holds and build what the models declare, on
SQLite and PostgreSQL, down to base and back."""

from __future__ import annotations

import datetime as dt
import json

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from backend import notifications
from backend.db import Database
from backend.migrate import alembic_config
from backend.models import Base
from tests.support import migrations


def _migrate(connection: Connection, step: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, step)(config, revision)


def _names(connection: Connection, table: str) -> dict[str, object]:
    schema = inspect(connection)
    return {
        "pk": schema.get_pk_constraint(table)["name"],
        "unique": sorted(u["name"] for u in schema.get_unique_constraints(table)),
        "fk": sorted(f["name"] for f in schema.get_foreign_keys(table)),
        "index": sorted(
            i["name"] for i in schema.get_indexes(table) if "duplicates_constraint" not in i
        ),
    }


async def test_the_outbox_is_renamed_notifications_with_every_row_kept(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0006")
            await conn.execute(
                text(
                    "INSERT INTO users (id, telegram_id, deposit_memo, created_at) "
                    "VALUES (1, 1001, 'memo-one', :now)"
                ),
                {"now": dt.datetime(2026, 11, 30, tzinfo=dt.UTC)},
            )
            told = dt.datetime.now(dt.UTC)
            for key, kind, delivered, data in (
                ("deposit:7", "deposit_credited", None, None),
                ("payout:3:confirmed", "payout_confirmed", told, '{"payout_id": 3}'),
                ("worker:w1:attested:1", "worker_attested", None, '{"worker_id": "w1"}'),
            ):
                await conn.execute(
                    text(
                        "INSERT INTO ton_notifications "
                        "(key, user_id, kind, amount, created_at, delivered_at, data) "
                        "VALUES (:key, 1, :kind, 5, :now, :delivered, :data)"
                    ),
                    {
                        "key": key,
                        "kind": kind,
                        "now": dt.datetime.now(dt.UTC),
                        "delivered": delivered,
                        "data": data,
                    },
                )
            await conn.run_sync(_migrate, "upgrade", "head")
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert "notifications" in tables and "ton_notifications" not in tables
            names = await conn.run_sync(_names, "notifications")
        assert names == {
            "pk": "pk_notifications",
            "unique": ["uq_notifications_key"],
            "fk": ["fk_notifications_user_id_users"],
            "index": ["ix_notifications_user_id"],
        }

        # The rows the bot had not told yet are still to be told, in order, with their details.
        pending = await notifications.pending_notifications(db)
        assert [(n.key, n.user_id, n.amount) for n in pending] == [
            ("deposit:7", 1, 5),
            ("worker:w1:attested:1", 1, 5),
        ]
        assert notifications.notification_data(pending[1]) == {"worker_id": "w1"}
        told = await notifications.find(db, "payout:3:confirmed")
        assert told is not None and told.delivered_at is not None
        # New rows get fresh ids after the old ones, and a key is still written once.
        assert await notifications.notify(db, 1, notifications.NOTIFY_STARS, "stars:x", amount=9)
        assert not await notifications.notify(db, 1, notifications.NOTIFY_STARS, "stars:x")
        new = await notifications.find(db, "stars:x")
        assert new is not None and new.id > max(n.id for n in pending)

        # And back: the downgrade keeps the rows too.
        async with db.engine.begin() as conn:
            await conn.run_sync(_migrate, "downgrade", "0006")
            count = await conn.scalar(text("SELECT count(*) FROM ton_notifications"))
            names = await conn.run_sync(_names, "ton_notifications")
        assert count == 4
        assert names["pk"] == "pk_ton_notifications"
        assert names["index"] == ["ix_ton_notifications_user_id"]
    finally:
        await db.close()


def _drift(connection: Connection) -> list[object]:
    """What the models declare and the migrated database lacks or has besides (empty: none)."""
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_the_migrated_schema_is_the_models_schema(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_drift) == []


async def test_every_revision_goes_down_to_base_and_back_up(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "head")
            assert "ton_payout_batches" in await conn.run_sync(_tables)
            await conn.run_sync(_migrate, "downgrade", "base")
            assert await conn.run_sync(_tables) == {"alembic_version"}
            await conn.run_sync(_migrate, "upgrade", "head")
            assert await conn.run_sync(_drift) == []
    finally:
        await db.close()


def _text(found: object) -> str:
    """One inspector answer as text (an index's ``WHERE`` clause as its SQL, not an object)."""
    return json.dumps(found, sort_keys=True, default=str)


def _everything(connection: Connection) -> list[object]:
    """All a database holds: each table's columns, keys, constraints and indexes, every index,
    trigger and function as the database itself writes them, and every row. (Not SQLite's
    ``CREATE TABLE`` text: Alembic's batch copies list a table's constraints in an order that
    differs between two real migrations.)"""
    if connection.dialect.name == "sqlite":
        queries = [
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type <> 'table'"
            " ORDER BY type, name"
        ]
    else:
        here = "current_schema()::regnamespace"
        queries = [
            f"SELECT relname, relkind FROM pg_class WHERE relnamespace = {here} ORDER BY 1",
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
            f" FROM pg_constraint WHERE connamespace = {here} ORDER BY 1, 2",
            "SELECT tablename, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = current_schema() ORDER BY 1, 2",
            "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
            " WHERE NOT tgisinternal ORDER BY 1, 2",
            f"SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = {here}"
            " ORDER BY 1",
        ]
    found: list[object] = [connection.execute(text(q)).all() for q in queries]
    schema = inspect(connection)
    for table in sorted(schema.get_table_names()):
        found.append(
            (
                table,
                [
                    (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                    for c in schema.get_columns(table)
                ],
                schema.get_pk_constraint(table),
                sorted(map(_text, schema.get_foreign_keys(table))),
                sorted(map(_text, schema.get_unique_constraints(table))),
                sorted(map(_text, schema.get_check_constraints(table))),
                sorted(map(_text, schema.get_indexes(table))),
                connection.execute(text(f'SELECT * FROM "{table}" ORDER BY 1')).all(),
            )
        )
    return found


async def test_a_test_database_replayed_from_the_first_migration_is_the_migrated_one(
    db_url: str,
) -> None:
    """Tests migrate once per run and replay the statements after (tests/support/migrations.py):
    the replayed database must hold exactly what Alembic builds, rows included."""
    db = Database(db_url)
    try:
        await migrations.REAL_UPGRADE(db)  # Alembic itself
        async with db.engine.connect() as conn:
            migrated = await conn.run_sync(_everything)
            assert await conn.run_sync(_drift) == []
        async with db.engine.begin() as conn:
            await conn.run_sync(_migrate, "downgrade", "base")
            await conn.execute(text("DROP TABLE alembic_version"))
        for _ in range(2):  # the first upgrade in a run may record rather than replay
            async with db.engine.begin() as conn:
                assert await conn.run_sync(migrations.empty)
            await db.upgrade()
            assert migrations.recording(db) is not None
            async with db.engine.connect() as conn:
                assert await conn.run_sync(_everything) == migrated
            async with db.engine.begin() as conn:
                await conn.run_sync(_migrate, "downgrade", "base")
                await conn.execute(text("DROP TABLE alembic_version"))
    finally:
        await db.close()
