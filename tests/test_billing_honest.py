"""Honest workers are billed exactly their signed usage (the instant engine and the real SmolLM2
model); a turn whose engine misses the stop grace is billed its prompt too; flags are kept once
per turn and kind on SQLite and PostgreSQL, the admin sees them and the provider is told once
(issue 12). The lying workers are in test_billing_bounds.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio as aioredis
from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy import select

from backend.bounds import (
    Flag,
    Violation,
)
from backend.db import Database
from backend.flags import record_flags
from backend.models import Notification, WorkerFlag
from backend.notifications import NOTIFY_WORKER_FLAGGED
from backend.settings import DEFAULT_MODEL
from backend.users import get_or_create_user

# -- harness ---------------------------------------------------------------------------------
from tests.support.billing import Stack, ask, eventually, read_turn
from tests.support.bot import ADMIN
from tests.support.bot import Harness as BotHarness
from tests.support.env import require_module
from tests.support.ops import InstantNode
from tests.support.turns import TON, Node, cancel_after, funded_user, open_holds
from workers import job_run, streams
from workers.engines import GenerationRequest, TextDelta, Usage
from workers.engines.instant import InstantEngine
from workers.jobs import enqueue_job
from workers.stream_crypto import StreamOpener
from workers.wire import (
    ChatMessage,
    FinalRecord,
    JobRequest,
    WorkerKeys,
    new_reply_keypair,
    public_b64,
    seal_request,
)

# -- honest workers are billed exactly what they signed -----------------------------------------


@pytest.mark.slow
async def test_an_honest_instant_worker_is_billed_exactly_its_usage(
    stack: Stack, nodes: list[InstantNode | Node], redis_url: str
) -> None:
    ledger = stack.ledger
    provider, user = await stack.provider_and_user(840)
    nodes.append(InstantNode(redis_url, provider_id=provider))

    turn = await stack.dispatcher.start_turn(ask(user, "one two three four five", max_tokens=3))
    seen = await read_turn(turn)

    assert seen.done is not None and seen.text == "one two three"
    done = seen.done
    # The instant engine's tokens are words: 5 in the prompt, 3 echoed.
    assert (done.prompt_tokens, done.cached_prompt_tokens, done.completion_tokens) == (5, 0, 3)
    assert done.cost == stack.cost(5, 0, 3)
    assert (await ledger.balances(user)).available == TON - done.cost
    assert await stack.flags() == set()


@pytest.mark.engine
async def test_an_honest_smollm2_turn_is_billed_exactly_its_signed_usage(
    stack: Stack, nodes: list[InstantNode | Node], redis_url: str
) -> None:
    """A lone "hi" is 31 tokens for SmolLM2 (its template adds a system prompt): more than the
    old prompt bound (26), within the new one."""
    require_module("llama_cpp")
    from workers.engines.llama_cpp import LlamaCppEngine

    ledger = stack.ledger
    user = await funded_user(ledger, 851)
    nodes.append(Node(redis_url))
    asks = ["hi", "Count from one to twenty.", "Write a long poem about the sea."]

    ends = []
    for text in asks[:2]:
        ends.append(await read_turn(await stack.dispatcher.start_turn(ask(user, text, 48))))
    # Stopped after two chunks: the engine ends between two tokens, with text held back.
    turn = await stack.dispatcher.start_turn(ask(user, asks[2], 200))
    stopped = await cancel_after(turn, 2)
    assert stopped is not None and stopped.finish_reason == "cancelled"

    engine = LlamaCppEngine(DEFAULT_MODEL, n_threads=1)
    await engine.start()
    try:
        prompts = [engine.count_prompt_tokens([{"role": "user", "content": t}]) for t in asks]
    finally:
        await engine.close()
    assert prompts[0] is not None and prompts[0] > 26
    for done, prompt in zip([e.done for e in ends] + [stopped], prompts, strict=True):
        assert done is not None
        assert done.prompt_tokens == prompt
        assert 0 < done.completion_tokens <= 200
        assert done.cost == stack.cost(
            done.prompt_tokens, done.cached_prompt_tokens, done.completion_tokens
        )
    assert all(e.text.strip() for e in ends)
    assert await stack.flags() == set()
    assert stack.flagged("completion_tokens") == 0 and stack.flagged("prompt_tokens") == 0
    assert not await open_holds(ledger) and (await ledger.audit()).ok


# -- a stopped turn bills what was used ----------------------------------------------------------


class DeafEngine(InstantEngine):
    """An engine that streams a few words, then hangs, deaf to the stop signal (a wedged GPU
    kernel): the node must cancel it and count the usage itself."""

    name = "deaf"

    async def generate(self, request: GenerationRequest):  # type: ignore[override]
        for word in ("one", " two", " three"):
            yield TextDelta(word)
        await asyncio.Event().wait()
        yield Usage(0, 0, 0, "stop")  # never reached


async def test_a_turn_whose_engine_misses_the_stop_grace_bills_its_prompt_too(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_run, "STOP_GRACE_S", 0.05)
    sync = redis.Redis.from_url(redis_url)
    aredis = aioredis.Redis.from_url(redis_url)
    keys = WorkerKeys.generate()
    reply_key = new_reply_keypair()
    messages = [
        ChatMessage(role="system", content="You answer in three words."),
        ChatMessage(role="user", content="Name the first three numbers, please."),
    ]
    request = JobRequest(
        job_id="deaf-1",
        model="echo",
        messages=messages,
        max_tokens=50,
        reply_key=public_b64(reply_key),
    )
    enqueue_job(sync, "deaf", request.job_id, seal_request(request, keys.box_public_b64),
                timeout_s=60, ttl_s=60)  # fmt: skip
    job = Job.fetch(request.job_id, connection=sync, serializer=JSONSerializer)
    engine = DeafEngine("echo")
    await engine.start()
    run = job_run.JobRun(job, engine=engine, keys=keys, redis=aredis)
    try:
        running = asyncio.create_task(run.run())

        async def streamed() -> bool:
            return run.deltas == 3

        await eventually(streamed)
        run.stop("cancel")  # the user pressed stop; the engine does not hear it
        outcome = await asyncio.wait_for(running, 10)
        entries = await aredis.xrange(streams.stream_key(request.job_id))
    finally:
        sync.close()
        await aredis.aclose()

    opener = StreamOpener(reply_key, keys.verify_key_b64, request.job_id)
    last = [opener.open(fields[b"d"]) for _id, fields in entries][-1]
    assert isinstance(last, FinalRecord) and last.finish_reason == "cancelled"
    # The prompt was read (three words came of it): billed, as the engine counts it.
    prompt = engine.count_prompt_tokens([m.model_dump() for m in messages])
    assert prompt == 11
    assert (last.prompt_tokens, last.completion_tokens) == (prompt, 3)
    assert outcome.ok and outcome.usage is not None and outcome.usage.prompt_tokens == prompt


# -- flags on both databases -------------------------------------------------------------------


async def test_flags_are_kept_once_per_turn_and_kind_and_the_provider_told_once(
    db: Database,
) -> None:
    provider = (await get_or_create_user(db, 860)).id
    crossed = [Flag(Violation.REPLY_BYTES, 300_000_000, 1280), Flag(Violation.DEADLINE, 700, 690)]
    assert (
        await record_flags(
            db, crossed, worker_id="w-1", provider_id=provider, turn_id="t-1", model="m"
        )
        == 2
    )
    # The same turn reported twice (a retry of the recording): nothing new.
    assert (
        await record_flags(
            db, crossed, worker_id="w-1", provider_id=provider, turn_id="t-1", model="m"
        )
        == 0
    )
    assert (
        await record_flags(
            db, crossed[:1], worker_id="w-1", provider_id=provider, turn_id="t-2", model="m"
        )
        == 1
    )
    assert (
        await record_flags(
            db, crossed[:1], worker_id="w-2", provider_id=None, turn_id="t-3", model="m"
        )
        == 1
    )
    async with db.session() as session:
        rows = list(await session.scalars(select(WorkerFlag).order_by(WorkerFlag.id)))
        told = list(await session.scalars(select(Notification)))
    assert [(r.worker_id, r.turn_id, r.kind) for r in rows] == [
        ("w-1", "t-1", "reply_bytes"),
        ("w-1", "t-1", "deadline"),
        ("w-1", "t-2", "reply_bytes"),
        ("w-2", "t-3", "reply_bytes"),
    ]
    assert [(n.user_id, n.kind) for n in told] == [(provider, NOTIFY_WORKER_FLAGGED)]
    assert json.loads(told[0].data or "{}") == {
        "worker_id": "w-1",
        "kind": "reply_bytes",
        "claimed": 300_000_000,
        "bound": 1280,
    }


async def test_the_admin_sees_the_flags_in_stats_and_the_provider_is_told_in_the_bot(
    bot: BotHarness,
) -> None:
    provider = (await get_or_create_user(bot.db, 870)).id
    crossed = [Flag(Violation.COMPLETION_TOKENS, 512, 35)]
    for worker, owner, turn in (("w-1", provider, "t-1"), ("w-2", None, "t-2")):
        await record_flags(
            bot.db, crossed, worker_id=worker, provider_id=owner, turn_id=turn, model="m"
        )

    await bot.send("/stats", user=ADMIN)
    assert "Bounds crossed by workers: 2 (latest: w-2, w-1)" in bot.last().text
    assert await bot.app.outbox.drain_once() == 1
    told = bot.last()
    assert told.chat_id == 870
    assert "Worker w-1 went beyond what a turn allows (completion_tokens: 512 > 35)" in told.text
