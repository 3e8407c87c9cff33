"""Shared fixtures: test settings, the real Redis and the real PostgreSQL.

Redis: ``COCOON_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``), flushed before and
after each test that uses it. PostgreSQL: ``COCOON_TEST_POSTGRES_URL`` (default the ``test``
database on 127.0.0.1:5432). Outside CI a missing server skips its tests; in CI (``CI=true``)
it fails them.

Harnesses, fakes and test data live in ``tests/support/``; the fixtures among them that several
modules use are registered here as plugins (``pytest_plugins``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from backend.db import Database
from backend.settings import Settings
from tests.support.env import TEST_POSTGRES_URL, TEST_REDIS_URL, unavailable
from tests.support.ops import admin_sql

# Fixtures shared by several test modules live with their harnesses in tests/support/.
pytest_plugins = [
    "tests.support.api",
    "tests.support.attest",
    "tests.support.billing",
    "tests.support.bot",
    "tests.support.migrations",
    "tests.support.node",
    "tests.support.payouts",
    "tests.support.tdx_hosts",
    "tests.support.tonproof",
    "tests.support.vllm",
]


FAST_LANE_FUZZ_EXAMPLES = "25"


def pytest_configure(config: pytest.Config) -> None:
    """The fast lane (``-m "not slow"``) runs each generated test on 25 examples, not 200,
    unless ``COCOON_FUZZ_EXAMPLES`` says otherwise; the full run keeps 200. (Set before any test
    module imports tests/support/fuzz.py, which reads it.)"""
    if "not slow" in (config.option.markexpr or ""):
        os.environ.setdefault("COCOON_FUZZ_EXAMPLES", FAST_LANE_FUZZ_EXAMPLES)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A browser or engine test is a slow one too: ``-m "not slow"`` (the fast lane) leaves it
    out without naming every kind."""
    for item in items:
        if item.get_closest_marker("browser") or item.get_closest_marker("engine"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: a fresh data directory with its own SQLite file."""
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        secrets_dir=tmp_path / "secrets",
        redis_url=TEST_REDIS_URL,
    )


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, empty before and after the test."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.flushdb()
    except redis.RedisError as error:
        unavailable("Redis", error)
    yield TEST_REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test run's own, made inside the server of ``test``, dropped at the
    end: test runs side by side (a developer's and CI's) never touch each other's tables."""
    from sqlalchemy.engine import make_url

    name = f"cocoon_test_{os.getpid()}"
    try:
        asyncio.run(
            admin_sql(
                TEST_POSTGRES_URL, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"
            )
        )
    except Exception as error:  # no server, no rights: fall back to the shared database
        try:
            asyncio.run(admin_sql(TEST_POSTGRES_URL, "SELECT 1"))
        except Exception:
            unavailable("PostgreSQL", error)
        yield TEST_POSTGRES_URL
        return
    url = make_url(TEST_POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    asyncio.run(admin_sql(TEST_POSTGRES_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A PostgreSQL database emptied of Cocoon's tables before the test."""
    try:
        asyncio.run(
            admin_sql(postgres_database, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
        )
    except Exception as error:  # asyncpg's own errors: connection, auth
        unavailable("PostgreSQL", error)
    return postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'cocoon.db'}"
    return request.getfixturevalue("postgres_url")


async def upgraded(url: str) -> AsyncIterator[Database]:
    """The database at ``url``, at the newest schema, closed after the test."""
    database = Database(url)
    await database.upgrade()
    yield database
    await database.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A database at the newest schema, on SQLite and on PostgreSQL."""
    async for database in upgraded(db_url):
        yield database


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[Database]:
    """A database at the newest schema on PostgreSQL only (what only PostgreSQL does)."""
    async for database in upgraded(postgres_url):
        yield database
