"""The privacy canary: one session through the bot (webhook), the Mini App's chat and the HTTP
API, each prompt carrying a canary string; afterwards the string appears nowhere at rest —
not in a dump of every Redis key, not in the database files, not in the logs of the web
server, bot and watcher, and not in the worker's stdout/stderr.

The whole stack runs as `cocoon up` runs it (its own Redis, a real worker with the small model,
the web server with the bot in webhook mode), with debug logging on; only Telegram is faked, at
its HTTP boundary (tests/support/fake_telegram.py)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.env import require_module
from tests.support.fake_telegram import FakeTelegram, private_message
from tests.support.ops import (
    cocoon_up_with_bot,
    deliver_to_webhook,
    start_cocoon_up,
    stop_cocoon_up,
    wait_cocoon_up_ready,
)

require_module("llama_cpp")

pytestmark = pytest.mark.engine

BOT_TOKEN = "4242:canary-test-token"
WEBHOOK_SECRET = "canary-webhook-secret"
USER = 777_000_111
MODEL = "smollm2-135m"


def _turns(db_file: Path) -> int:
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM turns").fetchone()[0])


async def _redis_dump(url: str) -> bytes:
    """Every key of every database, with its serialized value (DUMP), as one blob."""
    client = aioredis.Redis.from_url(url)
    blob = bytearray()
    try:
        info = await client.info("keyspace")
        for db_name in info:
            db = aioredis.Redis.from_url(url.rsplit("/", 1)[0] + "/" + db_name.removeprefix("db"))
            try:
                async for key in db.scan_iter(count=500):
                    blob += key
                    value = await db.dump(key)
                    if value:
                        blob += value
            finally:
                await db.aclose()
    finally:
        await client.aclose()
    return bytes(blob)


async def test_canary_never_reaches_rest(tmp_path: Path) -> None:
    from miniapp.auth import init_data_for

    canary = f"CANARY{uuid.uuid4().hex[:12].upper()}"
    telegram = FakeTelegram()
    await telegram.start()
    place = cocoon_up_with_bot(
        tmp_path,
        telegram.url,
        token=BOT_TOKEN,
        secret=WEBHOOK_SECRET,
        user=USER,
        COCOON_LOG_LEVEL="DEBUG",
    )
    base, data, env, redis_url = place.base, place.data, place.env, place.redis_url
    log = tmp_path / "up.log"
    up = start_cocoon_up(env, tmp_path, log)
    try:
        await wait_cocoon_up_ready(up, log, base, str(data / "local-api-key"))
        api_key = (data / "local-api-key").read_text().strip()
        async with aiohttp.ClientSession() as http:
            # 1. The HTTP API.
            async with http.post(
                f"{base}/v1/chat/completions",
                headers={"Authorization": f"Bearer {api_key}"},
                json={
                    "model": MODEL,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"Repeat {canary} please"}],
                },
            ) as reply:
                assert reply.status == 200, await reply.text()
            # 2. The Mini App's chat, signed like Telegram signs initData.
            init_data = init_data_for(USER, BOT_TOKEN)
            async with http.post(
                f"{base}/app/api/chat",
                headers={"Authorization": f"tma {init_data}"},
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Say {canary} back"}],
                    "conversation": "canary-" + uuid.uuid4().hex[:8],
                },
            ) as reply:
                assert reply.status == 200, await reply.text()
                lines = [json.loads(line) for line in (await reply.text()).splitlines() if line]
            assert lines[-1]["type"] == "done", lines
            # 3. The bot, through its webhook, as Telegram would deliver the message.
            update = private_message(
                USER, f"Echo {canary} now", "Canary", update_id=91_000_001, message_id=5
            )
            await deliver_to_webhook(http, base, WEBHOOK_SECRET, telegram, update)

        # The three turns settled, and the bot told the user (the reply reached Telegram, where
        # it belongs): the bot sends its final message after its turn has settled.
        deadline = time.monotonic() + 120
        while _turns(data / "cocoon.db") < 3 or not any(
            m in telegram.methods() for m in ("sendMessage", "editMessageText")
        ):
            assert time.monotonic() < deadline, (telegram.methods(), log.read_text()[-3000:])
            assert up.poll() is None, log.read_text()
            await asyncio.sleep(0.3)
        assert not telegram.refused  # nothing the bot sent is what Telegram would refuse

        dump = await _redis_dump(redis_url)
        assert len(dump) > 1000  # the dump did see the stack's keys
        assert canary.encode() not in dump, "the canary is in Redis"
    finally:
        stop_cocoon_up(up)
        await telegram.stop()

    at_rest = {
        path.name: path.read_bytes()
        for path in data.iterdir()
        if path.is_file() and path.name.startswith("cocoon.db")
    }
    assert "cocoon.db" in at_rest
    for name, content in at_rest.items():
        assert canary.encode() not in content, f"the canary is in {name}"
    logged = log.read_bytes()
    assert b"DEBUG" in logged or b"debug" in logged  # debug logging was really on
    assert canary.encode() not in logged, "the canary is in the logs or the worker's output"
