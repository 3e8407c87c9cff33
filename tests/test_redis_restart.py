"""Workers survive Redis restarts and failovers (issue 12, item 6), with a redis-server of the
test's own: append-only persistence keeps the data over a restart, and ACL users, as in
production, are lost with it. The backend recreates the users of unexpired workers from the
digests it kept; a node whose credentials are refused attests again with its renewal token
instead of exiting; while Redis is away every HTTP surface answers 503 with a JSON error, and
nothing is charged."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.attestation import acl, store
from backend.dispatch import TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, AttestationSettings, ModelPrice, Settings
from miniapp.auth import init_data_for
from tests.support.redis_server import RedisServer, api_with_node, attested_worker
from tests.support.turns import dev_stack, funded_user
from workers import registry
from workers.engines.instant import InstantEngine
from workers.job_book import JobBook
from workers.node_cli import NodeConfig
from workers.serving import Node
from workers.wire import ChatMessage

pytestmark = pytest.mark.slow  # a redis-server of its own, restarted, and a real node

MODEL = "echo"
BOT_TOKEN = "123456789:AAtest-token-of-the-restart-test"
TON = 10**9


@dataclass
class Stack:
    redis: RedisServer
    admin: aioredis.Redis
    url: str
    api_key: str
    ledger: Ledger
    user_id: int
    log: Path
    node: subprocess.Popen[bytes]


@pytest.fixture
async def stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    s = settings.model_copy(
        update={
            "redis_url": server.url(),
            "bot_token": SecretStr(BOT_TOKEN),
            "models": {MODEL: ModelPrice(prompt=1_000_000, completion=1_000_000)},
            # The upkeep notices a restart within 0.2 s (COCOON_ATTESTATION__USERS_CHECK_S).
            "attestation": AttestationSettings(allow_dev=True, users_check_s=0.2),
        }
    )
    log = tmp_path / "node.log"
    try:
        async with api_with_node(s, 8101, log, MODEL) as (api, admin, node):
            yield Stack(server, admin, api.url, api.key, api.ledger, api.user_id, log, node)
    finally:
        server.stop()


async def users(stack: Stack) -> list[str]:
    """Worker users Redis knows ([] while the test's own client reconnects)."""
    try:
        return await acl.worker_users(stack.admin)
    except redis.ConnectionError:
        return []


async def chat(session: aiohttp.ClientSession, stack: Stack) -> tuple[int, dict]:
    async with session.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}],
              "max_tokens": 8},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    ) as reply:  # fmt: skip
        return reply.status, await reply.json(content_type=None)


async def served_again(session: aiohttp.ClientSession, stack: Stack) -> dict:
    """The first answered turn after an outage (503s until the node is back)."""
    deadline = time.monotonic() + 40
    while True:
        status, body = await chat(session, stack)
        if status == 200:
            return body
        assert status == 503, body  # never a 500 on the way
        assert stack.node.poll() is None, stack.log.read_text()
        assert time.monotonic() < deadline, (body, stack.log.read_text())
        await asyncio.sleep(0.2)


async def test_a_redis_restart_ends_no_worker_and_redis_away_is_a_503(stack: Stack) -> None:
    """Before: the node took the restart for a revocation and exited for good, and the first
    request answered 500."""
    worker_id = await attested_worker(stack.admin, stack.node, stack.log, MODEL, api_url=stack.url)
    async with aiohttp.ClientSession() as session:
        status, body = await chat(session, stack)
        assert status == 200, body
        balance = await stack.ledger.balances(stack.user_id)

        stack.redis.stop()
        status, body = await chat(session, stack)
        assert status == 503 and "Redis" in body["error"]["message"], body
        async with session.post(f"{stack.url}/v1/workers/nonce", json={"token": "cct_x"}) as r:
            assert r.status == 503 and "error" in await r.json()
        miniapp = {"Authorization": f"tma {init_data_for(8101, BOT_TOKEN)}"}
        async with session.post(
            f"{stack.url}/app/api/chat",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "conversation": "restart-test",
            },
            headers=miniapp,
        ) as r:
            assert r.status == 503, await r.text()
            assert (await r.json())["error"]["code"]
        assert await stack.ledger.balances(stack.user_id) == balance  # nothing held or charged

        stack.redis.start()  # the same data (append-only file), no ACL users
        deadline = time.monotonic() + 20
        while worker_id not in await users(stack):
            assert time.monotonic() < deadline, stack.log.read_text()
            await asyncio.sleep(0.1)
        body = await served_again(session, stack)
        assert "w-" + body["cocoon"]["worker"]["key_fingerprint"] == worker_id  # the same node
    assert stack.node.poll() is None
    assert "revoked" not in stack.log.read_text()


