"""A bell for stream readers: Redis tells the reader that its job's stream grew, so that the
reader neither polls nor comes late.

A reader that has read everything there is waits for the writer. Polling costs a round trip per
look and comes late by up to its interval (:data:`workers.streams.POLL_MAX_S`); a blocking
``XREAD`` would hand over whatever the writer appended, and the reader never takes more than its
bounds (:class:`workers.streams.StreamReader`). So the bell listens, on one connection of its
own for the whole process, to the keyspace channel of each stream being read
(``__keyspace@<db>__:cocoon:stream:<job_id>``): Redis publishes ``xadd`` there at every append,
a few bytes whatever the entry holds, and a worker cannot publish there (its ACL user has no
``PUBLISH``). A wake-up costs the reader one bounded read, its one read path.

The channels need ``notify-keyspace-events`` to hold ``K`` and ``t`` (streams):
:meth:`StreamBell.start` adds them (``CONFIG SET``) when Redis lets it. When Redis refuses (a
managed server, an ACL user without ``CONFIG``) or the bell's connection drops, readers keep
polling as before; a wake-up the bell missed costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from workers.redis_keys import STREAM, redis_key

__all__ = ["StreamBell"]

log = logging.getLogger(__name__)

NOTIFY_FLAGS = "Kt"
"""Keyspace events (``K``) of stream commands (``t``)."""


class StreamBell:
    """Wake-ups for the readers of one process: it starts at the first :meth:`watch`;
    :meth:`close` at the end."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis
        db = int(redis.connection_pool.connection_kwargs.get("db", 0) or 0)
        self._prefix = f"__keyspace@{db}__:"
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._rung: dict[str, asyncio.Event] = {}
        self._readers: Counter[str] = Counter()
        self._starting: asyncio.Task[bool] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self.on = False  # listening: readers may wait for the bell rather than poll
        self.refused = False  # Redis refused keyspace events (no CONFIG): readers poll

    async def start(self) -> bool:
        """Turn keyspace events of streams on and start listening; False if Redis refuses
        (readers then poll)."""
        connected = await self._connect()
        if self.refused:
            log.info("stream readers poll: Redis gives no keyspace events of streams")
            return False
        # Unreachable for now: the listener connects as soon as Redis is back.
        self._listener = asyncio.create_task(self._listen(), name="stream-bell")
        return connected

    async def close(self) -> None:
        self.on = False
        if self._starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        if self._unsubscribing:
            await asyncio.gather(*self._unsubscribing, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._drop_pubsub()

    async def watch(self, job_id: str) -> asyncio.Event:
        """The event set whenever ``job_id``'s stream grows (clear it before each wait);
        :meth:`unwatch` once for each watch."""
        if self._starting is None:
            self._starting = asyncio.create_task(self.start(), name="stream-bell-start")
        await asyncio.shield(self._starting)
        channel = self._channel(job_id)
        self._readers[channel] += 1
        event = self._rung.setdefault(channel, asyncio.Event())
        if self._readers[channel] == 1 and self._pubsub is not None:
            try:
                await self._pubsub.subscribe(channel)
            except RedisError:  # the listener reconnects and subscribes again
                pass
        return event

    def unwatch(self, job_id: str) -> None:
        channel = self._channel(job_id)
        self._readers[channel] -= 1
        if self._readers[channel] > 0:
            return
        del self._readers[channel]
        self._rung.pop(channel, None)
        if self._pubsub is not None:
            task = asyncio.create_task(self._unsubscribe(self._pubsub, channel))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, pubsub: PubSub, channel: str) -> None:
        if pubsub is not self._pubsub:
            return  # dropped meanwhile: a dropped pubsub would connect again to unsubscribe
        with contextlib.suppress(RedisError):
            await pubsub.unsubscribe(channel)

    def _channel(self, job_id: str) -> str:
        return self._prefix + redis_key(STREAM, job_id)

    async def _connect(self) -> bool:
        """Keyspace events on (a restarted Redis forgets them), a connection subscribed to
        every watched stream, and every reader woken once for what it may have missed."""
        try:
            flags = (await self.redis.config_get("notify-keyspace-events")).get(
                "notify-keyspace-events", ""
            )
            has = set(flags.decode() if isinstance(flags, bytes) else str(flags))
            if "K" not in has or not has & {"t", "A"}:  # A: every class of events
                await self.redis.config_set(
                    "notify-keyspace-events", "".join(sorted(has | set(NOTIFY_FLAGS)))
                )
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            await pubsub.subscribe(self._prefix + "cocoon:bell", *self._readers)
        except ResponseError:  # NOPERM, or a server without CONFIG: for good
            self.refused = True
            await self._drop_pubsub()
            return False
        except RedisError:
            await self._drop_pubsub()
            return False
        self.on = True
        for event in self._rung.values():
            event.set()
        return True

    async def _listen(self) -> None:
        while not self.refused:
            pubsub = self._pubsub
            if pubsub is None:
                await asyncio.sleep(0.5)
                await self._connect()
                continue
            try:
                message = await pubsub.get_message(timeout=1.0)
            # RuntimeError: redis-py's pubsub that lost its connection before subscribing
            except (RedisError, RuntimeError) as error:
                log.warning("stream bell lost (%s): readers poll meanwhile", type(error).__name__)
                self.on = False
                await self._drop_pubsub()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            event = self._rung.get(channel.decode() if isinstance(channel, bytes) else channel)
            if event is not None:
                event.set()

    async def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError):
                await self._pubsub.aclose()
            self._pubsub = None
