"""What an operator expects of ``cocoon web`` and the database: ``/metrics`` kept off the public
port (a token, or a port of its own), slowloris clients cut off (headers and bodies, over a raw
socket), and ``cocoon db backup`` / ``cocoon db restore`` into a fresh PostgreSQL database (and
SQLite) with the ledger audit clean afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from backend.cli import build_parser
from backend.db import Database
from backend.invariants import check_invariants
from backend.ledger import Ledger
from backend.settings import Settings
from backend.users import get_or_create_user
from backend.web import start_web
from tests.support.env import TEST_POSTGRES_URL
from tests.support.ops import admin_sql, free_port

TOKEN = "metrics-token-of-the-operator"


@contextlib.asynccontextmanager
async def web_server(settings: Settings) -> AsyncIterator[str]:
    """``cocoon web`` (``start_web``, as the command runs it) on a free loopback port."""
    port = free_port()
    db = Database.from_settings(settings)
    await db.upgrade()
    await db.close()
    runner = await start_web(settings, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.text()


# ------------------------------------------------------------------------------ /metrics


async def test_metrics_are_not_served_on_the_main_port_by_default(
    settings: Settings, redis_url: str
) -> None:
    async with web_server(settings) as url:
        status, _body = await get(f"{url}/metrics")
        assert status == 404
        assert (await get(f"{url}/healthz"))[0] == 200


async def test_metrics_on_the_main_port_ask_for_the_token(
    settings: Settings, redis_url: str
) -> None:
    settings = settings.model_copy(update={"metrics_token": SecretStr(TOKEN)})
    async with web_server(settings) as url:
        assert (await get(f"{url}/metrics"))[0] == 401
        assert (await get(f"{url}/metrics", Authorization=f"Bearer {TOKEN}x"))[0] == 401
        assert (await get(f"{url}/metrics", Authorization=TOKEN))[0] == 401
        status, body = await get(f"{url}/metrics", Authorization=f"Bearer {TOKEN}")
        assert status == 200
        assert "cocoon_ledger_balance_nano" in body


async def test_metrics_on_a_port_of_their_own_serve_nothing_else(
    settings: Settings, redis_url: str
) -> None:
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port, "web_host": "127.0.0.1"})
    async with web_server(settings) as url:
        status, body = await get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "cocoon_holds_open_nano" in body
        assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 404
        assert (await get(f"{url}/metrics"))[0] == 404
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped with the web server
        await get(f"http://127.0.0.1:{port}/metrics")


def test_a_short_metrics_token_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        Settings(_env_file=None, data_dir=settings.data_dir, metrics_token="short")


# ------------------------------------------------------------------------------ slowloris


async def trickle(port: int, head: bytes, drip: bytes, most: int) -> bytes:
    """Send ``head``, then ``drip`` every 50 ms, at most ``most`` times, until the server closes
    the connection; what it answered (b"" when it closed without a word, None when it never
    closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        answer = b""
        for _ in range(most):
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                chunk = None
            if chunk is not None:
                if chunk == b"":
                    return answer  # closed by the server
                answer += chunk
                continue
            try:
                writer.write(drip)
                await writer.drain()
            except ConnectionError:
                return answer
        raise AssertionError(f"the server kept a trickling connection open: {answer!r}")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_that_trickles_its_headers_is_cut_off(
    settings: Settings, redis_url: str
) -> None:
    settings = settings.model_copy(update={"http_header_timeout_s": 0.5})
    async with web_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        # 2,000 header lines at 50 ms each would hold the connection for 100 s.
        answer = await trickle(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 2000
        )
        assert answer == b""  # no request was ever read: closed without an answer
        assert (await get(f"{url}/healthz"))[0] == 200  # others are served meanwhile


async def test_a_client_that_trickles_its_body_gets_408_and_is_cut_off(
    settings: Settings, redis_url: str
) -> None:
    settings = settings.model_copy(update={"http_body_timeout_s": 0.5})
    async with web_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{"
        )
        answer = await trickle(port, head, b" ", 2000)
        assert answer.startswith(b"HTTP/1.1 408 ")
        # A whole body, sent at once, is read as before (401: no API key; not 408).
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/v1/chat/completions", json={"model": "x"}) as response,
        ):
            assert response.status == 401


# ---------------------------------------------------------------------- backup and restore


def cocoon_db(settings: Settings, *argv: str) -> int:
    args = build_parser().parse_args(["db", *argv])
    return int(args.handler(settings, args))