async def test_a_node_whose_credentials_are_refused_attests_again(stack: Stack) -> None:
    """A Redis that lost the user and the backend that lost the digest (a failover to a replica
    that never had either): the node attests again with its renewal token, is given a new
    password, and goes on."""
    worker_id = await attested_worker(stack.admin, stack.node, stack.log, MODEL, api_url=stack.url)
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, stack))[0] == 200
        await store.forget_acl_digest(stack.admin, worker_id)
        await acl.delete_worker_user(stack.admin, worker_id)  # its connections are cut too
        await served_again(session, stack)
    assert stack.node.poll() is None
    log = stack.log.read_text()
    assert "attesting again" in log and "revoked" not in log
    assert worker_id in await acl.worker_users(stack.admin)
    assert await store.acl_digests(stack.admin, [worker_id])  # kept anew


async def test_a_job_the_node_could_not_start_goes_on_at_once(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a node whose Redis came back under a job it had just taken (its bookkeeping
    failing with ConnectionError) left the turn waiting out the first-token timeout (60 s),
    then answered 503 "no worker": the only worker had been tried. Now the node's bookkeeping
    runs beside the job, off its first token's path, and the job is served all the same (a job
    the node cannot run at all is answered worker_unavailable at once and goes on elsewhere)."""
    real_start = JobBook.astart
    failures = []

    async def start_once_failing(book: JobBook, job: Job) -> object:
        if not failures:
            failures.append(job.id)
            raise redis.ConnectionError("Connection closed by server.")
        return await real_start(book, job)

    monkeypatch.setattr(JobBook, "astart", start_once_failing)
    engine = InstantEngine(DEFAULT_MODEL)
    await engine.start()
    node = Node(NodeConfig(DEFAULT_MODEL, "instant", redis_url, heartbeat_s=0.2), engine)
    stop = asyncio.Event()
    serving = asyncio.create_task(node.serve(stop))
    # First-token and idle timeouts far past the test's own: a turn left waiting fails it.
    async with dev_stack(settings, redis_url, first_token_timeout_s=3600, idle_timeout_s=3600) as (
        dispatcher,
        ledger,
    ):
        while await registry.get_worker(dispatcher.redis, node.worker_id) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        user = await funded_user(ledger, 8102)
        turn = await dispatcher.start_turn(
            TurnRequest(user, DEFAULT_MODEL, [ChatMessage(role="user", content="one two")], 8)
        )
        parts, done = [], None
        async with asyncio.timeout(300):
            async for event in turn.events():
                if isinstance(event, TurnText):
                    parts.append(event.text)
                else:
                    done = event
        assert "".join(parts) == "one two" and isinstance(done, TurnDone)
        assert turn.tried == [node.worker_id] and len(failures) == 1
        assert (await ledger.balances(user)).available == TON - done.cost
        assert (await ledger.audit()).ok
    stop.set()
    await serving
    await engine.close()
    # RQ still tells the truth: the job is finished, nothing left in its intermediate queue.
    with redis.Redis.from_url(redis_url) as sync:
        job = Job.fetch(failures[0], connection=sync, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        assert sync.llen(JobBook(sync, node.worker_id).queue.intermediate_queue_key) == 0
