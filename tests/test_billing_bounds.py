"""The backend bounds every bill and every reply (issue 12, items 2, 4 and 7).

A worker that lies (``tests/support/rogue.py``: registered with keys of its own, its records
sealed and signed with them, written straight into Redis) is billed at the bounds, cut off when
its reply is too large, too fragmented or too slow, and flagged: a metric, a row the operator
sees in ``/stats``, its provider told once. Honest workers, a stopped turn and the flags on both
databases are in test_billing_honest.py; the harness in tests/support/billing.py. Real Redis,
real RQ queues, the real ledger on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import Callable

import pytest

from backend import accounts
from backend.bounds import (
    COMPLETION_SLACK_TOKENS,
    Flag,
    ReplyBounds,
    Violation,
    bill,
    delivered_floor,
    prompt_token_bound,
)
from backend.dispatch import TurnText
from backend.ledger import Ledger
from backend.notifications import NOTIFY_WORKER_FLAGGED
from bot.i18n import use_language
from bot.outbox import render

# -- harness ---------------------------------------------------------------------------------
from tests.support.billing import FakeClock, Stack, ask, eventually, read_turn
from tests.support.rogue import RogueWorker
from tests.support.turns import TON, funded_user, open_holds
from workers import registry, streams
from workers.wire import (
    WIRE_VERSION,
    ChatMessage,
    FinalRecord,
    WorkerKeys,
    event_payload,
)

# -- the bounds themselves -------------------------------------------------------------------


def final(prompt: int, completion: int, cached: int = 0) -> FinalRecord:
    return FinalRecord(
        job_id="j-1",
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        completion_tokens=completion,
        finish_reason="stop",
    )


def test_counts_within_the_bounds_are_billed_as_signed() -> None:
    messages = [ChatMessage(role="user", content="Name three colors.")]
    billed = bill(
        final(31, 9, cached=12),
        messages=messages,
        stop=(),
        max_tokens=24,
        context_length=2048,
        delivered_bytes=20,
    )
    assert (billed.prompt_tokens, billed.cached_prompt_tokens, billed.completion_tokens) == (
        31,
        12,
        9,
    )
    assert billed.flags == ()


def test_each_count_over_its_bound_is_billed_at_the_bound() -> None:
    messages = [ChatMessage(role="user", content="hi")]  # 2 bytes
    billed = bill(
        final(10_000_000, 512, cached=10_000_000),
        messages=messages,
        stop=("END-OF-IT",),  # 9 bytes the engine counts but never delivers
        max_tokens=512,
        context_length=2048,
        delivered_bytes=3,
    )
    prompt_bound = prompt_token_bound(messages)
    assert prompt_bound < 2048
    assert billed.prompt_tokens == prompt_bound
    assert billed.cached_prompt_tokens == prompt_bound  # never more than the prompt billed
    assert billed.completion_tokens == 3 + COMPLETION_SLACK_TOKENS + 9
    assert billed.flags == (
        Flag(Violation.PROMPT_TOKENS, 10_000_000, prompt_bound),
        Flag(Violation.COMPLETION_TOKENS, 512, 3 + COMPLETION_SLACK_TOKENS + 9),
    )
    # The context length bounds a prompt too, and max_tokens a completion.
    long = [ChatMessage(role="user", content="x" * 5000)]
    billed = bill(
        final(4000, 100),
        messages=long,
        stop=(),
        max_tokens=16,
        context_length=2048,
        delivered_bytes=10_000,
    )
    assert (billed.prompt_tokens, billed.completion_tokens) == (2048, 16)


def test_a_reply_of_max_tokens_1_may_be_a_few_kilobytes_never_megabytes() -> None:
    bounds = ReplyBounds.for_max_tokens(1)
    assert bounds.text_bytes < 2_000 and bounds.chunks < 20
    assert bounds.sealed_bytes < 200_000
    assert (
        delivered_floor(0, 1) == 0 and delivered_floor(1, 1) == 1 and delivered_floor(10**6, 1) == 1
    )
    assert delivered_floor(257, 100) == 2


# -- a worker that lies about its usage -------------------------------------------------------


async def test_an_inflated_final_record_is_billed_at_the_bound_and_the_worker_flagged(
    stack: Stack, rogues: Callable[..., RogueWorker]
) -> None:
    ledger = stack.ledger
    provider, user = await stack.provider_and_user(800)
    rogue = rogues(provider_id=provider)
    request = ask(user, "Say hi", max_tokens=512)

    turn = await stack.dispatcher.start_turn(request)
    job = await rogue.take()
    await rogue.chunk(job, "Hi!")
    # A one-token reply, billed as ten million prompt tokens of a 2,048-token model and the
    # whole reply budget.
    await rogue.final(job, prompt_tokens=10_000_000, completion_tokens=512)
    seen = await read_turn(turn)

    assert seen.error is None and seen.done is not None and seen.text == "Hi!"
    prompt_bound = prompt_token_bound(request.messages)
    completion_bound = len(b"Hi!") + COMPLETION_SLACK_TOKENS
    done = seen.done
    assert (done.prompt_tokens, done.completion_tokens) == (prompt_bound, completion_bound)
    expected = stack.cost(prompt_bound, 0, completion_bound)
    assert done.cost == expected
    assert (await ledger.balances(user)).available == TON - expected
    share = expected * stack.settings.provider_share_bps // 10_000
    assert (await ledger.balances(provider)).earned == share
    assert not await open_holds(ledger)
    assert (await ledger.audit()).ok

    # Flagged: a row per bound crossed, the metric, the provider told.
    assert await stack.flags() == {
        (rogue.worker_id, "prompt_tokens", 10_000_000, prompt_bound),
        (rogue.worker_id, "completion_tokens", 512, completion_bound),
    }
    assert stack.flagged("prompt_tokens") == 1 and stack.flagged("completion_tokens") == 1
    told = await stack.notifications(provider)
    assert [n.kind for n in told] == [NOTIFY_WORKER_FLAGGED]
    with use_language("en"):
        text = render(told[0], None)
    assert rogue.worker_id in text and "prompt_tokens" in text and "10000000" in text

    # Again: billed at the bound again, counted again, but the provider is told only once.
    turn = await stack.dispatcher.start_turn(ask(user, "Say hi", max_tokens=512))
    job = await rogue.take()
    await rogue.chunk(job, "Hi!")
    await rogue.final(job, prompt_tokens=10_000_000, completion_tokens=512)
    again = await read_turn(turn)
    assert again.done is not None and again.done.cost == expected
    assert stack.flagged("prompt_tokens") == 2
    assert len(await stack.notifications(provider)) == 1

    # The operator sees it in /stats.
    stats = await accounts.stats(ledger.db, stack.dispatcher.redis)
    assert stats.flags == 4 and stats.flagged_workers == (rogue.worker_id,)


async def test_usage_signed_by_another_key_is_refused_and_nothing_is_charged(
    stack: Stack, rogues: Callable[..., RogueWorker]
) -> None:
    """A turn is billed only from a final record signed by the key its worker registered (so
    every reply shown as settled carries verified usage): usage signed by any other key ends
    the turn with ``worker_error``, and the whole hold goes back."""
    ledger = stack.ledger
    provider, user = await stack.provider_and_user(805)
    rogue = rogues(provider_id=provider)
    turn = await stack.dispatcher.start_turn(ask(user, "Say hi", max_tokens=16))
    job = await rogue.take()
    await rogue.chunk(job, "Hi!")
    record = FinalRecord(
        job_id=job.job_id,
        prompt_tokens=5,
        cached_prompt_tokens=0,
        completion_tokens=1,
        finish_reason="stop",
    )
    # In the job's own stream, its final signed by another key than the worker's.
    forged = rogue.sealer_of(job).seal_payload(event_payload(record, WorkerKeys.generate()))
    await streams.append(rogue.redis, job.job_id, forged, last=True)
    seen = await read_turn(turn)

    assert seen.done is None and seen.error is not None and seen.error.code == "worker_error"
    await eventually(lambda: _no_open_holds(ledger))
    assert (await ledger.balances(user)).available == TON
    assert (await ledger.balances(provider)).earned == 0
    assert (await ledger.audit()).ok


async def _no_open_holds(ledger: Ledger) -> bool:
    return not await open_holds(ledger)


# -- a worker that sends too much, too often, or too slowly ---------------------------------------


def oversized_chunk(job_id: str, size: int) -> bytes:
    """A chunk's JSON carrying ``size`` bytes of text: past the wire's own limit, as a modified
    node may write it."""
    chunk = {"v": WIRE_VERSION, "type": "chunk", "job_id": job_id, "seq": 0}
    text = json.dumps({**chunk, "text": "x" * size})
    return text.encode()


FLOODS = {
    # name: (how the rogue floods the stream, the bound crossed, text bytes received)
    "one 32 MB entry": ("entry", Violation.CHUNK_BYTES, 0),
    "32 chunks of 1 MB": ("megabytes", Violation.CHUNK_BYTES, 0),
    "1 kB chunks": ("kilobytes", Violation.REPLY_BYTES, 1000),
    "a hundred 1-byte chunks": ("bytes", Violation.CHUNKS, ReplyBounds.for_max_tokens(1).chunks),
}


@pytest.mark.parametrize("name", FLOODS)
async def test_a_flood_to_max_tokens_1_is_cut_off_at_its_bound_without_reading_it(
    stack: Stack, rogues: Callable[..., RogueWorker], name: str
) -> None:
    how, violation, delivered = FLOODS[name]
    ledger = stack.ledger
    provider, user = await stack.provider_and_user(810)
    rogue = rogues(provider_id=provider)
    turn = await stack.dispatcher.start_turn(ask(user, "One word please", max_tokens=1))
    job = await rogue.take()
    if how == "entry":
        await rogue.raw_entry(job, oversized_chunk(job.job_id, 32 * 1024 * 1024))
    elif how == "megabytes":
        for _ in range(32):
            await rogue.chunk(job, "x" * 1_000_000)
    elif how == "kilobytes":
        for _ in range(64):
            await rogue.chunk(job, "y" * 1000)
    else:
        for _ in range(100):
            await rogue.chunk(job, "z")
    await rogue.final(job, prompt_tokens=5, completion_tokens=1)
    stream_bytes = await rogue.redis.memory_usage(streams.stream_key(job.job_id))

    tracemalloc.start()
    try:
        seen = await read_turn(turn)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert seen.error is not None and seen.error.code == "worker_misbehaved"
    assert seen.done is None and len(seen.text.encode()) == delivered
    # The reader stopped at the bound: what it pulled is the turn's budget, not the flood.
    assert stream_bytes > 30_000_000 or how in ("kilobytes", "bytes")
    assert turn._reader is not None and turn._reader.bytes_read <= turn.bounds.sealed_bytes
    assert peak < 4_000_000
    # Billed only what was delivered within the bounds (the fewest tokens it can be).
    charged = stack.cost(0, 0, delivered_floor(delivered, 1))
    assert (await ledger.balances(user)).available == TON - charged
    assert not await open_holds(ledger) and (await ledger.audit()).ok
    assert {kind for _w, kind, _c, _b in await stack.flags()} == {violation.value}
    assert stack.flagged(violation.value) == 1
    # The job was told to stop, its slot given back, its stream dropped.
    assert await streams.is_cancel_requested(stack.dispatcher.redis, job.job_id)
    assert not await stack.dispatcher.redis.exists(streams.stream_key(job.job_id))
    assert await registry.reserve_slot(
        stack.dispatcher.redis, rogue.worker_id, "probe", ttl_s=5
    )  # capacity 4, nothing left reserved but the probe


async def test_a_trickling_worker_is_cut_off_at_the_absolute_deadline(
    stack: Stack, rogues: Callable[..., RogueWorker]
) -> None:
    dispatcher, ledger = stack.dispatcher, stack.ledger
    clock = FakeClock()
    dispatcher.clock = clock
    dispatcher.first_token_timeout_s = 60
    dispatcher.idle_timeout_s = 60
    # The job may wait 60 s for its worker, run 600 s, and end 30 s late at most: 690 s.
    allowed = 60 + dispatcher.job_timeout_s + dispatcher.deadline_grace_s
    user = await funded_user(ledger, 821)
    rogue = rogues()
    turn = await dispatcher.start_turn(ask(user, "Tell me a long story", max_tokens=2048))
    job = await rogue.take()

    received: list[str] = []
    arrived = asyncio.Event()

    async def on_text(text: str) -> None:
        received.append(text)
        arrived.set()

    reading = asyncio.create_task(read_turn(turn, on_text))
    elapsed = 0.0
    while elapsed <= allowed:  # one word every 59 s: never idle for the 60 s idle timeout
        arrived.clear()
        await rogue.chunk(job, f"word{len(received)} ")
        await asyncio.wait_for(arrived.wait(), 10)
        clock.now += 59
        elapsed += 59
    seen = await asyncio.wait_for(reading, 10)

    assert seen.error is not None and seen.error.code == "worker_misbehaved"
    assert len(received) == 12  # 11 × 59 s = 649 s < 690 s < 708 s = 12 × 59 s
    delivered = len("".join(received).encode())
    charged = stack.cost(0, 0, delivered_floor(delivered, 2048))
    assert (await ledger.balances(user)).available == TON - charged
    assert not await open_holds(ledger) and (await ledger.audit()).ok
    ((_worker, kind, claimed, bound),) = await stack.flags()
    assert (kind, bound) == ("deadline", allowed) and claimed > bound
    assert await streams.is_cancel_requested(dispatcher.redis, job.job_id)


async def test_a_flood_after_the_client_left_is_cut_off_in_the_background(
    stack: Stack, rogues: Callable[..., RogueWorker]
) -> None:
    ledger = stack.ledger
    user = await funded_user(ledger, 831)
    rogue = rogues()
    turn = await stack.dispatcher.start_turn(ask(user, "Hello there", max_tokens=4))
    job = await rogue.take()
    await rogue.chunk(job, "Hello")
    async for event in turn.events():
        assert isinstance(event, TurnText)
        break  # the client walks away after the first words
    for _ in range(8):
        await rogue.chunk(job, "x" * 1_000_000)

    async def settled_and_flagged() -> bool:
        return not await open_holds(ledger) and bool(await stack.flags())

    await eventually(settled_and_flagged)
    assert {kind for _w, kind, _c, _b in await stack.flags()} == {"chunk_bytes"}
    # The settling task picked up where the client stopped: the 5 bytes it had were billed.
    charged = stack.cost(0, 0, delivered_floor(5, 4))
    assert (await ledger.balances(user)).available == TON - charged
    assert (await ledger.audit()).ok
