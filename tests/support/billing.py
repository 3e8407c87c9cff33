"""The billing-bounds tests' harness (tests/test_billing_bounds.py, test_billing_honest.py): a
dispatcher and ledger on the development stack with their own metrics, rogue workers and nodes
stopped after the test, a turn asked and read to its end, a condition waited for, a clock the
test moves. Its fixtures are registered in tests/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from backend.dispatch import Dispatcher, Turn, TurnDone, TurnError, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.metrics import TurnMetrics
from backend.models import Notification, WorkerFlag
from backend.pricing import turn_cost
from backend.settings import DEFAULT_MODEL, Settings
from tests.support.ops import InstantNode
from tests.support.rogue import RogueWorker
from tests.support.turns import Node, dev_stack, funded_user
from workers.wire import (
    ChatMessage,
)


@dataclass
class Stack:
    dispatcher: Dispatcher
    ledger: Ledger
    settings: Settings
    metrics: CollectorRegistry

    def flagged(self, kind: str) -> float:
        """How many times the metric counted ``kind``."""
        value = self.metrics.get_sample_value(
            "cocoon_worker_flags_total", {"model": DEFAULT_MODEL, "kind": kind}
        )
        return value or 0.0

    def cost(self, prompt: int, cached: int, completion: int) -> int:
        return turn_cost(
            self.settings.models[DEFAULT_MODEL],
            prompt_tokens=prompt,
            cached_prompt_tokens=cached,
            completion_tokens=completion,
        )

    async def flags(self) -> set[tuple[str, str, int, int]]:
        async with self.ledger.db.session() as session:
            rows = await session.scalars(select(WorkerFlag))
            return {(r.worker_id, r.kind, r.claimed, r.bound) for r in rows}

    async def provider_and_user(self, telegram_id: int) -> tuple[int, int]:
        """A provider (nothing on its balance), Telegram id ``telegram_id``, and a user funded
        with ``TON``, the next id."""
        provider = await funded_user(self.ledger, telegram_id, amount=0)
        return provider, await funded_user(self.ledger, telegram_id + 1)

    async def notifications(self, user_id: int) -> list[Notification]:
        async with self.ledger.db.session() as session:
            query = select(Notification).where(Notification.user_id == user_id)
            return list(await session.scalars(query))


@pytest.fixture
async def stack(settings: Settings, redis_url: str) -> AsyncIterator[Stack]:
    metrics = CollectorRegistry()
    async with dev_stack(
        settings,
        redis_url,
        first_token_timeout_s=60,
        idle_timeout_s=60,
        metrics=TurnMetrics(metrics),
    ) as (dispatcher, ledger):
        yield Stack(dispatcher, ledger, dispatcher.settings, metrics)


@pytest.fixture
async def rogues(redis_url: str) -> AsyncIterator[Callable[..., RogueWorker]]:
    made: list[RogueWorker] = []

    def make(**kw: object) -> RogueWorker:
        rogue = RogueWorker(redis_url, **kw)  # type: ignore[arg-type]
        made.append(rogue)
        return rogue

    yield make
    for rogue in made:
        await rogue.close()


@pytest.fixture
def nodes() -> Iterator[list[InstantNode | Node]]:
    started: list[InstantNode | Node] = []
    yield started
    for node in started:
        node.stop()


def ask(user_id: int, text: str, max_tokens: int, **kw: object) -> TurnRequest:
    return TurnRequest(
        user_id=user_id,
        model=DEFAULT_MODEL,
        messages=[ChatMessage(role="user", content=text)],
        max_tokens=max_tokens,
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Ending:
    """What a client saw of a turn: the text, and the final event or the error."""

    text: str
    done: TurnDone | None
    error: TurnError | None


async def read_turn(turn: Turn, on_text: Callable[[str], Awaitable[None]] | None = None) -> Ending:
    parts: list[str] = []
    try:
        async for event in turn.events():
            if isinstance(event, TurnText):
                parts.append(event.text)
                if on_text is not None:
                    await on_text(event.text)
            else:
                return Ending("".join(parts), event, None)
    except TurnError as error:
        return Ending("".join(parts), None, error)
    raise AssertionError("the turn ended without a final event or an error")


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "the condition never came true"
        await asyncio.sleep(0.02)


class FakeClock:
    """The dispatcher's clock (deadlines, timeouts), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now