async def fill(db: Database) -> dict[int, object]:
    """Users with deposits, a settled turn and a released hold: a ledger with history."""
    await db.upgrade()
    ledger = Ledger(db)
    balances = {}
    for telegram_id in (101, 102, 103):
        user = await get_or_create_user(db, telegram_id)
        await ledger.credit_deposit(user.id, 5_000_000_000 + telegram_id, f"dep:{telegram_id}")
        await ledger.hold(user.id, 1_000_000, f"hold:{telegram_id}")
        if telegram_id == 102:
            await ledger.release(f"hold:{telegram_id}")
        else:
            await ledger.settle(f"hold:{telegram_id}", 333_333, provider_id=None, share_bps=8000)
        balances[user.id] = await ledger.balances(user.id)
    return balances


async def read_back(db: Database, user_ids: list[int]) -> dict[int, object]:
    ledger = Ledger(db)
    return {user_id: await ledger.balances(user_id) for user_id in user_ids}


@pytest.mark.slow
def test_backup_restores_into_a_fresh_postgresql_database_with_a_clean_audit(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    source = Settings(_env_file=None, data_dir=settings.data_dir, database_url=postgres_url)
    db = Database(postgres_url)
    balances = asyncio.run(_fill_and_close(db))
    archive = tmp_path / "cocoon.dump"
    assert cocoon_db(source, "backup", str(archive)) == 0
    assert archive.read_bytes().startswith(b"PGDMP")
    with pytest.raises(SystemExit):  # never overwrites a file
        cocoon_db(source, "backup", str(archive))

    fresh = f"cocoon_restore_{os.getpid()}"
    drop = f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
    asyncio.run(admin_sql(TEST_POSTGRES_URL, drop, f"CREATE DATABASE {fresh}"))
    try:
        url = make_url(postgres_url).set(database=fresh).render_as_string(hide_password=False)
        target = Settings(_env_file=None, data_dir=settings.data_dir, database_url=url)
        assert cocoon_db(target, "restore", str(archive)) == 0
        restored = Database(url)
        assert asyncio.run(_read_and_close(restored, list(balances))) == balances
        # Into a database that holds the tables already: refused unless --clean.
        with pytest.raises(SystemExit):
            cocoon_db(target, "restore", str(archive))
        assert cocoon_db(target, "restore", "--clean", str(archive)) == 0
        assert asyncio.run(_read_and_close(Database(url), list(balances))) == balances
    finally:
        asyncio.run(admin_sql(TEST_POSTGRES_URL, drop))


def test_sqlite_backup_restores_with_a_clean_audit_and_engines_are_not_mixed(
    settings: Settings, tmp_path: Path
) -> None:
    db = Database.from_settings(settings)
    balances = asyncio.run(_fill_and_close(db))
    copy = tmp_path / "backup.sqlite"
    assert cocoon_db(settings, "backup", str(copy)) == 0

    fresh = Settings(_env_file=None, data_dir=tmp_path / "restored")
    assert cocoon_db(fresh, "restore", str(copy)) == 0
    assert asyncio.run(_read_and_close(Database.from_settings(fresh), list(balances))) == balances
    with pytest.raises(SystemExit):  # tables there already
        cocoon_db(fresh, "restore", str(copy))
    junk = tmp_path / "junk"
    junk.write_bytes(b"PGDMP not really")
    with pytest.raises(SystemExit):  # a PostgreSQL archive is not restored into SQLite
        cocoon_db(fresh, "restore", "--clean", str(junk))


async def _fill_and_close(db: Database) -> dict[int, object]:
    try:
        return await fill(db)
    finally:
        await db.close()


async def _read_and_close(db: Database, user_ids: list[int]) -> dict[int, object]:
    try:
        assert (await check_invariants(db)).ok
        return await read_back(db, user_ids)
    finally:
        await db.close()


async def test_a_chunked_body_past_4_mib_is_refused_not_read_on(
    settings: Settings, redis_url: str
) -> None:
    """A body of unannounced length that grows past the limit is a 413 at once; the handler
    never reads what is left of it as if it were the body; the connection closes once what
    is left was dropped for the body timeout (3 s here), not aiohttp's 10 s."""
    settings = settings.model_copy(update={"http_body_timeout_s": 3.0})
    async with web_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (1024 * 1024)
        with contextlib.suppress(ConnectionError):
            for _ in range(5):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"body_too_large" in answer
