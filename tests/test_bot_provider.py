"""A provider's whole path through the bot: /provider, /addworker's one-time token, a real worker
process onboarding over HTTP with development-TEE evidence, the bot telling the provider, the
worker serving another user's message, and /workers and /earnings showing it."""

from __future__ import annotations

import asyncio
import html
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from backend import accounts
from backend.attestation import acl
from backend.db import Database
from backend.money import format_gram
from backend.settings import AttestationSettings, ModelPrice, Settings
from backend.web import create_app
from bot.app import running_bot
from tests.support.bot import Harness
from tests.support.bot_fakes import TOKEN, FakeTelegram
from tests.support.turns import funded_user
from workers import registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL = "echo"
PROVIDER = 701
USER = 702


@pytest.fixture
async def web_and_bot(
    settings: Settings, redis_url: str
) -> AsyncIterator[tuple[Harness, aioredis.Redis]]:
    s = settings.model_copy(
        update={
            "attestation": AttestationSettings(allow_dev=True),
            "models": {MODEL: ModelPrice(prompt=10**9, completion=10**9)},  # 1 TON per 1M
            "bot_token": SecretStr(TOKEN),
        }
    )
    db = Database.from_settings(s)
    await db.upgrade()
    admin = aioredis.Redis.from_url(redis_url)
    before = set(await acl.worker_users(admin))
    server = TestServer(create_app(s))
    await server.start_server()
    s = s.model_copy(update={"public_url": str(server.make_url("")).rstrip("/")})
    tg = FakeTelegram()
    try:
        async with running_bot(s, session=tg, db=db, outbox_interval_s=None) as app:
            yield Harness(app, tg, s), admin
    finally:
        await server.close()
        for worker_id in set(await acl.worker_users(admin)) - before:
            await acl.delete_worker_user(admin, worker_id)
        await admin.aclose()
        await db.close()


def run_worker(line: str, log: Path) -> subprocess.Popen[bytes]:
    """The command /addworker gave, as the provider would paste it (with the instant engine
    standing in for vLLM on this GPU-less machine)."""
    words = shlex.split(line)
    assert words[:2] == ["cocoon", "worker"]
    args = words[2:]
    args[args.index("--engine") + 1] = "instant"
    command = [sys.executable, "-m", "workers.node", *args, "--tee", "dev", "--heartbeat", "0.5"]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out)


async def test_provider_onboards_a_dev_worker_that_serves_and_earns(
    web_and_bot: tuple[Harness, aioredis.Redis], tmp_path: Path
) -> None:
    bot, admin = web_and_bot
    await bot.send("/provider", user=PROVIDER)
    await bot.send(f"/addworker {MODEL}", user=PROVIDER)
    text = bot.last().text
    line = html.unescape(text.split("<pre>")[1].split("</pre>")[0])
    assert f"--model {MODEL}" in line and bot.settings.public_url in line
    node = run_worker(line, tmp_path / "node.log")
    try:
        deadline = time.monotonic() + 60
        while not [w for w in await registry.list_workers(admin, MODEL) if w.attested]:
            assert node.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            await asyncio.sleep(0.1)
        (worker,) = await registry.list_workers(admin, MODEL)
        provider = await bot.user(PROVIDER)
        assert worker.provider_id == provider.id and worker.tee == "dev"

        # The provider is told.
        bot.tg.clear()
        assert await bot.app.outbox.drain_once() == 1
        told = bot.last()
        assert told.chat_id == PROVIDER and worker.worker_id in told.text
        assert "attested (development TEE)" in told.text

        # Another user's message is served by it; the provider earns its share.
        await funded_user(bot.ledger, USER)
        await bot.send("hello provider", user=USER)
        assert "tokens" in bot.last().text and "development TEE" in bot.last().text
        earned = (await accounts.earnings(bot.ledger, provider.id)).earned
        assert earned > 0

        await bot.send("/workers", user=PROVIDER)
        text = bot.last().text
        assert worker.worker_id in text and "online" in text and "1 job," in text
        assert f"earned {format_gram(earned)}" in text
        await bot.send("/earnings", user=PROVIDER)
        assert f"Earned: {format_gram(earned)} from 1 job" in bot.last().text

        # The worker stops: its provider hears it went offline (once).
        node.terminate()
        await asyncio.to_thread(node.wait, 60)  # the event loop serves the web app meanwhile
        deadline = time.monotonic() + 30
        while await registry.list_workers(admin, MODEL):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert await accounts.watch_workers(bot.db, admin, grace_s=0) == [worker.worker_id]
        assert await accounts.watch_workers(bot.db, admin, grace_s=0) == []
        bot.tg.clear()
        assert await bot.app.outbox.drain_once() == 1
        assert "went offline" in bot.last().text and bot.last().chat_id == PROVIDER
    finally:
        node.terminate()
        try:
            await asyncio.to_thread(node.wait, 60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
