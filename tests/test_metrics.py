"""Prometheus metrics: ``GET /metrics`` of ``cocoon web`` after real turns through the OpenAI API
with a real worker node (instant engine), the node's own ``/metrics`` endpoint, and the polling
bot's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind
from backend.settings import DEFAULT_MODEL, ModelPrice, Settings
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from bot.app import run_polling
from tests.support.fake_telegram import TelegramWithOneMessage
from tests.support.ops import TON, Api, InstantNode, api_server, dev_settings, free_port
from workers import registry
from workers.jobs import aenqueue_job
from workers.lifecycle import Shutdown

DEPOSIT = "0:" + "D2" * 32
GHOST = "ghost-model"  # priced, but no worker serves it
TOKEN = "metrics-token-of-the-operator"  # COCOON_METRICS_TOKEN: /metrics on the main port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return samples(await response.text())


async def chat(api: Api, text: str, *, model: str = DEFAULT_MODEL) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{api.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {api.key}"},
        ) as response,
    ):
        return response.status, await response.json()


@pytest.fixture
async def api(settings: Settings, redis_url: str) -> AsyncIterator[Api]:
    models = {**settings.models, GHOST: ModelPrice(prompt=1000, completion=1000)}
    opened = dev_settings(settings, models=models, metrics_token=SecretStr(TOKEN))
    async with api_server(opened) as server:
        yield server


@pytest.mark.slow
async def test_turns_tokens_and_state_move_on_metrics_after_real_turns(
    api: Api, redis_url: str
) -> None:
    worker_port = free_port()
    # Registered for 60 s: online however slow the machine (unregistered when it stops).
    node = InstantNode(redis_url, metrics_port=worker_port, ttl=60)
    try:
        before = await scrape(f"{api.url}/metrics")
        assert value(before, "cocoon_turns_total", model=DEFAULT_MODEL, outcome="settled") == 0

        status, reply = await chat(api, "alpha beta gamma")
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == "alpha beta gamma"
        cost = int(reply["cocoon"]["cost_nanoton"])
        status, _ = await chat(api, "x", model="no-such-model")
        assert status == 404
        status, _ = await chat(api, "y", model=GHOST)
        assert status == 503

        # State the gauges read at scrape time: a deposit, a payout, a queued job.
        net = LocalTonCenter()
        user = await get_or_create_user(api.db, 4242)
        net.add_incoming(DEPOSIT, 2 * TON, comment=user.deposit_memo)
        async with LocalTonCenterServer(net) as url, TonCenter(url) as toncenter:
            await DepositWatcher(api.db, api.ledger, toncenter, DEPOSIT).poll_once()
        provider = await get_or_create_user(api.db, 77)
        ledger = Ledger(api.db, min_withdrawal=1)
        await ledger.credit_deposit(provider.id, 3 * TON, "seed:77", source=AccountKind.OPERATOR)
        await ledger.hold(provider.id, 3 * TON, "turn:77")
        await ledger.settle("turn:77", 3 * TON, provider_id=provider.id, share_bps=10_000)
        await ledger.request_withdrawal(provider.id, TON, "payout:77")
        client = aioredis.Redis.from_url(redis_url)
        idle = registry.WorkerInfo(
            worker_id="t-idle", model=GHOST, engine="instant", engine_version="1",
            box_public_key="A" * 44, verify_key="A" * 44, capacity=4,
        )  # fmt: skip
        await registry.register(client, idle, 30)
        await aenqueue_job(client, "t-idle", "t-idle_j1_1", b"sealed", timeout_s=60, ttl_s=60)
        await client.aclose()

        after = await scrape(f"{api.url}/metrics")
        worker = await scrape(f"http://127.0.0.1:{worker_port}/metrics")
    finally:
        node.stop()

    assert value(after, "cocoon_turns_total", model=DEFAULT_MODEL, outcome="settled") == 1
    assert value(after, "cocoon_turns_total", model=GHOST, outcome="failed") == 1
    assert value(after, "cocoon_turn_errors_total", code="unknown_model") == 1
    assert value(after, "cocoon_turn_errors_total", code="no_worker") == 1
    assert value(after, "cocoon_turn_tokens_total", model=DEFAULT_MODEL, kind="completion") == 3
    assert value(after, "cocoon_turn_tokens_total", model=DEFAULT_MODEL, kind="prompt") == 3
    assert value(after, "cocoon_turn_charged_nano_total", model=DEFAULT_MODEL) == cost
    assert value(after, "cocoon_turn_first_token_seconds_count", model=DEFAULT_MODEL) == 1
    duration = value(
        after, "cocoon_turn_duration_seconds_count", model=DEFAULT_MODEL, outcome="settled"
    )
    assert duration == 1

    assert value(after, "cocoon_state_up", source="redis") == 1
    assert value(after, "cocoon_state_up", source="database") == 1
    assert value(after, "cocoon_workers_online", model=DEFAULT_MODEL, tee="dev") == 1
    assert value(after, "cocoon_workers_online", model=GHOST, tee="dev") == 1
    assert value(after, "cocoon_queue_depth", model=GHOST) == 1
    assert value(after, "cocoon_queue_depth", model=DEFAULT_MODEL) == 0
    assert value(after, "cocoon_holds_open") == 0
    assert value(after, "cocoon_ton_deposits", status="credited") == 1
    assert value(after, "cocoon_ton_deposits_nano", status="credited") == 2 * TON
    assert value(after, "cocoon_payouts", state="requested") == 1
    assert value(after, "cocoon_payouts_nano", state="requested") == TON
    assert value(after, "cocoon_ledger_balance_nano", kind="user") == 3 * TON - cost
    assert value(after, "cocoon_ledger_balance_nano", kind="provider_pending") == TON
    total = sum(v for (name, _), v in after.items() if name == "cocoon_ledger_balance_nano")
    assert total == 0

    assert value(worker, "cocoon_worker_jobs_total", model=DEFAULT_MODEL, outcome="ok") == 1
    assert value(worker, "cocoon_worker_tokens_total", model=DEFAULT_MODEL, kind="completion") == 3
    assert value(worker, "cocoon_worker_job_duration_seconds_count", model=DEFAULT_MODEL) == 1
    assert value(worker, "cocoon_worker_jobs_running", model=DEFAULT_MODEL) == 0


async def test_metrics_answer_when_redis_is_down(settings: Settings, redis_url: str) -> None:
    down = dev_settings(
        settings,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        metrics_token=SecretStr(TOKEN),
    )
    async with api_server(down) as server:
        found = await scrape(f"{server.url}/metrics")
    assert value(found, "cocoon_state_up", source="redis") == 0
    assert value(found, "cocoon_state_up", source="database") == 1
    assert value(found, "cocoon_ledger_balance_nano", kind="user") == TON


@pytest.mark.slow
async def test_the_polling_bot_counts_its_turns_on_its_own_metrics(
    settings: Settings, redis_url: str
) -> None:
    """``cocoon bot`` (long polling, no web server) serves its turn metrics on
    ``COCOON_BOT_METRICS_PORT``: a turn asked in the chat is counted there."""
    port = free_port()
    telegram = TelegramWithOneMessage(5151, "alpha beta gamma")
    await telegram.start()
    s = dev_settings(
        settings,
        bot_token=SecretStr("4242:metrics-test-token"),
        telegram_api_url=telegram.url,
        bot_metrics_port=port,
    )
    db = Database.from_settings(s)
    await db.upgrade()
    user = await get_or_create_user(db, 5151)
    await Ledger(db).credit_deposit(user.id, TON, "dep:5151")
    node = InstantNode(redis_url)
    shutdown = Shutdown(5)
    polling = asyncio.create_task(run_polling(s, shutdown))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        found: dict = {}
        for _ in range(600):  # an upper bound of a minute on the turn, never a speed test
            with contextlib.suppress(aiohttp.ClientConnectionError):
                found = await scrape(url)
            settled = value(found, "cocoon_turns_total", model=DEFAULT_MODEL, outcome="settled")
            if settled or polling.done():
                break
            await asyncio.sleep(0.1)
    finally:
        shutdown.request("the test is over")
        await asyncio.wait_for(polling, 60)
        node.stop()
        await telegram.stop()
        await db.close()

    assert value(found, "cocoon_turns_total", model=DEFAULT_MODEL, outcome="settled") == 1
    assert value(found, "cocoon_turn_tokens_total", model=DEFAULT_MODEL, kind="completion") == 3
    replies = [p.get("text", "") for m, p in telegram.calls if m.lower() == "sendmessage"]
    assert any("alpha beta gamma" in text for text in replies), telegram.calls
