"""One chat turn end to end: real Redis, real RQ queues, a real worker process running the real
small model, the real ledger on SQLite. Billing must happen once, from the signed usage."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from backend.dispatch import Dispatcher, TurnDone, TurnError, TurnRequest, TurnText
from backend.ledger import Balances, Ledger
from backend.serverkeys import route_id, route_secret
from backend.settings import DEFAULT_MODEL, Settings
from tests.support.env import require_module
from tests.support.turns import (
    TON,
    Node,
    assert_billed_once,
    cancel_after,
    dev_stack,
    funded_user,
    open_holds,
    usage_cost,
)
from workers import registry
from workers.wire import ChatMessage

require_module("llama_cpp")

pytestmark = pytest.mark.engine


@pytest.fixture
def nodes(redis_url: str) -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def node(nodes: list[Node], redis_url: str) -> Node:
    """One worker node on the small model, registered directly (a dev worker)."""
    nodes.append(Node(redis_url))
    return nodes[-1]


@pytest.fixture
async def stack(settings: Settings, redis_url: str) -> AsyncIterator[tuple[Dispatcher, Ledger]]:
    """The dispatcher's timeouts are long here (a loaded machine is slow, never a frozen
    worker); a test about a timeout sets its own, short one."""
    async with dev_stack(settings, redis_url, first_token_timeout_s=60, idle_timeout_s=60) as pair:
        yield pair


def ask(user_id: int, text: str, max_tokens: int = 24, **kw: object) -> TurnRequest:
    return TurnRequest(
        user_id=user_id,
        model=DEFAULT_MODEL,
        messages=[ChatMessage(role="user", content=text)],
        max_tokens=max_tokens,
        **kw,  # type: ignore[arg-type]
    )


async def run_turn(dispatcher: Dispatcher, request: TurnRequest) -> tuple[str, TurnDone]:
    turn = await dispatcher.start_turn(request)
    parts: list[str] = []
    done: TurnDone | None = None
    async for event in turn.events():
        if isinstance(event, TurnText):
            assert done is None, "text after the final record"
            parts.append(event.text)
        else:
            done = event
    assert done is not None
    return "".join(parts), done


async def test_a_turn_streams_and_is_billed_once_from_signed_usage(
    stack: tuple[Dispatcher, Ledger], nodes: list[Node], redis_url: str, settings: Settings
) -> None:
    dispatcher, ledger = stack
    provider = await funded_user(ledger, 900, amount=0)
    nodes.append(Node(redis_url, provider_id=provider))
    user = await funded_user(ledger, 901)

    text, done = await run_turn(dispatcher, ask(user, "Name three colors.", conversation_id="c1"))

    assert text.strip()
    assert done.completion_tokens > 0 and done.prompt_tokens > 0
    assert done.worker.tee == "dev"
    # The worker's receipt verified and was kept: what /privacy and the Mini App show.
    assert done.receipt is not None and done.worker.receipt_id == done.turn_id
    assert done.receipt.signed.receipt.reply_sha256 == hashlib.sha256(text.encode()).hexdigest()
    await assert_billed_once(ledger, settings, done, user=user, provider=provider)

    # The next turn of the conversation goes to the same worker (prefix cache).
    _text, again = await run_turn(dispatcher, ask(user, "And two more.", conversation_id="c1"))
    assert again.worker.worker_id == done.worker.worker_id


async def test_refusals_leave_no_hold(stack: tuple[Dispatcher, Ledger], redis_url: str) -> None:
    dispatcher, ledger = stack
    poor = await funded_user(ledger, 902, amount=10)
    rich = await funded_user(ledger, 903)

    with pytest.raises(TurnError) as raised:
        await dispatcher.start_turn(ask(poor, "hello"))
    assert raised.value.code == "insufficient_balance"

    with pytest.raises(TurnError) as raised:
        await dispatcher.start_turn(
            TurnRequest(rich, "no-such-model", [ChatMessage(role="user", content="hi")])
        )
    assert raised.value.code == "unknown_model" and DEFAULT_MODEL in str(raised.value)

    with pytest.raises(TurnError) as raised:  # no worker is running
        await dispatcher.start_turn(ask(rich, "hello"))
    assert raised.value.code == "no_worker"

    assert (await ledger.balances(poor)).available == 10
    assert (await ledger.balances(rich)).available == TON
    assert not await open_holds(ledger)
    assert (await ledger.audit()).ok


async def test_a_worker_frozen_before_the_first_token_is_replaced(
    stack: tuple[Dispatcher, Ledger], nodes: list[Node], redis_url: str
) -> None:
    dispatcher, ledger = stack
    user = await funded_user(ledger, 904)
    frozen = Node(redis_url)  # registered for its whole --ttl: it stays the obvious choice
    nodes.append(frozen)
    frozen.signal(signal.SIGSTOP)  # alive in the registry, but answers nothing
    healthy = Node(redis_url)
    nodes.append(healthy)
    # Make the frozen one the obvious choice: the conversation's previous worker.
    route = route_id(route_secret(dispatcher.settings), "stuck")  # as the dispatcher names it
    await registry.remember_route(dispatcher.redis, route, frozen.worker_id, 60)

    # The frozen worker is given up after a short first-token wait; the healthy one, however
    # slow this machine is, gets the fixture's long one. Each attempt reads the timeout when
    # it starts, and the first starts at the first step of the turn's events.
    dispatcher.first_token_timeout_s = 2
    turn = await dispatcher.start_turn(ask(user, "Say hi.", conversation_id="stuck"))
    events = turn.events()
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # the first attempt takes its 2 s
    dispatcher.first_token_timeout_s = 60
    parts: list[str] = []
    done: TurnDone | None = None
    event = await first
    while True:
        if isinstance(event, TurnText):
            parts.append(event.text)
        else:
            done = event
        try:
            event = await anext(events)
        except StopAsyncIteration:
            break
    assert turn.tried == [frozen.worker_id, healthy.worker_id]
    assert "".join(parts) and done is not None and done.worker.worker_id == healthy.worker_id
    assert (await ledger.balances(user)).available == TON - done.cost
    assert not await open_holds(ledger)
    frozen.signal(signal.SIGKILL)


async def test_a_worker_killed_mid_stream_refunds_the_turn(
    stack: tuple[Dispatcher, Ledger], node: Node
) -> None:
    dispatcher, ledger = stack
    dispatcher.idle_timeout_s = 2  # the worker is dead: no machine is too slow for this
    user = await funded_user(ledger, 905)

    turn = await dispatcher.start_turn(ask(user, "Write a long story about the sea.", 1000))
    with pytest.raises(TurnError) as raised:
        async with asyncio.timeout(120):  # a hang fails here, not at pytest's timeout
            async for event in turn.events():
                if isinstance(event, TurnText) and node.process.poll() is None:
                    node.signal(signal.SIGKILL)
    assert raised.value.code == "timeout" and "not charged" in str(raised.value)
    assert await ledger.balances(user) == Balances(available=TON)
    assert not await open_holds(ledger)
    assert (await ledger.audit()).ok


async def test_cancel_stops_generation_and_bills_what_was_generated(
    stack: tuple[Dispatcher, Ledger], node: Node, settings: Settings
) -> None:
    dispatcher, ledger = stack
    user = await funded_user(ledger, 906)

    turn = await dispatcher.start_turn(ask(user, "Count from one to five hundred.", 1500))
    done = await cancel_after(turn, 3)
    assert done is not None and done.finish_reason == "cancelled"
    assert 3 <= done.completion_tokens < 1500
    assert done.prompt_tokens > 0  # the engine's real usage, not a guess
    assert done.cost == usage_cost(settings, done)
    assert (await ledger.balances(user)).available == TON - done.cost
    assert not await open_holds(ledger)


async def test_a_client_that_walks_away_is_billed_once_in_the_background(
    stack: tuple[Dispatcher, Ledger], node: Node
) -> None:
    dispatcher, ledger = stack
    user = await funded_user(ledger, 907)

    turn = await dispatcher.start_turn(ask(user, "Tell me about rivers.", 800))
    events = turn.events()
    async for event in events:
        assert isinstance(event, TurnText)
        break
    await events.aclose()  # the client is gone
    async with asyncio.timeout(120):  # an upper bound: the 800 tokens end it much sooner
        while await open_holds(ledger):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    balances = await ledger.balances(user)
    assert 0 < TON - balances.available < TON and balances.held == 0
    assert (await ledger.audit()).ok


async def test_a_prompt_leaves_no_plaintext_in_redis_or_the_database(
    stack: tuple[Dispatcher, Ledger], node: Node, redis_url: str, settings: Settings
) -> None:
    dispatcher, ledger = stack
    user = await funded_user(ledger, 908)
    canary = "CANARY-" + uuid.uuid4().hex

    await run_turn(dispatcher, ask(user, f"Repeat this word exactly: {canary}", 40))

    client = redis.Redis.from_url(redis_url)
    needle = canary.encode()
    fragment = canary[7:23].encode()  # a model may echo part of it
    for key in client.scan_iter(count=1000):
        assert needle not in key
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [*client.hgetall(key).keys(), *client.hgetall(key).values()]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind in (b"set",):
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = [v for _, fields in client.xrange(key) for v in fields.values()]
        else:
            values = []
        for value in values:
            assert fragment not in value, f"plaintext in Redis key {key!r}"
    client.close()
    await ledger.db.close()
    database = Path(settings.db_url.split("///", 1)[1])
    for path in database.parent.glob(database.name + "*"):
        assert fragment not in path.read_bytes(), f"plaintext in {path.name}"
