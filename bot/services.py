"""The bot's process-wide services, created once and handed to handlers as workflow data.

Handlers take them by name: ``settings``, ``db``, ``ledger``, ``turns`` (the backend's turn
dispatcher; aiogram's own ``dispatcher`` name is taken), ``redis``, ``contexts``, ``running``,
``limiter``, ``outbox``. Per update, :class:`~bot.middlewares.UserMiddleware` adds ``user``
(the database row) and ``lang``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

import redis.asyncio as aioredis

from backend.db import Database
from backend.dispatch import Dispatcher as TurnDispatcher
from backend.dispatch import Turn
from backend.ledger import Ledger
from backend.metrics import TurnMetrics
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from bot.context import ContextStore, load_context_key
from bot.tonconnect import ChatWallets, ConnectorFactory
from workers import redisconn, streams
from workers.redis_keys import redis_key

RUNNING = "bot:turn"
RUNNING_TTL_S = 900
MAX_REDIS_CONNECTIONS = 256


@dataclass
class Running:
    turn: Turn | None
    draft_id: int
    owner: int


class RunningTurns:
    """One running turn per place (a private chat; in a group, one asker in one topic: see
    :attr:`bot.groups.Place.scope`). A Redis lock keeps replicas from starting a second one; the
    lock's value is the job id, so a stop pressed on another replica still reaches it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.local: dict[int | str, Running] = {}

    @staticmethod
    def key(chat_id: int | str) -> str:
        return redis_key(RUNNING, str(chat_id))

    async def acquire(self, chat_id: int | str, draft_id: int, owner: int) -> bool:
        """Claim the chat for a turn of ``owner`` (a Telegram user id)."""
        if chat_id in self.local:
            return False
        value = f"{owner}:starting"
        if not await self.redis.set(self.key(chat_id), value, nx=True, ex=RUNNING_TTL_S):
            return False
        self.local[chat_id] = Running(None, draft_id, owner)
        return True

    async def attach(self, chat_id: int | str, turn: Turn) -> None:
        entry = self.local[chat_id]
        entry.turn = turn
        value = f"{entry.owner}:{turn.job_id}"
        await self.redis.set(self.key(chat_id), value, ex=RUNNING_TTL_S)

    async def release(self, chat_id: int | str) -> None:
        self.local.pop(chat_id, None)
        await self.redis.delete(self.key(chat_id))

    async def stop(
        self, chat_id: int | str, *, draft_id: int | None = None, by: int | None = None
    ) -> bool:
        """Ask the chat's running turn to stop (billed for what was generated). ``by``: only
        the user who started it may (in a group, others cannot stop someone's answer)."""
        entry = self.local.get(chat_id)
        if entry is not None:
            if draft_id is not None and entry.draft_id != draft_id:
                return False
            if entry.turn is None or (by is not None and by != entry.owner):
                return False
            await entry.turn.cancel()
            return True
        # Running on another replica: its lock names the owner and the job.
        raw = await self.redis.get(self.key(chat_id))
        if not raw:
            return False
        owner, _sep, job_id = (raw.decode() if isinstance(raw, bytes) else raw).partition(":")
        if job_id in ("", "starting") or (by is not None and str(by) != owner):
            return False
        await streams.request_cancel(self.redis, job_id)
        return True


@dataclass
class Services:
    settings: Settings
    db: Database
    ledger: Ledger
    turns: TurnDispatcher
    redis: aioredis.Redis
    contexts: ContextStore
    running: RunningTurns
    limiter: RateLimiter
    wallets: ChatWallets
    extra: dict[str, Any] = field(default_factory=dict)

    def workflow_data(self) -> dict[str, Any]:
        """Each service under its field's name (the name handlers take it by), then ``extra``."""
        services = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**services, **self.extra}


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    db: Database | None = None,
    ledger: Ledger | None = None,
    turns: TurnDispatcher | None = None,
    tonconnect: ConnectorFactory | None = None,
    metrics: TurnMetrics | None = None,
) -> AsyncIterator[Services]:
    """The services over the settings; the database, ledger and turn dispatcher are shared
    with the caller's when given (the web app's, in webhook mode), else made and closed here
    (its turns counted on ``metrics``)."""
    async with contextlib.AsyncExitStack() as stack:
        if db is None:
            db = Database.from_settings(settings)
            stack.push_async_callback(db.close)
        if ledger is None:
            ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
        if turns is None:
            turns = TurnDispatcher.from_settings(settings, ledger, metrics=metrics)
            stack.push_async_callback(turns.close)
        # A burst of updates waits for a free connection rather than failing at the pool's
        # bound (redis-py's default pool refuses past 100: "Too many connections").
        client = redisconn.async_client(
            settings.redis_url, max_connections=MAX_REDIS_CONNECTIONS, blocking_timeout=30
        )
        # The pool is the client's own: closing the client closes its connections too.
        stack.push_async_callback(client.aclose, close_connection_pool=True)
        key = load_context_key(settings)
        contexts = ContextStore(
            client,
            key,
            ttl_s=settings.context_ttl_s,
            max_messages=settings.context_max_messages,
            shared_topics=settings.group_context == "topic",
        )
        wallets = ChatWallets(settings, db, client, key, factory=tonconnect)
        stack.push_async_callback(wallets.close)
        yield Services(
            settings=settings,
            db=db,
            ledger=ledger,
            turns=turns,
            redis=client,
            contexts=contexts,
            running=RunningTurns(client),
            limiter=RateLimiter(client, settings.rate_limit_per_minute),
            wallets=wallets,
        )
