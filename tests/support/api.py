"""``cocoon web`` on loopback for the OpenAI-compatible API's tests: a funded user with an API
key, the ledger to check what was billed, and a worker node on the small model when a test asks
for one (the ``node`` fixture)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web
from sqlalchemy import select

from backend.apikeys import create_key
from backend.db import Database
from backend.ledger import Ledger
from backend.models import TurnRecord
from backend.settings import AttestationSettings, Settings
from backend.users import get_or_create_user
from backend.web import start_web
from tests.support.turns import TON, Node, open_holds


@dataclass
class Api:
    """A running API: its ``/v1`` URL, a funded user's key, the ledger, the user's id, and the
    openai SDK clients made by :meth:`client` (the ``v1_server`` fixture closes them)."""

    base_url: str
    key: str
    ledger: Ledger
    user_id: int
    settings: Settings
    clients: list[openai.AsyncOpenAI] = field(default_factory=list, repr=False)

    async def new_key(self) -> str:
        key, _row = await create_key(self.ledger.db, self.user_id)
        return key

    def client(self, **options: Any) -> openai.AsyncOpenAI:
        """An openai SDK client of this API: its URL, the user's key, no retries; keywords
        (``api_key``, ``max_retries``, ``timeout``...) change them. It is closed when the test
        ends, passed or failed: a test closes it itself only to have it closed sooner."""
        made = openai.AsyncOpenAI(
            **{"base_url": self.base_url, "api_key": self.key, "max_retries": 0, **options}
        )
        self.clients.append(made)
        return made


ApiFactory = Callable[..., Awaitable[Api]]

WORKER_SILENCE_S = 3600.0
"""The API's first-token and idle timeouts in these tests: longer than any test may run (the
pytest timeout), so no test depends on how fast the node answers."""

WEATHER = {  # a function the clients offer (OpenAI's tool shape)
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


async def settled_turns(v1: Api, timeout_s: float = 60.0) -> list[TurnRecord]:
    """The user's settled turns, once no hold is open (the last turn has settled)."""
    deadline = time.monotonic() + timeout_s
    while await open_holds(v1.ledger):
        assert time.monotonic() < deadline, "a hold is still open"
        await asyncio.sleep(0.2)
    async with v1.ledger.db.session() as session:
        return list(await session.scalars(select(TurnRecord).order_by(TurnRecord.id)))


async def charged_turns(v1: Api) -> list[TurnRecord]:
    """:func:`settled_turns`, checking that the user (funded with 1 TON) was charged exactly
    what they cost."""
    turns = await settled_turns(v1)
    assert (await v1.ledger.balances(v1.user_id)).available == TON - sum(t.cost for t in turns)
    return turns


@pytest.fixture
async def v1_server(settings: Settings, redis_url: str) -> AsyncIterator[ApiFactory]:
    """Start the API with ``settings`` changed by the keywords given (dev mode on: the tests'
    nodes register directly, as unattested dev workers). It runs as ``cocoon web`` runs it
    (``start_web``): a handler is not cancelled when its client goes away. At the end the SDK
    clients each API made (:meth:`Api.client`) are closed, then the APIs."""
    started: list[tuple[web.AppRunner, Database]] = []
    apis: list[Api] = []

    async def start(**overrides: Any) -> Api:
        # The node is slow on a loaded machine, never dead: a turn waits for its reply, and
        # only the test's own timeout ends that wait. (With the default 60 s, a tool call's
        # first entry, sent once the whole call is read, came after it at load 8: the turn
        # was retried elsewhere, found no other worker, and the client got a 503 no_worker.)
        update: dict[str, Any] = {
            "attestation": AttestationSettings(allow_dev=True),
            "worker_first_token_timeout_s": WORKER_SILENCE_S,
            "worker_idle_timeout_s": WORKER_SILENCE_S,
        }
        update.update(overrides)
        dev = settings.model_copy(update=update)
        db = Database.from_settings(dev)
        await db.upgrade()
        ledger = Ledger(db)
        user = await get_or_create_user(db, 4242)
        await ledger.credit_deposit(user.id, TON, "dep")
        key, _row = await create_key(db, user.id)
        runner = await start_web(dev, "127.0.0.1", 0)
        started.append((runner, db))
        host, port = runner.addresses[0][:2]
        apis.append(Api(f"http://{host}:{port}/v1", key, ledger, user.id, dev))
        return apis[-1]

    yield start
    try:
        for api in apis:
            for client in api.clients:
                await client.close()
    finally:
        for runner, db in started:
            await runner.cleanup()
            await db.close()


@pytest.fixture
async def v1(v1_server: ApiFactory) -> Api:
    """The API with the test settings."""
    return await v1_server()


@pytest.fixture
def node(redis_url: str) -> Iterator[Node]:
    """A worker node process on the small model (llama.cpp)."""
    started = Node(redis_url)
    yield started
    started.stop()
