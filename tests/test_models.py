"""The UTC datetime column type (``backend.models.UTCDateTime``) on SQLite and PostgreSQL:
every timestamp reads back aware, in UTC, the same moment that was written."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import StatementError

from backend.db import Database
from backend.models import ApiKey
from backend.users import get_or_create_user

MOSCOW = dt.timezone(dt.timedelta(hours=3))


async def add_key(db: Database, name: str, revoked_at: dt.datetime | None) -> None:
    user = await get_or_create_user(db, 7001)
    async with db.session() as session, session.begin():
        session.add(
            ApiKey(
                user_id=user.id, key_hash=name * 64, prefix=name, name=name, revoked_at=revoked_at
            )
        )


async def test_a_moment_reads_back_aware_in_utc_whatever_zone_it_was_written_in(
    db: Database,
) -> None:
    written = dt.datetime(2026, 3, 1, 12, 30, 15, 250_000, tzinfo=MOSCOW)
    await add_key(db, "a", written)
    async with db.session() as session:
        row = await session.scalar(select(ApiKey).where(ApiKey.name == "a"))
        latest = await session.scalar(select(func.max(ApiKey.revoked_at)))
    assert row is not None
    assert row.revoked_at == written  # the same moment...
    assert row.revoked_at.tzinfo == dt.UTC  # ...in UTC
    assert row.revoked_at.hour == 9
    assert row.created_at.tzinfo == dt.UTC  # the default (now) as well
    assert abs(dt.datetime.now(dt.UTC) - row.created_at) < dt.timedelta(hours=1)
    assert latest == written and latest.tzinfo == dt.UTC  # an aggregate keeps the type


async def test_comparisons_hold_across_zones(db: Database) -> None:
    await add_key(db, "b", dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC))
    # 12:30 in Moscow is 09:30 UTC: before 10:00 UTC, though its wall clock is later.
    before = dt.datetime(2026, 3, 1, 12, 30, tzinfo=MOSCOW)
    after = dt.datetime(2026, 3, 1, 13, 30, tzinfo=MOSCOW)
    async with db.session() as session:
        assert await session.scalar(select(ApiKey.name).where(ApiKey.revoked_at > before)) == "b"
        assert await session.scalar(select(ApiKey.name).where(ApiKey.revoked_at > after)) is None


async def test_a_naive_datetime_is_refused(db: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        await add_key(db, "c", dt.datetime(2026, 3, 1, 10, 0))
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ApiKey)) == 0
